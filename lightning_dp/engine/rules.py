"""Per-layer per-sample gradient rules: a registry in the manner of Opacus's ``register_grad_sampler``.

A rule maps ``(layer, activations, backprops)`` to ``{parameter: per-sample gradient}``, the per-sample gradient
having a leading batch dimension. Lookup is by exact type, as in Opacus, because a subclass may change the
forward: our own rules first, then Opacus's registered grad samplers. We add rules that Opacus lacks
(``timm.layers.LayerNorm``, ``timm.layers.LayerScale``, LayerNorm without bias) and "broadcast parameters":
raw ``nn.Parameter``s of shape ``(1, ...)`` that a model broadcasts along the batch dimension (timm ViT's
``cls_token``, ``reg_token``, ``pos_embed``). Opacus would treat the whole ViT as one functorch unit for those.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GradSampleRule = Callable[[nn.Module, list[Tensor], Tensor], dict[nn.Parameter, Tensor]]

_RULES: dict[type[nn.Module], GradSampleRule] = {}
_BROADCAST_PARAMETERS: dict[type[nn.Module], tuple[str, ...]] = {}


def register_grad_sampler(*module_types: type[nn.Module]) -> Callable[[GradSampleRule], GradSampleRule]:
    """Register a per-sample gradient rule for layers of exactly these types.

    Example:
        >>> @register_grad_sampler(MyScale)  # doctest: +SKIP
        ... def my_scale_rule(layer, activations, backprops):
        ...     return {layer.scale: (activations[0] * backprops).flatten(2).sum(-1)}
    """

    def decorator(fn: GradSampleRule) -> GradSampleRule:
        for t in module_types:
            _RULES[t] = fn
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


def find_rule(module: nn.Module) -> GradSampleRule | None:
    """The per-sample gradient rule for ``module``'s exact type, or None."""
    rule = _RULES.get(type(module))
    if rule is not None:
        return rule
    from opacus.grad_sample import GradSampleModule

    return GradSampleModule.GRAD_SAMPLERS.get(type(module))


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


def layer_scale_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient of ``timm.layers.LayerScale``'s ``gamma`` (``y = x * gamma`` over the last dim)."""
    if getattr(layer, "inplace", False):
        from lightning_dp.errors import UnsupportedLayerError

        raise UnsupportedLayerError(
            "timm LayerScale(inplace=True) overwrites its input, so its per-sample gradient cannot be computed."
            " Build the model with inplace LayerScale disabled."
        )
    return {layer.gamma: _sum_except_batch_and_last(activations[0] * backprops, 1)}


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


register_grad_sampler(nn.LayerNorm)(layer_norm_rule)
register_grad_sampler(nn.Embedding)(embedding_rule)


def _register_timm() -> None:
    try:
        import timm.layers as tl
        import timm.models.vision_transformer as tvit
    except ImportError:  # pragma: no cover - timm is a dependency, but keep the engine importable without it
        return
    # timm's LayerNorm subclasses only add a fast-norm switch: same math as F.layer_norm.
    register_grad_sampler(tl.LayerNorm)(layer_norm_rule)
    register_grad_sampler(tl.LayerScale)(layer_scale_rule)
    register_grad_sampler(tl.LayerNorm2d)(layer_norm_2d_rule)
    register_broadcast_parameters(tvit.VisionTransformer, "cls_token", "reg_token", "pos_embed", "dist_token")
    pool = getattr(tl, "AttentionPoolLatent", None)
    if pool is not None:
        register_broadcast_parameters(pool, "latent")


_register_timm()

__all__ = [
    "GradSampleRule",
    "broadcast_parameter_names",
    "embedding_rule",
    "find_rule",
    "layer_norm_rule",
    "layer_scale_rule",
    "register_broadcast_parameters",
    "register_grad_sampler",
]
