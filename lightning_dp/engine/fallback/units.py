"""Modules treated as one unit: their per-sample gradients come from recomputing the module per example.

A *unit* is a module whose own parameters (and those of its submodules) have no per-layer rule that can work there:
an ``nn.LSTM``, a Swin block that folds windows into the batch, a MobileViT block that folds patches. Each call of the
unit during the captured forward is recorded (:class:`UnitCall`: inputs, the generators' state, the output's
gradient); per-sample gradients are then ``vjp`` of ``functional_call(unit, θ, inputs_i)`` per example
(:func:`~lightning_dp.engine.fallback.per_example.per_example_vjp`).

Which dimension indexes the examples is the first by default; a module type can say otherwise with
:func:`register_batch_dims` (recurrent layers keep their hidden states batch-second). A module type can also bring its
own way of computing per-sample gradients from the recorded calls (:func:`register_unit_rule`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import MappingKey, SequenceKey, tree_flatten, tree_flatten_with_path, tree_unflatten

from lightning_dp.engine.fallback.per_example import (
    BatchedArg,
    Fingerprint,
    ForwardState,
    forward_hooks_suppressed,
    per_example_vjp,
)

#: ``fn(module, flat_inputs, flat_outputs, b) -> (input dims, output dims)``: per flattened leaf, the dimension that
#: indexes the examples, or None for a leaf that is not batched. Returning None for the whole means "not batched".
BatchDims = Callable[[nn.Module, list[Any], list[Any], int], "tuple[list[int | None], list[int | None]] | None"]

_BATCH_DIMS: dict[type[nn.Module], BatchDims] = {}


def register_batch_dims(*module_types: type[nn.Module]) -> Callable[[BatchDims], BatchDims]:
    """Register how to find the batch dimension of the inputs and outputs of modules of these types (and their
    subclasses), for modules that do not keep the examples first (``nn.LSTM``'s hidden state is ``(layers, B, H)``).

    Example:
        >>> @register_batch_dims(MySeqFirstBlock)  # doctest: +SKIP
        ... def seq_first(module, inputs, outputs, b):
        ...     return [1 if isinstance(x, Tensor) else None for x in inputs], [1 for _ in outputs]
    """

    def decorator(fn: BatchDims) -> BatchDims:
        for t in module_types:
            _BATCH_DIMS[t] = fn
        return fn

    return decorator


def input_names(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """Per leaf of ``tree_flatten((args, kwargs))``, the name of the ``forward`` parameter it belongs to (for batch
    dimension callbacks that need to know which input is which).
    """
    params = [
        n
        for n, p in inspect.signature(module.forward).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    names: list[str] = []
    for path, _ in tree_flatten_with_path((args, kwargs))[0]:
        top, key = path[0], path[1] if len(path) > 1 else None
        if top.idx == 0 and isinstance(key, SequenceKey):
            names.append(params[key.idx] if key.idx < len(params) else f"*{key.idx}")
        elif isinstance(key, MappingKey):
            names.append(str(key.key))
        else:
            names.append("?")
    return names


@register_batch_dims(nn.MultiheadAttention)
def _mha_batch_dims(
    module: nn.Module, inputs: list[Any], outputs: list[Any], b: int, names: list[str] | None = None
) -> tuple[list[int | None], list[int | None]] | None:
    """``nn.MultiheadAttention``: query/key/value and the output batch-first or batch-second (``batch_first``), the
    key padding mask and the attention weights batch-first; a 2-D attention mask is shared; a 3-D one (``B·heads``
    rows) is not per-sample at this level.
    """
    seq = 0 if module.batch_first else 1
    in_dims: list[int | None] = []
    for name, x in zip(names or [], inputs):
        if not isinstance(x, Tensor):
            in_dims.append(None)
        elif name in ("query", "key", "value"):
            if x.dim() != 3 or x.shape[seq] != b:
                return None
            in_dims.append(seq)
        elif name == "key_padding_mask":
            in_dims.append(0 if x.dim() == 2 else None)
        elif name == "attn_mask" and x.dim() == 3:
            return None
        else:
            in_dims.append(None)
    out_dims = [None if not isinstance(y, Tensor) else (seq if i == 0 else 0) for i, y in enumerate(outputs)]
    return in_dims, out_dims


def default_batch_dims(
    module: nn.Module, inputs: list[Any], outputs: list[Any], b: int, constant: Callable[[Tensor], bool]
) -> tuple[list[int | None], list[int | None]] | None:
    """Batch first: a tensor input is batched if its first dimension has ``b`` rows and it is not a parameter or
    buffer of the model (a tensor made in the forward with the batch's size, e.g. a mask, is sliced per example too; a
    coincidence of sizes would change the recomputed output, which is checked); every tensor output must be batched.
    """
    in_dims: list[int | None] = []
    for x in inputs:
        in_dims.append(0 if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == b and not constant(x) else None)
    out_dims: list[int | None] = []
    for y in outputs:
        if not isinstance(y, Tensor):
            out_dims.append(None)
        elif y.dim() > 0 and y.shape[0] == b:
            out_dims.append(0)
        else:
            return None
    return in_dims, out_dims


def batch_dims_of(
    module: nn.Module,
    inputs: list[Any],
    outputs: list[Any],
    b: int,
    constant: Callable[[Tensor], bool],
    names: list[str] | None = None,
) -> tuple[list[int | None], list[int | None]] | None:
    """The registered batch dimensions of ``module``'s flattened inputs and outputs, or the default (batch first);
    None if its outputs are not batched.
    """
    for t in type(module).__mro__:
        fn = _BATCH_DIMS.get(t)
        if fn is not None:
            if "names" in inspect.signature(fn).parameters:
                return fn(module, inputs, outputs, b, names=names)
            return fn(module, inputs, outputs, b)
    return default_batch_dims(module, inputs, outputs, b, constant)


@register_batch_dims(nn.RNNBase)
def _rnn_batch_dims(
    module: nn.Module, inputs: list[Any], outputs: list[Any], b: int
) -> tuple[list[int | None], list[int | None]] | None:
    """``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``: the sequence is batch-first or batch-second (``batch_first``), hidden
    states ``(layers, B, H)`` are batch-second. Packed sequences and unbatched inputs are not per-sample.
    """
    seq_dim = 0 if module.batch_first else 1
    tensors = [x for x in inputs if isinstance(x, Tensor)]
    if not tensors or tensors[0].dim() != 3 or tensors[0].shape[seq_dim] != b:
        return None
    return _rnn_dims(inputs, seq_dim), _rnn_dims(outputs, seq_dim)


def _rnn_dims(values: Sequence[Any], seq_dim: int) -> list[int | None]:
    """The batch dimension of each value of an RNN call: the sequence's (first tensor), then 1 for hidden states."""
    dims: list[int | None] = []
    first = True
    for v in values:
        if isinstance(v, Tensor):
            dims.append(seq_dim if first else 1)
            first = False
        else:
            dims.append(None)
    return dims


@dataclass
class UnitCall:
    """One call of a unit during the captured forward.

    Attributes:
        spec: the pytree structure of ``(args, kwargs)``.
        inputs: the flattened inputs (tensors detached).
        in_dims: per input, its batch dimension, or None.
        param_inputs: per input position, the trained parameter passed there (differentiated too).
        out_spec: the pytree structure of the output.
        out_dims: per output leaf, its batch dimension (None: not a tensor).
        grads: per output leaf, its gradient (filled by tensor hooks during backward; absent if not reached).
        fingerprints: per output leaf, its :class:`Fingerprint`.
        outputs: per batched output leaf, ``(shape, dtype, device)`` (a zero gradient for a leaf backward did not
            reach).
        state: the generators and autocast state before the call.
        values: under a rekeying layout (FSDP2), every parameter of the unit (trained or not, by name relative to
            the unit) as the forward used it; the recomputation then runs on these values, without the module's
            forward pre-hooks (FSDP2's would all-gather again). None: the module's own parameters, read then.
    """

    spec: Any
    inputs: list[Any]
    in_dims: list[int | None]
    param_inputs: dict[int, nn.Parameter]
    out_spec: Any
    out_dims: list[int | None]
    grads: dict[int, Tensor] = field(default_factory=dict)
    fingerprints: dict[int, Fingerprint] = field(default_factory=dict)
    outputs: dict[int, tuple[torch.Size, torch.dtype, torch.device]] = field(default_factory=dict)
    state: ForwardState | None = None
    values: dict[str, Tensor] | None = None


@contextmanager
def _pre_hooks_suppressed(module: nn.Module, suppress: bool) -> Iterator[None]:
    """Without the forward pre-hooks of ``module`` and its submodules if ``suppress`` (FSDP2's pre-forward would
    all-gather the sharded parameters and put them back in place of the values given to ``functional_call``).
    """
    if not suppress:
        yield
        return
    saved = [(m, m._forward_pre_hooks) for m in module.modules() if m._forward_pre_hooks]
    for m, _ in saved:
        m._forward_pre_hooks = type(m._forward_pre_hooks)()
    try:
        yield
    finally:
        for m, hooks in saved:
            m._forward_pre_hooks = hooks


class UnitRule:
    """How the per-sample gradients of one unit are formed from its recorded calls. The default recomputes the unit
    per example with ``torch.func`` (``functional_call`` under ``vmap`` over ``vjp``).

    Args:
        module: the unit.
        params: its trained parameters by name relative to the unit (those of its submodules included).

    Attributes:
        last_method: how the last call was computed (``"vmap"`` or ``"loop"``), for diagnostics.
    """

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter]) -> None:
        self.module = module
        self.params = params
        self.last_method = ""

    def per_sample(self, call: UnitCall, b: int) -> tuple[dict[nn.Parameter, Tensor], dict[int, Tensor]]:
        """Per-sample gradients of one call, and the recomputed outputs (per output leaf, as a batch) for the check
        against the call's fingerprints.
        """
        values = call.values
        if values is None:
            primals: dict[str, Tensor] = {n: p.detach() for n, p in self.params.items()}
        else:
            primals = {n: values[n] for n in self.params}
        fixed = {} if values is None else {n: v for n, v in values.items() if n not in self.params}
        arg_names = {pos: f"<input {pos}>" for pos in call.param_inputs}
        for pos, p in call.param_inputs.items():
            primals[arg_names[pos]] = p.detach() if values is None else call.inputs[pos]
        batched = [BatchedArg(x, d) for x, d in zip(call.inputs, call.in_dims) if d is not None]
        batched_pos = [i for i, d in enumerate(call.in_dims) if d is not None]
        leaves = [i for i, d in enumerate(call.out_dims) if d is not None]
        cotangents: list[BatchedArg] = []
        for i in leaves:
            g = call.grads.get(i)
            if g is None:
                shape, dtype, device = call.outputs[i]
                g = torch.zeros(shape, dtype=dtype, device=device)
            cotangents.append(BatchedArg(g, call.out_dims[i]))  # type: ignore[arg-type]
        module = self.module
        sub_names = list(self.params)

        def fn(ps: dict[str, Tensor], xs: list[Tensor]) -> tuple[Tensor, ...]:
            flat = list(call.inputs)
            for pos, x in zip(batched_pos, xs):
                flat[pos] = x
            for pos, name in arg_names.items():
                flat[pos] = ps[name]
            args, kwargs = tree_unflatten(flat, call.spec)
            with forward_hooks_suppressed(module), _pre_hooks_suppressed(module, values is not None):
                out = torch.func.functional_call(
                    module, {**fixed, **{n: ps[n] for n in sub_names}}, tuple(args), kwargs, strict=False
                )
            out_flat, _ = tree_flatten(out)
            return tuple(out_flat[i] for i in leaves)

        grads, outs, how = per_example_vjp(fn, primals, batched, cotangents, b, call.state)
        self.last_method = how
        per: dict[nn.Parameter, Tensor] = {p: grads[n] for n, p in self.params.items()}
        for pos, p in call.param_inputs.items():
            g = grads[arg_names[pos]]
            per[p] = per[p] + g if p in per else g
        return per, dict(zip(leaves, outs))


_UNIT_RULES: dict[type[nn.Module], type[UnitRule]] = {}


def register_unit_rule(*module_types: type[nn.Module]) -> Callable[[type[UnitRule]], type[UnitRule]]:
    """Register a :class:`UnitRule` subclass for modules of exactly these types; such modules are units from the
    start (their per-sample gradients are formed by the rule from their recorded calls).
    """

    def decorator(cls: type[UnitRule]) -> type[UnitRule]:
        for t in module_types:
            _UNIT_RULES[t] = cls
        return cls

    return decorator


def unit_rule_for(module: nn.Module) -> type[UnitRule] | None:
    """The unit rule registered for ``module``'s type (or a base class whose ``forward`` it keeps), or None."""
    from lightning_dp.engine.layer_rules import same_forward_bases

    for t in same_forward_bases(module):
        rule = _UNIT_RULES.get(t)
        if rule is not None:
            return rule
    return None


# Recurrent layers are units from the start: one fused op takes every weight and returns hidden states with the batch
# second, whose first dimension (layers × directions) could equal the micro-batch by coincidence.
register_unit_rule(nn.RNN, nn.LSTM, nn.GRU)(UnitRule)


__all__ = [
    "BatchDims",
    "UnitCall",
    "UnitRule",
    "batch_dims_of",
    "default_batch_dims",
    "register_batch_dims",
    "register_unit_rule",
    "unit_rule_for",
]
