"""DP transfer learning of any timm model with LightningCLI: layer selection, LP-FT, sparse fine-tuning.

Everything — model, data, DPStrategy, fine-tuning method, logger — is set from YAML configs or the command line.

    # offline smoke run (synthetic data, CPU, one tiny epoch):
    python examples/vit_transfer.py fit --config examples/configs/tiny.yaml
    # ViT-B/16 (ImageNet-21k weights) on CIFAR-100, FiLM fine-tuning at ε = 1, 4 GPUs, W&B:
    python examples/vit_transfer.py fit --config examples/configs/vit_cifar100_film.yaml
    # any option from the command line:
    python examples/vit_transfer.py fit --config examples/configs/tiny.yaml \\
        --trainer.strategy.init_args.target_epsilon=2 --model.finetune=norm+head --data.batch_size=64

Real weights (``--model.pretrained=true``) and datasets (``--data.download=true``) need the internet; the defaults
are offline.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import timm
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_dp import DPStrategy  # noqa: F401  (importable as a class_path in configs)
from lightning_dp.finetune import LinearProbeThenFineTune, SparseFineTuning, select_parameters


class TransferModule(L.LightningModule):
    """A timm classifier fine-tuned with AdamW (DP-Adam under DPStrategy) or SGD.

    Args:
        model_name: any timm model name.
        pretrained: load timm's pretrained weights (needs the internet the first time).
        num_classes: classes of the target task (a new head).
        img_size: input resolution given to timm (ViTs adapt their position embedding).
        finetune: preset or regex of the parameters to train (see ``lightning_dp.finetune.select_parameters``);
            ignored when an LP-FT or sparse fine-tuning callback manages the trainable set.
        zero_init_head: start from a zero classifier (FiLM-style).
        lr: learning rate.
        weight_decay: AdamW weight decay.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        model_kwargs: further keyword arguments for ``timm.create_model`` (e.g. a smaller depth for tests).
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        pretrained: bool = False,
        num_classes: int = 10,
        img_size: int = 224,
        finetune: str = "all",
        zero_init_head: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        kwargs = dict(model_kwargs or {})
        if "vit" in model_name or "deit" in model_name:
            kwargs.setdefault("img_size", img_size)
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes)

    def setup(self, stage: str) -> None:
        managed = any(isinstance(cb, (LinearProbeThenFineTune, SparseFineTuning)) for cb in self.trainer.callbacks)
        if stage == "fit" and not managed:
            report = select_parameters(self.model, self.hparams.finetune, zero_init_head=self.hparams.zero_init_head)
            print(f"fine-tuning '{self.hparams.finetune}': {report}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.log("val/loss", nn.functional.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self):
        # All parameters: LP-FT and sparse fine-tuning unfreeze some during the run; frozen ones have no gradient.
        params = list(self.parameters())
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class _SyntheticImages(Dataset):
    """Offline stand-in: class-dependent colour blobs plus noise, so that accuracy above chance is learnable."""

    def __init__(self, n: int, num_classes: int, img_size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        means = torch.randn(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234))
        self.x = means[self.y] + 0.8 * torch.randn(n, 3, img_size, img_size, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class ImageDataModule(L.LightningDataModule):
    """CIFAR-10/100 (torchvision), an ImageFolder tree (``root/train``, ``root/test`` or ``root/val``) or synthetic.

    Args:
        dataset: ``"synthetic"`` (offline), ``"cifar10"``, ``"cifar100"`` or ``"imagefolder"``.
        data_dir: where torchvision datasets live, or the ImageFolder root (e.g. ``../shared/data/cifar10``).
        download: let torchvision download CIFAR (needs the internet).
        img_size: images are resized to this.
        batch_size: per device; under DPStrategy the expected logical batch (× devices × nodes).
        num_workers: dataloader workers.
        num_classes: for the synthetic dataset.
        synthetic_size: number of synthetic training examples.
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        data_dir: str = "data",
        download: bool = False,
        img_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 0,
        num_classes: int = 10,
        synthetic_size: int = 512,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _transform(self):
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(self.hparams.img_size, antialias=True),
                T.ToTensor(),
                T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            ]
        )

    def setup(self, stage: str) -> None:
        h = self.hparams
        if h.dataset == "synthetic":
            self.train_set = _SyntheticImages(h.synthetic_size, h.num_classes, h.img_size, seed=0)
            self.val_set = _SyntheticImages(max(64, h.synthetic_size // 4), h.num_classes, h.img_size, seed=1)
        elif h.dataset in ("cifar10", "cifar100"):
            from torchvision import datasets

            cls = datasets.CIFAR10 if h.dataset == "cifar10" else datasets.CIFAR100
            tf = self._transform()
            self.train_set = cls(h.data_dir, train=True, download=h.download, transform=tf)
            self.val_set = cls(h.data_dir, train=False, download=h.download, transform=tf)
        elif h.dataset == "imagefolder":
            from torchvision import datasets

            root = Path(h.data_dir)
            val_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
            if val_dir is None:
                raise FileNotFoundError(f"{root} needs train/ and val/ (or test/) subfolders.")
            self.train_set = datasets.ImageFolder(str(root / "train"), transform=self._transform())
            self.val_set = datasets.ImageFolder(str(val_dir), transform=self._transform())
        else:
            raise ValueError(f"Unknown dataset {h.dataset!r}.")

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True, num_workers=self.hparams.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def main() -> None:
    LightningCLI(TransferModule, ImageDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
