"""``PrivacyBudget``: stop training before a step would push ε past a maximum."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_dp.accounting import MechanismSegment
from lightning_dp.callbacks._utils import require_dp_strategy
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

    ε is monotone in the number of steps, so one PRV evaluation ``lookahead`` steps ahead clears that many steps;
    near the limit a bisection finds the exact last step (about log2(``lookahead``) evaluations), and the answer is
    cached until then.

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
        self.evaluations = 0
        self._reset()

    def _reset(self) -> None:
        self._safe_before = 0  # steps with index < this keep ε within budget
        self._exceeds_at: int | None = None  # the first step index that would exceed it
        # (ledger, next step, last recorded epoch) at the last evaluation
        self._base: tuple[list[MechanismSegment], int, int] | None = None
        self._last_values: dict[int, float] = {}
        self._exceed_epsilon: float | None = None  # ε after the step at ``_exceeds_at``

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that the trainer uses ``DPStrategy``."""
        if stage == "fit":
            require_dp_strategy(trainer, self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse to start when the first step (after a resume: the next one) would already exceed the budget."""
        self._reset()
        strategy = require_dp_strategy(trainer, self)
        nxt = strategy.last_release_step + 1
        if self._has_step(strategy, nxt) and not self._allowed(strategy, nxt):
            self._stop(trainer, strategy, nxt, save=False)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Refuse a step that exceeds the budget when the trainer did not honour ``should_stop``."""
        strategy = require_dp_strategy(trainer, self)
        nxt = strategy.last_release_step + 1
        if self._exceeds_at is not None and nxt >= self._exceeds_at:
            raise PrivacyTargetError(
                f"PrivacyBudget: step {nxt} would push ε past max_epsilon={self.max_epsilon} at"
                f" δ={self._delta(strategy):g}, but the trainer kept training after `should_stop` was set"
                " (min_epochs or min_steps not met?)."
                " Lower min_epochs/min_steps or raise max_epsilon."
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop before the next step if it would exceed the budget."""
        strategy = require_dp_strategy(trainer, self)
        nxt = strategy.last_release_step + 1
        if self._has_step(strategy, nxt) and not self._allowed(strategy, nxt):
            self._stop(trainer, strategy, nxt, save=self.save_checkpoint)

    # ------------------------------------------------------------------ internals
    def _delta(self, strategy: DPStrategy) -> float:
        return self.delta if self.delta is not None else strategy.delta

    @staticmethod
    def _has_step(strategy: DPStrategy, step: int) -> bool:
        planned = strategy.planned_steps
        return planned is None or step < planned

    def _segments(
        self, strategy: DPStrategy, start: int, count: int, recorded: int | None = None
    ) -> list[MechanismSegment]:
        """The ledger segments steps ``start .. start + count - 1`` will record (as the strategy records them).

        ``recorded``: in shuffle mode, the last epoch already in the ledger (default: the strategy's current one).
        """
        return strategy.planned_segments(start, count, recorded)

    def _epsilon_after(self, strategy: DPStrategy, start: int, count: int) -> float:
        self.evaluations += 1
        return strategy.ledger.epsilon(self._delta(strategy), extra=self._segments(strategy, start, count))

    def _allowed(self, strategy: DPStrategy, step: int) -> bool:
        """Whether taking step ``step`` (the next one) keeps ε within the budget; cached between evaluations."""
        if self._base is not None:
            base, start, recorded = self._base
            expected = _totals(base + self._segments(strategy, start, step - start, recorded))
            if _totals(strategy.ledger.segments) != expected:  # something else recorded releases: re-evaluate
                self._safe_before, self._exceeds_at = 0, None
        if self._exceeds_at is not None and step >= self._exceeds_at:
            return False
        if step < self._safe_before:
            return True
        self._base = (strategy.ledger.segments, step, strategy.last_recorded_epoch)
        ahead = self.lookahead
        if strategy.planned_steps is not None:
            ahead = max(1, min(ahead, strategy.planned_steps - step))
        self._last_values = {ahead: self._epsilon_after(strategy, step, ahead)}
        if self._last_values[ahead] <= self.max_epsilon:
            self._safe_before = step + ahead
            return True
        # ε(after `ok` more steps) ≤ max < ε(after `bad` more steps): bisect for the last step within budget.
        ok, bad = 0, ahead
        while bad - ok > 1:
            mid = (ok + bad) // 2
            self._last_values[mid] = self._epsilon_after(strategy, step, mid)
            if self._last_values[mid] <= self.max_epsilon:
                ok = mid
            else:
                bad = mid
        self._safe_before = self._exceeds_at = step + ok
        self._exceed_epsilon = self._last_values[bad]
        return ok > 0

    def _stop(self, trainer: pl.Trainer, strategy: DPStrategy, step: int, save: bool) -> None:
        trainer.should_stop = True
        self.stopped_at_step = step
        delta = self._delta(strategy)
        over = self._exceed_epsilon
        to = f"to {over:.4g}, " if over is not None else ""
        reason = (
            f"PrivacyBudget: stopping after {step} steps: step {step} would raise ε at δ={delta:g} {to}past"
            f" max_epsilon={self.max_epsilon}"
        )
        if save and step > 0:
            self.checkpoint_path = os.path.join(self._dirpath(trainer), self.filename.format(step=step))
            trainer.save_checkpoint(self.checkpoint_path)
            reason += f"; checkpoint saved to {self.checkpoint_path}"
        rank_zero_info(reason + ".")

    def _dirpath(self, trainer: pl.Trainer) -> str:
        if self.dirpath is not None:
            return os.fspath(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return os.fspath(ckpt.dirpath)
        return os.path.join(trainer.default_root_dir, "checkpoints")


def _totals(segments: list[MechanismSegment]) -> dict[tuple[float, float], int]:
    """Steps per (σ, q): all that ε depends on."""
    out: dict[tuple[float, float], int] = {}
    for seg in segments:
        if seg.steps:
            key = (seg.noise_multiplier, seg.sample_rate)
            out[key] = out.get(key, 0) + seg.steps
    return out
