"""Layers whose weight gradient is a matrix product over a sequence: the ghost norm and book-keeping sums.

For activations ``A_i`` (``T × d``) and output gradients ``G_i`` (``T × p``) of example ``i``, the weight gradient
is ``g_i = G_iᵀ A_i``. Its squared norm is either the *ghost norm* ``‖g_i‖² = ⟨A_i A_iᵀ, G_i G_iᵀ⟩`` (cost
``O(T²(d+p))``) or computed from ``g_i`` instantiated (cost ``O(T·d·p)``), whichever is cheaper (ghost when
``2T² ≤ d·p``). The clipped sum is one contraction ``Σ_i f_i G_iᵀ A_i``, the cost of the ordinary weight gradient.
A bias gradient is ``Σ_t G_i[t]``. ``nn.Linear`` and convolutions (after unfolding) are such layers.

``A`` and ``G`` are kept in the dtype the layer computed in (bf16 under ``bf16-mixed``): every product is formed by
:mod:`lightning_dp.engine.precision` with exact products, fp32 accumulation and fp32 results (tensor cores on CUDA),
so no fp32 copy of them is held. Where the clip-scaled rows are rounded back to bf16 (CUDA), the layer reports the
rounding bound ``u · Σ_t ‖a_t‖·‖g_t‖`` per example (:meth:`MatmulGhostLayer.rounding_bound`), read off the
diagonals of the ghost norm's Gram matrices.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_dp.engine.layer_rules.ghost_layer import GhostLayer, GhostRecord
from lightning_dp.engine.precision import (
    bmm_f32,
    common,
    gram,
    mm_f32,
    rounds_scaled_rows,
    scale_rows,
    token_norms,
    unit_roundoff,
)

#: relative slack on a rounding bound for the fp32 arithmetic that computes it (sums of T terms)
_BOUND_SLACK = 1.0 + 2.0**-10


@dataclass
class MatmulCaptured:
    """The calls of a matrix-product layer as one sequence per example."""

    a: Tensor  #: ``(B, T, d)`` activations, in the dtype the layer computed in (bf16 under autocast) or fp32
    g: Tensor  #: ``(B, T, p)`` output gradients, in ``a``'s dtype
    bias: Tensor | None = None  #: ``(B, p)`` per-sample bias gradients, fp32, once computed
    spread: Tensor | None = None  #: ``(B,)`` ``Σ_t ‖a_t‖·‖g_t‖`` in fp32, once computed (the rounding bound's basis)


def cat(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` that does not copy a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def as_sequence(x: Tensor) -> Tensor:
    """``(B, ..., d)`` → ``(B, T, d)`` with ``T`` the product of the middle dimensions (1 for a 2-D input)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def ghost_squared_norms(a: Tensor, g: Tensor) -> Tensor:
    """Per-sample ``‖G_iᵀ A_i‖_F²`` from ``(B, T, d)`` and ``(B, T, p)`` without forming ``G_iᵀ A_i``; fp32."""
    a, g = common(a, g)
    if a.shape[1] == 1:
        return (token_norms(a)[:, 0] * token_norms(g)[:, 0]).pow(2)
    return _gram_product(gram(a), gram(g))


def _gram_product(aa: Tensor, gg: Tensor) -> Tensor:
    """``⟨AAᵀ, GGᵀ⟩`` per example, fp32."""
    b = aa.shape[0]
    return torch.bmm(aa.reshape(b, 1, -1), gg.reshape(b, -1, 1)).view(b)


def _diagonal_norms(gram: Tensor) -> Tensor:
    """Per-token norms ``(B, T)`` from a Gram matrix's diagonal."""
    return gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()


class MatmulGhostLayer(GhostLayer):
    """Base of the layers with a ``weight`` (gradient ``G_iᵀ A_i`` reshaped to the weight's shape) and an optional
    ``bias`` (gradient ``Σ_t G_i[t]``). A subclass implements :meth:`collect` only: its calls as
    :class:`MatmulCaptured` ``(A, G)`` (via :meth:`pair`), with ``d`` in the weight's flattening order
    (``weight.reshape(p, d)``).

    Under autocast the stored activations are in the autocast dtype (what the layer's matmul saw, as autograd
    saves them) and the output gradients in the layer's output dtype; both stay so. Norms and sums are formed with
    exact products and fp32 accumulation (:mod:`lightning_dp.engine.precision`); a bf16 *output* (e.g. of
    ``bmm(a, aᵀ)`` in bf16) would round norms and sums to 8 bits and break the ≤ C bound.
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
    def pair(a: Tensor, g: Tensor) -> MatmulCaptured:
        """The captured pair in one dtype: as given when ``a`` and ``g`` agree (bf16 under autocast; no copy),
        else both in fp32.
        """
        a, g = common(a, g)
        return MatmulCaptured(a, g)

    #: the former name of :meth:`pair` (it no longer upcasts a low-precision pair: products are exact anyway)
    to_fp32 = pair

    @override
    def squared_norms(self, captured: MatmulCaptured) -> Tensor | None:
        a, g = captured.a, captured.g
        b, t, d, p = a.shape[0], a.shape[1], a.shape[2], g.shape[2]
        if self.force_instantiate or 2 * t * t > d * p:
            return None
        weight, bias = self.trainable("weight"), self.trainable("bias")
        sq = torch.zeros(b, device=g.device, dtype=torch.float32)
        if weight is not None:
            if t == 1:
                spread = token_norms(a)[:, 0] * token_norms(g)[:, 0]
                sq += spread.pow(2)
            else:
                aa, gg = gram(a), gram(g)
                sq += _gram_product(aa, gg)
                spread = (_diagonal_norms(aa) * _diagonal_norms(gg)).sum(1) if self._rounds(captured) else None
                del aa, gg
            captured.spread = spread
        if bias is not None:
            captured.bias = g.sum(1, dtype=torch.float32)
            sq += captured.bias.pow(2).sum(1)
        return sq

    @override
    def instantiate(self, captured: MatmulCaptured) -> dict[nn.Parameter, Tensor]:
        a, g = captured.a, captured.g
        weight, bias = self.trainable("weight"), self.trainable("bias")
        out: dict[nn.Parameter, Tensor] = {}
        if weight is not None:
            out[weight] = bmm_f32(g.transpose(1, 2), a).reshape(a.shape[0], *weight.shape)
        if bias is not None:
            out[bias] = captured.bias if captured.bias is not None else g.sum(1, dtype=torch.float32)
        return out

    def _scales_g(self, captured: MatmulCaptured) -> bool:
        """Whether the clipped sum scales ``G``'s rows (the smaller side) rather than ``A``'s."""
        return captured.g.shape[2] <= captured.a.shape[2]

    def _rounds(self, captured: MatmulCaptured) -> bool:
        return rounds_scaled_rows(captured.g if self._scales_g(captured) else captured.a)

    @override
    def rounding_bound(self, captured: MatmulCaptured) -> Tensor | None:
        """``u · Σ_t ‖a_t‖·‖g_t‖`` per example when the clip-scaled side is rounded to low precision (else None).

        With ``E_i`` the rounding error of the scaled rows (``|E_i| ≤ u·f_i·|G_i|`` entrywise, round to nearest),
        ``‖E_iᵀ A_i‖_F ≤ Σ_t ‖e_t‖·‖a_t‖ ≤ u·f_i·Σ_t ‖g_t‖·‖a_t‖`` (the same with the roles swapped when ``A``
        is scaled), so the scaled contribution is at most ``f_i·(‖g_i‖ + bound_i)``.
        """
        if self.trainable("weight") is None or not self._rounds(captured):
            return None
        if captured.spread is None:
            captured.spread = (token_norms(captured.a) * token_norms(captured.g)).sum(1)
        side = captured.g if self._scales_g(captured) else captured.a
        u = unit_roundoff(side.dtype) + 2.0**-23  # rounding to the low dtype, after fp32's rounding of the product
        return captured.spread * (u * _BOUND_SLACK)

    @override
    def clipped_sum(self, captured: MatmulCaptured, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        a, g = captured.a, captured.g
        weight, bias = self.trainable("weight"), self.trainable("bias")
        out: dict[nn.Parameter, Tensor] = {}
        if weight is not None:
            d, p = a.shape[2], g.shape[2]
            if self._scales_g(captured):
                w = mm_f32(scale_rows(g, factors).reshape(-1, p).t(), a.reshape(-1, d))
            else:
                w = mm_f32(g.reshape(-1, p).t(), scale_rows(a, factors).reshape(-1, d))
            out[weight] = w.reshape(weight.shape)
        if bias is not None:
            per_sample = captured.bias if captured.bias is not None else g.sum(1, dtype=torch.float32)
            out[bias] = factors.to(torch.float32) @ per_sample
        return out


__all__ = ["MatmulCaptured", "MatmulGhostLayer", "as_sequence", "cat", "ghost_squared_norms"]
