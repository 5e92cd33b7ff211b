"""Per-rank parameter + optimizer-state memory: ``DPStrategy`` (DDP, every rank holds everything) against
``DPModelParallelStrategy`` (FSDP2, every rank holds a shard), on the same model, data and privacy settings.

Each strategy runs a short private fit (Adam, Poisson sampling, ``noise_multiplier=1.0``, synthetic images) in a fresh
set of processes launched by Lightning (``Trainer(devices=N, accelerator=..., strategy=...)``). After the last
optimizer step (so Adam's ``exp_avg``/``exp_avg_sq`` exist) each rank counts the bytes it actually holds:

- parameters: the sum over the module's parameters of the *local* tensor's bytes (``p.to_local()`` for a DTensor);
- optimizer state: the local bytes of every tensor in ``optimizer.state`` (the same for DTensors).

Gradients, activations, communication buffers and the step's transient fp32 clipped sum (see
``lightning_dp/model_parallel.py``) are not in these two columns; on CUDA the table adds
``torch.cuda.max_memory_allocated()`` per rank, the peak of everything over the whole fit.

The model is a timm ViT built offline (``pretrained=False``; default: ViT-Tiny's width and depth, 192 × 12, on
32 × 32 images, 5.4 M parameters), each block its own ``fully_shard`` unit under the sharded strategy, then the root.

Commands:
    OMP_NUM_THREADS=1 python benchmarks/sharded_memory.py --out sharded_memory_cpu.json   # 2 CPU ranks (gloo)
    python benchmarks/sharded_memory.py --accelerator cuda --devices 2 --embed-dim 1024 --depth 24 --heads 16 \
        --img-size 224 --patch-size 16 --batch-size 32 --out sharded_memory_gpu.json       # 2 GPUs, ViT-L/16 size

Measured on 2 CPU ranks (gloo), the first command above, torch 2.14.1, Lightning 2.6.6, timm 1.0.31; ViT 192 × 12
on 32 × 32 images, 5,377,738 parameters, Adam, 3 Poisson steps of expected batch 8, σ = 1.0 (bytes are exact counts,
so they do not vary between runs or machines for the same model):

    strategy                 rank  param bytes           optimizer bytes       total bytes           sharded/DDP
    DPStrategy               0     21,510,952 (21.5 MB)  43,022,504 (43.0 MB)  64,533,456 (64.5 MB)  1.000
    DPStrategy               1     21,510,952 (21.5 MB)  43,022,504 (43.0 MB)  64,533,456 (64.5 MB)  1.000
    DPModelParallelStrategy  0     10,755,476 (10.8 MB)  21,511,552 (21.5 MB)  32,267,028 (32.3 MB)  0.500
    DPModelParallelStrategy  1     10,755,476 (10.8 MB)  21,511,552 (21.5 MB)  32,267,028 (32.3 MB)  0.500

The two parameter shards sum to exactly the whole model's 21,510,952 bytes; the optimizer state is the two Adam
moments of the local shard plus one 4-byte ``step`` per parameter tensor (kept whole on each rank, hence 21,511,552
rather than 21,510,952).

No GPU was available when this benchmark was written: the GPU command has not been run, and no GPU figure is given
(``cuda max allocated`` then also counts gradients, activations and the step's fp32 clipped sum of the whole model).

The LightningModule calls ``self(x)`` in ``training_step``: FSDP2 gathers the root unit's parameters (here the patch
embedding, final norm and head) in the root module's forward; calling ``self.net(x)`` instead would run on shards.
``--class-token`` builds timm's default ViT (raw ``cls_token`` / ``pos_embed`` parameters in the root unit); with
``DPModelParallelStrategy`` it currently fails in the engine's per-sample broadcast of those parameters (an
``aten.expand`` on the sharded DTensor), so the default model pools its tokens instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import torch
from torch import Tensor, nn

STRATEGIES = ("DPStrategy", "DPModelParallelStrategy")


def local_bytes(tensor: Tensor) -> int:
    """The bytes of ``tensor`` held by this rank: its local shard for a DTensor, the whole tensor otherwise."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def parameter_bytes(module: nn.Module) -> int:
    """The bytes of ``module``'s parameters held by this rank (a shared parameter counted once)."""
    return sum(local_bytes(p) for p in module.parameters())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes of ``optimizer``'s state tensors held by this rank (Adam: ``exp_avg``, ``exp_avg_sq``, ``step``)."""
    return sum(local_bytes(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor))


def build_vit(args: argparse.Namespace) -> nn.Module:
    """A timm ViT with random weights (no download); without its class token and position embedding (average
    pooling) unless ``args.class_token``."""
    import timm

    torch.manual_seed(0)
    tokens = {} if args.class_token else {"class_token": False, "pos_embed": "none", "global_pool": "avg"}
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=args.img_size,
        patch_size=args.patch_size,
        embed_dim=args.embed_dim,
        depth=args.depth,
        num_heads=args.heads,
        num_classes=10,
        **tokens,
    )


def worker(args: argparse.Namespace) -> None:
    """One rank of one strategy's fit (Lightning starts the other ranks by running this command again)."""
    import lightning as L
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dp import DPModelParallelStrategy, DPStrategy

    class ViTModule(L.LightningModule):
        def __init__(self, net: nn.Module, lr: float) -> None:
            super().__init__()
            self.net, self.lr = net, lr

        def configure_model(self) -> None:
            if not isinstance(self.trainer.strategy, DPModelParallelStrategy):
                return
            mesh = self.device_mesh["data_parallel"]
            for block in self.net.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)  # through forward: FSDP2 gathers the root unit there

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    class MemoryProbe(L.Callback):
        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            (optimizer,) = trainer.optimizers
            if not optimizer.state:
                raise RuntimeError("no optimizer state after the fit: no optimizer step ran, nothing to measure")
            record = {
                "strategy": args.worker,
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "accelerator": args.accelerator,
                "parameters": sum(p.numel() for p in pl_module.parameters()),  # global count, DTensor or not
                "param_bytes": parameter_bytes(pl_module),
                "optimizer_bytes": optimizer_state_bytes(optimizer),
                "global_step": trainer.global_step,
                "epsilon": trainer.strategy.epsilon,
            }
            record["total_bytes"] = record["param_bytes"] + record["optimizer_bytes"]
            if torch.cuda.is_available() and args.accelerator == "cuda":
                record["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated(pl_module.device)
            path = os.path.join(args.work_dir, f"{args.worker}-rank{trainer.global_rank}.json")
            with open(path, "w") as f:
                json.dump(record, f)

    L.seed_everything(0, verbose=False)
    cls = DPModelParallelStrategy if args.worker == "DPModelParallelStrategy" else DPStrategy
    strategy = cls(noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True, noise_seed=1, sampling_seed=2)
    g = torch.Generator().manual_seed(0)
    n = args.batch_size * args.steps
    data = TensorDataset(
        torch.randn(n, 3, args.img_size, args.img_size, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[MemoryProbe()],
        default_root_dir=args.work_dir,
    )
    trainer.fit(ViTModule(build_vit(args), lr=1e-3), DataLoader(data, batch_size=args.batch_size // args.devices))


def launch(strategy: str, args: argparse.Namespace, work_dir: str) -> list[dict[str, Any]]:
    """Run ``strategy``'s fit in fresh processes and return each rank's record, by rank."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [sys.executable, os.path.abspath(__file__), "--worker", strategy, "--work-dir", work_dir]
    command += _model_args(args)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{strategy} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    records = []
    for rank in range(args.devices):
        with open(os.path.join(work_dir, f"{strategy}-rank{rank}.json")) as f:
            records.append(json.load(f))
    return records


def _model_args(args: argparse.Namespace) -> list[str]:
    names = ("accelerator", "devices", "embed_dim", "depth", "heads", "img_size", "patch_size", "batch_size", "steps")
    flags = ["--class-token"] if args.class_token else []
    return [item for name in names for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))] + flags


def with_ratios(records: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Flat rows, each with its total over the same rank's ``DPStrategy`` total."""
    rows = []
    for strategy in STRATEGIES:
        for record, reference in zip(records[strategy], records["DPStrategy"]):
            rows.append({**record, "ratio_to_ddp": record["total_bytes"] / reference["total_bytes"]})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (MB = 10^6 bytes beside the bytes)."""
    cuda = any("cuda_max_memory_allocated" in row for row in rows)
    header = ["strategy", "rank", "param bytes", "optimizer bytes", "total bytes", "sharded/DDP"]
    header += ["cuda max allocated"] if cuda else []
    lines = [header]
    for row in rows:
        line = [row["strategy"], str(row["rank"])]
        line += [f"{row[key]:,} ({row[key] / 1e6:.1f} MB)" for key in ("param_bytes", "optimizer_bytes", "total_bytes")]
        line += [f"{row['ratio_to_ddp']:.3f}"]
        if cuda:
            line += [f"{row['cuda_max_memory_allocated'] / 1e6:.1f} MB"]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--embed-dim", type=int, default=192)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="expected (Poisson) batch over all ranks")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--class-token",
        action="store_true",
        help="timm's default class token and position embedding (raw parameters; see the module docstring)",
    )
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per strategy")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as work_dir:
        records = {strategy: launch(strategy, args, work_dir) for strategy in STRATEGIES}
    rows = with_ratios(records)
    print(table(rows))
    whole, shards = records["DPStrategy"][0]["param_bytes"], sum(r["param_bytes"] for r in records[STRATEGIES[1]])
    print(f"\n{rows[0]['parameters']:,} parameters; shards summed over ranks: {shards:,} bytes; whole: {whole:,}")
    if args.out:
        with open(args.out, "w") as f:
            config = {k: v for k, v in vars(args).items() if k not in ("worker", "work_dir", "out", "timeout")}
            json.dump({"config": config, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
