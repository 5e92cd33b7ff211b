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
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.hooks import RemovableHandle

from lightning_dp.console import notice
from lightning_dp.engine.contributions import Contribution, PerSampleGradients
from lightning_dp.engine.fallback.per_example import Fingerprint, ForwardState, forward_hooks_suppressed
from lightning_dp.engine.fallback.tracer import (
    _BROADCASTS,
    Derived,
    OpRecord,
    Recipe,
    _name,
    is_in_place,
    leaves_of,
    no_gradient,
)
from lightning_dp.engine.fallback.units import UnitCall, UnitRule, batch_dims_of, input_names, unit_rule_for
from lightning_dp.errors import DPMisconfigurationError

#: how many names an announcement lists before "and N more"
_LISTED = 8


@dataclass(eq=False)
class _Frame:
    """A module call in progress during the captured forward."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    in_unit: bool  #: this module or an enclosing one is a unit
    unit: bool  #: this module is the outermost unit of the stack
    state: ForwardState | None
    fold: str | None = None  #: why the examples cannot be told apart inside (set by a layer or an op)
    region: bool = False  #: the tracing mode was entered here


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


@dataclass
class _Capture:
    """What one captured micro-batch recorded."""

    b: int
    discover: bool
    active: bool = True  #: between start() and end(): the forward and backward of the micro-batch
    frames: list[_Frame] = field(default_factory=list)
    unit_calls: dict[nn.Module, list[UnitCall]] = field(default_factory=dict)
    ops: list[OpRecord] = field(default_factory=list)
    derived: dict[int, tuple[Tensor, Derived]] = field(default_factory=dict)
    constants: set[int] = field(default_factory=set)
    unresolved: str | None = None
    reenabled: list[nn.Parameter] = field(default_factory=list)
    dtypes: set[torch.dtype] = field(default_factory=set)  #: parameter and autocast dtypes of the micro-batch
    layouts: dict[nn.Module, str] = field(default_factory=dict)  #: layers whose output was not contiguous
    uses: dict[nn.Parameter, set[str]] = field(default_factory=dict)  #: modules whose ops used a parameter
    #: on a checked micro-batch, the layer calls an engine rule captured: (args, kwargs, output gradient holder)
    native_calls: dict[nn.Module, list[tuple[tuple, dict, dict[int, Tensor]]]] = field(default_factory=dict)
    inplace: list[str] = field(default_factory=list)  #: in-place traced ops (they can hide a tensor from its hooks)


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
    """

    def __init__(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        native: list[str],
        broadcast: list[nn.Parameter],
        param_names: dict[nn.Parameter, str],
        engine_name: str,
    ) -> None:
        self.model = module
        self.trainable = set(params)
        self.param_names = param_names
        self.engine_name = engine_name
        self.module_names: dict[nn.Module, str] = {m: n for n, m in module.named_modules()}
        modules = dict(module.named_modules())
        self.native: set[nn.Module] = {modules[n] for n in native if n in modules}
        self.owner: dict[nn.Parameter, nn.Module] = {}
        for _, m in module.named_modules():
            for p in m._parameters.values():
                if p is not None:
                    self.owner.setdefault(p, m)
        self.units: dict[nn.Module, UnitRule] = {}
        self._unit_names: list[str] = []
        self.regions: set[nn.Module | None] = set()
        self._announced: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self._mode = _TracingMode(self)
        self._depth = 0
        self._capture: _Capture | None = None
        self._static: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
        self._groups: list[tuple[str, dict[nn.Parameter, Tensor]]] | None = None
        self.last_methods: dict[str, str] = {}
        #: how the last micro-batch was covered: counts per ``"unit <Type> (<method>)"`` / ``"op <name> (<method>)"``
        self.last_summary: dict[str, int] = {}

        covered = {p for m in self.native for p in m._parameters.values() if p is not None} | set(broadcast)
        for m in module.modules():
            if unit_rule_for(m) is not None and self._trained_in(m) and not self._inside_unit(m):
                self._add_unit(m)
        leftover = [p for p in params if p not in covered and not self._inside_unit(self.owner[p])]
        for p in leftover:
            self.regions.add(self.owner[p])
        self._announce_plan(leftover)

    # ------------------------------------------------------------------ planning
    def _trained_in(self, m: nn.Module) -> bool:
        return any(p in self.trainable for p in m.parameters())

    def name_of(self, m: nn.Module | None) -> str:
        """``m``'s path in the model (for messages)."""
        return self._name(m)

    def _name(self, m: nn.Module | None) -> str:
        if m is None:
            return "<outside any module>"
        return self.module_names.get(m, type(m).__name__) or "<root>"

    def _inside_unit(self, m: nn.Module) -> bool:
        name = self.module_names.get(m)
        if name is None:
            return False
        return any(u == "" or name == u or name.startswith(u + ".") for u in self._unit_names)

    def _add_unit(self, m: nn.Module) -> None:
        """Make ``m`` a unit (replacing units inside it)."""
        name = self.module_names[m]
        inside = [u for u in self.units if self._is_within(self.module_names[u], name)]
        for u in inside:
            del self.units[u]
        params = {n: p for n, p in m.named_parameters() if p in self.trainable}
        cls = unit_rule_for(m) or UnitRule
        self.units[m] = cls(m, params)
        self._unit_names = [self.module_names[u] for u in self.units]
        self.regions = {r for r in self.regions if r is None or not self._inside_unit(r)}

    @staticmethod
    def _is_within(name: str, outer: str) -> bool:
        return outer == "" or name == outer or name.startswith(outer + ".")

    def covers(self, group: Contribution) -> bool:
        """Whether an engine group's parameters all belong to modules inside units (the unit's per-sample gradients
        replace the group's).
        """
        return bool(group.params) and all(self._inside_unit(self.owner[p]) for p in group.params if p in self.owner)

    def fallback_params(self) -> set[nn.Parameter]:
        """The trained parameters the fallback computes per-sample gradients for (as planned so far)."""
        out = {p for rule in self.units.values() for p in rule.params.values()}
        for r in self.regions:
            mods = [self.model] if r is None else [r]
            for m in mods:
                out |= {p for p in m._parameters.values() if p is not None and p in self.trainable}
        return out

    def _announce(self, key: str, message: str) -> None:
        if key not in self._announced:
            self._announced.add(key)
            notice(f"lightning_dp: {self.engine_name}: {message}")

    def _announce_plan(self, leftover: list[nn.Parameter]) -> None:
        if leftover:
            names = [f"'{self.param_names.get(p, '?')}'" for p in leftover]
            listed = ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
            self._announce(
                "plan-ops",
                f"no per-layer rule for {listed}: their per-sample gradients are computed with torch.func at the ops"
                " that use them (or, where the batch is folded inside a module, per module).",
            )
        for m in self.units:
            self._announce(
                f"unit:{self._name(m)}",
                f"'{self._name(m)}' ({type(m).__name__}) is recomputed per example as one unit with torch.func"
                f" ({type(self.units[m]).__name__}).",
            )

    # ------------------------------------------------------------------ hooks
    def attach(self) -> None:
        """Follow the module call stack (idempotent)."""
        if self._handles:
            return
        for m in self.model.modules():
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True, always_call=True))

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
        frame = _Frame(mod, args, kwargs, in_unit or is_unit, is_unit, state)
        cap.frames.append(frame)
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
            frame.fold = f"'{self._name(mod)}' ({type(mod).__name__}) is called on a folded batch"
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

    # ------------------------------------------------------------------ capture
    def start(self, batch_size: int, discover: bool) -> None:
        """Begin capturing a micro-batch (``discover``: watch every op of the forward)."""
        self.attach()
        cap = _Capture(batch_size, discover)
        for t in (*self.model.parameters(), *self.model.buffers()):
            cap.constants.add(id(t))
        cap.dtypes = {p.dtype for p in self.trainable}
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
            self._fold(frame, f"layer '{self._name(mod)}' ({type(mod).__name__}) gives {rows} for {cap.b} examples")
            return False
        if cap.discover and frame is not None and output.requires_grad:  # kept to tell a wrong rule from a hidden use
            grads: dict[int, Tensor] = {}
            output.register_hook(self._grad_hook(grads, 0))
            cap.native_calls.setdefault(mod, []).append((frame.args, frame.kwargs, grads))
        return True

    def _fold(self, frame: _Frame | None, reason: str) -> None:
        cap = self._capture
        assert cap is not None
        if frame is None:
            cap.unresolved = cap.unresolved or reason
        else:
            frame.fold = frame.fold or reason

    # ------------------------------------------------------------------ units
    def _model_tensor(self, x: Tensor) -> bool:
        """A parameter or buffer of the model (never batched, whatever its shape)."""
        cap = self._capture
        assert cap is not None
        return id(x) in cap.constants

    def _constant(self, x: Tensor) -> bool:
        cap = self._capture
        assert cap is not None
        return id(x) in cap.constants or self._static.get(id(x)) is x

    def _eligible(self, frame: _Frame, output: Any) -> bool:
        """Whether the frame's module keeps the batch in its inputs and outputs (so it can be a unit)."""
        cap = self._capture
        assert cap is not None
        if not self._trained_in(frame.module) and not any(
            isinstance(x, nn.Parameter) and x in self.trainable for x in tree_flatten((frame.args, frame.kwargs))[0]
        ):
            return False
        flat_in = tree_flatten((frame.args, frame.kwargs))[0]
        names = input_names(frame.module, frame.args, frame.kwargs)
        dims = batch_dims_of(frame.module, flat_in, tree_flatten(output)[0], cap.b, self._model_tensor, names)
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
            if not (self._constant(x) or (isinstance(x, nn.Parameter) and x in self.trainable)):
                return False
        return True

    def _resolve_fold(self, frame: _Frame) -> None:
        """Make the frame's module a unit, dropping what was recorded inside it in this micro-batch."""
        cap = self._capture
        assert cap is not None
        m = frame.module
        name = self._name(m)
        self._add_unit(m)
        inside = self.module_names[m]
        cap.unit_calls = {u: c for u, c in cap.unit_calls.items() if not self._is_within(self.module_names[u], inside)}
        cap.ops = [r for r in cap.ops if not self._is_within(self.module_names.get(r.module, "?"), inside)]
        self._announce(
            f"unit:{name}",
            f"'{name}' ({type(m).__name__}) is recomputed per example as one unit with torch.func: inside it,"
            f" {frame.fold}, so the examples cannot be told apart at a smaller scope.",
        )

    def _record_unit(self, frame: _Frame, output: Any) -> bool:
        """Record a call of a unit; False if its inputs and outputs do not have the micro-batch along their batch
        dimensions (the enclosing module must then be the unit).
        """
        cap = self._capture
        assert cap is not None
        m = frame.module
        flat_in, spec = tree_flatten((frame.args, frame.kwargs))
        flat_out, out_spec = tree_flatten(output)
        names = input_names(m, frame.args, frame.kwargs)
        dims = batch_dims_of(m, flat_in, flat_out, cap.b, self._model_tensor, names)
        if dims is None:
            return False
        in_dims, out_dims = dims
        param_inputs = {
            i: x
            for i, x in enumerate(flat_in)
            if isinstance(x, nn.Parameter) and x in self.trainable and in_dims[i] is None
        }
        inputs = [x.detach() if isinstance(x, Tensor) else x for x in flat_in]
        call = UnitCall(spec, inputs, in_dims, param_inputs, out_spec, out_dims, state=frame.state)
        for i, (y, d) in enumerate(zip(flat_out, out_dims)):
            if d is None or not isinstance(y, Tensor):
                continue
            call.fingerprints[i] = Fingerprint.of(y, d)
            call.outputs[i] = (y.shape, y.dtype, y.device)
            if y.requires_grad:
                y.register_hook(self._grad_hook(call.grads, i))
        cap.unit_calls.setdefault(m, []).append(call)
        return True

    @staticmethod
    def _grad_hook(store: dict[int, Tensor], i: int) -> Any:
        def hook(grad: Tensor) -> None:
            prev = store.get(i)
            store[i] = grad.detach() if prev is None else prev + grad.detach()

        return hook

    # ------------------------------------------------------------------ ops
    def on_call(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """Examine one torch function call in a tracing region (see :mod:`~lightning_dp.engine.fallback.tracer`)."""
        cap = self._capture
        assert cap is not None
        if no_gradient(func):
            out = func(*args, **kwargs)
            for y in tree_flatten(out)[0]:
                if isinstance(y, Tensor):
                    self._static[id(y)] = y
            return out
        b = cap.b
        flat, spec = tree_flatten((args, kwargs))
        top = cap.frames[-1] if cap.frames else None
        roles: list[tuple[str, Any]] = []
        tracked = batched = False
        other: Tensor | None = None
        all_constant = True
        for x in flat:
            if not isinstance(x, Tensor):
                roles.append(("const", x))
                continue
            entry = cap.derived.get(id(x))
            if entry is not None and entry[0] is x:
                roles.append(("derived", entry[1]))
                tracked = True
                all_constant = False
            elif isinstance(x, nn.Parameter) and x in self.trainable:
                if cap.discover:
                    cap.uses.setdefault(x, set()).add(self._name(top.module if top is not None else None))
                native = (
                    top is not None
                    and top.module in self.native
                    and any(x is q for q in top.module._parameters.values())
                )
                roles.append(("native" if native else "leaf", x))
                tracked |= not native
                all_constant = False
            elif self._constant(x):
                roles.append(("const", x))
            elif x.dim() > 0 and x.shape[0] == b:
                roles.append(("batched", x))
                batched = True
                all_constant = False
            else:
                roles.append(("other", x))
                other = other if other is not None else x
                all_constant = False
        if not tracked:
            out = func(*args, **kwargs)
            if all_constant:
                for y in tree_flatten(out)[0]:
                    if isinstance(y, Tensor):
                        self._static[id(y)] = y
            return out
        in_place = is_in_place(func, kwargs)
        first_batched = bool(roles) and roles[0][0] == "batched"
        if other is not None or (in_place and not first_batched):
            out = func(*args, **kwargs)
            what = f"a tensor of shape {tuple(other.shape)}" if other is not None else "an in-place write"
            self._fold(top, f"'{_name(func)}' combines a parameter with {what} (the batch is not its first dimension)")
            return out
        if batched:
            return self._combine(func, args, kwargs, spec, roles, top, in_place)
        return self._derive(func, args, kwargs, spec, roles)

    def _stack(self) -> tuple[nn.Module, ...]:
        cap = self._capture
        assert cap is not None
        return tuple(f.module for f in cap.frames)

    def _derive(self, func: Any, args: tuple, kwargs: dict, spec: Any, roles: list[tuple[str, Any]]) -> Any:
        cap = self._capture
        assert cap is not None
        items = [("leaf", x) if kind in ("leaf", "native") else (kind, x) for kind, x in roles]
        out = func(*args, **kwargs)
        out_flat = tree_flatten(out)[0]
        origins = [x.origin for kind, x in roles if kind == "derived"]
        origin = _common_prefix(origins) if origins else self._stack()
        src = next((x for kind, x in roles if kind in ("leaf", "native", "derived")), None)
        first = out_flat[0] if out_flat else None
        broadcast = (
            _name(func) in _BROADCASTS
            and cap.b != 1
            and isinstance(first, Tensor)
            and first.dim() > 0
            and first.shape[0] == cap.b
            and roles[0][0] in ("leaf", "native", "derived")
            and src is not None
        )
        recipe = Recipe(func, spec, items, broadcast)
        params = frozenset(leaves_of(items))
        for k, y in enumerate(out_flat):
            if isinstance(y, Tensor):
                cap.derived[id(y)] = (y, Derived(recipe, k, origin, params))
        return out

    def _combine(
        self,
        func: Any,
        args: tuple,
        kwargs: dict,
        spec: Any,
        roles: list[tuple[str, Any]],
        top: _Frame | None,
        in_place: bool,
    ) -> Any:
        cap = self._capture
        assert cap is not None
        b = cap.b
        items: list[tuple[str, Any]] = []
        batched: list[Tensor] = []
        for kind, x in roles:
            if kind == "batched":
                items.append(("batched", len(batched)))
                batched.append(x.detach().clone() if in_place else x.detach())
            elif kind in ("leaf", "derived"):
                items.append((kind, x))
            else:  # constants, non-tensors, and parameters of a layer whose own rule covers this call
                items.append(("const", x))
        state = ForwardState.record(batched)
        out = func(*args, **kwargs)
        if in_place:
            cap.inplace.append(f"'{_name(func)}' in '{self._name(top.module if top is not None else None)}'")
        out_flat = tree_flatten(out)[0]
        tensors = [(k, y) for k, y in enumerate(out_flat) if isinstance(y, Tensor)]
        if not tensors or any(y.dim() == 0 or y.shape[0] != b for _, y in tensors):
            shapes = ", ".join(str(tuple(y.shape)) for _, y in tensors)
            self._fold(top, f"'{_name(func)}' gives outputs of shape {shapes} for {b} examples")
            return out
        params = tuple(sorted(leaves_of(items), key=lambda p: self.param_names.get(p, "")))
        module = top.module if top is not None else None
        leaves = [k for k, _ in tensors]
        record = OpRecord(func, spec, items, batched, params, self._name(module), leaves, state=state, module=module)
        for k, y in tensors:
            record.fingerprints[k] = Fingerprint.of(y, 0)
            record.outputs[k] = (y.shape, y.dtype, y.device)
            if y.requires_grad:
                y.register_hook(self._grad_hook(record.grads, k))
        cap.ops.append(record)
        if cap.discover:
            self._note_region(roles, module)
        return out

    def _note_region(self, roles: list[tuple[str, Any]], module: nn.Module | None) -> None:
        """Where the mode must be active on later micro-batches for this call to be seen: the innermost module
        enclosing both the call and the first use of its parameters.
        """
        stacks = [x.origin for kind, x in roles if kind == "derived"] + [self._stack()]
        common = _common_prefix(stacks)
        region = common[-1] if common else None
        if region is not None and self._inside_unit(region):
            return
        if region not in self.regions:
            self.regions.add(region)
        for kind, x in roles:
            params = [x] if kind == "leaf" else (list(x.params) if kind == "derived" else [])
            for p in params:
                owner = self.owner.get(p)
                if owner in self.native:
                    self._announce(
                        f"stray:{self.param_names.get(p)}",
                        f"'{self.param_names.get(p, '?')}' is used outside its layer's forward (in"
                        f" '{self._name(module)}'): its per-sample gradients there are computed with torch.func at"
                        " that op.",
                    )

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
        if cap.unresolved is not None:
            raise DPMisconfigurationError(
                f"Per-sample gradients are not defined here: {cap.unresolved}, and no enclosing module of the model"
                " has the micro-batch as the first dimension of its inputs and outputs (the batch is folded with"
                " another dimension up to the top). Keep the examples along the first dimension (e.g."
                " batch_first=True), or register the batch dimensions of the enclosing module with"
                " lightning_dp.engine.register_batch_dims."
            )
        b = cap.b
        groups: list[tuple[str, dict[nn.Parameter, Tensor]]] = []
        checks: list[tuple[Tensor, str]] = []
        self.last_methods = {}
        self.last_summary = {}
        for m, calls in cap.unit_calls.items():
            rule = self.units[m]
            total: dict[nn.Parameter, Tensor] = {}
            for call in calls:
                per, outs = rule.per_sample(call, b)
                _add_into(total, per)
                for i, o in outs.items():
                    mismatch = call.fingerprints[i].mismatch(Fingerprint.of(o, call.out_dims[i]))  # type: ignore[arg-type]
                    checks.append((mismatch.max(), f"'{self._name(m)}' ({type(m).__name__})"))
            self.last_methods[self._name(m)] = f"unit:{rule.last_method}"
            key = f"unit {type(m).__name__} ({rule.last_method})"
            self.last_summary[key] = self.last_summary.get(key, 0) + 1
            if total:
                groups.append((self._name(m), total))
        by_owner: dict[str, dict[nn.Parameter, Tensor]] = {}
        for r in cap.ops:
            per, outs = r.per_sample(b)
            key = f"op {_name(r.func)} ({r.last_method})"
            self.last_summary[key] = self.last_summary.get(key, 0) + 1
            for p, g in per.items():
                owner = self._name(self.owner.get(p))
                _add_into(by_owner.setdefault(owner, {}), {p: g})
                self.last_methods[owner] = f"ops:{r.last_method}"
            for i, o in outs.items():
                checks.append(
                    (r.fingerprints[i].mismatch(Fingerprint.of(o, 0)).max(), f"'{_name(r.func)}' in '{r.where}'")
                )
        groups += list(by_owner.items())
        self._produced = {name for name, _ in groups}
        if checks:
            worst = torch.stack([c for c, _ in checks])
            k = int(worst.argmax())
            if not bool(worst[k] <= 1):  # NaN counts as a mismatch
                raise DPMisconfigurationError(
                    f"Recomputing {checks[k][1]} per example with torch.func did not reproduce the forward that"
                    f" produced the loss ({float(worst[k]):.3g} times the tolerance for rounding),"
                    " so its per-sample gradients would not be those of the real forward. Usual causes: random ops"
                    " whose draws cannot be replayed per example (call the module in eval mode or set its dropout to"
                    " 0), a forward that depends on other examples of the batch, state changed by the forward"
                    " (running statistics, caches), or a forward hook that alters the output."
                )
        return groups

    def dtypes_seen(self) -> list[torch.dtype]:
        """The parameter and autocast dtypes of the captured micro-batch (for the cross-check's tolerance)."""
        cap = self._capture
        return sorted(cap.dtypes, key=str) if cap is not None else []

    def explain(self, p: nn.Parameter, group: Contribution | None) -> str:
        """The likely cause of a parameter whose per-sample gradients do not add up to autograd's gradient: a use
        outside the forward that nothing saw, a layout its layer's rule does not handle, or a wrong rule.
        """
        from lightning_dp.engine.ghost_layers.base import registered_ghost_layer
        from lightning_dp.engine.rules import find_rule

        cap = self._capture
        layer = self.owner.get(p)
        where = f"'{self._name(layer)}' ({type(layer).__name__})"
        uses = sorted(cap.uses.get(p, set())) if cap is not None else []
        elsewhere = [u for u in uses if u != self._name(layer)]
        if group is None:
            if cap is not None and cap.discover and not uses:
                return (
                    f"use outside the forward: no layer rule and no torch function call saw {where}'s parameter used"
                    " during the captured forward, yet autograd gives it a gradient. It is used where hooks and"
                    " torch function modes cannot see it (a torch.ops or C++ extension call, a custom"
                    " autograd.Function's internals, code outside the captured forward and backward). Use it through"
                    " torch functions in the forward, or register a rule for the module that uses it"
                    " (lightning_dp.engine.register_grad_sampler)."
                )
            hidden = (
                f" An in-place op ({', '.join(cap.inplace)}) overwrote a tensor after a layer's hook was registered on"
                " it, and autograd then may not call the hook: build the model without in-place ops (e.g. timm's"
                " LayerScale(inplace=False))."
                if cap is not None and cap.inplace
                else ""
            )
            return (
                f"use outside the forward: the parameter of {where} got no per-sample gradient (used in"
                f" {', '.join(elsewhere) or 'an unhooked place'}), yet autograd gives it a gradient.{hidden}"
            )
        if group.name in getattr(self, "_produced", set()):
            return (
                f"rule: the torch.func fallback's per-sample gradients for '{group.name}' do not add up; the"
                " parameter is also used where the fallback did not see it (outside the traced module's forward)."
            )
        rule = None if layer is None else (registered_ghost_layer(layer) or find_rule(layer))
        rule_name = getattr(rule, "__qualname__", type(rule).__name__) if rule is not None else "?"
        rule_name = f"{getattr(rule, '__module__', '')}.{rule_name}".lstrip(".")
        own = self._own_gradient(p, layer)
        if own is not None and cap is not None:
            total = group.clipped_sum(torch.ones(cap.b, device=p.device)).get(p)
            if total is not None and bool((total - own).norm() <= 1e-3 * own.norm() + 1e-30):
                return (
                    f"use outside the forward: the per-sample rule {rule_name} of layer {where} is right (its"
                    " per-sample gradients add up to the layer's own gradient), but the parameter also gets gradient"
                    " from a use that neither the layer's hooks nor a traced torch function saw: inside a custom"
                    " autograd.Function, a C++ extension, or code outside the captured forward and backward. Use the"
                    " parameter through its layer or torch functions, or register a rule for the module that uses it."
                )
        layout = cap.layouts.get(layer) if cap is not None and layer is not None else None
        if layout is not None:
            return (
                f"layout: layer {where} ran on a {layout} tensor, and its per-sample rule {rule_name} gives wrong"
                " per-sample gradients for it (a rule that assumes contiguous NCHW). Register a rule that handles"
                " any memory format, or make the activations contiguous."
            )
        extra = f" It is also used in {', '.join(elsewhere)}." if elsewhere else ""
        return (
            f"rule: the per-sample rule {rule_name} of layer {where} is wrong for this layer's configuration"
            f" (or its forward differs from what the rule assumes).{extra} Register a correct rule with"
            " lightning_dp.engine.register_grad_sampler, or unregister it to use the torch.func fallback."
        )

    def _own_gradient(self, p: nn.Parameter, layer: nn.Module | None) -> Tensor | None:
        """The gradient ``p`` gets through its layer's own calls on the checked micro-batch (recomputed from the
        recorded inputs and output gradients), or None if not recorded.
        """
        cap = self._capture
        if cap is None or layer is None or not cap.native_calls.get(layer):
            return None
        total = torch.zeros_like(p, dtype=torch.float32)
        with torch.enable_grad(), forward_hooks_suppressed(layer):
            for args, kwargs, grads in cap.native_calls[layer]:
                if 0 not in grads:
                    continue
                out = layer(*args, **kwargs)
                (g,) = torch.autograd.grad(out, [p], grads[0], allow_unused=True)
                if g is not None:
                    total += g.float()
        return total

    def has_work(self) -> bool:
        """Whether the last capture recorded anything for the fallback."""
        cap = self._capture
        return cap is not None and (bool(cap.unit_calls) or bool(cap.ops) or cap.unresolved is not None)


def _add_into(total: dict[nn.Parameter, Tensor], part: dict[nn.Parameter, Tensor]) -> None:
    for p, g in part.items():
        prev = total.get(p)
        total[p] = g if prev is None else prev + g


def _common_prefix(stacks: list[tuple[nn.Module, ...]]) -> tuple[nn.Module, ...]:
    if not stacks:
        return ()
    out: list[nn.Module] = []
    for level in zip(*stacks):
        if all(m is level[0] for m in level):
            out.append(level[0])
        else:
            break
    return tuple(out)


__all__ = ["FunctionalFallback"]
