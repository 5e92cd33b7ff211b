"""What a private run reports to loggers: per-step privacy metrics and the final figures."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_dp.budget import EpsilonMeter
from lightning_dp.console import notice
from lightning_dp.plan import PrivacyPlan


def step_metrics(
    plan: PrivacyPlan, epsilon_bound: float, sensitivity: float, planned_epsilon: float | None = None
) -> dict[str, float]:
    """``dp/*`` metrics of the step about to be recorded (all public: functions of the plan, not of the data).

    Args:
        plan: the run's plan.
        epsilon_bound: an upper bound on the ε spent through this step (``dp/epsilon``).
        sensitivity: the clipped contribution's L2 bound (C, or 1 for normalized clipping).
        planned_epsilon: ε at the end of the planned run (``dp/epsilon_planned``), if there is a plan.
    """
    sigma = plan.sigma_at(plan.released_steps)
    metrics = {
        "dp/epsilon": epsilon_bound,
        "dp/noise_multiplier": sigma,
        "dp/sample_rate": float(plan.sample_rate),
        "dp/effective_noise": sigma * sensitivity / plan.expected_batch_size,
    }
    if planned_epsilon is not None:
        metrics["dp/epsilon_planned"] = planned_epsilon
    cumulative = plan.cumulative_noise()
    if cumulative is not None:
        metrics["dp/cumulative_noise"] = cumulative
    return metrics


def start_meter(plan: PrivacyPlan, meter: EpsilonMeter) -> float | None:
    """Start the ε meter for a fit.

    Returns:
        ε at the end of the planned run (the ledger plus every planned step), or None without a plan.
    """
    start, planned = plan.released_steps, plan.planned_steps
    meter.start(start)
    if planned is None:
        return None
    return plan.epsilon(extra=plan.planned_segments(start, max(0, planned - start)))


def epsilon_upper_bound(plan: PrivacyPlan, meter: EpsilonMeter) -> float:
    """An upper bound on the ε spent through the step being taken (index ``plan.released_steps``), from the meter.

    Args:
        plan: the run's plan (the step is not recorded yet).
        meter: the ε meter of the fit.
    """
    done = plan.released_steps + 1
    remaining = max(0, plan.planned_steps - done) if plan.planned_steps is not None else None
    pending = plan.planned_segments(plan.released_steps, 1)
    return meter.value(done, plan.ledger, plan.delta, plan.planned_segments, remaining, pending)


def log_step(module: pl.LightningModule, metrics: dict[str, float], norms: Tensor | None, max_grad_norm: float) -> None:
    """Log the step's metrics (``dp/epsilon`` in the progress bar) and, when ``norms`` is given, the non-private
    share of clipped examples as ``nonprivate/step_clip_fraction``.
    """
    for name, value in metrics.items():
        module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "dp/epsilon", batch_size=1)
    if norms is not None and norms.numel():
        frac = (norms > max_grad_norm).float().mean()
        module.log("nonprivate/step_clip_fraction", frac, on_step=True, on_epoch=False, batch_size=1)


def announce_clip_fraction() -> None:
    """Say that the logged ``nonprivate/step_clip_fraction`` is outside the guarantee."""
    notice(
        "lightning_dp: `nonprivate/step_clip_fraction` is a non-private diagnostic computed from private data"
        " without noise; it is outside the DP guarantee. Pass DPStrategy(log_clip_fraction=False) to turn it"
        " off."
    )


def log_final(trainer: pl.Trainer, metrics: dict[str, Any]) -> None:
    """Write final figures to every logger, and to run summaries (W&B) that would otherwise keep the last logged
    value of an earlier step.
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        summary = getattr(getattr(logger, "experiment", None), "summary", None)
        if summary is not None and hasattr(summary, "update"):
            summary.update(metrics)


__all__ = ["announce_clip_fraction", "epsilon_upper_bound", "log_final", "log_step", "start_meter", "step_metrics"]
