"""``nn.Embedding``: its per-sample gradient rule, and its ghost layer (norms from the output gradients of equal
tokens).

For example ``i`` with tokens ``x_t`` and output gradients ``G_i[t]``, the weight gradient adds ``G_i[t]`` to row
``x_t``, except at ``padding_idx``, whose row autograd leaves without gradient (Opacus's grad sampler adds it there).
So ``‖g_i‖² = Σ_{t,s: x_t = x_s} G_i[t]·G_i[s]``; the clipped sum scatters ``f_i G_i[t]`` into the rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_dp.engine.layer_rules.ghost_layer import GhostLayer, GhostRecord
from lightning_dp.engine.layer_rules.ghost_layer_registry import register_ghost_layer
from lightning_dp.engine.layer_rules.grad_sampler_registry import register_grad_sampler
from lightning_dp.engine.layer_rules.matmul import cat
from lightning_dp.engine.precision import bmm_f32


@register_grad_sampler(nn.Embedding)
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


@dataclass
class EmbeddingCaptured:
    """The calls of an embedding as one sequence of tokens per example."""

    idx: Tensor  #: ``(B, T)`` token indices
    g: Tensor  #: ``(B, T, d)`` output gradients (the layer's output dtype), zero at the padding index


@register_ghost_layer(nn.Embedding)
class EmbeddingGhostLayer(GhostLayer):
    """``nn.Embedding`` without ``sparse`` gradients or ``max_norm`` (which renormalises the weight in the
    forward).
    """

    @classmethod
    @override
    def supports(cls, module: nn.Module) -> bool:
        return not module.sparse and module.max_norm is None

    @override
    def collect(self, records: list[GhostRecord]) -> EmbeddingCaptured:
        grads = [r.grad for r in records if r.grad is not None]
        b = grads[0].shape[0]
        idx = cat([r.inputs[0].reshape(b, -1) for r in records], 1)
        g = cat([grad.reshape(b, -1, grad.shape[-1]) for grad in grads], 1)
        pad = self.module.padding_idx
        if pad is not None:  # the padding row gets no gradient (where, not a product: a NaN there is ignored too)
            g = torch.where((idx != pad).unsqueeze(-1), g, torch.zeros((), dtype=g.dtype, device=g.device))
        return EmbeddingCaptured(idx, g)

    @override
    def squared_norms(self, captured: EmbeddingCaptured) -> Tensor | None:
        if self.force_instantiate:
            return None
        idx, g = captured.idx, captured.g
        if self.trainable("weight") is None:
            return torch.zeros(idx.shape[0], device=g.device)
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).float()  # (B, T, T): tokens t and s update the same row
        return (bmm_f32(g, g.transpose(1, 2)) * same).sum((1, 2))

    @override
    def instantiate(self, captured: EmbeddingCaptured) -> dict[nn.Parameter, Tensor]:
        weight = self.trainable("weight")
        if weight is None:
            return {}
        idx, g = captured.idx, captured.g
        b, vocab, d = idx.shape[0], weight.shape[0], g.shape[-1]
        rows = (torch.arange(b, device=idx.device).unsqueeze(1) * vocab + idx).reshape(-1)
        gs = torch.zeros(b * vocab, d, device=g.device, dtype=torch.float32)
        return {weight: gs.index_add_(0, rows, g.reshape(-1, d).float()).view(b, *weight.shape)}

    @override
    def clipped_sum(self, captured: EmbeddingCaptured, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        weight = self.trainable("weight")
        if weight is None:
            return {}
        idx, g = captured.idx, captured.g
        d = g.shape[-1]
        summed = torch.zeros(weight.shape[0], d, device=g.device, dtype=torch.float32)
        return {weight: summed.index_add_(0, idx.reshape(-1), (g.float() * factors[:, None, None]).reshape(-1, d))}


__all__ = ["EmbeddingCaptured", "EmbeddingGhostLayer", "embedding_rule"]
