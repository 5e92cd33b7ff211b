"""Normalisation layers: LayerNorm (with or without bias), GroupNorm, timm's ``LayerNorm``, ``LayerNorm2d``,
``GroupNorm``, ``GroupNorm1`` and ``RmsNorm``, any memory format.

Their per-sample gradients are cheap to instantiate (a few parameters per channel): the hooks engine uses the rules
below, and so does the ghost engine (no ghost layer; instantiation by rule is the method for them, without notice).
timm's norms are subclasses with a fast-norm switch: same maths, registered by name since they override ``forward``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dp.engine.layer_rules.grad_sampler_registry import register_grad_sampler
from lightning_dp.engine.layer_rules.reductions import sum_except_batch_and_last

try:
    import timm.layers as _timm_layers
except ImportError:  # pragma: no cover - timm is a dependency, but keep the engine importable without it
    _timm_layers = None


def layer_norm_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of a LayerNorm's weight and (optional) bias."""
    x = activations[0]
    ret: dict[nn.Parameter, Tensor] = {}
    weight, bias = layer.weight, layer.bias
    if weight is not None and weight.requires_grad:
        normed = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
        ret[weight] = sum_except_batch_and_last(normed * backprops, weight.dim())
    if bias is not None and bias.requires_grad:
        ret[bias] = sum_except_batch_and_last(backprops, bias.dim())
    return ret


def layer_norm_2d_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of ``timm.layers.LayerNorm2d`` (LayerNorm over the channels of an NCHW tensor)."""
    x = activations[0]
    ret: dict[nn.Parameter, Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        normed = F.layer_norm(x.permute(0, 2, 3, 1), layer.normalized_shape, eps=layer.eps).permute(0, 3, 1, 2)
        ret[layer.weight] = (normed * backprops).sum((2, 3))
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.sum((2, 3))
    return ret


def group_norm_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of a GroupNorm's weight and bias (``nn.GroupNorm``, timm ``GroupNorm``/``GroupNorm1``),
    any memory format.
    """
    ret: dict[nn.Parameter, Tensor] = {}
    b, c = backprops.shape[0], backprops.shape[1]
    if layer.weight is not None and layer.weight.requires_grad:
        normed = F.group_norm(activations[0], layer.num_groups, eps=layer.eps)
        ret[layer.weight] = (normed * backprops).reshape(b, c, -1).sum(-1)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(b, c, -1).sum(-1)
    return ret


def rms_norm_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient of timm ``RmsNorm``'s weight (``y = w · x / rms(x)`` over the last dims)."""
    from timm.layers.fast_norm import rms_norm

    if layer.weight is None or not layer.weight.requires_grad:
        return {}
    normed = rms_norm(activations[0], layer.normalized_shape, None, layer.eps)
    return {layer.weight: sum_except_batch_and_last(normed * backprops, layer.weight.dim())}


register_grad_sampler(nn.LayerNorm)(layer_norm_rule)
register_grad_sampler(nn.GroupNorm)(group_norm_rule)
if _timm_layers is not None:
    register_grad_sampler(_timm_layers.LayerNorm)(layer_norm_rule)
    register_grad_sampler(_timm_layers.LayerNorm2d)(layer_norm_2d_rule)
    register_grad_sampler(_timm_layers.GroupNorm, _timm_layers.GroupNorm1)(group_norm_rule)
    register_grad_sampler(_timm_layers.RmsNorm)(rms_norm_rule)

#: the normalisation layers handled here
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm)
if _timm_layers is not None:
    NORM_TYPES += (
        _timm_layers.LayerNorm,
        _timm_layers.LayerNorm2d,
        _timm_layers.GroupNorm,
        _timm_layers.GroupNorm1,
        _timm_layers.RmsNorm,
    )

__all__ = ["NORM_TYPES", "group_norm_rule", "layer_norm_2d_rule", "layer_norm_rule", "rms_norm_rule"]
