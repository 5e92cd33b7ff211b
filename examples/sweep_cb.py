"""The (C, B) sweep: accuracy over clipping bound C and batch size B, each point calibrated to the same ε.

Under a fixed epoch budget E, a batch size B means T = E·N/B steps and, for the target (ε, δ), a calibrated σ.
Rehn et al. (arXiv:2510.20616) explain the winner by the cumulative DP noise σ·√T rather than the per-step
effective noise σ·C/B. This script runs the grid, writes one CSV row per point (accuracy, σ, q, T, ε spent,
effective and cumulative noise) and a PNG with, per ε, heatmaps of accuracy, effective noise and cumulative noise
over (C, B). Optionally it writes a W&B sweep config for the same grid.

    python examples/sweep_cb.py --tiny                      # offline, digits, CPU, a few minutes
    python examples/sweep_cb.py --data ../shared/data/cifar10 --model vit_tiny_patch16_224 --pretrained \\
        --clip 0.1 0.5 1 2 5 --batch 256 512 1024 2048 --epsilon 1 4 --epochs 8 --accelerator gpu
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import time
from pathlib import Path

import lightning as L
import matplotlib
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import DPStrategy
from lightning_dp.console import quiet_lightning

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


def load_data(args):
    """(train, test, num_classes, model factory). ``--tiny``: scikit-learn digits, a small ViT pretrained on 0–4."""
    if args.data == "digits":
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.as_tensor(y)

        def vit() -> nn.Module:
            return timm.create_model(
                "vit_tiny_patch16_224",
                pretrained=False,
                img_size=8,
                patch_size=2,
                in_chans=1,
                num_classes=5,
                embed_dim=32,
                depth=2,
                num_heads=2,
                mlp_ratio=2.0,
            )

        public = y < 5
        pre = vit()
        pre_trainer = L.Trainer(
            max_epochs=5,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        pre_trainer.fit(Classifier(pre, 3e-3), DataLoader(TensorDataset(x[public], y[public]), 64, shuffle=True))
        state = {k: v for k, v in pre.state_dict().items() if not k.startswith("head.")}

        def factory() -> nn.Module:
            m = vit()
            m.load_state_dict(state, strict=False)
            return m

        xp, yp = x[~public], y[~public] - 5
        perm = torch.randperm(len(yp), generator=torch.Generator().manual_seed(0))
        n_test = len(yp) // 5
        test, train = perm[:n_test], perm[n_test:]
        return TensorDataset(xp[train], yp[train]), TensorDataset(xp[test], yp[test]), factory
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(args.img_size, antialias=True), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    root = Path(args.data)
    train = datasets.ImageFolder(str(root / "train"), transform=tf)
    test = datasets.ImageFolder(str(root / "test"), transform=tf)
    if args.subset:
        g = torch.Generator().manual_seed(0)
        train = torch.utils.data.Subset(train, torch.randperm(len(train), generator=g)[: args.subset].tolist())
    n_classes = len(datasets.ImageFolder(str(root / "test")).classes)

    def factory() -> nn.Module:
        return timm.create_model(args.model, pretrained=args.pretrained, num_classes=n_classes, img_size=args.img_size)

    return train, test, factory


@torch.no_grad()
def accuracy(model: nn.Module, data, device: torch.device) -> float:
    model.eval().to(device)
    correct = total = 0
    for x, y in DataLoader(data, batch_size=256):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / total


def run_point(args, train, test, factory, clip: float, batch: int, eps: float, epochs: int) -> dict:
    L.seed_everything(args.seed, verbose=False)
    model = factory()
    strategy = DPStrategy(
        target_epsilon=eps, target_delta=args.delta, max_grad_norm=clip, max_physical_batch_size=args.physical_batch
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        strategy=strategy,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Learning rate scaled with √B (the DP-Adam rule of thumb of Rehn et al.), from --lr at B = 256.
    lr = args.lr * math.sqrt(batch / 256)
    start = time.time()
    trainer.fit(Classifier(model, lr), DataLoader(train, batch_size=batch, shuffle=True, num_workers=args.workers))
    sigma, steps = strategy.noise_multiplier, strategy.ledger.steps
    return {
        "epsilon_target": eps, "epochs": epochs, "clip": clip, "batch": batch, "lr": lr,
        "accuracy": accuracy(model, test, trainer.strategy.root_device), "epsilon_spent": strategy.epsilon,
        "noise_multiplier": sigma, "sample_rate": strategy.sample_rate, "steps": steps,
        "effective_noise": sigma * clip / batch, "cumulative_noise": sigma * math.sqrt(steps),
        "seconds": time.time() - start,
    }  # fmt: skip


def heatmaps(rows: list[dict], clips: list[float], batches: list[int], path: Path) -> None:
    """Per (ε, epochs): accuracy, effective noise σC/B and cumulative noise σ√T over (C, B)."""
    groups = sorted({(r["epsilon_target"], r["epochs"]) for r in rows})
    metrics = [("accuracy", "viridis"), ("effective_noise", "magma_r"), ("cumulative_noise", "magma_r")]
    fig, axes = plt.subplots(len(groups), 3, figsize=(4.2 * 3, 3.4 * len(groups)), squeeze=False)
    for gi, (eps, epochs) in enumerate(groups):
        for mi, (metric, cmap) in enumerate(metrics):
            grid = torch.full((len(clips), len(batches)), float("nan"))
            for r in rows:
                if (r["epsilon_target"], r["epochs"]) == (eps, epochs):
                    grid[clips.index(r["clip"]), batches.index(r["batch"])] = r[metric]
            ax = axes[gi][mi]
            im = ax.imshow(grid.numpy(), cmap=cmap, aspect="auto", origin="lower")
            for (i, j), v in zip(itertools.product(range(len(clips)), range(len(batches))), grid.flatten().tolist()):
                ax.text(
                    j,
                    i,
                    f"{v:.3g}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0},
                )
            ax.set_xticks(range(len(batches)), [str(b) for b in batches])
            ax.set_yticks(range(len(clips)), [f"{c:g}" for c in clips])
            ax.set_xlabel("batch size B")
            ax.set_ylabel("clipping bound C")
            ax.set_title(f"{metric}  (ε={eps:g}, {epochs} epochs)")
            fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wandb_sweep_config(args) -> str:
    import yaml

    cfg = {
        "program": "examples/sweep_cb.py",
        "method": "grid",
        "metric": {"name": "accuracy", "goal": "maximize"},
        "parameters": {
            "clip": {"values": args.clip},
            "batch": {"values": args.batch},
            "epsilon": {"values": args.epsilon},
            "epochs": {"values": args.epochs},
        },
    }
    return yaml.safe_dump(cfg, sort_keys=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="offline digits grid that finishes on CPU in minutes")
    p.add_argument("--data", default="digits", help="'digits' or an ImageFolder root with train/ and test/")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs the internet)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--subset", type=int, default=0, help="use only this many training images")
    p.add_argument("--clip", type=float, nargs="+", help="default 0.1 0.5 1 2 5 (--tiny: 0.5 2)")
    p.add_argument("--batch", type=int, nargs="+", help="default 64 128 256 512 (--tiny: 32 128)")
    p.add_argument("--epsilon", type=float, nargs="+", help="default 1 4 (--tiny: 4)")
    p.add_argument("--epochs", type=int, nargs="+", help="the fixed epoch budget(s); default 8 (--tiny: 6)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--physical-batch", type=int, default=128)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/sweep_cb")
    p.add_argument("--wandb-sweep", action="store_true", help="also write a W&B sweep config (sweep.yaml)")
    args = p.parse_args()
    defaults = (
        {"clip": [0.5, 2.0], "batch": [32, 128], "epsilon": [4.0], "epochs": [6]}
        if args.tiny
        else {"clip": [0.1, 0.5, 1.0, 2.0, 5.0], "batch": [64, 128, 256, 512], "epsilon": [1.0, 4.0], "epochs": [8]}
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tiny:
        args.data = "digits"
    quiet_lightning(dataloader_workers_hint=args.data != "digits")  # one line per grid point, no framework banners
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test, factory = load_data(args)
    rows = []
    for eps, epochs, clip, batch in itertools.product(args.epsilon, args.epochs, args.clip, args.batch):
        if batch > len(train):
            continue
        row = run_point(args, train, test, factory, clip, batch, eps, epochs)
        rows.append(row)
        print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    heatmaps(rows, sorted(set(args.clip)), sorted(set(args.batch)), out / "heatmap.png")
    if args.wandb_sweep:
        (out / "sweep.yaml").write_text(wandb_sweep_config(args))
    print(f"wrote {out / 'results.csv'} and {out / 'heatmap.png'}")


if __name__ == "__main__":
    main()
