r"""ε of a whole hyperparameter search: the Rényi-DP bound of Papernot & Steinke (ICLR 2022) for a random number of
runs of which only the best is released, and the calibration of σ so that the *search* meets a target.

One run is a composition of Poisson-subsampled Gaussian mechanisms ``[(σ, q, T), ...]``. Its Rényi-DP curve ε(λ) is
computed here at the integer orders of ``dp_accounting``'s default order list (2…63, 128, 256, 512, 1024) from the
closed form of Mironov, Talwar & Zhang (2019) for integer orders, A_λ = Σ_k C(λ,k)(1-q)^(λ-k) q^k e^((k²-k)/(2σ²)),
summed in log space. The search's curve follows from Theorem 2 (truncated negative binomial, geometric) or Theorem 6
(Poisson) of Papernot & Steinke, and (ε, δ) from the conversion of Canonne, Kamath & Steinke (2020). Using a subset of
``dp_accounting``'s orders keeps the result at or above its ``RepeatAndSelectDpEvent`` bound (a minimum over fewer
orders, and RDP never falls with the order); the tests check it is within 15 % of it.

Runs with different plans (a search over the batch size or the number of epochs): the base mechanism of the search
is "draw a configuration from the space, then train it", a mixture over the configurations, whose Rényi divergence
at each order is at most the largest of theirs (joint quasi-convexity). :func:`search_epsilon_of_plans` takes that
per-order maximum over *every* plan of the space (not only the plans drawn: the draw is part of the mechanism).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.special import gammaln, logsumexp

from lightning_dp.errors import DPMisconfigurationError, PrivacyTargetError
from lightning_dp.tuning.distributions import PoissonRuns, RunsDistribution, TruncatedNegativeBinomialRuns

#: The Rényi orders of the search bound: the integer orders of ``dp_accounting``'s ``DEFAULT_RDP_ORDERS``.
ORDERS = np.array(list(range(2, 64)) + [128, 256, 512, 1024], dtype=np.float64)
#: The reported ε is rounded up by this relative amount, so floating-point error cannot make it optimistic.
_ROUND_UP = 1e-9
#: The bracket of σ the calibration searches.
_SIGMA_RANGE = (1e-2, 1e4)

Segment = tuple[float, float, int]


def _as_segment(segment: Any) -> Segment:
    """``(σ, q, T)`` from a tuple or a :class:`~lightning_dp.accounting.MechanismSegment`-like object."""
    if hasattr(segment, "noise_multiplier"):
        sigma, q, steps = segment.noise_multiplier, segment.sample_rate, segment.steps
    else:
        sigma, q, steps = segment
    sigma, q = float(sigma), float(q)
    if not (sigma > 0 and math.isfinite(sigma)) or not (0 < q <= 1) or int(steps) != steps or steps < 0:
        raise DPMisconfigurationError(
            f"A segment is (noise_multiplier > 0, sample_rate in (0, 1], steps ≥ 0 integer); got {segment!r}."
        )
    return sigma, q, int(steps)


@lru_cache(maxsize=4096)
def _step_rdp(sigma: float, q: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at every order of :data:`ORDERS` (exact for integer orders)."""
    if q >= 1.0:
        curve = ORDERS / (2.0 * sigma * sigma)
    else:
        curve = np.empty_like(ORDERS)
        for i, lam in enumerate(ORDERS.astype(int)):
            k = np.arange(lam + 1, dtype=np.float64)
            log_binom = gammaln(lam + 1) - gammaln(k + 1) - gammaln(lam - k + 1)
            terms = log_binom + (lam - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2.0 * sigma * sigma)
            curve[i] = max(0.0, float(logsumexp(terms))) / (lam - 1)
    curve.setflags(write=False)
    return curve


def run_rdp(segments: Iterable[Any]) -> np.ndarray:
    """The Rényi-DP curve of one run (at :data:`ORDERS`): the sum of its segments' curves.

    Args:
        segments: ``(noise_multiplier, sample_rate, steps)`` tuples or ``MechanismSegment`` objects.

    Returns:
        ε(λ) at every order of :data:`ORDERS`.
    """
    total = np.zeros_like(ORDERS)
    for sigma, q, steps in map(_as_segment, segments):
        if steps:
            total = total + steps * _step_rdp(sigma, q)
    return total


def _log_delta(rdp: np.ndarray, epsilon: float) -> float:
    """Log δ at ``epsilon`` of an RDP curve: the better of the conversion of Canonne et al. (2020, Prop. 12) and the
    Bretagnolle–Huber bound δ ≤ TV ≤ √(1 - e^(-D_λ)) (valid since D_λ ≥ KL for λ > 1).
    """
    lam = ORDERS
    conversion = (lam - 1) * (rdp - epsilon + np.log1p(-1 / lam)) - np.log(lam)
    with np.errstate(divide="ignore"):
        total_variation = 0.5 * np.log(-np.expm1(-rdp))
    return min(0.0, float(np.min(np.minimum(conversion, total_variation))))


def epsilon_from_rdp(rdp: np.ndarray, delta: float) -> float:
    """(ε, δ) of an RDP curve at :data:`ORDERS` (Canonne, Kamath & Steinke 2020), minimised over the orders."""
    lam = ORDERS
    eps = rdp + np.log1p(-1 / lam) - np.log(delta * lam) / (lam - 1)
    return max(0.0, float(np.min(eps)))


def repeat_and_select_rdp(rdp: np.ndarray, runs: RunsDistribution) -> np.ndarray:
    """The RDP curve of running a mechanism K ~ ``runs`` times and releasing only the best run (Papernot & Steinke).

    Args:
        rdp: one run's curve at :data:`ORDERS`.
        runs: :class:`PoissonRuns`, :class:`GeometricRuns` or :class:`TruncatedNegativeBinomialRuns`.

    Returns:
        The search's curve at :data:`ORDERS`.
    """
    lam = ORDERS
    if isinstance(runs, PoissonRuns):  # Theorem 6: ε(λ) + μ·δ̂ + log μ / (λ-1), δ̂ = δ(ε̂) with ε̂ = log(1 + 1/(λ-1))
        mu = runs.mean
        delta_hat = np.array([math.exp(_log_delta(rdp, math.log1p(1.0 / (a - 1)))) for a in lam])
        return rdp + mu * delta_hat + math.log(mu) / (lam - 1)
    if isinstance(runs, TruncatedNegativeBinomialRuns):  # Theorem 2, minimised over λ̂
        eta = runs.shape
        c = (1 + eta) * float(np.min((1 - 1 / lam) * rdp + math.log(1 / runs.gamma) / lam))
        out = rdp + math.log(runs.mean) / (lam - 1) + c
        return np.minimum.accumulate(out[::-1])[::-1]  # RDP is non-decreasing in λ: bound low orders by higher ones
    raise DPMisconfigurationError(
        f"runs must be PoissonRuns, GeometricRuns or TruncatedNegativeBinomialRuns, got {runs!r}."
    )


def _check(delta: float, runs: RunsDistribution) -> None:
    if not (0 < delta < 1):
        raise DPMisconfigurationError(f"delta must be in (0, 1), got {delta!r}.")
    if not isinstance(runs, (PoissonRuns, TruncatedNegativeBinomialRuns)):
        raise DPMisconfigurationError(
            f"runs must be PoissonRuns, GeometricRuns or TruncatedNegativeBinomialRuns, got {runs!r}."
        )


def search_epsilon_of_plans(plans: Sequence[Iterable[Any]], delta: float, runs: RunsDistribution) -> float:
    """ε at ``delta`` of a search whose runs follow one of several plans (a configuration drawn per run).

    The base mechanism's curve is the per-order maximum of the plans' curves (see the module docstring).

    Args:
        plans: every plan the search space can produce; each a list of ``(noise_multiplier, sample_rate, steps)``.
        delta: δ of the whole search.
        runs: the distribution of the number of runs.

    Returns:
        An upper bound on ε of releasing the best run (its model, configuration and score).

    Raises:
        DPMisconfigurationError: for an empty plan list, a bad segment, δ or distribution.
    """
    distinct = {tuple(_as_segment(s) for s in p) for p in plans}
    ours = integer_order_search_epsilon(plans, delta, runs)
    if len(distinct) == 1:  # one plan: dp_accounting has the event too; report the tighter of two valid bounds
        return min(ours, _dp_accounting_epsilon(list(next(iter(distinct))), delta, runs))
    return ours


def integer_order_search_epsilon(plans: Sequence[Iterable[Any]], delta: float, runs: RunsDistribution) -> float:
    """Our own bound of :func:`search_epsilon_of_plans`, at integer orders only (independent of ``dp_accounting``).

    Raises:
        DPMisconfigurationError: for an empty plan list, a bad segment, δ or distribution.
    """
    _check(delta, runs)
    curves = [run_rdp(p) for p in plans]
    if not curves:
        raise DPMisconfigurationError("Give at least one plan (a list of (noise_multiplier, sample_rate, steps)).")
    base = np.max(np.stack(curves), axis=0)
    eps = epsilon_from_rdp(repeat_and_select_rdp(base, runs), delta)
    return eps * (1 + _ROUND_UP)


def search_epsilon(segments: Iterable[Any], delta: float, runs: RunsDistribution) -> float:
    """ε at ``delta`` of a search that trains K ~ ``runs`` runs, each made of ``segments``, and releases the best.

    The tighter of two valid upper bounds on the Rényi-DP bound of Papernot & Steinke: ours at integer orders (see
    the module docstring) and ``dp_accounting``'s (``RepeatAndSelectDpEvent`` with its ``RdpAccountant``, which
    adds fractional orders): never below ``dp_accounting``'s figure and within 15 % of it at every ε.

    Args:
        segments: one run's ``(noise_multiplier, sample_rate, steps)`` list (or ``MechanismSegment`` objects).
        delta: δ of the whole search.
        runs: :class:`PoissonRuns`, :class:`GeometricRuns` or :class:`TruncatedNegativeBinomialRuns`.

    Returns:
        An upper bound on ε of everything the search releases: the best run's model, configuration and score.

    Raises:
        DPMisconfigurationError: for a bad segment, δ or distribution.

    Example:
        >>> from lightning_dp.tuning import GeometricRuns
        >>> round(search_epsilon([(1.0, 0.01, 1000)], 1e-5, GeometricRuns(10)), 2)  # doctest: +SKIP
        5.75
    """
    return search_epsilon_of_plans([list(segments)], delta, runs)


def _dp_accounting_epsilon(plan: list[Segment], delta: float, runs: RunsDistribution) -> float:
    """The same bound from ``dp_accounting`` (its fractional orders make it tighter at large ε); inf if it fails.

    Both are valid upper bounds, so the search reports the tighter; our own computation stays the independent check
    (and the only one for heterogeneous plans, for which ``dp_accounting`` has no event).
    """
    try:
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        parts = []
        for sigma, q, steps in plan:
            gauss = dp_accounting.GaussianDpEvent(sigma)
            event = gauss if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gauss)
            parts.append(dp_accounting.SelfComposedDpEvent(event, steps))
        accountant = RdpAccountant()
        accountant.compose(runs.dp_event(dp_accounting.ComposedDpEvent(parts)))
        eps = float(accountant.get_epsilon(delta))
    except (ImportError, ValueError, ArithmeticError, NotImplementedError):
        return math.inf
    return eps if math.isfinite(eps) and eps > 0 else math.inf


def calibrate_search_noise(
    target_epsilon: float,
    delta: float,
    runs: RunsDistribution,
    plans: Sequence[tuple[float, int]],
    extra_segments: Sequence[Any] = (),
    rtol: float = 1e-4,
) -> list[float]:
    """σ for each plan so that the whole search meets ``target_epsilon`` at ``delta``.

    Each plan ``(sample_rate, steps)`` gets the σ at which a search of that plan alone spends a per-plan target; the
    per-plan target is the total target, lowered (by bisection) when the plans' curves cross so that the mixture's
    bound (:func:`search_epsilon_of_plans`) exceeds it.

    Args:
        target_epsilon: ε of the whole search.
        delta: δ of the whole search.
        runs: the distribution of the number of runs.
        plans: ``(sample_rate, steps)`` of every plan the search space can produce.
        extra_segments: segments every run adds at a fixed σ (e.g. the noisy validation score, ``(σ_s, 1.0, 1)``).
        rtol: relative accuracy of σ (the result is always on the private side of the target).

    Returns:
        σ per plan, in the order of ``plans``. The search is calibrated on our integer-order bound (fast: no
        ``dp_accounting`` call per bisection step); the ε then reported, :func:`search_epsilon_of_plans`, is at most
        that bound, so the target holds.

    Raises:
        PrivacyTargetError: if the target cannot be met even with σ = 10⁴ (e.g. the extra segments alone exceed it).
    """
    _check(delta, runs)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise DPMisconfigurationError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}.")
    extra = [_as_segment(s) for s in extra_segments]

    def plan_segments(sigmas: Sequence[float]) -> list[list[Segment]]:
        return [[(s, q, t), *extra] for s, (q, t) in zip(sigmas, plans)]

    def total(sigmas: Sequence[float]) -> float:
        return integer_order_search_epsilon(plan_segments(sigmas), delta, runs)

    def sigma_for(eps: float, q: float, steps: int) -> float:
        lo, hi = _SIGMA_RANGE
        if integer_order_search_epsilon([[(hi, q, steps), *extra]], delta, runs) > eps:
            raise PrivacyTargetError(
                f"A search with {runs!r} cannot meet ε = {target_epsilon:g} at δ = {delta:g} for q = {q:g}, {steps}"
                f" steps even at σ = {hi:g}{' (the score noise alone costs more)' if extra else ''}: raise the"
                " target, lower the mean number of runs, or raise the score noise."
            )
        if integer_order_search_epsilon([[(lo, q, steps), *extra]], delta, runs) <= eps:
            return lo
        while hi / lo > 1 + rtol:  # bisection in log σ: ε falls as σ grows
            mid = math.sqrt(lo * hi)
            if integer_order_search_epsilon([[(mid, q, steps), *extra]], delta, runs) > eps:
                lo = mid
            else:
                hi = mid
        return hi

    sigmas = [sigma_for(target_epsilon, q, t) for q, t in plans]
    if total(sigmas) <= target_epsilon:
        return sigmas
    lo, hi = 0.0, target_epsilon  # per-plan target: hi fails, find the largest that meets the total
    while hi - lo > rtol * target_epsilon:
        mid = 0.5 * (lo + hi)
        trial = [sigma_for(mid, q, t) for q, t in plans]
        if total(trial) <= target_epsilon:
            lo, sigmas = mid, trial
        else:
            hi = mid
    if lo == 0.0:  # pragma: no cover - each plan alone meets the target at a small enough per-plan target
        raise PrivacyTargetError(f"Could not calibrate σ for the search to ε = {target_epsilon:g}.")
    return sigmas


__all__ = [
    "ORDERS",
    "calibrate_search_noise",
    "epsilon_from_rdp",
    "repeat_and_select_rdp",
    "run_rdp",
    "integer_order_search_epsilon",
    "search_epsilon",
    "search_epsilon_of_plans",
]
