"""``PrivacyBudget``: stop training before a step would push ε past a maximum."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_dp.budget_stop import BudgetStop
from lightning_dp.callbacks._utils import require_dp_strategy

if TYPE_CHECKING:
    from lightning_dp.accounting import MechanismSegment
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
    target with the same :class:`lightning_dp.budget_stop.BudgetStop` that this callback wraps.

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
        self._stop = BudgetStop(max_epsilon, delta, save_checkpoint, dirpath, filename, lookahead)

    @property
    def max_epsilon(self) -> float:
        """The largest ε the run may reach."""
        return self._stop.max_epsilon

    @property
    def delta(self) -> float | None:
        """δ at which ε is measured (None: the strategy's δ)."""
        return self._stop.delta

    @property
    def save_checkpoint(self) -> bool:
        """Whether a checkpoint is saved when stopping."""
        return self._stop.save_checkpoint

    @property
    def dirpath(self) -> str | os.PathLike | None:
        """The checkpoint directory."""
        return self._stop.dirpath

    @property
    def filename(self) -> str:
        """The checkpoint file name."""
        return self._stop.filename

    @property
    def lookahead(self) -> int:
        """How many steps one ε evaluation clears at once."""
        return self._stop.lookahead

    @property
    def stopped_at_step(self) -> int | None:
        """The number of steps taken when the budget stopped the run (None while it has not)."""
        return self._stop.stopped_at_step

    @property
    def checkpoint_path(self) -> str | None:
        """The checkpoint written when stopping."""
        return self._stop.checkpoint_path

    @property
    def evaluations(self) -> int:
        """How many ε evaluations the budget check made."""
        return self._stop.evaluations

    def certify(self, events: list[MechanismSegment]) -> None:
        """Declare the planned events that a calibration proved within budget (checked without evaluation)."""
        self._stop.certify(events)

    def consume(self, event: MechanismSegment | None) -> None:
        """Take an executed step's event out of the certificate."""
        self._stop.consume(event)

    def enforce(self, trainer: pl.Trainer, strategy: DPStrategy) -> None:
        """Refuse the step about to run if it exceeds the budget (the trainer ignored ``should_stop``).

        Raises:
            PrivacyTargetError: naming the step, the budget and why the trainer went on.
        """
        self._stop.enforce(trainer, strategy)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that the trainer uses ``DPStrategy`` and set up the budget check."""
        if stage != "fit":
            return
        self._stop.setup(require_dp_strategy(trainer, self))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to start when the first step (after a resume or an earlier fit: the next one) would exceed the
        budget. The ledger persists across fits, so the budget holds across them.
        """
        self._stop.at_train_start(trainer, require_dp_strategy(trainer, self))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Refuse a step that exceeds the budget when the trainer did not honour ``should_stop``."""
        self.enforce(trainer, require_dp_strategy(trainer, self))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop before the next step if it would exceed the budget (unless the trainer stops here anyway)."""
        self._stop.at_batch_end(trainer, require_dp_strategy(trainer, self))
