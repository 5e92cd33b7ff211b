"""Stages of the private step that need no strategy: clipping the micro-batches, counting non-finite examples, the
step's output, and the private training loader.

``DPStrategy.training_step`` runs them in order::

    micro-batches → clip (engine) → reduce + noise (:func:`lightning_dp.noise.privatize`) → record → write gradients
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_dp.console import warn
from lightning_dp.microbatches import EmptyBatchCollate

#: ``micro-batch -> (the user's training_step output, its loss)``
UserStep = Callable[[Any], tuple[Any, Tensor]]


@dataclass
class ClippedBatch:
    """What clipping a logical batch leaves besides the engine's clipped sum."""

    #: per micro-batch, its loss times its size (for the logical batch's mean loss)
    losses: list[Tensor]
    #: per-sample gradient norms (before clipping) of the whole batch
    norms: Tensor
    #: under per-layer clipping, per-sample norms per group; else None
    group_norms: Tensor | None
    #: the last micro-batch's ``training_step`` output
    last_output: Any
    #: examples in the batch
    size: int
    #: examples whose per-sample gradient was non-finite (zeroed)
    nonfinite: int

    def step_output(self, device: torch.device) -> Any:
        """The step's output for Lightning: the mean loss over the logical batch (in the user's mapping, if any)."""
        mean_loss = torch.stack(self.losses).sum() / self.size if self.size else torch.zeros((), device=device)
        if isinstance(self.last_output, Mapping):
            return {**self.last_output, "loss": mean_loss}
        return mean_loss


def clip_micro_batches(
    engine: Any,
    micro_batches: list[tuple[Any, int]],
    user_step: UserStep,
    max_grad_norm: float,
    clipping: str,
    device: torch.device,
    idle_passes: int = 0,
    idle_batch: Callable[[], Any] | None = None,
) -> ClippedBatch:
    """Stages 1–2: the user's forward and backward per micro-batch, then per-sample clipping into the engine's sum.

    ``idle_passes`` more passes then run on ``idle_batch()`` and add nothing: their capture is freed with
    ``ClippingEngine.probe_norms`` (sharded models need every rank to run as many passes as the busiest rank, see
    ``DPModelParallelStrategy``).
    """
    losses: list[Tensor] = []
    norms: list[Tensor] = []
    group_norms: list[Tensor] = []
    last_output: Any = None
    for micro, size in micro_batches:
        with engine.capture(size):
            output, loss = user_step(micro)
            loss.backward()
        norms.append(engine.clip_and_accumulate(max_grad_norm, clipping))
        if engine.last_group_norms is not None:
            group_norms.append(engine.last_group_norms)
        losses.append(loss.detach().float() * size)
        last_output = output
    for _ in range(idle_passes):
        assert idle_batch is not None
        with engine.capture(1):
            _, loss = user_step(idle_batch())
            loss.backward()
        engine.probe_norms()  # frees the capture; nothing joins the clipped sum
    return ClippedBatch(
        losses=losses,
        norms=torch.cat(norms) if norms else torch.zeros(0, device=device),
        group_norms=torch.cat(group_norms) if group_norms else None,
        last_output=last_output,
        size=sum(size for _, size in micro_batches),
        nonfinite=engine.pop_nonfinite(),
    )


class NonfiniteCount:
    """Examples with a non-finite per-sample gradient in this fit: a warning at the first, a total at the end."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, bad: int, step: int) -> None:
        """Count ``bad`` examples of step ``step`` (warn at the first of the fit)."""
        if bad:
            if self.total == 0:
                warn(
                    f"lightning_dp: {bad} example(s) of step {step} had a non-finite (NaN/inf)"
                    " per-sample gradient; they contribute zero to the update, so the clipping bound still holds."
                    " This count is computed from private data without noise (a non-private diagnostic). Pass"
                    " DPStrategy(nonfinite='error') to stop instead, and check your data for NaN/inf values."
                )
            self.total += bad

    def report(self) -> None:
        """Say how many examples of this fit were zeroed (if any)."""
        if self.total:
            warn(
                f"lightning_dp: {self.total} example(s) had non-finite per-sample gradients in this fit and"
                " contributed zero (a non-private count)."
            )


def all_reduce_sum(flat: Tensor) -> None:
    """Sum ``flat`` over the ranks, in place."""
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)


def private_loader(dataset: Dataset, sampler: Sampler, loader: DataLoader) -> DataLoader:
    """``loader`` with its batches drawn by ``sampler`` (the batch selection's) and empty batches kept empty."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=EmptyBatchCollate(loader.collate_fn, dataset),
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )


__all__ = ["ClippedBatch", "NonfiniteCount", "all_reduce_sum", "clip_micro_batches", "private_loader"]
