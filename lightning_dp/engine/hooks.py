"""The per-sample gradient engine: layer hooks, flat per-sample clipping and the clipped sum.

Why not Opacus's ``GradSampleModule``: it wraps the model (breaking Lightning's module identity), treats modules
with raw parameters (timm ViT) as one functorch unit, and leaves clipping to its optimizer, which all-reduces per
parameter under DDP. Here one object owns per-sample gradients, their norms and the clipped sum, and plugs into the
strategy's single clip → all-reduce → noise path. Opacus's grad samplers are reused as per-layer rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_dp.clipping import ClippingMode, clip_factors
from lightning_dp.engine.base import ClippingEngine
from lightning_dp.engine.layers import (
    check_sums_against_autograd,
    per_sample_broadcast,
    plan_layers,
)
from lightning_dp.engine.rules import GradSampleRule, find_rule
from lightning_dp.errors import DPMisconfigurationError


class HookEngine(ClippingEngine):
    """Materialised per-sample gradients (like Opacus hooks): each hooked layer's rule turns its activations and
    output gradients into per-sample gradients in fp32, which are clipped and summed. Used as described in
    :class:`~lightning_dp.engine.ClippingEngine`; also exposes :meth:`per_sample_gradients`.

    Args:
        module: the model whose trainable parameters get per-sample gradients.
        loss_reduction: ``"mean"`` if the loss averages per-sample losses over the micro-batch (per-sample
            gradients are then rescaled by ``b``), ``"sum"`` if it sums them.

    Raises:
        UnsupportedLayerError: if a trainable parameter belongs to a layer without a per-sample rule.
        DPMisconfigurationError: if the module has no trainable parameter.
    """

    def __init__(self, module: nn.Module, loss_reduction: Literal["mean", "sum"] = "mean") -> None:
        self._grad_samples: dict[nn.Parameter, Tensor] = {}
        super().__init__(module, loss_reduction)

    # ------------------------------------------------------------------ planning
    def _plan(self) -> None:
        layers, self._broadcast = plan_layers(self.module, lambda mod: find_rule(mod) is not None)
        self._layers = [(name, mod, find_rule(mod)) for name, mod in layers]  # type: ignore[misc]

    @property
    def layer_names(self) -> list[str]:
        """Names of the hooked layers (for diagnostics)."""
        return [n for n, _, _ in self._layers]

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for _, mod, rule in self._layers:
            self._handles.append(mod.register_forward_hook(self._make_forward_hook(rule)))

    def _make_forward_hook(self, rule: GradSampleRule) -> Any:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self._should_capture(mod, output):
                return
            if not output.requires_grad:
                return
            activations = [x.detach() if isinstance(x, Tensor) else x for x in inputs]
            output.register_hook(lambda grad: self._on_backprop(mod, rule, activations, grad))

        return hook

    def _on_backprop(self, mod: nn.Module, rule: GradSampleRule, activations: list[Any], grad: Tensor) -> None:
        b = self._batch_size
        if grad.shape[0] != b:
            raise DPMisconfigurationError(
                f"Layer {type(mod).__name__} saw a batch dimension of {grad.shape[0]} but the micro-batch has {b}"
                " examples. Per-sample gradients need every layer's first dimension to index the examples (do not"
                " fold sequence or crop dimensions into the batch)."
            )
        acts = [a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in activations]
        grad_samples = rule(mod, acts, grad.float())
        for p, gs in grad_samples.items():
            if not p.requires_grad:
                continue
            prev = self._grad_samples.get(p)
            self._grad_samples[p] = gs if prev is None else prev + gs

    # ------------------------------------------------------------------ capture
    @contextmanager
    def capture(self, batch_size: int) -> Iterator[None]:
        """Capture per-sample gradients of one micro-batch: run its forward *and* backward inside.

        Args:
            batch_size: the number of examples of the micro-batch.
        """
        self._begin_capture(batch_size)
        self._grad_samples = {}
        broadcast_grads: dict[nn.Parameter, Tensor] = {}
        self._capturing = True
        try:
            with per_sample_broadcast(self._broadcast, batch_size, broadcast_grads):
                yield
        finally:
            self._capturing = False
            self._grad_samples.update(broadcast_grads)

    # ------------------------------------------------------------------ clipping
    def _check_against_autograd(self) -> None:
        """Compare Σ_i g_i with autograd's ``p.grad`` (see :func:`check_sums_against_autograd`)."""
        totals = {p: gs.sum(0) for p, gs in self._grad_samples.items()}
        check_sums_against_autograd(self.params, totals, self.param_names)

    def per_sample_gradients(self) -> dict[nn.Parameter, Tensor]:
        """The captured per-sample gradients of the last micro-batch, shape ``(b, *p.shape)``, fp32, before
        clipping (parameters the micro-batch did not touch are absent). Valid until :meth:`clip_and_accumulate`.
        """
        scale = self._scale()
        return {p: gs * scale for p, gs in self._grad_samples.items()}

    def _clip_and_accumulate(self, max_grad_norm: float, clipping: ClippingMode, stability: float) -> Tensor:
        scale = self._scale()
        if self.check_against_autograd:
            self._check_against_autograd()
            self.check_against_autograd = False  # once per run: it costs an extra pass over per-sample gradients
        self._apply_masks(self._grad_samples)
        b = self._batch_size
        device = self.params[0].device
        sq = torch.zeros(b, device=device, dtype=torch.float32)
        for gs in self._grad_samples.values():
            sq += gs.reshape(b, -1).pow(2).sum(1) * scale**2
        norms = sq.sqrt()
        factors = clip_factors(norms, max_grad_norm, clipping, stability) * scale
        for p, gs in self._grad_samples.items():
            clipped = torch.einsum("i,i...->...", factors, gs)
            acc = self._summed.get(p)
            self._summed[p] = clipped if acc is None else acc + clipped
        self._grad_samples = {}
        for p in self.params:
            p.grad = None
        return norms
