"""``PrivacySummary``: the run's final privacy figures in the loggers' hyperparameters and run summary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_dp.callbacks._utils import require_dp_strategy

if TYPE_CHECKING:
    from lightning_dp.strategy import DPStrategy


def privacy_summary(strategy: DPStrategy, delta: float | None = None) -> dict[str, Any]:
    """The privacy figures of a run so far, as flat ``dp/...`` keys of plain numbers.

    Keys: ``dp/final_epsilon``, ``dp/delta``, ``dp/noise_multiplier`` (σ of the gradient; of the last phase when
    the budget was split, then also ``dp/noise_phases``), ``dp/sample_rate``, ``dp/max_grad_norm``, ``dp/steps``
    (private optimizer steps taken, resumed runs included), ``dp/planned_steps`` and ``dp/target_epsilon`` when known,
    and ``dp/epsilon_by_mechanism/<name>`` for each mechanism of the ledger on its own (these do not add up:
    composition is sub-additive).

    Args:
        strategy: the ``DPStrategy`` of the run.
        delta: δ to report ε at (default: the strategy's δ).
    """
    delta = strategy.delta if delta is None else delta
    ledger = strategy.ledger
    out: dict[str, Any] = {
        "dp/final_epsilon": ledger.epsilon(delta),
        "dp/delta": delta,
        "dp/noise_multiplier": strategy.noise_multiplier,
        "dp/sample_rate": strategy.sample_rate,
        "dp/max_grad_norm": strategy.max_grad_norm,
        "dp/steps": strategy.last_release_step + 1,
    }
    if strategy.planned_steps is not None:
        out["dp/planned_steps"] = strategy.planned_steps
    if strategy.target_epsilon is not None:
        out["dp/target_epsilon"] = strategy.target_epsilon
    phases = getattr(strategy, "noise_phases", None)
    if phases:
        out["dp/noise_phases"] = ", ".join(f"σ={sigma:.5g} before step {end}" for end, sigma in phases)
    for name, eps in ledger.breakdown(delta).items():
        out[f"dp/epsilon_by_mechanism/{name}"] = eps
    return {k: v for k, v in out.items() if v is not None}


class PrivacySummary(Callback):
    """At the end of fit, write the final privacy figures to every logger.

    The figures of :func:`privacy_summary` (final ε at δ, σ, q, C, steps, per-mechanism ε) go to each logger's
    ``log_hyperparams`` (W&B config, TensorBoard hparams, CSV ``hparams.yaml``) and, for W&B, to the run summary
    (``experiment.summary``), where they show as columns of the runs table. They are also logged at rank zero with
    ``rank_zero_info`` and kept in :attr:`summary`.

    Args:
        delta: δ to report ε at (default: the strategy's δ).

    Raises:
        DPMisconfigurationError: at setup, when the trainer does not use ``DPStrategy``.

    Example:
        >>> summary = PrivacySummary()
        >>> trainer = L.Trainer(strategy=DPStrategy(noise_multiplier=1.0), callbacks=[summary])  # doctest: +SKIP
        >>> trainer.fit(model, dm)  # doctest: +SKIP
        >>> summary.summary["dp/final_epsilon"]  # doctest: +SKIP
    """

    def __init__(self, delta: float | None = None) -> None:
        self.delta = delta
        self.summary: dict[str, Any] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that the trainer uses ``DPStrategy``."""
        if stage == "fit":
            require_dp_strategy(trainer, self)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the summary (on rank zero: one PRV evaluation per mechanism) and hand it to the loggers."""
        if not trainer.is_global_zero:
            return
        strategy = require_dp_strategy(trainer, self)
        self.summary = privacy_summary(strategy, self.delta)
        for logger in trainer.loggers:
            logger.log_hyperparams(self.summary)
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(self.summary)
        rank_zero_info(
            "lightning_dp: "
            + ", ".join(
                f"{k.removeprefix('dp/')}={v:.6g}" if isinstance(v, (int, float)) else f"{k.removeprefix('dp/')}={v}"
                for k, v in self.summary.items()
            )
        )
