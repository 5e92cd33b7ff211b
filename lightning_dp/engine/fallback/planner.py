"""The universal fallback of the per-sample engines: every trained parameter that no layer rule covers.

An engine hooks the layers it has a rule for (``nn.Linear``, convolutions, norms, ...) and substitutes registered
broadcast parameters. :class:`FunctionalFallback` covers everything else with ``torch.func``, at the smallest scope
where the examples can be told apart:

- **Ops** (:mod:`~lightning_dp.engine.fallback.tracer`): a parameter without a rule (a layer-scale ``gamma``, a raw
  token, a bias table) or a weight used outside its layer's forward (``F.linear(x, self.qkv.weight, ...)``) gets its
  per-sample gradients at the op that combines it with the batch, recomputed per example.
- **Modules** (:mod:`~lightning_dp.engine.fallback.units`): where the batch is not the first dimension inside a module
  (Swin folds windows into the batch, MobileViT patches, an RNN keeps hidden states batch-second), the smallest
  enclosing module whose inputs and outputs keep the batch becomes a *unit*, recomputed per example as a whole.
  Recurrent layers and ``nn.MultiheadAttention`` are units from the start.

Where ops are traced and which modules are units is known in part when the engine is built (parameters without a
rule, registered unit types) and completed on the micro-batches that the engine checks against autograd: there every
op of the forward is watched (a weight used outside its layer), and a layer or op whose first dimension is not the
micro-batch marks its enclosing modules until one keeps the batch first. Each choice is announced once; the
per-sample gradients of that very micro-batch are already computed with it. The exact check against autograd then
confirms the whole plan, and every recomputation is compared with fingerprints of the real outputs.

The module call stack is followed by forward pre- and post-hooks on every submodule (a few microseconds per call,
while capturing only).

:class:`FunctionalFallback` holds the capture and the hooks; its jobs live beside it: discovery of units and regions
(:mod:`~lightning_dp.engine.fallback.discovery`), the op dispatch of tracing regions
(:mod:`~lightning_dp.engine.fallback.dispatch`), the per-example compute (:mod:`~lightning_dp.engine.fallback.compute`)
and the diagnostics of the cross-check (:mod:`~lightning_dp.engine.fallback.diagnostics`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.hooks import RemovableHandle

from lightning_dp.engine.contributions import Contribution, PerSampleGradients
from lightning_dp.engine.fallback.capture import Capture, Frame, grad_hook
from lightning_dp.engine.fallback.compute import FallbackResult, check_resolved, compute_per_sample
from lightning_dp.engine.fallback.diagnostics import explain as explain_mismatch
from lightning_dp.engine.fallback.discovery import FallbackPlan, is_within
from lightning_dp.engine.fallback.dispatch import OpDispatcher
from lightning_dp.engine.fallback.per_example import Fingerprint, ForwardState
from lightning_dp.engine.fallback.units import UnitCall, UnitRule, batch_dims_of, input_names
from lightning_dp.engine.layout import ParameterLayout
from lightning_dp.errors import DPMisconfigurationError


class _TracingMode(TorchFunctionMode):
    """Hands every torch function call to the fallback while a tracing region's forward runs."""

    def __init__(self, fallback: FunctionalFallback) -> None:
        super().__init__()
        self.fallback = fallback

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.fallback.tracing():
            return func(*args, **kwargs)
        return self.fallback.on_call(func, args, kwargs)


class FunctionalFallback:
    """Per-sample gradients with ``torch.func`` for the parameters an engine's layer rules do not cover.

    Built by :class:`~lightning_dp.engine.ClippingEngine` after the engine planned its layers; its
    :meth:`contributions` are added to the engine's per-layer groups.

    Args:
        module: the model.
        params: its trained parameters.
        native: names of the layers the engine hooks with a rule.
        broadcast: the engine's broadcast parameters.
        param_names: parameter names for messages.
        engine_name: for announcements.
        layout: where the trained parameters live (default: one process, every tensor whole). Under a layout that
            rekeys (FSDP2), the fallback knows a parameter read from a layer by the trained parameter it stands for,
            and keeps the values that the forward used for the per-example recomputation (the forward's copies are
            freed when their module's forward and backward end).

    Attributes:
        plan: the units and tracing regions (:class:`~lightning_dp.engine.fallback.discovery.FallbackPlan`).
        last_methods: how each unit or owner of traced parameters was computed on the last micro-batch.
        last_summary: how the last micro-batch was covered: counts per ``"unit <Type> (<method>)"`` /
            ``"op <name> (<method>)"``.
    """

    def __init__(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        native: list[str],
        broadcast: list[nn.Parameter],
        param_names: dict[nn.Parameter, str],
        engine_name: str,
        layout: ParameterLayout | None = None,
    ) -> None:
        self.model = module
        self.plan = FallbackPlan(module, params, native, broadcast, param_names, engine_name, layout)
        self._dispatch = OpDispatcher(self.plan)
        self._handles: list[RemovableHandle] = []
        self._mode = _TracingMode(self)
        self._depth = 0
        self._capture: Capture | None = None
        self._groups: list[tuple[str, dict[nn.Parameter, Tensor]]] | None = None
        self._produced: set[str] = set()
        self.last_methods: dict[str, str] = {}
        self.last_summary: dict[str, int] = {}

    # ------------------------------------------------------------------ the plan
    @property
    def units(self) -> dict[nn.Module, UnitRule]:
        """Per unit module, the rule that recomputes it per example."""
        return self.plan.units

    @property
    def regions(self) -> set[nn.Module | None]:
        """The modules whose forward is traced op by op (None: the whole forward)."""
        return self.plan.regions

    def name_of(self, m: nn.Module | None) -> str:
        """``m``'s path in the model (for messages)."""
        return self.plan.name_of(m)

    def covers(self, group: Contribution) -> bool:
        """Whether an engine group's parameters all belong to modules inside units (the unit's per-sample gradients
        replace the group's).
        """
        return self.plan.covers(group)

    def fallback_params(self) -> set[nn.Parameter]:
        """The trained parameters the fallback computes per-sample gradients for (as planned so far)."""
        return self.plan.fallback_params()

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Follow the module call stack (idempotent)."""
        if self._handles:
            return
        for m in self.model.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True, always_call=True))
            if self.plan.layout.rekeys:  # first of all post-hooks: before FSDP2's frees the all-gathered parameters
                self._handles.append(m.register_forward_hook(self._keep_folded_values, prepend=True))

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, mod: nn.Module, args: tuple, kwargs: dict) -> None:
        cap = self._capture
        if cap is None or not cap.active:
            return
        parent = cap.frames[-1] if cap.frames else None
        in_unit = parent is not None and parent.in_unit
        is_unit = mod in self.units and not in_unit
        state = None
        if torch.is_grad_enabled() and (is_unit or cap.discover):
            state = ForwardState.record([x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)])
        frame = Frame(mod, args, kwargs, in_unit or is_unit, is_unit, state)
        cap.frames.append(frame)
        if frame.in_unit and cap.values is not None:
            self._keep_unit_values(cap, mod)
        for device_type in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device_type):
                cap.dtypes.add(torch.get_autocast_dtype(device_type))
        if not frame.in_unit and mod in self.regions:
            frame.region = True
            self._enter_mode()

    def _post(self, mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        cap = self._capture
        if cap is None or not cap.active or not cap.frames:
            return None
        frame = cap.frames.pop()
        while frame.module is not mod and cap.frames:  # an exception unwound inner calls
            if frame.region:
                self._exit_mode()
            frame = cap.frames.pop()
        if frame.region:
            self._exit_mode()
        if output is None or not torch.is_grad_enabled():
            return None
        if frame.unit:
            if self._record_unit(frame, output):
                return None
            # called on a batch that is not the micro-batch's (folded by an enclosing module)
            frame.fold = f"'{self.plan.name_of(mod)}' ({type(mod).__name__}) is called on a folded batch"
        if frame.fold is not None and (frame.unit or not frame.in_unit):
            if self._eligible(frame, output) and not frame.unit:
                self._resolve_fold(frame)
                self._record_unit(frame, output)
            elif cap.frames:
                parent = cap.frames[-1]
                parent.fold = parent.fold or frame.fold
            else:
                cap.unresolved = frame.fold
        return None

    def _keep_unit_values(self, cap: Capture, mod: nn.Module) -> None:
        """Under a rekeying layout, in the pre-forward of a module inside a unit: keep the values of the parameters
        that the forward reads now as other objects (FSDP2's unsharded parameters; the module's own, and those of
        its submodules in the same ``fully_shard`` group), for the unit's recomputation after the backward.
        """
        for p in mod.parameters():
            key = self.plan.key_of(p)
            if key is not p:
                cap.keep_value(key, p)

    def _keep_folded_values(self, mod: nn.Module, args: tuple, output: Any) -> None:
        """Under a rekeying layout, at the end of a module's forward that folded the examples on a checked
        micro-batch (it or an enclosing module becomes a unit in :meth:`_post`): keep the values of its parameters,
        while the layout's copies still hold them.
        """
        cap = self._capture
        if cap is None or not cap.active or not cap.discover or cap.values is None or not cap.frames:
            return
        frame = cap.frames[-1]
        if frame.module is mod and frame.fold is not None and not frame.in_unit:
            self._keep_unit_values(cap, mod)

    def _unit_values(self, cap: Capture, m: nn.Module) -> dict[str, Tensor]:
        """Under a rekeying layout, the values of all of unit ``m``'s parameters (trained or not) as its forward used
        them, by name relative to ``m``.

        Raises:
            DPMisconfigurationError: for a parameter whose value was not kept (the module became a unit only after
                its forward had run).
        """
        assert cap.values is not None
        values: dict[str, Tensor] = {}
        for n, p in m.named_parameters():
            key = self.plan.key_of(p)
            value = cap.values.get(key)
            if value is None and not self.plan.layout.aliases(key):
                value = key.detach()  # whole on this rank (outside any fully_shard unit): read as it is
            if value is None:
                name = self.plan.name_of(m)
                cls = next((c for c in type(m).__mro__ if "forward" in vars(c)), type(m)).__name__
                raise DPMisconfigurationError(
                    f"'{name}' ({cls}) is recomputed per example as one unit, but under a sharded layout (FSDP2) the"
                    f" value of its parameter '{n}' was not kept during its forward: the module became a unit only"
                    " after its forward had run (the batch is folded inside it), when FSDP2 had freed the"
                    " all-gathered parameters. Make its type a unit from the start, e.g."
                    f" lightning_dp.engine.fallback.register_unit_rule({cls})(lightning_dp.engine.fallback.UnitRule)."
                )
            values[n] = value
        return values

    # ------------------------------------------------------------------ capture
    def start(self, batch_size: int, discover: bool) -> None:
        """Begin capturing a micro-batch (``discover``: watch every op of the forward)."""
        self.attach()
        cap = Capture(batch_size, discover)
        if self.plan.layout.rekeys:
            cap.canonical, cap.values = self.plan.layout.canonical, {}
        for t in (*self.model.parameters(), *self.model.buffers()):
            cap.constants.add(id(t))
        cap.dtypes = {p.dtype for p in self.plan.trainable}
        self._capture = cap
        self._groups = None
        for p in self.fallback_params():  # the ghost engine may have switched them off: the ops need their grads
            if not p.requires_grad:
                p.requires_grad_(True)
                cap.reenabled.append(p)
        if discover or None in self.regions:
            self._enter_mode()

    def end(self) -> None:
        """Stop capturing (after the micro-batch's backward; also on error)."""
        cap = self._capture
        while self._depth > 0:
            self._exit_mode()
        if cap is None:
            return
        cap.active = False
        for p in cap.reenabled:
            p.requires_grad_(False)
        cap.reenabled = []
        cap.frames = []
        cap.derived = {}

    def free(self) -> None:
        """Drop what the capture recorded."""
        self._capture = None
        self._groups = None

    def _enter_mode(self) -> None:
        self._depth += 1
        if self._depth == 1:
            self._mode.__enter__()

    def _exit_mode(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self._mode.__exit__(None, None, None)

    def tracing(self) -> bool:
        """Whether the current torch function call is to be examined."""
        cap = self._capture
        if cap is None or not cap.active or not torch.is_grad_enabled():
            return False
        return not cap.frames or not cap.frames[-1].in_unit

    def accepts(self, mod: nn.Module, output: Tensor) -> bool:
        """In an engine's layer hook: whether its rule may capture this call (not inside a unit, not on tensors
        derived from parameters only, and with the micro-batch as first dimension; otherwise the enclosing modules
        are marked for a unit).
        """
        cap = self._capture
        if cap is None or not cap.active:
            return True
        frame = cap.frames[-1] if cap.frames and cap.frames[-1].module is mod else None
        if frame is not None and frame.in_unit:
            return False
        entry = cap.derived.get(id(output))
        if entry is not None and entry[0] is output:
            return False
        if not output.is_contiguous():
            channels_last = output.dim() == 4 and output.is_contiguous(memory_format=torch.channels_last)
            cap.layouts[mod] = "channels_last" if channels_last else "non-contiguous"
        if output.dim() == 0 or output.shape[0] != cap.b:
            rows = "no batch dimension" if output.dim() == 0 else f"{output.shape[0]} rows"
            cap.fold(
                frame,
                f"layer '{self.plan.name_of(mod)}' ({type(mod).__name__}) gives {rows} for {cap.b} examples;"
                " training_step must run the whole batch it is given in one forward (a step that runs the batch in"
                " parts, or uses only part of it, gives layers fewer rows than examples)",
            )
            return False
        if cap.discover and frame is not None and output.requires_grad:  # kept to tell a wrong rule from a hidden use
            grads: dict[int, Tensor] = {}
            output.register_hook(grad_hook(grads, 0))
            cap.native_calls.setdefault(mod, []).append((frame.args, frame.kwargs, grads))
        return True

    # ------------------------------------------------------------------ units
    def _eligible(self, frame: Frame, output: Any) -> bool:
        """Whether the frame's module keeps the batch in its inputs and outputs (so it can be a unit)."""
        cap = self._capture
        assert cap is not None
        if not self.plan.trained_in(frame.module) and not any(
            self.plan.is_trained(x) for x in tree_flatten((frame.args, frame.kwargs))[0]
        ):
            return False
        flat_in = tree_flatten((frame.args, frame.kwargs))[0]
        names = input_names(frame.module, frame.args, frame.kwargs)
        dims = batch_dims_of(frame.module, flat_in, tree_flatten(output)[0], cap.b, cap.model_tensor, names)
        if dims is None:
            return False
        in_dims, out_dims = dims
        if not any(d is not None for d in out_dims):
            return False
        for x, d in zip(flat_in, in_dims):
            if not isinstance(x, Tensor) or d is not None:
                continue
            entry = cap.derived.get(id(x))
            if entry is not None and entry[0] is x:
                return False
            if not (self._dispatch.constant(cap, x) or self.plan.is_trained(x)):
                return False
        return True

    def _resolve_fold(self, frame: Frame) -> None:
        """Make the frame's module a unit, dropping what was recorded inside it in this micro-batch."""
        cap = self._capture
        assert cap is not None
        m = frame.module
        name = self.plan.name_of(m)
        self.plan.add_unit(m)
        inside = self.plan.module_names[m]
        cap.unit_calls = {u: c for u, c in cap.unit_calls.items() if not is_within(self.plan.module_names[u], inside)}
        cap.ops = [r for r in cap.ops if not is_within(self.plan.module_names.get(r.module, "?"), inside)]
        self.plan.announce(
            f"unit:{name}",
            f"'{name}' ({type(m).__name__}) is recomputed per example as one unit with torch.func: inside it,"
            f" {frame.fold}, so the examples cannot be told apart at a smaller scope.",
        )

    def _record_unit(self, frame: Frame, output: Any) -> bool:
        """Record a call of a unit; False if its inputs and outputs do not have the micro-batch along their batch
        dimensions (the enclosing module must then be the unit).
        """
        cap = self._capture
        assert cap is not None
        m = frame.module
        flat_in, spec = tree_flatten((frame.args, frame.kwargs))
        flat_out, out_spec = tree_flatten(output)
        names = input_names(m, frame.args, frame.kwargs)
        dims = batch_dims_of(m, flat_in, flat_out, cap.b, cap.model_tensor, names)
        if dims is None:
            return False
        in_dims, out_dims = dims
        param_inputs = {
            i: self.plan.key_of(x) for i, x in enumerate(flat_in) if self.plan.is_trained(x) and in_dims[i] is None
        }
        inputs = [x.detach() if isinstance(x, Tensor) else x for x in flat_in]
        values = None
        if cap.values is not None:  # the forward's copies of parameters are freed before the recomputation
            values = self._unit_values(cap, m)
            for i, x in enumerate(flat_in):
                if isinstance(x, nn.Parameter) and self.plan.key_of(x) is not x:
                    inputs[i] = x.detach().clone()
        call = UnitCall(spec, inputs, in_dims, param_inputs, out_spec, out_dims, state=frame.state, values=values)
        for i, (y, d) in enumerate(zip(flat_out, out_dims)):
            if d is None or not isinstance(y, Tensor):
                continue
            call.fingerprints[i] = Fingerprint.of(y, d)
            call.outputs[i] = (y.shape, y.dtype, y.device)
            if y.requires_grad:
                y.register_hook(grad_hook(call.grads, i))
        cap.unit_calls.setdefault(m, []).append(call)
        return True

    # ------------------------------------------------------------------ ops
    def on_call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Examine one torch function call in a tracing region (see :mod:`~lightning_dp.engine.fallback.dispatch`)."""
        cap = self._capture
        assert cap is not None
        return self._dispatch.on_call(cap, func, args, kwargs)

    # ------------------------------------------------------------------ contributions
    def contributions(self) -> list[Contribution]:
        """The captured micro-batch's per-sample gradients of the units and traced ops (cached until
        :meth:`free`).

        Raises:
            DPMisconfigurationError: if no enclosing module keeps the batch first, or a recomputation does not
                reproduce the forward.
        """
        if self._groups is None:
            self._groups = self._compute()
        return [PerSampleGradients(name, dict(grads)) for name, grads in self._groups]  # fresh: merging mutates

    def _compute(self) -> list[tuple[str, dict[nn.Parameter, Tensor]]]:
        cap = self._capture
        if cap is None:
            return []
        check_resolved(cap)
        result = FallbackResult()
        self.last_methods, self.last_summary = result.methods, result.summary  # filled as computed
        try:
            compute_per_sample(cap, self.plan.units, self.plan.owner, self.plan.name_of, result)
        finally:
            self._produced = {name for name, _ in result.groups}
        return result.groups

    def dtypes_seen(self) -> list[torch.dtype]:
        """The parameter and autocast dtypes of the captured micro-batch (for the cross-check's tolerance)."""
        cap = self._capture
        return sorted(cap.dtypes, key=str) if cap is not None else []

    def explain(self, p: nn.Parameter, group: Contribution | None) -> str:
        """The likely cause of a parameter whose per-sample gradients do not add up to autograd's gradient (see
        :func:`~lightning_dp.engine.fallback.diagnostics.explain`).
        """
        layer = self.plan.owner.get(p)
        return explain_mismatch(p, group, self._capture, layer, self.plan.name_of, self._produced)

    def has_work(self) -> bool:
        """Whether the last capture recorded anything for the fallback."""
        cap = self._capture
        return cap is not None and (bool(cap.unit_calls) or bool(cap.ops) or cap.unresolved is not None)


__all__ = ["FunctionalFallback"]
