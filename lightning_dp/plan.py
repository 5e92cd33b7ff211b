"""The privacy plan: q, planned steps, the σ schedule, ledger recording and calibration — without Lightning.

A :class:`PrivacyPlan` is what a private run promises and has spent. The strategy feeds it facts (the training set
size, the batch size, how many steps the trainer will run, which statistics callbacks release) and asks it for σ of
each step and for the ledger event of each executed step. Everything here is plain Python and unit-testable without
a Trainer; its state (plain numbers) goes into every checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from lightning_dp.accounting import Accountant, MechanismSegment, PrivacyLedger, combine_noise_multipliers
from lightning_dp.batch_selection import SELECTIONS, BatchSelection, ExtrasOf, PoissonSelection
from lightning_dp.errors import DPMisconfigurationError, PrivacyTargetError

#: δ when none is given.
DEFAULT_DELTA = 1e-5
#: ``planned_steps -> [(end_step, cumulative share of target_epsilon)]``: budget phases declared by a callback.
PhasesOf = Callable[[int], Sequence[tuple[int, float]]]


def _no_extras(step: int) -> tuple[float, ...]:
    return ()


def planned_total_steps(
    epoch_steps: int,
    max_epochs: int | None,
    max_steps: int | None,
    *,
    global_step: int = 0,
    current_epoch: int = 0,
    done_in_epoch: int = 0,
) -> int | None:
    """The total number of optimizer steps a run will have taken when the trainer stops (resumed steps included).

    This is the one implementation of the planned steps, for every sampling mode and both ``target_epsilon`` and
    ``noise_multiplier`` runs.

    Args:
        epoch_steps: steps one epoch runs, after ``limit_train_batches`` (Lightning's ``num_training_batches``).
        max_epochs: the trainer's ``max_epochs`` (None or -1: unlimited).
        max_steps: the trainer's ``max_steps`` (None or -1: unlimited).
        global_step: steps already taken (after a resume or an earlier fit).
        current_epoch: the epoch the run is in.
        done_in_epoch: steps already taken in ``current_epoch`` (a mid-epoch resume).

    Returns:
        The planned total, or None when neither limit is finite.

    Example:
        >>> planned_total_steps(3, max_epochs=2, max_steps=-1)  # limit_train_batches=3 → 3 steps per epoch
        6
        >>> planned_total_steps(10, max_epochs=5, max_steps=12, global_step=4, current_epoch=0, done_in_epoch=4)
        12
    """
    options: list[int] = []
    if max_steps is not None and max_steps >= 0:
        options.append(int(max_steps))
    if max_epochs is not None and max_epochs >= 0:
        remaining = (int(max_epochs) - int(current_epoch)) * int(epoch_steps) - int(done_in_epoch)
        options.append(int(global_step) + max(0, remaining))
    return min(options) if options else None


def _unset_message(target_epsilon: float | None, noise_multiplier: float | None) -> str:
    return (
        "Give exactly one of target_epsilon (σ is then calibrated for the run) and noise_multiplier (ε is then reported"
        f" as it grows); got target_epsilon={target_epsilon}, noise_multiplier={noise_multiplier}. For example"
        " Trainer(strategy=DPStrategy(target_epsilon=3.0)); Trainer(strategy='dp') builds DPStrategy() without either,"
        " so give them in the constructor (with LightningCLI: --trainer.strategy=lightning_dp.DPStrategy"
        " --trainer.strategy.target_epsilon=3.0)."
    )


class PrivacyPlan:
    """q, the planned steps, the σ schedule (with budget phases), σ calibration and the ledger of one private run.

    Args:
        selection: how batches are selected (default Poisson); it decides the ledger event of each step.
        target_epsilon: the ε the run may spend; σ is then calibrated. Exactly one of this and ``noise_multiplier``.
        delta: δ of the guarantee.
        noise_multiplier: a fixed σ; ε then grows with the steps.
        accountant: the accountant behind the ledger and the calibration (default: PLD).

    Raises:
        DPMisconfigurationError: for inconsistent or non-finite arguments.

    Example:
        >>> plan = PrivacyPlan(noise_multiplier=1.0)
        >>> plan.bind(num_samples=1000, batch_size=50)
        >>> plan.schedule(planned_steps=40)
        >>> event = plan.record()
        >>> (event.noise_multiplier, event.sample_rate, plan.released_steps, plan.ledger.steps)
        (1.0, 0.05, 1, 1)
    """

    def __init__(
        self,
        selection: BatchSelection | None = None,
        *,
        target_epsilon: float | None = None,
        delta: float = DEFAULT_DELTA,
        noise_multiplier: float | None = None,
        accountant: Accountant | None = None,
    ) -> None:
        if target_epsilon is not None and noise_multiplier is not None:
            raise DPMisconfigurationError(_unset_message(target_epsilon, noise_multiplier))
        if target_epsilon is not None and not (target_epsilon > 0 and math.isfinite(target_epsilon)):
            raise PrivacyTargetError(f"target_epsilon must be a positive finite number, got {target_epsilon}.")
        if noise_multiplier is not None and not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
            raise DPMisconfigurationError(f"noise_multiplier must be a positive finite number, got {noise_multiplier}.")
        if not (0 < delta < 1):
            raise DPMisconfigurationError(f"target_delta must be in (0, 1), got {delta}.")
        self.selection = selection if selection is not None else PoissonSelection()
        self.target_epsilon = target_epsilon
        #: whether one of target_epsilon and noise_multiplier was given (a plan without either cannot be scheduled)
        self.configured = target_epsilon is not None or noise_multiplier is not None
        self.delta = float(delta)
        self.fixed_noise_multiplier = noise_multiplier
        self.ledger = PrivacyLedger(accountant=accountant)
        #: steps taken in this run's lineage (the trainer's ``global_step``)
        self.released_steps = 0
        #: the total steps the trainer will have run when it stops (None: unbounded)
        self.planned_steps: int | None = None
        self._sigma: float | None = noise_multiplier
        self._phases: list[tuple[int, float]] = []
        self._extras_of: ExtrasOf = _no_extras
        self._restored: dict[str, Any] = {}
        self._bound: tuple[int, int] | None = None
        self._key: list[Any] | None = None

    def require_configured(self) -> None:
        """Raise unless one of ``target_epsilon`` and ``noise_multiplier`` was given.

        Raises:
            DPMisconfigurationError: naming both and what each does.
        """
        if not self.configured:
            raise DPMisconfigurationError(_unset_message(None, None))

    # ------------------------------------------------------------------ data
    def bind(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        """Bind the plan to the training set (N) and the per-rank batch size; q = batch_size × ranks / N.

        Raises:
            PrivacyTargetError: if δ is not below 1/N.
            DPMisconfigurationError: if the logical batch exceeds the dataset, or q changes within one fit.
        """
        if not self.delta < 1.0 / num_samples:
            raise PrivacyTargetError(
                f"target_delta={self.delta:g} is not below 1/N = {1.0 / num_samples:.3g} (N={num_samples}): such a δ"
                " allows releasing whole examples. Set target_delta well below 1/N, e.g. 1/(10·N)."
            )
        if self._bound is not None and self._bound != (num_samples, batch_size * num_replicas):
            raise DPMisconfigurationError(
                "The training set or batch size changed during fit (e.g. reload_dataloaders_every_n_epochs with other"
                " data): q must stay fixed within one fit. Stop, save a checkpoint and resume with the new data."
            )
        self.selection.bind(num_samples, batch_size, num_replicas, rank)
        self._bound = (num_samples, batch_size * num_replicas)

    def unbind(self) -> None:
        """Forget the data of the last fit (the next fit may bring other data and batch size)."""
        self._bound = None

    @property
    def sample_rate(self) -> float:
        """The sample rate q of the ledger events (1.0 for shuffled batches, which claim no amplification)."""
        return self.selection.sample_rate

    @property
    def expected_batch_size(self) -> int:
        """B, the expected logical batch size (the normaliser of the private gradient)."""
        return self.selection.expected_batch_size

    # ------------------------------------------------------------------ σ schedule
    @property
    def noise_multiplier(self) -> float | None:
        """σ of the next step (None before :meth:`schedule`)."""
        return None if self._sigma is None else self.sigma_at(self.released_steps)

    @property
    def phases(self) -> list[tuple[int, float]]:
        """``[(end_step, σ), ...]`` when the budget is split into phases; empty when σ is constant."""
        return list(self._phases)

    def sigma_at(self, step: int) -> float:
        """σ of step ``step`` (0-based)."""
        for end, sigma in self._phases:
            if step < end:
                return sigma
        if self._sigma is None:
            raise RuntimeError("PrivacyPlan.schedule() has not run yet.")
        return self._sigma

    def multiplier_of(self, step: int) -> float:
        """The noise multiplier of everything released from step ``step``'s batch (σ with the extra releases)."""
        return combine_noise_multipliers(self.sigma_at(step), *self._extras_of(step))

    def _joint_plan(self, start: int, count: int) -> dict[tuple[float, ...], int]:
        plan: dict[tuple[float, ...], int] = {}
        for step in range(start, start + count):
            extra = self._extras_of(step)
            plan[extra] = plan.get(extra, 0) + 1
        return plan

    def schedule(
        self,
        planned_steps: int | None,
        extras_of: ExtrasOf | None = None,
        phases_of: PhasesOf | None = None,
    ) -> None:
        """Fix the σ schedule for a fit that will end after ``planned_steps`` steps in total.

        With ``target_epsilon``, σ (per budget phase) is calibrated for the steps from :attr:`released_steps` to
        ``planned_steps`` on top of everything the ledger already holds; a resume of the same plan keeps its σ.

        Args:
            planned_steps: total steps at the end of this fit (see :func:`planned_total_steps`).
            extras_of: ``step -> multipliers`` of the statistics released from that step's batch (callbacks'
                ``dp_release_noise``); they are accounted jointly with the gradient.
            phases_of: ``planned -> [(end_step, cumulative share of ε)]`` (a callback's ``dp_budget_phases``).

        Raises:
            PrivacyTargetError: with ``target_epsilon``, if the run has no finite plan, no step left, or the target
                cannot be met (the budget is spent, or σ above the accountant's maximum would be needed).
            DPMisconfigurationError: for invalid budget phases.
        """
        self.require_configured()
        self._extras_of = extras_of or _no_extras
        self.planned_steps = planned_steps
        if self.target_epsilon is None:
            self._phases = []
            return
        if planned_steps is None:
            raise PrivacyTargetError(
                "target_epsilon needs a finite run to calibrate the noise for: set max_epochs or max_steps (or give"
                " noise_multiplier instead)."
            )
        phases = self._validated_phases(phases_of, planned_steps)
        self._key = self._schedule_key(planned_steps, phases)
        if self._restored.get("schedule_key") == self._key and self._restored.get("noise_multiplier"):
            self._sigma = float(self._restored["noise_multiplier"])
            self._phases = [(int(e), float(s)) for e, s in self._restored.get("noise_phases", [])]
            return
        self._calibrate(planned_steps, phases)
        self._restored = {}

    def schedule_state(self) -> dict[str, Any]:
        """The σ schedule fixed by :meth:`schedule`, as plain numbers (to broadcast under DDP)."""
        return {"planned": self.planned_steps, "sigma": self._sigma, "phases": [list(p) for p in self._phases]}

    def adopt_schedule(self, state: dict[str, Any], extras_of: ExtrasOf | None = None) -> None:
        """Use a schedule fixed elsewhere (under DDP: on rank 0, so that every rank records the same σ)."""
        self._extras_of = extras_of or _no_extras
        self.planned_steps = state["planned"]
        self._sigma = float(state["sigma"])
        self._phases = [(int(e), float(s)) for e, s in state["phases"]]

    def _validated_phases(self, phases_of: PhasesOf | None, planned: int) -> list[tuple[int, float]]:
        phases = [(int(e), float(f)) for e, f in phases_of(planned)] if phases_of is not None else []
        if not phases:
            return []
        ends = [e for e, _ in phases]
        shares = [f for _, f in phases]
        if ends != sorted(ends) or ends[-1] != planned or shares != sorted(shares) or shares[-1] != 1.0:
            raise DPMisconfigurationError(
                f"Budget phases {phases} must end at the planned {planned} steps, with increasing shares ending at 1."
            )
        if not self.selection.amplifies:
            raise DPMisconfigurationError("Budget phases need Poisson sampling (poisson_sampling=True).")
        return phases

    def _schedule_key(self, planned: int, phases: list[tuple[int, float]]) -> list[Any]:
        """Everything σ depends on: a resume with the same key keeps the σ it had (bit-identical ε)."""
        joint = sorted([list(k), n] for k, n in self._joint_plan(0, planned).items())
        return [
            self.selection.name,
            self.sample_rate,
            planned,
            self.target_epsilon,
            self.delta,
            [list(p) for p in phases],
            joint,
        ]

    def _calibrate(self, planned: int, phases: list[tuple[int, float]]) -> None:
        assert self.target_epsilon is not None
        start = self.released_steps
        if planned <= start:
            raise PrivacyTargetError(
                f"The run already took {start} private steps, not fewer than the {planned} planned: raise"
                " max_epochs/max_steps to continue."
            )
        prior = list(self.ledger.segments)
        calibrated: list[tuple[int, float]] = []
        for end, share in phases or [(planned, 1.0)]:
            if end <= start:
                continue
            sigma = self.selection.calibrate(
                share * self.target_epsilon,
                self.delta,
                start,
                end - start,
                prior,
                self._extras_of,
                self.ledger.accountant,
            )
            calibrated.append((end, sigma))
            prior += self.selection.planned_events(
                start, end - start, lambda k, s=sigma: combine_noise_multipliers(s, *self._extras_of(k))
            )
            start = end
        self._phases = calibrated if len(calibrated) > 1 else []
        self._sigma = calibrated[-1][1]

    # ------------------------------------------------------------------ ledger
    def record(self) -> MechanismSegment | None:
        """Record the next step (index :attr:`released_steps`) as executed: its ledger event (if it implies one) is
        added to the ledger and returned.
        """
        step = self.released_steps
        event = self.selection.step_event(step, self.multiplier_of)
        if event is not None:
            self.ledger.record(event.noise_multiplier, event.sample_rate, event.steps, event.mechanism)
        self.released_steps += 1
        return event

    def planned_segments(self, start: int, count: int) -> list[MechanismSegment]:
        """The ledger events steps ``start .. start + count - 1`` will record if they run as planned."""
        return self.selection.planned_events(start, count, self.multiplier_of)

    def epsilon(self, extra: Sequence[MechanismSegment] = ()) -> float:
        """ε spent at δ by the ledger (plus ``extra`` planned events): an upper bound."""
        return self.ledger.epsilon(self.delta, extra=extra)

    def cumulative_noise(self) -> float | None:
        """σ·√T with T the planned steps (paper A's predictor of utility), or None without a plan."""
        if self.planned_steps is None or self._sigma is None:
            return None
        return self.sigma_at(self.released_steps) * math.sqrt(self.planned_steps)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The plan as plain Python numbers (no seeds: nothing that rebuilds batches or noise)."""
        return {
            "ledger": self.ledger.state_dict(),
            "released_steps": self.released_steps,
            "noise_multiplier": self._sigma,
            "noise_phases": [[e, s] for e, s in self._phases],
            "planned_steps": self.planned_steps,
            "sample_rate": self.sample_rate if self._bound is not None else None,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "selection": self.selection.name,
            "schedule_key": self._key,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the ledger and the step count; the σ schedule is kept if the resumed
        run's plan is the same (see :meth:`schedule`).

        Raises:
            DPMisconfigurationError: for a malformed state.
        """
        try:
            self.ledger.load_state_dict(state["ledger"])
            self.released_steps = int(state["released_steps"])
        except (KeyError, TypeError, ValueError) as err:
            raise DPMisconfigurationError(f"The checkpoint's privacy state is malformed ({err!r}).") from err
        if self.released_steps < 0:
            raise DPMisconfigurationError(f"The checkpoint's privacy state has {self.released_steps} steps.")
        if self.target_epsilon is None and self.fixed_noise_multiplier is None and state.get("noise_multiplier"):
            self._sigma = float(state["noise_multiplier"])
        self._restored = dict(state)


def selection_for(poisson_sampling: bool) -> BatchSelection:
    """The batch selection for the strategy's ``poisson_sampling`` flag."""
    return SELECTIONS["poisson" if poisson_sampling else "shuffle"]()


__all__ = ["DEFAULT_DELTA", "PrivacyPlan", "planned_total_steps", "selection_for"]
