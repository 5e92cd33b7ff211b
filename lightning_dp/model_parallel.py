"""``DPModelParallelStrategy``: differentially private training of a model sharded with FSDP2 (``fully_shard``).

Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` with lightning_dp's private step
(:class:`~lightning_dp.private_training.PrivateTraining`, the same code as :class:`~lightning_dp.DPStrategy`'s: plan,
batch selection, ledger, journal, budget, probe). What differs from DDP is where the parameters live:

- each rank holds a shard of every parameter and of the optimizer state (about 1/world of DDP's);
- forward and backward run on FSDP2's all-gathered whole parameters, so the engines clip each example as under DDP,
  from this rank's activations and output gradients (:class:`~lightning_dp.fully_sharded.FullyShardedLayout`);
- FSDP2's own reduce-scatter of autograd's (non-private) gradient is switched off; the clipped sum is
  reduce-scattered instead, each rank adds the noise of its own shard from its own stream (one draw per coordinate
  of the model), divides by B and writes the shard's private gradient
  (:func:`~lightning_dp.fully_sharded.privatize_shards`).

Limits: data parallelism only (``tensor_parallel_size=1``: a per-sample norm across tensor-parallel shards is not
implemented), every trained parameter inside a ``fully_shard`` unit, no gradient masks (sparse fine-tuning), and each
rank holds the fp32 clipped sum of the whole model during a step (4 bytes per trained parameter, freed after the
reduce-scatter).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import Tensor
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_dp.clipping import sensitivity
from lightning_dp.engine import ClippingEngine, build_engine
from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.fully_sharded import FullyShardedLayout, is_fully_sharded, privatize_shards, set_gradient_sync
from lightning_dp.private_training import PrivateTraining


class DPModelParallelStrategy(PrivateTraining, ModelParallelStrategy):
    """Differentially private training with the model and optimizer state sharded over the ranks (FSDP2).

    The same guarantee, arguments, ``.ledger``, ``.epsilon``, callbacks and summary as
    :class:`~lightning_dp.DPStrategy`; the module shards itself in ``configure_model`` with
    ``torch.distributed.fsdp.fully_shard`` over ``self.device_mesh["data_parallel"]`` (each block, then the root).

    Args:
        data_parallel_size: the number of ranks the model is sharded over (``"auto"``: all of them).
        tensor_parallel_size: must be 1 (tensor parallelism is not supported by the per-sample engines).
        save_distributed_checkpoint: ``True``: each rank saves its shard (a folder), ``False``: one full file.
        process_group_backend: ``"gloo"`` on CPU, ``"nccl"`` on GPUs (default: by device).
        timeout: the process group's timeout.
        **privacy: :class:`~lightning_dp.DPStrategy`'s privacy arguments (``target_epsilon`` or
            ``noise_multiplier``, ``target_delta``, ``max_grad_norm``, ``clipping``, ``engine``,
            ``poisson_sampling``, ``secure_mode``, ...).

    Raises:
        DPMisconfigurationError: for a tensor-parallel size other than 1, or inconsistent privacy arguments; at fit,
            for a module that is not ``fully_shard``-ed or a trained parameter outside every ``fully_shard`` unit.

    Example:
        >>> class Model(L.LightningModule):  # doctest: +SKIP
        ...     def configure_model(self):
        ...         mesh = self.device_mesh["data_parallel"]
        ...         for block in self.blocks:
        ...             fully_shard(block, mesh=mesh)
        ...         fully_shard(self, mesh=mesh)
        >>> trainer = L.Trainer(devices=2, strategy=DPModelParallelStrategy(  # doctest: +SKIP
        ...     target_epsilon=3.0, max_grad_norm=1.0))
    """

    strategy_name = "dp_model_parallel"
    _engine_after_setup = True  # FSDP2 materialises the sharded parameters in ModelParallelStrategy.setup

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``Trainer(strategy="dp_model_parallel")`` (the privacy parameters still have to be given)."""
        strategy_registry.register(
            cls.strategy_name, cls, description="Differentially private FSDP2 training (lightning_dp)", override=True
        )

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        **privacy: Any,
    ) -> None:
        if tensor_parallel_size not in (1, "auto"):
            raise DPMisconfigurationError(
                f"DPModelParallelStrategy shards the model over data-parallel ranks only; got tensor_parallel_size="
                f"{tensor_parallel_size!r}. Per-sample norms across tensor-parallel shards are not implemented: use"
                " tensor_parallel_size=1."
            )
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._init_privacy(**privacy)

    @override
    def setup_environment(self) -> None:
        """Set up the process group and a data-parallel mesh over every rank (Lightning's ``"auto"`` would make the
        ranks of one node a tensor-parallel group).
        """
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    # ------------------------------------------------------------------ what differs from DDP
    @override
    def _new_engine(self, module: pl.LightningModule) -> ClippingEngine:
        """The engine on FSDP2's whole parameters, its sums named by the sharded ones; FSDP2's gradient sync off."""
        check_sharded(module)
        if self.grad_masks:
            raise DPMisconfigurationError(
                "DPModelParallelStrategy does not support gradient masks (sparse fine-tuning) yet: use DPStrategy."
            )
        set_gradient_sync(module, False)  # autograd's gradient is not private: never communicated
        layout = FullyShardedLayout(module)
        return build_engine(self.engine_name, module, self.loss_reduction, self.nonfinite, layout=layout)

    @override
    def _reduce_and_noise(self, summed: dict[torch.nn.Parameter, Tensor]) -> dict[torch.nn.Parameter, Tensor]:
        """Reduce-scatter the clipped sums; each rank noises its own shard from its own stream, divides by B."""
        step = self._plan.released_steps
        return privatize_shards(
            summed,
            noise_std=self._plan.sigma_at(step) * sensitivity(self.max_grad_norm, self.clipping),
            normalizer=float(self._plan.expected_batch_size),
            source=self.random_source("noise", step),  # keyed by the global rank: independent streams
            world_size=self.world_size,
            rank=self.global_rank,
        )

    @override
    def _idle_passes(self, micro_batches: int) -> tuple[int, Callable[[], Any] | None]:
        """FSDP2 all-gathers parameters in every forward and backward, a collective of all ranks: a rank with fewer
        micro-batches (a smaller or empty Poisson batch) runs as many more passes as the busiest rank, on one training
        example, and discards them (nothing is clipped into the sum; nothing is released).
        """
        count = torch.tensor([micro_batches], device=self.root_device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item()) - micro_batches, self._idle_batch

    def _idle_batch(self) -> Any:
        items = self._guards.items
        assert items is not None, "the training loader went through process_dataloader"
        return move_data_to_device(items.collate_fn([items.dataset[0]]), self.root_device)

    def _setup_without_training(self, trainer: pl.Trainer) -> None:
        """Validation, test and predict: Lightning's own set-up (nothing private is released there)."""
        ModelParallelStrategy.setup(self, trainer)

    @override
    def teardown(self) -> None:
        """Switch FSDP2's gradient sync back on for whoever uses the module next, then tear down."""
        module = self.lightning_module
        if module is not None and is_fully_sharded(module):
            set_gradient_sync(module, True)
        super().teardown()


def check_sharded(module: torch.nn.Module) -> None:
    """Every trained parameter must be a ``DTensor`` of a ``fully_shard`` unit.

    Raises:
        DPMisconfigurationError: naming the first parameter that is not.
    """
    if not is_fully_sharded(module):
        raise DPMisconfigurationError(
            "DPModelParallelStrategy needs a module sharded with FSDP2: call torch.distributed.fsdp.fully_shard on its"
            " blocks and on the module itself in LightningModule.configure_model (see the docs' multi-GPU page)."
        )
    for name, p in module.named_parameters():
        if p.requires_grad and not isinstance(p, DTensor):
            raise DPMisconfigurationError(
                f"Parameter '{name}' is trained but not sharded: every trained parameter must be inside a fully_shard"
                " unit. Call fully_shard(self, mesh=...) on the LightningModule last in configure_model."
            )


DPModelParallelStrategy.register_strategies(StrategyRegistry)

__all__ = ["DPModelParallelStrategy", "check_sharded"]
