"""What the ``dp/epsilon`` refresh costs a run, in the regimes of the architecture issue (10).

The strategy reports ε every step as an upper bound from :class:`lightning_dp.budget.EpsilonMeter`, which refreshes
only while refreshes cost at most 1 % of the run's time. This script drives the same code path as
``DPStrategy`` (``lightning_dp.reporting.epsilon_upper_bound`` on a :class:`~lightning_dp.plan.PrivacyPlan`) for
every step of a simulated run: the training step itself is simulated by advancing a clock by the given step time
(so a 200k-step run does not take 3 hours), while every ε evaluation really runs and its process CPU time is added
to that clock. Reported: refreshes, seconds spent refreshing (process CPU time), the simulated run time, the share,
and how far the reported bound is above the exact ε at half time and at the end.

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


class SimClock:
    """Simulated wall time: the simulated steps' time plus the real process CPU time of everything else (the ε
    evaluations, the plan's bookkeeping) since the start.
    """

    def __init__(self) -> None:
        self.steps_time = 0.0
        self._cpu0 = time.process_time()

    def __call__(self) -> float:
        return self.steps_time + time.process_time() - self._cpu0


def simulate(n: int, b: int, steps: int, sigma: float | None, target: float | None, step_time: float) -> dict:
    plan = PrivacyPlan(noise_multiplier=sigma, target_epsilon=target, delta=1e-5 if n < 1e6 else 1e-7)
    plan.bind(n, b)
    plan.schedule(steps)
    clock = SimClock()
    meter = EpsilonMeter(clock=clock)
    t0 = time.process_time()
    start_meter(plan, meter)  # as DPStrategy does when the fit is planned: the ε curve along the plan
    cpu = time.process_time() - t0
    checks = {steps // 2: 0.0, steps: 0.0}
    for step in range(steps):
        clock.steps_time += step_time
        t0 = time.process_time()
        value = epsilon_upper_bound(plan, meter)
        cpu += time.process_time() - t0
        plan.record()
        if step + 1 in checks:
            t1 = time.process_time()
            exact = plan.epsilon()
            clock._cpu0 += time.process_time() - t1  # checking is not part of the run
            if value < exact - 1e-9:
                raise AssertionError(f"reported {value} below the exact ε {exact} at step {step + 1}")
            checks[step + 1] = value / exact - 1.0
    run_time = steps * step_time + cpu
    gap_mid, gap_end = checks.values()
    return dict(
        refreshes=meter.refreshes, refresh_cpu_s=cpu, run_s=run_time, share=cpu / run_time, mid=gap_mid, end=gap_end
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only the two shorter regimes")
    args = parser.parse_args()
    rows = REGIMES[:2] if args.quick else REGIMES
    print(
        f"{'regime':52s} {'mode':8s} {'refreshes':>9s} {'refresh s':>9s} {'run s':>9s} {'share':>7s}"
        f" {'gap@T/2':>8s} {'gap@T':>8s}",
        flush=True,
    )
    for name, n, b, steps, sigma, eps, step_time in rows:
        for mode in ("noise", "target"):
            r = simulate(n, b, steps, sigma if mode == "noise" else None, eps if mode == "target" else None, step_time)
            print(
                f"{name:52s} {mode:8s} {r['refreshes']:9d} {r['refresh_cpu_s']:9.2f} {r['run_s']:9.0f}"
                f" {100 * r['share']:6.2f}% {100 * r['mid']:7.1f}% {100 * r['end']:7.1f}%",
                flush=True,
            )


if __name__ == "__main__":
    main()
