"""Deprecated: the samplers moved to :mod:`lightning_dp.batch_selection` (beside their policies), the micro-batch
utilities to :mod:`lightning_dp.microbatches`. Importing them from here still works for this release, with a warning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    "PoissonBatchSampler": "lightning_dp.batch_selection",
    "ShuffleBatchSampler": "lightning_dp.batch_selection",
    "SourceOf": "lightning_dp.batch_selection",
    "EmptyBatchCollate": "lightning_dp.microbatches",
    "batch_size_of": "lightning_dp.microbatches",
    "slice_batch": "lightning_dp.microbatches",
    "split_batch": "lightning_dp.microbatches",
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'lightning_dp.sampling' has no attribute {name!r}")
    home = _MOVED[name]
    warnings.warn(
        f"lightning_dp.sampling.{name} moved to {home}.{name}; lightning_dp.sampling will be removed in the next"
        " release.",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)


__all__ = list(_MOVED)
