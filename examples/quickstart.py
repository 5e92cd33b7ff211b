"""Quickstart: private fine-tuning of a small timm ViT with DPStrategy, offline, in under two minutes on 2 CPU cores.

The data is scikit-learn's digits (8×8 images, shipped with the package). Classes 0–4 play the "public" data: a
small ViT is pretrained on them without privacy. Classes 5–9 play the "private" data: the pretrained ViT gets a
new head and is fine-tuned on them with DP-Adam (all parameters, cls_token and pos_embed included), and, for
comparison, without privacy. It prints both test accuracies and the ε spent.

    python examples/quickstart.py                 # ε = 4, δ = 1e-5
    python examples/quickstart.py --epsilon 1 --epochs 40
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import timm
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_dp import DPStrategy


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
        self.log("train_loss", loss)
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


def fit(model: nn.Module, train: TensorDataset, epochs: int, lr: float, batch_size: int, strategy=None):
    module = Classifier(model, lr)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        strategy=strategy or "auto",
    )
    trainer.fit(module, DataLoader(train, batch_size=batch_size, shuffle=True))
    return module, trainer


def test_accuracy(module: Classifier, test: TensorDataset) -> float:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return trainer.test(module, DataLoader(test, batch_size=256), verbose=False)[0]["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=4.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128, help="expected logical batch size")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    L.seed_everything(args.seed, verbose=False)

    public_train, _ = digits_split(range(0, 5))
    private_train, private_test = digits_split(range(5, 10))
    print(
        f"public (classes 0-4): {len(public_train)} examples; private (classes 5-9): {len(private_train)} train,"
        f" {len(private_test)} test"
    )

    pretrained = make_vit()
    fit(pretrained, public_train, epochs=15, lr=3e-3, batch_size=64)
    state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("head.")}

    def from_pretrained() -> nn.Module:
        model = make_vit()
        model.load_state_dict(state, strict=False)  # new, randomly initialised head for the private classes
        return model

    nonprivate, _ = fit(from_pretrained(), private_train, args.epochs, args.lr, args.batch_size)
    acc_nonprivate = test_accuracy(nonprivate, private_test)

    strategy = DPStrategy(
        target_epsilon=args.epsilon,
        target_delta=args.delta,
        max_grad_norm=args.max_grad_norm,
        max_physical_batch_size=64,
    )
    private, _ = fit(from_pretrained(), private_train, args.epochs, args.lr, args.batch_size, strategy=strategy)
    acc_private = test_accuracy(private, private_test)

    print()
    print(f"non-private fine-tune  test accuracy: {acc_nonprivate:.3f}")
    print(
        f"DP fine-tune           test accuracy: {acc_private:.3f}   (ε = {strategy.epsilon:.3f} ≤"
        f" {args.epsilon}, δ = {args.delta:g}, σ = {strategy.noise_multiplier:.3f},"
        f" q = {strategy.sample_rate:.4f}, steps = {strategy.ledger.steps})"
    )
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
