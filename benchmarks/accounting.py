"""Cost and tightness of the privacy accounting: ε per setting against dp_accounting's PLD, seconds per ε
evaluation, σ calibration time and peak memory. Every measurement runs in a fresh subprocess (cold caches, clean
peak RSS) and is timed in process CPU seconds (``time.process_time``), so a busy machine does not inflate it.

Columns:

- ``ε ours``: the default accountant's reported ε (PRV upper bound, or the exact closed form when q = 1).
- ``ε PLD``: dp_accounting's PLD (pessimistic connect-the-dots) with a loss interval of min(1e-4, ε / 5000): its
  default 1e-4 is itself ~6 % pessimistic at ε ≈ 0.1. ``ratio`` = ours / PLD (the bar: ≥ 1 and ≤ 1.03).
- ``eval s (cold)``: one ε evaluation in a new process (imports excluded). ``eval s (warm)``: the same after an
  evaluation one step earlier, i.e. what a refresh of ``dp/epsilon`` during training costs.
- ``calib s`` / ``σ calib``: ``calibrate_noise_multiplier(target=ε ours, δ, q, steps)`` in a new process, and the σ
  it returns (≈ σ, at most 0.5 % above).
- ``RSS MiB``: peak RSS growth over the process's RSS after imports (evaluation / calibration); the kernel's peak
  mark is reset after imports.
- ``--scaling``: the cost of one ε evaluation (warm) against the number of steps, per regime: what refreshing
  ``dp/epsilon`` costs along a run.
- ``--package``: also time the ``prv-accountant`` package alone at a fixed ``eps_error=0.01`` (the previous
  implementation) for one evaluation.

Examples:
    python benchmarks/accounting.py              # all reference settings
    python benchmarks/accounting.py --quick      # a subset (a few seconds each)
    python benchmarks/accounting.py --package    # with the package-only baseline (slow: ~20 s for f)
    python benchmarks/accounting.py --delta 1e-9 --only a e f
    python benchmarks/accounting.py --scaling    # cost of one ε refresh vs steps, per regime
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

DELTA = float(os.environ.get("BENCH_DELTA", "1e-5"))
#: name: (segments [(σ, q, steps)], description)
SETTINGS: dict[str, tuple[list[tuple[float, float, int]], str]] = {
    "a": ([(1.1, 256 / 60000, 14062)], "MNIST-like, 60 epochs"),
    "b": ([(1.0, 0.01, 10000)], "q=0.01, 10k steps"),
    "c": ([(3.0, 4096 / 50000, 488)], "CIFAR-10 large batch"),
    "d": ([(20.0, 1.0, 100)], "full batch, q=1"),
    "e": ([(0.8, 64 / 1e6, 78125)], "small ε, long run"),
    "f": ([(0.6, 0.001, 200000)], "q=0.001, 200k steps"),
    "mix": ([(1.0, 0.02, 200), (2.0, 0.05, 100), (5.0, 1.0, 3)], "heterogeneous"),
    "q1-200": ([(1.0, 1.0, 200)], "regime: 200 steps at q=1"),
    "q.005-10k": ([(1.0, 0.005, 10000)], "regime: 10k steps at q=0.005"),
}
QUICK = ["c", "d", "mix", "f"]
#: --scaling: (σ, q, step counts) — the cost of one refresh of ε along a run, per regime.
SCALING = {
    "q=1, σ=1": (1.0, 1.0, [10, 200, 1000]),
    "q=0.005, σ=1": (1.0, 0.005, [100, 1000, 10000, 50000]),
    "q=0.001, σ=0.6": (0.6, 0.001, [100, 1000, 10000, 100000, 200000]),
    "q=6.4e-5, σ=0.8": (0.8, 64e-6, [100, 1000, 10000, 78125]),
}


# ---------------------------------------------------------------------------------------------------- worker
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so import-time peaks do not count (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _segments(triples: list[tuple[float, float, int]]) -> list[Any]:
    from lightning_dp.accounting import MechanismSegment

    return [MechanismSegment(s, q, n) for s, q, n in triples]


def _work(task: str, name: str) -> dict[str, Any]:
    import warnings

    warnings.simplefilter("ignore")
    from lightning_dp.accounting import calibrate_noise_multiplier, epsilon_of_segments

    if task == "pld":
        from dp_accounting import dp_event
        from dp_accounting.pld import pld_privacy_accountant
    elif task == "package":
        from prv_accountant import PRVAccountant
        from prv_accountant.privacy_random_variables import GaussianMechanism, PoissonSubsampledGaussianMechanism
    triples = SETTINGS[name][0] if name in SETTINGS else []
    _reset_peak_rss()
    base = _rss_mib()
    out: dict[str, Any] = {}
    if task == "eval":
        t = time.process_time()
        out["eps"] = epsilon_of_segments(_segments(triples), DELTA)
        out["cold_s"] = time.process_time() - t
        earlier = triples[:-1] + [(triples[-1][0], triples[-1][1], triples[-1][2] - 1)]
        epsilon_of_segments(_segments(earlier), DELTA)
        # Warm: the per-(σ, q) RDP curves are cached, the composition is new (one step more).
        later = triples[:-1] + [(triples[-1][0], triples[-1][1], triples[-1][2] + 1)]
        t = time.process_time()
        epsilon_of_segments(_segments(later), DELTA)
        out["warm_s"] = time.process_time() - t
    elif task == "scaling":
        sigma, q, counts = SCALING[name]
        epsilon_of_segments(_segments([(sigma, q, 1)]), DELTA)  # warm the per-(σ, q) RDP cache
        out["rows"] = []
        for n in counts:
            t = time.process_time()
            eps = epsilon_of_segments(_segments([(sigma, q, n)]), DELTA)
            out["rows"].append((n, eps, time.process_time() - t))
    elif task == "calibrate":
        *prior, (sigma, q, steps) = triples
        t = time.process_time()
        out["sigma"] = calibrate_noise_multiplier(
            float(os.environ["BENCH_TARGET"]), DELTA, q, steps, prior=_segments(prior)
        )
        out["calib_s"] = time.process_time() - t
    elif task == "pld":
        interval = min(1e-4, float(os.environ["BENCH_TARGET"]) / 5000)
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
        for s, q, n in triples:
            event = dp_event.GaussianDpEvent(s)
            acc.compose(dp_event.PoissonSampledDpEvent(q, event) if q < 1 else event, n)
        t = time.process_time()
        out["pld"] = acc.get_epsilon(DELTA)
        out["pld_s"] = time.process_time() - t
        out["interval"] = interval
    elif task == "package":
        prvs = [GaussianMechanism(s) if q >= 1 else PoissonSubsampledGaussianMechanism(q, s) for s, q, _ in triples]
        t = time.process_time()
        steps = [n for *_, n in triples]
        acc = PRVAccountant(prvs=prvs, max_self_compositions=steps, eps_error=0.01, delta_error=DELTA * 1e-3)
        out["package_eps"] = acc.compute_epsilon(DELTA, steps)[2]
        out["package_s"] = time.process_time() - t
    out["rss_mib"] = _peak_rss_mib() - base
    return out


# ---------------------------------------------------------------------------------------------------- driver
def _run(task: str, name: str, target: float | None = None) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if target is not None:
        env["BENCH_TARGET"] = repr(target)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", task, name]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc={proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), help="these settings only")
    parser.add_argument("--package", action="store_true", help="also time prv-accountant alone at eps_error=0.01")
    parser.add_argument("--no-calibration", action="store_true")
    parser.add_argument("--scaling", action="store_true", help="only: the cost of one ε refresh vs steps")
    parser.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_work(*args.worker)))
        return
    os.environ["BENCH_DELTA"] = repr(args.delta)
    if args.scaling:
        print("| regime | steps | ε | s per evaluation (warm) | peak RSS MiB |")
        print("|---|---|---|---|---|")
        for name in SCALING:
            res = _run("scaling", name)
            for n, eps, sec in res.get("rows", []):
                print(f"| {name} | {n} | {eps:.4f} | {sec:.3f} | {_fmt(res.get('rss_mib'), '.0f')} |", flush=True)
            if "error" in res:
                print(f"| {name} | error: {res['error']} |")
        return
    try:
        import dp_accounting  # noqa: F401

        have_pld = True
    except ImportError:
        have_pld = False
    names = args.only or (QUICK if args.quick else list(SETTINGS))
    header = (
        "| setting | σ | q | steps | ε ours | ε PLD | ratio | eval s (cold) | eval s (warm) | calib s | σ calib |"
        " RSS MiB eval / calib |"
    )
    if args.package:
        header += " package ε | package s | package RSS MiB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for name in names:
        triples, _ = SETTINGS[name]
        sigma, q, steps = triples[-1]
        row: dict[str, Any] = {"setting": name, "segments": triples}
        row.update(_run("eval", name))
        eps = row.get("eps")
        if have_pld and eps is not None:
            pld = _run("pld", name, eps)
            row["pld_rss_mib"] = pld.pop("rss_mib", None)
            row.update(pld)
        calib_rss = None
        if not args.no_calibration and eps is not None:
            cal = _run("calibrate", name, eps)
            calib_rss = cal.pop("rss_mib", None)
            row.update(cal)
            row["calib_rss_mib"] = calib_rss
        if args.package:
            pkg = _run("package", name)
            row["package_rss_mib"] = pkg.pop("rss_mib", None)
            row.update(pkg)
        rows.append(row)
        ratio = eps / row["pld"] if eps is not None and row.get("pld") else None
        label = name if len(triples) == 1 else f"{name} ({len(triples)} segments)"
        line = (
            f"| {label} | {sigma:g} | {q:.4g} | {steps} | {_fmt(eps, '.4f')} | {_fmt(row.get('pld'), '.4f')} |"
            f" {_fmt(ratio, '.4f')} | {_fmt(row.get('cold_s'), '.2f')} | {_fmt(row.get('warm_s'), '.2f')} |"
            f" {_fmt(row.get('calib_s'), '.2f')} | {_fmt(row.get('sigma'), '.4f')} |"
            f" {_fmt(row.get('rss_mib'), '.0f')} / {_fmt(calib_rss, '.0f')} |"
        )
        if args.package:
            line += (
                f" {_fmt(row.get('package_eps'), '.4f')} | {_fmt(row.get('package_s'), '.2f')} |"
                f" {_fmt(row.get('package_rss_mib'), '.0f')} |"
            )
        if "error" in row:
            line += f" error: {row['error']}"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
