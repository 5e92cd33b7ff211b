"""Make a model trainable under per-sample clipping: replace every layer that mixes the examples of a batch.

Batch normalisation (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, and subclasses such as timm's
``BatchNormAct2d``, which ``opacus.validators.ModuleValidator.fix`` misses because it matches exact types) normalises
with statistics of the whole batch: one example then moves every other example's output, and per-sample gradients
are not defined. :func:`fix_model` swaps each for a GroupNorm over the same channels (timm's norm+activation layers
for timm's ``GroupNormAct`` keeping the layer's own activation and drop layer), and instance norms that track running
statistics for ones that do not.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def default_num_groups(bn: nn.Module) -> int:
    """Groups of the GroupNorm replacing ``bn``: one group for ``BatchNorm1d`` (features, or tokens of a sequence:
    each example normalised over its channels, as a LayerNorm), else the largest divisor of ``C`` that is at most 32
    and leaves at least two channels per group (32 groups, the usual choice, when ``C`` allows it; two channels per
    group keep a group's statistics defined on a 1×1 feature map).
    """
    c = bn.num_features
    if isinstance(bn, nn.BatchNorm1d) or c < 2:
        return 1
    return max(g for g in range(1, min(32, c // 2) + 1) if c % g == 0)


def _group_norm_for(bn: nn.modules.batchnorm._BatchNorm, groups: int) -> nn.Module:
    c = bn.num_features
    factory = {"device": bn.weight.device, "dtype": bn.weight.dtype} if bn.weight is not None else {}
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    if isinstance(act, nn.Module) and isinstance(drop, nn.Module):  # timm's BatchNormAct2d / SyncBatchNormAct
        from timm.layers import GroupNormAct

        gn: nn.Module = GroupNormAct(c, groups, eps=bn.eps, affine=bn.affine, apply_act=False, **factory)
        gn.act, gn.drop = act, drop
    else:
        gn = nn.GroupNorm(groups, c, eps=bn.eps, affine=bn.affine, **factory)
    if bn.affine:  # keep the (possibly pretrained) per-channel scale and shift
        gn.weight.data.copy_(bn.weight.data)
        gn.bias.data.copy_(bn.bias.data)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    return gn


def _replacement(module: nn.Module, num_groups: Callable[[nn.Module], int]) -> nn.Module | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _group_norm_for(module, num_groups(module))
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        fixed = type(module)(module.num_features, eps=module.eps, affine=module.affine, track_running_stats=False)
        if module.affine:
            fixed.load_state_dict({"weight": module.weight.data, "bias": module.bias.data})
        return fixed.to(next(iter(module.parameters()), module.running_mean))
    return None


def fix_model(model: nn.Module, num_groups: int | Callable[[nn.Module], int] | None = None) -> nn.Module:
    """Replace the layers that mix the examples of a batch, in place: every BatchNorm variant with a GroupNorm (with
    the layer's own activation for timm's ``BatchNormAct2d``), instance norms with running statistics with ones
    without. The affine weights are copied; running statistics are dropped.

    Args:
        model: the model (changed in place).
        num_groups: the GroupNorm's number of groups, or a function of the BatchNorm layer giving it (default:
            :func:`default_num_groups`).

    Returns:
        ``model`` (the same object; if ``model`` itself is a BatchNorm layer, its replacement).

    Example:
        >>> import timm  # doctest: +SKIP
        >>> model = fix_model(timm.create_model("efficientnet_b0", num_classes=10))  # doctest: +SKIP
    """
    groups: Callable[[nn.Module], int]
    if num_groups is None:
        groups = default_num_groups
    elif isinstance(num_groups, int):
        count = num_groups
        groups = lambda _: count  # noqa: E731
    else:
        groups = num_groups
    root = _replacement(model, groups)
    if root is not None:
        return root
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child, groups)
            if new is not None:
                setattr(parent, name, new)
    return model


__all__ = ["default_num_groups", "fix_model"]
