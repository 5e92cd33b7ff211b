r"""Choosing the batch size under a fixed epoch budget from the cumulative DP noise σ√T (Rehn et al., arXiv:2510.20616).

For a target (ε, δ), a dataset of N examples and E epochs, each candidate expected batch size B fixes the sample
rate q = B/N, the number of steps T = E·⌈N/B⌉ (as :class:`~lightning_dp.DPStrategy` plans them) and, by calibration,
the noise multiplier σ. Two noise figures follow:

- the *effective noise* σ·C/B, the noise std on one averaged gradient step: it always favours the largest B and is a
  poor guide;
- the *cumulative noise* σ·√T: it falls steeply with B at loose ε and is nearly flat (a plateau) at tight ε.

The rule of Rehn et al.: train for at least a minimum number of steps (about 20 in their CIFAR-100/ViT-Tiny runs),
then take the smallest B on the σ√T plateau. :func:`advise_batch_size` applies it; ``python -m lightning_dp.tuning``
prints the table and draws the curves::

    python -m lightning_dp.tuning --epsilon 1 8 --delta 1e-5 --num-samples 25000 --epochs 8 \
        --batch-sizes 64 128 256 512 1024 2048 4096 8192 --plot batch_size_advice.png

σ comes from :func:`lightning_dp.accounting.calibrate_noise_multiplier`, the same calibration the strategy runs.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_dp.accounting import calibrate_noise_multiplier
from lightning_dp.errors import DPMisconfigurationError

#: Minimum number of optimizer steps before a batch size is considered (Rehn et al.: ~20 for CIFAR-100/ViT-Tiny).
DEFAULT_MIN_STEPS = 20
#: A batch size is on the plateau when its σ√T is within this fraction of the lowest σ√T among eligible sizes.
DEFAULT_PLATEAU_TOLERANCE = 0.05


@dataclass(frozen=True)
class BatchSizeOption:
    """The privacy figures of one candidate batch size.

    Attributes:
        batch_size: B, the expected logical batch size.
        sample_rate: q = B / N.
        steps: T = epochs · ⌈N / B⌉.
        noise_multiplier: σ calibrated for (ε, δ, q, T).
        cumulative_noise: σ·√T.
        effective_noise: σ·C / B.
        enough_steps: T ≥ the minimum number of steps.
        on_plateau: eligible and σ√T within the tolerance of the lowest eligible σ√T.
    """

    batch_size: int
    sample_rate: float
    steps: int
    noise_multiplier: float
    cumulative_noise: float
    effective_noise: float
    enough_steps: bool
    on_plateau: bool


@dataclass(frozen=True)
class BatchSizeAdvice:
    """The result of :func:`advise_batch_size`: one :class:`BatchSizeOption` per candidate and the recommendation.

    Attributes:
        epsilon: target ε.
        delta: δ.
        num_samples: N.
        epochs: the epoch budget E.
        max_grad_norm: C used for the effective noise.
        min_steps: the minimum number of steps.
        plateau_tolerance: the relative tolerance defining the plateau.
        options: the candidates, by increasing batch size.
        recommended: the smallest batch size on the plateau.
        seconds: wall-clock seconds the calibrations took.
    """

    epsilon: float
    delta: float
    num_samples: int
    epochs: int
    max_grad_norm: float
    min_steps: int
    plateau_tolerance: float
    options: tuple[BatchSizeOption, ...]
    recommended: BatchSizeOption
    seconds: float = field(default=0.0, compare=False)

    def table(self) -> str:
        """The options as a plain-text table, the recommendation marked with ``<-``."""
        head = f"{'B':>7} {'q':>9} {'T':>7} {'sigma':>9} {'sigma*sqrt(T)':>14} {'sigma*C/B':>11}  note"
        lines = [
            f"ε={self.epsilon:g}, δ={self.delta:g}, N={self.num_samples}, epochs={self.epochs},"
            f" C={self.max_grad_norm:g}"
            f" (min steps {self.min_steps}, plateau: within {100 * self.plateau_tolerance:g}% of the lowest σ√T)",
            head,
        ]
        for o in self.options:
            note = "" if o.enough_steps else f"T < {self.min_steps}"
            if o.on_plateau:
                note = "plateau"
            if o is self.recommended:
                note += " <- recommended"
            lines.append(
                f"{o.batch_size:>7} {o.sample_rate:>9.4g} {o.steps:>7} {o.noise_multiplier:>9.4g}"
                f" {o.cumulative_noise:>14.4g} {o.effective_noise:>11.3e}  {note}".rstrip()
            )
        return "\n".join(lines)


def advise_batch_size(
    epsilon: float,
    delta: float,
    num_samples: int,
    epochs: int,
    batch_sizes: Sequence[int],
    *,
    max_grad_norm: float = 1.0,
    min_steps: int = DEFAULT_MIN_STEPS,
    plateau_tolerance: float = DEFAULT_PLATEAU_TOLERANCE,
) -> BatchSizeAdvice:
    """σ, T, σ√T and σC/B for each candidate batch size, and the smallest batch size on the σ√T plateau.

    Among the candidates with at least ``min_steps`` steps, the plateau is the set whose σ√T is within
    ``plateau_tolerance`` of the lowest; the recommendation is its smallest batch size.

    Args:
        epsilon: the target ε of the whole run.
        delta: δ.
        num_samples: N, the size of the private training set.
        epochs: the fixed epoch budget E (T = E·⌈N/B⌉ steps, as ``DPStrategy`` plans a ``max_epochs`` run).
        batch_sizes: the candidate expected batch sizes (1 ≤ B ≤ N).
        max_grad_norm: C, for the effective noise σC/B (1.0 gives σ/B, the normalised-clipping form).
        min_steps: the minimum number of optimizer steps.
        plateau_tolerance: relative tolerance of the plateau (0.05: within 5% of the lowest eligible σ√T).

    Returns:
        A :class:`BatchSizeAdvice`.

    Raises:
        DPMisconfigurationError: for an empty or out-of-range candidate list, non-positive N or epochs, or when no
            candidate reaches ``min_steps`` steps.
        PrivacyTargetError: if ε cannot be reached for some candidate (see ``calibrate_noise_multiplier``).

    Example:
        >>> advice = advise_batch_size(1.0, 1e-5, 25_000, 8, [256, 512, 1024, 2048])  # doctest: +SKIP
        >>> advice.recommended.batch_size  # doctest: +SKIP
        512
    """
    if num_samples < 1 or epochs < 1:
        raise DPMisconfigurationError(f"num_samples and epochs must be positive, got {num_samples} and {epochs}.")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes:
        raise DPMisconfigurationError("Give at least one candidate batch size.")
    if sizes[0] < 1 or sizes[-1] > num_samples:
        raise DPMisconfigurationError(
            f"Batch sizes must be between 1 and num_samples={num_samples}; got {sizes[0]}..{sizes[-1]}."
        )
    if not max_grad_norm > 0 or not plateau_tolerance >= 0 or min_steps < 1:
        raise DPMisconfigurationError("max_grad_norm must be > 0, plateau_tolerance ≥ 0 and min_steps ≥ 1.")
    # T as DPStrategy plans a max_epochs run: ⌈N/B⌉ Poisson batches per epoch.
    plan = [(b, b / num_samples, epochs * math.ceil(num_samples / b)) for b in sizes]
    if all(steps < min_steps for _, _, steps in plan):
        raise DPMisconfigurationError(
            f"No candidate batch size gives at least min_steps={min_steps} steps in {epochs} epochs of"
            f" {num_samples} examples: add smaller batch sizes or lower min_steps."
        )
    start = time.perf_counter()
    raw = [(b, q, steps, calibrate_noise_multiplier(epsilon, delta, q, steps)) for b, q, steps in plan]
    best = min(sigma * math.sqrt(t) for _, _, t, sigma in raw if t >= min_steps)
    options = tuple(
        BatchSizeOption(
            batch_size=b,
            sample_rate=q,
            steps=t,
            noise_multiplier=sigma,
            cumulative_noise=sigma * math.sqrt(t),
            effective_noise=sigma * max_grad_norm / b,
            enough_steps=t >= min_steps,
            on_plateau=t >= min_steps and sigma * math.sqrt(t) <= best * (1 + plateau_tolerance),
        )
        for b, q, t, sigma in raw
    )
    recommended = next(o for o in options if o.on_plateau)
    return BatchSizeAdvice(
        epsilon=float(epsilon),
        delta=float(delta),
        num_samples=int(num_samples),
        epochs=int(epochs),
        max_grad_norm=float(max_grad_norm),
        min_steps=int(min_steps),
        plateau_tolerance=float(plateau_tolerance),
        options=options,
        recommended=recommended,
        seconds=time.perf_counter() - start,
    )


def plot_advice(advice: BatchSizeAdvice | Sequence[BatchSizeAdvice], path: str | Path) -> Path:
    """Draw σ√T and σC/B over the batch size (one curve per ε) into a PNG; the recommendation is circled.

    Args:
        advice: one or several results of :func:`advise_batch_size` (e.g. one per ε).
        path: the PNG file to write.

    Returns:
        The path written.

    Raises:
        ModuleNotFoundError: if matplotlib is not installed (``pip install matplotlib``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "Plotting the batch-size advice needs matplotlib: pip install matplotlib (or pip install"
            " 'lightning-dp[dev]'). The table (BatchSizeAdvice.table()) needs nothing more."
        ) from err
    advices = [advice] if isinstance(advice, BatchSizeAdvice) else list(advice)
    fig, (ax_cum, ax_eff) = plt.subplots(1, 2, figsize=(11, 4.2))
    for a in advices:
        bs = [o.batch_size for o in a.options]
        label = f"ε={a.epsilon:g}"
        (line,) = ax_cum.plot(bs, [o.cumulative_noise for o in a.options], "o-", label=label)
        few = [o for o in a.options if not o.enough_steps]
        if few:
            ax_cum.plot(
                [o.batch_size for o in few],
                [o.cumulative_noise for o in few],
                "x",
                color=line.get_color(),
                markersize=9,
            )
        r = a.recommended
        ax_cum.plot([r.batch_size], [r.cumulative_noise], "o", markersize=14, markerfacecolor="none", color="k")
        ax_cum.annotate(f"B={r.batch_size}", (r.batch_size, r.cumulative_noise), textcoords="offset points",
                        xytext=(6, 8), fontsize=8)  # fmt: skip
        ax_eff.plot(bs, [o.effective_noise for o in a.options], "o-", label=label, color=line.get_color())
    first = advices[0]
    ax_cum.set_title(f"cumulative noise σ√T  (N={first.num_samples}, {first.epochs} epochs)")
    ax_eff.set_title(f"effective noise σC/B  (C={first.max_grad_norm:g})")
    for ax in (ax_cum, ax_eff):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("expected batch size B")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_eff.set_yscale("log")
    ax_cum.text(
        0.01, 0.01, f"circle: smallest B on the plateau with T ≥ {first.min_steps}; x: fewer steps",
        transform=ax_cum.transAxes, fontsize=7, va="bottom",
    )  # fmt: skip
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _default_batch_sizes(num_samples: int) -> list[int]:
    """Powers of two from 16 to N (and N itself: full batch)."""
    sizes = [2**k for k in range(4, 40) if 2**k < num_samples]
    return sizes + [num_samples]


def main(argv: Sequence[str] | None = None) -> list[BatchSizeAdvice]:
    """The command line: ``python -m lightning_dp.tuning --help``."""
    p = argparse.ArgumentParser(
        prog="python -m lightning_dp.tuning",
        description="Batch-size advisor for DP training under a fixed epoch budget: σ, T, σ√T and σC/B per batch"
        " size, and the smallest batch size on the σ√T plateau (Rehn et al., arXiv:2510.20616).",
    )
    p.add_argument("--epsilon", type=float, nargs="+", required=True, help="target ε (several: one table each)")
    p.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
    p.add_argument("--num-samples", type=int, required=True, help="N, the private training set size")
    p.add_argument("--epochs", type=int, required=True, help="the fixed epoch budget")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="candidate batch sizes (default: 16, 32, ... and N)")
    p.add_argument("--clip", type=float, default=1.0, help="C for the effective noise σC/B (default 1)")
    p.add_argument("--min-steps", type=int, default=DEFAULT_MIN_STEPS, help="minimum number of steps (default 20)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_PLATEAU_TOLERANCE, help="plateau tolerance (0.05)")
    p.add_argument("--plot", type=Path, help="write the curves to this PNG (needs matplotlib)")
    p.add_argument("--csv", type=Path, help="write the table to this CSV")
    args = p.parse_args(argv)
    sizes = args.batch_sizes or _default_batch_sizes(args.num_samples)
    advices = []
    for eps in args.epsilon:
        a = advise_batch_size(
            eps, args.delta, args.num_samples, args.epochs, sizes,
            max_grad_norm=args.clip, min_steps=args.min_steps, plateau_tolerance=args.tolerance,
        )  # fmt: skip
        print(a.table())
        print(f"recommended B = {a.recommended.batch_size}  ({len(a.options)} calibrations in {a.seconds:.1f} s)\n")
        advices.append(a)
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epsilon", "delta", "num_samples", "epochs", *BatchSizeOption.__dataclass_fields__,
                             "recommended"])  # fmt: skip
            for a in advices:
                for o in a.options:
                    writer.writerow([a.epsilon, a.delta, a.num_samples, a.epochs, *vars(o).values(),
                                     o is a.recommended])  # fmt: skip
        print(f"wrote {args.csv}")
    if args.plot:
        print(f"wrote {plot_advice(advices, args.plot)}")
    return advices


if __name__ == "__main__":
    main()
