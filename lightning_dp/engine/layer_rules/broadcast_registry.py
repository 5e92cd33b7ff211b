"""The registry of raw parameters broadcast along the batch dimension (timm ViT's ``cls_token``, ``pos_embed``).

Such a parameter has shape ``(1, ...)`` and every example of the batch uses it in its own row; the engines obtain
its per-sample gradient by substituting a per-sample copy during the forward pass (:mod:`lightning_dp.engine.layers`).
This module holds the registry only; the declarations live with their model family in
:mod:`lightning_dp.engine.layer_rules` (e.g. :mod:`~lightning_dp.engine.layer_rules.broadcast_tokens`).
"""

from __future__ import annotations

from torch import nn

_BROADCAST_PARAMETERS: dict[type[nn.Module], tuple[str, ...]] = {}


def register_broadcast_parameters(module_type: type[nn.Module], *names: str) -> None:
    """Declare raw parameters of ``module_type`` (and its subclasses) that are broadcast along the batch dimension.

    Such a parameter has shape ``(1, ...)`` and every example of the batch uses it in its own row (``p.expand(B,
    ...)``, or ``x + p`` with ``x`` of the same rank). Its per-sample gradient is obtained by substituting a
    per-sample copy of shape ``(B, ...)`` during the forward pass; state-dict keys are unchanged.

    Args:
        module_type: the module (usually a whole model) that owns the parameters.
        names: the parameters' attribute names on it.

    Example:
        >>> register_broadcast_parameters(MyModel, "prompt_tokens")  # doctest: +SKIP
    """
    _BROADCAST_PARAMETERS[module_type] = tuple(dict.fromkeys(_BROADCAST_PARAMETERS.get(module_type, ()) + names))


def broadcast_parameter_names(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module``'s raw parameters registered as broadcast along the batch dimension."""
    names: tuple[str, ...] = ()
    for t, registered in _BROADCAST_PARAMETERS.items():
        if isinstance(module, t):
            names += registered
    return tuple(dict.fromkeys(names))


__all__ = ["broadcast_parameter_names", "register_broadcast_parameters"]
