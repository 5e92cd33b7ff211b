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
from torch.utils.hooks import RemovableHandle

from lightning_dp.engine.rules import GradSampleRule, broadcast_parameter_names, find_rule
from lightning_dp.errors import DPMisconfigurationError, UnsupportedLayerError

#: Added to per-sample norms before dividing, as Opacus does, so that a zero gradient gets factor 1.
CLIP_EPS = 1e-6


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class HookEngine:
    """Per-sample gradients by forward/backward hooks, then flat clipping and an fp32 clipped sum.

    Usage, per physical micro-batch of ``b`` examples::

        with engine.capture(b):
            loss = module.training_step(micro_batch)
            loss.backward()
        norms = engine.clip_and_accumulate(max_grad_norm)
        ...
        summed = engine.pop_summed()  # {param: Σ_i clip(g_i)} over all micro-batches

    Args:
        module: the model whose trainable parameters get per-sample gradients.
        loss_reduction: ``"mean"`` if the loss averages per-sample losses over the micro-batch (per-sample
            gradients are then rescaled by ``b``), ``"sum"`` if it sums them.

    Raises:
        UnsupportedLayerError: if a trainable parameter belongs to a layer without a per-sample rule.
        DPMisconfigurationError: if the module has no trainable parameter.
    """

    def __init__(self, module: nn.Module, loss_reduction: Literal["mean", "sum"] = "mean") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        self.module = module
        self.loss_reduction = loss_reduction
        self.params: list[nn.Parameter] = list(dict.fromkeys(p for p in module.parameters() if p.requires_grad))
        if not self.params:
            raise DPMisconfigurationError(
                f"{type(module).__name__} has no trainable parameters (all have requires_grad=False). Unfreeze the"
                " parameters to fine-tune, e.g. the classifier head, before fitting with DPStrategy."
            )
        self.param_names: dict[nn.Parameter, str] = {}
        for name, p in module.named_parameters():
            self.param_names.setdefault(p, name)
        self._layers: list[tuple[str, nn.Module, GradSampleRule]] = []
        self._broadcast: list[tuple[str, nn.Module, str, nn.Parameter]] = []
        self._plan()
        self._handles: list[RemovableHandle] = []
        self._capturing = False
        self._batch_size = 0
        self._grad_samples: dict[nn.Parameter, Tensor] = {}
        self._summed: dict[nn.Parameter, Tensor] = {}
        self.check_against_autograd = True

    # ------------------------------------------------------------------ planning
    def _plan(self) -> None:
        for mod_name, mod in self.module.named_modules():
            direct = {n: p for n, p in mod._parameters.items() if p is not None and p.requires_grad}
            if not direct:
                continue
            rule = find_rule(mod)
            if rule is not None:
                self._layers.append((mod_name, mod, rule))
                continue
            allowed = broadcast_parameter_names(mod)
            unknown = [n for n in direct if n not in allowed]
            if unknown:
                where = mod_name or "<root>"
                raise UnsupportedLayerError(
                    f"No per-sample gradient rule for layer '{where}' of type {type(mod).__module__}."
                    f"{type(mod).__qualname__} with trainable parameters {unknown}. Freeze it"
                    " (requires_grad=False), replace it with a supported layer, or register a rule with"
                    " lightning_dp.engine.register_grad_sampler (or register_broadcast_parameters for raw"
                    " parameters of shape (1, ...) broadcast over the batch)."
                )
            for n, p in direct.items():
                if p.dim() == 0 or p.shape[0] != 1:
                    raise UnsupportedLayerError(
                        f"Parameter '{mod_name}.{n}' is registered as broadcast over the batch but has shape"
                        f" {tuple(p.shape)}; a broadcast parameter needs a leading dimension of size 1."
                    )
                self._broadcast.append((mod_name, mod, n, p))

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

    def detach(self) -> None:
        """Remove all hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_forward_hook(self, rule: GradSampleRule) -> Any:
        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not self._capturing or not torch.is_grad_enabled():
                return
            if _in_backward():
                raise DPMisconfigurationError(
                    f"Layer {type(mod).__name__} ran its forward during backward: gradient checkpointing (activation"
                    " recomputation) is not compatible with per-sample gradient hooks. Disable it, e.g."
                    " `model.set_grad_checkpointing(False)` for timm models."
                )
            if not isinstance(output, Tensor):
                raise UnsupportedLayerError(
                    f"Layer {type(mod).__name__} returned {type(output).__name__}, not a tensor; its per-sample rule"
                    " needs a single tensor output."
                )
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
        if self._capturing:
            raise RuntimeError("HookEngine.capture is not re-entrant.")
        self._batch_size = batch_size
        self._grad_samples = {}
        for p in self.params:  # p.grad may hold an earlier release; this micro-batch's autograd grad is checked
            p.grad = None
        expanded: list[tuple[nn.Module, str, nn.Parameter, Tensor]] = []
        for _, mod, name, p in self._broadcast:
            e = p.detach().expand(batch_size, *p.shape[1:]).clone().requires_grad_(True)
            mod._parameters[name] = e  # type: ignore[assignment]  # restored below; state-dict keys unchanged
            expanded.append((mod, name, p, e))
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False
            for mod, name, p, e in expanded:
                mod._parameters[name] = p
                if e.grad is not None:
                    self._grad_samples[p] = e.grad.float().reshape(batch_size, *p.shape)

    # ------------------------------------------------------------------ clipping
    def _scale(self) -> float:
        return float(self._batch_size) if self.loss_reduction == "mean" else 1.0

    def _check_against_autograd(self) -> None:
        """Compare Σ_i g_i with autograd's ``p.grad``: a use of a parameter outside its layer's forward (e.g.
        ``F.linear(x, layer.weight)``) is invisible to hooks and would silently drop gradient.
        """
        for p in self.params:
            if p.grad is None:
                continue
            gs = self._grad_samples.get(p)
            total = torch.zeros_like(p.grad, dtype=torch.float32) if gs is None else gs.sum(0)
            ref = p.grad.float()
            err = (total - ref).norm()
            if err > 0.05 * ref.norm() + 1e-6:
                raise DPMisconfigurationError(
                    f"The per-sample gradients of '{self.param_names.get(p, '?')}' do not add up to its gradient"
                    f" (relative error {float(err / (ref.norm() + 1e-12)):.3g}). The parameter is used outside its"
                    " layer's forward (e.g. F.linear(x, layer.weight) or weight tying through a functional call),"
                    " which per-sample hooks cannot see. Call the layer itself, or register a rule for the module"
                    " that uses it."
                )

    def per_sample_gradients(self) -> dict[nn.Parameter, Tensor]:
        """The captured per-sample gradients of the last micro-batch, shape ``(b, *p.shape)``, fp32, before
        clipping (parameters the micro-batch did not touch are absent). Valid until :meth:`clip_and_accumulate`.
        """
        scale = self._scale()
        return {p: gs * scale for p, gs in self._grad_samples.items()}

    def clip_and_accumulate(self, max_grad_norm: float) -> Tensor:
        """Clip the captured per-sample gradients to ``max_grad_norm`` (flat, over all parameters) and add them to
        the running clipped sum. Clears ``p.grad`` (it holds the non-private gradient of the micro-batch).

        Returns:
            The per-sample gradient norms before clipping, shape ``(b,)``, in fp32.
        """
        scale = self._scale()
        if self.check_against_autograd:
            self._check_against_autograd()
            self.check_against_autograd = False  # once per run: it costs an extra pass over per-sample gradients
        b = self._batch_size
        device = self.params[0].device
        sq = torch.zeros(b, device=device, dtype=torch.float32)
        for gs in self._grad_samples.values():
            sq += gs.reshape(b, -1).pow(2).sum(1) * scale**2
        norms = sq.sqrt()
        factors = (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0) * scale
        for p, gs in self._grad_samples.items():
            clipped = torch.einsum("i,i...->...", factors, gs)
            acc = self._summed.get(p)
            self._summed[p] = clipped if acc is None else acc + clipped
        self._grad_samples = {}
        for p in self.params:
            p.grad = None
        return norms

    def pop_summed(self) -> dict[nn.Parameter, Tensor]:
        """The clipped sum over all micro-batches since the last call (fp32; zeros for parameters with no
        gradient), and reset it.
        """
        out = {p: self._summed.get(p, torch.zeros_like(p, dtype=torch.float32)) for p in self.params}
        self._summed = {}
        return out
