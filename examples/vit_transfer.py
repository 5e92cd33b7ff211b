"""DP transfer learning of any timm model with LightningCLI: local weights, class subsets, per-class metrics.

Everything — model, data, DPStrategy, fine-tuning method, logger — is set from YAML configs or the command line.
``num_classes`` and ``img_size`` are set once, on the data: the model's are linked to them.

    # offline smoke run (synthetic data, CPU, one tiny epoch):
    python examples/vit_transfer.py fit --config examples/configs/tiny.yaml
    # any option from the command line:
    python examples/vit_transfer.py fit --config examples/configs/tiny.yaml \\
        --trainer.strategy.init_args.target_epsilon=2 --model.finetune=norm+head --data.batch_size=64
    # LP-FT or SPARTA sparse fine-tuning: add a method config
    python examples/vit_transfer.py fit --config examples/configs/tiny.yaml --config examples/configs/lpft.yaml
    python examples/vit_transfer.py fit --config examples/configs/tiny.yaml --config examples/configs/sparse.yaml

Two-stage transfer on any ImageFolder tree (here CIFAR-10: classes 0-4 public, 5-9 private):

    # 1. non-private pretraining on the public classes; writes runs/cifar10_public/public.ckpt
    python examples/vit_transfer.py fit --config examples/configs/cifar10_public.yaml
    # 2. DP fine-tuning on the private classes from those weights (the head is re-initialised)
    python examples/vit_transfer.py fit --config examples/configs/cifar10_private.yaml \\
        --model.checkpoint=runs/cifar10_public/public.ckpt
    # 3. per-class test accuracy of the private model
    python examples/vit_transfer.py test --config examples/configs/cifar10_private.yaml \\
        --model.checkpoint=runs/cifar10_public/public.ckpt --ckpt_path=runs/cifar10_private/private.ckpt

ViT-B/16 (ImageNet-21k weights) on CIFAR-100, FiLM fine-tuning at ε = 1, 4 GPUs, W&B (needs the internet):

    python examples/vit_transfer.py fit --config examples/configs/vit_cifar100_film.yaml

What is logged: ``val/acc``, ``val/loss`` and ``val/acc_class_{y}`` every validation, the same under ``test/``;
``dp/*`` from DPStrategy. Training loss and accuracy are computed from private training batches without noise, so
they are outside the DP guarantee: they are off by default and, with ``--model.log_train_metrics=true``, logged as
``nonprivate/train_loss`` and ``nonprivate/train_acc``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.classification import MulticlassAccuracy
from transfer_help import parser_kwargs  # beside this file

from lightning_dp import DPStrategy  # also importable as a class_path in configs
from lightning_dp.callbacks import PrivacySummary
from lightning_dp.console import quiet_lightning
from lightning_dp.finetune import LinearProbeThenFineTune, SparseFineTuning, select_parameters

# ---------------------------------------------------------------------------------------------------- weights


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the model: the message names the mismatching keys."""


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The model tensors of a timm checkpoint (state dict, ``{"state_dict": ...}``, safetensors) or of a Lightning
    checkpoint of :class:`TransferModule` (keys ``model.*``)."""
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {str(path)!r}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # timm depends on safetensors

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with arbitrary objects: refuse rather than execute it
        raise CheckpointMismatchError(
            f"{str(path)!r} cannot be read with torch.load(weights_only=True): {err}. Save the weights with"
            " torch.save(model.state_dict(), path) or safetensors."
        ) from err
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict.")
    if "pytorch-lightning_version" in obj:  # a Lightning checkpoint: the TransferModule keeps the timm model in .model
        state = {k.removeprefix("model."): v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        if not state:
            raise CheckpointMismatchError(
                f"The Lightning checkpoint {str(path)!r} has no 'model.*' weights: it is not a checkpoint of this"
                " example's TransferModule."
            )
        return state
    for key in ("state_dict", "model"):  # timm's train.py and common wrappers
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    prefixes = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
    return {k.removeprefix(prefixes[0]).removeprefix(prefixes[1]): v for k, v in obj.items() if isinstance(v, Tensor)}


def load_checkpoint_weights(model: nn.Module, path: str | os.PathLike, reset_head: bool = True) -> str:
    """Load a local checkpoint into a timm ``model``, strictly: every tensor must match by name and shape.

    A ViT's absolute position embedding is resampled (timm's ``resample_abs_pos_embed``) when the checkpoint was
    trained at another resolution.

    Args:
        model: the timm model, already built for the new task.
        path: a timm checkpoint (a state dict, ``{"state_dict": ...}`` or ``{"model": ...}``, or ``.safetensors``)
            or a Lightning checkpoint of :class:`TransferModule`.
        reset_head: keep the model's freshly initialised classifier instead of the checkpoint's (the usual transfer
            recipe: the new task's classes are other classes, even when there are as many). ``False`` loads the
            checkpoint's classifier too, which must then have the same number of classes.

    Returns:
        A one-line report of what was loaded.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        CheckpointMismatchError: if keys are missing or unexpected, or shapes differ (the message names them).
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    head = {f"{n}." for n, m in model.named_modules() if m is model.get_classifier()}
    in_head = [k for k in own if k.startswith(tuple(head))] if head else []
    notes = []
    if reset_head:
        state = {k: v for k, v in state.items() if k not in in_head}
        notes.append(f"head re-initialised ({', '.join(in_head)})")
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape and hasattr(model, "patch_embed"):
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        state["pos_embed"] = resample_abs_pos_embed(pos, list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
        notes.append(f"pos_embed resampled {tuple(pos.shape)} -> {tuple(state['pos_embed'].shape)}")
    expected = [k for k in own if not (reset_head and k in in_head)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in expected
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def first(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

        problems = [
            f"missing in checkpoint: {first(missing)}" if missing else "",
            f"not in the model: {first(unexpected)}" if unexpected else "",
            f"shape mismatch: {first(shapes)}" if shapes else "",
        ]
        hint = (
            " The classifier differs: keep model.reset_head=true to re-initialise it for the new classes."
            if not reset_head and any(k in in_head for k in missing + [s.split(":")[0] for s in shapes])
            else " Build the same architecture as the checkpoint (model_name and model_kwargs)."
        )
        raise CheckpointMismatchError(
            f"{str(path)!r} does not fit {type(model).__name__}: " + "; ".join(p for p in problems if p) + "." + hint
        )
    model.load_state_dict(state, strict=False)  # strictness checked above; only the reset head is left out
    return f"loaded {len(state)} tensors from {str(path)!r}" + (f"; {'; '.join(notes)}" if notes else "")


# ---------------------------------------------------------------------------------------------------- model


class TransferModule(L.LightningModule):
    """A timm classifier fine-tuned with AdamW (DP-Adam under DPStrategy) or SGD, with per-class metrics.

    Args:
        model_name: any timm model name.
        pretrained: load timm's pretrained weights (needs the internet the first time).
        checkpoint: a local checkpoint to start from instead (see :func:`load_checkpoint_weights`): a timm state dict
            or safetensors file, or a Lightning checkpoint of this module (e.g. from public pretraining). It is read
            when the module is built, also by ``load_from_checkpoint`` (pass ``checkpoint=None`` there if the file
            is gone: the trained weights come from the loaded checkpoint anyway).
        reset_head: with ``checkpoint``, re-initialise the classifier for the new task (default) rather than load it.
        num_classes: classes of the target task (under the CLI: linked to ``data.num_classes``).
        img_size: input resolution given to timm (under the CLI: linked to ``data.img_size``).
        finetune: preset or regex of the parameters to train (see ``lightning_dp.finetune.select_parameters``);
            ignored when an LP-FT or sparse fine-tuning callback manages the trainable set.
        zero_init_head: start from a zero classifier (FiLM-style).
        lr: learning rate.
        weight_decay: AdamW weight decay.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        log_train_metrics: log ``nonprivate/train_loss`` and ``nonprivate/train_acc``. Under DPStrategy they are
            computed from private training batches without noise: outside the DP guarantee.
        model_kwargs: further keyword arguments for ``timm.create_model`` (e.g. a smaller depth for tests).
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        pretrained: bool = False,
        checkpoint: str | None = None,
        reset_head: bool = True,
        num_classes: int = 10,
        img_size: int = 224,
        finetune: str = "all",
        zero_init_head: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        log_train_metrics: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if pretrained and checkpoint:
            raise ValueError("Give either pretrained=true (timm's download) or checkpoint=PATH (local), not both.")
        kwargs = dict(model_kwargs or {})
        if "vit" in model_name or "deit" in model_name:
            kwargs.setdefault("img_size", img_size)
        self.model = timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
        if checkpoint:
            rank_zero_info(f"TransferModule: {load_checkpoint_weights(self.model, checkpoint, reset_head)}")
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{kind}": MulticlassAccuracy(num_classes=num_classes, average=average)
                for stage in ("val", "test")
                for kind, average in (("acc", "micro"), ("acc_class", "none"))
            }
        )

    def setup(self, stage: str) -> None:
        managed = any(isinstance(cb, (LinearProbeThenFineTune, SparseFineTuning)) for cb in self.trainer.callbacks)
        if stage == "fit" and not managed:
            report = select_parameters(self.model, self.hparams.finetune, zero_init_head=self.hparams.zero_init_head)
            rank_zero_info(f"fine-tuning '{self.hparams.finetune}': {report}")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        if self.hparams.log_train_metrics:  # from private training data, without noise: not covered by DP
            acc = (logits.argmax(-1) == y).float().mean()
            self.log("nonprivate/train_loss", loss, batch_size=len(y))
            self.log("nonprivate/train_acc", acc, batch_size=len(y))
        return loss

    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        logits = self(x)
        self.metrics[f"{stage}_acc"].update(logits, y)
        self.metrics[f"{stage}_acc_class"].update(logits, y)
        self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, y), batch_size=len(y))

    def _log_accuracy(self, stage: str) -> None:
        self.log(f"{stage}/acc", self.metrics[f"{stage}_acc"].compute(), prog_bar=stage == "val")
        per_class = self.metrics[f"{stage}_acc_class"].compute()
        for y, value in enumerate(per_class.tolist()):
            self.log(f"{stage}/acc_class_{y}", value)
        self.metrics[f"{stage}_acc"].reset()
        self.metrics[f"{stage}_acc_class"].reset()

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")

    def configure_optimizers(self):
        # All parameters: LP-FT and sparse fine-tuning unfreeze some during the run; frozen ones have no gradient.
        params = list(self.parameters())
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


# ---------------------------------------------------------------------------------------------------- data


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


def resolve_classes(available: Sequence[str], classes: Sequence[int | str] | None) -> list[str]:
    """The chosen class names, in the order that becomes their new labels 0..k-1.

    Args:
        available: all class names in their label order (ImageFolder: sorted folder names).
        classes: indices into ``available`` and/or names; ``None`` keeps all.

    Raises:
        ValueError: for an unknown name, an index out of range, a repeated class, or an empty list.
    """
    if classes is None:
        return list(available)
    chosen = []
    for c in classes:
        if isinstance(c, int) and not isinstance(c, bool):
            if not 0 <= c < len(available):
                raise ValueError(f"Class index {c} is out of range: the data has {len(available)} classes.")
            c = available[c]
        elif str(c) not in available:
            raise ValueError(f"Unknown class {c!r}; the classes are {list(available)}.")
        chosen.append(str(c))
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"data.classes must name distinct classes, got {list(classes)}.")
    return chosen


def _image_folder_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder directory not found: {str(root)!r}.")
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def select_classes(dataset: Any, chosen: Sequence[str]) -> Any:
    """Keep only the examples of the ``chosen`` classes of a torchvision ``ImageFolder`` or CIFAR dataset, in place,
    and relabel them 0..k-1 in the order of ``chosen``.

    Raises:
        ValueError: if a chosen class is not in the dataset.
    """
    missing = [c for c in chosen if c not in dataset.class_to_idx]
    if missing:
        raise ValueError(f"Classes {missing} are not in {getattr(dataset, 'root', 'the dataset')}.")
    relabel = {dataset.class_to_idx[c]: i for i, c in enumerate(chosen)}
    if hasattr(dataset, "samples"):  # ImageFolder: (path, label) pairs
        dataset.samples = [(p, relabel[t]) for p, t in dataset.samples if t in relabel]
        dataset.imgs = dataset.samples
        dataset.targets = [t for _, t in dataset.samples]
    else:  # CIFAR: an array of images and a list of labels
        keep = [i for i, t in enumerate(dataset.targets) if t in relabel]
        dataset.data = dataset.data[keep]
        dataset.targets = [relabel[dataset.targets[i]] for i in keep]
    dataset.classes = list(chosen)
    dataset.class_to_idx = {c: i for i, c in enumerate(chosen)}
    return dataset


_CIFAR_CLASSES = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


class ImageDataModule(L.LightningDataModule):
    """CIFAR-10/100 (torchvision), an ImageFolder tree (``root/train`` and ``root/test`` and/or ``root/val``) or
    synthetic images; optionally a subset of the classes, relabelled 0..k-1.

    Validation uses ``val/`` (else ``test/``), testing ``test/`` (else ``val/``): held-out data, not the private
    training set.

    Args:
        dataset: ``"synthetic"`` (offline), ``"cifar10"``, ``"cifar100"`` or ``"imagefolder"``.
        data_dir: where torchvision datasets live, or the ImageFolder root (e.g. ``../shared/data/cifar10``).
        download: let torchvision download CIFAR (needs the internet).
        img_size: images are resized to this (the model's ``img_size`` is linked to it).
        batch_size: per device; under DPStrategy the expected logical batch (× devices × nodes).
        eval_batch_size: batch size of validation and test.
        num_workers: dataloader workers.
        classes: a subset of the classes, by index (in the dataset's label order; ImageFolder: sorted folder names)
            or by name, e.g. ``[5, 6, 7, 8, 9]`` or ``[dog, frog]``; their labels become 0..k-1 in this order.
        num_classes: for the synthetic dataset (default 10). Other datasets derive it from the data (and the chosen
            ``classes``); the model's ``num_classes`` is linked to it.
        train_size: use a random subset (fixed seed ``subset_seed``) of this many training examples.
        subset_seed: seed of that subset.
        synthetic_size: number of synthetic training examples.
    """

    def __init__(
        self,
        dataset: str = "synthetic",
        data_dir: str = "data",
        download: bool = False,
        img_size: int = 224,
        batch_size: int = 256,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        classes: list[int | str] | None = None,
        num_classes: int | None = None,
        train_size: int | None = None,
        subset_seed: int = 0,
        synthetic_size: int = 512,
    ) -> None:
        super().__init__()
        if dataset not in ("synthetic", "cifar10", "cifar100", "imagefolder"):
            raise ValueError(f"Unknown dataset {dataset!r}: use synthetic, cifar10, cifar100 or imagefolder.")
        if dataset == "synthetic":
            if classes is not None:
                raise ValueError("data.classes selects classes of real data; the synthetic dataset has none.")
            self.class_names = [str(i) for i in range(num_classes or 10)]
        else:
            if dataset == "imagefolder":
                available = _image_folder_classes(Path(data_dir) / "train")
            else:
                available = _CIFAR_CLASSES.get(dataset) or [str(i) for i in range(100)]
            if dataset == "cifar100" and classes is not None and any(isinstance(c, str) for c in classes):
                raise ValueError("For cifar100, give data.classes as indices 0..99.")
            self.class_names = resolve_classes(available, classes)
            if num_classes is not None and num_classes != len(self.class_names):
                raise ValueError(
                    f"data.num_classes={num_classes}, but the data has {len(self.class_names)} (selected) classes;"
                    " leave num_classes unset for real data."
                )
        #: the number of classes, linked to the model's ``num_classes`` by the CLI
        self.num_classes = len(self.class_names)
        # The model logs the derived num_classes; the argument here may be None (derived), so it is left out.
        self.save_hyperparameters(ignore=["num_classes"])

    def _transform(self):
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(self.hparams.img_size, antialias=True),  # the shorter side
                T.CenterCrop(self.hparams.img_size),  # square: images of any aspect ratio batch together
                T.ToTensor(),
                T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            ]
        )

    def _image_folder(self, split: str) -> Any:
        from torchvision import datasets

        dataset = datasets.ImageFolder(str(Path(self.hparams.data_dir) / split), transform=self._transform())
        return select_classes(dataset, self.class_names)

    def _cifar(self, train: bool) -> Any:
        from torchvision import datasets

        h = self.hparams
        cls = datasets.CIFAR10 if h.dataset == "cifar10" else datasets.CIFAR100
        dataset = cls(h.data_dir, train=train, download=h.download, transform=self._transform())
        if h.classes is None:
            return dataset
        if h.dataset == "cifar100":  # indices: map them to the dataset's own names
            self.class_names = [dataset.classes[int(c)] for c in h.classes]
        return select_classes(dataset, self.class_names)

    def setup(self, stage: str) -> None:
        h = self.hparams
        if h.dataset == "synthetic":
            self.train_set = _SyntheticImages(h.synthetic_size, self.num_classes, h.img_size, seed=0)
            self.val_set = _SyntheticImages(max(64, h.synthetic_size // 4), self.num_classes, h.img_size, seed=1)
            self.test_set = self.val_set
        elif h.dataset in ("cifar10", "cifar100"):
            self.train_set = self._cifar(train=True)
            self.val_set = self.test_set = self._cifar(train=False)
        else:
            root = Path(h.data_dir)
            held_out = [d for d in ("val", "test") if (root / d).is_dir()]
            if not held_out:
                raise FileNotFoundError(f"{str(root)!r} needs train/ and val/ and/or test/ subfolders.")
            self.train_set = self._image_folder("train")
            self.val_set = self._image_folder(held_out[0])
            self.test_set = self._image_folder(held_out[-1]) if held_out[-1] != held_out[0] else self.val_set
        if h.train_size is not None and h.train_size < len(self.train_set):
            g = torch.Generator().manual_seed(h.subset_seed)
            keep = torch.randperm(len(self.train_set), generator=g)[: h.train_size].tolist()
            self.train_set = Subset(self.train_set, keep)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, shuffle=True, num_workers=self.hparams.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.eval_batch_size, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.hparams.eval_batch_size, num_workers=self.hparams.num_workers)


# ---------------------------------------------------------------------------------------------------- CLI


class TransferCLI(LightningCLI):
    """LightningCLI with ``num_classes`` and ``img_size`` set once, on the data, and linked to the model; a private
    run (``DPStrategy``) ends with the ``PrivacySummary`` table unless the config already adds one. The optimizer is
    the module's (``model.optimizer``, ``model.lr``), so the CLI adds no ``--optimizer`` / ``--lr_scheduler``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.img_size", "model.img_size")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def before_fit(self) -> None:
        trainer = self.trainer
        private = isinstance(trainer.strategy, DPStrategy)
        if private and not any(isinstance(cb, PrivacySummary) for cb in trainer.callbacks):
            trainer.callbacks.append(PrivacySummary())


def main(args: list[str] | None = None) -> TransferCLI:
    """Run the CLI (``args``: instead of ``sys.argv``, e.g. from tests). The progress bar shows ``dp/epsilon``;
    Lightning's banners and tips are hidden (:func:`lightning_dp.console.quiet_lightning`), lightning_dp's notes stay.
    """
    with quiet_lightning():  # the CLI runs its subcommand while it is built; the filters go when it returns
        return TransferCLI(
            TransferModule,
            ImageDataModule,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=parser_kwargs(),
            args=args,
        )


if __name__ == "__main__":
    main()
