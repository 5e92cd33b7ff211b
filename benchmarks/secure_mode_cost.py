"""The cost of ``DPStrategy(secure_mode=True)``: process CPU time of secure vs default noise, alone and in a step.

1. One noise draw for a model of ``--params`` parameters (default 5M): ``SecureSource.normal`` (SHAKE-256 keystream +
   Box–Muller in float64) against ``TorchSource.normal`` (torch's Philox/Mersenne generator), alternating.
2. A whole private step of the quickstart's model (a small timm ViT on 8×8 digits, B = 128, micro-batches of 64)
   through a real ``Trainer``: the median process CPU time per step with ``secure_mode`` on and off.

    OMP_NUM_THREADS=1 python benchmarks/secure_mode_cost.py
    OMP_NUM_THREADS=1 python benchmarks/secure_mode_cost.py --params 86000000 --repeats 3   # ViT-B/16 sized

CPU time is ``time.process_time()`` (this process, all threads), so other load on the machine does not inflate it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from lightning_dp import DPStrategy  # noqa: E402
from lightning_dp.console import quiet_lightning  # noqa: E402
from lightning_dp.randomness import SecureSource, TorchSource  # noqa: E402


def noise_draw_seconds(params: int, repeats: int) -> dict[str, float]:
    sources = {"default": TorchSource(0), "secure": SecureSource(b"\x00" * 32)}
    times: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(repeats):
        for name, source in sources.items():
            start = time.process_time()
            source.normal((params,), 1.0, torch.device("cpu"), torch.float32)
            times[name].append(time.process_time() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.process_time()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.process_time() - self._start)


def step_seconds(secure: bool, steps: int) -> tuple[float, int]:
    from quickstart import Classifier, digits_split, make_vit

    train, _ = digits_split(range(5, 10))
    module = Classifier(make_vit(), lr=1e-2)
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        strategy=DPStrategy(noise_multiplier=1.0, max_physical_batch_size=64, secure_mode=secure),
    )
    trainer.fit(module, torch.utils.data.DataLoader(train, batch_size=128, shuffle=True))
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return statistics.median(timer.times[2:]), params  # the first steps include the sample-mixing probe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=5_000_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    quiet_lightning(dataloader_workers_hint=False)
    print(f"torch threads: {torch.get_num_threads()}")
    draw = noise_draw_seconds(args.params, args.repeats)
    print(
        f"noise draw, {args.params:,} parameters: default {draw['default'] * 1e3:.1f} ms, secure"
        f" {draw['secure'] * 1e3:.1f} ms CPU ({draw['secure'] / draw['default']:.1f}×,"
        f" +{(draw['secure'] - draw['default']) * 1e9 / args.params:.1f} ns per parameter)"
    )
    rows = {}
    for secure in (False, True, False, True):  # alternate, keep the second of each
        rows[secure] = step_seconds(secure, args.steps)
    (default, params), (secure, _) = rows[False], rows[True]
    print(
        f"quickstart step ({params:,} trainable parameters, B = 128): default {default * 1e3:.1f} ms, secure"
        f" {secure * 1e3:.1f} ms CPU per step ({secure / default:.2f}×)"
    )


if __name__ == "__main__":
    main()
