"""The autograd cross-check: an engine's per-sample gradients must add up to autograd's gradient.

On the first micro-batch of a run (and again when asked, see ``ClippingEngine.check_against_autograd``) the engine
template sums every group's per-sample gradients (:meth:`~lightning_dp.engine.contributions.Contribution.clipped_sum`
with factors one) and compares each parameter's sum with ``p.grad``, up to rounding. A layer rule that is wrong, a
layout it does not handle, or a use of a parameter that no rule saw shows as an error far above the tolerance, and
stops the run with the likely cause.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_dp.engine.contributions import Contribution
from lightning_dp.errors import DPMisconfigurationError


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
    grad_of: Callable[[nn.Parameter], Tensor | None] | None = None,
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
        grad_of: autograd's gradient of a parameter for this micro-batch (default ``p.grad``; sharded parameters:
            see :mod:`lightning_dp.engine.layout`).

    Raises:
        DPMisconfigurationError: if a sum is off by more than the tolerance.
    """
    spread = spread or {}
    for p in params:
        grad = p.grad if grad_of is None else grad_of(p)
        if grad is None:
            continue
        ref = grad.float()
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


def check_contributions(
    groups: list[Contribution],
    params: list[nn.Parameter],
    names: dict[nn.Parameter, str],
    batch_size: int,
    rtol: float,
    explain: Callable[[nn.Parameter, Contribution | None], str],
    grad_of: Callable[[nn.Parameter], Tensor | None] | None = None,
) -> None:
    """Compare each group's ``Σ_i g_i`` with autograd's ``p.grad`` (see :func:`check_sums_against_autograd`).

    Args:
        groups: the micro-batch's contributions, before masks (autograd's ``p.grad`` is unmasked).
        params: the engine's trained parameters.
        names: parameter names for the message.
        batch_size: the micro-batch's number of examples.
        rtol: the relative tolerance (see :func:`check_tolerance`).
        explain: the likely cause for a parameter that fails, given the group that holds it (None: no group).
        grad_of: autograd's gradient of a parameter for this micro-batch (default ``p.grad``).

    Raises:
        DPMisconfigurationError: if a sum is off by more than the tolerance.
    """
    ones = torch.ones(batch_size, device=params[0].device, dtype=torch.float32)
    totals: dict[nn.Parameter, Tensor] = {}
    spread: dict[nn.Parameter, Tensor] = {}
    group_of: dict[nn.Parameter, Contribution] = {}
    for g in groups:
        sums = g.clipped_sum(ones)
        totals.update(sums)
        width = g.squared_norms().clamp(min=0).sqrt().sum()
        for p in sums:
            spread[p], group_of[p] = width, g
    check_sums_against_autograd(params, totals, names, spread, rtol, lambda p: explain(p, group_of.get(p)), grad_of)


__all__ = ["check_contributions", "check_sums_against_autograd", "check_tolerance"]
