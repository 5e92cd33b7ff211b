"""Per-sample gradients of a model against a brute-force loop over examples, in float64, for both engines."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_dp.engine import ENGINES, HookEngine


@dataclass
class Comparison:
    """Worst relative errors of an engine against the per-example loop."""

    per_sample: float  #: hooks: max over examples of ‖g_i − g_ref,i‖ / ‖g_ref,i‖ (all parameters); ghost: NaN
    norms: float  #: max over examples of |‖g_i‖ − ‖g_ref,i‖| / ‖g_ref,i‖
    clipped_sum: float  #: ‖Σ_i f_i g_i − ref‖ / ‖ref‖ over all parameters, with C = the median norm


def brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of the mean cross-entropy by one autograd call per example (the example's loss divided
    by the batch size, as the mean loss gives it).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    per: dict[nn.Parameter, list[torch.Tensor]] = {p: [] for p in params}
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            per[p].append(torch.zeros_like(p) if g is None else g)
    return {p: torch.stack(v) for p, v in per.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-300))


def group_clipped_sum(
    ref: dict[nn.Parameter, torch.Tensor], groups: list[list[nn.Parameter]], bound: float
) -> dict[nn.Parameter, torch.Tensor]:
    """Σ_i min(1, bound/‖g_i^G‖)·g_i per parameter, ``‖g_i^G‖`` the norm over the parameter's group."""
    expected = {}
    for group in groups:
        norms = torch.sqrt(sum(ref[p].flatten(1).pow(2).sum(1) for p in group))
        factors = (bound / (norms + 1e-6)).clamp(max=1.0)
        for p in group:
            expected[p] = torch.einsum("i,i...->...", factors, ref[p])
    return expected


def compare(
    engine_name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 2,
    clipping: str = "flat",
) -> Comparison:
    """Run ``steps`` micro-batches (the first is checked against autograd, later ones not) and return the worst
    errors over them. ``clipping``: ``"flat"`` (one group, bound C) or ``"per_layer"`` (the engine's clipping groups,
    each bounded by C/√L), C the median per-example norm.
    """
    ref = brute_force(model, x, y)
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    c = float(ref_norms.median())
    engine = ENGINES[engine_name](model)
    if clipping == "per_layer":
        by_name = dict(model.named_parameters())
        groups = [[by_name[n] for n in names] for names in engine.clipping_groups]
        expected = group_clipped_sum(ref, groups, c / len(groups) ** 0.5)
    else:
        expected = group_clipped_sum(ref, [list(ref)], c)
    engine.attach()
    worst = Comparison(float("nan") if engine_name != "hooks" else 0.0, 0.0, 0.0)
    try:
        for _ in range(steps):
            with engine.capture(x.shape[0]):
                nn.functional.cross_entropy(model(x), y).backward()
            if isinstance(engine, HookEngine) and clipping == "flat":  # per-layer: freed in backward
                got = engine.per_sample_gradients()
                missing = set(ref) - set(got)
                if missing:
                    raise AssertionError(f"no per-sample gradients for {len(missing)} parameters")
                diff = torch.sqrt(sum((got[p].double() - ref[p]).flatten(1).pow(2).sum(1) for p in ref))
                worst.per_sample = max(worst.per_sample, float((diff / ref_norms).max()))
            norms = engine.clip_and_accumulate(c, clipping).double()
            worst.norms = max(worst.norms, float(((norms - ref_norms).abs() / ref_norms).max()))
            summed = engine.pop_summed()
            got_sum = torch.cat([summed[p].double().flatten() for p in ref])
            exp_sum = torch.cat([expected[p].flatten() for p in ref])
            worst.clipped_sum = max(worst.clipped_sum, _rel(got_sum, exp_sum))
    finally:
        engine.detach()
    return worst


__all__ = ["Comparison", "brute_force", "compare", "group_clipped_sum"]
