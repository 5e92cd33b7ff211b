"""Protocols between the strategy and callbacks: what a callback implements to take part in the accounting.

The strategy finds callbacks that implement them with ``isinstance`` (``typing.runtime_checkable``), so any object
with the right method takes part; no base class is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class ReleasesNoise(Protocol):
    """A callback that releases noised statistics of a step's private batch (e.g. a private norm histogram).

    The strategy records each step once, with the combined multiplier (σ⁻² + Σ σ_j⁻²)^(-1/2) of the gradient and
    these releases (one Gaussian mechanism, subsampled once), and calibrates σ for them under ``target_epsilon``.
    """

    def dp_release_noise(self, strategy: Any, step: int) -> Sequence[float]:
        """For each release made from step ``step``'s batch: its noise std divided by its L2 sensitivity to one
        example. It must depend on ``step`` only (not on data), so that calibration can plan for it.
        """
        ...


@runtime_checkable
class SplitsBudget(Protocol):
    """A callback that splits ``target_epsilon`` into phases with their own σ (e.g. linear probing, fine-tuning)."""

    def dp_budget_phases(self, strategy: Any, planned_steps: int) -> Sequence[tuple[int, float]]:
        """``[(end_step, cumulative share of target_epsilon), ...]``, ending at ``(planned_steps, 1.0)``."""
        ...


@runtime_checkable
class AddsToClippedSum(Protocol):
    """A callback that adds data-independent contributions to each step's clipped sum before the noise (e.g. the
    gradient canaries of a privacy audit, :class:`lightning_dp.audit.CanaryAudit`).

    The strategy calls it on global rank 0 only, between the clipping and the noise: the clipped sum is all-reduced
    after the noise is added on rank 0, so a contribution added on every rank would count once per rank.
    """

    def dp_add_to_clipped_sum(self, strategy: Any, step: int, summed: dict[nn.Parameter, Tensor]) -> None:
        """Add to ``summed`` (per parameter, the fp32 clipped sum of step ``step``) in place. Each contribution must
        be bounded by the clipping rule's sensitivity, as an example's is.
        """
        ...


@runtime_checkable
class ReportsFigures(Protocol):
    """A callback with figures for the privacy summary (:class:`lightning_dp.callbacks.PrivacySummary`)."""

    def dp_summary_figures(self, strategy: Any) -> Mapping[str, float]:
        """Plain-number figures keyed ``<area>/<name>`` (e.g. ``audit/epsilon_lower_bound``), computed at the end of
        fit on global rank 0.
        """
        ...


def add_to_clipped_sum(callbacks: Sequence[Any], strategy: Any, step: int, summed: dict[nn.Parameter, Tensor]) -> None:
    """Let every callback that implements :class:`AddsToClippedSum` add to step ``step``'s clipped sum (rank 0)."""
    for cb in callbacks:
        if isinstance(cb, AddsToClippedSum):
            cb.dp_add_to_clipped_sum(strategy, step, summed)


def reported_figures(callbacks: Sequence[Any], strategy: Any) -> dict[str, float]:
    """The figures of every callback that implements :class:`ReportsFigures`, merged in callback order."""
    out: dict[str, float] = {}
    for cb in callbacks:
        if isinstance(cb, ReportsFigures):
            out.update(cb.dp_summary_figures(strategy))
    return out


@runtime_checkable
class AdaptsClipping(Protocol):
    """A callback that sets the clipping bound of each step (e.g. adaptive clipping to a quantile of the norms).

    The strategy asks before every step, after all ``on_train_batch_start`` hooks (so after any change of the
    trainable set), and clips and noises that step with the answer: the noise std is σ × the step's C.
    """

    def dp_clipping_bounds(
        self, strategy: Any, step: int, groups: Sequence[tuple[str, ...]] | None
    ) -> tuple[float, Sequence[float] | None]:
        """C for step ``step`` and, under per-layer clipping (``groups``: the clipping groups' parameter names), the
        bound of each group with ``sqrt(Σ C_l²) ≤ C`` (None: C/√L each). It must be computed from released (noised)
        statistics only.
        """
        ...


def declared_releases(callbacks: Sequence[Any], strategy: Any, step: int) -> tuple[float, ...]:
    """The noise multipliers of everything ``callbacks`` release from step ``step``'s batch, sorted."""
    extra = [float(x) for cb in callbacks if isinstance(cb, ReleasesNoise) for x in cb.dp_release_noise(strategy, step)]
    return tuple(sorted(extra))


def declared_phases(callbacks: Sequence[Any], strategy: Any, planned_steps: int) -> list[tuple[int, float]]:
    """The budget phases declared by at most one of ``callbacks``.

    Raises:
        DPMisconfigurationError: if more than one callback splits the budget.
    """
    from lightning_dp.errors import DPMisconfigurationError

    phases = [list(cb.dp_budget_phases(strategy, planned_steps)) for cb in callbacks if isinstance(cb, SplitsBudget)]
    phases = [p for p in phases if p]
    if len(phases) > 1:
        raise DPMisconfigurationError("Only one callback may split the privacy budget into phases.")
    return phases[0] if phases else []


def declared_clipping_bounds(
    callbacks: Sequence[Any], strategy: Any, step: int, groups: Sequence[tuple[str, ...]] | None
) -> tuple[float, Sequence[float] | None] | None:
    """The clipping bounds of step ``step`` set by at most one of ``callbacks`` (None if none sets them).

    Raises:
        DPMisconfigurationError: if more than one callback sets the clipping bound.
    """
    from lightning_dp.errors import DPMisconfigurationError

    setters = [cb for cb in callbacks if isinstance(cb, AdaptsClipping)]
    if len(setters) > 1:
        names = ", ".join(type(cb).__name__ for cb in setters)
        raise DPMisconfigurationError(f"Only one callback may set the clipping bound; got {names}.")
    return setters[0].dp_clipping_bounds(strategy, step, groups) if setters else None


__all__ = [
    "AdaptsClipping",
    "AddsToClippedSum",
    "ReleasesNoise",
    "ReportsFigures",
    "SplitsBudget",
    "add_to_clipped_sum",
    "declared_clipping_bounds",
    "declared_phases",
    "declared_releases",
    "reported_figures",
]
