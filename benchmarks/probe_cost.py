"""The cost of the sample-mixing probe: process CPU time of a private fit with the default probe against none.

The probe runs at the first step, then at random steps at a rate set after the first probe so that probing takes at
most ``probe_budget`` (2 %) of the run's time. This benchmark fits the quickstart's model (a small timm ViT on 8×8
digits) for ``--steps`` steps with the probe on (default budget) and off (``check_sample_mixing=False``), alternating
(off, on, off, on; the second of each is kept), at a large and a small batch size, and prints the overhead in
process CPU time, the number of probes, the rate chosen and the probe's own share of the fit's wall time.

    OMP_NUM_THREADS=1 python benchmarks/probe_cost.py
    OMP_NUM_THREADS=1 python benchmarks/probe_cost.py --steps 200 --batch-sizes 256 32

CPU time is ``time.process_time()`` (this process, all threads), so other load on the machine does not inflate it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from lightning_dp import DPStrategy  # noqa: E402
from lightning_dp.console import quiet_lightning  # noqa: E402


def fit_seconds(probe: bool, steps: int, batch_size: int) -> tuple[float, DPStrategy, float]:
    from quickstart import Classifier, digits_split, make_vit

    train, _ = digits_split(range(5, 10))
    torch.manual_seed(0)
    module = Classifier(make_vit(), lr=1e-2)
    strategy = DPStrategy(noise_multiplier=1.0, max_physical_batch_size=64, check_sample_mixing=probe)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        strategy=strategy,
    )
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True)
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.fit(module, loader)
    return time.process_time() - cpu, strategy, time.perf_counter() - wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 16])
    args = p.parse_args()
    quiet_lightning(dataloader_workers_hint=False)
    print(f"torch threads: {torch.get_num_threads()}, {args.steps} steps per fit")
    for b in args.batch_sizes:
        runs = {}
        for probe in (False, True, False, True):
            runs[probe] = fit_seconds(probe, args.steps, b)
        (off, _, _), (on, strategy, wall) = runs[False], runs[True]
        schedule = strategy._guards.probe
        print(
            f"B = {b}: probe off {off:.2f} s, on {on:.2f} s CPU ({(on / off - 1) * 100:+.1f} %); {schedule.probes}"
            f" probes, rate {schedule.rate:.3f} per step after the first, probe time {schedule.probe_seconds:.2f} s"
            f" = {schedule.probe_seconds / wall * 100:.1f} % of the fit's wall time"
        )


if __name__ == "__main__":
    main()
