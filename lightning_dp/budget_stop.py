"""Stopping a Lightning run cleanly before a step would push ε past a maximum.

:class:`BudgetStop` holds a :class:`~lightning_dp.budget.BudgetGuard` and does what a budget does with a trainer:
stop before the step that would exceed it (``trainer.should_stop``), save a checkpoint, say why, and refuse the step
if the trainer goes on anyway. It is shared by ``DPStrategy(target_epsilon=...)`` (which holds one directly) and the
user-facing :class:`~lightning_dp.callbacks.PrivacyBudget` callback (which wraps one). It reads the run through
:class:`BudgetView` (the strategy's ledger, planned events, last step and δ), so it imports neither of them.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Protocol

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_dp.budget import BudgetGuard
from lightning_dp.console import notice
from lightning_dp.errors import DPMisconfigurationError, PrivacyTargetError

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_dp.accounting import MechanismSegment, PrivacyLedger


class BudgetView(Protocol):
    """What a budget reads of the run (``DPStrategy`` provides it)."""

    @property
    def ledger(self) -> PrivacyLedger:
        """The run's ledger."""

    @property
    def delta(self) -> float:
        """δ of the run."""

    @property
    def last_release_step(self) -> int:
        """0-based index of the last step taken (-1 before the first)."""

    def planned_segments(self, start: int, count: int) -> list[MechanismSegment]:
        """The ledger events of steps ``start .. start + count - 1`` as planned."""


class BudgetStop:
    """Stop a run before the step that would push ε past ``max_epsilon`` at δ (``delta``, default: the run's).

    Args:
        max_epsilon: the largest ε the run may reach.
        delta: δ at which ε is measured (None: the run's δ).
        save_checkpoint: save a checkpoint when stopping (not when no step was taken in this fit).
        dirpath: the checkpoint directory (default: the ``ModelCheckpoint`` callback's, else
            ``<default_root_dir>/checkpoints``).
        filename: the checkpoint file name, with an optional ``{step}`` field.
        lookahead: how many steps one ε evaluation clears at once.
        name: who stops, in messages.
    """

    def __init__(
        self,
        max_epsilon: float,
        delta: float | None = None,
        save_checkpoint: bool = True,
        dirpath: str | os.PathLike | None = None,
        filename: str = "privacy-budget-step={step}.ckpt",
        lookahead: int = 64,
        name: str = "PrivacyBudget",
    ) -> None:
        if not (max_epsilon > 0 and math.isfinite(max_epsilon)):
            raise DPMisconfigurationError(f"max_epsilon must be a positive finite number, got {max_epsilon}.")
        if delta is not None and not (0 < delta < 1):
            raise DPMisconfigurationError(f"delta must be in (0, 1), got {delta}.")
        if lookahead < 1:
            raise DPMisconfigurationError(f"lookahead must be ≥ 1, got {lookahead}.")
        self.max_epsilon = float(max_epsilon)
        self.delta = delta
        self.save_checkpoint = save_checkpoint
        self.dirpath = dirpath
        self.filename = filename
        self.lookahead = lookahead
        self.name = name
        #: The number of steps taken when the budget stopped the run (None while it has not).
        self.stopped_at_step: int | None = None
        #: The checkpoint written when stopping.
        self.checkpoint_path: str | None = None
        self.guard: BudgetGuard | None = None
        self._certificate: list[MechanismSegment] | None = None

    @property
    def evaluations(self) -> int:
        """How many ε evaluations the budget check made."""
        return self.guard.evaluations if self.guard is not None else 0

    def setup(self, run: BudgetView) -> None:
        """Build the guard at the run's δ (kept across fits while δ is the same: its cache stays valid)."""
        delta = self._delta(run)
        if self.guard is None or self.guard.delta != delta:
            self.guard = BudgetGuard(self.max_epsilon, delta, self.lookahead)
            if self._certificate is not None:
                self.guard.certify(self._certificate)

    def certify(self, events: list[MechanismSegment]) -> None:
        """Declare the planned events that a calibration proved within budget (checked without evaluation)."""
        self._certificate = list(events)
        if self.guard is not None:
            self.guard.certify(self._certificate)

    def consume(self, event: MechanismSegment | None) -> None:
        """Take an executed step's event out of the certificate."""
        if self.guard is not None:
            self.guard.consume(event)

    def allowed(self, run: BudgetView, step: int) -> bool:
        """Whether taking step ``step`` (the next one) keeps ε within the budget (also beyond the planned steps)."""
        if self.guard is None:
            self.setup(run)
        assert self.guard is not None
        return self.guard.allowed(run.ledger, step, run.planned_segments)

    def at_train_start(self, trainer: pl.Trainer, run: BudgetView) -> None:
        """Stop (without a checkpoint) when the next step already exceeds the budget (after a resume or a fit)."""
        nxt = run.last_release_step + 1
        if not self.allowed(run, nxt):
            self._stop(trainer, run, nxt, save=False)

    def enforce(self, trainer: pl.Trainer, run: BudgetView) -> None:
        """Refuse the step about to run if it exceeds the budget (the trainer ignored ``should_stop``).

        Raises:
            PrivacyTargetError: naming the step, the budget and why the trainer went on.
        """
        nxt = run.last_release_step + 1
        if not self.allowed(run, nxt):
            raise PrivacyTargetError(
                f"{self.name}: step {nxt} would push ε past max_epsilon={self.max_epsilon} at"
                f" δ={self._delta(run):g}, but the trainer kept training after `should_stop` was set"
                " (min_epochs or min_steps not met?). Lower min_epochs/min_steps or raise the budget."
            )

    def at_batch_end(self, trainer: pl.Trainer, run: BudgetView) -> None:
        """Stop before the next step if it would exceed the budget (unless the trainer stops here anyway)."""
        nxt = run.last_release_step + 1
        if _stops_anyway(trainer):
            return
        if not self.allowed(run, nxt):
            self._stop(trainer, run, nxt, save=self.save_checkpoint)

    def _delta(self, run: BudgetView) -> float:
        return self.delta if self.delta is not None else run.delta

    def _stop(self, trainer: pl.Trainer, run: BudgetView, step: int, save: bool) -> None:
        if self.stopped_at_step == step and trainer.should_stop:
            return
        trainer.should_stop = True
        self.stopped_at_step = step
        over = self.guard.exceed_epsilon if self.guard is not None else None
        to = f"to {over:.4g}, " if over is not None else ""
        reason = (
            f"{self.name}: stopping after {step} steps: step {step} would raise ε at δ={self._delta(run):g} {to}past"
            f" max_epsilon={self.max_epsilon}"
        )
        if save and step > 0:
            self.checkpoint_path = os.path.join(self._dirpath(trainer), self.filename.format(step=step))
            trainer.save_checkpoint(self.checkpoint_path)
            reason += f"; checkpoint saved to {self.checkpoint_path}"
        notice(reason + ".")

    def _dirpath(self, trainer: pl.Trainer) -> str:
        if self.dirpath is not None:
            return os.fspath(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return os.fspath(ckpt.dirpath)
        return os.path.join(trainer.default_root_dir, "checkpoints")


class BudgetHooks(Callback):
    """Gives a strategy's :class:`BudgetStop` the ``on_train_batch_end`` hook (a Lightning strategy has none).

    Args:
        stop: the budget.
        run: the run it reads (the strategy).
    """

    def __init__(self, stop: BudgetStop, run: BudgetView) -> None:
        self.stop = stop
        self.run = run

    def attach(self, trainer: pl.Trainer) -> None:
        """Join ``trainer``'s callbacks (last) for this fit."""
        if self not in trainer.callbacks:
            trainer.callbacks.append(self)

    def detach(self, trainer: pl.Trainer) -> None:
        """Leave ``trainer``'s callbacks at the end of the fit."""
        if self in trainer.callbacks:
            trainer.callbacks.remove(self)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop at once if the next step already exceeds the budget."""
        self.stop.at_train_start(trainer, self.run)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop before the next step if it would exceed the budget."""
        self.stop.at_batch_end(trainer, self.run)


def _stops_anyway(trainer: pl.Trainer) -> bool:
    """Whether the trainer ends the fit after the current batch by its own limits (``max_steps``, ``max_epochs``)."""
    if 0 <= trainer.max_steps <= trainer.global_step:
        return True
    epoch_loop = trainer.fit_loop.epoch_loop
    last_batch = epoch_loop.batch_progress.is_last_batch or (
        epoch_loop.batch_progress.current.ready >= trainer.num_training_batches
    )
    return bool(last_batch and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1)


__all__ = ["BudgetHooks", "BudgetStop", "BudgetView"]
