"""``PrivacyBudget``: stop training before a step would push ε past a maximum."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_dp.accounting import MechanismSegment
from lightning_dp.budget import BudgetGuard
from lightning_dp.callbacks._utils import require_dp_strategy
from lightning_dp.console import notice
from lightning_dp.errors import DPMisconfigurationError, PrivacyTargetError

if TYPE_CHECKING:
    from lightning_dp.strategy import DPStrategy


class PrivacyBudget(Callback):
    """Stop cleanly before the optimizer step that would push ε past ``max_epsilon``.

    Meant for runs given a ``noise_multiplier`` (ε then grows with every step and nothing else bounds it); it also
    works with ``target_epsilon`` (a ``max_epsilon`` below the target then stops early). After every step (and at
    the start of fit) it asks whether the *next* step, with that step's noise multiplier (including the releases
    other callbacks declare for it, e.g. a private :class:`GradNormHistogram`), keeps ε ≤ ``max_epsilon`` at
    ``delta``; if not it sets ``trainer.should_stop``, so the step never runs, saves a checkpoint and says why.
    Checking at the end of step k for step k+1 is equivalent to checking before step k+1: Lightning reads
    ``should_stop`` between steps (a callback's ``on_train_batch_start`` cannot skip a step).

    ε is monotone in the number of steps, so one ε evaluation ``lookahead`` steps ahead clears that many steps;
    near the limit a bisection finds the exact last step (about log2(``lookahead``) evaluations), and the answer is
    cached until then (:class:`lightning_dp.budget.BudgetGuard`). Steps beyond the planned ones are checked too, and
    the budget holds across fits and resumes (the ledger continues). ``DPStrategy(target_epsilon=...)`` enforces its
    target with one of these.

    The checkpoint is written with ``trainer.save_checkpoint`` to ``dirpath`` (default: the ``ModelCheckpoint``
    callback's directory, else ``<default_root_dir>/checkpoints``), named ``filename`` with ``{step}`` replaced by
    the number of steps taken; it holds the ledger, so a resumed run with the same budget stops at once.

    Args:
        max_epsilon: the largest ε the run may reach.
        delta: δ at which ε is measured (default: the strategy's δ).
        save_checkpoint: save a checkpoint when stopping (not when no step was taken in this fit).
        dirpath: the checkpoint directory.
        filename: the checkpoint file name, with an optional ``{step}`` field.
        lookahead: how many steps one ε evaluation clears at once.

    Raises:
        DPMisconfigurationError: for invalid arguments, or at setup when the trainer does not use ``DPStrategy``.
        PrivacyTargetError: if the trainer keeps training after the stop (``min_epochs``/``min_steps`` override
            ``should_stop``): the step that would exceed the budget is refused.

    Example:
        >>> from lightning_dp import DPStrategy
        >>> trainer = L.Trainer(  # doctest: +SKIP
        ...     max_epochs=100,
        ...     strategy=DPStrategy(noise_multiplier=1.0, target_delta=1e-5),
        ...     callbacks=[PrivacyBudget(max_epsilon=8.0)],
        ... )
    """

    def __init__(
        self,
        max_epsilon: float,
        delta: float | None = None,
        save_checkpoint: bool = True,
        dirpath: str | os.PathLike | None = None,
        filename: str = "privacy-budget-step={step}.ckpt",
        lookahead: int = 64,
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
        #: The number of steps taken when the budget stopped the run (None while it has not).
        self.stopped_at_step: int | None = None
        #: The checkpoint written when stopping.
        self.checkpoint_path: str | None = None
        self._guard: BudgetGuard | None = None
        self._certificate: list[MechanismSegment] | None = None

    @property
    def evaluations(self) -> int:
        """How many ε evaluations the budget check made."""
        return self._guard.evaluations if self._guard is not None else 0

    # ------------------------------------------------------------------ the strategy's use (target_epsilon)
    def certify(self, events: list[MechanismSegment]) -> None:
        """Declare the planned events that a calibration proved within budget (checked without evaluation)."""
        self._certificate = list(events)
        if self._guard is not None:
            self._guard.certify(self._certificate)

    def consume(self, event: MechanismSegment | None) -> None:
        """Take an executed step's event out of the certificate."""
        if self._guard is not None:
            self._guard.consume(event)

    def enforce(self, trainer: pl.Trainer, strategy: DPStrategy) -> None:
        """Refuse the step about to run if it exceeds the budget (the trainer ignored ``should_stop``).

        Raises:
            PrivacyTargetError: naming the step, the budget and why the trainer went on.
        """
        nxt = strategy.last_release_step + 1
        if not self._allowed(strategy, nxt):
            raise PrivacyTargetError(
                f"PrivacyBudget: step {nxt} would push ε past max_epsilon={self.max_epsilon} at"
                f" δ={self._delta(strategy):g}, but the trainer kept training after `should_stop` was set"
                " (min_epochs or min_steps not met?). Lower min_epochs/min_steps or raise the budget."
            )

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that the trainer uses ``DPStrategy`` and set up the budget check."""
        if stage != "fit":
            return
        strategy = require_dp_strategy(trainer, self)
        delta = self._delta(strategy)
        if self._guard is None or self._guard.delta != delta:
            self._guard = BudgetGuard(self.max_epsilon, delta, self.lookahead)
            if self._certificate is not None:
                self._guard.certify(self._certificate)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to start when the first step (after a resume or an earlier fit: the next one) would exceed the
        budget. The ledger persists across fits, so the budget holds across them.
        """
        strategy = require_dp_strategy(trainer, self)
        nxt = strategy.last_release_step + 1
        if not self._allowed(strategy, nxt):
            self._stop(trainer, strategy, nxt, save=False)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Refuse a step that exceeds the budget when the trainer did not honour ``should_stop``."""
        self.enforce(trainer, require_dp_strategy(trainer, self))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop before the next step if it would exceed the budget (unless the trainer stops here anyway)."""
        strategy = require_dp_strategy(trainer, self)
        nxt = strategy.last_release_step + 1
        if _stops_anyway(trainer):
            return
        if not self._allowed(strategy, nxt):
            self._stop(trainer, strategy, nxt, save=self.save_checkpoint)

    # ------------------------------------------------------------------ internals
    def _delta(self, strategy: DPStrategy) -> float:
        return self.delta if self.delta is not None else strategy.delta

    def _allowed(self, strategy: DPStrategy, step: int) -> bool:
        """Whether taking step ``step`` (the next one) keeps ε within the budget (also beyond the planned steps)."""
        if self._guard is None:  # a callback added after setup (the strategy's own, for target_epsilon)
            self._guard = BudgetGuard(self.max_epsilon, self._delta(strategy), self.lookahead)
            if self._certificate is not None:
                self._guard.certify(self._certificate)
        return self._guard.allowed(strategy.ledger, step, strategy.planned_segments)

    def _stop(self, trainer: pl.Trainer, strategy: DPStrategy, step: int, save: bool) -> None:
        if self.stopped_at_step == step and trainer.should_stop:
            return
        trainer.should_stop = True
        self.stopped_at_step = step
        delta = self._delta(strategy)
        over = self._guard.exceed_epsilon if self._guard is not None else None
        to = f"to {over:.4g}, " if over is not None else ""
        reason = (
            f"PrivacyBudget: stopping after {step} steps: step {step} would raise ε at δ={delta:g} {to}past"
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


def _stops_anyway(trainer: pl.Trainer) -> bool:
    """Whether the trainer ends the fit after the current batch by its own limits (``max_steps``, ``max_epochs``)."""
    if 0 <= trainer.max_steps <= trainer.global_step:
        return True
    epoch_loop = trainer.fit_loop.epoch_loop
    last_batch = epoch_loop.batch_progress.is_last_batch or (
        epoch_loop.batch_progress.current.ready >= trainer.num_training_batches
    )
    return bool(last_batch and trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1)
