"""What the ``dp/epsilon`` refresh costs a run, in the regimes of the architecture issue (10).

The strategy reports ε every step as an upper bound from :class:`lightning_dp.budget.EpsilonMeter`, refreshed on a
deterministic geometric grid of steps (ε grows by at most 2 % between a step and the grid point after it). This
script drives the same code path as ``DPStrategy`` (``lightning_dp.reporting.epsilon_upper_bound`` on a
:class:`~lightning_dp.plan.PrivacyPlan`) for every step of a simulated run: the training step itself is not run,
its time is the given seconds per step (so a 200k-step run does not take 3 hours), while every ε evaluation really
runs and is measured in process CPU time. Reported: refreshes, seconds spent refreshing (process CPU time), the
simulated run time, the share, the largest gap between the logged value and ε of the step (over the steps where it
is checked: every step for short runs, ~60 steps spread geometrically otherwise), and the gap at the end.

    python benchmarks/epsilon_refresh.py            # the three regimes, noise_multiplier and target_epsilon
    python benchmarks/epsilon_refresh.py --quick    # the two short regimes
"""

from __future__ import annotations

import argparse
import time

from lightning_dp.budget import EpsilonMeter
from lightning_dp.plan import PrivacyPlan
from lightning_dp.reporting import epsilon_upper_bound, start_meter

# (name, N, B, steps, σ (noise runs) or ε (target runs), seconds per step)
REGIMES = [
    ("few steps/epoch: q=1, 200 steps, 15 ms/step", 1000, 1000, 200, 20.0, 2.0, 0.015),
    ("10k steps: q=256/50000, 55 ms/step (ViT-B, H100)", 50000, 256, 10_000, 1.0, 3.0, 0.055),
    ("200k steps: q=0.001, 55 ms/step", 1_000_000, 1000, 200_000, 0.6, 8.0, 0.055),
]


def simulate(n: int, b: int, steps: int, sigma: float | None, target: float | None, step_time: float) -> dict:
    plan = PrivacyPlan(noise_multiplier=sigma, target_epsilon=target, delta=1e-5 if n < 1e6 else 1e-7)
    plan.bind(n, b)
    plan.schedule(steps)
    meter = EpsilonMeter()
    t0 = time.process_time()
    start_meter(plan, meter)  # as DPStrategy does when the fit is planned (ε at the end of the plan)
    cpu = time.process_time() - t0
    checks = sorted({round(steps ** (k / 60)) for k in range(61)} | {steps // 2, steps})
    gaps = {}
    last = 0.0
    for step in range(steps):
        t0 = time.process_time()
        value = epsilon_upper_bound(plan, meter)
        cpu += time.process_time() - t0
        plan.record()
        if value < last:
            raise AssertionError(f"the logged ε went down at step {step + 1}: {last} then {value}")
        last = value
        if step + 1 in checks:  # checking is not part of the run's cost
            exact = plan.epsilon()
            if value < exact - 1e-9:
                raise AssertionError(f"reported {value} below the exact ε {exact} at step {step + 1}")
            gaps[step + 1] = value / exact - 1.0
    run_time = steps * step_time + cpu
    return dict(
        refreshes=meter.refreshes,
        refresh_cpu_s=cpu,
        run_s=run_time,
        share=cpu / run_time,
        worst=max(gaps.values()),
        end=gaps[steps],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the two shorter regimes")
    args = parser.parse_args()
    rows = REGIMES[:2] if args.quick else REGIMES
    print(
        f"{'regime':52s} {'mode':8s} {'refreshes':>9s} {'refresh s':>9s} {'run s':>9s} {'share':>7s}"
        f" {'max gap':>8s} {'gap@T':>8s}",
        flush=True,
    )
    for name, n, b, steps, sigma, eps, step_time in rows:
        for mode in ("noise", "target"):
            r = simulate(n, b, steps, sigma if mode == "noise" else None, eps if mode == "target" else None, step_time)
            print(
                f"{name:52s} {mode:8s} {r['refreshes']:9d} {r['refresh_cpu_s']:9.2f} {r['run_s']:9.0f}"
                f" {100 * r['share']:6.2f}% {100 * r['worst']:7.2f}% {100 * r['end']:7.2f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
