"""``GradNormHistogram``: a (differentially private) histogram of per-sample gradient norms before clipping.

The norms are computed from private data. With ``private=True`` (the default) each release is a Gaussian mechanism
on counts: one example moves one count by one, so the histogram's L2 sensitivity is 1 and its noise multiplier is
``noise_std``. The strategy accounts it jointly with the gradient release of the same batch (one Gaussian per step,
see ``DPStrategy._extra_noise``), and calibrates σ for it when given ``target_epsilon``. Everything logged (quantiles,
clip fraction, per-class statistics) is post-processing of the noisy counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from lightning_dp.callbacks._utils import require_dp_strategy, sum_over_ranks
from lightning_dp.console import warn
from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.noise import add_gaussian
from lightning_dp.randomness import RandomSource

if TYPE_CHECKING:
    from lightning_dp.strategy import DPStrategy

#: Quantiles of the norm distribution logged as scalars.
QUANTILES = (0.1, 0.5, 0.9)


def geometric_edges(max_grad_norm: float, bins: int = 16, low: float = 0.01, high: float = 100.0) -> list[float]:
    """``bins + 1`` geometric bin edges from ``low·C`` to ``high·C``, with C itself an edge.

    Args:
        max_grad_norm: C, the clipping bound.
        bins: number of bins between the first and the last edge (an even number puts C on a geometric edge; with
            an odd one C is inserted, giving one more bin).
        low: the first edge as a multiple of C.
        high: the last edge as a multiple of C.

    Example:
        >>> [round(e, 3) for e in geometric_edges(1.0, bins=4)]
        [0.01, 0.1, 1.0, 10.0, 100.0]
    """
    if bins < 1:
        raise DPMisconfigurationError(f"bins must be ≥ 1, got {bins}.")
    if not (0 < low < 1 < high and math.isfinite(high)):
        raise DPMisconfigurationError(f"Need 0 < low < 1 < high < inf for the geometric edges, got {low}, {high}.")
    edges = [max_grad_norm * float(x) for x in np.geomspace(low, high, bins + 1)]
    return _with_clip_edge(edges, max_grad_norm)


def import_wandb() -> Any:
    """The ``wandb`` module, imported only when a run logs to W&B.

    Raises:
        ModuleNotFoundError: if wandb is not installed, naming the extra that installs it.
    """
    try:
        import wandb
    except ImportError as err:
        raise ModuleNotFoundError(
            "Logging GradNormHistogram to a WandbLogger needs the `wandb` package, which lightning-dp installs only"
            ' with its extra: pip install "lightning-dp[wandb]" (or pip install wandb).'
        ) from err
    return wandb


def _with_clip_edge(edges: Sequence[float], max_grad_norm: float) -> list[float]:
    """``edges`` with C as an exact edge (replacing an edge within 1e-9 relative of it, else inserted)."""
    out = [e for e in edges if not math.isclose(e, max_grad_norm, rel_tol=1e-9)]
    out.append(float(max_grad_norm))
    return sorted(out)


def bin_counts(norms: Tensor, edges: Tensor) -> Tensor:
    """Counts of ``norms`` in the ``len(edges) + 1`` bins (-inf, e_0], (e_0, e_1], ..., (e_last, inf).

    Bins are closed on the right, so a norm equal to C (an edge) counts as not clipped, as in the strategy. NaN
    norms are dropped (an example then moves no count: the sensitivity stays 1).
    """
    norms = norms.detach().reshape(-1)
    norms = norms[~torch.isnan(norms)]
    idx = torch.bucketize(norms, edges.to(norms.device, norms.dtype), right=False)
    return torch.bincount(idx, minlength=edges.numel() + 1).to(norms.dtype)


def histogram_quantiles(
    counts: Sequence[float] | np.ndarray, edges: Sequence[float], qs: Sequence[float] = QUANTILES
) -> list[float]:
    """Quantiles estimated from (possibly noisy) bin counts.

    Negative counts (noise) are treated as 0. Within a bin the quantile is interpolated geometrically (linearly in
    the first bin, which starts at 0); a quantile in the overflow bin is reported as the last edge, a lower bound.

    Args:
        counts: ``len(edges) + 1`` counts, for the bins of :func:`bin_counts`.
        edges: the finite bin edges, increasing and positive.
        qs: quantile levels in [0, 1].

    Returns:
        One value per level; NaN for all when the (clamped) total is not positive.

    Example:
        >>> histogram_quantiles([0, 2, 2, 0], [1.0, 2.0, 4.0], [0.5])
        [2.0]
    """
    c = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    if c.shape != (len(edges) + 1,):
        raise ValueError(f"Expected {len(edges) + 1} counts for {len(edges)} edges, got shape {c.shape}.")
    total = float(c.sum())
    if not total > 0:
        return [math.nan] * len(qs)
    cum = np.cumsum(c)
    out: list[float] = []
    for q in qs:
        target = q * total
        i = min(int(np.searchsorted(cum, target, side="left")), len(c) - 1)
        while c[i] <= 0 and i > 0:  # land on a bin with mass
            i -= 1
        if i == len(edges):
            out.append(float(edges[-1]))
            continue
        lo = 0.0 if i == 0 else float(edges[i - 1])
        hi = float(edges[i])
        frac = float(np.clip((target - (cum[i] - c[i])) / c[i], 0.0, 1.0)) if c[i] > 0 else 1.0
        out.append(lo + frac * (hi - lo) if lo <= 0 else lo * (hi / lo) ** frac)
    return out


@dataclass(frozen=True)
class NormHistogram:
    """One released histogram of per-sample gradient norms (noisy when ``private``), and what derives from it.

    Attributes:
        step: 0-based index of the optimizer step whose batch it describes.
        edges: the finite bin edges; the counts have one more entry (underflow and overflow bins).
        counts: the released counts (noisy when ``private``: may be negative or fractional).
        max_grad_norm: C (one of the edges).
        private: whether the counts are noised and accounted.
        class_counts: per class, the released number of examples (or None without per-class statistics).
        class_clipped: per class, the released number of clipped examples (‖g‖ > C).
        class_retained: per class, the released sum of min(1, C/‖g‖).
    """

    step: int
    edges: tuple[float, ...]
    counts: np.ndarray
    max_grad_norm: float
    private: bool
    class_counts: np.ndarray | None = None
    class_clipped: np.ndarray | None = None
    class_retained: np.ndarray | None = None

    def quantiles(self, qs: Sequence[float] = QUANTILES) -> list[float]:
        """Quantiles of the norms estimated from the counts (see :func:`histogram_quantiles`)."""
        return histogram_quantiles(self.counts, self.edges, qs)

    def clip_fraction(self) -> float:
        """The share of the (clamped) count mass above C; NaN when the mass is not positive.

        C is an edge when it is the bound the edges were fixed for. When it moved since (e.g. under
        :class:`~lightning_dp.callbacks.AdaptiveClipping`), the mass of the bin holding C is split by the same
        interpolation as :func:`histogram_quantiles` (an estimate); beyond the last edge, the overflow bin's mass is
        reported (an upper bound).
        """
        c = np.clip(self.counts, 0.0, None)
        total = float(c.sum())
        if not total > 0:
            return math.nan
        bound = self.max_grad_norm
        if bound in self.edges:
            k = self.edges.index(bound)  # bins k+1.. hold norms > C
            return float(c[k + 1 :].sum()) / total
        i = int(np.searchsorted(self.edges, bound))  # C lies in bin i: (edges[i-1], edges[i]]
        if i == len(self.edges):
            return float(c[-1]) / total
        lo, hi = (0.0 if i == 0 else float(self.edges[i - 1])), float(self.edges[i])
        below = (bound - lo) / (hi - lo) if lo <= 0 else math.log(bound / lo) / math.log(hi / lo)
        return (float(c[i + 1 :].sum()) + float(c[i]) * (1.0 - below)) / total

    def class_statistics(self, min_count: float = 1.0) -> dict[int, tuple[float, float]]:
        """Per class y: (clip fraction, retained weight w_y(C) = mean of min(1, C/‖g_i‖)), clamped to [0, 1].

        Classes whose released count is below ``min_count`` are left out (the ratio of noisy values is then
        meaningless). Empty without per-class statistics.
        """
        if self.class_counts is None or self.class_clipped is None or self.class_retained is None:
            return {}
        out: dict[int, tuple[float, float]] = {}
        for y, n in enumerate(self.class_counts):
            if n >= min_count:
                clip = float(np.clip(self.class_clipped[y] / n, 0.0, 1.0))
                kept = float(np.clip(self.class_retained[y] / n, 0.0, 1.0))
                out[y] = (clip, kept)
        return out

    def display_edges(self) -> list[float]:
        """Edges for plotting all ``len(counts)`` bins: 0 first, and the overflow bin drawn one geometric step wide."""
        e = list(self.edges)
        last = e[-1] * (e[-1] / e[-2]) if len(e) > 1 else 2.0 * e[-1]
        return [0.0, *e, last]


def _second_element(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    raise DPMisconfigurationError(
        "GradNormHistogram(num_classes=...) reads labels as the second element of a (inputs, labels) batch; this"
        f" batch is a {type(batch).__name__}. Pass `label_getter=lambda batch: ...` returning the label tensor."
    )


class GradNormHistogram(Callback):
    """Log a histogram of per-sample gradient norms before clipping, private by default.

    Every ``log_every_n_steps`` optimizer steps (steps s with ``(s + 1) % n == 0``, Lightning's own logging
    cadence), the norms of that step's logical batch (summed over ranks under DDP) are binned over fixed,
    data-independent edges. With ``private=True`` Gaussian noise of std ``noise_std`` is added to each count once
    (on one rank) and the release is declared to the strategy through :meth:`dp_release_noise`, so it is accounted
    in the ledger together with that step's gradient (and σ calibrated for it under ``target_epsilon``). With
    ``private=False`` the counts are exact and the metrics are prefixed ``nonprivate/``: they are then outside the
    DP guarantee (a warning says so once) and cost no budget.

    Logged, with the prefix ``dp_hist/`` (private) or ``nonprivate/`` (exact):

    - ``grad_norm``: the histogram, to W&B (``wandb.Histogram``) and TensorBoard (``add_histogram_raw``) at the
      same step as Lightning's metrics of that batch. The first bin starts at 0 and the overflow bin (norms above
      the last edge) is drawn one geometric step wide;
    - ``grad_norm_p10``, ``grad_norm_p50``, ``grad_norm_p90``: quantiles estimated from the histogram, and
      ``clip_fraction``, the share of its mass above C, as scalars to every logger;
    - with ``num_classes``: ``class_{y}/clip_fraction`` and ``class_{y}/retained_weight``, the latter
      w_y(C) = (1/n_y) Σ_{i in class y} min(1, C/‖g_i‖). Privately these are ratios of three noised per-class
      vectors (counts, clipped counts, sums of min(1, C/‖g‖)), each of sensitivity 1, noise std
      ``class_noise_std``, declared as three more releases. Classes whose noisy count is below 1 are skipped.

    On global rank 0 the latest release is kept in :attr:`last_release` (a :class:`NormHistogram`; None on other
    ranks). Per-layer norms are not available: the strategy exposes only the flat per-sample norms.

    Args:
        log_every_n_steps: release every this many steps (default: the trainer's ``log_every_n_steps``; 0 turns
            the callback off).
        private: noise the counts and account them (``True``), or log exact counts as a non-private diagnostic.
        noise_std: std of the Gaussian noise on each count (the histogram's noise multiplier: its sensitivity is 1).
        bins: number of geometric bins from C/100 to 100·C (plus the underflow and overflow bins).
        edges: explicit finite bin edges instead (increasing, positive, data-independent); C is added if missing.
        num_classes: turn on per-class statistics for labels in ``0 .. num_classes - 1`` (a fixed number: it must
            not be read from the data).
        class_noise_std: std of the noise on each per-class entry (default: ``noise_std``).
        label_getter: returns the label tensor of a logical batch (default: the batch's second element).

    Raises:
        DPMisconfigurationError: for invalid arguments, or at setup when the trainer does not use ``DPStrategy``.

    Example:
        >>> from lightning_dp import DPStrategy
        >>> trainer = L.Trainer(  # doctest: +SKIP
        ...     strategy=DPStrategy(target_epsilon=3.0, max_grad_norm=1.0),
        ...     callbacks=[GradNormHistogram(noise_std=10.0, num_classes=10)],
        ...     logger=L.pytorch.loggers.WandbLogger(project="dp"),
        ... )
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        private: bool = True,
        noise_std: float = 5.0,
        bins: int = 16,
        edges: Sequence[float] | None = None,
        num_classes: int | None = None,
        class_noise_std: float | None = None,
        label_getter: Callable[[Any], Tensor] | None = None,
    ) -> None:
        if log_every_n_steps is not None and log_every_n_steps < 0:
            raise DPMisconfigurationError(f"log_every_n_steps must be ≥ 0, got {log_every_n_steps}.")
        if private and not (noise_std > 0 and math.isfinite(noise_std)):
            raise DPMisconfigurationError(f"noise_std must be a positive finite number, got {noise_std}.")
        if class_noise_std is not None and not (class_noise_std > 0 and math.isfinite(class_noise_std)):
            raise DPMisconfigurationError(f"class_noise_std must be a positive finite number, got {class_noise_std}.")
        if bins < 1:
            raise DPMisconfigurationError(f"bins must be ≥ 1, got {bins}.")
        if edges is not None:
            e = [float(x) for x in edges]
            if not e or any(not (x > 0 and math.isfinite(x)) for x in e) or any(a >= b for a, b in zip(e, e[1:])):
                raise DPMisconfigurationError(
                    f"edges must be a non-empty, strictly increasing sequence of positive finite numbers, got {edges}."
                )
        if num_classes is not None and num_classes < 1:
            raise DPMisconfigurationError(f"num_classes must be ≥ 1, got {num_classes}.")
        self.log_every_n_steps = log_every_n_steps
        self.private = private
        self.noise_std = float(noise_std)
        self.bins = bins
        self.user_edges = None if edges is None else [float(x) for x in edges]
        self.num_classes = num_classes
        self.class_noise_std = float(class_noise_std) if class_noise_std is not None else self.noise_std
        self.label_getter = label_getter or _second_element
        self.last_release: NormHistogram | None = None
        self._edges: list[float] | None = None
        self._warned = False

    # ------------------------------------------------------------------ the release schedule (public: step only)
    def _every_n(self, strategy: DPStrategy) -> int:
        if self.log_every_n_steps is not None:
            return self.log_every_n_steps
        module = strategy.lightning_module
        trainer = getattr(module, "_trainer", None)
        return trainer.log_every_n_steps if trainer is not None else 50

    def is_release_step(self, strategy: DPStrategy, step: int) -> bool:
        """Whether the batch of step ``step`` (0-based) is histogrammed: ``(step + 1) % n == 0``."""
        n = self._every_n(strategy)
        return n > 0 and (step + 1) % n == 0

    def dp_release_noise(self, strategy: DPStrategy, step: int) -> list[float]:
        """The noise multipliers of the releases made from step ``step``'s batch (the strategy's protocol).

        Returns:
            ``[noise_std]`` for the histogram (sensitivity 1), plus ``[class_noise_std] * 3`` with per-class
            statistics, on release steps of a private histogram; ``[]`` otherwise.
        """
        if not self.private or not self.is_release_step(strategy, step):
            return []
        out = [self.noise_std]
        if self.num_classes is not None:
            out += [self.class_noise_std] * 3
        return out

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the strategy and fix the bin edges."""
        if stage != "fit":
            return
        strategy = require_dp_strategy(trainer, self)
        c = strategy.max_grad_norm
        self._edges = _with_clip_edge(self.user_edges, c) if self.user_edges else geometric_edges(c, self.bins)
        if not self.private and not self._warned:
            self._warned = True
            warn(
                "GradNormHistogram(private=False) logs exact statistics of private per-sample gradients (metrics"
                " `nonprivate/...`): they are outside the DP guarantee and must not be published. Use private=True"
                " for noised, accounted histograms."
            )

    @property
    def edges(self) -> list[float]:
        """The finite bin edges (known after setup)."""
        if self._edges is None:
            raise RuntimeError("GradNormHistogram.edges is known once fit has set the callback up.")
        return list(self._edges)

    @staticmethod
    def noised(values: Tensor, std: float, source: RandomSource) -> Tensor:
        """``values`` (as float64, on the CPU) plus independent N(0, std²) noise per entry from ``source`` (the
        strategy's ``"histogram"`` stream of the release's step: fresh OS entropy per fit, never a global RNG).
        """
        return add_gaussian(values.detach().to("cpu", torch.float64).clone(), std, source)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """On release steps: bin the step's norms, sum over ranks, noise once (rank 0) and log."""
        strategy = require_dp_strategy(trainer, self)
        step = strategy.last_release_step
        if step < 0 or not self.is_release_step(strategy, step):
            return
        release = self._release(strategy, batch, step)
        if release is not None:
            self.last_release = release
            self._log(trainer, release)

    # ------------------------------------------------------------------ internals
    def _release(self, strategy: DPStrategy, batch: Any, step: int) -> NormHistogram | None:
        # Binned on the CPU in float64 (one small copy per release), compared with C exactly as the strategy does.
        norms = strategy.last_per_sample_norms
        norms = torch.zeros(0, dtype=torch.float64) if norms is None else norms.detach().to("cpu", torch.float64)
        edges = self.edges
        stats = [bin_counts(norms, torch.tensor(edges, dtype=torch.float64))]
        if self.num_classes is not None:
            stats += self._class_vectors(strategy, norms, batch)
        sizes = [s.numel() for s in stats]
        summed = torch.cat(stats)
        if strategy.world_size > 1:  # one collective for all statistics, on the device the backend expects
            summed = sum_over_ranks(strategy, summed.to(strategy.root_device)).cpu()
        if strategy.global_rank != 0:
            return None
        parts = list(torch.split(summed, sizes))
        if self.private:
            source = strategy.random_source("histogram", step)
            parts[0] = self.noised(parts[0], self.noise_std, source)
            parts[1:] = [self.noised(p, self.class_noise_std, source) for p in parts[1:]]
        arrays = [p.double().numpy() for p in parts]
        by_class = arrays[1:] if self.num_classes is not None else [None, None, None]
        return NormHistogram(
            step=step,
            edges=tuple(edges),
            counts=arrays[0],
            max_grad_norm=strategy.max_grad_norm,
            private=self.private,
            class_counts=by_class[0],
            class_clipped=by_class[1],
            class_retained=by_class[2],
        )

    def _class_vectors(self, strategy: DPStrategy, norms: Tensor, batch: Any) -> list[Tensor]:
        assert self.num_classes is not None
        labels = torch.as_tensor(self.label_getter(batch)).to(norms.device).reshape(-1)
        if labels.numel() != norms.numel():
            raise DPMisconfigurationError(
                f"GradNormHistogram got {labels.numel()} labels for {norms.numel()} per-sample norms: the labels must"
                " be one per example of the logical batch (check label_getter)."
            )
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DPMisconfigurationError(
                f"GradNormHistogram(num_classes={self.num_classes}) got labels outside 0..{self.num_classes - 1}."
            )
        c = strategy.max_grad_norm
        k = self.num_classes
        counts = torch.bincount(labels, minlength=k).to(norms.dtype)
        clipped = torch.bincount(labels, weights=(norms > c).to(norms.dtype), minlength=k).to(norms.dtype)
        retained = torch.clamp(c / norms.clamp_min(1e-30), max=1.0)
        retained = torch.nan_to_num(retained, nan=0.0)  # a NaN norm keeps 0: its entry moves by at most 1
        kept = torch.zeros(k, dtype=norms.dtype, device=norms.device).index_add_(0, labels, retained)
        return [counts, clipped, kept]

    def _prefix(self) -> str:
        return "dp_hist/" if self.private else "nonprivate/"

    def metrics_of(self, release: NormHistogram) -> dict[str, float]:
        """The scalars logged for ``release`` (NaN values left out)."""
        p = self._prefix()
        metrics = {f"{p}grad_norm_p{round(q * 100)}": v for q, v in zip(QUANTILES, release.quantiles(QUANTILES))}
        metrics[f"{p}clip_fraction"] = release.clip_fraction()
        for y, (clip, kept) in release.class_statistics().items():
            metrics[f"{p}class_{y}/clip_fraction"] = clip
            metrics[f"{p}class_{y}/retained_weight"] = kept
        return {k: v for k, v in metrics.items() if not math.isnan(v)}

    def _log(self, trainer: pl.Trainer, release: NormHistogram) -> None:
        # Lightning logs a step's metrics with step = the number of batches stepped before it: the same index.
        step = release.step
        tag = f"{self._prefix()}grad_norm"
        counts = np.clip(release.counts, 0.0, None)
        display = release.display_edges()
        metrics = self.metrics_of(release)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                hist = import_wandb().Histogram(np_histogram=(counts.tolist(), display))
                logger.experiment.log({tag: hist, "trainer/global_step": step})
            elif isinstance(logger, TensorBoardLogger):
                mids = np.array([(a + b) / 2 for a, b in zip(display, display[1:])])
                logger.experiment.add_histogram_raw(
                    tag,
                    min=display[0],
                    max=display[-1],
                    num=float(counts.sum()),
                    sum=float((counts * mids).sum()),
                    sum_squares=float((counts * mids**2).sum()),
                    bucket_limits=display[1:],
                    bucket_counts=counts.tolist(),
                    global_step=step,
                )
            if metrics:
                logger.log_metrics(metrics, step=step)
