"""``PrivateTraining``: the private step of a Lightning strategy, shared by every DP strategy of lightning_dp.

:class:`~lightning_dp.strategy.DPStrategy` (one process or DDP) and
:class:`~lightning_dp.model_parallel.DPModelParallelStrategy` (FSDP2) are this mixin on top of a Lightning strategy
that owns the processes and the model's placement. Everything private lives here once: the plan, batch selection,
ledger, journal, budget, probe, buffers and the hooks that run them. A strategy below it says only what differs, in
three small hooks: :meth:`PrivateTraining._new_engine` (where the parameters live),
:meth:`PrivateTraining._reduce_and_noise` (how the clipped sums of the ranks are combined and noised) and
:attr:`PrivateTraining._engine_after_setup` (whether the engine is built after the Lightning strategy's ``setup``,
when the model's final parameters exist only then).

One logical step runs as named stages::

    micro-batches → clip (engine) → reduce + noise → record (ledger, journal) → write gradients

and the user's optimizer then steps once on the private gradient.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_dp.accounting import Accountant
from lightning_dp.budget import EpsilonMeter
from lightning_dp.budget_stop import BudgetHooks, BudgetStop
from lightning_dp.buffers import BufferWatch
from lightning_dp.checkpointing import (
    RunState,
)
from lightning_dp.clipping import ClippingMode, sensitivity
from lightning_dp.console import notice
from lightning_dp.engine import ClippingEngine, build_engine
from lightning_dp.errors import DPMisconfigurationError, PrivacyTargetError
from lightning_dp.fit_planning import FitPlanner
from lightning_dp.guards import OneTrainerOnly, check_gradients_written, refuse_accumulation, trainable_set_changed
from lightning_dp.microbatches import split_batch
from lightning_dp.noise import privatize
from lightning_dp.plan import PrivacyPlan, selection_for
from lightning_dp.probe import DEFAULT_PROBE_BUDGET, ProbeItems, probe_items
from lightning_dp.protocols import add_to_clipped_sum, declared_clipping_bounds, declared_phases, declared_releases
from lightning_dp.randomness import RandomStreams
from lightning_dp.reporting import announce_clip_fraction, epsilon_upper_bound, log_final, log_step, step_metrics
from lightning_dp.step_guards import StepGuards
from lightning_dp.step_stages import NonfiniteCount, all_reduce_sum, clip_micro_batches, private_loader
from lightning_dp.strategy_checkpoints import PrivacyCheckpoints
from lightning_dp.strategy_properties import DPStrategyProperties
from lightning_dp.validation import (
    loss_of,
    several_optimizers_error,
    validate_module,
    validate_optimizers,
    validate_options,
    validate_trainer,
    validate_training_loader,
    validate_value,
)


class PrivateTraining(OneTrainerOnly, DPStrategyProperties, PrivacyCheckpoints):
    """The private training hooks shared by lightning_dp's strategies (see the module docstring).

    The one-Trainer guard of ``lightning_dp.guards`` comes first among its bases, so that its ``accelerator``
    property is found before Lightning's ``Strategy.accelerator``. A strategy class puts this mixin first among its
    own bases, before the Lightning strategy, and calls :meth:`_init_privacy` from its ``__init__`` after the
    Lightning strategy's; the privacy arguments are
    :class:`~lightning_dp.strategy.DPStrategy`'s.
    """

    #: build the engine after the Lightning strategy's ``setup`` (the model's parameters are final only then)
    _engine_after_setup = False

    def _init_privacy(
        self,
        target_epsilon: float | None = None,
        target_delta: float = 1e-5,  # DEFAULT_DELTA, written out for the signature in the docs
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        max_physical_batch_size: int | None = None,
        poisson_sampling: bool = True,
        loss_reduction: Literal["mean", "sum"] = "mean",
        log_clip_fraction: bool = True,
        epsilon_refresh_steps: int | None = None,
        sampling_seed: int | None = None,
        noise_seed: int | None = None,
        secure_mode: bool = False,
        engine: str = "ghost",
        clipping: ClippingMode = "flat",
        check_sample_mixing: bool = True,
        probe_budget: float = DEFAULT_PROBE_BUDGET,
        public_buffers: Sequence[str] = (),
        nonprivate_buffers: Sequence[str] = (),
        nonfinite: Literal["skip", "error"] = "skip",
        journal_dir: str | os.PathLike[str] | None = None,
        resume_policy: Literal["strict", "account_forks", "trust_checkpoint"] = "strict",
        accountant: Accountant | None = None,
    ) -> None:
        """Validate and keep the privacy arguments (see :class:`~lightning_dp.strategy.DPStrategy`).

        Raises:
            DPMisconfigurationError: for inconsistent or non-finite arguments.
        """
        validate_options(
            max_grad_norm,
            max_physical_batch_size,
            loss_reduction,
            clipping,
            nonfinite,
            resume_policy,
            epsilon_refresh_steps,
            probe_budget,
        )
        validate_value("target_delta", target_delta)  # None is no longer a way to ask for the default
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.max_grad_norm = float(max_grad_norm)
        self.max_physical_batch_size = max_physical_batch_size
        self.poisson_sampling = poisson_sampling
        self.loss_reduction = loss_reduction
        self.log_clip_fraction = log_clip_fraction
        self.epsilon_refresh_steps = epsilon_refresh_steps
        self.engine_name = engine
        self.clipping = clipping
        self.check_sample_mixing = check_sample_mixing
        self.probe_budget = float(probe_budget)
        self._buffers = BufferWatch(public=public_buffers, nonprivate=nonprivate_buffers)
        self.nonfinite = nonfinite
        self.journal_dir = journal_dir
        self.resume_policy = resume_policy
        self._plan = PrivacyPlan(
            selection_for(poisson_sampling),
            target_epsilon=target_epsilon,
            delta=target_delta,
            noise_multiplier=noise_multiplier,
            accountant=accountant,
        )
        self._streams = RandomStreams({"sampling": sampling_seed, "noise": noise_seed}, secure=secure_mode)
        self._run = RunState()
        self._meter = EpsilonMeter(max_gap=epsilon_refresh_steps)
        self._budget: BudgetStop | None = None  # enforces target_epsilon (set up at the first fit)
        self._budget_hooks: BudgetHooks | None = None  # its batch-end hook, a callback while a fit runs
        self._engine: Any = None
        self._pending: dict[torch.nn.Parameter, Tensor] | None = None
        self._written: dict[torch.nn.Parameter, Tensor] = {}
        self._last_norms: Tensor | None = None
        self._guards = StepGuards(self.probe_budget)
        self._last_group_norms: Tensor | None = None
        self._nonfinite = NonfiniteCount()
        self._planner = FitPlanner(self._plan, self._run, self._meter)
        self._restored_from_checkpoint = False
        #: per parameter, a 0/1 mask of the coordinates per-sample clipping sees (set by sparse fine-tuning)
        self.grad_masks: dict[torch.nn.Parameter, Tensor] = {}

    # ------------------------------------------------------------------ what a strategy below says
    def _new_engine(self, module: pl.LightningModule) -> ClippingEngine:
        """The per-sample clipping engine for ``module`` (parameters whole in this process by default)."""
        return build_engine(self.engine_name, module, self.loss_reduction, self.nonfinite)

    def _idle_passes(self, micro_batches: int) -> tuple[int, Callable[[], Any] | None]:
        """How many passes that add nothing this rank runs after its ``micro_batches``, and their batch (none:
        without sharding the ranks need not run alike).
        """
        return 0, None

    # ------------------------------------------------------------------ public methods
    def refresh_trainable(self) -> None:
        """Rebuild the per-sample gradient engine for the current ``requires_grad`` flags and ``grad_masks``.

        The strategy also does this by itself before every step whose trainable set changed; callbacks that change
        it may call it directly. Frozen parameters get no gradient and no noise.
        """
        module = self.lightning_module
        assert module is not None
        if self._engine is not None:
            self._engine.detach()
        self._engine = self._new_engine(module)
        self._engine.set_grad_masks(self.grad_masks)
        self._engine.attach()
        self._guards.probe.request()
        for p in module.parameters():
            if not p.requires_grad:
                p.grad = None

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Validate the run, draw this fit's randomness, build the engine, then set up as Lightning does.

        Validation, test and predict only move the model to its device (nothing private is released there).
        """
        module = self.lightning_module
        assert module is not None
        if trainer.state.fn != TrainerFn.FITTING:
            self._setup_without_training(trainer)
            return
        self._plan.require_configured()
        validate_trainer(trainer, self.precision_plugin.precision, calibrating=self.target_epsilon is not None)
        validate_module(module)
        self._buffers.bind(module)
        self._adopt_module_state(module)
        self._streams.refresh()
        if self.world_size > 1:  # every rank draws its shard's masks (and the probe's schedule) from rank 0's roots
            for purpose in ("sampling", "probe"):
                self._streams.set_root(purpose, int(self.broadcast(self._streams.root(purpose), src=0)))
        self._engine = None if self._engine_after_setup else self._new_engine(module)
        super().setup(trainer)
        if self._engine is None:
            self._engine = self._new_engine(module)
        self._engine.set_grad_masks(self.grad_masks)
        validate_optimizers(self.optimizers)
        if len(self.optimizers) != 1:
            raise DPMisconfigurationError(f"DPStrategy needs exactly one optimizer, got {len(self.optimizers)}.")
        self._engine.attach()
        self._guards.start_fit(self.probe_budget)
        self._nonfinite = NonfiniteCount()
        self._planner.start_fit()
        self._run.bind_trainer(trainer, self._plan.released_steps, self._restored_from_checkpoint)
        self._restored_from_checkpoint = False
        self._install_budget(trainer)

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        """Build the optimizers; several under automatic optimization get an error that says what DP needs."""
        try:
            super().setup_optimizers(trainer)
        except RuntimeError as err:
            if "multiple optimizers" not in str(err):
                raise
            raise several_optimizers_error() from err

    def _install_budget(self, trainer: pl.Trainer) -> None:
        """With ``target_epsilon``, the strategy's :class:`BudgetStop` at the target stops the run cleanly before any
        step that would exceed it (across fits and resumes, whatever the plan said).
        """
        if self.target_epsilon is None:
            return
        if self._budget is None:
            self._budget = BudgetStop(max_epsilon=self.target_epsilon, filename="privacy-target-step={step}.ckpt")
            self._budget_hooks = BudgetHooks(self._budget, self)
        assert self._budget_hooks is not None
        self._budget_hooks.attach(trainer)

    @override
    def teardown(self) -> None:
        """Remove the engine's hooks, close the journal, and remember the run on the module."""
        if self._engine is not None:
            self._engine.detach()
        module = self.lightning_module
        if module is not None and self._run.run_id is not None:
            module._lightning_dp_state = self.state_dict()
        self._run.close()
        self._plan.unbind()
        if module is not None and module._trainer is not None and self._budget_hooks is not None:
            self._budget_hooks.detach(module.trainer)
        super().teardown()

    # ------------------------------------------------------------------ data
    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Replace the training sampler with the batch selection's sampler (other stages are left alone)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        self._guards.refuse_second_train_loader(trainer)
        dataset, batch_size = validate_training_loader(dataloader)
        self._plan.bind(len(dataset), batch_size, self.world_size, self.global_rank)
        sampler = self._plan.selection.batch_sampler(self._sampling_source, lambda: self._plan.released_steps)
        if not self._planner.planned:
            epoch_steps = int(_parse_num_batches(RunningStage.TRAINING, len(sampler), trainer.limit_train_batches))
            declared = (self._extras_of, self._phases_of)
            budget, c, target = self._budget, self.max_grad_norm, self.target_epsilon
            self._planner.plan_fit(trainer, epoch_steps, self, declared, budget, c, target)
        loader: DataLoader = dataloader  # type: ignore[assignment]
        self._guards.items = ProbeItems(dataset, loader.collate_fn)
        return private_loader(dataset, sampler, loader)

    # ------------------------------------------------------------------ what callbacks declare (for the plan)
    def _extras_of(self, step: int) -> tuple[float, ...]:
        return declared_releases(self.lightning_module.trainer.callbacks, self, step)

    def _phases_of(self, planned: int) -> list[tuple[int, float]]:
        return declared_phases(self.lightning_module.trainer.callbacks, self, planned)

    @override
    def on_train_start(self) -> None:
        """Open (or continue) the privacy journal: no step runs before its session is on disk."""
        trainer = self.lightning_module.trainer
        if not self._planner.planned:
            raise DPMisconfigurationError("DPStrategy was not prepared: the training dataloader did not go through it.")
        self._run.open(self, self.journal_dir, trainer, self.delta, self._plan.released_steps)
        self._restored_from_checkpoint = False  # a strategy that restores after setup (FSDP2) set it meanwhile
        if self.log_clip_fraction and trainer.loggers:
            announce_clip_fraction()

    # ------------------------------------------------------------------ the private step
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Before each step: refuse gradient accumulation, enforce the budget, follow the trainable set."""
        trainer = self.lightning_module.trainer
        refuse_accumulation(trainer)
        self._guards.new_batch()
        if self._planner.stopped_reason is not None:
            raise PrivacyTargetError(f"DPStrategy: no step may run: {self._planner.stopped_reason}")
        if self._budget is not None:
            self._budget.enforce(trainer, self)
        if trainable_set_changed(self.lightning_module, self._engine, self.grad_masks):
            notice(
                "lightning_dp: the trainable parameters changed; rebuilding the per-sample gradient engine so that"
                " every trainable parameter is clipped and noised."
            )
            self.refresh_trainable()

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Run the user's ``training_step`` per micro-batch, clip per sample, and form the noisy gradient."""
        module = self.lightning_module
        batch, rest = args[0], args[1:]
        self._guards.refuse_second_release()
        micro_batches = split_batch(batch, self.max_physical_batch_size)
        self._set_clipping_bound()
        self._maybe_probe(rest, kwargs)
        started = time.perf_counter()
        before = self._buffers.snapshot(module)
        user_step = lambda micro: self._run_user_step(micro, rest, kwargs)  # noqa: E731
        idle = self._idle_passes(len(micro_batches))
        clipped = clip_micro_batches(
            self._engine, micro_batches, user_step, self.max_grad_norm, self.clipping, self.root_device, *idle
        )
        self._nonfinite.add(clipped.nonfinite, self._plan.released_steps)
        self._buffers.check(module, before)
        self._guards.probe.stepped(time.perf_counter() - started)
        summed = self._engine.pop_summed()
        if self.global_rank == 0:  # data-independent additions (audit canaries): once, before the noise
            add_to_clipped_sum(module.trainer.callbacks, self, self._plan.released_steps, summed)
        self._pending = self._reduce_and_noise(summed)
        self._last_norms = norms = clipped.norms
        self._last_group_norms = clipped.group_norms
        metrics = step_metrics(
            self._plan,
            self._epsilon_upper_bound(),
            sensitivity(self.max_grad_norm, self.clipping),
            self._planner.epsilon_planned,
        )
        log_step(module, metrics, norms if self.log_clip_fraction else None, self.max_grad_norm)
        return clipped.step_output(self.root_device)

    def _maybe_probe(self, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run the sample-mixing probe if this step is due (see :class:`StepGuards`)."""
        if not self.check_sample_mixing:
            return
        step = self._plan.released_steps
        uniform = lambda: float(self._streams.source("probe", step, 0, self._run.branch).uniform(1)[0])  # noqa: E731
        run = lambda b: self._run_user_step(b, rest, kwargs)[1]  # noqa: E731
        public, source = self._buffers.public, lambda: self.random_source("probe", step)
        probe = lambda items: probe_items(self.lightning_module, self._engine, run, items, source(), public)  # noqa: E731
        self._guards.maybe_probe(uniform, self.world_size, self.root_device, probe)

    def _set_clipping_bound(self) -> None:
        """Stage 0: the step's clipping bound(s), from a callback that adapts them (else ``max_grad_norm``)."""
        per_layer = self.clipping == "per_layer"
        groups = self._engine.clipping_groups if per_layer else None
        callbacks = self.lightning_module.trainer.callbacks
        adapted = declared_clipping_bounds(callbacks, self, self._plan.released_steps, groups)
        group_bounds = None
        if adapted is not None:
            c, group_bounds = adapted
            validate_value("max_grad_norm", c)
            self.max_grad_norm = float(c)
        self._engine.set_clipping_bound(self.max_grad_norm, group_bounds if per_layer else None)

    def _run_user_step(self, micro: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Tensor]:
        with self.precision_plugin.train_step_context():
            output = self.lightning_module.training_step(micro, *rest, **kwargs)
        return output, loss_of(output)

    def _reduce_and_noise(self, summed: dict[torch.nn.Parameter, Tensor]) -> dict[torch.nn.Parameter, Tensor]:
        """Stages 3–4: one flat buffer of clipped sums, the noise added once (rank 0), all-reduced, divided by B."""
        step = self._plan.released_steps
        sigma = self._plan.sigma_at(step)
        return privatize(
            summed,
            noise_std=sigma * sensitivity(self.max_grad_norm, self.clipping),
            normalizer=float(self._plan.expected_batch_size),
            source=self.random_source("noise", step) if self.global_rank == 0 else None,
            all_reduce=all_reduce_sum if self.world_size > 1 else None,
        )

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """Stages 5–6: record the release (ledger, then the journal, flushed) and write the private gradient into
        ``p.grad`` (the backward passes already ran per micro-batch).
        """
        module = self.lightning_module
        if self._pending is None:
            raise RuntimeError("DPStrategy.backward called without a private training_step before it.")
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        self._record_step()
        self._written = self._pending
        for p, g in self._pending.items():
            p.grad = g
        self._pending = None
        return self.precision_plugin.post_backward(closure_loss, module)

    def _record_step(self) -> None:
        step = self._plan.released_steps
        event = self._plan.record()
        self._run.record(step, self.lightning_module.trainer.current_epoch, event)
        if self._budget is not None:
            self._budget.consume(event)

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        """Step the user's optimizer; just before it updates, every gradient must be the one this strategy wrote."""
        model = model or self.lightning_module
        precision = self.precision_plugin

        def closure_then_check() -> Any:
            result = precision._wrap_closure(model, optimizer, closure)  # training_step, backward, hooks
            check_gradients_written(optimizer, self._written, self.lightning_module)
            self._written = {}
            return result

        return optimizer.step(closure=closure_then_check, **kwargs)

    # ------------------------------------------------------------------ reporting
    def _epsilon_upper_bound(self) -> float:
        return epsilon_upper_bound(self._plan, self._meter)

    @override
    def on_train_end(self) -> None:
        """Write the final ε to every logger (the last logged ``dp/epsilon`` may be from an earlier step)."""
        trainer = self.lightning_module.trainer
        self._run.sync()
        self._nonfinite.report()
        if trainer.is_global_zero and self._plan.released_steps:
            log_final(trainer, {"dp/epsilon": self.epsilon})


__all__ = ["PrivateTraining"]
