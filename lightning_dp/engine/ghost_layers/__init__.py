"""The ghost engine's per-layer classes, one module per layer type, registered by :func:`register_ghost_layer`.

To support a new layer type natively, write one :class:`GhostLayer` subclass (for a layer whose weight gradient is a
matrix product, a :class:`~lightning_dp.engine.ghost_layers.matmul.MatmulGhostLayer` with its ``collect`` only) and
decorate it with ``@register_ghost_layer(TheModule)``; import its module here (or anywhere before the engine is
built). Layers without one fall back to :class:`RuleGhostLayer` when :mod:`lightning_dp.engine.rules` has a rule.
"""

from __future__ import annotations

from torch import nn

from lightning_dp.engine.ghost_layers.base import GhostLayer, GhostRecord, register_ghost_layer, registered_ghost_layer
from lightning_dp.engine.ghost_layers.conv import Conv1dGhostLayer, Conv2dGhostLayer, ConvGhostLayer  # registers
from lightning_dp.engine.ghost_layers.embedding import EmbeddingGhostLayer
from lightning_dp.engine.ghost_layers.embedding_bag import EmbeddingBagGhostLayer
from lightning_dp.engine.ghost_layers.linear import LinearGhostLayer
from lightning_dp.engine.ghost_layers.matmul import MatmulGhostLayer
from lightning_dp.engine.ghost_layers.rule import RuleGhostLayer
from lightning_dp.engine.rules import find_rule


def ghost_layer_for(module: nn.Module) -> GhostLayer | None:
    """The ghost engine's handler for ``module``: its registered class (exact type, supported configuration), else
    per-sample instantiation with its rule, else None (unsupported).
    """
    cls = registered_ghost_layer(module)
    if cls is not None:
        return cls(module)
    rule = find_rule(module)
    return RuleGhostLayer(module, rule) if rule is not None else None


__all__ = [
    "Conv1dGhostLayer",
    "Conv2dGhostLayer",
    "ConvGhostLayer",
    "EmbeddingBagGhostLayer",
    "EmbeddingGhostLayer",
    "GhostLayer",
    "GhostRecord",
    "LinearGhostLayer",
    "MatmulGhostLayer",
    "RuleGhostLayer",
    "ghost_layer_for",
    "register_ghost_layer",
]
