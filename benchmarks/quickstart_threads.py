"""Wall and CPU time of the quickstart with 1 and 2 torch threads, side by side (alternating runs).

    python benchmarks/quickstart_threads.py                         # --epochs 6 --pretrain-epochs 3, 2 rounds
    python benchmarks/quickstart_threads.py --threads 1 2 --rounds 3 -- --epochs 30

Each run is a fresh process (`examples/quickstart.py --threads k`); CPU time is the child's user + system time
(resource.getrusage). On a shared machine, compare the ratios of runs made in the same round.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(threads: int, extra: list[str]) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env_args = [sys.executable, str(ROOT / "examples/quickstart.py"), "--threads", str(threads), *extra]
    subprocess.run(env_args, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("quickstart_args", nargs="*", default=["--epochs", "6", "--pretrain-epochs", "3"])
    args = p.parse_args()
    print(f"quickstart {' '.join(args.quickstart_args)}")
    print(f"{'round':>5} {'threads':>7} {'wall s':>8} {'CPU s':>8}")
    for r in range(args.rounds):
        order = args.threads if r % 2 == 0 else list(reversed(args.threads))
        for k in order:
            wall, cpu = run(k, args.quickstart_args)
            print(f"{r:>5} {k:>7} {wall:>8.1f} {cpu:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
