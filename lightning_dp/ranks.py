"""``OneOrManyRanks``: a ``DDPStrategy`` that runs one rank without a launcher and never wraps the model in DDP.

``DPStrategy`` is one class for one device and for several: on one rank there is no launcher and no process group;
on several, Lightning's DDP launchers and process group are used, but the model is not wrapped in
``DistributedDataParallel`` (it would all-reduce *unclipped* gradients in backward): the strategy all-reduces the
clipped sums itself, once per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, Strategy
from typing_extensions import override

if TYPE_CHECKING:
    import lightning.pytorch as pl


class OneOrManyRanks(DDPStrategy):
    """A ``DDPStrategy`` without launcher or process group on one rank, and without the DDP wrapper on any."""

    @property
    @override
    def world_size(self) -> int:
        """Number of ranks."""
        return self.num_nodes * self.num_processes

    @override
    def _configure_launcher(self) -> None:
        # One rank: no launcher and no process group. Several: Lightning's DDP launchers (script/torchrun/SLURM).
        if self.world_size > 1:
            super()._configure_launcher()
        else:
            self._launcher = None

    @override
    def setup_environment(self) -> None:
        """Set up the device and, with more than one rank, the process group."""
        if self.world_size > 1:
            super().setup_environment()
        else:
            Strategy.setup_environment(self)

    @override
    def configure_ddp(self) -> None:
        """Do not wrap the model in ``DistributedDataParallel``: it would all-reduce *unclipped* gradients in
        backward. The clipped sums are all-reduced once per step instead; here only the initial parameters and
        buffers are broadcast from rank 0 so that every rank starts (and stays) identical.
        """
        self._sync_initial_states()

    def _sync_initial_states(self) -> None:
        if _distributed_is_initialized() and self.world_size > 1:
            _sync_module_states(self.model)

    def _setup_without_training(self, trainer: pl.Trainer) -> None:
        """Validation, test and predict: move the model to its device, identical on every rank (nothing private is
        released there).
        """
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self._sync_initial_states()
        self.setup_precision_plugin()

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """Reduce across ranks (identity on one device)."""
        if not _distributed_is_initialized():
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)


__all__ = ["OneOrManyRanks"]
