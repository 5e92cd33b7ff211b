"""Data sampling for DP-SGD: Poisson (and distributed Poisson) batch sampling, and splitting into micro-batches.

Opacus has a Poisson sampler, but its distributed variant skips empty local batches (ranks then hang on
collectives) and draws the same mask on every rank when the global RNG is seeded alike. These samplers always
yield a batch (possibly empty) on every rank and step, and use their own per-rank generators.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler


def _new_seed() -> int:
    # Drawn from torch's global RNG, so ``seed_everything`` makes the sampling reproducible.
    return int(torch.randint(0, 2**62, (1,)).item())


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields Poisson-subsampled batches: each example is included in each step independently with probability q.

    Under DDP, the dataset is split into ``num_replicas`` disjoint shards (``rank::num_replicas``) and each rank
    draws its shard's inclusion mask with its own generator, so across all ranks every example of the dataset is
    included independently with probability ``sample_rate``; the global batch size is ``Binomial(N, q)``.

    Args:
        num_samples: N, the size of the dataset.
        sample_rate: q, the inclusion probability of each example in each step.
        steps_per_epoch: how many batches one epoch yields (empty batches included).
        num_replicas: number of ranks sharing the dataset.
        rank: this rank.
        seed: the sampling seed (all ranks must use the same one); default drawn from torch's global RNG.

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
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}.")
        if not (0 <= rank < num_replicas):
            raise ValueError(f"rank {rank} is out of range for {num_replicas} replicas.")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps_per_epoch = int(steps_per_epoch)
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = _new_seed() if seed is None else int(seed)
        self.epoch = 0
        self._iterations = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, so that each epoch draws fresh batches (called by Lightning)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._iterations = 0

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(hash((self.seed, self.rank, self.epoch, self._iterations)) & (2**62 - 1))
        self._iterations += 1
        shard = torch.arange(self.rank, self.num_samples, self.num_replicas)
        for _ in range(self.steps_per_epoch):
            mask = torch.rand(len(shard), generator=generator) < self.sample_rate
            yield shard[mask].tolist()


class ShuffleBatchSampler(Sampler[list[int]]):
    """Fixed-size batches of a random permutation (each example once per epoch). Used only on explicit opt-out.

    This is *not* Poisson sampling: the accountant then claims no amplification by subsampling.

    Args:
        num_samples: N, the size of the dataset.
        batch_size: the per-rank batch size.
        num_replicas: number of ranks sharing the dataset.
        rank: this rank.
        seed: the shuffling seed (the same on all ranks).
    """

    def __init__(
        self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int | None = None
    ) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = _new_seed() if seed is None else int(seed)
        self.epoch = 0
        self._iterations = 0
        # Every rank yields the same number of batches, so no rank waits on a collective that never comes.
        self._steps = math.ceil(math.ceil(num_samples / num_replicas) / batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch, so that each epoch draws a fresh permutation (called by Lightning)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._iterations = 0

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(hash((self.seed, self.epoch, self._iterations)) & (2**62 - 1))
        self._iterations += 1
        perm = torch.randperm(self.num_samples, generator=generator)[self.rank :: self.num_replicas].tolist()
        for i in range(self._steps):
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
