"""The registry of per-sample gradient rules (the hooks engine's, and the ghost engine's for layers without a ghost
layer), in the manner of Opacus's ``register_grad_sampler``.

A rule maps ``(layer, activations, backprops)`` to ``{parameter: per-sample gradient}``, the per-sample gradient
having a leading batch dimension. Lookup is by type, our own rules first, then Opacus's registered grad samplers; a
subclass gets its base's rule only if it does not override ``forward`` (a subclass that does may compute something
else: it is then covered by the ``torch.func`` fallback, see :mod:`lightning_dp.engine.fallback`). A rule may say
which configurations it handles (:func:`register_grad_sampler`'s ``supports``).

This module holds the registry only; the rules live with their layer family in :mod:`lightning_dp.engine.layer_rules`
(whose package imports every family, so lookups see them all).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

GradSampleRule = Callable[[nn.Module, list[Tensor], Tensor], dict[nn.Parameter, Tensor]]

#: per layer type, its per-sample gradient rule and which configurations it supports (None: all)
_RULES: dict[type[nn.Module], tuple[GradSampleRule, Callable[[nn.Module], bool] | None]] = {}


def register_grad_sampler(
    *module_types: type[nn.Module], supports: Callable[[nn.Module], bool] | None = None
) -> Callable[[GradSampleRule], GradSampleRule]:
    """Register a per-sample gradient rule for layers of these types (and their subclasses that keep ``forward``).

    Args:
        module_types: the layer types.
        supports: which configurations the rule handles (others are covered by the ``torch.func`` fallback).

    Returns:
        A decorator that registers the rule and returns it unchanged.

    Example:
        >>> @register_grad_sampler(MyScale)  # doctest: +SKIP
        ... def my_scale_rule(layer, activations, backprops):
        ...     return {layer.scale: (activations[0] * backprops).flatten(2).sum(-1)}
    """

    def decorator(fn: GradSampleRule) -> GradSampleRule:
        for t in module_types:
            _RULES[t] = (fn, supports)
        return fn

    return decorator


def same_forward_bases(module: nn.Module) -> list[type[nn.Module]]:
    """``module``'s type and its base classes that share its ``forward`` (most derived first): a rule registered
    for one of them computes what this module computes.
    """
    cls = type(module)
    return [t for t in cls.__mro__ if isinstance(t, type) and issubclass(t, nn.Module) and t.forward is cls.forward]


def find_rule(module: nn.Module) -> GradSampleRule | None:
    """The per-sample gradient rule for ``module`` (its type's, or a base's whose ``forward`` it keeps), if the rule
    supports its configuration; else None.
    """
    from opacus.grad_sample import GradSampleModule

    for t in same_forward_bases(module):
        entry = _RULES.get(t)
        if entry is not None:
            rule, supports = entry
            return rule if supports is None or supports(module) else None
        rule = GradSampleModule.GRAD_SAMPLERS.get(t)
        if rule is not None:
            return rule
    return None


__all__ = ["GradSampleRule", "find_rule", "register_grad_sampler", "same_forward_bases"]
