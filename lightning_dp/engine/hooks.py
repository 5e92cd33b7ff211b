"""The per-sample gradient engine: layer hooks, flat per-sample clipping and the clipped sum.

Why not Opacus's ``GradSampleModule``: it wraps the model (breaking Lightning's module identity), treats modules
with raw parameters (timm ViT) as one functorch unit, and leaves clipping to its optimizer, which all-reduces per
parameter under DDP. Here one object owns per-sample gradients, their norms and the clipped sum, and plugs into the
strategy's single clip → all-reduce → noise path. Opacus's grad samplers are reused as per-layer rules.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor, nn
from typing_extensions import override

from lightning_dp.engine.base import ClippingEngine, NonFiniteMode
from lightning_dp.engine.contributions import Contribution, PerSampleGradients
from lightning_dp.engine.layer_rules import GradSampleRule, find_rule
from lightning_dp.engine.layers import bound_inputs, plan_layers
from lightning_dp.engine.layout import ParameterLayout
from lightning_dp.errors import DPMisconfigurationError


class HookEngine(ClippingEngine):
    """Materialised per-sample gradients (like Opacus hooks): each hooked layer's rule turns its activations and
    output gradients into per-sample gradients in fp32, which are clipped and summed. Used as described in
    :class:`~lightning_dp.engine.ClippingEngine`; also exposes :meth:`per_sample_gradients`. A layer's group is
    handed to the template as soon as all its calls' output gradients are in (with per-layer clipping it is then
    clipped and freed inside the backward pass).

    Args:
        module: the model whose trainable parameters get per-sample gradients.
        loss_reduction: ``"mean"`` if the loss averages per-sample losses over the micro-batch (per-sample
            gradients are then rescaled by ``b``), ``"sum"`` if it sums them.
        nonfinite: ``"skip"`` or ``"error"`` for examples with a non-finite gradient norm (see
            :class:`~lightning_dp.engine.ClippingEngine`).

    Raises:
        UnsupportedLayerError: if a trainable parameter belongs to a layer without a per-sample rule.
        DPMisconfigurationError: if the module has no trainable parameter.
    """

    def __init__(
        self,
        module: nn.Module,
        loss_reduction: Literal["mean", "sum"] = "mean",
        nonfinite: NonFiniteMode = "skip",
        layout: ParameterLayout | None = None,
    ) -> None:
        #: per hooked layer index, the per-sample gradients of its parameters (summed over the layer's calls)
        self._grad_samples: dict[int, dict[nn.Parameter, Tensor]] = {}
        #: per hooked layer index, its calls in this micro-batch's forward and the output gradients received
        self._calls: dict[int, int] = {}
        self._arrived: dict[int, int] = {}
        super().__init__(module, loss_reduction, nonfinite, layout)

    # ------------------------------------------------------------------ planning
    @override
    def _plan(self) -> None:
        layers, self._broadcast = plan_layers(self.module, lambda mod: find_rule(mod) is not None)
        self._layers = [(name, mod, find_rule(mod)) for name, mod in layers]

    @property
    @override
    def layer_names(self) -> list[str]:
        """Names of the hooked layers (for diagnostics)."""
        return [n for n, _, _ in self._layers]

    # ------------------------------------------------------------------ hooks
    @override
    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for index, (_, mod, rule) in enumerate(self._layers):
            self._handles.append(mod.register_forward_hook(self._make_forward_hook(index, rule), with_kwargs=True))

    def _make_forward_hook(self, index: int, rule: GradSampleRule) -> Any:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self._should_capture(mod, output):
                return
            if not output.requires_grad:
                return
            activations = [x.detach() if isinstance(x, Tensor) else x for x in bound_inputs(mod, inputs, kwargs)]
            self._calls[index] = self._calls.get(index, 0) + 1
            output.register_hook(lambda grad: self._on_backprop(index, mod, rule, activations, grad))

        return hook

    def _on_backprop(
        self, index: int, mod: nn.Module, rule: GradSampleRule, activations: list[Any], grad: Tensor
    ) -> None:
        self._check_batch_dimension(mod, grad)
        if not activations:
            raise DPMisconfigurationError(
                f"The output gradient of layer '{self._layers[index][0]}' arrived twice for one call in this"
                " micro-batch (a second backward through the same graph). Run one backward per captured micro-batch."
            )
        acts = [a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in activations]
        activations.clear()  # the output tensor's hook holds this list until the graph goes: free the inputs now
        layer = self._grad_samples.setdefault(index, {})
        with self._layer_work(full_precision=False):  # norms and sums both come from these per-sample gradients
            for p, gs in rule(mod, acts, grad.float()).items():
                if not p.requires_grad:
                    continue
                prev = layer.get(p)
                layer[p] = gs if prev is None else prev + gs
            self._arrived[index] = self._arrived.get(index, 0) + 1
            if self._arrived[index] == self._calls.get(index, 0):  # all the layer's calls are in: hand it over
                grads = self._grad_samples.pop(index)
                if grads:
                    self._group_ready(PerSampleGradients(self._layers[index][0], grads))

    # ------------------------------------------------------------------ capture
    @override
    def _start_capture(self) -> None:
        self._grad_samples, self._calls, self._arrived = {}, {}, {}

    @override
    def _free_capture(self) -> None:
        self._grad_samples, self._calls, self._arrived = {}, {}, {}

    def per_sample_gradients(self) -> dict[nn.Parameter, Tensor]:
        """The captured per-sample gradients of the last micro-batch, shape ``(b, *p.shape)``, fp32, before
        clipping and masks (parameters the micro-batch did not touch are absent). Valid until
        :meth:`clip_and_accumulate`.

        Raises:
            RuntimeError: under per-layer clipping in backward (the layers' per-sample gradients are already freed).
        """
        if self.per_layer.in_backward:
            raise RuntimeError(
                "HookEngine.per_sample_gradients: under per-layer clipping the layers were clipped inside the backward"
                " pass and their per-sample gradients freed; read them with clipping='flat' (or on the checked first"
                " micro-batch)."
            )
        scale = self._scale()
        out: dict[nn.Parameter, Tensor] = {}
        # _gather empties the groups handed over in backward and merging mutates groups: gather fresh copies
        ready = self._ready
        self._ready = [
            PerSampleGradients(g.name, dict(g.grads)) if isinstance(g, PerSampleGradients) else g for g in ready
        ]
        try:
            groups = self._gather()  # layers, broadcast parameters and the torch.func fallback
        finally:
            self._ready = ready
        for group in groups:
            for p, gs in group.materialize().grads.items():
                prev = out.get(p)
                out[p] = gs if prev is None else prev + gs
        return {p: gs * scale for p, gs in out.items()}

    # ------------------------------------------------------------------ contributions
    @override
    def _contributions(self) -> list[Contribution]:
        return [
            PerSampleGradients(self._layers[index][0], grads) for index, grads in self._grad_samples.items() if grads
        ]


__all__ = ["HookEngine"]
