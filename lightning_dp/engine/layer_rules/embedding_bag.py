"""``nn.EmbeddingBag``: its per-sample gradient rule and its ghost layer (per-bag norms from the coefficients of
each token, the clipped sum by scattering).

Each bag is one example, its weight gradient adds ``c_t · g_i`` to row ``x_t`` for every token ``t`` of the bag
(``c_t`` = 1, the per-sample weight, or ``1/n`` for ``mode="mean"``).

Both input forms are handled: 2-D ``(B, L)`` (one bag per row) and 1-D tokens with ``offsets`` (``B`` bags, with or
without ``include_last_offset``); tokens equal to ``padding_idx`` are not part of their bag (as in the forward).
Repeated tokens of a bag add up in their row: the squared norm of example ``i`` is ``‖g_i‖² Σ_v C_{iv}²`` with
``C_{iv}`` the summed coefficient of token ``v`` in bag ``i``. ``mode="max"`` routes each coordinate to one token and
is left to the ``torch.func`` fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_dp.engine.contributions import zero_examples_of
from lightning_dp.engine.layer_rules.ghost_layer import GhostLayer, GhostRecord
from lightning_dp.engine.layer_rules.ghost_layer_registry import register_ghost_layer
from lightning_dp.engine.layer_rules.grad_sampler_registry import register_grad_sampler


@dataclass
class BagTokens:
    """The tokens of a call, flattened: ``idx`` ``(T,)`` rows, ``bag`` ``(T,)`` example of each, ``coef`` ``(T,)``
    fp32 coefficient (0 for padding), and ``b`` the number of bags.
    """

    idx: Tensor
    bag: Tensor
    coef: Tensor
    b: int


def supports_bag(module: nn.Module) -> bool:
    """The configurations handled here: ``mode`` ``"sum"`` or ``"mean"``, dense gradients, no ``max_norm``."""
    return module.mode in ("sum", "mean") and not module.sparse and module.max_norm is None


def bag_tokens(module: nn.Module, inputs: list) -> BagTokens:
    """The bags of one call ``module(input, offsets=None, per_sample_weights=None)``."""
    x = inputs[0]
    offsets = inputs[1] if len(inputs) > 1 else None
    weights = inputs[2] if len(inputs) > 2 else None
    device = x.device
    if x.dim() == 2:
        b, length = x.shape
        idx = x.reshape(-1)
        bag = torch.arange(b, device=device).repeat_interleave(length)
    else:
        if offsets is None:
            raise ValueError("nn.EmbeddingBag with a 1-D input needs offsets")
        starts = offsets[:-1] if module.include_last_offset else offsets
        b = starts.shape[0]
        idx = x
        bag = torch.bucketize(torch.arange(x.shape[0], device=device), starts, right=True) - 1
    coef = torch.ones(idx.shape[0], device=device, dtype=torch.float32)
    if weights is not None:
        coef = weights.reshape(-1).float()
    if module.padding_idx is not None:
        coef = torch.where(idx != module.padding_idx, coef, torch.zeros((), device=device))
    if module.mode == "mean":
        present = (idx != module.padding_idx).float() if module.padding_idx is not None else torch.ones_like(coef)
        counts = torch.zeros(b, device=device).index_add_(0, bag, present)
        coef = coef / counts.clamp(min=1)[bag]
    return BagTokens(idx, bag, coef, b)


def bag_squared_norms(tokens: BagTokens, grad: Tensor, vocab: int) -> Tensor:
    """Per-bag ``‖g_i‖² Σ_v C_{iv}²`` (fp32), repeated tokens summed before squaring."""
    key = tokens.bag * vocab + tokens.idx
    unique, inverse = torch.unique(key, return_inverse=True)
    mass = torch.zeros(unique.shape[0], device=grad.device).index_add_(0, inverse, tokens.coef)
    per_bag = torch.zeros(tokens.b, device=grad.device).index_add_(0, unique // vocab, mass.pow(2))
    return per_bag * grad.float().pow(2).sum(1)


def bag_per_sample(tokens: BagTokens, grad: Tensor, vocab: int) -> Tensor:
    """Per-bag weight gradients ``(B, vocab, d)`` (fp32)."""
    d = grad.shape[1]
    rows = tokens.bag * vocab + tokens.idx
    gs = torch.zeros(tokens.b * vocab, d, device=grad.device, dtype=torch.float32)
    gs.index_add_(0, rows, tokens.coef[:, None] * grad.float()[tokens.bag])
    return gs.view(tokens.b, vocab, d)


def bag_clipped_sum(tokens: BagTokens, grad: Tensor, factors: Tensor, vocab: int) -> Tensor:
    """``Σ_i f_i g_i`` ``(vocab, d)`` without per-sample gradients."""
    scaled = (factors[:, None] * grad.float())[tokens.bag] * tokens.coef[:, None]
    return torch.zeros(vocab, grad.shape[1], device=grad.device).index_add_(0, tokens.idx, scaled)


@register_grad_sampler(nn.EmbeddingBag, supports=supports_bag)
def embedding_bag_rule(layer: nn.Module, activations: list, backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient of ``nn.EmbeddingBag``'s weight (both input forms, repeated tokens, padding)."""
    if not layer.weight.requires_grad:
        return {}
    tokens = bag_tokens(layer, activations)
    return {layer.weight: bag_per_sample(tokens, backprops, layer.num_embeddings)}


@dataclass
class BagCaptured:
    """The calls of an embedding bag, each with its bags and output gradient."""

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


__all__ = [
    "BagCaptured",
    "BagTokens",
    "EmbeddingBagGhostLayer",
    "bag_clipped_sum",
    "bag_per_sample",
    "bag_squared_norms",
    "bag_tokens",
    "embedding_bag_rule",
    "supports_bag",
]
