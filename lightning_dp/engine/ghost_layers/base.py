"""Deprecated: the ghost-layer interface moved to :mod:`lightning_dp.engine.layer_rules.ghost_layer`, its registry to
:mod:`lightning_dp.engine.layer_rules.ghost_layer_registry`. Importing from here still works for this release, with
a warning.
"""

from typing import Any

from lightning_dp._moved import moved_attribute

_HOMES = (
    "lightning_dp.engine.layer_rules",
    "lightning_dp.engine.layer_rules.ghost_layer",
    "lightning_dp.engine.layer_rules.ghost_layer_registry",
)


def __getattr__(name: str) -> Any:
    return moved_attribute("lightning_dp.engine.ghost_layers.base", name, _HOMES)
