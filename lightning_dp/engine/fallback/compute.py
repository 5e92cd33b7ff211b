"""The fallback's per-example compute: the per-sample gradients of a captured micro-batch's units and traced ops,
each recomputation checked against fingerprints of the real forward's outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_dp.engine.contributions import add_into
from lightning_dp.engine.fallback.capture import Capture
from lightning_dp.engine.fallback.per_example import Fingerprint
from lightning_dp.engine.fallback.tracer import op_name
from lightning_dp.engine.fallback.units import UnitRule
from lightning_dp.errors import DPMisconfigurationError


@dataclass
class FallbackResult:
    """The per-sample gradients of one micro-batch and how they were obtained.

    Attributes:
        groups: ``(name, {param: per-sample gradients})`` per unit and per module owning traced parameters.
        methods: per unit or owner name, ``"unit:<method>"`` / ``"ops:<method>"``.
        summary: counts per ``"unit <Type> (<method>)"`` / ``"op <name> (<method>)"``.
    """

    groups: list[tuple[str, dict[nn.Parameter, Tensor]]] = field(default_factory=list)
    methods: dict[str, str] = field(default_factory=dict)
    summary: dict[str, int] = field(default_factory=dict)


def check_resolved(cap: Capture) -> None:
    """Per-sample gradients are defined: every fold of the examples found an enclosing unit.

    Raises:
        DPMisconfigurationError: if no enclosing module keeps the batch first.
    """
    if cap.unresolved is not None:
        raise DPMisconfigurationError(
            f"Per-sample gradients are not defined here: {cap.unresolved}, and no enclosing module of the model"
            " has the micro-batch as the first dimension of its inputs and outputs (the batch is folded with"
            " another dimension up to the top). Keep the examples along the first dimension (e.g."
            " batch_first=True), or register the batch dimensions of the enclosing module with"
            " lightning_dp.engine.register_batch_dims."
        )


def compute_per_sample(
    cap: Capture,
    units: dict[nn.Module, UnitRule],
    owner: dict[nn.Parameter, nn.Module],
    name_of: Callable[[nn.Module | None], str],
    result: FallbackResult,
) -> None:
    """Recompute the captured units and traced ops per example, into ``result`` (filled as they are computed).

    Args:
        cap: the micro-batch's capture (see :func:`check_resolved`).
        units: the unit rules by module.
        owner: per parameter, the module owning it (the traced ops' gradients are grouped by owner).
        name_of: a module's name.
        result: where the groups, methods and summary go.

    Raises:
        DPMisconfigurationError: if a recomputation does not reproduce the forward.
    """
    b = cap.b
    checks: list[tuple[Tensor, str]] = []
    for m, calls in cap.unit_calls.items():
        rule = units[m]
        total: dict[nn.Parameter, Tensor] = {}
        for call in calls:
            per, outs = rule.per_sample(call, b)
            add_into(total, per)
            for i, o in outs.items():
                mismatch = call.fingerprints[i].mismatch(Fingerprint.of(o, call.out_dims[i]))  # type: ignore[arg-type]
                checks.append((mismatch.max(), f"'{name_of(m)}' ({type(m).__name__})"))
        result.methods[name_of(m)] = f"unit:{rule.last_method}"
        key = f"unit {type(m).__name__} ({rule.last_method})"
        result.summary[key] = result.summary.get(key, 0) + 1
        if total:
            result.groups.append((name_of(m), total))
    by_owner: dict[str, dict[nn.Parameter, Tensor]] = {}
    for r in cap.ops:
        per, outs = r.per_sample(b)
        key = f"op {op_name(r.func)} ({r.last_method})"
        result.summary[key] = result.summary.get(key, 0) + 1
        for p, g in per.items():
            name = name_of(owner.get(p))
            add_into(by_owner.setdefault(name, {}), {p: g})
            result.methods[name] = f"ops:{r.last_method}"
        for i, o in outs.items():
            checks.append(
                (r.fingerprints[i].mismatch(Fingerprint.of(o, 0)).max(), f"'{op_name(r.func)}' in '{r.where}'")
            )
    result.groups += list(by_owner.items())
    _check_recomputations(checks)


def _check_recomputations(checks: list[tuple[Tensor, str]]) -> None:
    """Raise if a recomputation is further from the real forward than rounding allows (NaN counts as a mismatch)."""
    if not checks:
        return
    worst = torch.stack([c for c, _ in checks])
    k = int(worst.argmax())
    if not bool(worst[k] <= 1):
        raise DPMisconfigurationError(
            f"Recomputing {checks[k][1]} per example with torch.func did not reproduce the forward that"
            f" produced the loss ({float(worst[k]):.3g} times the tolerance for rounding),"
            " so its per-sample gradients would not be those of the real forward. Usual causes: random ops"
            " whose draws cannot be replayed per example (call the module in eval mode or set its dropout to"
            " 0), a forward that depends on other examples of the batch, state changed by the forward"
            " (running statistics, caches), or a forward hook that alters the output."
        )


__all__ = ["FallbackResult", "check_resolved", "compute_per_sample"]
