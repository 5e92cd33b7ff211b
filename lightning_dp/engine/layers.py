"""Which layers a per-sample gradient engine must cover: the planning shared by every engine.

An engine covers each trainable parameter either through the layer that owns it (a layer with a per-sample
method) or as a *broadcast parameter*: a raw ``nn.Parameter`` of shape ``(1, ...)`` that the model broadcasts along
the batch (timm ViT's ``cls_token``, ``pos_embed``), whose per-sample gradient is obtained by substituting a
per-sample copy during the forward pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dp.clipping import CLIP_EPS
from lightning_dp.engine.rules import broadcast_parameter_names
from lightning_dp.errors import DPMisconfigurationError, UnsupportedLayerError

#: ``(module name, module, parameter name, parameter)`` of a raw parameter broadcast along the batch.
BroadcastParameter = tuple[str, nn.Module, str, nn.Parameter]


@contextmanager
def full_precision_matmuls() -> Iterator[None]:
    """fp32 matmuls without TF32 while norms and clipped sums are formed: TF32 rounds fp32 inputs to 10-bit
    mantissas, which would make per-sample norms (and so the sensitivity bound) approximate.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (a forward then is activation recomputation)."""
    return torch._C._current_graph_task_id() != -1


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The distinct trainable parameters of ``module``, in registration order.

    Raises:
        DPMisconfigurationError: if there is none.
    """
    params = list(dict.fromkeys(p for p in module.parameters() if p.requires_grad))
    if not params:
        raise DPMisconfigurationError(
            f"{type(module).__name__} has no trainable parameters (all have requires_grad=False). Unfreeze the"
            " parameters to fine-tune, e.g. the classifier head, before fitting with DPStrategy."
        )
    return params


def plan_layers(
    module: nn.Module, supported: Callable[[nn.Module], bool]
) -> tuple[list[tuple[str, nn.Module]], list[BroadcastParameter]]:
    """Split ``module``'s trainable parameters into per-layer work and broadcast parameters.

    Args:
        module: the model.
        supported: whether an engine has a per-sample method for a layer (given the layer).

    Returns:
        ``(layers, broadcast)``: the ``(name, layer)`` pairs owning trainable parameters that ``supported``
        accepts, and the broadcast parameters of the other layers.

    Parameters of the other layers (neither supported nor declared as broadcast) are left to the engine's
    :class:`~lightning_dp.engine.fallback.FunctionalFallback`.

    Raises:
        UnsupportedLayerError: for a broadcast parameter without a leading dimension of size 1.
    """
    layers: list[tuple[str, nn.Module]] = []
    broadcast: list[BroadcastParameter] = []
    for mod_name, mod in module.named_modules():
        direct = {n: p for n, p in mod._parameters.items() if p is not None and p.requires_grad}
        if not direct:
            continue
        if supported(mod):
            layers.append((mod_name, mod))
            continue
        allowed = broadcast_parameter_names(mod)
        if any(n not in allowed for n in direct):
            continue  # no rule: the torch.func fallback covers this module's parameters
        for n, p in direct.items():
            if p.dim() == 0 or p.shape[0] != 1:
                raise UnsupportedLayerError(
                    f"Parameter '{mod_name}.{n}' is registered as broadcast over the batch but has shape"
                    f" {tuple(p.shape)}; a broadcast parameter needs a leading dimension of size 1."
                )
            broadcast.append((mod_name, mod, n, p))
    return layers, broadcast


def bound_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """A layer call's inputs in the order of its ``forward``'s parameters (keyword arguments included, defaults
    filled in), so that a rule sees ``EmbeddingBag(x, offsets=o)`` as ``(x, o, None)``.
    """
    if not kwargs:
        return args
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


@contextmanager
def per_sample_broadcast(
    broadcast: list[BroadcastParameter], batch_size: int, grads: dict[nn.Parameter, Tensor]
) -> Iterator[None]:
    """Substitute a per-sample copy ``(batch_size, ...)`` for each broadcast parameter while inside.

    On exit the original parameters are put back (state-dict keys never change) and, for each copy that received a
    gradient, ``grads[p]`` is set to its per-sample gradient, shape ``(batch_size, *p.shape)``, in fp32.

    Args:
        broadcast: the broadcast parameters (from :func:`plan_layers`).
        batch_size: the number of examples of the micro-batch.
        grads: filled with the per-sample gradients on exit.
    """
    expanded: list[tuple[nn.Module, str, nn.Parameter, Tensor]] = []
    for _, mod, name, p in broadcast:
        e = p.detach().expand(batch_size, *p.shape[1:]).clone().requires_grad_(True)
        mod._parameters[name] = e  # type: ignore[assignment]  # restored below; state-dict keys unchanged
        expanded.append((mod, name, p, e))
    try:
        yield
    finally:
        for mod, name, p, e in expanded:
            mod._parameters[name] = p
            if e.grad is not None:
                grads[p] = e.grad.float().reshape(batch_size, *p.shape)


def check_tolerance(dtypes: list[torch.dtype]) -> float:
    """Relative tolerance of the autograd cross-check, scaled to the least precise dtype the micro-batch was computed
    in, not a fixed percentage: 64 units in the last place of fp32 (≈ 7.6e-6; the engines form norms and sums in fp32,
    so fp64 models are checked at fp32 precision), 16 of bf16/fp16 under autocast (≈ 0.125 in bf16: autograd's own
    bf16 parameter gradients are that far from exact, measured up to 4.5 units on the model zoo).
    """
    eps = max(torch.finfo(d).eps for d in [torch.float32, *dtypes])
    return 64 * eps if eps <= torch.finfo(torch.float32).eps else 16 * eps


def check_sums_against_autograd(
    params: list[nn.Parameter],
    totals: dict[nn.Parameter, Tensor],
    names: dict[nn.Parameter, str],
    spread: dict[nn.Parameter, Tensor] | None = None,
    rtol: float = 64 * torch.finfo(torch.float32).eps,
    explain: Callable[[nn.Parameter], str] | None = None,
) -> None:
    """Compare an engine's Σ_i g_i with autograd's ``p.grad``, up to rounding.

    The error allowed is ``rtol · (‖p.grad‖ + Σ_i ‖g_i‖)``: rounding in a sum of per-sample gradients scales with the
    per-sample gradients, which can be much larger than their sum when they cancel. A rule that is wrong, a layout it
    does not handle, or a use of the parameter that no rule saw shows as an error far above that.

    Args:
        params: the parameters to check (those with ``p.grad is None`` are skipped).
        totals: per parameter, the engine's sum of per-sample gradients (absent: zero).
        names: parameter names for the message.
        spread: per parameter, ``Σ_i ‖g_i‖`` of its group (an upper bound of its own); absent: 0.
        rtol: the relative tolerance (see :func:`check_tolerance`).
        explain: the likely cause for a parameter that fails (named in the message).

    Raises:
        DPMisconfigurationError: if a sum is off by more than the tolerance.
    """
    spread = spread or {}
    for p in params:
        if p.grad is None:
            continue
        ref = p.grad.float()
        total = totals.get(p)
        err = ref.norm() if total is None else (total.float() - ref).norm()
        scale = ref.norm() + spread.get(p, torch.zeros(()))
        if not bool(err <= rtol * scale + torch.finfo(torch.float32).tiny):
            cause = explain(p) if explain is not None else "a rule that is wrong for this layer, or a use it cannot see"
            raise DPMisconfigurationError(
                f"The per-sample gradients of '{names.get(p, '?')}' do not add up to its gradient: relative error"
                f" {float(err / (ref.norm() + 1e-30)):.3g} (tolerance {rtol:.2g} of the per-sample gradients' scale)."
                f" Cause: {cause}"
            )


__all__ = [
    "CLIP_EPS",
    "BroadcastParameter",
    "bound_inputs",
    "check_sums_against_autograd",
    "check_tolerance",
    "in_backward",
    "per_sample_broadcast",
    "plan_layers",
    "trainable_parameters",
]
