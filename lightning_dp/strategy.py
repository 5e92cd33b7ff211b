"""``DPStrategy``: differentially private training (DP-SGD / DP-Adam) of any LightningModule.

Only the Lightning glue lives here; the math is in :mod:`lightning_dp.engine` (per-sample clipping),
:mod:`lightning_dp.noise` (noise), :mod:`lightning_dp.sampling` (Poisson batches) and
:mod:`lightning_dp.accounting` (ε). Per logical step the data flows: Poisson batch → physical micro-batches →
the user's ``training_step`` and backward per micro-batch → per-sample norms, clip factors, clipped sum →
(all-reduce under DDP) → one Gaussian draw → ``p.grad`` → the user's optimizer → ledger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper, _distributed_is_initialized
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from lightning_dp.accounting import (
    MechanismSegment,
    PrivacyLedger,
    calibrate_noise_multiplier,
    combine_noise_multipliers,
)
from lightning_dp.clipping import CLIPPING_MODES, ClippingMode, sensitivity
from lightning_dp.engine import build_engine
from lightning_dp.errors import DPMisconfigurationError, PrivacyTargetError
from lightning_dp.noise import privatize
from lightning_dp.sampling import EmptyBatchCollate, PoissonBatchSampler, ShuffleBatchSampler, split_batch
from lightning_dp.validation import validate_module, validate_optimizers, validate_trainer

_STATE_KEY = "lightning_dp"
_DEFAULT_DELTA = 1e-5


class DPStrategy(DDPStrategy):
    """Differentially private training: per-sample clipping, Gaussian noise, Poisson sampling, PRV accounting.

    The train dataloader's ``batch_size`` is the *expected logical batch size* B; each example is included in each
    step independently with probability q = B/N. Each logical step clips every example's gradient to
    ``max_grad_norm`` (C), sums, adds N(0, σ²C²) once, divides by B and hands the result to the module's own
    optimizer (SGD → DP-SGD, Adam → DP-Adam). Epochs have ⌈N/B⌉ steps.

    Args:
        target_epsilon: the ε the whole run may spend; σ is calibrated for the planned steps (``max_steps`` or
            ``max_epochs``) with the PRV accountant. Exactly one of ``target_epsilon`` and ``noise_multiplier``.
        target_delta: δ; default 1e-5 (must be below 1/N).
        noise_multiplier: σ, the noise std relative to C; ε is then reported as it grows.
        max_grad_norm: C, the per-sample L2 clipping bound.
        max_physical_batch_size: largest micro-batch run at once; a logical batch is split into micro-batches
            with one noise draw and one optimizer step per logical batch.
        poisson_sampling: ``False`` opts out to shuffled fixed-size batches; ε is then computed *without*
            amplification by subsampling (much larger), and a warning says so.
        loss_reduction: ``"mean"`` if ``training_step`` returns the mean of per-sample losses, ``"sum"`` if the sum.
        log_clip_fraction: log ``dp/clip_fraction``, the share of clipped examples. It is computed from private
            data without noise: a non-private diagnostic, outside the DP guarantee.
        epsilon_refresh_steps: ``dp/epsilon`` is logged every step as an upper bound valid for the next this-many
            steps (one PRV evaluation takes seconds). Default: a quarter epoch.
        sampling_seed: seed of the Poisson sampler (default: drawn from torch's global RNG).
        engine: the per-sample clipping engine, a name in ``lightning_dp.engine.ENGINES``: ``"ghost"`` (default:
            book-keeping with ghost norms, one backward pass, no per-sample weight gradients) or ``"hooks"``
            (materialises per-sample gradients, like Opacus hooks).
        clipping: ``"flat"`` (g·min(1, C/‖g‖)), ``"normalized"`` (g·min(1/C, 1/‖g‖), sensitivity 1: a flat learning
            rate η maps to η·C) or ``"automatic"`` (AUTO-S, C·g/(‖g‖+0.01)); see :mod:`lightning_dp.clipping`.
            The noise is σ × the rule's sensitivity, so the accounting is the same.

    Raises:
        DPMisconfigurationError: for inconsistent arguments (both or neither of target/noise, C ≤ 0, ...).

    Example:
        >>> trainer = L.Trainer(  # doctest: +SKIP
        ...     max_epochs=3, strategy=DPStrategy(target_epsilon=3.0, target_delta=1e-5, max_grad_norm=1.0))
        >>> trainer.fit(model, datamodule=dm)  # doctest: +SKIP
        >>> trainer.strategy.epsilon  # doctest: +SKIP
    """

    strategy_name = "dp"

    def __init__(
        self,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float = 1.0,
        max_physical_batch_size: int | None = None,
        poisson_sampling: bool = True,
        loss_reduction: Literal["mean", "sum"] = "mean",
        log_clip_fraction: bool = True,
        epsilon_refresh_steps: int | None = None,
        sampling_seed: int | None = None,
        engine: str = "ghost",
        clipping: ClippingMode = "flat",
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
        if (target_epsilon is None) == (noise_multiplier is None):
            raise DPMisconfigurationError(
                "Give exactly one of target_epsilon (σ is then calibrated for the run) and noise_multiplier (ε is"
                f" then reported as it grows); got target_epsilon={target_epsilon},"
                f" noise_multiplier={noise_multiplier}."
            )
        if target_epsilon is not None and not target_epsilon > 0:
            raise PrivacyTargetError(f"target_epsilon must be positive, got {target_epsilon}.")
        if noise_multiplier is not None and not noise_multiplier > 0:
            raise DPMisconfigurationError(f"noise_multiplier must be positive, got {noise_multiplier}.")
        if target_delta is not None and not (0 < target_delta < 1):
            raise DPMisconfigurationError(f"target_delta must be in (0, 1), got {target_delta}.")
        if not max_grad_norm > 0:
            raise DPMisconfigurationError(f"max_grad_norm must be positive, got {max_grad_norm}.")
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise DPMisconfigurationError(f"max_physical_batch_size must be ≥ 1, got {max_physical_batch_size}.")
        if loss_reduction not in ("mean", "sum"):
            raise DPMisconfigurationError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.max_grad_norm = float(max_grad_norm)
        self.max_physical_batch_size = max_physical_batch_size
        self.poisson_sampling = poisson_sampling
        self.loss_reduction = loss_reduction
        self.log_clip_fraction = log_clip_fraction
        self.epsilon_refresh_steps = epsilon_refresh_steps
        self.sampling_seed = sampling_seed
        self.engine_name = engine
        if clipping not in CLIPPING_MODES:
            raise DPMisconfigurationError(f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}.")
        self.clipping = clipping

        self._noise_multiplier: float | None = noise_multiplier
        self._phases: list[tuple[int, float]] = []  # (end step, exclusive; σ) when σ changes during the run
        self._sample_rate: float | None = None
        self._num_samples: int | None = None
        self._expected_batch_size: float | None = None
        self._steps_per_epoch: int | None = None
        self._planned_steps: int | None = None
        self._ledger = PrivacyLedger()
        self._released_steps = 0
        self._last_recorded_epoch = -1
        self._restored: dict[str, Any] | None = None
        self._engine: Any = None
        self._pending: dict[torch.nn.Parameter, Tensor] | None = None
        self._noise_generator: torch.Generator | None = None
        self._eps_bound: tuple[int, float] = (-1, 0.0)
        self._last_norms: Tensor | None = None
        #: per parameter, a 0/1 mask of the coordinates per-sample clipping sees (set by sparse fine-tuning; apply
        #: with ``refresh_trainable()``)
        self.grad_masks: dict[torch.nn.Parameter, Tensor] = {}

    # ------------------------------------------------------------------ public state
    @property
    def noise_multiplier(self) -> float | None:
        """σ of the current step: the noise std on the clipped sum relative to ``max_grad_norm`` (known once
        ``fit`` has started; it changes between phases when a callback splits the budget, see ``noise_phases``).
        """
        if self._noise_multiplier is None:
            return None
        return self._sigma_at(self._released_steps)

    @property
    def noise_phases(self) -> list[tuple[int, float]]:
        """``[(end_step, σ), ...]``: σ used for steps before ``end_step`` (exclusive), when the budget is split into
        phases (e.g. linear probing, then fine-tuning); empty when σ is constant.
        """
        return list(self._phases)

    def _sigma_at(self, step: int) -> float:
        for end, sigma in self._phases:
            if step < end:
                return sigma
        assert self._noise_multiplier is not None
        return self._noise_multiplier

    def refresh_trainable(self) -> None:
        """Rebuild the per-sample gradient engine after ``requires_grad`` flags changed (call between steps, e.g.
        from a callback that switches from linear probing to fine-tuning). Frozen parameters get no gradient and no
        noise; the optimizer skips them.
        """
        module = self.lightning_module
        assert module is not None
        if self._engine is not None:
            self._engine.detach()
        self._engine = build_engine(self.engine_name, module, loss_reduction=self.loss_reduction)
        self._engine.set_grad_masks(self.grad_masks)
        self._engine.attach()
        for p in module.parameters():
            if not p.requires_grad:
                p.grad = None

    @property
    def sample_rate(self) -> float | None:
        """q: the probability that an example is in a logical batch (known once ``fit`` has started)."""
        return self._sample_rate

    @property
    def delta(self) -> float:
        """δ at which ε is reported."""
        return self.target_delta if self.target_delta is not None else _DEFAULT_DELTA

    @property
    def ledger(self) -> PrivacyLedger:
        """The privacy ledger: every private release of this run, also across resumes."""
        return self._ledger

    @property
    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (the PRV accountant's upper bound; 0.0 before the first step)."""
        return self._ledger.epsilon(self.delta)

    @property
    def planned_steps(self) -> int | None:
        """The number of optimizer steps the run is planned (and, with ``target_epsilon``, calibrated) for."""
        return self._planned_steps

    @property
    def last_per_sample_norms(self) -> Tensor | None:
        """Per-sample gradient norms (before clipping, fp32) of this rank's last logical batch, for callbacks.

        They are computed from private data: anything released from them must be noised and recorded in the
        ledger (declare them with ``dp_release_noise``, see :meth:`_extra_noise`), or labelled as a non-private
        diagnostic.
        """
        return self._last_norms

    @property
    def last_release_step(self) -> int:
        """0-based index of the last recorded private step (-1 before the first)."""
        return self._released_steps - 1

    def _extra_noise(self, step: int) -> tuple[float, ...]:
        """Noise multipliers of the statistics that callbacks release from the batch of step ``step``.

        A callback that releases noised statistics of the private batch (e.g. a private gradient-norm histogram)
        implements ``dp_release_noise(strategy, step) -> Sequence[float]``: for each release it makes from step
        ``step``'s batch, the noise std divided by the release's L2 sensitivity to one example. It must depend on
        ``step`` only (not on data), so that the σ calibration can plan for it. The strategy then records that step
        as one Gaussian release with the combined multiplier (σ⁻² + Σ σ_j⁻²)^(-1/2).
        """
        module = self.lightning_module
        trainer = module.trainer if module is not None else None
        extra: list[float] = []
        for cb in trainer.callbacks if trainer is not None else []:
            fn = getattr(cb, "dp_release_noise", None)
            if callable(fn):
                extra.extend(float(x) for x in fn(self, step))
        return tuple(sorted(extra))

    def _joint_plan(self, start: int, count: int) -> dict[tuple[float, ...], int]:
        """``{extra multipliers: number of steps}`` for steps ``start .. start + count - 1``."""
        plan: dict[tuple[float, ...], int] = {}
        for step in range(start, start + count):
            extra = self._extra_noise(step)
            plan[extra] = plan.get(extra, 0) + 1
        return plan

    @property
    def last_recorded_epoch(self) -> int:
        """With ``poisson_sampling=False``: the last epoch whose release is in the ledger (-1 before any)."""
        return self._last_recorded_epoch

    def planned_segments(
        self, start: int, count: int, last_recorded_epoch: int | None = None
    ) -> list[MechanismSegment]:
        """The ledger segments that private steps ``start .. start + count - 1`` will record, as the strategy records
        them: with Poisson sampling one per step at the step's σ combined with the callbacks' declared releases;
        shuffled, one per epoch not yet recorded (after ``last_recorded_epoch``, default the current one).

        Use it to bound ε ahead of time: ``strategy.ledger.epsilon(delta, extra=strategy.planned_segments(k, n))``.
        """
        assert self._sample_rate is not None, "planned_segments is known once fit has prepared the data"
        if self.poisson_sampling:
            per_sigma: dict[float, int] = {}
            for step in range(start, start + count):
                sigma = self._step_noise_multiplier(step)
                per_sigma[sigma] = per_sigma.get(sigma, 0) + 1
            return [self._release_segment(s, n) for s, n in per_sigma.items()]
        spe = self._steps_per_epoch or 1
        recorded = self._last_recorded_epoch if last_recorded_epoch is None else last_recorded_epoch
        epochs = sorted({s // spe for s in range(start, start + count)} - {recorded})
        return [
            self._release_segment(min(self._step_noise_multiplier(e * spe + k) for k in range(spe)), 1)
            for e in epochs
            if e > recorded
        ]

    def _step_noise_multiplier(self, step: int) -> float:
        return combine_noise_multipliers(self._sigma_at(step), *self._extra_noise(step))

    def _budget_phases(self, planned: int) -> list[tuple[int, float]]:
        """``[(end_step, cumulative share of target_epsilon)]`` declared by a callback's ``dp_budget_phases``."""
        module = self.lightning_module
        trainer = module.trainer if module is not None else None
        phases: list[tuple[int, float]] = []
        for cb in trainer.callbacks if trainer is not None else []:
            fn = getattr(cb, "dp_budget_phases", None)
            if callable(fn):
                if phases:
                    raise DPMisconfigurationError("Only one callback may split the privacy budget into phases.")
                phases = [(int(e), float(f)) for e, f in fn(self, planned)]
        if phases:
            ends = [e for e, _ in phases]
            shares = [f for _, f in phases]
            if ends != sorted(ends) or ends[-1] != planned or shares != sorted(shares) or shares[-1] != 1.0:
                raise DPMisconfigurationError(
                    f"Budget phases {phases} must end at the planned {planned} steps, with increasing shares"
                    " ending at 1."
                )
            if not self.poisson_sampling:
                raise DPMisconfigurationError("Budget phases need Poisson sampling (poisson_sampling=True).")
        return phases

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self.num_nodes * self.num_processes

    # ------------------------------------------------------------------ environment
    def _configure_launcher(self) -> None:
        # One rank: no launcher and no process group. Several: Lightning's DDP launchers (script/torchrun/SLURM).
        if self.world_size > 1:
            super()._configure_launcher()
        else:
            self._launcher = None

    def setup_environment(self) -> None:
        """Set up the device and, with more than one rank, the process group."""
        if self.world_size > 1:
            super().setup_environment()
        else:
            Strategy.setup_environment(self)

    def configure_ddp(self) -> None:
        """Do not wrap the model in ``DistributedDataParallel``: it would all-reduce *unclipped* gradients in
        backward. The clipped sums are all-reduced once per step instead; here only the initial parameters and
        buffers are broadcast from rank 0 so that every rank starts (and stays) identical.
        """
        if _distributed_is_initialized() and self.world_size > 1:
            _sync_module_states(self.model)

    def setup(self, trainer: pl.Trainer) -> None:
        """Validate the run, build the per-sample gradient engine, then set up as Lightning does. Validation, test
        and predict only move the model to its device (nothing private is released there).
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
        validate_trainer(trainer, self.precision_plugin.precision)
        validate_module(module)
        self._engine = build_engine(self.engine_name, module, loss_reduction=self.loss_reduction)
        self._engine.set_grad_masks(self.grad_masks)
        super().setup(trainer)
        validate_optimizers(self.optimizers)
        if len(self.optimizers) != 1:
            raise DPMisconfigurationError(f"DPStrategy needs exactly one optimizer, got {len(self.optimizers)}.")
        self._engine.attach()
        self._noise_generator = torch.Generator(device=self.root_device)
        self._noise_generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        if self.log_clip_fraction:
            rank_zero_info(
                "lightning_dp: `dp/clip_fraction` is a non-private diagnostic computed from private data without"
                " noise; it is outside the DP guarantee. Pass DPStrategy(log_clip_fraction=False) to turn it off."
            )

    def teardown(self) -> None:
        """Remove the engine's hooks and tear down."""
        if self._engine is not None:
            self._engine.detach()
        super().teardown()

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        """Replace the training sampler with a Poisson batch sampler (other stages are left alone)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return dataloader
        if not isinstance(dataloader, DataLoader):
            raise DPMisconfigurationError(
                f"DPStrategy needs a torch DataLoader for training, got {type(dataloader).__name__}: Poisson sampling"
                " draws indices into a map-style dataset."
            )
        dataset = dataloader.dataset
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise DPMisconfigurationError(
                "The training dataset is an iterable dataset without a length: Poisson sampling needs a map-style"
                " dataset with __len__ and __getitem__ (e.g. a TensorDataset or an ImageFolder)."
            )
        batch_size = dataloader.batch_size
        if batch_size is None:
            raise DPMisconfigurationError(
                "The training DataLoader has no batch_size (a custom batch_sampler?). Set batch_size to the expected"
                " logical batch size and let DPStrategy sample the batches."
            )
        sampler = dataloader.sampler
        if isinstance(sampler, DistributedSamplerWrapper):  # Lightning wrapped a custom sampler for DDP
            sampler = sampler.dataset._sampler
        if not isinstance(sampler, (RandomSampler, SequentialSampler, DistributedSampler)):
            raise DPMisconfigurationError(
                f"The training DataLoader uses a {type(sampler).__name__}; DPStrategy replaces the sampler with"
                " Poisson sampling, which would silently drop its behaviour. Remove the custom sampler."
            )
        num_samples = len(dataset)
        self._prepare_privacy(trainer, num_samples, batch_size)
        rank, replicas = self.global_rank, self.world_size
        if self.sampling_seed is None:
            # Every rank must draw its shard's masks from the same seed stream: take rank 0's.
            self.sampling_seed = int(self.broadcast(int(torch.randint(0, 2**62, (1,)).item()), src=0))
        if self.poisson_sampling:
            batch_sampler: Any = PoissonBatchSampler(
                num_samples, self._sample_rate, self._steps_per_epoch, replicas, rank, self.sampling_seed
            )
        else:
            batch_sampler = ShuffleBatchSampler(num_samples, batch_size, replicas, rank, self.sampling_seed)
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=dataloader.num_workers,
            collate_fn=EmptyBatchCollate(dataloader.collate_fn, dataset),
            pin_memory=dataloader.pin_memory,
            timeout=dataloader.timeout,
            worker_init_fn=dataloader.worker_init_fn,
            multiprocessing_context=dataloader.multiprocessing_context,
            prefetch_factor=dataloader.prefetch_factor if dataloader.num_workers > 0 else None,
            persistent_workers=dataloader.persistent_workers,
            pin_memory_device=dataloader.pin_memory_device,
        )

    def _plan_steps(self, trainer: pl.Trainer, steps_per_epoch: int) -> int:
        limit = trainer.limit_train_batches
        if isinstance(limit, int) or (isinstance(limit, float) and limit > 1.0):
            steps_per_epoch = min(steps_per_epoch, int(limit))
        elif isinstance(limit, float) and limit < 1.0:
            steps_per_epoch = max(1, int(steps_per_epoch * limit))
        max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
        from_epochs = max_epochs * steps_per_epoch if max_epochs is not None and max_epochs >= 0 else None
        from_steps = max_steps if max_steps is not None and max_steps >= 0 else None
        if from_epochs is None and from_steps is None:
            raise PrivacyTargetError(
                "target_epsilon needs a finite run to calibrate the noise for: set max_epochs or max_steps (or give"
                " noise_multiplier instead)."
            )
        return min(x for x in (from_epochs, from_steps) if x is not None)

    def _prepare_privacy(self, trainer: pl.Trainer, num_samples: int, batch_size: int) -> None:
        """Fix q, steps per epoch, the planned steps and σ (calibrating it for ``target_epsilon``)."""
        expected_batch = batch_size * self.world_size  # per-rank batch_size × ranks = global logical batch
        if expected_batch > num_samples:
            raise DPMisconfigurationError(
                f"The logical batch size {expected_batch} exceeds the dataset size {num_samples}."
            )
        if not self.delta < 1.0 / num_samples:
            raise PrivacyTargetError(
                f"target_delta={self.delta:g} is not below 1/N = {1.0 / num_samples:.3g} (N={num_samples}): such a δ"
                " allows releasing whole examples. Set target_delta well below 1/N, e.g. 1/(10·N)."
            )
        sample_rate = expected_batch / num_samples
        steps_per_epoch = math.ceil(num_samples / expected_batch)
        planned = self._plan_steps(trainer, steps_per_epoch) if self.target_epsilon is not None else None
        if self._sample_rate is not None:  # the loader is rebuilt (reload_dataloaders_every_n_epochs)
            if sample_rate != self._sample_rate:
                raise DPMisconfigurationError("The training set or batch size changed during fit; q must stay fixed.")
            return
        self._num_samples, self._expected_batch_size = num_samples, float(expected_batch)
        self._sample_rate, self._steps_per_epoch = sample_rate, steps_per_epoch
        if self.target_epsilon is not None:
            assert planned is not None
            self._planned_steps = planned
            # Calibrated on rank 0 and broadcast: every rank must use (and record) exactly the same σ.
            sigma = self._calibrate(planned) if self.global_rank == 0 else None
            self._noise_multiplier = float(self.broadcast(sigma, src=0))
        else:
            from_epochs = trainer.max_epochs * steps_per_epoch if (trainer.max_epochs or -1) >= 0 else None
            from_steps = trainer.max_steps if trainer.max_steps >= 0 else None
            options = [x for x in (from_epochs, from_steps) if x is not None]
            self._planned_steps = min(options) if options else None
        if not self.poisson_sampling:
            rank_zero_warn(
                "DPStrategy(poisson_sampling=False): batches are shuffled, not Poisson-sampled, so the ledger claims no"
                " amplification by subsampling. ε is that of one Gaussian release with sensitivity 2C (replace-one"
                " adjacency) per epoch, far larger than a Poisson-sampled run's. Use Poisson sampling for the usual"
                " DP-SGD guarantee."
            )
        rank_zero_info(
            f"lightning_dp: N={num_samples}, expected batch B={expected_batch}, q={sample_rate:.5g},"
            f" σ={self._noise_multiplier:.5g}, C={self.max_grad_norm}, δ={self.delta:g}, planned steps"
            f" {self._planned_steps}" + (f", target ε={self.target_epsilon}" if self.target_epsilon else "")
        )

    def _release_segment(self, sigma: float, steps: int) -> MechanismSegment:
        """The ledger segment of ``steps`` private gradient releases (per epoch in shuffle mode)."""
        if self.poisson_sampling:
            return MechanismSegment(sigma, self._sample_rate, steps, "dp-sgd")
        # Shuffled batches: no amplification; one release per epoch with sensitivity 2C (replace-one).
        return MechanismSegment(sigma / 2.0, 1.0, steps, "dp-sgd")

    def _calibrate(self, planned: int) -> float:
        """Calibrate σ (per budget phase, if a callback declares phases) for the remaining planned steps, on top
        of what the ledger already spent. Sets ``self._phases`` and returns the σ of the last phase.
        """
        restored = self._restored or {}
        same_plan = (
            restored.get("sample_rate") == self._sample_rate
            and restored.get("planned_steps") == planned
            and restored.get("target_epsilon") == self.target_epsilon
            and restored.get("delta") == self.delta
            and restored.get("poisson_sampling", True) == self.poisson_sampling
        )
        if same_plan and restored.get("noise_multiplier"):
            self._phases = [(int(e), float(s)) for e, s in restored.get("noise_phases", [])]
            return float(restored["noise_multiplier"])
        remaining = planned - self._released_steps
        if remaining <= 0:
            raise PrivacyTargetError(
                f"The run already took {self._released_steps} private steps, not fewer than the {planned} planned:"
                " raise max_epochs/max_steps to continue."
            )
        assert self.target_epsilon is not None and self._sample_rate is not None
        if not self.poisson_sampling:
            # Shuffled: one release per epoch at sensitivity 2C (the ledger sees σ/2 at q = 1), with the worst
            # step's extra releases: calibrate that, then double.
            plan = self._joint_plan(self._released_steps, remaining)
            spe = self._steps_per_epoch or 1
            epochs = max(1, math.ceil(planned / spe) - math.ceil(self._released_steps / spe))
            worst = max(plan, key=lambda extra: sum(x**-2 for x in extra))
            halved = tuple(x / 2.0 for x in worst)
            return 2.0 * calibrate_noise_multiplier(
                self.target_epsilon,
                self.delta,
                1.0,
                epochs,
                prior=self._ledger.segments,
                joint_noise={halved: epochs} if worst else None,
            )
        phases = self._budget_phases(planned) or [(planned, 1.0)]
        prior = list(self._ledger.segments)
        start = self._released_steps
        calibrated: list[tuple[int, float]] = []
        sigma = 0.0
        for end, share in phases:
            if end <= start:
                continue
            plan = self._joint_plan(start, end - start)
            sigma = calibrate_noise_multiplier(
                share * self.target_epsilon,
                self.delta,
                self._sample_rate,
                end - start,
                prior=prior,
                joint_noise=plan,
            )
            calibrated.append((end, sigma))
            prior += [
                MechanismSegment(combine_noise_multipliers(sigma, *x), self._sample_rate, n) for x, n in plan.items()
            ]
            start = end
        self._phases = calibrated if len(calibrated) > 1 else []
        return sigma

    # ------------------------------------------------------------------ the private step
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """Run the user's ``training_step`` per micro-batch, clip per sample, and prepare the noisy gradient."""
        module = self.lightning_module
        engine = self._engine
        assert module is not None and engine is not None
        if self._sample_rate is None or self._noise_multiplier is None:
            raise RuntimeError("DPStrategy was not prepared: the training dataloader did not go through it.")
        batch, rest = args[0], args[1:]
        micro_batches = split_batch(batch, self.max_physical_batch_size)
        losses: list[Tensor] = []
        norms: list[Tensor] = []
        last_output: Any = None
        for micro, size in micro_batches:
            with engine.capture(size):
                with self.precision_plugin.train_step_context():
                    output = module.training_step(micro, *rest, **kwargs)
                loss = _loss_of(output)
                loss.backward()
            norms.append(engine.clip_and_accumulate(self.max_grad_norm, self.clipping))
            losses.append(loss.detach().float() * size)
            last_output = output
        n = sum(size for _, size in micro_batches)
        sigma = self._sigma_at(self._released_steps)
        self._pending = privatize(
            engine.pop_summed(),
            noise_std=sigma * sensitivity(self.max_grad_norm, self.clipping),
            normalizer=self._expected_batch_size,
            generator=self._noise_generator,
            all_reduce=self._all_reduce_sum if self.world_size > 1 else None,
            add_noise=self.global_rank == 0,  # one draw for the global sum, not one per rank
        )
        all_norms = torch.cat(norms) if norms else torch.zeros(0, device=self.root_device)
        self._last_norms = all_norms
        self._log_step_metrics(module, all_norms)
        mean_loss = torch.stack(losses).sum() / n if n else torch.zeros((), device=self.root_device)
        if isinstance(last_output, Mapping):
            return {**last_output, "loss": mean_loss}
        return mean_loss

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """Write the private gradient into ``p.grad`` (the backward passes already ran per micro-batch) and record
        the release in the ledger.
        """
        module = self.lightning_module
        assert module is not None
        if self._pending is None:
            raise RuntimeError("DPStrategy.backward called without a private training_step before it.")
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        for p, g in self._pending.items():
            p.grad = g
        self._pending = None
        self._record_release()
        return self.precision_plugin.post_backward(closure_loss, module)

    @staticmethod
    def _all_reduce_sum(flat: Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)

    def _record_release(self) -> None:
        assert self._noise_multiplier is not None
        epoch = self.lightning_module.trainer.current_epoch
        step = self._released_steps
        self._released_steps += 1
        if self.poisson_sampling:
            self._ledger.record(self._step_noise_multiplier(step), self._sample_rate, 1)
        elif epoch != self._last_recorded_epoch:
            spe = self._steps_per_epoch or 1
            sigma = min(self._step_noise_multiplier(epoch * spe + k) for k in range(spe))
            seg = self._release_segment(sigma, 1)
            self._ledger.record(seg.noise_multiplier, seg.sample_rate, 1)
        self._last_recorded_epoch = epoch

    def _epsilon_upper_bound(self) -> float:
        """An upper bound on ε after the current step, valid for the next ``epsilon_refresh_steps`` steps too."""
        step = self._released_steps + 1
        valid_through, value = self._eps_bound
        if step <= valid_through:
            return value
        spe = self._steps_per_epoch or 1
        ahead = self.epsilon_refresh_steps or max(1, spe // 4)
        if self._planned_steps is not None:
            ahead = max(1, min(ahead, self._planned_steps - self._released_steps))
        extra = self.planned_segments(self._released_steps, ahead)
        value = self._ledger.epsilon(self.delta, extra=extra)
        self._eps_bound = (self._released_steps + ahead, value)
        return value

    def _log_step_metrics(self, module: pl.LightningModule, norms: Tensor) -> None:
        assert self._noise_multiplier is not None and self._expected_batch_size is not None
        sigma = self._sigma_at(self._released_steps)
        metrics = {
            "dp/epsilon": self._epsilon_upper_bound(),
            "dp/noise_multiplier": sigma,
            "dp/sample_rate": float(self._sample_rate),
            "dp/effective_noise": sigma * sensitivity(self.max_grad_norm, self.clipping) / self._expected_batch_size,
        }
        if self._planned_steps:
            metrics["dp/cumulative_noise"] = sigma * math.sqrt(self._planned_steps)
        for name, value in metrics.items():
            module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == "dp/epsilon", batch_size=1)
        if self.log_clip_fraction and norms.numel():
            frac = (norms > self.max_grad_norm).float().mean()
            module.log("dp/clip_fraction", frac, on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The privacy state saved in checkpoints (plain Python numbers)."""
        return {
            "version": 1,
            "ledger": self._ledger.state_dict(),
            "released_steps": self._released_steps,
            "last_recorded_epoch": self._last_recorded_epoch,
            "noise_multiplier": self._noise_multiplier,
            "noise_phases": [[e, s] for e, s in self._phases],
            "sample_rate": self._sample_rate,
            "planned_steps": self._planned_steps,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "max_grad_norm": self.max_grad_norm,
            "clipping": self.clipping,
            "poisson_sampling": self.poisson_sampling,
            "sampling_seed": self.sampling_seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the privacy state from :meth:`state_dict` (the ledger continues)."""
        if state.get("version") != 1:
            raise DPMisconfigurationError(f"Unknown lightning_dp checkpoint state version {state.get('version')!r}.")
        self._ledger.load_state_dict(state["ledger"])
        self._released_steps = int(state["released_steps"])
        self._last_recorded_epoch = int(state["last_recorded_epoch"])
        if self.target_epsilon is None and state.get("noise_multiplier") and self._noise_multiplier is None:
            self._noise_multiplier = float(state["noise_multiplier"])
        if self.sampling_seed is None and state.get("sampling_seed") is not None:
            self.sampling_seed = int(state["sampling_seed"])
        self._restored = dict(state)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Save the checkpoint with the privacy state under ``checkpoint["lightning_dp"]``."""
        checkpoint[_STATE_KEY] = self.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Load a checkpoint and restore the privacy ledger from it.

        Raises:
            DPMisconfigurationError: if the checkpoint holds training progress but no privacy state.
        """
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.get(_STATE_KEY)
        if state is None:
            if checkpoint.get("global_step", 0) > 0:
                raise DPMisconfigurationError(
                    f"The checkpoint {checkpoint_path} has training progress but no privacy ledger: it was not"
                    " written by DPStrategy, so the steps it took cannot be accounted for. To start private training"
                    " from its weights, load them (`Model.load_from_checkpoint(path)`) and call fit without ckpt_path."
                )
        else:
            self.load_state_dict(state)
        return checkpoint

    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        """Reduce across ranks (identity on one device)."""
        if not _distributed_is_initialized():
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)


def _loss_of(output: Any) -> Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor):
        raise DPMisconfigurationError(
            "training_step must return the loss (a tensor, or a dict with 'loss') for every batch under DPStrategy:"
            " skipping a batch by returning None would make the step depend on private data."
        )
    if not loss.requires_grad:
        raise DPMisconfigurationError("The loss returned by training_step does not require grad.")
    return loss


__all__ = ["DPStrategy"]
