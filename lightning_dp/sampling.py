"""Deprecated: the samplers moved to :mod:`lightning_dp.batch_selection` (beside their policies), the micro-batch
utilities to :mod:`lightning_dp.microbatches`. Importing them from here still works for this release, with a warning.
"""

from typing import Any

from lightning_dp._moved import moved_attribute

_SAMPLERS = ("PoissonBatchSampler", "ShuffleBatchSampler", "SourceOf")


def __getattr__(name: str) -> Any:
    home = "lightning_dp.batch_selection" if name in _SAMPLERS else "lightning_dp.microbatches"
    return moved_attribute("lightning_dp.sampling", name, (home,), home)
