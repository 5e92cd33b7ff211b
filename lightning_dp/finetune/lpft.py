"""Linear probing, then fine-tuning (LP-FT) under one privacy budget (Ke et al., arXiv:2402.18905)."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn

from lightning_dp.console import notice
from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.finetune.selection import Selection, select_parameters


def find_backbone(pl_module: nn.Module, attr: str | None = None) -> nn.Module:
    """The model whose parameters are selected: ``pl_module.<attr>``, else the first submodule with timm's
    ``get_classifier()`` (the LightningModule itself included).

    Raises:
        DPMisconfigurationError: if there is none.
    """
    if attr is not None:
        return getattr(pl_module, attr)
    for module in pl_module.modules():
        if callable(getattr(module, "get_classifier", None)):
            return module
    raise DPMisconfigurationError(
        f"{type(pl_module).__name__} holds no timm model (with get_classifier()); pass model_attr='...' naming the"
        " attribute that holds the model, and head_pattern=... if it is not a timm model."
    )


class LinearProbeThenFineTune(pl.Callback):
    """Train the classifier only for the first part of the run, then the ``finetune`` set, under one budget.

    The switch happens at step ``round(probe_fraction × planned steps)``. The budget is split either

    - ``split="steps"`` (as the authors' code does): one σ for the whole run, calibrated for all planned steps; or
    - ``split="epsilon"``: phase 1 is calibrated to spend ``epsilon_fraction × target_epsilon`` (default
      ``probe_fraction``), phase 2 gets its own σ so that the composition of both phases (PRV accountant) meets
      ``target_epsilon``.

    ``configure_optimizers`` must include every parameter of the fine-tuning set (frozen parameters have no gradient
    during linear probing and are skipped by the optimizer).

    Args:
        probe_fraction: share of the planned steps spent on linear probing.
        finetune: the preset or pattern(s) trained after the switch (see :func:`select_parameters`).
        split: ``"steps"`` or ``"epsilon"``.
        epsilon_fraction: with ``split="epsilon"``, the share of ε for linear probing.
        model_attr: attribute of the LightningModule holding the model (default: the timm model found in it).
        head_pattern: regex of the classifier's parameter names, for non-timm models.

    Example:
        >>> trainer = L.Trainer(max_epochs=10, strategy=DPStrategy(target_epsilon=2.0),  # doctest: +SKIP
        ...                     callbacks=[LinearProbeThenFineTune(0.3, split="epsilon", epsilon_fraction=0.5)])
    """

    def __init__(
        self,
        probe_fraction: float = 0.5,
        finetune: str | list[str] = "all",
        split: Literal["steps", "epsilon"] = "steps",
        epsilon_fraction: float | None = None,
        model_attr: str | None = None,
        head_pattern: str | None = None,
    ) -> None:
        if not 0 < probe_fraction < 1:
            raise DPMisconfigurationError(f"probe_fraction must be in (0, 1), got {probe_fraction}.")
        if split not in ("steps", "epsilon"):
            raise DPMisconfigurationError(f"split must be 'steps' or 'epsilon', got {split!r}.")
        if epsilon_fraction is not None and not 0 < epsilon_fraction < 1:
            raise DPMisconfigurationError(f"epsilon_fraction must be in (0, 1), got {epsilon_fraction}.")
        self.probe_fraction = probe_fraction
        self.finetune = finetune
        self.split = split
        self.epsilon_fraction = epsilon_fraction if epsilon_fraction is not None else probe_fraction
        self.model_attr = model_attr
        self.head_pattern = head_pattern
        self.switched = False
        self.switch_step: int | None = None
        self.probe_selection: Selection | None = None
        self.finetune_selection: Selection | None = None

    def _switch_at(self, planned: int | None) -> int:
        if planned is None or planned < 2:
            raise DPMisconfigurationError("LinearProbeThenFineTune needs a finite run of at least 2 planned steps.")
        return max(1, min(planned - 1, round(self.probe_fraction * planned)))

    def dp_budget_phases(self, strategy: Any, planned: int) -> list[tuple[int, float]]:
        """Budget phases for the strategy's σ calibration (only with ``split="epsilon"``)."""
        if self.split != "epsilon":
            return []
        return [(self._switch_at(planned), self.epsilon_fraction), (planned, 1.0)]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze everything but the classifier."""
        if not hasattr(trainer.strategy, "refresh_trainable"):
            raise DPMisconfigurationError("LinearProbeThenFineTune needs Trainer(strategy=DPStrategy(...)).")
        model = find_backbone(pl_module, self.model_attr)
        self.probe_selection = select_parameters(model, "head", head_pattern=self.head_pattern)
        trainer.strategy.refresh_trainable()
        notice(f"LP-FT: linear probing, {self.probe_selection}")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Switch to fine-tuning at the planned step."""
        if self.switched:
            return
        self.switch_step = self._switch_at(trainer.strategy.planned_steps)
        if trainer.global_step >= self.switch_step:
            model = find_backbone(pl_module, self.model_attr)
            self.finetune_selection = select_parameters(model, self.finetune, head_pattern=self.head_pattern)
            trainer.strategy.refresh_trainable()
            self.switched = True
            notice(f"LP-FT: fine-tuning from step {trainer.global_step}, {self.finetune_selection}")
