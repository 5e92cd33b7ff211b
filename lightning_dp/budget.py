"""Budget enforcement and ε reporting off the critical path: Lightning-free, shared by the strategy and callbacks.

- :class:`BudgetGuard` answers "does the next step keep ε ≤ max?" exactly, cheaply: steps certified by a calibration
  need no evaluation; otherwise one PRV evaluation clears ``lookahead`` steps and a bisection finds the last step
  near the limit.
- :class:`EpsilonMeter` serves the ``dp/epsilon`` metric: always an upper bound on the ε spent, refreshed only while
  the refreshes cost at most a fixed share of the run's time (a PRV evaluation takes from milliseconds to seconds).
"""

from __future__ import annotations

import math
import time
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
    covers: Counter[_Key] | None  # ... and the ledger holds no more than this (None: anything planned)

    def holds(self, steps_done: int, ledger_totals: Counter[_Key]) -> bool:
        return steps_done <= self.valid_through and (self.covers is None or _within(ledger_totals, self.covers))


def _undominated(bounds: list[_Bound]) -> list[_Bound]:
    """Drop bounds that another bound beats on both value and validity."""
    kept: list[_Bound] = []
    for b in sorted(bounds, key=lambda b: (-b.valid_through, b.value)):  # longest validity first
        if not kept or b.value < kept[-1].value:
            kept.append(b)
    return kept


class EpsilonMeter:
    """Upper bounds on ε for ``dp/epsilon``, refreshed while refreshes cost at most ``budget`` of the run's time.

    Each refresh evaluates ε of the ledger plus the planned events of the next ``H`` steps, a bound valid until then;
    ``H`` is chosen so that the refresh's cost, spread over ``H`` steps, is ``budget`` of their time. A refresh is
    only made when the time spent so far leaves room for it, or when no bound is valid any more.

    Args:
        budget: the share of the run's (wall) time refreshes may take.
        clock: the time source (injectable for simulations).
    """

    #: the cost assumed for a refresh before one was measured (seconds)
    first_cost_guess = 0.05

    def __init__(self, budget: float = 0.01, clock: Callable[[], float] = time.perf_counter) -> None:
        self.budget = float(budget)
        self.clock = clock
        self.start()

    def start(self, steps_done: int = 0) -> None:
        """Start timing a fit whose first step is ``steps_done``."""
        self._t0 = self.clock()
        self._first_step = steps_done
        self._bounds: list[_Bound] = []
        #: seconds spent in refreshes, and their number
        self.spent = 0.0
        self.refreshes = 0
        self._cost = self.first_cost_guess

    def certify(self, valid_through: int, value: float) -> None:
        """A bound known without evaluation (e.g. the target of a calibrated plan), valid through a step count."""
        self._bounds.append(_Bound(valid_through, value, None))

    def plan_curve(
        self,
        start: int,
        end: int,
        ledger: PrivacyLedger,
        delta: float,
        planned: PlannedEvents,
        points: int = 8,
        last: float | None = None,
    ) -> None:
        """Bounds at geometric points of a plan (1/2^(points-1), ..., 1/2, all of steps ``start .. end``), computed
        once, so the reported ε grows as a staircase instead of showing the plan's final ε from the first step.
        Their cost counts as refresh time.

        Args:
            start: the next step's index.
            end: the planned total.
            ledger: the run's ledger.
            delta: δ.
            planned: the events of future steps.
            points: how many points.
            last: ε at ``end`` if known without evaluation (a calibrated target).
        """
        if end <= start:
            return
        t0 = self.clock()
        marks = sorted({start + max(1, math.ceil((end - start) * 2.0 ** (j - points))) for j in range(1, points + 1)})
        for mark in marks:
            extra = planned(start, mark - start)
            value = last if mark == end and last is not None else ledger.epsilon(delta, extra=extra)
            self._bounds.append(_Bound(mark, value, totals(ledger.segments + extra)))
        self._bounds = _undominated(self._bounds)
        self.spent += self.clock() - t0

    def value(
        self,
        steps_done: int,
        ledger: PrivacyLedger,
        delta: float,
        planned: PlannedEvents,
        horizon: int,
        pending: Sequence[MechanismSegment] = (),
    ) -> float:
        """An upper bound on ε after ``steps_done`` steps.

        Args:
            steps_done: steps taken so far (the ledger includes them).
            ledger: the run's ledger.
            delta: δ.
            planned: the events of future steps.
            horizon: the most steps a refresh looks ahead (the rest of the plan: beyond it, a bound is loose).
            pending: events of steps counted in ``steps_done`` but not yet in the ledger.
        """
        pending = list(pending)
        now_totals = totals(ledger.segments + pending)
        valid = [b for b in self._bounds if b.holds(steps_done, now_totals)]
        now = self.clock()
        elapsed = now - self._t0
        affordable = self.spent + self._cost <= self.budget * elapsed
        if valid and not affordable:
            return min(b.value for b in valid)
        steps = max(1, steps_done - self._first_step)
        step_time = max(elapsed - self.spent, 1e-9) / steps
        # Look far enough ahead that this refresh's cost is `budget` of the time until the bound runs out.
        ahead = max(1, min(horizon, math.ceil(self._cost / (self.budget * step_time))))
        extra = pending + planned(steps_done, ahead)
        value = ledger.epsilon(delta, extra=extra)
        cost = self.clock() - now
        self.spent += cost
        self._cost = cost
        self.refreshes += 1
        self._bounds = _undominated(valid + [_Bound(steps_done + ahead, value, totals(ledger.segments + extra))])
        return min(b.value for b in self._bounds if b.valid_through >= steps_done)


__all__ = ["BudgetGuard", "EpsilonMeter", "totals"]
