"""The read-only public state of ``DPStrategy``: the privacy plan, ε, the ledger, and the last step's norms.

A mixin, so that :mod:`lightning_dp.strategy` holds the Lightning hooks only; every name here is part of
``DPStrategy``'s public API (see the API page).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from lightning_dp.accounting import MechanismSegment, PrivacyLedger
    from lightning_dp.buffers import BufferWatch
    from lightning_dp.checkpointing import RunState
    from lightning_dp.plan import PrivacyPlan
    from lightning_dp.randomness import RandomSource, RandomStreams


class DPStrategyProperties:
    """Read-only views of a private run's state, for callbacks and users (set by ``DPStrategy``)."""

    _plan: PrivacyPlan
    _run: RunState
    _buffers: BufferWatch
    _engine: Any
    _last_norms: Tensor | None
    _last_group_norms: Tensor | None
    _streams: RandomStreams
    global_rank: int

    @property
    def plan(self) -> PrivacyPlan:
        """The Lightning-free privacy plan (q, planned steps, σ schedule, ledger)."""
        return self._plan

    @property
    def noise_multiplier(self) -> float | None:
        """σ of the next step (known once ``fit`` has started; it changes between budget phases)."""
        return self._plan.noise_multiplier

    @property
    def noise_phases(self) -> list[tuple[int, float]]:
        """``[(end_step, σ), ...]`` when the budget is split into phases; empty when σ is constant."""
        return self._plan.phases

    @property
    def sample_rate(self) -> float | None:
        """q: the probability that an example is in a logical batch (known once ``fit`` has started)."""
        return self._plan.sample_rate if self._plan.selection.num_samples else None

    @property
    def delta(self) -> float:
        """δ at which ε is reported."""
        return self._plan.delta

    @property
    def ledger(self) -> PrivacyLedger:
        """The privacy ledger: every private release of this run, across fits and resumes."""
        return self._plan.ledger

    @property
    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (the accountant's upper bound; 0.0 before the first step)."""
        return self._plan.epsilon()

    @property
    def planned_steps(self) -> int | None:
        """The total number of optimizer steps the run is planned (and, with ``target_epsilon``, calibrated) for."""
        return self._plan.planned_steps

    @property
    def last_per_sample_norms(self) -> Tensor | None:
        """Per-sample gradient norms (before clipping, fp32) of this rank's last logical batch, for callbacks.

        They are computed from private data: anything released from them must be noised and declared with
        ``dp_release_noise`` (:class:`lightning_dp.protocols.ReleasesNoise`), or labelled as a non-private diagnostic.
        """
        return self._last_norms

    @property
    def last_per_group_norms(self) -> Tensor | None:
        """Under per-layer clipping: this rank's per-sample norms of each clipping group (shape ``(b, L)``, columns in
        the order of :attr:`clipping_groups`) for the last logical batch; None otherwise. Private, as
        :attr:`last_per_sample_norms`.
        """
        return self._last_group_norms

    @property
    def clipping_groups(self) -> list[tuple[str, ...]]:
        """The parameter groups of per-layer clipping (parameter names; known once ``fit`` has set up)."""
        return [] if self._engine is None else self._engine.clipping_groups

    @property
    def last_release_step(self) -> int:
        """0-based index of the last private step taken (-1 before the first)."""
        return self._plan.released_steps - 1

    @property
    def nonprivate_buffers(self) -> tuple[str, ...]:
        """Buffers declared as statistics of the private data (``nonprivate_buffers``): outside the guarantee."""
        return self._buffers.nonprivate

    @property
    def journal_path(self) -> str | None:
        """The privacy journal of this run (known once ``fit`` has started)."""
        return self._run.journal_path

    def random_source(self, purpose: str, step: int) -> RandomSource:
        """The random source of ``purpose`` (``"noise"``, ``"histogram"``, ...) for step ``step`` on this rank."""
        return self._streams.source(purpose, step, self.global_rank, self._run.branch)

    def _sampling_source(self, step: int, rank: int) -> RandomSource:
        return self._streams.source("sampling", step, rank, self._run.branch)

    def planned_segments(self, start: int, count: int) -> list[MechanismSegment]:
        """The ledger events that steps ``start .. start + count - 1`` will record if they run as planned.

        Use it to bound ε ahead of time: ``strategy.ledger.epsilon(delta, extra=strategy.planned_segments(k, n))``.
        """
        return self._plan.planned_segments(start, count)


__all__ = ["DPStrategyProperties"]
