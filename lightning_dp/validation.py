"""Checks that a model, trainer and optimizer can be trained privately, run before any training step."""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import GradientAccumulationScheduler
from torch import nn
from torch.optim import LBFGS, Optimizer

from lightning_dp.errors import DPMisconfigurationError

SUPPORTED_PRECISIONS = ("32-true", "bf16-mixed", "64-true")


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
                " per-sample gradients (and the DP guarantee) are not defined. Replace it, e.g. with"
                " `model = opacus.validators.ModuleValidator.fix(model)` (BatchNorm → GroupNorm)."
            )
        if isinstance(mod, nn.modules.instancenorm._InstanceNorm) and mod.track_running_stats:
            raise DPMisconfigurationError(
                f"Layer '{name}' is an {type(mod).__name__} with track_running_stats=True: its running statistics"
                " mix examples. Set track_running_stats=False or use `opacus.validators.ModuleValidator.fix(model)`."
            )
        if getattr(mod, "grad_checkpointing", False) is True or getattr(mod, "gradient_checkpointing", False) is True:
            raise DPMisconfigurationError(
                f"Gradient checkpointing is enabled on '{name or type(mod).__name__}': recomputing activations in"
                " backward breaks per-sample gradient hooks. Disable it (timm: `model.set_grad_checkpointing(False)`;"
                " Hugging Face: `model.gradient_checkpointing_disable()`)."
            )


def validate_trainer(trainer: Any, precision: str) -> None:
    """Reject trainer settings that conflict with DP-SGD.

    Raises:
        DPMisconfigurationError: naming the setting and what to use instead.
    """
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
