"""Layers whose weight gradient is a matrix product over a sequence: the ghost norm and book-keeping sums.

For activations ``A_i`` (``T × d``) and output gradients ``G_i`` (``T × p``) of example ``i``, the weight gradient
is ``g_i = G_iᵀ A_i``. Its squared norm is either the *ghost norm* ``‖g_i‖² = ⟨A_i A_iᵀ, G_i G_iᵀ⟩`` (cost
``O(T²(d+p))``) or computed from ``g_i`` instantiated (cost ``O(T·d·p)``), whichever is cheaper (ghost when
``2T² ≤ d·p``). The clipped sum is one contraction ``Σ_i f_i G_iᵀ A_i``, the cost of the ordinary weight gradient.
A bias gradient is ``Σ_t G_i[t]``. ``nn.Linear`` and convolutions (after unfolding) are such layers.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_dp.engine.ghost_layers.base import GhostLayer, GhostRecord


@dataclass
class MatmulCaptured:
    """The calls of a matrix-product layer as one sequence per example."""

    a: Tensor  #: ``(B, T, d)`` activations, fp32
    g: Tensor  #: ``(B, T, p)`` output gradients, fp32


def cat(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` that does not copy a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def as_sequence(x: Tensor) -> Tensor:
    """``(B, ..., d)`` → ``(B, T, d)`` with ``T`` the product of the middle dimensions (1 for a 2-D input)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def ghost_squared_norms(a: Tensor, g: Tensor) -> Tensor:
    """Per-sample ``‖G_iᵀ A_i‖_F²`` from ``(B, T, d)`` and ``(B, T, p)`` without forming ``G_iᵀ A_i``; fp32."""
    if a.shape[1] == 1:
        return a.float().pow(2).sum((1, 2)) * g.float().pow(2).sum((1, 2))
    aa = torch.bmm(a, a.transpose(1, 2)).float()
    gg = torch.bmm(g, g.transpose(1, 2)).float()
    return (aa * gg).sum((1, 2))


class MatmulGhostLayer(GhostLayer):
    """Base of the layers with a ``weight`` (gradient ``G_iᵀ A_i`` reshaped to the weight's shape) and an optional
    ``bias`` (gradient ``Σ_t G_i[t]``). A subclass implements :meth:`collect` only: its calls as
    :class:`MatmulCaptured` ``(A, G)``, with ``d`` in the weight's flattening order (``weight.reshape(p, d)``).

    Under autocast the stored activations are in the autocast dtype (what the layer's matmul saw, as autograd
    would save them); :func:`to_fp32` brings both to fp32: a product of two bf16 values is exact in fp32, but a bf16
    *output* (e.g. of ``bmm(a, aᵀ)``) would round norms and sums to 8 bits and break the ≤ C bound.
    """

    @override
    def keep_inputs(self, inputs: tuple[Any, ...]) -> list[Any]:
        x = inputs[0].detach()
        device = x.device.type
        if x.is_floating_point() and torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        return [x]

    @abstractmethod
    @override
    def collect(self, records: list[GhostRecord]) -> MatmulCaptured: ...

    @staticmethod
    def to_fp32(a: Tensor, g: Tensor) -> MatmulCaptured:
        """The captured pair in fp32 (see the class docstring)."""
        return MatmulCaptured(a.float(), g.float())

    @override
    def squared_norms(self, captured: MatmulCaptured) -> Tensor | None:
        a, g = captured.a, captured.g
        b, t, d, p = a.shape[0], a.shape[1], a.shape[2], g.shape[2]
        if self.force_instantiate or 2 * t * t > d * p:
            return None
        weight, bias = self.trainable("weight"), self.trainable("bias")
        sq = torch.zeros(b, device=g.device, dtype=torch.float32)
        if weight is not None:
            sq += ghost_squared_norms(a, g)
        if bias is not None:
            sq += g.sum(1, dtype=torch.float32).pow(2).sum(1)
        return sq

    @override
    def instantiate(self, captured: MatmulCaptured) -> dict[nn.Parameter, Tensor]:
        a, g = captured.a, captured.g
        weight, bias = self.trainable("weight"), self.trainable("bias")
        out: dict[nn.Parameter, Tensor] = {}
        if weight is not None:
            out[weight] = torch.einsum("btp,btd->bpd", g, a).float().reshape(a.shape[0], *weight.shape)
        if bias is not None:
            out[bias] = g.sum(1, dtype=torch.float32)
        return out

    @override
    def clipped_sum(self, captured: MatmulCaptured, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        a, g = captured.a, captured.g
        weight, bias = self.trainable("weight"), self.trainable("bias")
        out: dict[nn.Parameter, Tensor] = {}
        scaled = g * factors.to(g.dtype)[:, None, None]
        if weight is not None:
            w = scaled.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
            out[weight] = w.float().reshape(weight.shape)
        if bias is not None:
            out[bias] = torch.einsum("b,bp->p", factors, g.sum(1, dtype=torch.float32))
        return out


__all__ = ["MatmulCaptured", "MatmulGhostLayer", "as_sequence", "cat", "ghost_squared_norms"]
