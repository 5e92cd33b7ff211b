"""The multi-run audit: train a small model many times, each time with or without one canary, for the tightest bound.

Each run includes the canary with probability 1/2, independently; the runs are independent, so together they form
one mechanism that is (ε, δ)-DP with respect to each run's canary, and the statistic of
:mod:`lightning_dp.audit.statistics` applies with one "canary" per run. One canary per run removes the interference
between canaries of the one-run audit, and a worst-case canary (e.g. a gradient canary on a coordinate no real
example touches) can approach the claimed ε given enough runs: :func:`max_epsilon_lower_bound` of the number of
runs is the most it can show.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lightning_dp.audit.result import AuditResult, OnViolation, check_audit_options
from lightning_dp.audit.statistics import epsilon_lower_bound_from_scores
from lightning_dp.console import notice
from lightning_dp.randomness import fresh_seed, stream_source

#: ``train_and_score(include_canary, run_index) -> score`` (higher: more likely included)
TrainAndScore = Callable[[bool, int], float]


def draw_memberships(num_runs: int, seed: int | None = None) -> np.ndarray:
    """Whether each run includes the canary: independent fair coins (fresh OS entropy unless ``seed`` is given)."""
    source = stream_source(fresh_seed() if seed is None else seed, "audit", -1)
    return (source.uniform(num_runs) < 0.5).numpy()


def multi_run_audit(
    train_and_score: TrainAndScore,
    num_runs: int,
    claimed_epsilon: float,
    delta: float,
    confidence: float = 0.95,
    guess_fractions: Sequence[float] | None = None,
    on_violation: OnViolation = "error",
    seed: int | None = None,
) -> AuditResult:
    """Train ``num_runs`` times, each with the canary with probability 1/2, and bound ε from the scores.

    Args:
        train_and_score: trains one run from scratch (a fresh model, data and ``DPStrategy``), with the canary in
            its training set when ``include_canary`` is true, and returns the canary's score under that run (e.g.
            minus its loss, or a white-box :class:`~lightning_dp.audit.CanaryAudit`'s score with one canary).
        num_runs: m, the number of runs (the bound can be at most :func:`max_epsilon_lower_bound` of m).
        claimed_epsilon: the ε every run claims (its accountant's bound) at ``delta``.
        delta: δ of the claim.
        confidence: the probability with which the bound holds.
        guess_fractions: guess counts to try, as fractions of the runs (Bonferroni-corrected).
        on_violation: ``"error"``: raise when the bound exceeds the claim; ``"warn"``: only print it.
        seed: fix the membership draw (tests only).

    Returns:
        The bound beside the claim.

    Raises:
        DPMisconfigurationError: for invalid arguments.
        PrivacyAuditError: with ``on_violation="error"``, when the bound exceeds ``claimed_epsilon``.

    Example:
        >>> def train_and_score(include, run):  # doctest: +SKIP
        ...     model, data = make_model(), make_data(with_canary=include)
        ...     L.Trainer(strategy=DPStrategy(noise_multiplier=1.0), max_epochs=3).fit(model, data)
        ...     return -canary_loss(model)
        >>> multi_run_audit(train_and_score, 200, claimed_epsilon=2.0, delta=1e-5)  # doctest: +SKIP
    """
    check_audit_options(num_runs, confidence, on_violation)
    included = draw_memberships(num_runs, seed)
    scores = np.array([float(train_and_score(bool(inc), i)) for i, inc in enumerate(included)])
    eps, guesses, correct = epsilon_lower_bound_from_scores(scores, included, delta, confidence, guess_fractions)
    result = AuditResult(eps, float(claimed_epsilon), delta, confidence, num_runs, guesses, correct, unit="runs")
    notice(result.describe())
    result.verdict(on_violation)
    return result


__all__ = ["TrainAndScore", "draw_memberships", "multi_run_audit"]
