"""Per-sample gradients of parameters that no layer rule covers, traced at the level of the ops that use them.

Inside the forward of the modules that use such a parameter (a layer-scale ``gamma``, a ``cls_token`` or
``pos_embed`` of any model, Beit's ``q_bias``/``v_bias``, a relative-position table, a ``qkv.weight`` used through
``F.linear`` outside its layer), a ``TorchFunctionMode`` sees every torch function call. A call whose tensor arguments
are only parameters, constants (buffers) and tensors derived from them is *derived*: its result is tracked with the
recipe that made it (``table[index].view(...)``, ``cat((q_bias, k_bias, v_bias))``, ``cls_token.expand(B, -1, -1)``).
The first call that combines a tracked tensor with the batch (``x * gamma``, ``cat((cls, x), 1)``,
``F.linear(x, W, qkv_bias)``) is *recorded*: its batched inputs, its output gradient (a tensor hook) and a fingerprint
of its output. Per example ``i`` the per-sample gradient of the parameters is then ``vjp(θ ↦ op(recipe(θ), x_i))(g_i)``
(:func:`~lightning_dp.engine.fallback.per_example.per_example_vjp`): one op recomputed per example, not a module.

A tracked tensor expanded to the batch (``cls_token.expand(B, -1, -1)``) is replayed with one row per example; all
its rows are equal, so any op sees the same values. A call that mixes a tracked tensor with a tensor that is neither
batched (first dimension = the micro-batch) nor constant cannot be split by example at this level (a batch folded with
windows or patches); the planner then moves to the smallest enclosing module that keeps the batch first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_dp.engine.fallback.per_example import BatchedArg, Fingerprint, ForwardState, per_example_vjp

#: calls that expand a tensor along a new or size-1 first dimension: replayed with one row per example
BROADCASTS = {"expand", "expand_as", "repeat", "broadcast_to"}
#: calls through which no gradient flows, or that only set autograd flags: passed through, results are constants
_NO_GRADIENT = {"detach", "detach_", "requires_grad_", "retain_grad", "register_hook", "data", "grad", "_version"}


def no_gradient(func: Any) -> bool:
    """Whether a call neither carries gradient to its result nor computes (``p.detach()``, ``p.data``,
    ``p.requires_grad_()``).
    """
    name = op_name(func)
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name in _NO_GRADIENT


@dataclass(eq=False)
class Recipe:
    """How a derived call is replayed from the parameters: the function and its flattened arguments, each
    ``("leaf", parameter)``, ``("derived", Derived)`` or ``("const", value)``.
    """

    func: Any
    spec: Any
    items: list[tuple[str, Any]]
    broadcast: bool = False  #: expanded to the batch along dim 0 (replayed with one row)


@dataclass(eq=False)
class Derived:
    """A tensor computed from parameters and constants only: output ``index`` of ``recipe``.

    Attributes:
        origin: the module call stack when the first parameter of its recipe was used (for the tracing region).
    """

    recipe: Recipe
    index: int
    origin: tuple[nn.Module, ...]
    params: frozenset[nn.Parameter]


def op_name(func: Any) -> str:
    """The name of a torch function or Tensor method (for rules and messages)."""
    return getattr(func, "__name__", type(func).__name__)


def out_of_place(func: Any) -> Any:
    """The out-of-place function of an in-place Tensor method (``mul_`` → ``mul``, ``__iadd__`` → ``__add__``), or
    ``func`` itself.
    """
    name = op_name(func)
    if name.startswith("__i") and name.endswith("__"):
        return getattr(torch.Tensor, "__" + name[3:], func)
    if name.endswith("_") and not name.endswith("__"):
        return getattr(torch.Tensor, name[:-1], func)
    return func


def is_in_place(func: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a call writes into one of its arguments (an in-place method or an ``out=`` argument)."""
    return out_of_place(func) is not func or kwargs.get("out") is not None


def _per_example_broadcast(recipe: Recipe, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """The call of a broadcasting recipe with one row instead of the batch along dim 0."""
    name = op_name(recipe.func)
    if name == "expand_as":
        return torch.Tensor.expand, (args[0], (1, *args[1].shape[1:])), {}
    if name == "broadcast_to":
        shape = tuple(args[1]) if len(args) > 1 else tuple(kwargs["size"])
        return recipe.func, (args[0], (1, *shape[1:])), {}
    sizes = args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    if not sizes and "size" in kwargs:
        sizes = tuple(kwargs.pop("size"))
    return recipe.func, (args[0], (1, *sizes[1:])), kwargs


class Replay:
    """Recomputes derived tensors from given parameter values (memoised per recipe)."""

    def __init__(self, values: dict[nn.Parameter, Tensor]) -> None:
        self.values = values
        self.memo: dict[int, list[Any]] = {}

    def items(self, items: list[tuple[str, Any]], xs: list[Tensor] | None = None) -> list[Any]:
        """The flattened arguments with parameters, derived tensors and batched inputs (``xs``) filled in."""
        flat: list[Any] = []
        for kind, v in items:
            if kind == "leaf":
                flat.append(self.values[v])
            elif kind == "derived":
                flat.append(self.derived(v))
            elif kind == "batched":
                assert xs is not None
                flat.append(xs[v])
            else:
                flat.append(v)
        return flat

    def derived(self, d: Derived) -> Tensor:
        """The value of ``d`` for the given parameters (one row per example if expanded to the batch)."""
        key = id(d.recipe)
        if key not in self.memo:
            r = d.recipe
            args, kwargs = tree_unflatten(self.items(r.items), r.spec)
            func = r.func
            if r.broadcast:
                func, args, kwargs = _per_example_broadcast(r, tuple(args), dict(kwargs))
            out, _ = tree_flatten(func(*args, **kwargs))
            self.memo[key] = out
        return self.memo[key][d.index]


@dataclass(eq=False)
class OpRecord:
    """One recorded call that combined tracked tensors with the batch.

    Attributes:
        func: the function (its out-of-place form is recomputed).
        spec: the pytree structure of ``(args, kwargs)``.
        items: the flattened arguments (``"leaf"``, ``"derived"``, ``"batched"`` (an index into ``batched``) or
            ``"const"``).
        batched: the batched arguments (detached; copied before an in-place call).
        params: the parameters whose per-sample gradients the call gives.
        where: the name of the module whose forward made the call (for messages).
        out_leaves: the positions of the output's tensor leaves.
        grads: per output leaf position, its gradient (set by tensor hooks).
        fingerprints: per output leaf position, its fingerprint.
        outputs: per output leaf position, ``(shape, dtype, device)``.
        state: the generators and autocast before the call.
    """

    func: Any
    spec: Any
    items: list[tuple[str, Any]]
    batched: list[Tensor]
    params: tuple[nn.Parameter, ...]
    where: str
    out_leaves: list[int]
    grads: dict[int, Tensor] = field(default_factory=dict)
    fingerprints: dict[int, Fingerprint] = field(default_factory=dict)
    outputs: dict[int, tuple[torch.Size, torch.dtype, torch.device]] = field(default_factory=dict)
    state: ForwardState | None = None
    module: nn.Module | None = None  #: the module whose forward made the call (None: outside any module)
    last_method: str = ""
    #: the parameters' values as the forward used them (a rekeying layout, see :class:`Capture.keep_value
    #: <lightning_dp.engine.fallback.capture.Capture>`); None: the parameters themselves, read now
    values: dict[nn.Parameter, Tensor] | None = None

    def value_of(self, p: nn.Parameter) -> Tensor:
        """The value of trained parameter ``p`` that the forward used, detached (a new tensor object each call)."""
        value = None if self.values is None else self.values.get(p)
        return p.detach() if value is None else value.detach()

    def per_sample(self, b: int) -> tuple[dict[nn.Parameter, Tensor], dict[int, Tensor]]:
        """Per-sample gradients of :attr:`params` and the recomputed outputs (per output leaf, as a batch; none when
        a closed form of :mod:`~lightning_dp.engine.fallback.op_rules` applies, which recomputes nothing).
        """
        closed = self._closed_form(b)
        if closed is not None:
            self.last_method = "closed form"
            return closed, {}
        names = {p: f"p{k}" for k, p in enumerate(self.params)}
        primals = {names[p]: self.value_of(p) for p in self.params}
        func = out_of_place(self.func)
        items, spec, leaves = self.items, self.spec, self.out_leaves

        def fn(ps: dict[str, Tensor], xs: list[Tensor]) -> tuple[Tensor, ...]:
            replay = Replay({p: ps[names[p]] for p in names})
            args, kwargs = tree_unflatten(replay.items(items, xs), spec)
            out, _ = tree_flatten(func(*args, **kwargs))
            return tuple(out[i] for i in leaves)

        cotangents = []
        for i in leaves:
            g = self.grads.get(i)
            if g is None:
                shape, dtype, device = self.outputs[i]
                g = torch.zeros(shape, dtype=dtype, device=device)
            cotangents.append(BatchedArg(g, 0))
        grads, outs, how = per_example_vjp(
            fn, primals, [BatchedArg(x, 0) for x in self.batched], cotangents, b, self.state
        )
        self.last_method = how
        return {p: grads[names[p]] for p in self.params}, dict(zip(leaves, outs))

    def _closed_form(self, b: int) -> dict[nn.Parameter, Tensor] | None:
        """Per-sample gradients by an op rule (``x * gamma``, ``x + t``, ``F.linear``, norms), or None."""
        from lightning_dp.engine.fallback.op_rules import OP_RULES

        rule = OP_RULES.get(op_name(out_of_place(self.func)))
        if rule is None or len(self.out_leaves) != 1:
            return None
        # a tensor expanded to the batch is replayed with one row, broadcast along the batch as the rules expect
        replay = Replay({p: self.value_of(p) for p in self.params})
        tracked: dict[int, tuple[str, Any, Tensor]] = {}
        flat: list[Any] = []
        for kind, v in self.items:
            if kind == "batched":
                flat.append(self.batched[v])
                continue
            if kind == "const":
                flat.append(v)
                continue
            value = self.value_of(v) if kind == "leaf" else replay.derived(v)
            if id(value) in tracked:  # the same tensor twice: not a simple form
                return None
            tracked[id(value)] = (kind, v, value)
            flat.append(value)
        args, kwargs = tree_unflatten(flat, self.spec)
        leaf = self.out_leaves[0]
        grad = self.grads.get(leaf)
        if grad is None:
            shape, dtype, device = self.outputs[leaf]
            grad = torch.zeros(shape, dtype=dtype, device=device)
        cots = rule(list(args), dict(kwargs), set(tracked), grad, b)
        if cots is None or set(cots) != set(tracked):
            return None
        per: dict[nn.Parameter, Tensor] = {}
        pulled: list[tuple[Derived, Tensor, Tensor]] = []
        for key, cot in cots.items():
            kind, v, value = tracked[key]
            if kind == "leaf":
                _accumulate(per, v, cot.reshape(b, *v.shape).float())
            else:
                pulled.append((v, value, cot))
        if pulled:
            params = list(leaves_of([("derived", d) for d, _, _ in pulled]))

            def recipe(*ps: Tensor) -> tuple[Tensor, ...]:
                r = Replay(dict(zip(params, ps)))
                return tuple(r.derived(d) for d, _, _ in pulled)

            _, vjp_fn = torch.func.vjp(recipe, *[self.value_of(p) for p in params])
            cots_in = tuple(cot.reshape(b, *value.shape).to(value.dtype) for _, value, cot in pulled)
            grads = torch.func.vmap(vjp_fn)(cots_in)
            for p, g in zip(params, grads):
                _accumulate(per, p, g.float())
        return per


def _accumulate(per: dict[nn.Parameter, Tensor], p: nn.Parameter, g: Tensor) -> None:
    prev = per.get(p)
    per[p] = g if prev is None else prev + g


def leaves_of(items: list[tuple[str, Any]]) -> set[nn.Parameter]:
    """The parameters a call's arguments depend on (directly or through derived tensors)."""
    out: set[nn.Parameter] = set()
    for kind, v in items:
        if kind == "leaf":
            out.add(v)
        elif kind == "derived":
            out |= v.params
    return out


__all__ = [
    "BROADCASTS",
    "Derived",
    "OpRecord",
    "Recipe",
    "Replay",
    "is_in_place",
    "leaves_of",
    "no_gradient",
    "op_name",
    "out_of_place",
]
