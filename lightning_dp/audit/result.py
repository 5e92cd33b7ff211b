"""The outcome of an audit: the lower bound beside the claim, as figures, a console line and a verdict."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from lightning_dp.errors import DPMisconfigurationError, PrivacyAuditError

OnViolation = Literal["error", "warn"]


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """An audited ε lower bound and the claim it is compared with.

    Attributes:
        epsilon_lower_bound: ε that the audit shows the run exceeds, with probability ``confidence``.
        claimed_epsilon: the run's claimed ε (its accountant's upper bound) at ``delta``.
        delta: δ of both.
        confidence: the probability with which the lower bound holds.
        num_canaries: canaries inserted (each included with probability 1/2).
        num_guesses: canaries the best guess count guessed about.
        num_correct: correct guesses among them.
        unit: what the canaries are called in messages (``"runs"`` for the multi-run audit).
    """

    epsilon_lower_bound: float
    claimed_epsilon: float
    delta: float
    confidence: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    unit: str = "canaries"

    @property
    def violated(self) -> bool:
        """Whether the lower bound exceeds the claim (the mechanism does not deliver its ε)."""
        return self.epsilon_lower_bound > self.claimed_epsilon

    def figures(self) -> dict[str, float]:
        """The figures as ``audit/...`` keys of plain numbers (for loggers and the privacy summary)."""
        return {
            "audit/epsilon_lower_bound": self.epsilon_lower_bound,
            "audit/claimed_epsilon": self.claimed_epsilon,
            "audit/confidence": self.confidence,
            "audit/num_canaries": float(self.num_canaries),
            "audit/num_guesses": float(self.num_guesses),
            "audit/num_correct": float(self.num_correct),
        }

    def describe(self) -> str:
        """One line: the lower bound beside the claim."""
        line = (
            f"lightning_dp audit: ε ≥ {self.epsilon_lower_bound:.3g} (audited lower bound, {self.confidence:.0%}"
            f" confidence; {self.num_correct}/{self.num_guesses} guesses right on {self.num_canaries} {self.unit})"
            f" vs claimed ε = {self.claimed_epsilon:.3g} at δ = {self.delta:g}"
        )
        if self.violated:
            return line + ": THE AUDIT EXCEEDS THE CLAIM."
        return line + ": consistent with the claim."

    def verdict(self, on_violation: OnViolation) -> None:
        """Raise (or let the caller warn) when the audit exceeds the claim.

        Raises:
            PrivacyAuditError: with ``on_violation="error"`` when :attr:`violated`.
        """
        if self.violated and on_violation == "error":
            raise PrivacyAuditError(violation_message(self), self.epsilon_lower_bound, self.claimed_epsilon)


def violation_message(result: AuditResult) -> str:
    """Why an audit above the claim matters, and what to do."""
    return (
        f"The privacy audit shows ε ≥ {result.epsilon_lower_bound:.3g} with {result.confidence:.0%} confidence, above"
        f" the claimed ε = {result.claimed_epsilon:.3g} (δ = {result.delta:g}). The mechanism does not deliver its"
        " claim (a bug between the data and the optimizer: clipping, noise, sampling or accounting), unless this is"
        f" the ≤ {1 - result.confidence:.0%} chance of an unlucky audit. Do not publish this model; rerun the audit,"
        " and if it exceeds the claim again, report it. Pass on_violation='warn' to only print this."
    )


def check_audit_options(num_canaries: int, confidence: float, on_violation: str) -> None:
    """Refuse audit settings that cannot give a meaningful bound.

    Raises:
        DPMisconfigurationError: for fewer than 2 canaries, ``confidence`` outside (0, 1), or an unknown
            ``on_violation``.
    """
    if not isinstance(num_canaries, int) or num_canaries < 2:
        raise DPMisconfigurationError(f"num_canaries must be an int ≥ 2, got {num_canaries!r}.")
    if not (0.0 < confidence < 1.0) or math.isnan(confidence):
        raise DPMisconfigurationError(f"confidence must be in (0, 1), got {confidence}.")
    if on_violation not in ("error", "warn"):
        raise DPMisconfigurationError(f"on_violation must be 'error' or 'warn', got {on_violation!r}.")


__all__ = ["AuditResult", "OnViolation", "check_audit_options", "violation_message"]
