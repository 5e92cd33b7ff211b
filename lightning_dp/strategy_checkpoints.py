"""The checkpoint hooks of ``DPStrategy``: the privacy state saved with every checkpoint, and restored (and checked
against the run's journal) from it.

A mixin of Lightning hooks; the checks themselves are :mod:`lightning_dp.checkpointing`'s, which receive plain values
(the resume policy, the journal directory, the trainer, the ranks), not the strategy.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.pytorch.strategies import Strategy
from typing_extensions import override

from lightning_dp.checkpointing import (
    STATE_KEY,
    privacy_state,
    privacy_state_of,
    read_checkpoint,
    restore_on_rank_zero,
    restore_run,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from lightning.fabric.utilities.types import _PATH

    from lightning_dp.buffers import BufferWatch
    from lightning_dp.checkpointing import RunState
    from lightning_dp.plan import PrivacyPlan


class PrivacyCheckpoints(Strategy):
    """Save and restore the privacy state with Lightning's checkpoints (``DPStrategy`` sets the attributes)."""

    _plan: PrivacyPlan
    _run: RunState
    _buffers: BufferWatch
    _restored_from_checkpoint: bool
    max_grad_norm: float
    clipping: str
    resume_policy: str
    journal_dir: str | os.PathLike[str] | None

    def state_dict(self) -> dict[str, Any]:
        """The privacy state saved in checkpoints (plain Python numbers; no seeds)."""
        nonprivate = self._buffers.nonprivate
        return privacy_state(self._plan.state_dict(), self._run, self.max_grad_norm, self.clipping, nonprivate)

    def load_state_dict(
        self,
        state: dict[str, Any],
        checkpoint: dict[str, Any] | None = None,
        context: str = "the checkpoint",
        checkpoint_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Restore the privacy state, checked against the run's journal (see :func:`restore_run`).

        Raises:
            DPMisconfigurationError: for a state that disagrees with the checkpoint's progress or the journal (a
                fork, a missing or edited journal, an edited ledger), under ``resume_policy``.
        """
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        args = (self.resume_policy, self.journal_dir, trainer, context, checkpoint_path)
        restore = lambda: restore_run(state, checkpoint, *args)  # noqa: E731
        plan_state, run_state = restore_on_rank_zero(self, _distributed_is_initialized(), restore)
        self._plan.load_state_dict(plan_state)
        self._run.load(run_state)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Save the checkpoint with the privacy state under ``checkpoint["lightning_dp"]``; the journal is forced to
        disk first, so a checkpoint on disk never holds steps its journal lacks.
        """
        self._run.sync()
        checkpoint[STATE_KEY] = self.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint and restore (and verify) the privacy run from it.

        Raises:
            DPMisconfigurationError: if the file cannot be read, holds training progress but no privacy state, or
                its privacy state fails the checks of :meth:`load_state_dict`.
        """
        load = super().load_checkpoint
        checkpoint = read_checkpoint(lambda: load(checkpoint_path, weights_only=weights_only), checkpoint_path)
        state = privacy_state_of(checkpoint, checkpoint_path)
        if state is not None:
            self.load_state_dict(state, checkpoint, f"checkpoint {os.fspath(checkpoint_path)}", checkpoint_path)
            self._restored_from_checkpoint = True
        return checkpoint

    def _adopt_module_state(self, module: pl.LightningModule) -> None:
        """A module trained privately earlier in this process (by another strategy object) continues that run."""
        state = getattr(module, "_lightning_dp_state", None)
        if state is None or self._run.run_id is not None or self._plan.released_steps > 0:
            return
        self.load_state_dict(state, context="the module's earlier private fit")


__all__ = ["PrivacyCheckpoints"]
