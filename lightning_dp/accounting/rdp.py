"""The Rényi-DP accountant: a cheap upper bound on ε (Mironov et al.), also the fallback of the other accountants."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from lightning_dp.accounting.base import (
    Groups,
    MechanismSegment,
    check_delta,
    gaussian_epsilon,
    group_segments,
    merge_gaussians,
)

#: The RDP orders of the package's ``RDP`` accountant.
_RDP_ORDERS = np.array([1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=np.float64)


def package_prvs(groups: Groups) -> list[Any]:
    """The ``prv-accountant`` package's privacy random variables of ``groups`` (one per (σ, q))."""
    from prv_accountant.privacy_random_variables import GaussianMechanism, PoissonSubsampledGaussianMechanism

    return [
        GaussianMechanism(noise_multiplier=s)
        if q >= 1.0
        else PoissonSubsampledGaussianMechanism(noise_multiplier=s, sampling_probability=q)
        for s, q, _ in groups
    ]


@lru_cache(maxsize=4096)
def rdp_curve(sigma: float, q: float) -> np.ndarray:
    """RDP of one step at every order, by the package (cached per (σ, q): it costs ~60 ms, in pure Python)."""
    prv = package_prvs(((sigma, q, 1),))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curve = np.array([float(prv.rdp(a)) for a in _RDP_ORDERS], dtype=np.float64)
    curve.setflags(write=False)
    return curve


def rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """The (ε, δ) bound of an RDP curve, minimised over the orders (the conversion the package's ``RDP`` uses)."""
    a = _RDP_ORDERS
    with np.errstate(invalid="ignore", over="ignore"):
        eps = rdp - np.log(delta * a) / (a - 1) + np.log1p(-1 / a)
    return float(np.nanmin(eps)) if np.isfinite(eps).any() else math.inf


def rdp_of(groups: Groups) -> np.ndarray:
    """The RDP curve of the composition of ``groups`` (at every order)."""
    return sum((n * rdp_curve(s, q) for s, q, n in groups), np.zeros_like(_RDP_ORDERS))


@lru_cache(maxsize=1024)
def rdp_epsilon(groups: Groups, delta: float) -> float:
    """The RDP bound (cheap and loose, but an upper bound), from the package's per-step RDP."""
    if not groups:
        return 0.0
    return max(0.0, rdp_to_epsilon(rdp_of(groups), delta))


def shortcut_bounds(groups: Groups, delta: float, rdp_only_above: float) -> tuple[Groups, tuple[float, float] | None]:
    """The cases every accountant answers alike: no segment (0), only non-subsampled Gaussians (the closed form) and
    tiny σ (the RDP bound: the loss distribution would span a huge grid, and such an ε carries no meaningful
    guarantee). Returns the groups with their Gaussians merged, and ``(estimate, bound)`` when a shortcut applies.
    """
    if not groups:
        return groups, (0.0, 0.0)
    if all(q >= 1.0 for _, q, _ in groups):
        eps = gaussian_epsilon(math.sqrt(sum(n / s**2 for s, _, n in groups)), delta)
        return groups, (eps, eps)
    groups = merge_gaussians(groups)
    rdp = rdp_epsilon(groups, delta)
    if not rdp <= rdp_only_above:
        return groups, (rdp, rdp)
    return groups, None


class RDPAccountant:
    """Rényi-DP accountant: a cheap (milliseconds) but loose upper bound on ε (10-30 % above PRV for DP-SGD).

    Uses the ``prv-accountant`` package's RDP accountant (subsampled Gaussian RDP of Mironov et al., converted
    to (ε, δ) with the improved conversion).

    Example:
        >>> eps = RDPAccountant().epsilon([MechanismSegment(1.0, 0.01, 1000)], 1e-5)
    """

    def epsilon(self, segments: Sequence[MechanismSegment], delta: float) -> float:
        """The RDP upper bound on ε of ``segments`` at ``delta``."""
        check_delta(delta)
        return rdp_epsilon(group_segments(segments), float(delta))

    def __repr__(self) -> str:
        return "RDPAccountant()"


# ---------------------------------------------------------------------------------------------------- PRV
