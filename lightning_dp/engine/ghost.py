"""The book-keeping engine: per-sample norms by ghost norms, the clipped sum without per-sample weight gradients.

Method (Bu et al., "book-keeping"): one backward pass stores, per hooked layer, its input activations ``A`` and
output gradients ``G``. Then per layer the per-sample squared gradient norms come either from the *ghost norm*
(for a linear map on a sequence, ``‖g_i‖² = Σ_{t,s} (a_t·a_s)(b_t·b_s) = ⟨A_i A_iᵀ, G_i G_iᵀ⟩``, cost ``O(T²(d+p))``
per example) or from per-sample instantiation (``g_i = G_iᵀ A_i``, cost ``O(T·d·p)``), whichever is cheaper
(ghost when ``2T² ≤ d·p``). Their sum over layers gives the norms and the clip factors ``f_i``; the clipped sum is
then one contraction per layer, ``Σ_i f_i G_iᵀ A_i``, the same cost as the ordinary weight gradient.

Why our own instead of Opacus's ghost clipping (``GradSampleModuleFastGradientClipping``): Opacus runs two backward
passes (norms first, then a re-weighted loss), wraps the model (breaking Lightning's module identity), and cannot
handle the raw ``cls_token`` / ``pos_embed`` parameters of timm ViTs per layer (it falls back to instantiating the
whole model's per-sample gradients with functorch, losing the memory saving). Here one backward pass suffices, the
model is hooked in place, and raw broadcast parameters are covered as in :class:`~lightning_dp.engine.HookEngine`.

Because the engine forms the weight gradients itself, autograd's own weight gradients would be wasted work: after
the first micro-batch (which autograd computes in full to check that every parameter's use is visible to the
hooks), the engine switches the trainable parameters' ``requires_grad`` off during each captured forward and
backward, so autograd only propagates activation gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info
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

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _own_rule_types() -> tuple[type[nn.Module], ...]:
    """Layers with few parameters per channel, for which our own registry rules (instantiation) are the method."""
    types: list[type[nn.Module]] = [nn.LayerNorm]
    try:
        import timm.layers as tl
    except ImportError:  # pragma: no cover - timm is a dependency
        return tuple(types)
    return (*types, tl.LayerNorm, tl.LayerScale)


def _method(mod: nn.Module) -> str | None:
    """How the engine handles ``mod``: ``"linear"``, ``"conv2d"``, ``"embedding"``, ``"rule"`` or None."""
    t = type(mod)  # exact types, as the registry: a subclass may change the forward
    if t is nn.Linear:
        return "linear"
    if t is nn.Conv2d and mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
        return "conv2d"
    if t is nn.Embedding and not mod.sparse and mod.max_norm is None:
        return "embedding"
    return "rule" if find_rule(mod) is not None else None


@dataclass
class _Layer:
    name: str
    module: nn.Module
    method: str
    rule: GradSampleRule | None
    instantiate: bool = False  # forced per-sample instantiation (a parameter shared with another layer)


@dataclass
class _Record:
    """One call of a layer during the captured forward: its inputs, and its output gradient once backward ran."""

    inputs: list[Any]
    grad: Tensor | None = None


@dataclass
class _Captured:
    """What a layer contributes to one micro-batch after the norm pass."""

    layer: _Layer
    a: Tensor | None = None  # (B, T, d) activations (or (B, T) indices for an embedding)
    g: Tensor | None = None  # (B, T, p) output gradients
    per_sample: dict[nn.Parameter, Tensor] = field(default_factory=dict)  # instantiated per-sample gradients


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` that does not copy a single part."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _as_sequence(x: Tensor) -> Tensor:
    """``(B, ..., d)`` → ``(B, T, d)`` with ``T`` the product of the middle dimensions (1 for a 2-D input)."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _compute_dtypes(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Both in fp32. Under autocast they arrive in bf16/fp16; a product of two such values is exact in fp32, but a
    bf16 *output* (e.g. of ``bmm(a, aᵀ)``) would round norms and sums to 8 bits and break the ≤ C bound.
    """
    return a.float(), g.float()


def _ghost_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """Per-sample ``‖G_iᵀ A_i‖_F²`` from ``(B, T, d)`` and ``(B, T, p)`` without forming ``G_iᵀ A_i``; fp32."""
    if a.shape[1] == 1:
        return a.float().pow(2).sum((1, 2)) * g.float().pow(2).sum((1, 2))
    aa = torch.bmm(a, a.transpose(1, 2)).float()
    gg = torch.bmm(g, g.transpose(1, 2)).float()
    return (aa * gg).sum((1, 2))


class GhostEngine(ClippingEngine):
    """Per-sample clipping by book-keeping: ghost norms, one backward pass, no per-sample weight gradients.

    Used as described in :class:`~lightning_dp.engine.ClippingEngine`.

    Natively handled: ``nn.Linear`` (any input rank), ``nn.Conv2d`` (``groups=1``, zero padding; via unfold it is a
    linear map on ``(B, L, C·k·k)``), ``nn.Embedding``, LayerNorm (``nn`` and ``timm``) and ``timm`` LayerScale (whose
    per-sample gradients are as small as their parameters), and broadcast parameters (timm ViT's ``cls_token``,
    ``reg_token``, ``pos_embed``). Other layers with a rule in :mod:`lightning_dp.engine.rules` (ours or Opacus's)
    fall back to per-sample instantiation with that rule, announced once when the engine is built.

    Under autocast, the activations of linear and convolution layers are stored in the autocast dtype (as autograd
    would save them); norms and clipped sums are computed from them in fp32 without TF32, so that rounding cannot
    let a clipped example exceed C.

    Args:
        module: the model whose trainable parameters get clipped per sample.
        loss_reduction: ``"mean"`` if the loss averages per-sample losses over the micro-batch (per-sample
            gradients are then rescaled by ``b``), ``"sum"`` if it sums them.

    Attributes:
        check_against_autograd: on the next micro-batch, let autograd compute the parameters' gradients too and
            check that the engine's sums match them (once per run; it is reset after the check).
        skip_param_grads: when not checking, switch the trainable parameters' ``requires_grad`` off during the
            captured forward and backward, so that autograd does not compute gradients the engine forms itself.
        last_methods: per hooked layer name, how its norms were computed on the last micro-batch
            (``"ghost"``, ``"instantiate"`` or ``"rule"``).

    Raises:
        UnsupportedLayerError: if a trainable parameter belongs to a layer without a per-sample method.
        DPMisconfigurationError: if the module has no trainable parameter.
    """

    def __init__(self, module: nn.Module, loss_reduction: Literal["mean", "sum"] = "mean") -> None:
        super().__init__(module, loss_reduction)
        self._records: dict[int, list[_Record]] = {}
        self._broadcast_grads: dict[nn.Parameter, Tensor] = {}
        self._switched_off: set[nn.Parameter] = set()
        self._anchor: Tensor | None = None
        self.skip_param_grads = True
        self.last_methods: dict[str, str] = {}

    # ------------------------------------------------------------------ planning
    def _plan(self) -> None:
        layers, self._broadcast = plan_layers(self.module, lambda mod: _method(mod) is not None)
        owners: dict[nn.Parameter, int] = {}
        for _, mod in layers:
            for p in mod._parameters.values():
                if p is not None:
                    owners[p] = owners.get(p, 0) + 1
        own_rules = _own_rule_types()
        fallback: list[str] = []
        for name, mod in layers:
            method = _method(mod)
            assert method is not None
            rule = find_rule(mod) if method == "rule" else None
            shared = any(owners.get(p, 0) > 1 for p in mod._parameters.values() if p is not None)
            self._layers.append(_Layer(name, mod, method, rule, instantiate=shared))
            if method == "rule" and type(mod) not in own_rules:
                qualname = f"{type(mod).__module__}.{type(mod).__qualname__}"
                if qualname not in fallback:
                    fallback.append(qualname)
        if fallback:
            rank_zero_info(
                f"lightning_dp: GhostEngine has no ghost norm for {', '.join(fallback)}; the per-sample gradients of"
                " these layers are instantiated with their registered rules (more time and memory than ghost norms)."
            )

    @property
    def layer_names(self) -> list[str]:
        """Names of the hooked layers (for diagnostics)."""
        return [layer.name for layer in self._layers]

    def set_grad_masks(self, masks: dict[nn.Parameter, Tensor]) -> None:
        """As :meth:`ClippingEngine.set_grad_masks`; layers owning a masked parameter switch to per-sample
        instantiation (a ghost norm cannot drop coordinates).
        """
        super().set_grad_masks(masks)
        for layer in self._layers:
            if any(p in self.grad_masks for p in layer.module._parameters.values() if p is not None):
                layer.instantiate = True

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for index, layer in enumerate(self._layers):
            self._handles.append(layer.module.register_forward_hook(self._make_forward_hook(index, layer)))

    def _make_forward_hook(self, index: int, layer: _Layer) -> Any:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
            if not self._should_capture(mod, output):
                return None
            replaced = None
            if not output.requires_grad:
                if not any(p in self._switched_off for p in mod._parameters.values() if p is not None):
                    return None  # frozen here: nothing to clip
                # Its parameters' requires_grad is switched off and its input needs no gradient (e.g. the first
                # layer): add a zero that requires grad so that the output gradient still reaches the hook.
                assert self._anchor is not None
                output = replaced = output + self._anchor
            record = _Record(self._keep_inputs(layer, inputs))
            self._records.setdefault(index, []).append(record)
            output.register_hook(lambda grad: self._on_backprop(mod, record, grad))
            return replaced

        return hook

    @staticmethod
    def _keep_inputs(layer: _Layer, inputs: tuple[Any, ...]) -> list[Any]:
        if layer.method in ("linear", "conv2d"):
            x = inputs[0].detach()
            device = x.device.type
            if x.is_floating_point() and torch.is_autocast_enabled(device):
                x = x.to(torch.get_autocast_dtype(device))  # what the layer's matmul saw
            return [x]
        return [x.detach() if isinstance(x, Tensor) else x for x in inputs]

    def _on_backprop(self, mod: nn.Module, record: _Record, grad: Tensor) -> None:
        b = self._batch_size
        if grad.shape[0] != b:
            raise DPMisconfigurationError(
                f"Layer {type(mod).__name__} saw a batch dimension of {grad.shape[0]} but the micro-batch has {b}"
                " examples. Per-sample gradients need every layer's first dimension to index the examples (do not"
                " fold sequence or crop dimensions into the batch)."
            )
        record.grad = grad if record.grad is None else record.grad + grad

    # ------------------------------------------------------------------ capture
    @contextmanager
    def capture(self, batch_size: int) -> Iterator[None]:
        """Capture activations and output gradients of one micro-batch: run its forward *and* backward inside.

        Args:
            batch_size: the number of examples of the micro-batch.
        """
        self._begin_capture(batch_size)
        self._records = {}
        self._broadcast_grads = {}
        if self.skip_param_grads and not self.check_against_autograd:
            self._switched_off = {p for p in self.params if p.requires_grad}
            self._anchor = torch.zeros((), device=self.params[0].device, requires_grad=True)
        for p in self._switched_off:
            p.requires_grad_(False)
        self._capturing = True
        try:
            with per_sample_broadcast(self._broadcast, batch_size, self._broadcast_grads):
                yield
        finally:
            self._capturing = False
            for p in self._switched_off:
                p.requires_grad_(True)
            self._switched_off = set()
            self._anchor = None

    # ------------------------------------------------------------------ norms
    def _collect(self, layer: _Layer, records: list[_Record]) -> _Captured:
        """Bring a layer's calls into one ``(A, G)`` pair (calls concatenated along the sequence)."""
        mod = layer.module
        b = self._batch_size
        if layer.method == "linear":
            a = _cat([_as_sequence(r.inputs[0]) for r in records], 1)
            g = _cat([_as_sequence(r.grad) for r in records], 1)  # type: ignore[arg-type]
            return _Captured(layer, *_compute_dtypes(a, g))
        if layer.method == "conv2d":
            a_parts, g_parts = [], []
            for r in records:
                x = r.inputs[0]
                cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
                a_parts.append(cols.transpose(1, 2))  # (B, L, C·kh·kw), the weight's flattening order
                g_parts.append(r.grad.reshape(b, r.grad.shape[1], -1).transpose(1, 2))  # type: ignore[union-attr]
            a, g = _cat(a_parts, 1), _cat(g_parts, 1)
            return _Captured(layer, *_compute_dtypes(a, g))
        if layer.method == "embedding":
            idx = _cat([r.inputs[0].reshape(b, -1) for r in records], 1)
            g = _cat([r.grad.reshape(b, -1, r.grad.shape[-1]) for r in records], 1).float()  # type: ignore
            if mod.padding_idx is not None:  # the padding row gets no gradient
                g = g * (idx != mod.padding_idx).unsqueeze(-1)
            return _Captured(layer, idx, g)
        assert layer.rule is not None
        captured = _Captured(layer)
        for r in records:
            acts = [x.float() if isinstance(x, Tensor) and x.is_floating_point() else x for x in r.inputs]
            for p, gs in layer.rule(mod, acts, r.grad.float()).items():  # type: ignore[union-attr]
                if p.requires_grad:
                    prev = captured.per_sample.get(p)
                    captured.per_sample[p] = gs if prev is None else prev + gs
        return captured

    def _weight_and_bias(self, layer: _Layer) -> tuple[nn.Parameter | None, nn.Parameter | None]:
        mod = layer.module
        weight = mod.weight if mod.weight is not None and mod.weight.requires_grad else None
        bias = getattr(mod, "bias", None)
        return weight, (bias if bias is not None and bias.requires_grad else None)

    def _norm_pass(self, c: _Captured) -> Tensor | None:
        """Per-sample squared norm of a ghost layer (fp32), or None after instantiating its per-sample gradients."""
        layer = c.layer
        if layer.method == "rule":
            self.last_methods[layer.name] = "rule"
            return None
        weight, bias = self._weight_and_bias(layer)
        a, g = c.a, c.g
        assert a is not None and g is not None
        b = self._batch_size
        if layer.method == "embedding":
            if layer.instantiate:
                if weight is not None:
                    vocab = weight.shape[0]
                    rows = (torch.arange(b, device=a.device).unsqueeze(1) * vocab + a).reshape(-1)
                    gs = torch.zeros(b * vocab, g.shape[-1], device=g.device, dtype=torch.float32)
                    c.per_sample[weight] = gs.index_add_(0, rows, g.reshape(-1, g.shape[-1])).view(b, *weight.shape)
                self.last_methods[layer.name] = "instantiate"
                return None
            self.last_methods[layer.name] = "ghost"
            if weight is None:
                return torch.zeros(b, device=g.device)
            same = (a.unsqueeze(2) == a.unsqueeze(1)).float()  # (B, T, T): the rows t and s update the same row
            return (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))
        t, d, p = a.shape[1], a.shape[2], g.shape[2]
        if layer.instantiate or 2 * t * t > d * p:
            if weight is not None:
                gs = torch.einsum("btp,btd->bpd", g, a).float()
                c.per_sample[weight] = gs.reshape(b, *weight.shape)
            if bias is not None:
                c.per_sample[bias] = g.sum(1, dtype=torch.float32)
            self.last_methods[layer.name] = "instantiate"
            return None
        sq = torch.zeros(b, device=g.device, dtype=torch.float32)
        if weight is not None:
            sq += _ghost_sq_norms(a, g)
        if bias is not None:
            sq += g.sum(1, dtype=torch.float32).pow(2).sum(1)
        self.last_methods[layer.name] = "ghost"
        return sq

    def _ghost_sums(self, c: _Captured, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        """``Σ_i f_i g_i`` per parameter of a ghost layer, from its activations and output gradients; fp32."""
        weight, bias = self._weight_and_bias(c.layer)
        a, g = c.a, c.g
        assert a is not None and g is not None
        out: dict[nn.Parameter, Tensor] = {}
        if c.layer.method == "embedding":
            if weight is not None:
                d = g.shape[-1]
                summed = torch.zeros(weight.shape[0], d, device=g.device, dtype=torch.float32)
                out[weight] = summed.index_add_(0, a.reshape(-1), (g * factors[:, None, None]).reshape(-1, d))
            return out
        scaled = g * factors.to(g.dtype)[:, None, None]
        if weight is not None:
            w = scaled.reshape(-1, g.shape[-1]).t() @ a.reshape(-1, a.shape[-1])
            out[weight] = w.float().reshape(weight.shape)
        if bias is not None:
            out[bias] = torch.einsum("b,bp->p", factors, g.sum(1, dtype=torch.float32))
        return out

    # ------------------------------------------------------------------ clipping
    def _clip_and_accumulate(self, max_grad_norm: float, clipping: ClippingMode, stability: float) -> Tensor:
        b = self._batch_size
        scale = self._scale()
        device = self.params[0].device
        captured: list[_Captured] = []
        per_sample: dict[nn.Parameter, Tensor] = dict(self._broadcast_grads)
        sq = torch.zeros(b, device=device, dtype=torch.float32)
        self.last_methods = {}
        for index, records in self._records.items():
            records = [r for r in records if r.grad is not None]
            if not records:
                continue
            c = self._collect(self._layers[index], records)
            layer_sq = self._norm_pass(c)
            if layer_sq is None:  # instantiated: summed per parameter first (a parameter may be in several layers)
                for p, gs in c.per_sample.items():
                    prev = per_sample.get(p)
                    per_sample[p] = gs if prev is None else prev + gs
                c.per_sample = {}
            else:
                sq += layer_sq
                captured.append(c)
        self._records = {}
        self._broadcast_grads = {}
        if self.check_against_autograd:
            ones = torch.ones(b, device=device, dtype=torch.float32)
            totals = {p: gs.sum(0) for p, gs in per_sample.items()}
            for c in captured:
                totals.update(self._ghost_sums(c, ones))
            check_sums_against_autograd(self.params, totals, self.param_names)
            self.check_against_autograd = False  # once per run: it costs autograd's weight gradients once
        self._apply_masks(per_sample)
        for gs in per_sample.values():
            sq += gs.reshape(b, -1).pow(2).sum(1)
        norms = (sq * scale**2).sqrt()
        factors = clip_factors(norms, max_grad_norm, clipping, stability) * scale
        for c in captured:
            for p, value in self._ghost_sums(c, factors).items():
                self._add(p, value)
        for p, gs in per_sample.items():
            self._add(p, torch.einsum("i,i...->...", factors, gs))
        for p in self.params:
            p.grad = None
        return norms


__all__ = ["GhostEngine"]
