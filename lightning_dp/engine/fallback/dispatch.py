"""The fallback's op dispatch: each torch function call of a tracing region, examined while the forward runs.

A call that combines a trained parameter (or a tensor derived from parameters only) with the micro-batch is recorded
as an :class:`~lightning_dp.engine.fallback.tracer.OpRecord` (its per-sample gradients are computed per example at
clipping time); a call on parameters only is remembered as a recipe (:class:`~lightning_dp.engine.fallback.tracer.
Derived`) to replay; a call that mixes a parameter with a tensor whose first dimension is not the batch marks the
enclosing module as folding the examples (it becomes a unit, see :mod:`~lightning_dp.engine.fallback.discovery`).
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_dp.engine.fallback.capture import Capture, Frame, common_prefix, grad_hook
from lightning_dp.engine.fallback.discovery import FallbackPlan
from lightning_dp.engine.fallback.per_example import Fingerprint, ForwardState
from lightning_dp.engine.fallback.tracer import (
    BROADCASTS,
    Derived,
    OpRecord,
    Recipe,
    is_in_place,
    leaves_of,
    no_gradient,
    op_name,
)


class OpDispatcher:
    """Examines the torch function calls of the fallback's tracing regions.

    Args:
        plan: the fallback's plan (its tracing regions grow on the micro-batches checked against autograd).
    """

    def __init__(self, plan: FallbackPlan) -> None:
        self.plan = plan
        self._static: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()

    def constant(self, cap: Capture, x: Tensor) -> bool:
        """A parameter or buffer of the model, or a tensor computed from constants only."""
        return cap.model_tensor(x) or self._static.get(id(x)) is x

    def _layout_own(self, cap: Capture, x: Tensor) -> bool:
        """Under a rekeying layout, a trained parameter that the forward's layers see as another object (FSDP2's
        sharded parameter): a call on it itself is the layout's own work (its all-gather), not a use by the model.
        """
        if cap.canonical is None or not isinstance(x, nn.Parameter):
            return False
        return cap.key_of(x) is x and bool(self.plan.layout.aliases(x))

    def on_call(self, cap: Capture, func: Any, args: tuple, kwargs: dict) -> Any:
        """Run one torch function call of a tracing region, recording what the per-sample gradients need."""
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
        live: list[tuple[nn.Parameter, Tensor]] = []  # (trained parameter, the object the forward uses for it)
        for x in flat:
            if not isinstance(x, Tensor):
                roles.append(("const", x))
                continue
            entry = cap.derived.get(id(x))
            if entry is not None and entry[0] is x and not (cap.canonical is not None and self.plan.is_trained(x)):
                # (under a rekeying layout a trained parameter's stand-in is a leaf, however the layout made it)
                roles.append(("derived", entry[1]))
                tracked = True
                all_constant = False
            elif self._layout_own(cap, x):
                roles.append(("const", x))
            elif self.plan.is_trained(x):
                key = cap.key_of(x)  # type: ignore[arg-type] # the trained parameter x stands for (FSDP2: unsharded)
                if cap.discover:
                    cap.uses.setdefault(key, set()).add(self.plan.name_of(top.module if top is not None else None))
                native = (
                    top is not None
                    and top.module in self.plan.native
                    and any(x is q for q in top.module._parameters.values())
                )
                live.append((key, x))
                roles.append(("native" if native else "leaf", key))
                tracked |= not native
                all_constant = False
            elif self.constant(cap, x):
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
            if other is not None and cap.discover:  # a layer on a folded batch: an enclosing module may become a unit
                _keep(cap, live)  # whose recomputation needs its parameters' values as the forward used them
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
            hint = "the batch is not its first dimension"
            if other is not None and other.dim() == 0 and top is None:
                hint = (
                    "outside every module: a loss term that depends on the parameters but not on the examples, such as"
                    " a penalty λ·Σp², has no per-sample gradient; use the optimizer's weight_decay instead, e.g."
                    " torch.optim.AdamW(params, weight_decay=...)"
                )
            cap.fold(top, f"'{op_name(func)}' combines a parameter with {what} ({hint})")
            _keep(cap, live)  # the enclosing module may become a unit
            return out
        if batched:
            _keep(cap, live)  # recorded (recomputed later) or folded (a unit later)
            return self._combine(cap, func, args, kwargs, spec, roles, top, in_place)
        out = self._derive(cap, func, args, kwargs, spec, roles)
        if cap.values is not None and any(isinstance(y, Tensor) for y in tree_flatten(out)[0]):  # not a getter
            _keep(cap, live)
        return out

    def _derive(
        self, cap: Capture, func: Any, args: tuple, kwargs: dict, spec: Any, roles: list[tuple[str, Any]]
    ) -> Any:
        items = [("leaf", x) if kind in ("leaf", "native") else (kind, _kept(cap, x)) for kind, x in roles]
        out = func(*args, **kwargs)
        out_flat = tree_flatten(out)[0]
        origins = [x.origin for kind, x in roles if kind == "derived"]
        origin = common_prefix(origins) if origins else cap.stack()
        src = next((x for kind, x in roles if kind in ("leaf", "native", "derived")), None)
        first = out_flat[0] if out_flat else None
        broadcast = (
            op_name(func) in BROADCASTS
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
        cap: Capture,
        func: Any,
        args: tuple,
        kwargs: dict,
        spec: Any,
        roles: list[tuple[str, Any]],
        top: Frame | None,
        in_place: bool,
    ) -> Any:
        b = cap.b
        items: list[tuple[str, Any]] = []
        batched: list[Tensor] = []
        for kind, x in roles:
            if kind == "batched":
                items.append(("batched", len(batched)))
                batched.append(x.detach().clone() if in_place else x.detach())
            elif kind in ("leaf", "derived"):
                items.append((kind, x))
            elif kind == "native" and cap.values is not None:  # its value as the forward used it
                items.append(("const", cap.values.get(x, x)))
            else:  # constants, non-tensors, and parameters of a layer whose own rule covers this call
                items.append(("const", _kept(cap, x)))
        state = ForwardState.record(batched)
        out = func(*args, **kwargs)
        if in_place:
            cap.inplace.append(f"'{op_name(func)}' in '{self.plan.name_of(top.module if top is not None else None)}'")
        out_flat = tree_flatten(out)[0]
        tensors = [(k, y) for k, y in enumerate(out_flat) if isinstance(y, Tensor)]
        if not tensors or any(y.dim() == 0 or y.shape[0] != b for _, y in tensors):
            shapes = ", ".join(str(tuple(y.shape)) for _, y in tensors)
            cap.fold(top, f"'{op_name(func)}' gives outputs of shape {shapes} for {b} examples")
            return out
        params = tuple(sorted(leaves_of(items), key=lambda p: self.plan.param_names.get(p, "")))
        module = top.module if top is not None else None
        leaves = [k for k, _ in tensors]
        where = self.plan.name_of(module)
        record = OpRecord(
            func, spec, items, batched, params, where, leaves, state=state, module=module, values=cap.values
        )
        for k, y in tensors:
            record.fingerprints[k] = Fingerprint.of(y, 0)
            record.outputs[k] = (y.shape, y.dtype, y.device)
            if y.requires_grad:
                y.register_hook(grad_hook(record.grads, k))
        cap.ops.append(record)
        if cap.discover:
            self._note_region(cap, roles, module)
        return out

    def _note_region(self, cap: Capture, roles: list[tuple[str, Any]], module: nn.Module | None) -> None:
        """Where the mode must be active on later micro-batches for this call to be seen: the innermost module
        enclosing both the call and the first use of its parameters.
        """
        plan = self.plan
        stacks = [x.origin for kind, x in roles if kind == "derived"] + [cap.stack()]
        common = common_prefix(stacks)
        region = common[-1] if common else None
        if region is not None and plan.inside_unit(region):
            return
        if region not in plan.regions:
            plan.regions.add(region)
        for kind, x in roles:
            params = [x] if kind == "leaf" else (list(x.params) if kind == "derived" else [])
            for p in params:
                owner = plan.owner.get(p)
                if owner in plan.native:
                    plan.announce(
                        f"stray:{plan.param_names.get(p)}",
                        f"'{plan.param_names.get(p, '?')}' is used outside its layer's forward (in"
                        f" '{plan.name_of(module)}'): its per-sample gradients there are computed with torch.func at"
                        " that op.",
                    )


def _keep(cap: Capture, live: list[tuple[nn.Parameter, Tensor]]) -> None:
    """Under a rekeying layout, keep the values of the trained parameters a call used (the forward's copies are freed
    before the per-example recomputation).
    """
    for key, x in live:
        cap.keep_value(key, x)


def _kept(cap: Capture, x: Any) -> Any:
    """``x``, or under a rekeying layout, for a parameter that stands for another (a frozen one, unsharded by
    FSDP2), its value kept now (the forward's copy is freed before the per-example recomputation).
    """
    if cap.values is None or not isinstance(x, nn.Parameter):
        return x
    key = cap.key_of(x)
    if key is x:
        return x
    cap.keep_value(key, x)
    return cap.values[key]


__all__ = ["OpDispatcher"]
