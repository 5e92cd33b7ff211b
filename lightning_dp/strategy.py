"""``DPStrategy``: differentially private training (DP-SGD / DP-Adam) of any LightningModule, on one device or DDP.

The class is :class:`~lightning_dp.private_training.PrivateTraining` (every private hook, shared with
:class:`~lightning_dp.model_parallel.DPModelParallelStrategy`) on top of :class:`~lightning_dp.ranks.OneOrManyRanks`
(Lightning's DDP without the DDP wrapper). The privacy core is Lightning-free: :mod:`lightning_dp.plan` (q, planned
steps, σ schedule, calibration, ledger), :mod:`lightning_dp.batch_selection` (samplers and the ledger event each
implies), :mod:`lightning_dp.budget` (budget guard, ε meter), :mod:`lightning_dp.checkpointing` and
:mod:`lightning_dp.journal` (executed steps on disk, resume checks), :mod:`lightning_dp.randomness` (seeds),
:mod:`lightning_dp.noise` (noise), :mod:`lightning_dp.guards` and :mod:`lightning_dp.probe` (invariants) and
:mod:`lightning_dp.engine` (per-sample clipping).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import StrategyRegistry
from typing_extensions import override

from lightning_dp.accounting import Accountant
from lightning_dp.clipping import ClippingMode
from lightning_dp.private_training import PrivateTraining
from lightning_dp.probe import DEFAULT_PROBE_BUDGET
from lightning_dp.ranks import OneOrManyRanks


class DPStrategy(PrivateTraining, OneOrManyRanks):
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
        self._init_privacy(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            max_physical_batch_size=max_physical_batch_size,
            poisson_sampling=poisson_sampling,
            loss_reduction=loss_reduction,
            log_clip_fraction=log_clip_fraction,
            epsilon_refresh_steps=epsilon_refresh_steps,
            sampling_seed=sampling_seed,
            noise_seed=noise_seed,
            secure_mode=secure_mode,
            engine=engine,
            clipping=clipping,
            check_sample_mixing=check_sample_mixing,
            probe_budget=probe_budget,
            public_buffers=public_buffers,
            nonprivate_buffers=nonprivate_buffers,
            nonfinite=nonfinite,
            journal_dir=journal_dir,
            resume_policy=resume_policy,
            accountant=accountant,
        )


DPStrategy.register_strategies(StrategyRegistry)

__all__ = ["DPStrategy"]
