"""Guards around every private step: invariants the strategy enforces whatever the user's code does.

- no gradient accumulation in any form (each accumulated batch would be a separate release in one update);
- the trainable set is watched: a parameter unfrozen mid-run must be clipped and noised like the others;
- just before the optimizer updates, every gradient it will apply must be one the strategy wrote.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_dp.errors import DPMisconfigurationError


def refuse_accumulation(trainer: pl.Trainer) -> None:
    """Raise if the trainer accumulates gradients (``GradientAccumulationScheduler`` changes it between epochs).

    Raises:
        DPMisconfigurationError: naming the setting and the alternative.
    """
    if trainer.accumulate_grad_batches != 1:
        raise DPMisconfigurationError(
            f"Gradient accumulation (accumulate_grad_batches={trainer.accumulate_grad_batches}, e.g. set by"
            " GradientAccumulationScheduler) would apply several releases in one update and miscount them. Use a"
            " larger dataloader batch_size and DPStrategy(max_physical_batch_size=...) instead."
        )


def trainable_set_changed(module: nn.Module, engine: Any, grad_masks: dict[nn.Parameter, Tensor]) -> bool:
    """Whether the trainable parameters (or the gradient masks) differ from those the engine clips."""
    if engine is None:
        return True
    current = [p for p in dict.fromkeys(module.parameters()) if p.requires_grad]
    masked = {p for p in grad_masks if p.requires_grad}
    return current != list(engine.params) or set(engine.grad_masks) != masked


def check_gradients_written(optimizer: Any, written: dict[nn.Parameter, Tensor], module: nn.Module) -> None:
    """Every gradient the optimizer is about to apply is a tensor the strategy wrote (modified in place at most).

    Raises:
        DPMisconfigurationError: naming the first parameter whose gradient came from elsewhere.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and written.get(p) is not p.grad:
                name = next((n for n, q in module.named_parameters() if q is p), "?")
                raise DPMisconfigurationError(
                    f"Parameter '{name}' has a gradient that DPStrategy did not write: it would be applied without"
                    " clipping and noise. A gradient was set or replaced after the private step (e.g. in"
                    " on_before_optimizer_step or optimizer_zero_grad), or the parameter became trainable outside"
                    " fit. Modify private gradients in place only."
                )


class OneTrainerOnly:
    """Mixin for a strategy that belongs to the first Trainer built with it.

    A Lightning strategy holds its Trainer's accelerator, precision and devices; a second Trainer built with the same
    object would silently keep the first one's (or fail with a confusing message). Lightning's accelerator
    connector reads ``_accelerator`` once, when a Trainer is built: after a Trainer has bound the strategy, that read
    raises a clear error instead.
    """

    _trainer_bound = False

    @property
    def _accelerator(self) -> Any:
        if self._trainer_bound:
            raise DPMisconfigurationError(
                "This DPStrategy object already belongs to another Trainer. A strategy holds its Trainer's devices,"
                " precision and privacy run; create a new DPStrategy(...) for each Trainer. To continue a private run"
                " in a new Trainer, pass ckpt_path=... to fit (the ledger and journal continue from the checkpoint)."
            )
        return self.__dict__.get("_user_accelerator")

    @_accelerator.setter
    def _accelerator(self, value: Any) -> None:
        self.__dict__["_user_accelerator"] = value

    @property
    def accelerator(self) -> Any:
        """The accelerator of the Trainer this strategy belongs to."""
        return self.__dict__.get("_bound_accelerator", self.__dict__.get("_user_accelerator"))

    @accelerator.setter
    def accelerator(self, accelerator: Any) -> None:
        self.__dict__["_bound_accelerator"] = accelerator
        self._trainer_bound = True


__all__ = ["OneTrainerOnly", "check_gradients_written", "refuse_accumulation", "trainable_set_changed"]
