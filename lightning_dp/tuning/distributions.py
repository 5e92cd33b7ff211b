r"""The distributions of the number of runs of an accounted search (Papernot & Steinke, ICLR 2022).

A search that trains a *fixed* number of candidates and releases the best one pays up to the sum of their ε. Drawing
the number of runs K at random from one of these distributions, and releasing only the best run, costs a small
multiple of one run's ε instead (:func:`~lightning_dp.tuning.accounting.search_epsilon`):

- :class:`PoissonRuns` — K ~ Poisson(μ); K = 0 is possible (the search then releases nothing).
- :class:`GeometricRuns` — P(K = k) = γ(1-γ)^(k-1), k ≥ 1, mean 1/γ: the truncated negative binomial of shape 1.
- :class:`TruncatedNegativeBinomialRuns` — P(K = k) ∝ (1-γ)^k · C(k+η-1, k), k ≥ 1, shape η > 0: a smaller η gives a
  heavier tail and a cheaper bound; η → ∞ tends to Poisson.

Each has the ``mean`` and ``shape`` that ``dp_accounting``'s ``RepeatAndSelectDpEvent(event, mean, shape)`` takes
(shape ``inf`` for Poisson, 1 for geometric) and a :meth:`~RunsDistribution.sample` method that draws K from a
:class:`~lightning_dp.randomness.RandomSource` (a torch generator, or the secure generator) by inversion of the CDF:
never from torch's, numpy's or Python's global RNG.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.randomness import RandomSource

#: Relative accuracy of γ found from the mean of a truncated negative binomial (the side whose mean is ≥ the asked).
_GAMMA_RTOL = 1e-13


@runtime_checkable
class RunsDistribution(Protocol):
    """A distribution of the number of runs K of an accounted search.

    Attributes:
        mean: E[K] (≥ 1).
        shape: ``dp_accounting``'s shape parameter: ``math.inf`` for Poisson, η for a truncated negative binomial.
    """

    mean: float
    shape: float

    def pmf(self, k: int) -> float:
        """P(K = k)."""
        ...

    def sample(self, source: RandomSource) -> int:
        """One draw of K from ``source``."""
        ...


class _InversionSampler:
    """Draws K by inverting the CDF: one uniform from the source, then the smallest k with CDF(k) > u."""

    mean: float
    shape: float
    _first: int = 0

    def log_pmf(self, k: int) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def pmf(self, k: int) -> float:
        """P(K = k)."""
        return 0.0 if k < self._first else math.exp(self.log_pmf(int(k)))

    def variance(self) -> float:
        """Var[K], summed from the probability mass function."""
        mean = second = 0.0
        for k, p in self._masses():
            mean += k * p
            second += k * k * p
        return second - mean * mean

    def _masses(self):
        """(k, P(K = k)) from the first k until the remaining tail is negligible."""
        total, k = 0.0, self._first
        while True:
            p = self.pmf(k)
            total += p
            yield k, p
            if (k > self.mean and p < 1e-17) or total >= 1.0:
                return
            k += 1

    def sample(self, source: RandomSource) -> int:
        """One draw of K from ``source`` (a :class:`~lightning_dp.randomness.RandomSource`).

        Args:
            source: e.g. ``TorchSource(seed)`` or ``SecureSource(key)`` from :mod:`lightning_dp.randomness`.

        Returns:
            The number of runs.
        """
        u = float(source.uniform(1)[0])
        cdf, last = 0.0, self._first
        for k, p in self._masses():
            cdf += p
            last = k
            if u < cdf:
                return k
        return last  # u within float rounding of 1: the last k with non-negligible mass

    def dp_event(self, event: Any) -> Any:
        """``dp_accounting``'s ``RepeatAndSelectDpEvent`` of ``event`` with this distribution (needs dp-accounting).

        Raises:
            ModuleNotFoundError: if ``dp_accounting`` is not installed (``pip install dp-accounting``).
        """
        try:
            from dp_accounting.dp_event import RepeatAndSelectDpEvent
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                "dp_event() builds a dp_accounting event: pip install dp-accounting. search_epsilon needs nothing"
                " more than lightning_dp."
            ) from err
        return RepeatAndSelectDpEvent(event, self.mean, self.shape)


class PoissonRuns(_InversionSampler):
    """K ~ Poisson(mean): the number of runs of a search (K = 0 happens with probability e^(-mean)).

    Args:
        mean: E[K] ≥ 1.

    Raises:
        DPMisconfigurationError: for a mean below 1 or not finite.

    Example:
        >>> from lightning_dp.randomness import TorchSource
        >>> runs = PoissonRuns(8)
        >>> k = runs.sample(TorchSource(0))
    """

    shape = math.inf

    def __init__(self, mean: float) -> None:
        _check_mean(mean)
        self.mean = float(mean)

    def log_pmf(self, k: int) -> float:
        """Log P(K = k)."""
        return -self.mean + k * math.log(self.mean) - math.lgamma(k + 1)

    def variance(self) -> float:
        """Var[K] = mean."""
        return self.mean

    def __repr__(self) -> str:
        return f"PoissonRuns(mean={self.mean:g})"


class TruncatedNegativeBinomialRuns(_InversionSampler):
    """K ≥ 1 with P(K = k) = (1-γ)^k · Γ(k+η) / (Γ(η) k!) / (γ^(-η) - 1), the truncated negative binomial of shape η.

    γ is found from the mean by bisection, on the side whose mean is at least the one asked for; sampling and the
    accounting use the same γ and its exact mean, so the bound is for the distribution actually sampled.

    Args:
        mean: E[K] ≥ 1 (1: always one run).
        shape: η > 0 (1 is the geometric distribution; smaller values cost less ε for the same mean).

    Raises:
        DPMisconfigurationError: for a mean below 1, or a shape that is not a positive finite number.

    Example:
        >>> runs = TruncatedNegativeBinomialRuns(mean=10, shape=0.5)
        >>> round(runs.gamma, 4)
        0.0251
    """

    def __init__(self, mean: float, shape: float) -> None:
        _check_mean(mean)
        if not (shape > 0 and math.isfinite(shape)):
            raise DPMisconfigurationError(
                f"shape must be a positive finite number, got {shape!r} (use PoissonRuns for the limit shape → ∞)."
            )
        self.shape = float(shape)
        self._first = 1
        self.gamma = 1.0 if mean == 1 else _gamma_of_mean(float(mean), self.shape)
        self.mean = float(mean) if mean == 1 else max(float(mean), _tnb_mean(self.gamma, self.shape))

    def log_pmf(self, k: int) -> float:
        """Log P(K = k)."""
        if self.gamma == 1.0:
            return 0.0 if k == 1 else -math.inf
        g, eta = self.gamma, self.shape
        log_norm = math.log(math.expm1(-eta * math.log(g)))  # log(γ^(-η) - 1)
        return k * math.log1p(-g) + math.lgamma(k + eta) - math.lgamma(eta) - math.lgamma(k + 1) - log_norm

    def __repr__(self) -> str:
        return f"TruncatedNegativeBinomialRuns(mean={self.mean:g}, shape={self.shape:g})"


class GeometricRuns(TruncatedNegativeBinomialRuns):
    """K ≥ 1 with P(K = k) = γ(1-γ)^(k-1), γ = 1/mean: the truncated negative binomial of shape 1.

    Args:
        mean: E[K] ≥ 1.

    Example:
        >>> GeometricRuns(4).gamma
        0.25
    """

    def __init__(self, mean: float) -> None:
        _check_mean(mean)
        super().__init__(mean, 1.0)
        self.gamma = 1.0 / float(mean)
        self.mean = float(mean)

    def variance(self) -> float:
        """Var[K] = (1-γ)/γ²."""
        return (1.0 - self.gamma) / self.gamma**2

    def __repr__(self) -> str:
        return f"GeometricRuns(mean={self.mean:g})"


def _check_mean(mean: float) -> None:
    if not (isinstance(mean, (int, float)) and math.isfinite(mean) and mean >= 1):
        raise DPMisconfigurationError(
            f"The mean number of runs must be a finite number ≥ 1, got {mean!r} (the Papernot–Steinke bound needs"
            " E[K] ≥ 1)."
        )


def _tnb_mean(gamma: float, shape: float) -> float:
    """E[K] of the truncated negative binomial: η(1-γ) / (γ(1-γ^η))."""
    return shape * (1.0 - gamma) / (gamma * -math.expm1(shape * math.log(gamma)))


def _gamma_of_mean(mean: float, shape: float) -> float:
    """γ whose mean is the smallest at or above ``mean`` (mean falls with γ), to a relative ``_GAMMA_RTOL``."""
    lo, hi = 0.0, min(1.0, 2.0 * (shape + 1.0) / mean)  # mean(γ) ≤ 2(η+1)/γ bounds γ from above
    while hi > lo * (1.0 + _GAMMA_RTOL):
        mid = 0.5 * (lo + hi)
        if _tnb_mean(mid, shape) < mean:
            hi = mid
        else:
            lo = mid
    return lo


__all__ = ["GeometricRuns", "PoissonRuns", "RunsDistribution", "TruncatedNegativeBinomialRuns"]
