"""Closed-form per-sample gradients of the ops that traced parameters meet most often, without recomputing them.

A traced op (see :mod:`~lightning_dp.engine.fallback.tracer`) is normally recomputed per example under ``vmap``; for
the ops below the per-sample cotangent of the tracked argument is written directly from the batched input and the
output gradient, as a layer rule would: ``x * gamma`` (layer scales), ``x + t`` (position embeddings, bias tables),
``F.linear(x, W, b)`` (a weight used outside its layer, Beit's ``q_bias``/``v_bias``), ``F.layer_norm`` and
``F.group_norm`` (norm layers whose module adds an activation, e.g. timm's ``GroupNormAct``). Exact by construction
(no recomputation, so nothing to replay or fingerprint), and much cheaper than ``vmap`` on small ops.

Each rule maps ``(args, grad, b)`` (the call's arguments with batched tensors, tracked tensors by their values) to a
per-sample cotangent ``(b, *shape)`` per tracked argument position, or None when the call is not the simple form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_dp.engine.layer_rules.reductions import reduce_to

#: ``rule(args, kwargs, tracked, grad, b) -> {id(tracked value): (b, *value.shape)} | None``: ``tracked`` holds the
#: ids of the arguments whose per-sample cotangents are wanted (parameters, or values derived from them)
OpRule = Callable[[list[Any], dict[str, Any], set[int], Tensor, int], "dict[int, Tensor] | None"]


def _broadcast_over_batch(t: Tensor, grad: Tensor) -> bool:
    """Whether ``t`` is broadcast along the batch in the op's output (no dimension of its own for the examples)."""
    return t.dim() < grad.dim() or t.shape[0] == 1


def _binary(args: list[Any], kwargs: dict[str, Any], tracked: set[int], grad: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(tracked, batched)`` of a two-tensor call with one tracked argument broadcast along the batch."""
    if kwargs or len(args) != 2 or not all(isinstance(a, Tensor) for a in args):
        return None
    hits = [a for a in args if id(a) in tracked]
    if len(hits) != 1 or args[0] is args[1] or not _broadcast_over_batch(hits[0], grad):
        return None
    t = hits[0]
    return t, args[1] if args[0] is t else args[0]


def _mul(args: list[Any], kwargs: dict[str, Any], tracked: set[int], grad: Tensor, b: int) -> dict[int, Tensor] | None:
    pair = _binary(args, kwargs, tracked, grad)
    if pair is None:
        return None
    t, x = pair
    return {id(t): reduce_to(x.float() * grad.float(), t.shape)}


def _add(sign_of_first: float, sign_of_second: float) -> OpRule:
    def rule(
        args: list[Any], kwargs: dict[str, Any], tracked: set[int], grad: Tensor, b: int
    ) -> dict[int, Tensor] | None:
        pair = _binary(args, kwargs, tracked, grad)
        if pair is None:
            return None
        t, _ = pair
        sign = sign_of_first if args[0] is t else sign_of_second
        return {id(t): sign * reduce_to(grad.float(), t.shape)}

    return rule


def _named(args: list[Any], kwargs: dict[str, Any], names: tuple[str, ...]) -> list[Any] | None:
    """The call's arguments in the order of ``names`` (positional or by keyword; missing ones None)."""
    if any(k not in names for k in kwargs):
        return None
    return [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]


def _linear(
    args: list[Any], kwargs: dict[str, Any], tracked: set[int], grad: Tensor, b: int
) -> dict[int, Tensor] | None:
    full = _named(args, kwargs, ("input", "weight", "bias"))
    if full is None or not isinstance(full[0], Tensor) or id(full[0]) in tracked:
        return None
    x, weight, bias = full
    a = x.float().reshape(b, -1, x.shape[-1])
    gs = grad.float().reshape(b, -1, grad.shape[-1])
    out: dict[int, Tensor] = {}
    if isinstance(weight, Tensor) and id(weight) in tracked:
        out[id(weight)] = torch.einsum("bto,bti->boi", gs, a)
    if isinstance(bias, Tensor) and id(bias) in tracked:
        out[id(bias)] = gs.sum(1)
    return out


def _norm(names: tuple[str, ...], normalize: Callable[[list[Any]], Tensor], per_channel: bool) -> OpRule:
    def reduce(t: Tensor, p: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1).sum(-1) if per_channel else reduce_to(t, p.shape)

    def rule(
        args: list[Any], kwargs: dict[str, Any], tracked: set[int], grad: Tensor, b: int
    ) -> dict[int, Tensor] | None:
        full = _named(args, kwargs, names)
        if full is None or not isinstance(full[0], Tensor) or id(full[0]) in tracked:
            return None
        weight, bias = full[2], full[3]
        out: dict[int, Tensor] = {}
        g = grad.float()
        if isinstance(weight, Tensor) and id(weight) in tracked:
            out[id(weight)] = reduce(normalize(full) * g, weight)
        if isinstance(bias, Tensor) and id(bias) in tracked:
            out[id(bias)] = reduce(g, bias)
        return out

    return rule


def _cat(args: list[Any], kwargs: dict[str, Any], tracked: set[int], grad: Tensor, b: int) -> dict[int, Tensor] | None:
    """``cat((cls_token.expand(B, -1, -1), x), dim=1)``: a tracked piece's cotangent is its slice of the gradient."""
    full = _named(args, kwargs, ("tensors", "dim"))
    if full is None or not isinstance(full[0], (list, tuple)):
        return None
    dim = 0 if full[1] is None else full[1]
    dim = dim + grad.dim() if dim < 0 else dim
    if dim == 0:
        return None
    out: dict[int, Tensor] = {}
    offset = 0
    for t in full[0]:
        size = t.shape[dim]
        if id(t) in tracked:
            out[id(t)] = grad.narrow(dim, offset, size).float()
        offset += size
    return out


def _layer_norm_normalize(full: list[Any]) -> Tensor:
    return F.layer_norm(full[0].float(), full[1], eps=full[4] if full[4] is not None else 1e-5)


def _group_norm_normalize(full: list[Any]) -> Tensor:
    return F.group_norm(full[0].float(), full[1], eps=full[4] if full[4] is not None else 1e-5)


#: the closed-form op rules by op name (the out-of-place name; see :func:`register_op_rule`)
OP_RULES: dict[str, OpRule] = {}


def register_op_rule(rule: OpRule, *names: str) -> OpRule:
    """Register the closed-form per-sample rule of the ops ``names`` (torch function or Tensor method names).

    Example:
        >>> register_op_rule(my_rule, "my_op", "__my_op__")  # doctest: +SKIP
    """
    for name in names:
        OP_RULES[name] = rule
    return rule


register_op_rule(_mul, "mul", "__mul__", "__rmul__", "mul_", "__imul__")
register_op_rule(_add(1.0, 1.0), "add", "__add__", "__radd__", "add_", "__iadd__")
register_op_rule(_add(1.0, -1.0), "sub", "__sub__", "sub_", "__isub__")
register_op_rule(_add(-1.0, 1.0), "__rsub__")  # self.__rsub__(other) = other - self
register_op_rule(_linear, "linear")
register_op_rule(_cat, "cat", "concat", "concatenate")
register_op_rule(
    _norm(("input", "normalized_shape", "weight", "bias", "eps"), _layer_norm_normalize, False), "layer_norm"
)
register_op_rule(_norm(("input", "num_groups", "weight", "bias", "eps"), _group_norm_normalize, True), "group_norm")


__all__ = ["OP_RULES", "OpRule", "register_op_rule"]
