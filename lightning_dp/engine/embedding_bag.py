"""Deprecated: the ``nn.EmbeddingBag`` maths moved to :mod:`lightning_dp.engine.layer_rules.embedding_bag` (with the
rule and the ghost layer). Importing from here still works for this release, with a warning.
"""

from typing import Any

from lightning_dp._moved import moved_attribute

_HOMES = ("lightning_dp.engine.layer_rules.embedding_bag",)


def __getattr__(name: str) -> Any:
    return moved_attribute("lightning_dp.engine.embedding_bag", name, _HOMES)
