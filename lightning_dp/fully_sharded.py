"""FSDP2 (``torch.distributed.fsdp.fully_shard``) glue: where sharded parameters live, and the private gradient of a
shard.

Written for :class:`~lightning_dp.model_parallel.DPModelParallelStrategy`; the privacy core (engines, clipping, noise,
plan, ledger) does not know about sharding. Only this module reads FSDP2's per-parameter state (``FSDPParam``:
``sharded_param``, ``_unsharded_param``, ``unsharded_accumulated_grad``), which torch does not export: it is the only
way to reach autograd's *local* gradient of a micro-batch, which the engines' cross-check compares with, without a
collective.

Under FSDP2 each parameter is a ``DTensor`` sharded along dimension 0 over the data-parallel mesh; forward and
backward all-gather it into an ordinary, whole tensor (the *unsharded* parameter, another object) that the layers
use. The strategy switches FSDP2's gradient reduce-scatter off (``set_requires_gradient_sync(False)``): autograd's
gradient of a micro-batch is *not* private and must never be communicated or reach the optimizer. The engines
clip per example on the whole parameters, each rank sums its own examples, and :func:`privatize_shards`
reduce-scatters the clipped sum so that each rank holds the global sum of its shard, adds noise to that shard only
(from its own stream: one draw per coordinate across all ranks), and divides by B.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.noise import add_gaussian
from lightning_dp.randomness import RandomSource


def fsdp_params(module: nn.Module) -> list[object]:
    """FSDP2's ``FSDPParam`` records of every ``fully_shard``-ed submodule of ``module`` (empty if none)."""
    out: list[object] = []
    for m in module.modules():
        if not isinstance(m, FSDPModule):
            continue
        group = m._get_fsdp_state()._fsdp_param_group  # torch-internal: see the module docstring
        if group is not None:
            out.extend(group.fsdp_params)
    return out


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule was ``fully_shard``-ed."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """Switch FSDP2's reduce-scatter of autograd's gradients on or off for every sharded submodule."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_requires_gradient_sync(enabled, recurse=False)


class FullyShardedLayout:
    """The :class:`~lightning_dp.engine.layout.ParameterLayout` of a module sharded with FSDP2.

    Args:
        module: the ``fully_shard``-ed module (its parameters are the sharded ``DTensor`` parameters).

    Raises:
        DPMisconfigurationError: if a parameter is not sharded along dimension 0 only.
    """

    rekeys = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._records: dict[int, object] = {}  # id(sharded param) -> FSDPParam
        self._by_unsharded: dict[int, nn.Parameter] = {}
        self._outside: dict[int, Tensor] = {}  # held, so that their ids stay theirs
        self._refresh()

    def _refresh(self) -> None:
        self._records = {}
        self._by_unsharded = {}
        for record in fsdp_params(self.module):
            sharded = record.sharded_param  # type: ignore[attr-defined]
            placements = tuple(sharded.placements)
            if placements != (Shard(0),):
                raise DPMisconfigurationError(
                    f"DPModelParallelStrategy supports parameters sharded along dimension 0 over one mesh dimension"
                    f" (fully_shard's default), got placements {placements}. Use fully_shard without tensor"
                    " parallelism or a custom shard placement."
                )
            self._records[id(sharded)] = record
            unsharded = getattr(record, "_unsharded_param", None)
            if unsharded is not None:
                self._by_unsharded[id(unsharded)] = sharded

    def canonical(self, p: Tensor) -> nn.Parameter:
        """The sharded parameter that the unsharded ``p`` stands for (``p`` itself if it is a trained parameter)."""
        if id(p) in self._records:
            return p  # type: ignore[return-value]
        found = self._by_unsharded.get(id(p))
        if found is None and id(p) not in self._outside:  # all-gathered for the first time since the last look
            self._refresh()
            found = self._by_unsharded.get(id(p))
        if found is None:
            if isinstance(p, DTensor):
                raise DPMisconfigurationError("A layer handed over a DTensor parameter that FSDP2 does not manage.")
            self._outside[id(p)] = p  # outside every fully_shard unit (whole on every rank): no walk next time
            return p  # type: ignore[return-value]
        return found

    def _record(self, p: nn.Parameter) -> object | None:
        return self._records.get(id(p))

    def autograd_grad(self, p: nn.Parameter) -> Tensor | None:
        """Autograd's gradient of this rank's micro-batch, whole (FSDP2's gradient sync is off: not reduced)."""
        record = self._record(p)
        if record is None:
            return p.grad
        accumulated = getattr(record, "unsharded_accumulated_grad", None)
        if accumulated is not None:
            return accumulated
        unsharded = getattr(record, "_unsharded_param", None)
        return None if unsharded is None else unsharded.grad  # never the sharded p.grad: that one is not local

    def clear_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Drop autograd's gradients: on the sharded parameter, the unsharded one and FSDP2's accumulator."""
        for p in params:
            p.grad = None
            record = self._record(p)
            if record is None:
                continue
            if getattr(record, "unsharded_accumulated_grad", None) is not None:
                record.unsharded_accumulated_grad = None  # type: ignore[attr-defined]
            unsharded = getattr(record, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None

    def aliases(self, p: nn.Parameter) -> list[Tensor]:
        """FSDP2's unsharded parameter of ``p`` (once it was all-gathered)."""
        record = self._record(p)
        unsharded = getattr(record, "_unsharded_param", None) if record is not None else None
        return [] if unsharded is None else [unsharded]

    def zeros(self, p: nn.Parameter) -> Tensor:
        """fp32 zeros of the whole parameter, on this rank's device."""
        local = p.to_local() if isinstance(p, DTensor) else p
        return torch.zeros(tuple(p.shape), dtype=torch.float32, device=local.device)


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of dimension 0 that ``rank`` holds under FSDP2's ``Shard(0)`` (``torch.chunk``:
    ⌈rows / world⌉ per rank, the last ranks possibly fewer or none).
    """
    per = -(-rows // world_size)
    start = min(per * rank, rows)
    return start, min(start + per, rows)


def privatize_shards(
    summed: dict[nn.Parameter, Tensor],
    noise_std: float,
    normalizer: float,
    source: RandomSource,
    world_size: int,
    rank: int,
    group: dist.ProcessGroup | None = None,
) -> dict[nn.Parameter, Tensor]:
    """The shard of the private gradient ``(Σ_ranks Σ_i clip(g_i) + N(0, std²)) / B`` that this rank holds.

    Each rank passes its clipped sum of *whole* parameters; one reduce-scatter of a flat buffer (padded per parameter
    to ``world_size`` equal chunks) leaves each rank the global sum of its own rows; each rank adds noise to those
    rows only, from its own ``source``, so that every coordinate of the model gets exactly one Gaussian draw.

    Args:
        summed: per sharded parameter, this rank's fp32 clipped sum, the parameter's whole shape.
        noise_std: σ·sensitivity.
        normalizer: the expected logical batch size B.
        source: this rank's noise source for the step (independent of every other rank's).
        world_size: the number of ranks the parameters are sharded over.
        rank: this rank's index in that group.
        group: the process group (default: the world).

    Returns:
        Per parameter, a ``DTensor`` with the parameter's mesh and placements and dtype: the private gradient.
    """
    params = list(summed)
    if not params:
        return {}
    for p in params:
        if not isinstance(p, DTensor):
            raise DPMisconfigurationError(f"privatize_shards got a parameter that is not sharded: {tuple(p.shape)}.")
    chunks: list[list[Tensor]] = [[] for _ in range(world_size)]
    rows_per_rank: list[int] = []
    for p in params:
        whole = summed[p].reshape(p.shape[0], -1)
        rows, width = whole.shape
        per = -(-rows // world_size)  # torch.chunk's rows per rank: FSDP2's Shard(0)
        padded = torch.zeros(per * world_size, width, dtype=torch.float32, device=whole.device)
        padded[:rows] = whole
        for r in range(world_size):
            chunks[r].append(padded[r * per : (r + 1) * per].reshape(-1))
        rows_per_rank.append(per)
    send = torch.cat([torch.cat(c) for c in chunks])
    mine = torch.empty(send.numel() // world_size, dtype=torch.float32, device=send.device)
    if world_size > 1:
        dist.reduce_scatter_tensor(mine, send, op=dist.ReduceOp.SUM, group=group)
    else:
        mine.copy_(send)
    out: dict[nn.Parameter, Tensor] = {}
    offset = 0
    for p, per in zip(params, rows_per_rank):
        start, stop = shard_rows(p.shape[0], world_size, rank)
        shard_shape = (stop - start, *p.shape[1:])
        local = mine[offset : offset + math.prod(shard_shape)].view(shard_shape)  # `mine` is ours: noised in place
        offset += per * math.prod(p.shape[1:])
        add_gaussian(local, noise_std, source)
        local /= normalizer
        out[p] = DTensor.from_local(local.to(p.dtype), p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return out


__all__ = [
    "FullyShardedLayout",
    "fsdp_params",
    "is_fully_sharded",
    "privatize_shards",
    "set_gradient_sync",
    "shard_rows",
]
