"""Per-sample clipping rules: the factor each example's gradient is multiplied by, and the resulting sensitivity.

- ``"flat"`` (standard, Abadi et al.): ``g · min(1, C/‖g‖)``; sensitivity C.
- ``"normalized"`` (as Rehn et al., arXiv:2510.20616, run their experiments): ``g · min(1/C, 1/‖g‖)``; sensitivity
  1. The update is the flat one divided by C, so a flat learning rate η corresponds to η·C here.
- ``"automatic"`` (AUTO-S, Bu et al. 2022): ``g · C/(‖g‖ + γ)``; every example is rescaled to norm just below C, so
  the sensitivity is C; no example is left unscaled. With most examples clipped, flat learning rates carry over.

The noise std on the clipped sum is σ × sensitivity for every rule, so the accounting is identical.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

ClippingMode = Literal["flat", "normalized", "automatic"]
CLIPPING_MODES = ("flat", "normalized", "automatic")

#: Added to per-sample norms before dividing, as Opacus does, so that a zero gradient gets a finite factor.
CLIP_EPS = 1e-6


def clip_factors(norms: Tensor, max_grad_norm: float, mode: ClippingMode = "flat", stability: float = 0.01) -> Tensor:
    """Per-sample factors (fp32) that bound each scaled gradient's norm by :func:`sensitivity`.

    Args:
        norms: per-sample gradient norms, shape ``(b,)``.
        max_grad_norm: C.
        mode: ``"flat"``, ``"normalized"`` or ``"automatic"``.
        stability: γ of automatic clipping.
    """
    if mode == "flat":
        return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
    if mode == "normalized":
        return (1.0 / (norms + CLIP_EPS)).clamp(max=1.0 / max_grad_norm)
    if mode == "automatic":
        return max_grad_norm / (norms + stability)
    raise ValueError(f"Unknown clipping mode {mode!r}; choose one of {CLIPPING_MODES}.")


def sensitivity(max_grad_norm: float, mode: ClippingMode = "flat") -> float:
    """The L2 bound on one example's clipped contribution to the sum."""
    return 1.0 if mode == "normalized" else float(max_grad_norm)
