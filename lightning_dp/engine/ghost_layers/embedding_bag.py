"""``nn.EmbeddingBag`` in the ghost engine: per-bag norms from the coefficients of each token, the clipped sum by
scattering (see :mod:`lightning_dp.engine.embedding_bag`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_dp.engine.contributions import zero_examples_of
from lightning_dp.engine.embedding_bag import (
    BagTokens,
    bag_clipped_sum,
    bag_per_sample,
    bag_squared_norms,
    bag_tokens,
    supports_bag,
)
from lightning_dp.engine.ghost_layers.base import GhostLayer, GhostRecord, register_ghost_layer


@dataclass
class BagCaptured:
    calls: list[tuple[BagTokens, Tensor]]  #: per call, its bags and output gradient ``(B, d)`` fp32


@register_ghost_layer(nn.EmbeddingBag)
class EmbeddingBagGhostLayer(GhostLayer):
    """``nn.EmbeddingBag`` with ``mode`` ``"sum"`` or ``"mean"`` (``"max"`` is left to the fallback)."""

    @classmethod
    @override
    def supports(cls, module: nn.Module) -> bool:
        return supports_bag(module)

    @override
    def collect(self, records: list[GhostRecord]) -> BagCaptured:
        calls = []
        for r in records:
            assert r.grad is not None
            calls.append((bag_tokens(self.module, r.inputs), r.grad.float()))
        return BagCaptured(calls)

    @override
    def squared_norms(self, captured: BagCaptured) -> Tensor | None:
        if self.force_instantiate or len(captured.calls) > 1:  # several calls: their gradients add before the norm
            return None
        if self.trainable("weight") is None:
            return torch.zeros(captured.calls[0][1].shape[0], device=captured.calls[0][1].device)
        tokens, grad = captured.calls[0]
        return bag_squared_norms(tokens, grad, self.module.num_embeddings)

    @override
    def instantiate(self, captured: BagCaptured) -> dict[nn.Parameter, Tensor]:
        weight = self.trainable("weight")
        if weight is None:
            return {}
        total = None
        for tokens, grad in captured.calls:
            part = bag_per_sample(tokens, grad, self.module.num_embeddings)
            total = part if total is None else total + part
        assert total is not None
        return {weight: total}

    @override
    def clipped_sum(self, captured: BagCaptured, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        weight = self.trainable("weight")
        if weight is None:
            return {}
        total = None
        for tokens, grad in captured.calls:
            part = bag_clipped_sum(tokens, grad, factors, self.module.num_embeddings)
            total = part if total is None else total + part
        assert total is not None
        return {weight: total}

    @override
    def zero_examples(self, captured: BagCaptured, keep: Tensor) -> BagCaptured:
        return BagCaptured([(tokens, zero_examples_of(grad, keep)) for tokens, grad in captured.calls])


__all__ = ["EmbeddingBagGhostLayer"]
