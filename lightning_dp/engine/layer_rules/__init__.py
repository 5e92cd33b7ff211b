"""Per-sample maths of layers: one module per layer family, found through one registry per kind of rule.

A family's module holds all of its maths, and registers each kind of rule it has when imported:

- :mod:`~lightning_dp.engine.layer_rules.linear`: ``nn.Linear``, timm's ``Linear``;
- :mod:`~lightning_dp.engine.layer_rules.conv`: ``nn.Conv1d``, ``nn.Conv2d`` (any groups, padding, memory format);
- :mod:`~lightning_dp.engine.layer_rules.embedding`: ``nn.Embedding``;
- :mod:`~lightning_dp.engine.layer_rules.embedding_bag`: ``nn.EmbeddingBag``;
- :mod:`~lightning_dp.engine.layer_rules.norms`: LayerNorm, GroupNorm, timm's norms and ``RmsNorm``;
- :mod:`~lightning_dp.engine.layer_rules.scales`: timm's ``LayerScale``, ``LayerScale2d``, ``Scale``, ``Affine``;
- :mod:`~lightning_dp.engine.layer_rules.broadcast_tokens`: timm ViT's tokens broadcast along the batch.

The registries, one per kind of rule, hold no layer maths:

- per-sample gradients (the hooks engine, and the ghost engine for layers without a ghost layer):
  :func:`register_grad_sampler`, looked up by :func:`find_rule`
  (:mod:`~lightning_dp.engine.layer_rules.grad_sampler_registry`); Opacus's grad samplers are used after ours;
- ghost norms and book-keeping (the ghost engine): a :class:`GhostLayer` subclass
  (:mod:`~lightning_dp.engine.layer_rules.ghost_layer`; a layer whose weight gradient is a matrix product subclasses
  :class:`MatmulGhostLayer` and writes ``collect`` only) registered with :func:`register_ghost_layer`, looked up by
  :func:`ghost_layer_for` (:mod:`~lightning_dp.engine.layer_rules.ghost_layer_registry`); a layer without one is
  instantiated with its grad-sampler rule (:class:`RuleGhostLayer`);
- raw parameters broadcast along the batch: :func:`register_broadcast_parameters`
  (:mod:`~lightning_dp.engine.layer_rules.broadcast_registry`).

A new layer family goes in a new module here, imported below: importing this package (which importing any of its
modules does) registers every family, so lookups see them all whatever was imported first.
"""

from lightning_dp.engine.layer_rules import broadcast_tokens, conv, embedding, embedding_bag, linear, norms, scales
from lightning_dp.engine.layer_rules.broadcast_registry import broadcast_parameter_names, register_broadcast_parameters
from lightning_dp.engine.layer_rules.conv import Conv1dGhostLayer, Conv2dGhostLayer, ConvGhostLayer
from lightning_dp.engine.layer_rules.embedding import EmbeddingGhostLayer
from lightning_dp.engine.layer_rules.embedding_bag import EmbeddingBagGhostLayer
from lightning_dp.engine.layer_rules.ghost_layer import GhostLayer, GhostRecord
from lightning_dp.engine.layer_rules.ghost_layer_registry import (
    ghost_layer_for,
    register_ghost_layer,
    registered_ghost_layer,
)
from lightning_dp.engine.layer_rules.grad_sampler_registry import (
    GradSampleRule,
    find_rule,
    register_grad_sampler,
    same_forward_bases,
)
from lightning_dp.engine.layer_rules.linear import LinearGhostLayer
from lightning_dp.engine.layer_rules.matmul import MatmulGhostLayer
from lightning_dp.engine.layer_rules.rule_ghost_layer import RuleGhostLayer

#: the family modules, each registering its rules when imported
FAMILIES = (linear, conv, embedding, embedding_bag, norms, scales, broadcast_tokens)

__all__ = [
    "Conv1dGhostLayer",
    "Conv2dGhostLayer",
    "ConvGhostLayer",
    "EmbeddingBagGhostLayer",
    "EmbeddingGhostLayer",
    "FAMILIES",
    "GhostLayer",
    "GhostRecord",
    "GradSampleRule",
    "LinearGhostLayer",
    "MatmulGhostLayer",
    "RuleGhostLayer",
    "broadcast_parameter_names",
    "find_rule",
    "ghost_layer_for",
    "register_broadcast_parameters",
    "register_ghost_layer",
    "register_grad_sampler",
    "registered_ghost_layer",
    "same_forward_bases",
]
