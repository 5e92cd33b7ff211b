"""``DPStrategy``: differentially private training (DP-SGD / DP-Adam) of any LightningModule.

Only Lightning glue lives here. The privacy core is Lightning-free: :mod:`lightning_dp.plan` (q, planned steps, σ
schedule, calibration, ledger), :mod:`lightning_dp.batch_selection` (samplers and the ledger event each implies),
:mod:`lightning_dp.budget` (budget guard, ε meter), :mod:`lightning_dp.checkpointing` and :mod:`lightning_dp.journal`
(executed steps on disk, resume checks), :mod:`lightning_dp.randomness` (seeds), :mod:`lightning_dp.noise` (noise),
:mod:`lightning_dp.guards` and :mod:`lightning_dp.probe` (invariants) and :mod:`lightning_dp.engine` (per-sample
clipping). One logical step runs as named stages::

    micro-batches → clip (engine) → reduce + noise (one flat buffer) → record (ledger, journal) → write gradients

and the user's optimizer then steps once on the private gradient.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import _distributed_is_initialized
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_dp.accounting import Accountant, MechanismSegment, PrivacyLedger
from lightning_dp.budget import EpsilonMeter
from lightning_dp.buffers import BufferWatch
from lightning_dp.checkpointing import RunState, restore_run
from lightning_dp.clipping import ClippingMode, sensitivity
from lightning_dp.console import notice, warn
from lightning_dp.engine import build_engine
from lightning_dp.errors import DPMisconfigurationError, PrivacyTargetError
from lightning_dp.guards import OneTrainerOnly, check_gradients_written, refuse_accumulation, trainable_set_changed
from lightning_dp.microbatches import EmptyBatchCollate, split_batch
from lightning_dp.noise import privatize
from lightning_dp.plan import PrivacyPlan, planned_total_steps, selection_for
from lightning_dp.probe import DEFAULT_PROBE_BUDGET, ProbeItems, ProbeSchedule, SampleMixingError, probe_items
from lightning_dp.protocols import add_to_clipped_sum, declared_clipping_bounds, declared_phases, declared_releases
from lightning_dp.randomness import RandomSource, RandomStreams
from lightning_dp.reporting import epsilon_upper_bound, log_final, log_step, start_meter, step_metrics
from lightning_dp.validation import (
    loss_of,
    validate_module,
    validate_optimizers,
    validate_options,
    validate_trainer,
    validate_training_loader,
    validate_value,
)

_STATE_KEY = "lightning_dp"


class DPStrategy(OneTrainerOnly, DDPStrategy):
    """Differentially private training: per-sample clipping, Gaussian noise, Poisson sampling, PLD accounting.

    The train dataloader's ``batch_size`` is the *expected logical batch size* B; each example is included in each
    step independently with probability q = B/N. Each logical step clips every example's gradient to
    ``max_grad_norm`` (C), sums, adds N(0, σ²C²) once, divides by B and hands the result to the module's own
    optimizer (SGD → DP-SGD, Adam → DP-Adam). Epochs have ⌈N/B⌉ steps.

    The strategy enforces the guarantee on every path a run takes: noise and batches are drawn from fresh OS entropy
    per fit (never repeated after a resume, never stored), every executed step is journaled on disk before its
    update is applied, a resume that would drop executed steps from ε is refused, ``target_epsilon`` is a hard
    budget across fits and resumes, parameters unfrozen mid-run are clipped too, a forward that mixes examples is
    detected at the first step, and a non-finite example contributes nothing.

    Args:
        target_epsilon: the ε the whole run may spend; σ is calibrated for the planned steps (``max_steps`` or
            ``max_epochs``) with the accountant (PLD by default), and no step is taken that would exceed it. Exactly
            one of ``target_epsilon`` and ``noise_multiplier``.
        target_delta: δ, default 1e-5 (``DEFAULT_DELTA``); it must be below 1/N.
        noise_multiplier: σ, the noise std relative to C; ε is then reported as it grows.
        max_grad_norm: C, the per-sample L2 clipping bound.
        max_physical_batch_size: largest micro-batch run at once; a logical batch is split into micro-batches
            with one noise draw and one optimizer step per logical batch.
        poisson_sampling: ``False`` opts out to shuffled fixed-size batches; ε is then computed *without*
            amplification by subsampling (much larger), and a warning says so.
        loss_reduction: ``"mean"`` if ``training_step`` returns the mean of per-sample losses, ``"sum"`` if the sum.
        log_clip_fraction: log ``nonprivate/step_clip_fraction``, the share of clipped examples — a non-private
            diagnostic computed from private data without noise (announced when a logger records it).
        epsilon_refresh_steps: recompute ``dp/epsilon`` at least every this many steps. By default it is refreshed
            on a geometric grid of steps (every step early on), so that it is an upper bound on the ε spent through
            each step, at most ~2 % above it, never decreasing, and exact at the last planned step.
        sampling_seed: fix the sampling randomness (reproducible tests only: the guarantee then rests on the seed
            staying secret; a warning says so). Default: fresh OS entropy per fit.
        noise_seed: fix the noise randomness (reproducible tests only, as ``sampling_seed``).
        secure_mode: draw noise and sampling from a cryptographic keystream (SHAKE-256 keyed by 256 bits of OS
            entropy per fit) instead of torch's generators (slower: see "What the guarantee covers" in the docs).
        engine: the per-sample clipping engine, a name in ``lightning_dp.engine.ENGINES``: ``"ghost"`` (default:
            book-keeping with ghost norms) or ``"hooks"`` (materialises per-sample gradients, like Opacus hooks).
        clipping: ``"flat"``, ``"normalized"``, ``"automatic"`` or ``"per_layer"`` (each layer's parameters
            clipped to C/√L, in backward: fastest); see :mod:`lightning_dp.clipping`. The noise is σ × the rule's
            sensitivity, so the accounting is the same.
        check_sample_mixing: check that no example's gradient depends on another example (a forward, loss or
            ``collate_fn`` that mixes examples is an error), on raw dataset items re-collated with the loader's
            ``collate_fn``: at the first step of every fit, whenever the trainable set changes, and at random later
            steps (see :mod:`lightning_dp.probe`).
        probe_budget: the share of run time the random later probes may take (default 2 %; 0: first step and
            trainable-set changes only).
        public_buffers: buffers that may change in ``training_step`` but depend on the parameters and the step count
            only (an EMA of the weights, a counter); the probe checks that they do not depend on the examples.
        nonprivate_buffers: buffers that hold statistics of the private batch, kept knowingly: they are listed as
            not private in the privacy summary and the checkpoint. Any other buffer that changes in
            ``training_step`` stops the run (see :mod:`lightning_dp.buffers`).
        nonfinite: ``"skip"``: an example whose per-sample gradient is NaN/inf contributes zero (the bound still
            holds) and a warning counts them; ``"error"``: raise instead.
        journal_dir: where the privacy journal is written (default: ``<default_root_dir>/dp_journal``).
        resume_policy: ``"strict"`` (default) refuses to resume from a checkpoint older than the last executed step
            (a fork) or without its journal; ``"account_forks"`` resumes a fork and keeps every executed step in the
            ledger; ``"trust_checkpoint"`` accepts a checkpoint whose journal is gone (you assert that no step was
            taken after it).
        accountant: who bounds ε, for reporting, calibration and the budget (an
            :class:`~lightning_dp.accounting.Accountant`; default: :class:`~lightning_dp.accounting.PLDAccountant`).

    Raises:
        DPMisconfigurationError: for inconsistent or non-finite arguments.

    Example:
        >>> trainer = L.Trainer(  # doctest: +SKIP
        ...     max_epochs=3, strategy=DPStrategy(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0))
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
        >>> trainer.strategy.epsilon  # doctest: +SKIP
    """

    strategy_name = "dp"

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``Trainer(strategy="dp")`` (the privacy parameters still have to be given: see ``__init__``)."""
        strategy_registry.register(
            cls.strategy_name, cls, description="Differentially private training (lightning_dp)", override=True
        )

    def __init__(
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
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method="popen",
        )
        validate_options(
            max_grad_norm,
            max_physical_batch_size,
            loss_reduction,
            clipping,
            nonfinite,
            resume_policy,
            epsilon_refresh_steps,
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
        if not 0 <= probe_budget <= 1:
            raise DPMisconfigurationError(f"probe_budget is a share of run time in [0, 1], got {probe_budget}.")
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
        self._epsilon_planned: float | None = None
        self._budget: Any = None  # the PrivacyBudget enforcing target_epsilon (set up per fit)
        self._engine: Any = None
        self._pending: dict[torch.nn.Parameter, Tensor] | None = None
        self._written: dict[torch.nn.Parameter, Tensor] = {}
        self._last_norms: Tensor | None = None
        self._probe = ProbeSchedule(self.probe_budget)
        self._probe_items: ProbeItems | None = None
        self._train_loader_key: tuple[int, int] | None = None
        self._released_in_batch = False
        self._last_group_norms: Tensor | None = None
        self._nonfinite_total = 0
        self._stopped_reason: str | None = None
        self._planned_this_fit = False
        self._restored_from_checkpoint = False
        #: per parameter, a 0/1 mask of the coordinates per-sample clipping sees (set by sparse fine-tuning)
        self.grad_masks: dict[torch.nn.Parameter, Tensor] = {}

    # ------------------------------------------------------------------ public state
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

    def planned_segments(self, start: int, count: int) -> list[MechanismSegment]:
        """The ledger events that steps ``start .. start + count - 1`` will record if they run as planned.

        Use it to bound ε ahead of time: ``strategy.ledger.epsilon(delta, extra=strategy.planned_segments(k, n))``.
        """
        return self._plan.planned_segments(start, count)

    def random_source(self, purpose: str, step: int) -> RandomSource:
        """The random source of ``purpose`` (``"noise"``, ``"histogram"``, ...) for step ``step`` on this rank."""
        return self._streams.source(purpose, step, self.global_rank, self._run.branch)

    def refresh_trainable(self) -> None:
        """Rebuild the per-sample gradient engine for the current ``requires_grad`` flags and ``grad_masks``.

        The strategy also does this by itself before every step whose trainable set changed; callbacks that change
        it may call it directly. Frozen parameters get no gradient and no noise.
        """
        module = self.lightning_module
        assert module is not None
        if self._engine is not None:
            self._engine.detach()
        self._engine = build_engine(self.engine_name, module, self.loss_reduction, self.nonfinite)
        self._engine.set_grad_masks(self.grad_masks)
        self._engine.attach()
        self._probe.request()
        for p in module.parameters():
            if not p.requires_grad:
                p.grad = None

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self.num_nodes * self.num_processes

    # ------------------------------------------------------------------ environment
    @override
    def _configure_launcher(self) -> None:
        # One rank: no launcher and no process group. Several: Lightning's DDP launchers (script/torchrun/SLURM).
        if self.world_size > 1:
            super()._configure_launcher()
        else:
            self._launcher = None

    @override
    def setup_environment(self) -> None:
        """Set up the device and, with more than one rank, the process group."""
        if self.world_size > 1:
            super().setup_environment()
        else:
            Strategy.setup_environment(self)

    @override
    def configure_ddp(self) -> None:
        """Do not wrap the model in ``DistributedDataParallel``: it would all-reduce *unclipped* gradients in
        backward. The clipped sums are all-reduced once per step instead; here only the initial parameters and
        buffers are broadcast from rank 0 so that every rank starts (and stays) identical.
        """
        if _distributed_is_initialized() and self.world_size > 1:
            _sync_module_states(self.model)

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        """Validate the run, draw this fit's randomness, build the engine, then set up as Lightning does.

        Validation, test and predict only move the model to its device (nothing private is released there).
        """
        module = self.lightning_module
        assert module is not None
        if trainer.state.fn != TrainerFn.FITTING:
            assert self.accelerator is not None
            self.accelerator.setup(trainer)
            self.precision_plugin.convert_module(self.model)
            self.model_to_device()
            if _distributed_is_initialized() and self.world_size > 1:
                _sync_module_states(self.model)
            self.setup_precision_plugin()
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
        self._engine = build_engine(self.engine_name, module, self.loss_reduction, self.nonfinite)
        self._engine.set_grad_masks(self.grad_masks)
        super().setup(trainer)
        validate_optimizers(self.optimizers)
        if len(self.optimizers) != 1:
            raise DPMisconfigurationError(f"DPStrategy needs exactly one optimizer, got {len(self.optimizers)}.")
        self._engine.attach()
        self._probe = ProbeSchedule(self.probe_budget)
        self._train_loader_key = None
        self._nonfinite_total = 0
        self._stopped_reason = None
        self._planned_this_fit = False
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
            raise DPMisconfigurationError(
                "configure_optimizers returned several optimizers. DPStrategy privatises one gradient per step for one"
                " optimizer under automatic optimization (Lightning's hint to set automatic_optimization=False does"
                " not apply: manual optimization cannot be made private here). Put all parameters in one optimizer"
                " with parameter groups, e.g. torch.optim.AdamW([{'params': backbone, 'lr': 1e-4}, {'params': head,"
                " 'lr': 1e-3}])."
            ) from err

    def _install_budget(self, trainer: pl.Trainer) -> None:
        """With ``target_epsilon``, a :class:`PrivacyBudget` at the target stops the run cleanly before any step that
        would exceed it (across fits and resumes, whatever the plan said).
        """
        if self.target_epsilon is None:
            return
        from lightning_dp.callbacks.privacy_budget import PrivacyBudget

        if self._budget is None:
            self._budget = PrivacyBudget(max_epsilon=self.target_epsilon, filename="privacy-target-step={step}.ckpt")
        if self._budget not in trainer.callbacks:
            trainer.callbacks.append(self._budget)

    def _adopt_module_state(self, module: pl.LightningModule) -> None:
        """A module trained privately earlier in this process (by another strategy object) continues that run."""
        state = getattr(module, "_lightning_dp_state", None)
        if state is None or self._run.run_id is not None or self._plan.released_steps > 0:
            return
        self.load_state_dict(state, context="the module's earlier private fit")

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
        if module is not None and module._trainer is not None and self._budget in module.trainer.callbacks:
            module.trainer.callbacks.remove(self._budget)
        super().teardown()

    # ------------------------------------------------------------------ data
    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Replace the training sampler with the batch selection's sampler (other stages are left alone)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        self._refuse_second_train_loader(trainer)
        dataset, batch_size = validate_training_loader(dataloader)
        self._plan.bind(len(dataset), batch_size, self.world_size, self.global_rank)
        sampler = self._plan.selection.batch_sampler(self._sampling_source, lambda: self._plan.released_steps)
        if not self._planned_this_fit:
            self._plan_fit(
                trainer, int(_parse_num_batches(RunningStage.TRAINING, len(sampler), trainer.limit_train_batches))
            )
            self._planned_this_fit = True
        loader: DataLoader = dataloader  # type: ignore[assignment]
        self._probe_items = ProbeItems(dataset, loader.collate_fn)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=loader.num_workers,
            collate_fn=EmptyBatchCollate(loader.collate_fn, dataset),
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
            persistent_workers=loader.persistent_workers,
            pin_memory_device=loader.pin_memory_device,
        )

    def _refuse_second_train_loader(self, trainer: pl.Trainer) -> None:
        """Lightning processes every loader of a list, dict or ``CombinedLoader`` in one round, before it stores the
        combined loader: a second call in the same round is a second training loader.
        """
        key = (id(trainer), id(getattr(trainer.fit_loop, "_combined_loader", None)))
        if key == self._train_loader_key:
            raise DPMisconfigurationError(
                "DPStrategy trains on exactly one training dataloader, but got several (a list or dict of train"
                " dataloaders, or a CombinedLoader). Poisson sampling draws every example with probability q from one"
                " dataset. Concatenate the datasets (torch.utils.data.ConcatDataset) into one DataLoader."
            )
        self._train_loader_key = key

    def _sampling_source(self, step: int, rank: int) -> RandomSource:
        return self._streams.source("sampling", step, rank, self._run.branch)

    # ------------------------------------------------------------------ planning (once per fit)
    def _extras_of(self, step: int) -> tuple[float, ...]:
        return declared_releases(self.lightning_module.trainer.callbacks, self, step)

    def _phases_of(self, planned: int) -> list[tuple[int, float]]:
        return declared_phases(self.lightning_module.trainer.callbacks, self, planned)

    def _plan_fit(self, trainer: pl.Trainer, epoch_steps: int) -> None:
        """Fix the plan of this fit (calibrating σ for ``target_epsilon``) before any callback asks for it."""
        run, taken = self._run, self._plan.released_steps
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
        self._plan.selection.epoch_steps = epoch_steps
        self._schedule(trainer, planned)
        if self._stopped_reason is None:
            self._epsilon_planned = start_meter(self._plan, self._meter)
            if self._budget is not None and planned is not None and planned > taken:
                self._budget.certify(self._plan.planned_segments(taken, planned - taken))
        sigma = self._plan.noise_multiplier
        notice(
            f"lightning_dp: N={self._plan.selection.num_samples}, expected batch B={self._plan.expected_batch_size},"
            f" q={self._plan.sample_rate:.5g}, σ={sigma if sigma is None else f'{sigma:.5g}'}, C={self.max_grad_norm},"
            f" δ={self.delta:g}, planned steps {planned}, steps taken {self._plan.released_steps}"
            + (f", target ε={self.target_epsilon}" if self.target_epsilon else "")
        )
        self._plan.selection.announce()

    @override
    def on_train_start(self) -> None:
        """Open (or continue) the privacy journal: no step runs before its session is on disk."""
        trainer = self.lightning_module.trainer
        if not self._planned_this_fit:
            raise DPMisconfigurationError("DPStrategy was not prepared: the training dataloader did not go through it.")
        self._run.open(self, trainer)
        if self.log_clip_fraction and trainer.loggers:
            notice(
                "lightning_dp: `nonprivate/step_clip_fraction` is a non-private diagnostic computed from private data"
                " without noise; it is outside the DP guarantee. Pass DPStrategy(log_clip_fraction=False) to turn it"
                " off."
            )

    def _schedule(self, trainer: pl.Trainer, planned: int | None) -> None:
        """Calibrate on rank 0 and broadcast, so that every rank uses (and records) exactly the same σ."""
        outcome: dict[str, Any] = {}
        if self.global_rank == 0:
            try:
                self._plan.schedule(planned, self._extras_of, self._phases_of)
                outcome = {"schedule": self._plan.schedule_state()}
            except PrivacyTargetError as err:
                if self._plan.released_steps == 0 and len(self._plan.ledger) == 0:
                    outcome = {"error": str(err)}
                else:  # a continuing run whose budget is spent: stop cleanly, as PrivacyBudget does
                    outcome = {"stop": str(err)}
        outcome = self.broadcast(outcome, src=0)
        if "error" in outcome:
            raise PrivacyTargetError(outcome["error"])
        if "stop" in outcome:
            self._stopped_reason = outcome["stop"]
            self._plan.planned_steps = planned
            trainer.should_stop = True
            notice(f"lightning_dp: not training: {outcome['stop']}")
            return
        if self.global_rank != 0:
            self._plan.adopt_schedule(outcome["schedule"], self._extras_of)

    # ------------------------------------------------------------------ the private step
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Before each step: refuse gradient accumulation, enforce the budget, follow the trainable set."""
        trainer = self.lightning_module.trainer
        refuse_accumulation(trainer)
        self._released_in_batch = False
        if self._stopped_reason is not None:
            raise PrivacyTargetError(f"DPStrategy: no step may run: {self._stopped_reason}")
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
        self._refuse_second_release()
        micro_batches = split_batch(batch, self.max_physical_batch_size)
        self._set_clipping_bound()
        self._maybe_probe(rest, kwargs)
        started = time.perf_counter()
        before = self._buffers.snapshot(module)
        losses, norms, group_norms, last_output = self._clip_micro_batches(micro_batches, rest, kwargs)
        self._buffers.check(module, before)
        self._probe.stepped(time.perf_counter() - started)
        summed = self._engine.pop_summed()
        if self.global_rank == 0:  # data-independent additions (audit canaries): once, before the noise
            add_to_clipped_sum(module.trainer.callbacks, self, self._plan.released_steps, summed)
        self._pending = self._reduce_and_noise(summed)
        self._last_norms = norms
        self._last_group_norms = group_norms
        metrics = step_metrics(
            self._plan,
            self._epsilon_upper_bound(),
            sensitivity(self.max_grad_norm, self.clipping),
            self._epsilon_planned,
        )
        log_step(module, metrics, norms if self.log_clip_fraction else None, self.max_grad_norm)
        n = sum(size for _, size in micro_batches)
        mean_loss = torch.stack(losses).sum() / n if n else torch.zeros((), device=self.root_device)
        if isinstance(last_output, Mapping):
            return {**last_output, "loss": mean_loss}
        return mean_loss

    def _refuse_second_release(self) -> None:
        """One release per sampled batch: a second evaluation of the step on the same batch is refused."""
        if self._released_in_batch:
            raise DPMisconfigurationError(
                "training_step ran a second time on the same sampled batch: the optimizer evaluates its closure twice"
                " (SAM, or an optimizer_step that calls the closure twice). Each evaluation would release another noisy"
                " gradient of the same Poisson sample, which is one subsampled Gaussian mechanism with σ/√2, not two"
                " independent steps, so the ε reported would be too small. Use an optimizer that evaluates the closure"
                " once per step. For sharpness-aware training without extra privacy cost, take the ascent direction"
                " from the previous step's private gradient (DP-SAT): see 'Sharpness-aware minimisation' in the docs."
            )
        self._released_in_batch = True

    def _maybe_probe(self, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Run the sample-mixing probe if this step is due (rank 0's schedule decides for every rank)."""
        if not self.check_sample_mixing or self._probe_items is None:
            return
        step = self._plan.released_steps
        uniform = float(self._streams.source("probe", step, 0, self._run.branch).uniform(1)[0])
        due = self._probe.due(uniform)
        if self.world_size > 1:
            decision = torch.tensor([float(due)], device=self.root_device)
            dist.broadcast(decision, src=0)
            due = bool(decision.item())
        if not due:
            return
        started = time.perf_counter()
        error: SampleMixingError | None = None
        try:
            run = lambda b: self._run_user_step(b, rest, kwargs)[1]  # noqa: E731
            source = self.random_source("probe", step)
            probe_items(self.lightning_module, self._engine, run, self._probe_items, source, self._buffers.public)
        except SampleMixingError as err:
            error = err
        found = error is not None
        if self.world_size > 1:
            flag = torch.tensor([float(found)], device=self.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            found = bool(flag.item())
        if error is not None:
            raise error
        if found:
            raise SampleMixingError("The sample-mixing probe of another rank found examples mixed (see its error).")
        self._probe.ran(time.perf_counter() - started)

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

    def _clip_micro_batches(
        self, micro_batches: list[tuple[Any, int]], rest: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Tensor], Tensor, Tensor | None, Any]:
        """Stages 1–2: the user's forward and backward per micro-batch, then per-sample clipping into the sum."""
        engine = self._engine
        losses: list[Tensor] = []
        norms: list[Tensor] = []
        group_norms: list[Tensor] = []
        last_output: Any = None
        for micro, size in micro_batches:
            with engine.capture(size):
                output, loss = self._run_user_step(micro, rest, kwargs)
                loss.backward()
            norms.append(engine.clip_and_accumulate(self.max_grad_norm, self.clipping))
            if engine.last_group_norms is not None:
                group_norms.append(engine.last_group_norms)
            losses.append(loss.detach().float() * size)
            last_output = output
        self._count_nonfinite(engine.pop_nonfinite())
        all_norms = torch.cat(norms) if norms else torch.zeros(0, device=self.root_device)
        all_group_norms = torch.cat(group_norms) if group_norms else None
        return losses, all_norms, all_group_norms, last_output

    def _count_nonfinite(self, bad: int) -> None:
        if bad:
            if self._nonfinite_total == 0:
                warn(
                    f"lightning_dp: {bad} example(s) of step {self._plan.released_steps} had a non-finite (NaN/inf)"
                    " per-sample gradient; they contribute zero to the update, so the clipping bound still holds."
                    " This count is computed from private data without noise (a non-private diagnostic). Pass"
                    " DPStrategy(nonfinite='error') to stop instead, and check your data for NaN/inf values."
                )
            self._nonfinite_total += bad

    def _reduce_and_noise(self, summed: dict[torch.nn.Parameter, Tensor]) -> dict[torch.nn.Parameter, Tensor]:
        """Stages 3–4: one flat buffer of clipped sums, the noise added once (rank 0), all-reduced, divided by B."""
        step = self._plan.released_steps
        sigma = self._plan.sigma_at(step)
        return privatize(
            summed,
            noise_std=sigma * sensitivity(self.max_grad_norm, self.clipping),
            normalizer=float(self._plan.expected_batch_size),
            source=self.random_source("noise", step) if self.global_rank == 0 else None,
            all_reduce=self._all_reduce_sum if self.world_size > 1 else None,
        )

    @staticmethod
    def _all_reduce_sum(flat: Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)

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
        if self._nonfinite_total:
            warn(
                f"lightning_dp: {self._nonfinite_total} example(s) had non-finite per-sample gradients in this fit and"
                " contributed zero (a non-private count)."
            )
        if trainer.is_global_zero and self._plan.released_steps:
            log_final(trainer, {"dp/epsilon": self.epsilon})

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The privacy state saved in checkpoints (plain Python numbers; no seeds)."""
        return {
            "version": 2,
            "plan": self._plan.state_dict(),
            **self._run.state_dict(),
            "max_grad_norm": self.max_grad_norm,
            "clipping": self.clipping,
            "nonprivate_buffers": list(self._buffers.nonprivate),
        }

    def load_state_dict(
        self,
        state: dict[str, Any],
        checkpoint: dict[str, Any] | None = None,
        context: str = "the checkpoint",
        checkpoint_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Restore the privacy state, checked against the run's journal (see :func:`restore_run`).

        Raises:
            DPMisconfigurationError: for a state that disagrees with the checkpoint's progress or the journal (a
                fork, a missing or edited journal, an edited ledger), under ``resume_policy``.
        """
        if self.global_rank == 0:
            try:
                restored = restore_run(state, checkpoint, self, context, checkpoint_path)
                outcome: dict[str, Any] = {"ok": restored}
            except DPMisconfigurationError as err:
                outcome = {"error": str(err), "type": type(err).__name__}
        else:
            outcome = {}
        outcome = self.broadcast(outcome, src=0) if _distributed_is_initialized() else outcome
        if "error" in outcome:
            raise DPMisconfigurationError(outcome["error"])
        plan_state, run_state = outcome["ok"]
        self._plan.load_state_dict(plan_state)
        self._run.load(run_state, self)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Save the checkpoint with the privacy state under ``checkpoint["lightning_dp"]``; the journal is forced to
        disk first, so a checkpoint on disk never holds steps its journal lacks.
        """
        self._run.sync()
        checkpoint[_STATE_KEY] = self.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint and restore (and verify) the privacy run from it.

        Raises:
            DPMisconfigurationError: if the file cannot be read, holds training progress but no privacy state, or
                its privacy state fails the checks of :meth:`load_state_dict`.
        """
        try:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        except (OSError, RuntimeError, EOFError, ValueError) as err:
            raise DPMisconfigurationError(
                f"Cannot read the checkpoint {os.fspath(checkpoint_path)} ({type(err).__name__}: {err}). It may be"
                " truncated (e.g. the process died while writing it). Resume from another checkpoint; if it is older"
                " than the last step taken, the journal check will ask you to choose a resume_policy."
            ) from err
        state = checkpoint.get(_STATE_KEY)
        if state is None:
            if checkpoint.get("global_step", 0) > 0:
                raise DPMisconfigurationError(
                    f"The checkpoint {checkpoint_path} has training progress but no privacy ledger: it was not"
                    " written by DPStrategy, so the steps it took cannot be accounted for. To start private training"
                    " from its weights, load them (`Model.load_from_checkpoint(path)`) and call fit without ckpt_path."
                )
        else:
            self.load_state_dict(state, checkpoint, f"checkpoint {os.fspath(checkpoint_path)}", checkpoint_path)
            self._restored_from_checkpoint = True
        return checkpoint

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """Reduce across ranks (identity on one device)."""
        if not _distributed_is_initialized():
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)


DPStrategy.register_strategies(StrategyRegistry)

__all__ = ["DPStrategy"]
