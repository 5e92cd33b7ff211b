"""Micro-batches: reading, slicing and splitting a collated batch along its examples, and empty Poisson batches.

A logical (Poisson) batch is split into physical micro-batches of at most ``max_physical_batch_size`` examples; each
runs through the user's ``training_step`` on its own, and their clipped sums are added before the noise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor


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


__all__ = ["EmptyBatchCollate", "batch_size_of", "slice_batch", "split_batch"]
