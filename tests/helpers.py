"""Small models, data and brute-force references shared by the tests."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_vit(**kw):
    import timm

    args = dict(
        img_size=16, patch_size=8, num_classes=3, embed_dim=24, depth=2, num_heads=2, reg_tokens=2, init_values=0.1
    )
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


class TextNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.ln(self.emb(x)).mean(1))


def mlp():
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))


def brute_force_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients by a loop over examples, one autograd call each."""
    params = [p for p in model.parameters() if p.requires_grad]
    per = {p: [] for p in params}
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            per[p].append(torch.zeros_like(p) if g is None else g)
    return {p: torch.stack(v) for p, v in per.items()}


class ClassifierModule(L.LightningModule):
    """A LightningModule around any classifier ``net``."""

    def __init__(self, net: nn.Module, lr: float = 0.1, optimizer: str = "sgd", scheduler: bool = False):
        super().__init__()
        self.net = net
        self.lr = lr
        self.optimizer_name = optimizer
        self.use_scheduler = scheduler

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt_cls = torch.optim.SGD if self.optimizer_name == "sgd" else torch.optim.Adam
        opt = opt_cls(params, lr=self.lr)
        if not self.use_scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def tensor_data(n=200, d=10, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g))


def loader(ds, batch_size):
    return DataLoader(ds, batch_size=batch_size, shuffle=True)


def trainer(strategy, **kw):
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        max_epochs=1,
    )
    args.update(kw)
    return L.Trainer(strategy=strategy, **args)
