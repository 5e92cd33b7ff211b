"""The registry of the ghost engine's per-layer classes (subclasses of
:class:`~lightning_dp.engine.layer_rules.ghost_layer.GhostLayer`), and the ghost engine's lookup of a layer's handler.

A class is registered for module types with :func:`register_ghost_layer`; a subclass of such a type gets it only if it
keeps the type's ``forward`` (it may otherwise compute something else). A layer without a registered class (or whose
configuration the class does not support) is handled by per-sample instantiation with its grad-sampler rule
(:class:`~lightning_dp.engine.layer_rules.rule_ghost_layer.RuleGhostLayer`), when it has one. This module holds the
registry only; the classes live with their layer family in :mod:`lightning_dp.engine.layer_rules`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from lightning_dp.engine.layer_rules.ghost_layer import GhostLayer
from lightning_dp.engine.layer_rules.grad_sampler_registry import find_rule, same_forward_bases
from lightning_dp.engine.layer_rules.rule_ghost_layer import RuleGhostLayer

_GHOST_LAYERS: dict[type[nn.Module], type[GhostLayer]] = {}

L = TypeVar("L", bound=type[GhostLayer])


def register_ghost_layer(*module_types: type[nn.Module]) -> Callable[[L], L]:
    """Register a :class:`~lightning_dp.engine.layer_rules.ghost_layer.GhostLayer` subclass for layers of these types
    (and their subclasses that keep ``forward``).

    Args:
        module_types: the layer types.

    Returns:
        A decorator that registers the class and returns it unchanged.

    Example:
        >>> @register_ghost_layer(nn.Linear)  # doctest: +SKIP
        ... class LinearGhostLayer(MatmulGhostLayer): ...
    """

    def decorator(cls: L) -> L:
        for t in module_types:
            _GHOST_LAYERS[t] = cls
        return cls

    return decorator


def registered_ghost_layer(module: nn.Module) -> type[GhostLayer] | None:
    """The class registered for ``module``'s type (or a base class whose ``forward`` it keeps) if it supports the
    module's configuration, else None.
    """
    for t in same_forward_bases(module):
        cls = _GHOST_LAYERS.get(t)
        if cls is not None:
            return cls if cls.supports(module) else None
    return None


def ghost_layer_for(module: nn.Module) -> GhostLayer | None:
    """The ghost engine's handler for ``module``: its registered class (supported configuration), else per-sample
    instantiation with its grad-sampler rule, else None (unsupported).
    """
    cls = registered_ghost_layer(module)
    if cls is not None:
        return cls(module)
    rule = find_rule(module)
    return RuleGhostLayer(module, rule) if rule is not None else None


__all__ = ["ghost_layer_for", "register_ghost_layer", "registered_ghost_layer"]
