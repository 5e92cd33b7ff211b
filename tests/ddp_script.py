"""A training script run by tests/test_ddp.py with 1 or 2 CPU processes (gloo), launched as Lightning launches DDP:
the script starts, and Lightning's launcher re-runs it for the other ranks. Each rank saves what it saw.

Usage: python tests/ddp_script.py OUT_DIR MODE DEVICES [CKPT]
"""

import math
import os
import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import ClassifierModule, mlp, tensor_data  # noqa: E402

from lightning_dp import DPStrategy  # noqa: E402
from lightning_dp.callbacks import AdaptiveClipping  # noqa: E402


class Recorder(L.Callback):
    def __init__(self, physical):
        self.physical = physical
        self.sizes = []
        self.bounds = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(int(batch[0].shape[0]))

    def on_train_batch_end(self, trainer, *args):
        self.bounds.append(trainer.strategy.max_grad_norm)  # the bound this step clipped and noised with


class SaveAt(L.Callback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def main():
    out, mode, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ckpt = sys.argv[4] if len(sys.argv) > 4 else None
    L.seed_everything(0, verbose=False)
    callbacks = []
    physical = None
    if mode == "zero":  # zero data: the update is pure noise
        net = nn.Linear(50, 40, bias=False)
        model = ClassifierModule(net, lr=1.0)
        ds = TensorDataset(torch.zeros(400, 50), torch.randint(0, 40, (400,)))
        strategy = DPStrategy(noise_multiplier=2.0, max_grad_norm=1.5)
        global_batch, max_steps = 20, 1
    elif mode == "audit":  # zero data, q = 1, negligible noise: the update is the audit's canaries alone
        from lightning_dp.audit import CanaryAudit

        net = nn.Linear(50, 40, bias=False)
        model = ClassifierModule(net, lr=1.0)
        ds = TensorDataset(torch.zeros(40, 50), torch.randint(0, 40, (40,)))
        strategy = DPStrategy(noise_multiplier=1e-7, max_grad_norm=1.5)
        callbacks.append(CanaryAudit(num_canaries=100, seed=4, on_violation="warn"))
        global_batch, max_steps = 40, 2
    elif mode in ("exact", "exact_per_layer", "adaptive", "adaptive_per_layer"):
        # q = 1 and negligible gradient noise: the update is deterministic (adaptive: the count's noise is drawn on
        # rank 0 from a fixed noise seed, the same in one process and on two ranks)
        net = mlp()
        model = ClassifierModule(net, lr=0.1)
        ds = tensor_data(n=40)
        physical = 3
        clipping = "per_layer" if mode.endswith("per_layer") else "flat"
        adaptive = mode.startswith("adaptive")
        strategy = DPStrategy(
            noise_multiplier=1e-7,
            max_grad_norm=0.5,
            max_physical_batch_size=physical,
            clipping=clipping,
            noise_seed=0 if adaptive else None,
        )
        if adaptive:
            callbacks.append(AdaptiveClipping(count_noise_multiplier=2.0, initial_max_grad_norm=0.05))
        global_batch, max_steps = 40, 3
    else:  # "train" / "resume": Poisson batches, uneven micro-batch counts across ranks, Adam
        net = mlp()
        model = ClassifierModule(net, lr=0.01, optimizer="adam")
        ds = tensor_data(n=200)
        physical = 2
        strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=physical)
        global_batch, max_steps = 10, 8
        if mode == "resume" and ckpt is None:
            callbacks.append(SaveAt(4, os.path.join(out, "mid.ckpt")))
    recorder = Recorder(physical)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[recorder, *callbacks],
    )
    before = [p.detach().clone() for p in net.parameters()]
    trainer.fit(model, DataLoader(ds, batch_size=global_batch // devices, shuffle=True), ckpt_path=ckpt)
    torch.save(
        {
            "before": before,
            "after": [p.detach().clone() for p in net.parameters()],
            "sizes": recorder.sizes,
            "bounds": recorder.bounds,
            "micro_batches": [math.ceil(s / physical) if physical else 1 for s in recorder.sizes],
            "ledger": strategy.ledger.state_dict(),
            "epsilon": strategy.epsilon,
            "noise_multiplier": strategy.noise_multiplier,
            "sample_rate": strategy.sample_rate,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
        },
        os.path.join(out, f"{mode}{'-resumed' if ckpt else ''}-{devices}-rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
