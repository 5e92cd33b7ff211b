"""Budget enforcement and ε reporting off the critical path: Lightning-free, shared by the strategy and callbacks.

- :class:`BudgetGuard` answers "does the next step keep ε ≤ max?" exactly, cheaply: steps certified by a calibration
  need no evaluation; otherwise one ε evaluation clears ``lookahead`` steps and a bisection finds the last step
  near the limit.
- :class:`EpsilonMeter` serves the ``dp/epsilon`` metric: an upper bound on the ε spent through each step, within a
  few percent, refreshed on a deterministic geometric grid of steps, never decreasing, exact at the last step.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from lightning_dp.accounting import MechanismSegment, PrivacyLedger

#: ``(start, count) -> the ledger events of steps start .. start + count - 1 if they run as planned``.
PlannedEvents = Callable[[int, int], list[MechanismSegment]]

_Key = tuple[float, float, str]


def totals(segments: Iterable[MechanismSegment]) -> Counter[_Key]:
    """Applications per (σ, q, mechanism): all that the composed ε depends on."""
    out: Counter[_Key] = Counter()
    for seg in segments:
        if seg.steps:
            out[(seg.noise_multiplier, seg.sample_rate, seg.mechanism)] += seg.steps
    return out


def _within(part: Counter[_Key], whole: Counter[_Key]) -> bool:
    return all(whole.get(k, 0) >= n for k, n in part.items())


class BudgetGuard:
    """Whether the next step keeps ε ≤ ``max_epsilon`` at ``delta``, evaluated rarely.

    ε is monotone in the composed mechanisms, so (a) events drawn from a *certified* multiset (a plan a calibration
    proved within budget) are allowed without evaluating anything, and (b) one evaluation ``lookahead`` steps ahead
    clears all of them; near the limit a bisection finds the exact last step (about log2(``lookahead``)
    evaluations). Cached answers are dropped when the ledger departs from the plan they assumed.

    Args:
        max_epsilon: the largest ε the run may reach.
        delta: δ at which ε is measured.
        lookahead: how many steps one evaluation clears at once.

    Example:
        >>> from lightning_dp.accounting import MechanismSegment, PrivacyLedger
        >>> guard = BudgetGuard(max_epsilon=1.0, delta=1e-5)
        >>> planned = lambda start, count: [MechanismSegment(1.0, 0.01, count)]
        >>> guard.allowed(PrivacyLedger(), 0, planned)  # doctest: +SKIP
        True
    """

    def __init__(self, max_epsilon: float, delta: float, lookahead: int = 64) -> None:
        self.max_epsilon = float(max_epsilon)
        self.delta = float(delta)
        self.lookahead = int(lookahead)
        #: how many ε evaluations the guard made
        self.evaluations = 0
        self.reset()

    def reset(self) -> None:
        """Forget cached answers and the certificate."""
        self._certificate: Counter[_Key] | None = None
        self._safe_before = 0  # steps with index < this keep ε within budget (given the plan below)
        self._base: tuple[Counter[_Key], int] | None = None  # (ledger totals, step) at the last evaluation
        #: the first step index that would exceed the budget (None while unknown)
        self.exceeds_at: int | None = None
        #: ε after the step at ``exceeds_at``
        self.exceed_epsilon: float | None = None

    def certify(self, events: Sequence[MechanismSegment]) -> None:
        """Declare that the ledger plus ``events`` is within budget (e.g. a calibrated plan's remaining events)."""
        self._certificate = totals(events)

    def consume(self, event: MechanismSegment | None) -> None:
        """Take an executed step's event out of the certificate (an event it does not hold voids it)."""
        if event is None or self._certificate is None:
            return
        key = (event.noise_multiplier, event.sample_rate, event.mechanism)
        if self._certificate.get(key, 0) >= event.steps:
            self._certificate[key] -= event.steps
        else:
            self._certificate = None

    def _evaluate(self, ledger: PrivacyLedger, extra: list[MechanismSegment]) -> float:
        self.evaluations += 1
        return ledger.epsilon(self.delta, extra=extra)

    def allowed(self, ledger: PrivacyLedger, step: int, planned: PlannedEvents) -> bool:
        """Whether taking step ``step`` (the next one) keeps ε within the budget.

        Args:
            ledger: the run's ledger before the step.
            step: the index of the step about to run.
            planned: the events of future steps.
        """
        needed = totals(planned(step, 1))
        if self._certificate is not None and _within(needed, self._certificate):
            return True
        current = totals(ledger.segments)
        if self._base is not None:
            base, start = self._base
            if current != base + totals(planned(start, step - start)):  # the ledger left the plan: re-evaluate
                self._safe_before, self.exceeds_at = 0, None
        if self.exceeds_at is not None and step >= self.exceeds_at:
            return False
        if step < self._safe_before:
            return True
        self._base = (current, step)
        values = {self.lookahead: self._evaluate(ledger, planned(step, self.lookahead))}
        if values[self.lookahead] <= self.max_epsilon:
            self._safe_before = step + self.lookahead
            return True
        # ε(after `ok` more steps) ≤ max < ε(after `bad` more steps): bisect for the last step within budget.
        ok, bad = 0, self.lookahead
        while bad - ok > 1:
            mid = (ok + bad) // 2
            values[mid] = self._evaluate(ledger, planned(step, mid))
            if values[mid] <= self.max_epsilon:
                ok = mid
            else:
                bad = mid
        self._safe_before = self.exceeds_at = step + ok
        self.exceed_epsilon = values[bad]
        return ok > 0


@dataclass
class _Bound:
    valid_through: int  # the bound holds while at most this many steps were taken ...
    value: float
    covers: Counter[_Key]  # ... and the ledger holds no more than this

    def holds(self, steps_done: int, ledger_totals: Counter[_Key]) -> bool:
        return steps_done <= self.valid_through and _within(ledger_totals, self.covers)


class EpsilonMeter:
    """Upper bounds on the ε spent, for ``dp/epsilon``: on a deterministic grid of steps, never decreasing.

    After ``t`` steps the value is the accountant's bound on ε of the ledger plus the planned steps up to the next
    grid point ``g ≥ t``: an upper bound on the ε spent through step ``t``, reused for every step up to ``g`` while
    the ledger follows the plan. The grid is geometric: ε(t) grows like tᵃ with a ≤ 1 (``a`` measured on the last
    two grid points, 1 until there are two), so the next point is the last one times growth^(0.8/a), and the step
    is halved until the bound there is within ``growth`` of the bound at the last point (ε now is at least ε
    there). The last planned step is evaluated exactly (the value equals the run's ε); otherwise the value is the
    running maximum of the bounds so far. Nothing depends on the clock: identical runs report identical curves.
    Cost: every step for the first tens of steps, then about ``a · ln(T) / ln(growth^0.8)`` evaluations in all for
    ``T`` steps (see ``benchmarks/epsilon_refresh.py``).

    Args:
        growth: how much the bound may exceed ε of the current step (1.02: at most 2 %).
        max_gap: refresh at least every this many steps (the strategy's ``epsilon_refresh_steps``).
    """

    def __init__(self, growth: float = 1.02, max_gap: int | None = None) -> None:
        if not 1.0 < growth < 2.0:
            raise ValueError(f"growth must be in (1, 2), got {growth}.")
        if max_gap is not None and max_gap < 1:
            raise ValueError(f"max_gap must be a positive number of steps, got {max_gap}.")
        self.growth = float(growth)
        self.max_gap = max_gap
        self.start()

    def start(self, steps_done: int = 0) -> None:
        """Start a fit whose first step is ``steps_done``: forget the bounds and the history of the last one."""
        self._bound: _Bound | None = None
        self._points: list[tuple[int, float]] = []  # (grid point, bound there), evaluated in this fit
        self._max = 0.0
        #: ε evaluations made in this fit
        self.refreshes = 0

    def _exponent(self) -> float:
        """The local growth exponent a of ε(t) ∝ tᵃ over the last two grid points, in [0.2, 1] (1 if unknown)."""
        if len(self._points) < 2:
            return 1.0
        (t0, v0), (t1, v1) = self._points[-2:]
        if not (t1 > t0 > 0 and v1 > v0 > 0):
            return 1.0
        return min(1.0, max(0.2, math.log(v1 / v0) / math.log(t1 / t0)))

    def _next_point(self, steps_done: int, remaining: int | None) -> int:
        # From the last grid point (ε there is at most ε now), aiming at 80 % of the allowed growth so that the check
        # in `_refresh` rarely has to halve the step.
        base = self._points[-1][0] if self._points and self._points[-1][0] < steps_done else steps_done
        ratio = (1.0 + 0.8 * (self.growth - 1.0)) ** (1.0 / self._exponent())
        ahead = max(0, math.floor(base * ratio) - steps_done)
        if self.max_gap is not None:
            ahead = min(ahead, self.max_gap - 1)
        if remaining is not None:
            ahead = min(ahead, remaining)
        return steps_done + max(0, ahead)

    def value(
        self,
        steps_done: int,
        ledger: PrivacyLedger,
        delta: float,
        planned: PlannedEvents,
        remaining: int | None,
        pending: Sequence[MechanismSegment] = (),
    ) -> float:
        """An upper bound on the ε spent after ``steps_done`` steps, not below any value returned before in this fit.

        Args:
            steps_done: steps taken so far, the one being reported included.
            ledger: the run's ledger.
            delta: δ.
            planned: the events of future steps.
            remaining: the planned steps left after this one (None: no plan); at 0 the value is exact.
            pending: events of steps counted in ``steps_done`` but not yet in the ledger.
        """
        pending = list(pending)
        now = totals(ledger.segments + pending)
        if remaining == 0 or self._bound is None or not self._bound.holds(steps_done, now):
            self._bound = self._refresh(steps_done, ledger, delta, planned, remaining, pending)
        if remaining == 0:
            self._max = self._bound.value  # the run's ε itself, the value the summary reports
        else:
            self._max = max(self._max, self._bound.value)
        return self._max

    def _refresh(
        self,
        steps_done: int,
        ledger: PrivacyLedger,
        delta: float,
        planned: PlannedEvents,
        remaining: int | None,
        pending: list[MechanismSegment],
    ) -> _Bound:
        point = self._next_point(steps_done, remaining)
        while True:
            extra = pending + planned(steps_done, point - steps_done)
            value = ledger.epsilon(delta, extra=extra)
            self.refreshes += 1
            last = self._points[-1][1] if self._points else None
            if point == steps_done or last is None or value <= self.growth * last:
                break
            point = steps_done + (point - steps_done) // 2
        self._points.append((point, value))
        return _Bound(point, value, totals(ledger.segments + extra))


__all__ = ["BudgetGuard", "EpsilonMeter", "totals"]
