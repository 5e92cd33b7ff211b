"""Data sampling for DP-SGD: Poisson (and distributed Poisson) batch sampling, and splitting into micro-batches.

Opacus has a Poisson sampler, but its distributed variant skips empty local batches (ranks then hang on
collectives) and draws the same mask on every rank when the global RNG is seeded alike. These samplers always
yield a batch (possibly empty) on every rank and step, and draw each step's mask from that step's own random source
(:mod:`lightning_dp.randomness`): fresh OS entropy per fit by default, so a resumed run never replays the batches of
earlier steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from lightning_dp.randomness import RandomSource, fresh_seed, stream_source

#: ``(step, rank) -> RandomSource``: the sampling randomness of one step.
SourceOf = Callable[[int, int], RandomSource]


def _default_sources(seed: int | None) -> SourceOf:
    root = fresh_seed() if seed is None else int(seed)
    return lambda step, rank: stream_source(root, "sampling", step, rank)


class _StepSampler(Sampler[list[int]]):
    """Shared by the samplers: where each yielded batch's global step index comes from.

    ``position()`` is read when an iteration starts: the number of steps taken so far (the strategy passes its
    count of released steps, which a resume restores before any batch is drawn). Without it the sampler counts the
    batches it has yielded itself, so its epochs differ and never repeat.
    """

    def __init__(self, source_of: SourceOf, position: Callable[[], int] | None) -> None:
        self._source_of = source_of
        self._position = position
        self._yielded = 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch (called by Lightning); batches are keyed by global step, not by epoch."""
        self.epoch = epoch

    def _start(self) -> int:
        return self._position() if self._position is not None else self._yielded

    def _steps(self, count: int) -> Iterator[int]:
        start = self._start()
        for step in range(start, start + count):
            self._yielded = step + 1
            yield step


class PoissonBatchSampler(_StepSampler):
    """Yields Poisson-subsampled batches: each example is included in each step independently with probability q.

    Under DDP, the dataset is split into ``num_replicas`` disjoint shards (``rank::num_replicas``) and each rank
    draws its shard's inclusion mask from its own random source, so across all ranks every example of the dataset is
    included independently with probability ``sample_rate``; the global batch size is ``Binomial(N, q)``.

    Args:
        num_samples: N, the size of the dataset.
        sample_rate: q, the inclusion probability of each example in each step.
        steps_per_epoch: how many batches one epoch yields (empty batches included).
        num_replicas: number of ranks sharing the dataset.
        rank: this rank.
        seed: a fixed sampling seed (tests only: anyone who knows it can rebuild the batches); default: fresh OS
            entropy. Ignored when ``source_of`` is given.
        source_of: ``(step, rank) -> RandomSource`` (the strategy passes its run's streams).
        position: the global index of the next step, read when an iteration starts.

    Example:
        >>> sampler = PoissonBatchSampler(num_samples=1000, sample_rate=0.064, steps_per_epoch=16)
        >>> len(sampler)
        16
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps_per_epoch: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int | None = None,
        source_of: SourceOf | None = None,
        position: Callable[[], int] | None = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}.")
        if not (0 <= rank < num_replicas):
            raise ValueError(f"rank {rank} is out of range for {num_replicas} replicas.")
        super().__init__(source_of or _default_sources(seed), position)
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps_per_epoch = int(steps_per_epoch)
        self.num_replicas = num_replicas
        self.rank = rank

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        shard = torch.arange(self.rank, self.num_samples, self.num_replicas)
        for step in self._steps(self.steps_per_epoch):
            mask = self._source_of(step, self.rank).uniform(len(shard)) < self.sample_rate
            yield shard[mask].tolist()


class ShuffleBatchSampler(_StepSampler):
    """Fixed-size batches of a random permutation (each example once per pass). Used only on explicit opt-out.

    This is *not* Poisson sampling: the accountant then claims no amplification by subsampling. Every iteration is
    a new *pass* over a fresh permutation; :attr:`passes` counts them and :attr:`pass_start` is the global step of
    the current pass's first batch (a resumed run starts a new pass, which the ledger charges again).

    Args:
        num_samples: N, the size of the dataset.
        batch_size: the per-rank batch size.
        num_replicas: number of ranks sharing the dataset.
        rank: this rank.
        seed: a fixed shuffling seed (tests only); default: fresh OS entropy. Ignored when ``source_of`` is given.
        source_of: ``(step, rank) -> RandomSource``; the permutation of a pass comes from its first step's source
            on rank 0 (the same on every rank).
        position: the global index of the next step, read when an iteration starts.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int | None = None,
        source_of: SourceOf | None = None,
        position: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(source_of or _default_sources(seed), position)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        #: number of passes started, and the global step of the current pass's first batch
        self.passes = 0
        self.pass_start = -1
        # Every rank yields the same number of batches, so no rank waits on a collective that never comes.
        self._steps_per_pass = math.ceil(math.ceil(num_samples / num_replicas) / batch_size)

    def __len__(self) -> int:
        return self._steps_per_pass

    def __iter__(self) -> Iterator[list[int]]:
        start = self._start()
        perm = self._source_of(start, 0).permutation(self.num_samples)[self.rank :: self.num_replicas].tolist()
        self.passes += 1
        self.pass_start = start
        for i, _ in enumerate(self._steps(self._steps_per_pass)):
            yield perm[i * self.batch_size : (i + 1) * self.batch_size]


def _is_per_sample_list(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) and all(isinstance(x, (str, bytes, int, float)) for x in obj)


def batch_size_of(batch: Any) -> int:
    """The number of examples in a (collated) batch: the leading dimension of its first tensor.

    Raises:
        ValueError: if the batch holds no tensor (nor list of per-sample values) to read it from.
    """
    if isinstance(batch, Tensor):
        if batch.ndim == 0:
            raise ValueError("A 0-dimensional tensor has no batch dimension.")
        return batch.shape[0]
    if _is_per_sample_list(batch) and not isinstance(batch, (str, bytes)):
        return len(batch)
    if isinstance(batch, Mapping):
        items: Sequence[Any] = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        items = []
    for item in items:
        try:
            return batch_size_of(item)
        except ValueError:
            continue
    raise ValueError(
        f"Could not find the batch size of a batch of type {type(batch).__name__}: lightning_dp needs batches that"
        " hold tensors whose first dimension indexes the examples."
    )


def slice_batch(batch: Any, index: slice, batch_size: int) -> Any:
    """Take the examples ``index`` of every per-sample field of a collated batch.

    Tensors whose first dimension equals ``batch_size`` are sliced along it, as are lists of per-sample strings or
    numbers; other leaves (scalars, tensors of another length) are passed through unchanged.
    """
    if isinstance(batch, Tensor):
        return batch[index] if batch.ndim >= 1 and batch.shape[0] == batch_size else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, index, batch_size) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        if _is_per_sample_list(batch) and len(batch) == batch_size:
            return type(batch)(batch[index])
        items = [slice_batch(v, index, batch_size) for v in batch]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*items)
        return type(batch)(items)
    return batch


def split_batch(batch: Any, max_size: int | None) -> list[tuple[Any, int]]:
    """Split a logical batch into physical micro-batches of at most ``max_size`` examples.

    Returns:
        ``(micro_batch, size)`` pairs; an empty list for an empty batch.
    """
    n = batch_size_of(batch)
    if n == 0:
        return []
    if max_size is None or n <= max_size:
        return [(batch, n)]
    return [
        (slice_batch(batch, slice(s, min(s + max_size, n)), n), min(max_size, n - s)) for s in range(0, n, max_size)
    ]


class EmptyBatchCollate:
    """Wraps a ``collate_fn`` so that an empty Poisson batch collates to zero-length tensors of the right shape.

    The default collate cannot collate an empty list; an empty batch is legal under Poisson sampling and must
    still produce a (noise-only) optimizer step. The shapes come from collating the dataset's first example.

    Args:
        collate_fn: the dataloader's collate function.
        dataset: the dataset, to read one example's structure from.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Any) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset

    def __call__(self, samples: list[Any]) -> Any:
        """Collate ``samples``; an empty list gives zero-length tensors shaped like one collated example."""
        if len(samples) > 0:
            return self.collate_fn(samples)
        one = self.collate_fn([self.dataset[0]])
        return slice_batch(one, slice(0, 0), 1)
