"""Per-sample clipping rules: the factor each example's gradient is multiplied by, and the resulting sensitivity.

- ``"flat"`` (standard, Abadi et al.): ``g · min(1, C/‖g‖)``; sensitivity C.
- ``"normalized"`` (as Rehn et al., arXiv:2510.20616, run their experiments): ``g · min(1/C, 1/‖g‖)``; sensitivity
  1. The update is the flat one divided by C, so a flat learning rate η corresponds to η·C here.
- ``"automatic"`` (AUTO-S, Bu et al. 2022): ``g · C/(‖g‖ + γ)``; every example is rescaled to norm just below C, so
  the sensitivity is C; no example is left unscaled. With most examples clipped, flat learning rates carry over.
- ``"per_layer"`` (group-wise clipping: McMahan et al. 2018, "Learning differentially private recurrent language
  models", ICLR; He et al. 2023, "Exploring the limits of differentially private deep learning with group-wise
  clipping", ICLR): each of the model's ``L`` parameter groups (a layer's parameters, or a broadcast parameter) is
  clipped flat on its own norm to ``C_l = C/√L`` (:func:`per_layer_bound`); since ``Σ_l C_l² = C²``, one example's
  contribution has norm at most C: the sensitivity is C. A group's factors depend on that group alone, so the engines
  clip it during the backward pass and store nothing for later (the fastest mode, memory close to non-private).
  Trade-off: a fixed equal split rescales every group whose gradient exceeds ``C/√L`` even when the example's total
  norm is below C, and spends no budget on groups with small gradients; He et al. report that per-layer clipping
  with fixed thresholds tends to underperform flat clipping, while adaptive per-layer thresholds match it.

The noise std on the clipped sum is σ × sensitivity for every rule, so the accounting is identical.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

ClippingMode = Literal["flat", "normalized", "automatic", "per_layer"]
CLIPPING_MODES = ("flat", "normalized", "automatic", "per_layer")

#: Added to per-sample norms before dividing, as Opacus does, so that a zero gradient gets a finite factor.
CLIP_EPS = 1e-6


def clip_factors(norms: Tensor, max_grad_norm: float, mode: ClippingMode = "flat", stability: float = 0.01) -> Tensor:
    """Per-sample factors (fp32) that bound each scaled gradient's norm by :func:`sensitivity`.

    Args:
        norms: per-sample gradient norms, shape ``(b,)``.
        max_grad_norm: C (for ``"per_layer"``: the group's bound ``C_l``, and ``norms`` the group's norms).
        mode: ``"flat"``, ``"normalized"``, ``"automatic"`` or ``"per_layer"`` (flat, per group).
        stability: γ of automatic clipping.
    """
    if mode in ("flat", "per_layer"):
        return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    if mode == "normalized":
        return (1.0 / (norms + CLIP_EPS)).clamp(max=1.0 / max_grad_norm)
    if mode == "automatic":
        return max_grad_norm / (norms + stability)
    raise ValueError(f"Unknown clipping mode {mode!r}; choose one of {CLIPPING_MODES}.")


def per_layer_bound(max_grad_norm: float, groups: int) -> float:
    """``C_l = C/√L``: the equal per-group bound of per-layer clipping, so that ``Σ_l C_l² = C²``.

    An equal split (rather than, e.g., one proportional to each group's parameter count) needs no knowledge of the
    gradients, so it costs no privacy, and it is the constant-threshold baseline of He et al. (2023).

    Args:
        max_grad_norm: C, the bound on one example's whole contribution.
        groups: L, the number of parameter groups.
    """
    if groups < 1:
        raise ValueError(f"per-layer clipping needs at least one parameter group, got {groups}.")
    return float(max_grad_norm) / math.sqrt(groups)


def sensitivity(max_grad_norm: float, mode: ClippingMode = "flat") -> float:
    """The L2 bound on one example's clipped contribution to the sum."""
    return 1.0 if mode == "normalized" else float(max_grad_norm)
