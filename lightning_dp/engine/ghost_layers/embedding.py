"""Deprecated: moved to :mod:`lightning_dp.engine.layer_rules.embedding`. Importing from here still works for this
release, with a warning.
"""

from typing import Any

from lightning_dp._moved import moved_attribute

_HOMES = ("lightning_dp.engine.layer_rules.embedding",)


def __getattr__(name: str) -> Any:
    return moved_attribute("lightning_dp.engine.ghost_layers.embedding", name, _HOMES)
