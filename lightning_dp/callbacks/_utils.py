"""Helpers shared by the callbacks: finding the ``DPStrategy`` and summing statistics over ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_dp.errors import DPMisconfigurationError

if TYPE_CHECKING:
    from lightning_dp.strategy import DPStrategy


def require_dp_strategy(trainer: pl.Trainer, owner: object) -> DPStrategy:
    """The trainer's ``DPStrategy``.

    Raises:
        DPMisconfigurationError: if the trainer does not train with ``DPStrategy``.
    """
    from lightning_dp.strategy import DPStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, DPStrategy):
        raise DPMisconfigurationError(
            f"{type(owner).__name__} needs `Trainer(strategy=DPStrategy(...))`, got {type(strategy).__name__}: it reads"
            " the per-sample gradient norms and the privacy ledger of lightning_dp's strategy."
        )
    return strategy


def sum_over_ranks(strategy: DPStrategy, tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over all ranks (a collective: every rank must call it at the same step).

    An example lives on one rank only, so a count summed over ranks keeps the sensitivity of a one-rank count; noise
    is then added once, to the global sum.
    """
    if strategy.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor
