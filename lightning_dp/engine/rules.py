"""Deprecated: the per-sample gradient rules moved to their layer families in :mod:`lightning_dp.engine.layer_rules`
(the registry to ``layer_rules.grad_sampler_registry``, broadcast parameters to ``layer_rules.broadcast_registry``).
Importing from here still works for this release, with a warning.
"""

from typing import Any

from lightning_dp._moved import moved_attribute

_HOMES = (
    "lightning_dp.engine.layer_rules",
    "lightning_dp.engine.layer_rules.grad_sampler_registry",
    "lightning_dp.engine.layer_rules.broadcast_registry",
    "lightning_dp.engine.layer_rules.reductions",
    "lightning_dp.engine.layer_rules.norms",
    "lightning_dp.engine.layer_rules.scales",
    "lightning_dp.engine.layer_rules.embedding",
)


def __getattr__(name: str) -> Any:
    return moved_attribute("lightning_dp.engine.rules", name, _HOMES)
