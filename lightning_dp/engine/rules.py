"""Per-layer per-sample gradient rules: a registry in the manner of Opacus's ``register_grad_sampler``.

A rule maps ``(layer, activations, backprops)`` to ``{parameter: per-sample gradient}``, the per-sample gradient
having a leading batch dimension. Lookup is by type, our own rules first, then Opacus's registered grad samplers; a
subclass gets its base's rule only if it does not override ``forward`` (a subclass that does may compute something
else: it is then covered by the ``torch.func`` fallback, see :mod:`lightning_dp.engine.fallback`). A rule may say
which configurations it handles (:func:`register_grad_sampler`'s ``supports``).

We add rules that Opacus lacks or gets wrong: convolutions of any memory format, groups and padding mode
(:mod:`lightning_dp.engine.convolution`), GroupNorm and timm's norm subclasses, timm's ``LayerScale``,
``LayerScale2d``, metaformer ``Scale``, ResMLP ``Affine``, ``RmsNorm``, LayerNorm without bias, ``nn.Embedding`` with a
padding index, ``nn.EmbeddingBag``, and "broadcast parameters": raw ``nn.Parameter``s of shape ``(1, ...)`` that a
model broadcasts along the batch dimension (timm ViT's ``cls_token``, ``reg_token``, ``pos_embed``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GradSampleRule = Callable[[nn.Module, list[Tensor], Tensor], dict[nn.Parameter, Tensor]]

#: per layer type, its per-sample gradient rule and which configurations it supports (None: all)
_RULES: dict[type[nn.Module], tuple[GradSampleRule, Callable[[nn.Module], bool] | None]] = {}
_BROADCAST_PARAMETERS: dict[type[nn.Module], tuple[str, ...]] = {}


def register_grad_sampler(
    *module_types: type[nn.Module], supports: Callable[[nn.Module], bool] | None = None
) -> Callable[[GradSampleRule], GradSampleRule]:
    """Register a per-sample gradient rule for layers of these types (and their subclasses that keep ``forward``).

    Args:
        module_types: the layer types.
        supports: which configurations the rule handles (others are covered by the ``torch.func`` fallback).

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


def register_broadcast_parameters(module_type: type[nn.Module], *names: str) -> None:
    """Declare raw parameters of ``module_type`` (and its subclasses) that are broadcast along the batch dimension.

    Such a parameter has shape ``(1, ...)`` and every example of the batch uses it in its own row (``p.expand(B,
    ...)``, or ``x + p`` with ``x`` of the same rank). Its per-sample gradient is obtained by substituting a
    per-sample copy of shape ``(B, ...)`` during the forward pass; state-dict keys are unchanged.

    Example:
        >>> register_broadcast_parameters(MyModel, "prompt_tokens")  # doctest: +SKIP
    """
    _BROADCAST_PARAMETERS[module_type] = tuple(dict.fromkeys(_BROADCAST_PARAMETERS.get(module_type, ()) + names))


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


def broadcast_parameter_names(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module``'s raw parameters registered as broadcast along the batch dimension."""
    names: tuple[str, ...] = ()
    for t, registered in _BROADCAST_PARAMETERS.items():
        if isinstance(module, t):
            names += registered
    return tuple(dict.fromkeys(names))


def _sum_except_batch_and_last(x: Tensor, n_last: int) -> Tensor:
    dims = list(range(1, x.dim() - n_last))
    return x.sum(dim=dims) if dims else x


def layer_norm_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of a LayerNorm's weight and (optional) bias."""
    x = activations[0]
    ret: dict[nn.Parameter, Tensor] = {}
    weight, bias = layer.weight, layer.bias
    if weight is not None and weight.requires_grad:
        normed = F.layer_norm(x, layer.normalized_shape, eps=layer.eps)
        ret[weight] = _sum_except_batch_and_last(normed * backprops, weight.dim())
    if bias is not None and bias.requires_grad:
        ret[bias] = _sum_except_batch_and_last(backprops, bias.dim())
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


def _not_inplace(layer: nn.Module) -> bool:
    # an in-place layer overwrites the input its hook keeps; the fallback copies it before the op instead
    return not getattr(layer, "inplace", False)


def reduce_to(product: Tensor, shape: torch.Size) -> Tensor:
    """Sum a per-sample ``(B, *rest)`` product over the dimensions a parameter of ``shape`` was broadcast along
    (aligned to the right, as broadcasting), giving ``(B, *shape)``.
    """
    rest = product.dim() - 1
    target = list(shape)
    while len(target) > rest and target[0] == 1:  # leading size-1 dims broadcast against the batch
        target.pop(0)
    lead = rest - len(target)
    dims = [1 + d for d in range(lead)]
    dims += [1 + lead + j for j, n in enumerate(target) if n == 1 and product.shape[1 + lead + j] != 1]
    out = product.sum(dim=dims, keepdim=True) if dims else product
    return out.reshape(product.shape[0], *shape)


def layer_scale_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient of ``timm.layers.LayerScale``'s ``gamma`` (``y = x * gamma`` over the last dim)."""
    return {layer.gamma: _sum_except_batch_and_last(activations[0] * backprops, 1)}


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
    return {layer.weight: _sum_except_batch_and_last(normed * backprops, layer.weight.dim())}


def embedding_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient of ``nn.Embedding``'s weight: each token's output gradient added to its row, except at
    ``padding_idx``, whose row autograd leaves without gradient (Opacus's grad sampler adds it there).
    """
    if not layer.weight.requires_grad:
        return {}
    idx = activations[0]
    b, d = idx.shape[0], layer.embedding_dim
    idx = idx.reshape(b, -1)
    g = backprops.reshape(b, -1, d)
    if layer.padding_idx is not None:
        g = torch.where((idx != layer.padding_idx).unsqueeze(-1), g, torch.zeros((), dtype=g.dtype, device=g.device))
    gs = torch.zeros(b, *layer.weight.shape, device=g.device, dtype=g.dtype)
    return {layer.weight: gs.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), g)}


def _register_torch() -> None:
    from lightning_dp.engine.convolution import conv_rule
    from lightning_dp.engine.embedding_bag import embedding_bag_rule, supports_bag

    register_grad_sampler(nn.LayerNorm)(layer_norm_rule)
    register_grad_sampler(nn.Embedding)(embedding_rule)
    register_grad_sampler(nn.EmbeddingBag, supports=supports_bag)(embedding_bag_rule)
    register_grad_sampler(nn.GroupNorm)(group_norm_rule)
    register_grad_sampler(nn.Conv1d, nn.Conv2d)(conv_rule)


_register_torch()


def _register_timm() -> None:
    try:
        import timm.layers as tl
        import timm.models.vision_transformer as tvit
    except ImportError:  # pragma: no cover - timm is a dependency, but keep the engine importable without it
        return
    # timm's Linear only adds a cast under torchscript; its norm subclasses a fast-norm switch: same math.
    from opacus.grad_sample import GradSampleModule

    register_grad_sampler(tl.Linear)(GradSampleModule.GRAD_SAMPLERS[nn.Linear])
    register_grad_sampler(tl.LayerNorm)(layer_norm_rule)
    register_grad_sampler(tl.LayerNorm2d)(layer_norm_2d_rule)
    register_grad_sampler(tl.GroupNorm, tl.GroupNorm1)(group_norm_rule)
    register_grad_sampler(tl.RmsNorm)(rms_norm_rule)
    register_grad_sampler(tl.LayerScale, supports=_not_inplace)(layer_scale_rule)
    register_grad_sampler(tl.LayerScale2d, supports=_not_inplace)(channel_scale_rule)
    try:
        import timm.models.metaformer as metaformer
        import timm.models.mlp_mixer as mlp_mixer
    except ImportError:  # pragma: no cover
        pass
    else:
        register_grad_sampler(metaformer.Scale, supports=_not_inplace)(channel_scale_rule)
        register_grad_sampler(mlp_mixer.Affine)(affine_rule)
    register_broadcast_parameters(tvit.VisionTransformer, "cls_token", "reg_token", "pos_embed", "dist_token")
    pool = getattr(tl, "AttentionPoolLatent", None)
    if pool is not None:
        register_broadcast_parameters(pool, "latent")


_register_timm()

__all__ = [
    "GradSampleRule",
    "affine_rule",
    "broadcast_parameter_names",
    "channel_scale_rule",
    "embedding_rule",
    "find_rule",
    "group_norm_rule",
    "layer_norm_rule",
    "layer_scale_rule",
    "reduce_to",
    "register_broadcast_parameters",
    "register_grad_sampler",
    "rms_norm_rule",
    "same_forward_bases",
]
