"""The statistics of a privacy audit: from guesses about canaries to a lower bound on ε.

An audit inserts ``m`` canaries, each included at random with probability 1/2, trains, and lets an auditor guess,
for ``r`` of them, whether each was included. Steinke, Nasr & Jagielski ("Privacy auditing with one (1) training
run", NeurIPS 2023, Theorem 3.1 and its (ε, δ) form, Proposition 5.2 / Algorithm 2) show that if training is
(ε, δ)-DP with respect to each canary, then the number ``W`` of correct guesses satisfies

    P[W ≥ v] ≤ β + 2·m·δ·α,  β = P[Binomial(r, p) ≥ v],  α = max_{1≤i≤v} P[v − i ≤ Binomial(r, p) < v] / i,

with ``p = e^ε / (1 + e^ε)`` (the accuracy of ε-DP randomised response). So ``v`` correct guesses reject every
(ε, δ) claim whose right-hand side is at most ``1 − confidence``; the largest such ε is an ε *lower bound* that holds
with probability ``confidence`` (over the canaries' inclusion and the run's randomness). With δ = 0 it is the largest
ε with ``P[Binomial(r, e^ε/(1+e^ε)) ≥ v] ≤ 1 − confidence``.

The bound is monotone in ε when ``2·m·δ ≤ 1`` (each term ``β + 2mδ·w_i/i`` has a non-negative derivative in
``p``), so rejecting ε rejects every smaller ε and a bisection finds the largest rejected one exactly. Larger
``2·m·δ`` is refused: the δ term then swamps the test.

Several guess counts may be tried on the same scores (:func:`epsilon_lower_bound_from_scores`); each is then tested
at ``(1 − confidence) / k`` for ``k`` candidates (Bonferroni), so the best of them still holds at ``confidence``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.special
import scipy.stats

from lightning_dp.errors import DPMisconfigurationError

_TOLERANCE = 1e-7


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise DPMisconfigurationError(
            f"An audit needs 0 ≤ num_correct ≤ num_guesses ≤ num_canaries, got num_correct={num_correct},"
            f" num_guesses={num_guesses}, num_canaries={num_canaries}: count only the canaries guessed (not the"
            " abstentions) and only the correct guesses among them."
        )


def _check_delta(num_canaries: int, delta: float) -> None:
    if not 0.0 <= delta < 1.0:
        raise DPMisconfigurationError(f"delta must be in [0, 1), got {delta}.")
    if 2 * num_canaries * delta > 1.0:
        raise DPMisconfigurationError(
            f"2·num_canaries·δ = {2 * num_canaries * delta:.3g} > 1: the one-run test of Steinke et al. charges δ once"
            " per canary, so with this many canaries it cannot reject anything. Use fewer canaries or audit at a"
            " smaller δ."
        )


def one_run_p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float, delta: float) -> float:
    """The probability, under the claim that training is (ε, δ)-DP, of at least ``num_correct`` correct guesses.

    Args:
        num_canaries: m, the canaries inserted (each included independently with probability 1/2).
        num_guesses: r, the canaries the auditor guessed about (the others are abstentions).
        num_correct: v, the correct guesses.
        epsilon: ε of the claim tested.
        delta: δ of the claim tested.

    Returns:
        The p-value ``min(1, β + 2mδα)`` of Steinke et al. (see the module docstring).

    Raises:
        DPMisconfigurationError: for inconsistent counts, δ outside [0, 1) or ``2·m·δ > 1``.

    Example:
        >>> round(one_run_p_value(100, 10, 10, 0.0, 0.0), 6)  # ten coin flips all right
        0.000977
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    _check_delta(num_canaries, delta)
    if num_correct == 0:
        return 1.0
    p = float(scipy.special.expit(epsilon))
    beta = float(scipy.stats.binom.sf(num_correct - 1, num_guesses, p))
    if delta == 0.0:
        return min(beta, 1.0)
    below = scipy.stats.binom.pmf(np.arange(num_correct - 1, -1, -1), num_guesses, p)  # P[B = v-1], P[B = v-2], ...
    windows = np.cumsum(below)  # windows[i-1] = P[v - i ≤ B < v]
    alpha = float(np.max(windows / np.arange(1, num_correct + 1)))
    return min(beta + 2.0 * num_canaries * delta * alpha, 1.0)


def one_run_epsilon_lower_bound(
    num_canaries: int, num_guesses: int, num_correct: int, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """The largest ε that ``num_correct`` correct guesses out of ``num_guesses`` reject at ``confidence``.

    With probability at least ``confidence``, a mechanism that is (ε, δ)-DP with respect to each canary does not
    produce a result whose bound exceeds ε (Steinke, Nasr & Jagielski 2023).

    Args:
        num_canaries: m, the canaries inserted (each included independently with probability 1/2).
        num_guesses: r, the canaries guessed about.
        num_correct: v, the correct guesses.
        delta: δ of the claims tested (the run's δ).
        confidence: the probability with which the bound holds, in (0, 1).

    Returns:
        ε ≥ 0 (0.0 when the guesses reject no claim), rounded down to within 1e-7.

    Raises:
        DPMisconfigurationError: for inconsistent counts, δ outside [0, 1), ``2·m·δ > 1`` or ``confidence``
            outside (0, 1).

    Example:
        >>> round(one_run_epsilon_lower_bound(1000, 100, 100, delta=0.0, confidence=0.95), 3)
        3.49
    """
    if not 0.0 < confidence < 1.0:
        raise DPMisconfigurationError(f"confidence must be in (0, 1), got {confidence}.")
    significance = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return one_run_p_value(num_canaries, num_guesses, num_correct, eps, delta) <= significance

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:  # p → 1 as ε → ∞ for any r ≥ v ≥ 1: unreachable unless the counts are degenerate
            return lo
    while hi - lo > _TOLERANCE:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def count_correct_guesses(
    scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray, guesses_in: int, guesses_out: int
) -> int:
    """Guess "included" for the ``guesses_in`` highest scores and "left out" for the ``guesses_out`` lowest; count
    the correct guesses. Ties are broken by canary index (the scores decide, never the membership).

    Args:
        scores: one score per canary, higher meaning "more likely included".
        included: the true membership of each canary.
        guesses_in: how many top scores are guessed "included".
        guesses_out: how many bottom scores are guessed "left out".

    Raises:
        DPMisconfigurationError: if ``guesses_in + guesses_out`` exceeds the number of canaries.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if guesses_in < 0 or guesses_out < 0 or guesses_in + guesses_out > scores.size:
        raise DPMisconfigurationError(
            f"Cannot guess {guesses_in} 'in' and {guesses_out} 'out' among {scores.size} canaries."
        )
    order = np.argsort(scores, kind="stable")
    correct_out = int((~included[order[:guesses_out]]).sum())
    correct_in = int(included[order[scores.size - guesses_in :]].sum()) if guesses_in else 0
    return correct_in + correct_out


def default_guess_fractions() -> tuple[float, ...]:
    """The guess counts tried by default, as fractions of the canaries (split evenly between "in" and "out")."""
    return (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def epsilon_lower_bound_from_scores(
    scores: Sequence[float] | np.ndarray,
    included: Sequence[bool] | np.ndarray,
    delta: float = 0.0,
    confidence: float = 0.95,
    guess_fractions: Sequence[float] | None = None,
) -> tuple[float, int, int]:
    """The best one-run ε lower bound over several guess counts, each tested at ``(1 − confidence)/k`` (Bonferroni
    over the ``k`` counts), so that the best still holds with probability ``confidence``.

    Args:
        scores: one score per canary (higher: more likely included).
        included: the canaries' true membership.
        delta: δ of the claim audited.
        confidence: the probability with which the bound holds.
        guess_fractions: the guess counts to try, as fractions of the canaries, half guessed "in" (top scores) and
            half "out" (bottom scores). Default: :func:`default_guess_fractions`.

    Returns:
        ``(epsilon_lower_bound, num_guesses, num_correct)`` of the best guess count.

    Raises:
        DPMisconfigurationError: for scores and membership of different lengths, a fraction outside (0, 1], or the
            errors of :func:`one_run_epsilon_lower_bound`.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise DPMisconfigurationError(
            f"scores and membership must be 1-D of equal length, got {scores.shape} and {included.shape}."
        )
    fractions = tuple(default_guess_fractions() if guess_fractions is None else guess_fractions)
    if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
        raise DPMisconfigurationError(f"guess_fractions must be non-empty numbers in (0, 1], got {fractions}.")
    m = scores.size
    adjusted = 1.0 - (1.0 - confidence) / len(fractions)
    best = (0.0, 0, 0)
    for fraction in fractions:
        r = max(1, min(m, round(fraction * m)))
        g_in = r - r // 2
        v = count_correct_guesses(scores, included, g_in, r - g_in)
        eps = one_run_epsilon_lower_bound(m, r, v, delta, adjusted)
        if eps > best[0] or best[1] == 0:
            best = (eps, r, v)
    return best


def max_epsilon_lower_bound(num_canaries: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The largest bound ``num_canaries`` canaries can give (every canary guessed, every guess right): an audit
    cannot show more, whatever the run. Use it to size an audit: it must exceed the claim to catch a broken run.

    Example:
        >>> round(max_epsilon_lower_bound(1000), 2)
        5.81
    """
    return one_run_epsilon_lower_bound(num_canaries, num_canaries, num_canaries, delta, confidence)


__all__ = [
    "count_correct_guesses",
    "default_guess_fractions",
    "epsilon_lower_bound_from_scores",
    "max_epsilon_lower_bound",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
]
