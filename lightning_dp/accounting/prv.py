"""The PRV accountant: upper bounds on ε of compositions of (Poisson-subsampled) Gaussian mechanisms.

:class:`PRVAccountant` reports the PRV accountant's bound (Gopi, Lee & Wutschitz, 2021), on the
``prv-accountant`` package. Our own code on top of the package is there for speed only; every value it reports is
still an upper bound:

* **Adaptive precision.** The package's discretisation error ``eps_error`` is absolute, and its cost grows as
  1/``eps_error``: one fixed value is either wasteful for large ε (0.01 at ε≈9 and 200k steps: 20 s and 1.6 GB per
  evaluation, 212 s and 5.5 GB to calibrate σ) or too coarse for small ε. We pick it as a fraction of ε (estimated
  first on a coarse grid), with a floor and a bound on the grid size.
* **Fast composition.** The package discretises and convolves in ``long double`` on grids of arbitrary length
  (pocketfft then falls back to Bluestein's algorithm: 10-30× slower). We discretise the same privacy random
  variables, on the same mesh and domain (Theorem 5.5 of the paper), in float64 with numerically stable formulas,
  on an FFT-friendly grid length, and read ε off the composed distribution with the same error terms, plus an
  allowance for the FFT's rounding measured on the result (redone in long double when that would eat δ). We also
  wrap the composition modulo the domain in loss space, as the paper's ⊕: the package wraps in index space, which
  reads a wrong ε once the discretisation's mean shifts add up to more than the domain (coarse grids, many steps).
* **Closed form.** A composition of non-subsampled Gaussian mechanisms is one Gaussian mechanism, whose ε(δ) is
  analytic (Balle & Wang, 2018): no discretisation at all.
* **Estimates** (not bounds) that are cheap, to guide :func:`lightning_dp.accounting.calibrate_noise_multiplier`.
"""

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
    group_segments,
    merge_gaussians,
)
from lightning_dp.accounting.rdp import package_prvs, rdp_curve, rdp_epsilon, rdp_of, rdp_to_epsilon, shortcut_bounds


def _domain_half_width(groups: Groups, eps_error: float, delta_error: float) -> float:
    """The package's safe PRV domain [-L, L] (its ``compute_safe_domain_size``, Remark 5.6), from cached RDP."""
    steps = sum(n for *_, n in groups)
    half = rdp_to_epsilon(rdp_of(groups), delta_error / 4)
    for s, q, _ in groups:
        half = max(half, rdp_to_epsilon(rdp_curve(s, q), delta_error / 8 / steps))
    return max(half, eps_error) + 3.0


#: Chunk length for evaluating the privacy-loss CDF (bounds the memory of temporaries).
_CHUNK = 1 << 20


def _loss_cdf_sf(sigma: float, q: float, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CDF and survival function at ``t`` of the privacy loss of one Gaussian step (σ), Poisson-subsampled at q.

    The same random variables as the package's ``GaussianMechanism`` / ``PoissonSubsampledGaussianMechanism``
    (tests compare them), written in float64 with ``log1p``/``expm1``/``erfc`` so both tails keep full relative
    precision (the package computes ``1 - ...`` in long double, which is slow and loses the upper tail).
    """
    from scipy.special import erfc, ndtr

    if q >= 1.0:
        x = t * sigma - 0.5 / sigma  # (t - μ²/2) / μ with μ = 1/σ
        return ndtr(x), ndtr(-x)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        inside = t > math.log1p(-q)
        z = np.log1p(np.where(inside, np.expm1(t) / q, 0.0))  # log((e^t - 1 + q) / q)
        a = (sigma * z - 0.5 / sigma) / math.sqrt(2.0)
        b = (sigma * z + 0.5 / sigma) / math.sqrt(2.0)
        sf = np.where(inside, 0.5 * q * erfc(a) + 0.5 * (1.0 - q) * erfc(b), 1.0)
        cdf = np.where(inside, 0.5 * q * erfc(-a) + 0.5 * (1.0 - q) * erfc(-b), 0.0)
    return cdf, sf


def _discretise(sigma: float, q: float, mesh: float, left: int, size: int) -> tuple[np.ndarray, float]:
    """Cell-centred, mean-preserving discretisation of the privacy loss truncated to the grid.

    The grid is ``t_j = (j - left) · mesh``, ``j < size``; cell j collects the mass of ``[t_j ± mesh/2]`` (the end
    cells are cut at the grid ends, and the mass beyond them is dropped and the rest renormalised), as the
    package's ``CellCentred`` discretiser on a ``PrivacyRandomVariableTruncated``.

    Returns:
        The probabilities and the shift that moves the grid so its mean equals the truncated loss's mean.
    """
    from prv_accountant.privacy_random_variables import PrivacyRandomVariableTruncated

    t_min, t_max = -left * mesh, (size - 1 - left) * mesh
    pmf = np.empty(size)
    for start in range(0, size, _CHUNK):
        stop = min(size, start + _CHUNK)
        edges = (np.arange(start, stop + 1, dtype=np.float64) - left - 0.5) * mesh
        np.clip(edges, t_min, t_max, out=edges)
        cdf, sf = _loss_cdf_sf(sigma, q, edges)
        # Differences of whichever of cdf/sf is small there, so tail cells keep their relative precision.
        pmf[start:stop] = np.where(edges[1:] <= 0.0, np.diff(cdf), -np.diff(sf))
    np.maximum(pmf, 0.0, out=pmf)
    pmf /= math.fsum(pmf[i : i + _CHUNK].sum() for i in range(0, size, _CHUNK))
    prv = package_prvs(((sigma, q, 1),))[0]
    mean = float(PrivacyRandomVariableTruncated(prv, t_min, t_max).mean())
    # Σ (j - left)·p_j summed per chunk and then exactly, so rounding stays far below the mesh even at 2²³ points.
    grid_mean = mesh * math.fsum(
        float(
            np.dot(np.arange(i - left, min(size, i + _CHUNK // 16) - left, dtype=np.float64), pmf[i : i + _CHUNK // 16])
        )
        for i in range(0, size, _CHUNK // 16)
    )
    shift = mean - grid_mean
    if not abs(shift) < mesh / 2:
        raise FloatingPointError("PRV discretisation: discrete mean differs from the continuous mean.")
    return pmf, shift


def _grid(groups: Groups, eps_error: float, delta_error: float) -> tuple[float, int, int]:
    """Mesh, points left of 0 and grid length for a given ``eps_error``: the package's domain and Theorem-5.5
    mesh, with the length rounded up to an even FFT-friendly size (a wider domain only lowers truncation error).
    """
    from scipy.fft import next_fast_len

    steps = sum(n for *_, n in groups)
    half_width = _domain_half_width(groups, eps_error, delta_error)
    if not math.isfinite(half_width):
        raise FloatingPointError("PRV: no finite RDP bound to size the domain.")
    mesh = eps_error / math.sqrt(steps / 2 * math.log(12 / delta_error))
    size = 2 * next_fast_len(math.ceil(half_width / mesh) + 1, real=True)
    return mesh, size // 2 - 1, size


def _min_eps_error(groups: Groups, delta_error: float, max_size: int) -> float:
    """The smallest ``eps_error`` whose grid has at most about ``max_size`` points."""
    steps = sum(n for *_, n in groups)
    half_width = _domain_half_width(groups, 0.0, delta_error)
    return (2 * half_width / (max_size - 4)) * math.sqrt(steps / 2 * math.log(12 / delta_error))


def _compose(groups: Groups, mesh: float, left: int, size: int, dtype: Any) -> tuple[np.ndarray, float, float]:
    """The composition of the discretised groups on the grid, by FFT in ``dtype`` (float64 or long double).

    Returns:
        The probabilities on the grid ``(j - left) · mesh + offset``, the offset (below one cell), and the amplitude
        of the rounding noise: true probabilities are ≥ 0, so the most negative entry (or, if none is, the smallest
        entry) bounds it.
    """
    from scipy.fft import irfft, rfft

    spectrum = np.ones(size // 2 + 1, dtype=np.clongdouble if dtype == np.longdouble else np.complex128)
    shift = 0.0
    for sigma, q, n in groups:
        pmf, s = _discretise(sigma, q, mesh, left, size)
        spectrum *= rfft(pmf.astype(dtype, copy=False)) ** n
        shift += n * s
        del pmf
    steps = sum(n for *_, n in groups)
    # The sum of `steps` grid variables has index k ↦ loss (k - steps·left)·mesh + shift. The circular convolution
    # wraps k modulo the grid length; roll so that the grid again spans [-left, size - 1 - left]·mesh around 0
    # in *loss* space (the paper's ⊕ modulo 2L), whatever the accumulated mean shift (which can be many cells).
    cells = round(shift / mesh)
    pmf = np.roll(irfft(spectrum, size), (cells - (steps - 1) * left) % size)
    return pmf, shift - cells * mesh, abs(float(pmf.min()))


@lru_cache(maxsize=256)
def _prv_bounds(groups: Groups, delta: float, eps_error: float, delta_error: float) -> tuple[float, float]:
    """(estimate, upper bound) of ε by the PRV method at absolute precision ``eps_error``.

    The upper bound is the package's: ε read off the composed discrete distribution at δ - δ_error, plus
    ``eps_error``, with δ further lowered by an allowance for rounding in the FFT (mostly the relative error of the
    spectrum raised to the power ``steps``): 8 × the measured noise amplitude × the number of grid points with a
    positive loss, as if all of it were aligned. If in float64 that allowance exceeds δ / 10 (small δ on a fine
    grid), the composition is redone in long double (~10× slower FFTs, ~2000× less noise).

    Raises:
        FloatingPointError: if the allowance still exceeds δ / 2, or the grid is unusable; the callers then fall
            back to a coarser valid bound.
    """
    mesh, left, size = _grid(groups, eps_error, delta_error)
    pmf, offset, noise = _compose(groups, mesh, left, size, np.float64)
    # Only ε ≥ 0 is asked for, so only the losses t > 0 matter (and e^-t cannot overflow).
    t = (np.arange(size, dtype=np.float64) - left) * mesh + offset
    keep = t > 0
    t = t[keep]
    if 8.0 * noise * t.size > delta / 10:
        del pmf
        pmf, offset, noise = _compose(groups, mesh, left, size, np.longdouble)
    rounding = 8.0 * noise * t.size
    if not rounding <= delta / 2:
        raise FloatingPointError(f"PRV: FFT rounding ({rounding:.2g} in δ) is too large for δ={delta:g}.")
    p = np.maximum(pmf[keep], 0.0).astype(np.float64)
    del pmf
    # Tail sums: δ(ε) = Σ_{t_j > ε} p_j (1 - e^(ε - t_j)) = D1 - e^ε D2 over the tail.
    d1 = np.cumsum(p[::-1])[::-1]
    d2 = np.cumsum((p * np.exp(-t))[::-1])[::-1]
    delta_at_grid = d1 - np.exp(t) * d2

    def epsilon_at(target: float) -> float:
        if not target > 0:
            raise FloatingPointError("PRV: δ too small for the numerical precision of the grid.")
        if d1[0] - d2[0] <= target:  # δ(0) already small enough
            return 0.0
        below = np.flatnonzero(delta_at_grid <= target)
        if not below.size:
            raise FloatingPointError("PRV: the grid does not reach ε at this δ.")
        i = int(below[0])
        return float(max(0.0, math.log((d1[i] - target) / d2[i])))

    estimate = epsilon_at(delta)
    upper = epsilon_at(delta - delta_error - rounding) + eps_error
    return estimate, upper


@lru_cache(maxsize=1024)
def _prv_epsilon(
    groups: Groups,
    delta: float,
    relative_error: float,
    absolute_error: float,
    max_grid_size: int,
    delta_error_fraction: float,
    rdp_only_above: float,
) -> tuple[float, float]:
    """(estimate, reported upper bound) of the PRV accountant, with the adaptive precision of :class:`PRVAccountant`."""
    groups, shortcut = shortcut_bounds(groups, delta, rdp_only_above)
    if shortcut is not None:
        return shortcut
    rdp = rdp_epsilon(groups, delta)  # cached: the shortcut computed it
    delta_error = delta * delta_error_fraction
    failures = (MemoryError, FloatingPointError, ValueError, RuntimeError, ZeroDivisionError)
    with warnings.catch_warnings(), np.errstate(over="ignore", under="ignore"):
        warnings.simplefilter("ignore")
        try:
            estimate, upper = _guide(groups, delta, delta_error, max_grid_size)
        except failures:
            return rdp, rdp  # still an upper bound, only a looser one
        eps_error = max(relative_error * estimate, absolute_error, _min_eps_error(groups, delta_error, max_grid_size))
        if eps_error < upper - estimate:
            try:
                estimate, fine = _prv_bounds(groups, delta, eps_error, delta_error)
                upper = min(upper, fine)
            except failures:
                pass  # keep the coarse run's valid bound
    return estimate, min(upper, rdp)


def _guide(groups: Groups, delta: float, delta_error: float, max_grid_size: int) -> tuple[float, float]:
    """A coarse PRV run: eps_error about 10 % of ε (from RDP first, then from its own estimate).

    Its estimate is within ~0.5 % of ε (the estimate converges much faster than the guaranteed bound), which is
    what calibration and the choice of the fine precision need; its upper bound is valid, just loose.
    """
    cap = _min_eps_error(groups, delta_error, max(1 << 16, max_grid_size // 16))
    guess = rdp_epsilon(groups, delta)
    for _ in range(3):
        eps_error = max(0.1 * guess, cap, 1e-4)
        estimate, upper = _prv_bounds(groups, delta, eps_error, delta_error)
        if eps_error <= max(0.2 * estimate, cap, 1e-4):
            break
        guess = estimate
    return estimate, upper


class PRVAccountant:
    """The PRV accountant (Gopi, Lee & Wutschitz, 2021) with adaptive precision: the default accountant.

    ``epsilon`` is the PRV upper bound: ε read off the discretised composition at δ - δ_error, plus the
    discretisation error ``eps_error`` the grid guarantees. ``eps_error`` is chosen per call, as
    ``max(relative_error × ε̂, absolute_error)`` where ε̂ is a coarse PRV estimate, or coarser if the grid would
    exceed ``max_grid_size`` points (this bounds time and memory; the value is still an upper bound, only looser).
    All-``q = 1`` compositions use the exact closed form; for very large ε (RDP bound above ``rdp_only_above``)
    the RDP bound is reported. Values are cached per (grouped segments, δ).

    Args:
        relative_error: the discretisation error allowed, as a fraction of ε (0.01: the bound is ~1 % above ε).
        absolute_error: the smallest discretisation error asked for (for tiny ε, where 1 % would be costly).
        max_grid_size: the largest grid (points); 2²³ costs ~0.5 GB and a few seconds.
        delta_error_fraction: the δ error allowed, as a fraction of δ.
        rdp_only_above: above this RDP ε, report the RDP bound without running PRV.

    Example:
        >>> acc = PRVAccountant()
        >>> eps = acc.epsilon([MechanismSegment(1.0, 0.01, 1000)], 1e-5)  # doctest: +SKIP
    """

    def __init__(
        self,
        relative_error: float = 0.01,
        absolute_error: float = 1e-3,
        max_grid_size: int = 1 << 23,
        delta_error_fraction: float = 1e-3,
        rdp_only_above: float = 100.0,
    ) -> None:
        if not 0 < relative_error < 1:
            raise ValueError(f"relative_error must be in (0, 1), got {relative_error}.")
        if not absolute_error > 0:
            raise ValueError(f"absolute_error must be positive, got {absolute_error}.")
        if max_grid_size < 1 << 16:
            raise ValueError(f"max_grid_size must be at least 2**16, got {max_grid_size}.")
        if not 0 < delta_error_fraction < 0.5:
            raise ValueError(f"delta_error_fraction must be in (0, 0.5), got {delta_error_fraction}.")
        self.relative_error = float(relative_error)
        self.absolute_error = float(absolute_error)
        self.max_grid_size = int(max_grid_size)
        self.delta_error_fraction = float(delta_error_fraction)
        self.rdp_only_above = float(rdp_only_above)

    def _evaluate(self, segments: Sequence[MechanismSegment], delta: float) -> tuple[float, float]:
        check_delta(delta)
        return _prv_epsilon(
            group_segments(segments),
            float(delta),
            self.relative_error,
            self.absolute_error,
            self.max_grid_size,
            self.delta_error_fraction,
            self.rdp_only_above,
        )

    def epsilon(self, segments: Sequence[MechanismSegment], delta: float) -> float:
        """The PRV upper bound on ε of ``segments`` at ``delta`` (0.0 for an empty composition)."""
        return self._evaluate(segments, delta)[1]

    def estimate(self, segments: Sequence[MechanismSegment], delta: float) -> float:
        """A cheap estimate of ε (a coarse PRV run; not a bound), to guide calibration."""
        check_delta(delta)
        groups = group_segments(segments)
        if not groups:
            return 0.0
        if all(q >= 1.0 for _, q, _ in groups):
            return self.epsilon(segments, delta)
        groups = merge_gaussians(groups)
        rdp = rdp_epsilon(groups, float(delta))
        if not rdp <= self.rdp_only_above:
            return rdp
        try:
            with warnings.catch_warnings(), np.errstate(over="ignore", under="ignore"):
                warnings.simplefilter("ignore")
                return _guide(groups, float(delta), delta * self.delta_error_fraction, self.max_grid_size)[0]
        except (MemoryError, FloatingPointError, ValueError, RuntimeError):
            return rdp

    def __repr__(self) -> str:
        return (
            f"PRVAccountant(relative_error={self.relative_error}, absolute_error={self.absolute_error},"
            f" max_grid_size={self.max_grid_size})"
        )
