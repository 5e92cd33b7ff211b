"""Checks that a model, trainer and optimizer can be trained privately, run before any training step."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.callbacks import GradientAccumulationScheduler, Timer
from torch import Tensor, nn
from torch.optim import LBFGS, Optimizer
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from lightning_dp.console import notice
from lightning_dp.errors import DPMisconfigurationError

SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "64-true")

#: The number of epochs Lightning plans when a ``Trainer`` is given neither ``max_epochs`` nor ``max_steps``.
LIGHTNING_DEFAULT_MAX_EPOCHS = 1000


def validate_value(name: str, value: float) -> None:
    """Require a positive finite number (ε, σ, C, ...).

    Raises:
        DPMisconfigurationError: for zero, negative, NaN or infinite values, naming the argument.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise DPMisconfigurationError(f"{name} must be a positive finite number, got {value!r}.")


def validate_module(module: nn.Module) -> None:
    """Reject layers that mix examples in the forward pass and gradient checkpointing.

    Raises:
        DPMisconfigurationError: naming the first offending layer and the fix.
    """
    for name, mod in module.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            raise DPMisconfigurationError(
                f"Layer '{name}' is a {type(mod).__name__}: batch normalisation mixes the examples of a batch, so"
                " per-sample gradients (and the DP guarantee) are not defined. Replace it:"
                " `lightning_dp.fix_model(model)` swaps every BatchNorm variant (timm's BatchNormAct2d included, with"
                " its activation) for a GroupNorm."
            )
        if isinstance(mod, nn.modules.instancenorm._InstanceNorm) and mod.track_running_stats:
            raise DPMisconfigurationError(
                f"Layer '{name}' is an {type(mod).__name__} with track_running_stats=True: its running statistics"
                " mix examples. Set track_running_stats=False or call `lightning_dp.fix_model(model)`."
            )
        if getattr(mod, "grad_checkpointing", False) is True or getattr(mod, "gradient_checkpointing", False) is True:
            raise DPMisconfigurationError(
                f"Gradient checkpointing is enabled on '{name or type(mod).__name__}': recomputing activations in"
                " backward breaks per-sample gradient hooks. Disable it (timm: `model.set_grad_checkpointing(False)`;"
                " Hugging Face: `model.gradient_checkpointing_disable()`)."
            )


def uses_default_training_length(trainer: Any) -> bool:
    """Whether the length of training is Lightning's default: neither ``max_epochs`` nor ``max_steps`` given.

    Lightning then sets ``max_epochs=1000`` when the fit starts (an explicit ``max_epochs=1000`` without
    ``max_steps`` looks the same). With a ``Timer`` callback it sets ``max_epochs=-1`` instead: that is not the default.
    """
    return (
        trainer.max_epochs == LIGHTNING_DEFAULT_MAX_EPOCHS
        and trainer.max_steps == -1
        and not any(isinstance(cb, Timer) for cb in trainer.callbacks)
    )


def validate_training_length(trainer: Any, calibrating: bool) -> None:
    """Refuse to calibrate σ for Lightning's default length of training; say so when the noise is fixed.

    Args:
        trainer: the ``Trainer`` about to fit.
        calibrating: σ is calibrated for a target ε over the planned steps (``DPStrategy(target_epsilon=...)``).

    Raises:
        DPMisconfigurationError: with ``calibrating`` and neither ``max_epochs`` nor ``max_steps`` given.
    """
    if not uses_default_training_length(trainer):
        return
    default = (
        f"Neither max_epochs nor max_steps is set on the Trainer, so Lightning plans {LIGHTNING_DEFAULT_MAX_EPOCHS}"
        " epochs"
    )
    if calibrating:
        raise DPMisconfigurationError(
            f"{default}, and DPStrategy(target_epsilon=...) would calibrate σ to spend the budget over all of them: far"
            " more noise per step than the run you have in mind needs. Set the length of training:"
            " `Trainer(max_epochs=...)` or `Trainer(max_steps=...)` (to train 1000 epochs on purpose, give the"
            " equivalent max_steps)."
        )
    notice(
        f"lightning_dp: {default}; with a fixed noise_multiplier, ε grows with every step"
        " (`strategy.epsilon`). Set `Trainer(max_epochs=...)` or `Trainer(max_steps=...)` to plan the run."
    )


def validate_trainer(trainer: Any, precision: str, calibrating: bool = False) -> None:
    """Reject trainer settings that conflict with DP-SGD.

    Args:
        trainer: the ``Trainer`` about to fit.
        precision: its precision plugin's precision.
        calibrating: σ is calibrated for a target ε (see :func:`validate_training_length`).

    Raises:
        DPMisconfigurationError: naming the setting and what to use instead.
    """
    validate_training_length(trainer, calibrating)
    if precision not in SUPPORTED_PRECISIONS:
        hint = (
            " `16-mixed` scales the loss with a GradScaler that unscales `p.grad` but not per-sample gradients, so"
            " clipping would act on scaled norms."
            if precision == "16-mixed"
            else ""
        )
        raise DPMisconfigurationError(
            f"precision={precision!r} is not supported by DPStrategy.{hint} Use precision='bf16-mixed' (fast, no"
            f" scaler) or '32-true'. Supported: {', '.join(SUPPORTED_PRECISIONS)}."
        )
    if trainer.accumulate_grad_batches != 1:
        raise DPMisconfigurationError(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} conflicts with DP-SGD (each accumulated batch"
            " would be a separate Poisson sample). Set the dataloader's batch_size to the logical batch size you"
            " want and DPStrategy(max_physical_batch_size=...) to what fits in memory."
        )
    if any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks):
        raise DPMisconfigurationError(
            "GradientAccumulationScheduler accumulates gradients over several batches, i.e. several private releases"
            " per update, which the ledger would miscount. Remove it: set the dataloader's batch_size to the logical"
            " batch size you want and DPStrategy(max_physical_batch_size=...) to what fits in memory."
        )
    if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
        raise DPMisconfigurationError(
            f"gradient_clip_val={trainer.gradient_clip_val} clips the already-private gradient and does not bound"
            " per-example sensitivity. Remove it and set DPStrategy(max_grad_norm=...) for per-sample clipping."
        )
    module = trainer.lightning_module
    if module is not None and not module.automatic_optimization:
        raise DPMisconfigurationError(
            "DPStrategy needs automatic optimization (the strategy clips, noises and steps for you). Remove"
            " `self.automatic_optimization = False` and return the loss from training_step."
        )


def validate_optimizers(optimizers: list[Optimizer]) -> None:
    """Reject optimizers that re-evaluate the closure (each evaluation would be a separate private release).

    Raises:
        DPMisconfigurationError: for LBFGS-like optimizers.
    """
    for opt in optimizers:
        inner = getattr(opt, "optimizer", opt)
        if isinstance(inner, LBFGS):
            raise DPMisconfigurationError(
                "LBFGS evaluates the loss closure several times per step; each evaluation would release a new"
                " noisy gradient. Use a first-order optimizer (SGD, Adam, AdamW)."
            )


def several_optimizers_error() -> DPMisconfigurationError:
    """The error for ``configure_optimizers`` returning several optimizers (what DP needs instead)."""
    return DPMisconfigurationError(
        "configure_optimizers returned several optimizers. DPStrategy privatises one gradient per step for one"
        " optimizer under automatic optimization (Lightning's hint to set automatic_optimization=False does"
        " not apply: manual optimization cannot be made private here). Put all parameters in one optimizer"
        " with parameter groups, e.g. torch.optim.AdamW([{'params': backbone, 'lr': 1e-4}, {'params': head,"
        " 'lr': 1e-3}])."
    )


def validate_options(
    max_grad_norm: float,
    max_physical_batch_size: int | None,
    loss_reduction: str,
    clipping: str,
    nonfinite: str,
    resume_policy: str,
    epsilon_refresh_steps: int | None,
    probe_budget: float = 0.02,
) -> None:
    """Check ``DPStrategy``'s non-privacy options (ε, δ and σ are checked by :class:`lightning_dp.plan.PrivacyPlan`).

    Raises:
        DPMisconfigurationError: naming the argument and what it accepts.
    """
    from lightning_dp.clipping import CLIPPING_MODES

    validate_value("max_grad_norm", max_grad_norm)
    choices = {
        "loss_reduction": (loss_reduction, ("mean", "sum")),
        "clipping": (clipping, CLIPPING_MODES),
        "nonfinite": (nonfinite, ("skip", "error")),
        "resume_policy": (resume_policy, ("strict", "account_forks", "trust_checkpoint")),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise DPMisconfigurationError(f"{name} must be one of {allowed}, got {value!r}.")
    for name, count in (
        ("max_physical_batch_size", max_physical_batch_size),
        ("epsilon_refresh_steps", epsilon_refresh_steps),
    ):
        if count is not None and count < 1:
            raise DPMisconfigurationError(f"{name} must be ≥ 1, got {count}.")
    if not 0 <= probe_budget <= 1:
        raise DPMisconfigurationError(f"probe_budget is a share of run time in [0, 1], got {probe_budget}.")


def validate_training_loader(dataloader: object) -> tuple[Any, int]:
    """The training set and per-rank batch size of a DataLoader that DPStrategy can sample for.

    Raises:
        DPMisconfigurationError: for anything but a map-style DataLoader with a batch size and a plain sampler.
    """
    if not isinstance(dataloader, DataLoader):
        raise DPMisconfigurationError(
            f"DPStrategy needs a torch DataLoader for training, got {type(dataloader).__name__}: Poisson sampling"
            " draws indices into a map-style dataset."
        )
    dataset = dataloader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise DPMisconfigurationError(
            "The training dataset is an iterable dataset without a length: Poisson sampling needs a map-style"
            " dataset with __len__ and __getitem__ (e.g. a TensorDataset or an ImageFolder)."
        )
    if dataloader.batch_size is None:
        raise DPMisconfigurationError(
            "The training DataLoader has no batch_size (a custom batch_sampler?). Set batch_size to the expected"
            " logical batch size and let DPStrategy sample the batches."
        )
    sampler = dataloader.sampler
    if isinstance(sampler, DistributedSamplerWrapper):  # Lightning wrapped a custom sampler for DDP
        sampler = sampler.dataset._sampler
    if not isinstance(sampler, (RandomSampler, SequentialSampler, DistributedSampler)):
        raise DPMisconfigurationError(
            f"The training DataLoader uses a {type(sampler).__name__}; DPStrategy replaces the sampler with"
            " Poisson sampling, which would silently drop its behaviour. Remove the custom sampler."
        )
    return dataset, int(dataloader.batch_size)


def loss_of(output: Any) -> Tensor:
    """The loss a ``training_step`` returned.

    Raises:
        DPMisconfigurationError: if there is none (skipping a batch would make the step depend on private data) or it
            does not require grad.
    """
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor):
        raise DPMisconfigurationError(
            "training_step must return the loss (a tensor, or a dict with 'loss') for every batch under DPStrategy:"
            " skipping a batch by returning None would make the step depend on private data."
        )
    if not loss.requires_grad:
        raise DPMisconfigurationError("The loss returned by training_step does not require grad.")
    return loss
