"""Quickstart: private fine-tuning of a small timm ViT with DPStrategy, offline, in about two minutes on 2 CPU cores.

The data is scikit-learn's digits (8×8 images, shipped with the package). Classes 0–4 play the "public" data: a
small ViT is pretrained on them without privacy. Classes 5–9 play the "private" data: the pretrained ViT gets a
new head and is fine-tuned on them with DP-Adam (all parameters, cls_token and pos_embed included), and, for
comparison, without privacy. It shows a progress bar with ε as it trains, prints the test accuracies and ends with
the privacy summary (ε, δ, σ, q, C, steps, throughput).

    python examples/quickstart.py                              # ε = 4, δ = 1e-5, 30 epochs
    python examples/quickstart.py --epsilon 1 --epochs 40      # a tighter budget
    python examples/quickstart.py --epochs 3 --pretrain-epochs 2  # a quick smoke run (seconds)
    python examples/quickstart.py --write-readme README.md docs/examples.md   # run, then copy its output there

It uses one CPU thread unless OMP_NUM_THREADS or --threads says otherwise: the model is so small that more threads
only add synchronisation, and on a busy machine they can make it many times slower.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from pathlib import Path

import lightning as L
import timm
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_dp import DPStrategy
from lightning_dp.callbacks import PrivacySummary
from lightning_dp.console import quiet_lightning


def digits_split(classes: range, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    x, y = load_digits(return_X_y=True)
    keep = torch.isin(torch.as_tensor(y), torch.tensor(list(classes)))
    x = torch.as_tensor(x, dtype=torch.float32)[keep].reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(y)[keep] - classes.start
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float, num_classes: int = 5) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.acc = MulticlassAccuracy(num_classes=num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)  # mean of per-sample losses
        self.log("loss", loss, prog_bar=True)  # computed from private data without noise: not private (see docs)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.acc.update(self.model(x), y)
        self.log("test_acc", self.acc, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


def make_vit() -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=2,
        in_chans=1,
        num_classes=5,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
    )


class EpochBar(TQDMProgressBar):
    """Lightning's progress bar, labelled with the phase and counting epochs as "3/30"."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def on_train_epoch_start(self, trainer, *args):
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"{self.label} {trainer.current_epoch + 1}/{trainer.max_epochs}")


def fit(
    module: Classifier, train: TensorDataset, epochs: int, batch_size: int, label: str, strategy=None, summary=None
):
    start = time.perf_counter()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[EpochBar(label)] + ([summary] if summary is not None else []),
        strategy=strategy or "auto",
    )
    trainer.fit(module, DataLoader(train, batch_size=batch_size, shuffle=True))
    return module, time.perf_counter() - start


def test_accuracy(module: Classifier, test: TensorDataset) -> float:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return trainer.test(module, DataLoader(test, batch_size=256), verbose=False)[0]["test_acc"]


#: The pages' copy of a default run's output lies between these two lines (``--write-readme`` rewrites it).
README_START = "<!-- quickstart-output: python examples/quickstart.py --write-readme README.md docs/examples.md -->"
README_END = "<!-- /quickstart-output -->"


def dp_header(args: argparse.Namespace) -> str:
    return (
        f"[3/3] fine-tuning on the private digits with DPStrategy(target_epsilon={args.epsilon:g},"
        f" target_delta={args.delta:g}, max_grad_norm={args.max_grad_norm:g}) ({args.epochs} epochs)"
    )


def make_strategy(args: argparse.Namespace) -> DPStrategy:
    return DPStrategy(
        target_epsilon=args.epsilon,
        target_delta=args.delta,
        max_grad_norm=args.max_grad_norm,
        max_physical_batch_size=64,
    )


class PlanLine(logging.Handler):
    """Keeps lightning_dp's plan line ("lightning_dp: N=..., σ=..."), printed when a private fit starts."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.line: str | None = None
        self.logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("lightning_dp: N="):
            self.line = message

    def __enter__(self) -> PlanLine:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)


def write_readme(path: Path, lines: list[str]) -> None:
    """Replace a page's copy of the quickstart's output (between README_START and README_END) by ``lines``."""
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(rf"({re.escape(README_START)}\n```text\n).*?(\n```\n{re.escape(README_END)})", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no quickstart output block ({README_START} ... {README_END}) to replace.")
    path.write_text(pattern.sub(lambda m: m.group(1) + "\n".join(lines) + m.group(2), text), encoding="utf-8")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=4.0, help="target ε of the private fine-tuning")
    parser.add_argument("--delta", type=float, default=1e-5, help="δ")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clipping bound C")
    parser.add_argument("--batch-size", type=int, default=128, help="expected logical batch size B")
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs (both fine-tunings)")
    parser.add_argument("--pretrain-epochs", type=int, default=15, help="non-private pretraining epochs")
    parser.add_argument("--lr", type=float, default=1e-2, help="fine-tuning learning rate (AdamW)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation (DP noise is always fresh)")
    parser.add_argument("--threads", type=int, help="torch threads (default: OMP_NUM_THREADS if set, else 1)")
    parser.add_argument(
        "--write-readme", type=Path, nargs="+", help="put this run's output (without progress bars) in these pages"
    )
    return parser


class Transcript:
    """Prints lines and keeps them: the output of a run without its progress bars, for ``--write-readme``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        print(text)
        self.lines.extend(text.splitlines())

    def keep(self, text: str) -> None:
        """Record a line that something else printed (lightning_dp's notes, the summary table)."""
        self.lines.extend(text.splitlines())


def main() -> None:
    args = parser().parse_args()
    start = time.time()
    quiet_lightning(dataloader_workers_hint=False)  # hide Lightning's banners and tips; lightning_dp's notes stay
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    L.seed_everything(args.seed, verbose=False)
    out = Transcript()

    public_train, public_test = digits_split(range(0, 5))
    private_train, private_test = digits_split(range(5, 10))
    out.say(
        f"data: public digits 0-4 {len(public_train)} train / {len(public_test)} test; private digits 5-9"
        f" {len(private_train)} train / {len(private_test)} test. {threads} CPU thread(s)."
    )

    out.say(f"\n[1/3] pretraining a small ViT on the public digits, without privacy ({args.pretrain_epochs} epochs)")
    pretrained, seconds = fit(Classifier(make_vit(), lr=3e-3), public_train, args.pretrain_epochs, 64, "pretrain")
    out.say(f"      public test accuracy: {test_accuracy(pretrained, public_test):.3f}  (trained in {seconds:.0f} s)")
    state = {k: v for k, v in pretrained.model.state_dict().items() if not k.startswith("head.")}

    def from_pretrained() -> Classifier:
        model = make_vit()
        model.load_state_dict(state, strict=False)  # new, randomly initialised head for the private classes
        return Classifier(model, args.lr)

    out.say(f"\n[2/3] fine-tuning on the private digits without privacy, the baseline ({args.epochs} epochs)")
    nonprivate, seconds = fit(from_pretrained(), private_train, args.epochs, args.batch_size, "fine-tune")
    acc_nonprivate = test_accuracy(nonprivate, private_test)
    out.say(f"      private test accuracy: {acc_nonprivate:.3f}  (trained in {seconds:.0f} s)")

    out.say(f"\n{dp_header(args)}")
    summary = PrivacySummary()
    with PlanLine() as plan:
        private, seconds = fit(
            from_pretrained(), private_train, args.epochs, args.batch_size, "DP fine-tune", make_strategy(args), summary
        )
    out.keep(plan.line or "")
    out.keep(summary.table)
    acc_private = test_accuracy(private, private_test)
    out.say(
        f"      private test accuracy: {acc_private:.3f}  (trained in {seconds:.0f} s;"
        f" without privacy: {acc_nonprivate:.3f})"
    )
    out.say(f"\ndone in {time.time() - start:.0f} s")
    for path in args.write_readme or []:
        write_readme(path, out.lines)
        print(f"wrote this output (without its progress bars) into {path}")


if __name__ == "__main__":
    main()
