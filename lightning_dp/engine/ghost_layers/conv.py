"""Convolutions in the ghost engine: after unfolding, each group of a convolution is a linear map on the sequence
of patches (:mod:`lightning_dp.engine.convolution`).

Handled natively: ``nn.Conv1d`` and ``nn.Conv2d`` with any ``groups`` (depthwise included), padding (numbers,
``"same"``, ``"valid"``), padding mode and memory format. Per group, the ghost norm or instantiation is chosen as for a
linear layer (ghost when ``2L² ≤ d·p``, ``d = C_g·k…`` and ``p = out_g``); a depthwise convolution (``d = k…``,
``p = 1``) is instantiated, its per-sample gradients being as small as its weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_dp.engine.convolution import conv_grad_sequence, conv_patches, per_sample_weight
from lightning_dp.engine.ghost_layers.base import GhostRecord, register_ghost_layer
from lightning_dp.engine.ghost_layers.matmul import MatmulCaptured, MatmulGhostLayer, cat, ghost_squared_norms


@dataclass
class ConvCaptured:
    """The calls of a convolution as one sequence of patches per example and group."""

    a: Tensor  #: ``(B, groups, L, C_g·k…)`` patches, fp32
    g: Tensor  #: ``(B, groups, L, out_g)`` output gradients, fp32


@register_ghost_layer(nn.Conv1d, nn.Conv2d)
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

__all__ = ["Conv1dGhostLayer", "Conv2dGhostLayer", "ConvCaptured", "ConvGhostLayer"]
