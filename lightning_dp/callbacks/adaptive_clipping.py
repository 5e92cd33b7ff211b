"""``AdaptiveClipping``: the clipping bound follows a target quantile of the per-sample gradient norms, privately.

Andrew, Thakkar, McMahan and Ramaswamy, "Differentially private learning with adaptive clipping" (NeurIPS 2021).
After step t, clipped with bound C_t, the share of the step's examples whose norm is at most C_t is released as a
Gaussian count, and C moves geometrically towards the target quantile γ::

    b̃_t = (Σ_i (1[‖g_i‖ ≤ C_t] − 1/2) + N(0, σ_b²)) / B + 1/2,        C_{t+1} = C_t · exp(−η_C (b̃_t − γ))

with B the expected logical batch size (public under Poisson sampling; E[b̃_t] is the share of unclipped examples).
As in the authors' implementation (TensorFlow Privacy's ``QuantileEstimatorQuery``), each example adds ±1/2 to the
released sum rather than 0 or 1: adding or removing one example moves it by at most 1/2, so the release is a Gaussian
mechanism with noise multiplier 2σ_b (the plain count, of sensitivity 1, would have σ_b: 4× the privacy cost in
σ⁻² for the same noise). It is declared to the strategy through :meth:`AdaptiveClipping.dp_release_noise`, so each
step is recorded as one joint Gaussian mechanism with ``(σ⁻² + (2σ_b)⁻²)^(-1/2)`` and σ is calibrated for it under
``target_epsilon`` (as for private norm histograms). C_{t+1} is post-processing of the release; the strategy asks for
it before step t+1 (:meth:`AdaptiveClipping.dp_clipping_bounds`) and clips *and* noises that step with it (noise std
σ·C_{t+1}).

Under per-layer clipping each clipping group l has its own bound C_l following its own quantile, with one release per
group; one example moves each of the L sums by at most 1/2, so the vector has L2 sensitivity √L/2 and is declared
with multiplier 2σ_b/√L. The step's sensitivity is then C = sqrt(Σ_l C_l²) (the noise is σ·C).

Under DDP each rank sums over its own examples; the noise is drawn once (rank 0, from the strategy's ``"noise"``
stream of the step, after the gradient's draw) and the noised sum is summed over ranks, so every rank computes the
same C. With micro-batching the count covers the whole logical batch (:attr:`DPStrategy.last_per_sample_norms`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_dp.callbacks._utils import require_dp_strategy, sum_over_ranks
from lightning_dp.console import notice
from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.noise import add_gaussian

if TYPE_CHECKING:
    from lightning_dp.strategy import DPStrategy

#: How far adding or removing one example moves a centred count Σ_i (1[‖g_i‖ ≤ C] − 1/2).
COUNT_SENSITIVITY = 0.5

#: Andrew et al.'s default: the count's noise std is the expected batch size over this (noise on b̃ of std 0.05).
DEFAULT_COUNT_NOISE_DIVISOR = 20.0


def quantile_update(bound: float, fraction_below: float, target_quantile: float, learning_rate: float) -> float:
    """One geometric step of the bound towards the ``target_quantile`` of the norms: ``C·exp(−η (b̃ − γ))``.

    Args:
        bound: C_t, the bound used for the step the fraction was measured on.
        fraction_below: b̃_t, the (noised) share of the step's examples with norm ≤ C_t.
        target_quantile: γ in (0, 1).
        learning_rate: η_C > 0.

    Returns:
        C_{t+1}: larger when fewer than γ of the examples were unclipped, smaller when more were.

    Example:
        >>> round(quantile_update(1.0, 0.7, 0.5, 0.2), 4)
        0.9608
    """
    return float(bound) * math.exp(-learning_rate * (fraction_below - target_quantile))


def count_below(norms: Tensor | None, bounds: Tensor) -> Tensor:
    """Per column, the number of examples whose norm is at most the column's bound (float64, on the CPU).

    Args:
        norms: per-sample norms, shape ``(b,)`` (one bound) or ``(b, L)`` (one bound per column); None: no example.
        bounds: shape ``(L,)`` (L = 1 for flat clipping).

    A NaN norm counts as above every bound: such an example moves no count, so the sensitivity stays 1 per count.
    """
    bounds = bounds.to(torch.float64).cpu()
    if norms is None or norms.numel() == 0:
        return torch.zeros_like(bounds)
    n = norms.detach().to("cpu", torch.float64)
    n = n.reshape(-1, 1) if n.dim() == 1 else n
    return (n <= bounds).sum(0).to(torch.float64)


def _group_key(names: Sequence[str]) -> str:
    return ",".join(names)


def _group_label(names: Sequence[str]) -> str:
    """A short name for a clipping group: its parameters' common module prefix (else the first parameter's name)."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if len(names) > 1 and common:
        return ".".join(common)
    return names[0] if names else "?"


class AdaptiveClipping(Callback):
    """Adapt the clipping bound C to a target quantile of the per-sample gradient norms, with a private count.

    See the module docstring for the mechanism and its accounting. Logged every step (to every logger, through
    ``LightningModule.log``): ``dp/max_grad_norm``, the bound C the step was clipped with; under per-layer clipping
    also ``dp/max_grad_norm/<group>`` per clipping group; and ``dp/unclipped_fraction``, the released (noised) b̃
    (the mean over groups under per-layer clipping). All are post-processing of released values.

    Args:
        target_quantile: γ, the share of examples that should be left unclipped (0.5: the median norm).
        learning_rate: η_C, the step of the geometric update (Andrew et al. use 0.2).
        count_noise_multiplier: σ_b, the std of the noise on the (centred) count, whose sensitivity is 1/2: it is
            accounted as a Gaussian with multiplier 2σ_b. Default: the expected logical batch size B / 20, Andrew et
            al.'s choice (noise of std 0.05 on b̃). It costs privacy: under ``target_epsilon`` σ is calibrated higher
            to pay for it; with a fixed ``noise_multiplier`` ε grows.
        initial_max_grad_norm: C_0 (default: the strategy's ``max_grad_norm``). Under per-layer clipping each of the
            L groups starts at C_0/√L.

    Raises:
        DPMisconfigurationError: for arguments out of range, or at setup when the trainer does not use ``DPStrategy``
            or clips with ``"normalized"`` or ``"automatic"`` (whose bound is not a quantile threshold).

    Example:
        >>> from lightning_dp import DPStrategy
        >>> trainer = L.Trainer(  # doctest: +SKIP
        ...     strategy=DPStrategy(target_epsilon=3.0, max_grad_norm=1.0),
        ...     callbacks=[AdaptiveClipping(target_quantile=0.5, learning_rate=0.2)],
        ... )
    """

    def __init__(
        self,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        count_noise_multiplier: float | None = None,
        initial_max_grad_norm: float | None = None,
    ) -> None:
        if not 0.0 < target_quantile < 1.0:
            raise DPMisconfigurationError(f"target_quantile must be in (0, 1), got {target_quantile}.")
        for name, value in (
            ("learning_rate", learning_rate),
            ("count_noise_multiplier", count_noise_multiplier),
            ("initial_max_grad_norm", initial_max_grad_norm),
        ):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise DPMisconfigurationError(f"{name} must be a positive finite number, got {value}.")
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_noise_multiplier = None if count_noise_multiplier is None else float(count_noise_multiplier)
        self.initial_max_grad_norm = None if initial_max_grad_norm is None else float(initial_max_grad_norm)
        self._bound: float | None = None  # C of the next step (flat clipping)
        self._group_bounds: dict[str, float] = {}  # C_l of the next step, by group (per-layer clipping)
        self._updated_step = -1  # the last step whose count moved the bounds
        self._used: tuple[int, float, list[str] | None, list[float] | None] | None = None

    # ------------------------------------------------------------------ what the strategy asks
    def count_noise_std(self, strategy: DPStrategy) -> float:
        """σ_b: the std of the noise on each count (``count_noise_multiplier``, else B/20)."""
        if self.count_noise_multiplier is not None:
            return self.count_noise_multiplier
        return float(strategy.plan.expected_batch_size) / DEFAULT_COUNT_NOISE_DIVISOR

    def dp_release_noise(self, strategy: DPStrategy, step: int) -> list[float]:
        """The noise multiplier of the counts released from every step's batch (the strategy's protocol).

        Returns:
            ``[2σ_b]`` under flat clipping (the centred count moves by at most 1/2); ``[2σ_b/√L]`` under per-layer
            clipping with L groups (L centred counts, each moved by at most 1/2 by one example: L2 sensitivity √L/2).

        Raises:
            RuntimeError: under per-layer clipping before the strategy knows its clipping groups.
        """
        groups = len(strategy.clipping_groups) if strategy.clipping == "per_layer" else 1
        if groups < 1:  # declaring σ_b for L unknown counts would under-charge them
            raise RuntimeError("AdaptiveClipping: the clipping groups are not known before the strategy's setup.")
        return [self.count_noise_std(strategy) / (COUNT_SENSITIVITY * math.sqrt(groups))]

    def dp_clipping_bounds(
        self, strategy: DPStrategy, step: int, groups: Sequence[tuple[str, ...]] | None
    ) -> tuple[float, list[float] | None]:
        """C for step ``step`` and, under per-layer clipping, each group's C_l (the strategy's protocol).

        A group not seen before (the trainable set changed) starts at ``C_0/√L``.
        """
        if groups is None:
            bound = self._current_bound()
            self._used = (step, bound, None, None)
            return bound, None
        start = self._current_bound() / math.sqrt(max(len(groups), 1))
        keys = [_group_key(g) for g in groups]
        bounds = [self._group_bounds.get(k, start) for k in keys]
        total = math.sqrt(sum(b * b for b in bounds))
        self._used = (step, total, keys, bounds)
        return total, bounds

    def _current_bound(self) -> float:
        if self._bound is None:
            raise RuntimeError("AdaptiveClipping has no bound yet: fit sets it up.")
        return self._bound

    @property
    def max_grad_norm(self) -> float | None:
        """C of the next step (under per-layer clipping: C_0 until the groups are known, then sqrt(Σ C_l²))."""
        if self._group_bounds:
            return math.sqrt(sum(b * b for b in self._group_bounds.values()))
        return self._bound

    @property
    def group_max_grad_norms(self) -> dict[str, float]:
        """Under per-layer clipping, C_l of the next step per group (keyed by its parameter names joined by ',')."""
        return dict(self._group_bounds)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the strategy and set C_0 (a restored checkpoint's bounds replace it afterwards)."""
        if stage != "fit":
            return
        strategy = require_dp_strategy(trainer, self)
        if strategy.clipping not in ("flat", "per_layer"):
            raise DPMisconfigurationError(
                f"AdaptiveClipping adapts the bound of flat or per-layer clipping; DPStrategy(clipping="
                f"{strategy.clipping!r}) does not clip at a norm threshold. Use clipping='flat' or 'per_layer'."
            )
        if self._bound is None:
            self._bound = self.initial_max_grad_norm or strategy.max_grad_norm
            notice(
                f"lightning_dp: adaptive clipping from C={self._bound:.4g} to the {self.target_quantile:g}-quantile of"
                f" the per-sample norms (learning rate {self.learning_rate:g}; count noise std"
                f" {'B/20' if self.count_noise_multiplier is None else self.count_noise_multiplier})."
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After a step: release its noised count, move the bound(s), and log the bound the step used."""
        strategy = require_dp_strategy(trainer, self)
        step = strategy.last_release_step
        used = self._used
        if step < 0 or step == self._updated_step or used is None or used[0] != step:
            return
        _, bound, keys, bounds = used
        per_layer = keys is not None and bounds is not None
        thresholds = torch.tensor(bounds if per_layer else [bound], dtype=torch.float64)
        norms = strategy.last_per_group_norms if per_layer else strategy.last_per_sample_norms
        flat = strategy.last_per_sample_norms
        if per_layer and norms is None and flat is not None and flat.numel() > 0:
            raise RuntimeError("AdaptiveClipping: per-layer clipping left no per-group norms for this step.")
        examples = 0 if norms is None else int(norms.shape[0])
        fractions = self._release(strategy, count_below(norms, thresholds) - examples / 2, step)
        moved = [
            quantile_update(c, f, self.target_quantile, self.learning_rate)
            for c, f in zip(thresholds.tolist(), fractions.tolist())
        ]
        if per_layer:
            self._group_bounds.update(zip(keys, moved))
        else:
            self._bound = moved[0]
        self._updated_step = step
        self._log(pl_module, bound, keys, bounds, float(fractions.mean()))

    def _release(self, strategy: DPStrategy, centred: Tensor, step: int) -> Tensor:
        """b̃: the centred counts noised once (rank 0), summed over ranks (one all-reduce), over B, plus 1/2."""
        if strategy.global_rank == 0:
            # the step's "noise" stream: a further call after the gradient's draw gets an independent stream (keyed by
            # its call index), and a fixed noise_seed reproduces it (a resumed run equals an uninterrupted one)
            add_gaussian(centred, self.count_noise_std(strategy), strategy.random_source("noise", step))
        if strategy.world_size > 1:
            centred = sum_over_ranks(strategy, centred.to(strategy.root_device)).cpu()
        return centred / float(strategy.plan.expected_batch_size) + 0.5

    @staticmethod
    def _log(
        pl_module: pl.LightningModule,
        bound: float,
        keys: list[str] | None,
        bounds: list[float] | None,
        fraction: float,
    ) -> None:
        metrics = {"dp/max_grad_norm": bound, "dp/unclipped_fraction": fraction}
        if keys is not None and bounds is not None:
            for key, c in zip(keys, bounds):
                metrics[f"dp/max_grad_norm/{_group_label(key.split(','))}"] = c
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The bounds of the next step (plain numbers), so that a resumed run continues with exactly them."""
        return {
            "max_grad_norm": self._bound,
            "group_max_grad_norms": dict(self._group_bounds),
            "updated_step": self._updated_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the bounds saved by :meth:`state_dict`."""
        bound = state_dict.get("max_grad_norm")
        self._bound = None if bound is None else float(bound)
        self._group_bounds = {str(k): float(v) for k, v in state_dict.get("group_max_grad_norms", {}).items()}
        self._updated_step = int(state_dict.get("updated_step", -1))
        self._used = None
