"""``PrivacySummary``: the run's final privacy figures as a table on the console and in the loggers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from lightning_dp.callbacks._utils import require_dp_strategy
from lightning_dp.console import notice
from lightning_dp.protocols import reported_figures

if TYPE_CHECKING:
    from lightning_dp.strategy import DPStrategy


def privacy_summary(strategy: DPStrategy, delta: float | None = None) -> dict[str, Any]:
    """The privacy figures of a run so far, as flat ``dp/...`` keys of plain numbers.

    Keys: ``dp/final_epsilon``, ``dp/delta``, ``dp/noise_multiplier`` (σ of the gradient; of the last phase when
    the budget was split, then also ``dp/noise_phases``), ``dp/sample_rate``, ``dp/max_grad_norm``, ``dp/steps``
    (private optimizer steps taken, resumed runs included), ``dp/planned_steps`` and ``dp/target_epsilon`` when known,
    ``dp/epsilon_by_mechanism/<name>`` for each mechanism of the ledger on its own (these do not add up:
    composition is sub-additive), and ``nonprivate/buffers``: the buffers declared as non-private statistics of the
    data (``DPStrategy(nonprivate_buffers=...)``), outside the guarantee.

    Args:
        strategy: the ``DPStrategy`` of the run.
        delta: δ to report ε at (default: the strategy's δ).

    Returns:
        The figures, keyed as above (keys whose value is unknown are left out).
    """
    delta = strategy.delta if delta is None else delta
    ledger = strategy.ledger
    out: dict[str, Any] = {
        "dp/final_epsilon": ledger.epsilon(delta),
        "dp/delta": delta,
        "dp/noise_multiplier": strategy.noise_multiplier,
        "dp/sample_rate": strategy.sample_rate,
        "dp/max_grad_norm": strategy.max_grad_norm,
        "dp/steps": strategy.last_release_step + 1,
    }
    if strategy.planned_steps is not None:
        out["dp/planned_steps"] = strategy.planned_steps
    if strategy.target_epsilon is not None:
        out["dp/target_epsilon"] = strategy.target_epsilon
    phases = getattr(strategy, "noise_phases", None)
    if phases:
        out["dp/noise_phases"] = ", ".join(f"σ={sigma:.5g} before step {end}" for end, sigma in phases)
    for name, eps in ledger.breakdown(delta).items():
        out[f"dp/epsilon_by_mechanism/{name}"] = eps
    nonprivate = list(getattr(strategy, "nonprivate_buffers", ()))
    if nonprivate:
        out["nonprivate/buffers"] = ", ".join(nonprivate)
    return {k: v for k, v in out.items() if v is not None}


def _num(value: float) -> str:
    return f"{value:.4g}"


def format_privacy_summary(
    summary: dict[str, Any], strategy: DPStrategy | None = None, title: str = "lightning_dp: privacy summary"
) -> str:
    """A readable table of :func:`privacy_summary`'s figures (and, when present, an audit's ``audit/...`` keys and the
    throughput keys ``perf/...``).

    Args:
        summary: the figures (``dp/...``, ``audit/...`` and ``perf/...`` keys).
        strategy: the run's strategy, for the σ of each budget phase, B, N and the clipping rule (optional).
        title: the table's first line.

    Returns:
        The table, one figure per line, without a trailing newline.

    Example:
        >>> print(format_privacy_summary({"dp/final_epsilon": 2.95, "dp/delta": 1e-5, "dp/steps": 10}))
        lightning_dp: privacy summary
          ε               2.95  at δ = 1e-05
          steps           10
    """
    rows: list[tuple[str, str]] = []
    if "dp/final_epsilon" in summary:
        eps = f"{_num(summary['dp/final_epsilon'])}  at δ = {summary.get('dp/delta', float('nan')):g}"
        if "dp/target_epsilon" in summary:
            eps += f"  (target {_num(summary['dp/target_epsilon'])})"
        rows.append(("ε", eps))
    phases = list(strategy.noise_phases) if strategy is not None else []
    if phases:
        start, parts = 0, []
        for end, sigma in phases:
            parts.append(f"steps {start}–{end - 1}: {_num(sigma)}")
            start = end
        rows.append(("noise σ", "; ".join(parts)))
    elif "dp/noise_multiplier" in summary:
        rows.append(("noise σ", _num(summary["dp/noise_multiplier"])))
    if "dp/sample_rate" in summary:
        q = _num(summary["dp/sample_rate"])
        plan = strategy.plan if strategy is not None else None
        if plan is not None and plan.selection.num_samples:
            q += f"  (expected batch B = {plan.expected_batch_size}, N = {plan.selection.num_samples})"
        rows.append(("sample rate q", q))
    if "dp/max_grad_norm" in summary:
        clip = _num(summary["dp/max_grad_norm"])
        if strategy is not None:
            clip += f"  ({strategy.clipping} clipping)"
        rows.append(("clipping C", clip))
    if "dp/steps" in summary:
        steps = str(summary["dp/steps"])
        if "dp/planned_steps" in summary:
            steps += f" of {summary['dp/planned_steps']} planned"
        rows.append(("steps", steps))
    mechanisms = {k.removeprefix("dp/epsilon_by_mechanism/"): v for k, v in summary.items() if "by_mechanism/" in k}
    if mechanisms:
        rows.append(("ε by mechanism", ", ".join(f"{name} {_num(eps)}" for name, eps in mechanisms.items())))
    if "nonprivate/buffers" in summary:
        rows.append(("not private", f"buffers {summary['nonprivate/buffers']} (statistics of the data, no noise)"))
    if "audit/epsilon_lower_bound" in summary:
        audited = f"{_num(summary['audit/epsilon_lower_bound'])}"
        if "audit/confidence" in summary:
            audited += f"  (lower bound at {summary['audit/confidence']:.0%} confidence"
            audited += f", {int(summary['audit/num_canaries'])} canaries)" if "audit/num_canaries" in summary else ")"
        rows.append(("audited ε ≥", audited))
    if "perf/samples_per_second" in summary:
        rows.append(
            (
                "throughput",
                f"{summary['perf/samples_per_second']:.1f} samples/s  ({summary['perf/train_steps']} steps in"
                f" {summary['perf/train_seconds']:.1f} s)",
            )
        )
    width = max(len(name) for name, _ in rows) if rows else 0
    return "\n".join([title] + [f"  {name:<{max(width, 14)}}  {value}" for name, value in rows])


class PrivacySummary(Callback):
    """At the end of fit, print the run's privacy figures as a table and write them to every logger.

    The figures of :func:`privacy_summary` (final ε at δ, σ — of each phase when the budget was split —, q, C, steps
    taken and planned, ε of each mechanism), the figures of callbacks that report some
    (:class:`lightning_dp.protocols.ReportsFigures`, e.g. the audited lower bound of
    :class:`lightning_dp.audit.CanaryAudit`) and the training throughput of this fit go

    - to the console, once, on global rank zero, as the table of :func:`format_privacy_summary` (through Lightning's
      ``notice``; ``print_table=False`` turns it off);
    - to each logger's ``log_hyperparams`` (W&B config, TensorBoard hparams, CSV ``hparams.yaml``) and, for W&B, to
      the run summary (``experiment.summary``), where they show as columns of the runs table;
    - to :attr:`summary`.

    Throughput (``perf/samples_per_second``) is the expected number of examples of this fit's steps (steps × B) per
    second of training wall time, validation excluded. It counts expected rather than drawn examples: the exact
    number drawn by Poisson sampling is a statistic of the private data (the two agree to a fraction of a percent
    over a run). Timings are outside the DP guarantee, as any timing of a run is.

    Args:
        delta: δ to report ε at (default: the strategy's δ).
        print_table: print the table at the end of fit.

    Raises:
        DPMisconfigurationError: at setup, when the trainer does not use ``DPStrategy``.

    Example:
        >>> summary = PrivacySummary()
        >>> trainer = L.Trainer(strategy=DPStrategy(noise_multiplier=1.0), callbacks=[summary])  # doctest: +SKIP
        >>> trainer.fit(model, dm)  # doctest: +SKIP
        >>> summary.summary["dp/final_epsilon"]  # doctest: +SKIP
    """

    def __init__(self, delta: float | None = None, print_table: bool = True) -> None:
        self.delta = delta
        self.print_table = print_table
        self.summary: dict[str, Any] = {}
        #: the table printed at the end of the last fit ("" before)
        self.table = ""
        self._started: float | None = None
        self._paused: float | None = None
        self._excluded = 0.0
        self._first_step = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that the trainer uses ``DPStrategy``."""
        if stage == "fit":
            require_dp_strategy(trainer, self)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the training clock."""
        strategy = require_dp_strategy(trainer, self)
        self._first_step = strategy.last_release_step + 1
        self._started, self._paused, self._excluded = time.perf_counter(), None, 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Pause the training clock during validation."""
        if self._started is not None and self._paused is None:
            self._paused = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resume the training clock."""
        if self._paused is not None:
            self._excluded += time.perf_counter() - self._paused
            self._paused = None

    def _throughput(self, strategy: DPStrategy) -> dict[str, Any]:
        if self._started is None:
            return {}
        seconds = time.perf_counter() - self._started - self._excluded
        steps = strategy.last_release_step + 1 - self._first_step
        if steps <= 0 or seconds <= 0 or strategy.sample_rate is None:
            return {}
        samples = steps * strategy.plan.expected_batch_size
        return {"perf/samples_per_second": samples / seconds, "perf/train_seconds": seconds, "perf/train_steps": steps}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the summary (on rank zero: one ε evaluation per mechanism), print it and hand it to the
        loggers.
        """
        if not trainer.is_global_zero:
            return
        strategy = require_dp_strategy(trainer, self)
        figures = reported_figures(trainer.callbacks, strategy)  # e.g. an audit's lower bound
        self.summary = {**privacy_summary(strategy, self.delta), **figures, **self._throughput(strategy)}
        for logger in trainer.loggers:
            logger.log_hyperparams(self.summary)
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(self.summary)
        self.table = format_privacy_summary(self.summary, strategy)
        if self.print_table:
            notice(self.table)
