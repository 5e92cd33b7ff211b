"""A training script run by tests/test_model_parallel.py: DPModelParallelStrategy (FSDP2) or DPStrategy on CPU
processes (gloo), launched as Lightning launches them. Each rank saves the whole parameters it ends with.

Usage: python tests/model_parallel_script.py OUT_DIR MODE DEVICES STRATEGY [CKPT]

STRATEGY: ``fsdp`` (DPModelParallelStrategy) or ``ddp`` (DPStrategy, the reference).
"""

import os
import sys

import lightning as L
import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import ClassifierModule, tensor_data  # noqa: E402

from lightning_dp import DPModelParallelStrategy, DPStrategy  # noqa: E402


class Gate(nn.Module):
    """A layer no rule covers (the torch.func fallback clips it)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, d))

    def forward(self, x):
        return x * torch.tanh(self.w)


def make_net(mode):
    torch.manual_seed(0)
    layers = [nn.Linear(10, 16), nn.LayerNorm(16), nn.ReLU()]
    if mode == "fallback":
        layers.append(Gate(16))
    layers += [nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)]
    net = nn.Sequential(*layers)
    if mode in ("frozen", "unfreeze"):
        net[0].requires_grad_(False)
    return net


class ShardedModule(ClassifierModule):
    bf16 = False
    all_params = False  # the optimizer holds frozen parameters too (they are unfrozen later)

    def configure_optimizers(self):
        if self.all_params:
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return super().configure_optimizers()

    def configure_model(self):
        if not isinstance(self.trainer.strategy, DPModelParallelStrategy):
            return
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy()
        if self.bf16:  # bf16 parameters in forward and backward; the sharded parameters and the reduction stay fp32
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in self.net:
            if any(True for _ in layer.parameters(recurse=False)):
                fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(self, mesh=mesh, mp_policy=policy)


class UnfreezeAt(L.Callback):
    """Unfreeze the first layer before step ``step`` (as BackboneFinetuning does)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.net[0].requires_grad_(True)


class Sizes(L.Callback):
    def __init__(self):
        self.sizes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(int(batch[0].shape[0]))


class SaveAt(L.Callback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def whole(p):
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def main():
    out, mode, devices, kind = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ckpt = sys.argv[5] if len(sys.argv) > 5 else None
    L.seed_everything(0, verbose=False)
    cls = DPModelParallelStrategy if kind == "fsdp" else DPStrategy
    options = {
        "clipping": "per_layer" if mode == "per_layer" else "flat",
        "engine": "hooks" if mode == "hooks" else "ghost",
    }
    if mode == "noise":  # zero data: the update is the noise alone
        net = nn.Sequential(nn.Linear(50, 40, bias=False))
        ds = TensorDataset(torch.zeros(400, 50), torch.randint(0, 40, (400,)))
        strategy = cls(noise_multiplier=2.0, max_grad_norm=1.5, noise_seed=3, **options)
        batch, steps, lr, optimizer = 20, 1, 1.0, "sgd"
    elif mode == "uneven":  # Poisson at q = 0.1 in micro-batches of 2: ranks differ in micro-batches, some empty
        net = make_net(mode)
        ds = tensor_data(n=60)
        strategy = cls(noise_multiplier=1e-7, max_grad_norm=0.5, sampling_seed=11, max_physical_batch_size=2, **options)
        batch, steps, lr, optimizer = 6, 8, 0.5, "sgd"
    elif mode.startswith("resume"):  # Poisson batches, noise and sampling from fixed seeds, Adam
        net = make_net(mode)
        ds = tensor_data(n=120)
        strategy_kwargs = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "noise_seed": 5, "sampling_seed": 6}
        strategy_kwargs.update(options)
        strategy = cls(**strategy_kwargs)
        batch, steps, lr, optimizer = 12, 6, 0.01, "adam"
    else:  # q = 1, σ ≈ 0: two steps of exact clipped DP-SGD
        net = make_net(mode)
        ds = tensor_data(n=24)
        strategy = cls(noise_multiplier=1e-7, max_grad_norm=0.5, max_physical_batch_size=5, **options)
        batch, steps, lr, optimizer = 24, 2, 0.5, "sgd"
    sizes = Sizes()
    callbacks = [sizes]
    if kind == "fsdp" and mode == "resume_full":  # one file assembled on rank 0 instead of a folder of shards
        strategy = cls(save_distributed_checkpoint=False, **strategy_kwargs)
    if mode.startswith("resume") and ckpt is None and devices == 2 and "interrupted" in out:
        callbacks.append(SaveAt(3, os.path.join(out, "mid.ckpt")))
    model = ShardedModule(net, lr=lr, optimizer=optimizer)
    model.bf16 = mode == "bf16"
    model.all_params = mode == "unfreeze"
    if mode == "unfreeze":
        callbacks.append(UnfreezeAt(1))
    before = [p.detach().clone() for p in net.parameters()]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=out,
    )
    trainer.fit(model, DataLoader(ds, batch_size=batch // devices), ckpt_path=ckpt)
    local = {n: p.to_local().detach().clone() for n, p in net.named_parameters() if isinstance(p, DTensor)}
    torch.save(
        {
            "before": before,
            "after": [whole(p) for p in net.parameters()],
            "local": local,
            "ledger": strategy.ledger.state_dict(),
            "epsilon": strategy.epsilon,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "sharded": [isinstance(p, DTensor) for p in net.parameters()],
            "sizes": sizes.sizes,
        },
        os.path.join(out, f"{mode}-{kind}{'-resumed' if ckpt else ''}-{devices}-rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
