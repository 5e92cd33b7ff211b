"""The accounting core: mechanism segments and the :class:`Accountant` protocol every accountant implements.

An :class:`Accountant` turns a list of :class:`MechanismSegment` into an upper bound on ε at a given δ. The ledger,
the σ calibration and the strategy only talk to this protocol, so another accountant can be plugged in. Shared
helpers (δ checks, the closed form of non-subsampled Gaussians, merging segments) live here too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

#: ``((σ, q, steps), ...)``: segments merged by (σ, q), in a canonical order (the cache key of every accountant).
Groups = tuple[tuple[float, float, int], ...]


@dataclass(frozen=True)
class MechanismSegment:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism.

    Args:
        noise_multiplier: σ, the noise std divided by the L2 sensitivity.
        sample_rate: q, the probability that an example takes part in one composition (1.0: no subsampling).
        steps: how many times the mechanism was (or will be) applied.
        mechanism: a label for the per-mechanism breakdown, e.g. ``"dp-sgd"``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    mechanism: str = "dp-sgd"

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a positive finite number, got {self.noise_multiplier}.")
        if not (0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}.")
        if self.steps < 0 or int(self.steps) != self.steps:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps}.")


def group_segments(segments: Iterable[MechanismSegment]) -> Groups:
    """Merge segments with the same (σ, q) into ``(σ, q, total steps)``, sorted; empty segments are dropped.

    Composition is commutative, so this loses nothing, and it makes equal compositions equal cache keys.
    """
    counts: dict[tuple[float, float], int] = {}
    for seg in segments:
        if seg.steps:
            key = (float(seg.noise_multiplier), float(seg.sample_rate))
            counts[key] = counts.get(key, 0) + int(seg.steps)
    return tuple(sorted((s, q, n) for (s, q), n in counts.items()))


def check_delta(delta: float) -> None:
    """Raise ``ValueError`` unless 0 < δ < 1."""
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}.")


@runtime_checkable
class Accountant(Protocol):
    """Anything that bounds ε of a composition of subsampled Gaussian mechanisms.

    ``epsilon`` must return an *upper bound* on ε at ``delta``: the ledger reports it and the calibration and
    :class:`~lightning_dp.callbacks.PrivacyBudget` enforce it. It should be deterministic (the same segments give
    the same value) and 0.0 for an empty composition.

    Example:
        >>> class Loose:
        ...     def epsilon(self, segments, delta):
        ...         return RDPAccountant().epsilon(segments, delta) * 2
        >>> isinstance(Loose(), Accountant)
        True
    """

    def epsilon(self, segments: Sequence[MechanismSegment], delta: float) -> float:
        """An upper bound on ε of the composition of ``segments`` at ``delta``."""
        ...


@runtime_checkable
class EstimatingAccountant(Accountant, Protocol):
    """An :class:`Accountant` that also has a cheap *estimate* of ε, used only to guide searches (never reported)."""

    def estimate(self, segments: Sequence[MechanismSegment], delta: float) -> float:
        """A cheap approximation of ε (not a bound) of the composition of ``segments`` at ``delta``."""
        ...


# ---------------------------------------------------------------------------------------------------- closed form
def gaussian_epsilon(mu: float, delta: float) -> float:
    """ε(δ) of the Gaussian mechanism with sensitivity / noise std = ``mu``, rounded up (Balle & Wang, 2018).

    δ(ε) = Φ(μ/2 - ε/μ) - e^ε Φ(-μ/2 - ε/μ) is evaluated in log space and solved for a δ a relative 1e-9
    below the target, so floating-point error cannot make the result optimistic. ``T`` Gaussian releases with
    multipliers σ_i compose to μ = sqrt(Σ σ_i⁻²).

    Args:
        mu: sensitivity divided by the noise std (1/σ for one release).
        delta: the target δ.

    Returns:
        The smallest ε ≥ 0 (up to ~1e-12) at which the mechanism is (ε, δ)-DP.

    Example:
        >>> round(gaussian_epsilon(1.0, 1e-5), 3)
        4.377
    """
    from scipy.optimize import brentq
    from scipy.special import log_ndtr

    check_delta(delta)
    if not mu > 0:
        return 0.0
    log_target = math.log(delta) + math.log1p(-1e-9)

    def log_delta(eps: float) -> float:
        a = float(log_ndtr(mu / 2 - eps / mu))
        b = float(log_ndtr(-mu / 2 - eps / mu))
        gap = eps + b - a  # log(e^ε Φ(b) / Φ(a)) ≤ 0
        return a + math.log(-math.expm1(gap)) if gap < 0 else -math.inf

    if log_delta(0.0) <= log_target:
        return 0.0
    hi = max(1.0, mu * mu)
    while log_delta(hi) > log_target:
        hi *= 2.0
    eps = float(brentq(lambda e: log_delta(e) - log_target, 0.0, hi, xtol=1e-13, rtol=1e-14))
    while log_delta(eps) > log_target:  # brentq's root may sit a hair on the optimistic side
        eps += max(1e-13, eps * 1e-14)
    return eps


# ---------------------------------------------------------------------------------------------------- RDP


def merge_gaussians(groups: Groups) -> Groups:
    """Fold all non-subsampled groups into one Gaussian release (exact: Gaussians compose to a Gaussian)."""
    mu2 = sum(n / s**2 for s, q, n in groups if q >= 1.0)
    rest = tuple(g for g in groups if g[1] < 1.0)
    return rest + (((mu2**-0.5, 1.0, 1),) if mu2 else ())
