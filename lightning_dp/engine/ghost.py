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

Work happens in the backward hooks: as soon as the output gradients of all of a layer's calls have arrived, the layer's
norms (ghost or instantiated) and the per-sample gradients of small layers (LayerNorm, biases) are computed and the
layer's records are freed; only what the clipped sum still needs is kept (``A`` and ``G`` in the layer's own dtype for
matrix-product layers, per-sample gradients for the others). With per-layer clipping the clipped sum is formed there
too, and nothing is kept (see :class:`~lightning_dp.engine.ClippingEngine`).

Because the engine forms the weight gradients itself, autograd's own weight gradients would be wasted work: after
the first micro-batch (which autograd computes in full to check that every parameter's use is visible to the
hooks), the engine switches the trainable parameters' ``requires_grad`` off during each captured forward and
backward, so autograd only propagates activation gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_dp.console import notice
from lightning_dp.engine.base import ClippingEngine, NonFiniteMode
from lightning_dp.engine.contributions import Contribution, PerSampleGradients
from lightning_dp.engine.layer_rules import GhostLayer, GhostRecord, ghost_layer_for
from lightning_dp.engine.layer_rules.matmul import MatmulCaptured
from lightning_dp.engine.layers import bound_inputs, plan_layers
from lightning_dp.engine.layout import ParameterLayout
from lightning_dp.errors import DPMisconfigurationError


@dataclass
class _Planned:
    name: str
    layer: GhostLayer
    shared: bool  # a parameter shared with another hooked layer: always instantiated


class GhostContribution(Contribution):
    """A ghost layer's share of a micro-batch: its squared norms, and its clipped sum formed from what
    :meth:`GhostLayer.collect` captured (no per-sample gradients).

    Args:
        name: the layer's module name.
        layer: its handler.
        captured: from ``layer.collect``.
        squared: from ``layer.squared_norms(captured)``.
    """

    def __init__(self, name: str, layer: GhostLayer, captured: Any, squared: Tensor) -> None:
        self.name = name
        self.layer = layer
        self.captured = captured
        self._squared = squared
        self._key: Callable[[Tensor], nn.Parameter] | None = None  # set by rekey (sharded parameters)
        self._params = tuple(p for p in layer.module._parameters.values() if p is not None and p.requires_grad)

    @property
    @override
    def params(self) -> tuple[nn.Parameter, ...]:
        return self._params

    @override
    def squared_norms(self) -> Tensor:
        return self._squared

    @override
    def rounding_bounds(self) -> Tensor | None:
        return self.layer.rounding_bound(self.captured)

    @override
    def clipped_sum(self, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        return self._keyed(self.layer.clipped_sum(self.captured, factors))

    @override
    def materialize(self) -> PerSampleGradients:  # any-model: a weight shared with a fallback op
        return PerSampleGradients(self.name, self._keyed(self.layer.instantiate(self.captured)))

    @override
    def rekey(self, key: Callable[[Tensor], nn.Parameter]) -> None:
        self._params = tuple(key(p) for p in self._params)
        self._key = key

    def _keyed(self, values: dict[nn.Parameter, Tensor]) -> dict[nn.Parameter, Tensor]:
        return values if self._key is None else {self._key(p): v for p, v in values.items()}

    @override
    def zero_examples(self, keep: Tensor) -> None:
        self.captured = self.layer.zero_examples(self.captured, keep)
        self._squared = torch.where(keep, self._squared, torch.zeros((), device=keep.device))


class GhostEngine(ClippingEngine):
    """Per-sample clipping by book-keeping: ghost norms, one backward pass, no per-sample weight gradients.

    Used as described in :class:`~lightning_dp.engine.ClippingEngine`. Each hooked layer is handled by a
    :class:`~lightning_dp.engine.layer_rules.GhostLayer` registered for its type (see
    :mod:`lightning_dp.engine.layer_rules`).

    Natively handled: ``nn.Linear`` (any input rank), ``nn.Conv2d`` and ``nn.Conv1d`` (``groups=1``, zero padding;
    via unfold they are linear maps on ``(B, L, C·k…)``), ``nn.Embedding``, LayerNorm (``nn`` and ``timm``) and
    ``timm`` LayerScale (whose per-sample gradients are as small as their parameters), and broadcast parameters
    (timm ViT's ``cls_token``, ``reg_token``, ``pos_embed``). Other layers with a rule in
    :mod:`lightning_dp.engine.layer_rules` (ours or Opacus's) fall back to per-sample instantiation with that rule,
    announced once when the engine is built.

    Under autocast, the input of a linear or convolution layer is cast to the autocast dtype just before its forward
    (as autocast would), so that the activation the engine keeps is the tensor autograd saves; the output gradients
    stay in the layer's dtype too. Norms and clipped sums are formed with exact products and fp32 accumulation (bf16
    tensor cores with fp32 results on CUDA, see :mod:`lightning_dp.engine.precision`); the rounding of clip-scaled
    bf16 rows is bounded per example and the clip factors account for it, so no clipped example exceeds C.

    Args:
        module: the model whose trainable parameters get clipped per sample.
        loss_reduction: ``"mean"`` if the loss averages per-sample losses over the micro-batch (per-sample
            gradients are then rescaled by ``b``), ``"sum"`` if it sums them.
        nonfinite: ``"skip"`` or ``"error"`` for examples with a non-finite gradient norm (see
            :class:`~lightning_dp.engine.ClippingEngine`).

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

    def __init__(
        self,
        module: nn.Module,
        loss_reduction: Literal["mean", "sum"] = "mean",
        nonfinite: NonFiniteMode = "skip",
        layout: ParameterLayout | None = None,
    ) -> None:
        self._records: dict[int, list[GhostRecord]] = {}
        self._completed: set[int] = set()
        self._switched_off: set[nn.Parameter] = set()
        self._anchor: Tensor | None = None
        self.skip_param_grads = True
        self.last_methods: dict[str, str] = {}
        super().__init__(module, loss_reduction, nonfinite, layout)

    # ------------------------------------------------------------------ planning
    @override
    def _plan(self) -> None:
        handlers: dict[int, GhostLayer | None] = {}

        def supported(mod: nn.Module) -> bool:
            handlers[id(mod)] = ghost_layer_for(mod)
            return handlers[id(mod)] is not None

        layers, self._broadcast = plan_layers(self.module, supported)
        owners: dict[nn.Parameter, int] = {}
        for _, mod in layers:
            for p in mod._parameters.values():
                if p is not None:
                    owners[p] = owners.get(p, 0) + 1
        fallback: list[str] = []
        for name, mod in layers:
            layer = handlers[id(mod)]
            assert layer is not None
            shared = any(owners.get(p, 0) > 1 for p in mod._parameters.values() if p is not None)
            layer.force_instantiate = shared
            self._layers.append(_Planned(name, layer, shared))
            layer_notice = layer.fallback_notice
            if layer_notice is not None and layer_notice not in fallback:
                fallback.append(layer_notice)
        if fallback:
            notice(
                f"lightning_dp: GhostEngine has no ghost norm for {', '.join(fallback)}; the per-sample gradients of"
                " these layers are instantiated with their registered rules (more time and memory than ghost norms)."
            )

    @property
    @override
    def layer_names(self) -> list[str]:
        """Names of the hooked layers (for diagnostics)."""
        return [planned.name for planned in self._layers]

    @override
    def set_grad_masks(self, masks: dict[nn.Parameter, Tensor]) -> None:
        """As :meth:`ClippingEngine.set_grad_masks`; layers owning a masked parameter switch to per-sample
        instantiation (a ghost norm cannot drop coordinates).
        """
        super().set_grad_masks(masks)
        for planned in self._layers:
            masked = any(p in self.grad_masks for p in planned.layer.module._parameters.values() if p is not None)
            planned.layer.force_instantiate = planned.shared or masked

    # ------------------------------------------------------------------ hooks
    @override
    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for index, planned in enumerate(self._layers):
            module = planned.layer.module
            if planned.layer.autocast_input:
                self._handles.append(module.register_forward_pre_hook(self._cast_like_autocast))
            hook = self._make_forward_hook(index, planned.layer)
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))  # keyword inputs too

    def _cast_like_autocast(self, mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Forward pre-hook: under autocast, cast the input to the autocast dtype before the layer does, so that the
        engine and autograd keep one copy of it (the layer's own cast is then a no-op). Same numerics as autocast.
        """
        if not self._capturing or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        device = x.device.type
        if not x.is_floating_point() or not torch.is_autocast_enabled(device):
            return None
        dtype = torch.get_autocast_dtype(device)
        return None if x.dtype == dtype else (x.to(dtype), *args[1:])

    def _make_forward_hook(self, index: int, layer: GhostLayer) -> Any:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if not self._should_capture(mod, output):
                return None
            replaced = None
            if not output.requires_grad:
                live = (p for p in mod._parameters.values() if p is not None)
                if not any(self.layout.canonical(p) in self._switched_off for p in live):
                    return None  # frozen here: nothing to clip
                # Its parameters' requires_grad is switched off and its input needs no gradient (e.g. the first
                # layer): add a zero that requires grad so that the output gradient still reaches the hook.
                assert self._anchor is not None
                output = replaced = output + self._anchor
            if index in self._completed:
                self._reentered(index)
            record = GhostRecord(layer.keep_inputs(bound_inputs(mod, inputs, kwargs)))
            self._records.setdefault(index, []).append(record)
            output.register_hook(lambda grad: self._on_backprop(index, mod, record, grad))
            return replaced

        return hook

    def _on_backprop(self, index: int, mod: nn.Module, record: GhostRecord, grad: Tensor) -> None:
        self._check_batch_dimension(mod, grad)
        if self._switched_off:
            # The forward has built its graph without weight gradients; the layers' rules see the parameters as
            # trained again (they test requires_grad). The graph of this backward is not changed by it.
            self._restore_requires_grad()
        if index in self._completed:
            self._reentered(index)
        record.grad = grad if record.grad is None else record.grad + grad
        records = self._records[index]
        if all(r.grad is not None for r in records):  # the layer's backward is complete: its norms now
            del self._records[index]
            self._completed.add(index)
            planned = self._layers[index]
            with self._layer_work():
                group = self._group_of(planned, records)
                for r in records:  # the output tensors' hooks hold the records until the graph goes: empty them
                    r.inputs, r.grad = [], None
                self._group_ready(group, defer=planned.shared)

    def _reentered(self, index: int) -> None:
        raise DPMisconfigurationError(
            f"Layer '{self._layers[index].name}' ran again (forward or backward) after its backward was complete in"
            " this micro-batch. The ghost engine forms a layer's per-sample norms as soon as its output gradients"
            " have arrived, so each captured micro-batch must run one forward and one backward: sum the losses"
            " and call backward once."
        )

    # ------------------------------------------------------------------ capture
    @override
    def _start_capture(self) -> None:
        self._records = {}
        self._completed = set()
        self.last_methods = {}
        if self.skip_param_grads and not self.check_against_autograd:
            # the torch.func fallback's ops need their parameters' gradients: those stay on
            self._switched_off = {p for p in self.params if p.requires_grad} - self._fallback.fallback_params()
            self._anchor = torch.zeros((), device=self.params[0].device, requires_grad=True)
        for p in self._switched_off:
            p.requires_grad_(False)

    @override
    def _end_capture(self) -> None:
        self._restore_requires_grad()
        self._anchor = None

    def _restore_requires_grad(self) -> None:
        for p in self._switched_off:
            p.requires_grad_(True)
            for alias in self.layout.aliases(p):  # FSDP2's unsharded copy took the flag at its all-gather
                alias.requires_grad_(True)
        self._switched_off = set()

    @override
    def _free_capture(self) -> None:
        self._records = {}
        self._completed = set()

    # ------------------------------------------------------------------ contributions
    @override
    def _contributions(self) -> list[Contribution]:
        """The layers whose backward never completed (a call whose output did not reach the loss)."""
        out: list[Contribution] = []
        for index, records in self._records.items():
            records = [r for r in records if r.grad is not None]
            if records:
                out.append(self._group_of(self._layers[index], records))
        self._records = {}
        return out

    def _group_of(self, planned: _Planned, records: list[GhostRecord]) -> Contribution:
        """One layer's contribution from its calls: ghost norms and the captured data, or per-sample gradients
        (instantiated: cheaper, forced, or a rule). Of an instantiated matrix-product layer whose per-sample gradients
        outweigh its activations and output gradients, only the norms of the instantiated gradients are kept.
        """
        layer = planned.layer
        captured = layer.collect(records)
        squared = layer.squared_norms(captured)
        if squared is not None:
            self.last_methods[planned.name] = "ghost"
            return GhostContribution(planned.name, layer, captured, squared)
        self.last_methods[planned.name] = layer.instantiated_label
        group = PerSampleGradients(planned.name, layer.instantiate(captured))
        if (
            isinstance(captured, MatmulCaptured)
            and not layer.force_instantiate
            and _bytes(group.grads.values()) > _bytes([captured.a, captured.g])
        ):
            return GhostContribution(planned.name, layer, captured, group.squared_norms())
        return group


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


__all__ = ["GhostContribution", "GhostEngine"]
