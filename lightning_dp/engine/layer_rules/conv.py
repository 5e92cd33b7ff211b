"""Convolutions: ``nn.Conv1d`` and ``nn.Conv2d`` as matrix products over patches, for any memory format, padding and
group count; their per-sample gradient rule and their ghost layer.

Per group ``g`` of a convolution, example ``i``'s weight gradient is ``G_{i,g}ᵀ A_{i,g}``: ``A`` are the input patches
(``F.unfold``: ``(C_g·k…)`` columns, in the weight's flattening order, one per output position) and ``G`` the output
gradient at the same positions. This module builds ``A`` ``(B, groups, L, C_g·k…)`` and ``G`` ``(B, groups, L,
out_g)`` with any ``groups`` (depthwise included), ``padding`` (numbers, ``"same"``, ``"valid"``) and
``padding_mode``, from inputs and gradients in any memory format.

Why not Opacus's conv grad sampler: it unfolds assuming contiguous NCHW tensors, and gives wrong per-sample gradients
for channels-last models and for grouped/depthwise convolutions fed non-contiguous activations (ConvNeXt, FocalNet);
the autograd cross-check cannot always tell (its sum can be right).

In the ghost engine, each group is a linear map on the sequence of patches: the ghost norm or instantiation is chosen
as for a linear layer (ghost when ``2L² ≤ d·p``, ``d = C_g·k…`` and ``p = out_g``); a depthwise convolution (``d =
k…``, ``p = 1``) is instantiated, its per-sample gradients being as small as its weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_dp.engine.layer_rules.ghost_layer import GhostRecord
from lightning_dp.engine.layer_rules.ghost_layer_registry import register_ghost_layer
from lightning_dp.engine.layer_rules.grad_sampler_registry import register_grad_sampler
from lightning_dp.engine.layer_rules.matmul import MatmulCaptured, MatmulGhostLayer, cat, ghost_squared_norms

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


@register_grad_sampler(*CONV_TYPES)
def conv_rule(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of an ``nn.Conv1d`` / ``nn.Conv2d`` (any groups, padding, memory format)."""
    ret: dict[nn.Parameter, Tensor] = {}
    g = conv_grad_sequence(layer, backprops)
    if layer.weight.requires_grad:
        ret[layer.weight] = per_sample_weight(layer, conv_patches(layer, activations[0]), g)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(backprops.shape[0], backprops.shape[1], -1).sum(-1)
    return ret


@dataclass
class ConvCaptured:
    """The calls of a convolution as one sequence of patches per example and group."""

    a: Tensor  #: ``(B, groups, L, C_g·k…)`` patches, fp32
    g: Tensor  #: ``(B, groups, L, out_g)`` output gradients, fp32


@register_ghost_layer(*CONV_TYPES)
class ConvGhostLayer(MatmulGhostLayer):
    """``nn.Conv1d`` / ``nn.Conv2d``: per group, ghost norm or instantiation, and the book-keeping clipped sum.

    A single-group convolution (``groups=1``, e.g. a ViT patch embedding) is captured as the plain linear-layer pair
    (:class:`MatmulCaptured`, in the layer's dtype: bf16 under autocast), so :class:`MatmulGhostLayer`'s
    low-precision contractions and rounding bound apply unchanged; grouped convolutions are handled in fp32.
    """

    autocast_input: ClassVar[bool] = True

    @override
    def collect(self, records: list[GhostRecord]) -> MatmulCaptured | ConvCaptured:  # type: ignore[override]
        m = self.module
        a = cat([conv_patches(m, r.inputs[0]) for r in records], 2)
        g = cat([conv_grad_sequence(m, r.grad) for r in records if r.grad is not None], 2)
        if m.groups == 1:
            return self.pair(a[:, 0], g[:, 0])
        return ConvCaptured(a.float(), g.float())

    @staticmethod
    def _single(captured: MatmulCaptured | ConvCaptured) -> MatmulCaptured | None:
        """The single-group form, so that :class:`MatmulGhostLayer`'s contractions apply (None for grouped)."""
        return captured if isinstance(captured, MatmulCaptured) else None

    @override
    def rounding_bound(self, captured: MatmulCaptured | ConvCaptured) -> Tensor | None:  # type: ignore[override]
        single = self._single(captured)
        return super().rounding_bound(single) if single is not None else None

    @override
    def squared_norms(self, captured: ConvCaptured) -> Tensor | None:  # type: ignore[override]
        single = self._single(captured)
        if single is not None:
            return super().squared_norms(single)
        a, g = captured.a, captured.g
        b, groups, length, d = a.shape
        p = g.shape[-1]
        if self.force_instantiate or 2 * length * length > d * p:
            return None
        sq = torch.zeros(b, device=g.device, dtype=torch.float32)
        if self.trainable("weight") is not None:
            sq += (
                ghost_squared_norms(a.reshape(b * groups, length, d), g.reshape(b * groups, length, p))
                .view(b, -1)
                .sum(1)
            )
        if self.trainable("bias") is not None:
            sq += g.sum(2, dtype=torch.float32).pow(2).sum((1, 2))
        return sq

    @override
    def instantiate(self, captured: ConvCaptured) -> dict[nn.Parameter, Tensor]:  # type: ignore[override]
        single = self._single(captured)
        if single is not None:
            return super().instantiate(single)
        a, g = captured.a, captured.g
        weight, bias = self.trainable("weight"), self.trainable("bias")
        out: dict[nn.Parameter, Tensor] = {}
        if weight is not None:
            out[weight] = per_sample_weight(self.module, a, g).float()
        if bias is not None:
            out[bias] = g.sum(2, dtype=torch.float32).reshape(g.shape[0], -1)
        return out

    @override
    def clipped_sum(self, captured: ConvCaptured, factors: Tensor) -> dict[nn.Parameter, Tensor]:  # type: ignore[override]
        single = self._single(captured)
        if single is not None:
            return super().clipped_sum(single, factors)
        a, g = captured.a, captured.g
        weight, bias = self.trainable("weight"), self.trainable("bias")
        out: dict[nn.Parameter, Tensor] = {}
        if weight is not None:
            scaled = g * factors.to(g.dtype)[:, None, None, None]
            out[weight] = torch.einsum("bglp,bgld->gpd", scaled, a).float().reshape(weight.shape)
        if bias is not None:
            out[bias] = torch.einsum("b,bp->p", factors, g.sum(2, dtype=torch.float32).reshape(g.shape[0], -1))
        return out


#: kept for imports of the per-type names
Conv1dGhostLayer = ConvGhostLayer
Conv2dGhostLayer = ConvGhostLayer

__all__ = [
    "CONV_TYPES",
    "Conv1dGhostLayer",
    "Conv2dGhostLayer",
    "ConvCaptured",
    "ConvGhostLayer",
    "conv_grad_sequence",
    "conv_patches",
    "conv_rule",
    "per_sample_weight",
]
