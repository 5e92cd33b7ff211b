"""Per-channel scales: timm's ``LayerScale`` (``y = x · γ`` over the last dim), ``LayerScale2d`` (``γ`` over the
channels of NCHW), metaformer ``Scale`` (``y = x · s.view(shape)``) and ResMLP ``Affine`` (``y = β + α · x``).

Their per-sample gradients are cheap to instantiate: the hooks engine uses the rules below, and so does the ghost
engine (no ghost layer; instantiation by rule is the method for them, without notice). An in-place scale overwrites
the input its hook keeps, so only ``inplace=False`` ones are supported here (the fallback copies the input first).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_dp.engine.layer_rules.grad_sampler_registry import register_grad_sampler
from lightning_dp.engine.layer_rules.reductions import reduce_to, sum_except_batch_and_last

try:
    import timm.layers as _timm_layers
except ImportError:  # pragma: no cover - timm is a dependency, but keep the engine importable without it
    _timm_layers = None
try:
    import timm.models.metaformer as _metaformer
    import timm.models.mlp_mixer as _mlp_mixer
except ImportError:  # pragma: no cover
    _metaformer = _mlp_mixer = None


def _not_inplace(layer: nn.Module) -> bool:
    # an in-place layer overwrites the input its hook keeps; the fallback copies it before the op instead
    return not getattr(layer, "inplace", False)


def layer_scale_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient of ``timm.layers.LayerScale``'s ``gamma`` (``y = x * gamma`` over the last dim)."""
    return {layer.gamma: sum_except_batch_and_last(activations[0] * backprops, 1)}


def channel_scale_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """``y = x * p.view(shape)``: timm ``LayerScale2d`` (``gamma`` over channels of NCHW) and metaformer ``Scale``."""
    name = "gamma" if hasattr(layer, "gamma") else "scale"
    p = getattr(layer, name)
    shape = (-1, 1, 1) if name == "gamma" else layer.shape
    view = torch.Size(torch.empty(p.shape, device="meta").view(shape).shape)
    return {p: reduce_to(activations[0] * backprops, view).reshape(-1, *p.shape)} if p.requires_grad else {}


def affine_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """ResMLP's ``Affine``: ``y = beta + alpha * x``."""
    ret: dict[nn.Parameter, Tensor] = {}
    if layer.alpha.requires_grad:
        ret[layer.alpha] = reduce_to(activations[0] * backprops, layer.alpha.shape)
    if layer.beta.requires_grad:
        ret[layer.beta] = reduce_to(backprops, layer.beta.shape)
    return ret


#: the scale layers handled here
SCALE_TYPES: tuple[type[nn.Module], ...] = ()
if _timm_layers is not None:
    register_grad_sampler(_timm_layers.LayerScale, supports=_not_inplace)(layer_scale_rule)
    register_grad_sampler(_timm_layers.LayerScale2d, supports=_not_inplace)(channel_scale_rule)
    SCALE_TYPES += (_timm_layers.LayerScale, _timm_layers.LayerScale2d)
if _metaformer is not None and _mlp_mixer is not None:
    register_grad_sampler(_metaformer.Scale, supports=_not_inplace)(channel_scale_rule)
    register_grad_sampler(_mlp_mixer.Affine)(affine_rule)
    SCALE_TYPES += (_metaformer.Scale, _mlp_mixer.Affine)

__all__ = ["SCALE_TYPES", "affine_rule", "channel_scale_rule", "layer_scale_rule"]
