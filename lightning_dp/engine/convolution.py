"""Convolutions as matrix products over patches, for any memory format, padding and group count.

Per group ``g`` of a convolution, example ``i``'s weight gradient is ``G_{i,g}ᵀ A_{i,g}``: ``A`` are the input patches
(``F.unfold``: ``(C_g·k…)`` columns, in the weight's flattening order, one per output position) and ``G`` the output
gradient at the same positions. This module builds ``A`` ``(B, groups, L, C_g·k…)`` and ``G`` ``(B, groups, L,
out_g)`` for ``nn.Conv1d`` and ``nn.Conv2d`` with any ``groups`` (depthwise included), ``padding`` (numbers,
``"same"``, ``"valid"``) and ``padding_mode``, from inputs and gradients in any memory format.

Why not Opacus's conv grad sampler: it unfolds assuming contiguous NCHW tensors, and gives wrong per-sample gradients
for channels-last models and for grouped/depthwise convolutions fed non-contiguous activations (ConvNeXt, FocalNet);
the autograd cross-check cannot always tell (its sum can be right).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the convolution types handled here
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)


def _as_2d(module: nn.Module) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Kernel, dilation, padding and stride as 2-D (a 1-D convolution is a ``1 × k`` one of a height-1 image)."""
    if isinstance(module, nn.Conv1d):
        return (
            (1, module.kernel_size[0]),
            (1, module.dilation[0]),
            (0, _numeric_padding(module)[0]),
            (1, module.stride[0]),
        )
    pad = _numeric_padding(module)
    return tuple(module.kernel_size), tuple(module.dilation), (pad[0], pad[1]), tuple(module.stride)  # type: ignore[return-value]


def _explicit_pad(module: nn.Module) -> bool:
    """Whether the input is padded before the convolution (padding mode other than zeros, or ``"same"`` /
    ``"valid"``), as ``_ConvNd._conv_forward`` and ``F.conv*d(padding="same")`` do.
    """
    return module.padding_mode != "zeros" or isinstance(module.padding, str)


def _numeric_padding(module: nn.Module) -> tuple[int, ...]:
    if _explicit_pad(module):
        return (0,) * len(module.kernel_size)
    return tuple(module.padding)


def _padded(module: nn.Module, x: Tensor) -> Tensor:
    if not _explicit_pad(module):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, module._reversed_padding_repeated_twice, mode=mode)


def conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """The input patches ``(B, groups, L, C_g·k…)`` of a call of ``module`` on ``x`` (any memory format)."""
    kernel, dilation, padding, stride = _as_2d(module)
    x = _padded(module, x)
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
    cols = F.unfold(x.contiguous(), kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C·k, L)
    b, _, length = cols.shape
    return cols.view(b, module.groups, -1, length).transpose(2, 3)


def conv_grad_sequence(module: nn.Module, grad: Tensor) -> Tensor:
    """The output gradient ``(B, out, L…)`` as ``(B, groups, L, out_g)`` (any memory format)."""
    b, out = grad.shape[0], grad.shape[1]
    return grad.reshape(b, module.groups, out // module.groups, -1).transpose(2, 3)


def per_sample_weight(module: nn.Module, a: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients ``(B, *weight.shape)`` from patches and output gradients."""
    gs = torch.einsum("bglp,bgld->bgpd", g, a)
    return gs.reshape(a.shape[0], *module.weight.shape)


def conv_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of an ``nn.Conv1d`` / ``nn.Conv2d`` (any groups, padding, memory format)."""
    ret: dict[nn.Parameter, Tensor] = {}
    g = conv_grad_sequence(layer, backprops)
    if layer.weight.requires_grad:
        ret[layer.weight] = per_sample_weight(layer, conv_patches(layer, activations[0]), g)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(backprops.shape[0], backprops.shape[1], -1).sum(-1)
    return ret


__all__ = ["CONV_TYPES", "conv_grad_sequence", "conv_patches", "conv_rule", "per_sample_weight"]
