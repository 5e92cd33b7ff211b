"""``nn.MultiheadAttention`` as a unit with a native rule: one batched recomputation instead of one per example.

Its forward uses its weights through ``F.linear`` inside ``F.multi_head_attention_forward``, on tensors that keep the
sequence first (``(T, B, E)``, and ``(T·B, E)`` before the output projection), so no layer hook and no op-level rule
of the fallback can see a batch-first call. This rule recomputes the recorded call once, batched (with the generators
replayed, so dropout draws the same masks), watching every ``F.linear`` whose weight is one of the module's (or a
slice of ``in_proj_weight``); autograd gives the gradient of each projection's output, and the per-sample weight and
bias gradients are the usual ``Σ_t g_t ⊗ x_t`` with the batch taken from dimension 1 (rows ``t·B + b`` for the
flattened output projection).

The first call is verified: the per-sample gradients must add up to autograd's gradients of the recomputation; any
configuration the rule does not handle (or a future change of PyTorch's layout) falls back to the ``torch.func``
recomputation per example (:class:`~lightning_dp.engine.fallback.units.UnitRule`), announced by the engine's
``last_methods``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from typing_extensions import override

from lightning_dp.engine.fallback.per_example import ForwardState, forward_hooks_suppressed
from lightning_dp.engine.fallback.units import UnitCall, UnitRule, _pre_hooks_suppressed, register_unit_rule


class _NotNative(Exception):
    """The call is not in the form the native rule handles."""


@contextmanager
def _projections_recorded(weights: set[int]) -> Iterator[list[tuple[Tensor, Tensor, Tensor, Tensor | None]]]:
    """Record the ``F.linear`` calls on the module's weights inside ``F.multi_head_attention_forward``:
    ``(input, output, weight, bias)``.

    Why a temporary replacement of ``torch.nn.functional.linear`` rather than a ``TorchFunctionMode``: a mode sees
    ``multi_head_attention_forward`` as one call (it dispatches before its body runs), not the projections inside it.
    The replacement lasts for this one recomputation, on this thread's call.
    """
    calls: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []
    original = F.linear

    def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        out = original(input, weight, bias)
        if _root(weight) in weights:
            calls.append((input, out, weight, bias))
        return out

    F.linear = linear  # type: ignore[assignment]
    try:
        yield calls
    finally:
        F.linear = original


def _root(t: Tensor) -> int:
    """The id of the tensor a view was taken from (itself if not a view)."""
    return id(t._base if t._base is not None else t)


def _rows(view: Tensor, base: Tensor) -> int:
    """The first row of ``base`` that a row slice ``view`` starts at."""
    return (view.storage_offset() - base.storage_offset()) // base.stride(0)


def _batch_second(x: Tensor, b: int) -> Tensor:
    """A projection's input or output gradient as ``(T, B, features)``."""
    if x.dim() == 3 and x.shape[1] == b:
        return x
    if x.dim() == 2 and x.shape[0] % b == 0:
        return x.reshape(x.shape[0] // b, b, x.shape[1])
    raise _NotNative(f"projection of shape {tuple(x.shape)}")


@register_unit_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(UnitRule):
    """Per-sample gradients of ``nn.MultiheadAttention`` from one batched recomputation (see the module docstring)."""

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter]) -> None:
        super().__init__(module, params)
        self._verified = False
        self._native_ok = True

    @override
    def per_sample(self, call: UnitCall, b: int) -> tuple[dict[nn.Parameter, Tensor], dict[int, Tensor]]:
        if not self._native_ok:
            return super().per_sample(call, b)
        try:
            out = self._native(call, b)
        except _NotNative:
            self._native_ok = False  # a form this rule does not handle: torch.func per example from now on
            return super().per_sample(call, b)
        self.last_method = "native"
        return out

    def _native(self, call: UnitCall, b: int) -> tuple[dict[nn.Parameter, Tensor], dict[int, Tensor]]:
        if not self.params or call.param_inputs:
            raise _NotNative("no trained weight, or parameters given as inputs")
        # the tensors the recomputation uses, by id, and the trained parameter each stands for
        used = self._used_values(call)
        trained = {id(used.get(n, p)): p for n, p in self.params.items()}
        state = call.state or ForwardState.record()
        args, kwargs = tree_unflatten(list(call.inputs), call.spec)
        with state.replayed(), torch.enable_grad(), forward_hooks_suppressed(self.module):
            with _projections_recorded(set(trained)) as projections:
                if used:  # a rekeying layout: the values the forward used, not the module's (sharded) parameters
                    with _pre_hooks_suppressed(self.module, True):
                        out = torch.func.functional_call(self.module, used, tuple(args), kwargs, strict=False)
                else:
                    out = self.module(*args, **kwargs)
        flat = tree_flatten(out)[0]
        leaves = [i for i, d in enumerate(call.out_dims) if d is not None]
        outs = [flat[i] for i in leaves]
        cotangents = []
        for i, o in zip(leaves, outs):
            g = call.grads.get(i)
            cotangents.append(torch.zeros_like(o) if g is None else g.to(o.dtype))
        ys = [y for _, y, _, _ in projections]
        if not ys:
            raise _NotNative("no projection seen")
        grads = torch.autograd.grad(outs, ys, cotangents, allow_unused=True, retain_graph=not self._verified)
        per: dict[nn.Parameter, Tensor] = {}
        for (x, _, w, bias), g in zip(projections, grads):
            if g is None:
                continue
            xs, gs = _batch_second(x.detach(), b).float(), _batch_second(g, b).float()
            self._add(per, w, torch.einsum("tbo,tbi->boi", gs, xs), trained)
            if bias is not None and _root(bias) in trained:
                self._add(per, bias, gs.sum(0), trained)
        if not self._verified:
            self._verify(per, outs, cotangents, list(self.params.values()), used)
        return per, {i: o.detach() for i, o in zip(leaves, outs)}

    def _used_values(self, call: UnitCall) -> dict[str, Tensor]:
        """Under a rekeying layout, every parameter's value as the forward used it (trained ones as leaves that
        require grad, for :meth:`_verify`); empty otherwise (the module's own parameters are used).
        """
        if call.values is None:
            return {}
        return {n: v.detach().requires_grad_(n in self.params) for n, v in call.values.items()}

    @staticmethod
    def _add(per: dict[nn.Parameter, Tensor], used: Tensor, value: Tensor, trained: dict[int, nn.Parameter]) -> None:
        """Add a per-sample gradient of ``used`` (a parameter, or a slice of rows of one) to its parameter."""
        p = trained.get(_root(used))
        if p is None:
            return
        if used._base is not None:  # a slice of rows of the parameter (or of the value standing for it)
            full = torch.zeros(value.shape[0], *p.shape, device=value.device, dtype=value.dtype)
            start = _rows(used, used._base)
            full[:, start : start + used.shape[0]] = value
            value = full
        prev = per.get(p)
        per[p] = value if prev is None else prev + value

    def _verify(
        self,
        per: dict[nn.Parameter, Tensor],
        outs: list[Tensor],
        cotangents: list[Tensor],
        params: list[nn.Parameter],
        used: dict[str, Tensor],
    ) -> None:
        """The per-sample gradients of the first call must add up to autograd's gradients of the recomputation (with
        respect to the tensors it used: ``used``'s values under a rekeying layout, else the parameters).
        """
        inputs = [used[n] for n in self.params] if used else params
        reference = torch.autograd.grad(outs, inputs, cotangents, allow_unused=True)
        for p, ref in zip(params, reference):
            total = per[p].sum(0) if p in per else torch.zeros_like(p, dtype=torch.float32)
            ref = torch.zeros_like(total) if ref is None else ref.float()
            if not bool((total - ref).norm() <= 1e-4 * (ref.norm() + per.get(p, total).norm()) + 1e-30):
                raise _NotNative("per-sample gradients do not add up")
        self._verified = True


__all__ = ["MultiheadAttentionRule"]
