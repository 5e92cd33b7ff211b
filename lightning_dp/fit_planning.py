"""Planning each fit of a private run: how many steps, which σ, and what the budget may take for granted.

:class:`FitPlanner` turns the trainer's limits into the run's planned steps (a resume or a second fit continues the
count), has rank 0 calibrate σ (or the phases' σ) for them and broadcasts the schedule so that every rank records
the same events, certifies the planned events with the budget, and starts the ε meter. A continuing run whose
budget is spent is stopped cleanly instead of trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning_dp.console import notice
from lightning_dp.errors import PrivacyTargetError
from lightning_dp.plan import planned_total_steps
from lightning_dp.reporting import start_meter

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from lightning_dp.budget import EpsilonMeter
    from lightning_dp.budget_stop import BudgetStop
    from lightning_dp.checkpointing import Ranks, RunState
    from lightning_dp.plan import PrivacyPlan

#: ``step -> the noise multipliers of the extra releases callbacks declare for it``
ExtrasOf = Callable[[int], tuple[float, ...]]
#: ``planned steps -> the budget phases callbacks declare, as (first step, share)``
PhasesOf = Callable[[int], list[tuple[int, float]]]


class FitPlanner:
    """Fix the plan of each fit before any callback asks for it (once per fit, when the training loader is built).

    Args:
        plan: the run's privacy plan.
        run: the run's identity and journal (its step offset and epoch progress).
        meter: the ε meter of ``dp/epsilon``.
    """

    def __init__(self, plan: PrivacyPlan, run: RunState, meter: EpsilonMeter) -> None:
        self._plan = plan
        self._run = run
        self._meter = meter
        #: why this fit may take no step (a continuing run whose budget is spent), else None
        self.stopped_reason: str | None = None
        #: ε at the end of the plan (reported with every step)
        self.epsilon_planned: float | None = None
        #: whether this fit was planned
        self.planned = False

    def start_fit(self) -> None:
        """A new fit: not planned yet, not stopped."""
        self.stopped_reason = None
        self.planned = False

    def plan_fit(
        self,
        trainer: pl.Trainer,
        epoch_steps: int,
        ranks: Ranks,
        declared: tuple[ExtrasOf, PhasesOf],
        budget: BudgetStop | None,
        max_grad_norm: float,
        target_epsilon: float | None,
    ) -> None:
        """Fix the plan of this fit (calibrating σ for ``target_epsilon``) and say what it is.

        Args:
            trainer: the trainer (its limits and progress).
            epoch_steps: the steps of one epoch (after ``limit_train_batches``).
            ranks: rank 0 calibrates and broadcasts.
            declared: what callbacks declare: extra releases per step, and budget phases.
            budget: the strategy's budget (``target_epsilon``), certified with the planned events.
            max_grad_norm: C, for the summary line.
            target_epsilon: the target, for the summary line.

        Raises:
            PrivacyTargetError: if no σ meets the target for a run that has not started.
        """
        run, plan, taken = self._run, self._plan, self._plan.released_steps
        trainer_step = taken - run.step_offset
        # The trainer's progress, unless a checkpoint's is still to be restored (the loader was built early, e.g. by
        # `estimated_stepping_batches` in configure_optimizers): then the run's own record of it.
        restored = trainer.global_step == trainer_step
        current_epoch = trainer.current_epoch if restored else max(run.epoch, 0)
        planned = planned_total_steps(
            epoch_steps,
            trainer.max_epochs,
            trainer.max_steps,
            global_step=trainer_step,
            current_epoch=current_epoch,
            done_in_epoch=run.done_in_epoch(current_epoch, taken),
        )
        planned = None if planned is None else planned + run.step_offset
        plan.selection.epoch_steps = epoch_steps
        self._schedule(trainer, planned, ranks, declared)
        if self.stopped_reason is None:
            self.epsilon_planned = start_meter(plan, self._meter)
            if budget is not None and planned is not None and planned > taken:
                budget.certify(plan.planned_segments(taken, planned - taken))
        sigma = plan.noise_multiplier
        notice(
            f"lightning_dp: N={plan.selection.num_samples}, expected batch B={plan.expected_batch_size},"
            f" q={plan.sample_rate:.5g}, σ={sigma if sigma is None else f'{sigma:.5g}'}, C={max_grad_norm},"
            f" δ={plan.delta:g}, planned steps {planned}, steps taken {plan.released_steps}"
            + (f", target ε={target_epsilon}" if target_epsilon else "")
        )
        plan.selection.announce()
        self.planned = True

    def _schedule(
        self, trainer: pl.Trainer, planned: int | None, ranks: Ranks, declared: tuple[ExtrasOf, PhasesOf]
    ) -> None:
        """Calibrate on rank 0 and broadcast, so that every rank uses (and records) exactly the same σ."""
        plan, (extras_of, phases_of) = self._plan, declared
        outcome: dict[str, Any] = {}
        if ranks.global_rank == 0:
            try:
                plan.schedule(planned, extras_of, phases_of)
                outcome = {"schedule": plan.schedule_state()}
            except PrivacyTargetError as err:
                if plan.released_steps == 0 and len(plan.ledger) == 0:
                    outcome = {"error": str(err)}
                else:  # a continuing run whose budget is spent: stop cleanly, as PrivacyBudget does
                    outcome = {"stop": str(err)}
        outcome = ranks.broadcast(outcome, src=0)
        if "error" in outcome:
            raise PrivacyTargetError(outcome["error"])
        if "stop" in outcome:
            self.stopped_reason = outcome["stop"]
            plan.planned_steps = planned
            trainer.should_stop = True
            notice(f"lightning_dp: not training: {outcome['stop']}")
            return
        if ranks.global_rank != 0:
            plan.adopt_schedule(outcome["schedule"], extras_of)


__all__ = ["FitPlanner"]
