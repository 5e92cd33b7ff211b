"""The record of an accounted search: one :class:`RunResult` per run, the :class:`SearchResult`, its table and plot.

Every run's score in the table, the plot and the loggers is an *operator's diagnostic*: the search's ε covers what
it releases — the best run's model, configuration and score — not the scores of the other runs (publishing those
would release every run, which the Papernot–Steinke bound does not cover).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunResult:
    """One finished run of a search.

    Attributes:
        index: the run's position (0-based) in the drawn sequence.
        config: the configuration the run trained.
        score: the selection score (noisy for a private selection).
        noise_multiplier: σ of the run's DP-SGD steps.
        sample_rate: q of the run.
        steps: the optimizer steps the run took.
        cpu_seconds: the process CPU time the run took.
    """

    index: int
    config: dict[str, Any]
    score: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    cpu_seconds: float = 0.0


@dataclass
class SearchResult:
    """What an accounted search releases, and the operator's record of its runs.

    Attributes:
        released: False when no run was drawn (K = 0): nothing is released.
        config: the best run's configuration (released).
        score: the best run's selection score (released).
        epsilon: ε of the whole search at ``delta`` (``search_epsilon`` of its runs), the one number to publish.
        delta: δ of the whole search.
        selection: ``"private"`` (noisy score on a private validation split) or ``"public"`` (score on a public split).
        runs_drawn: K, the number of runs drawn.
        runs: every finished run (operator's diagnostic, not released).
        model: the best run's model (``None`` when nothing is released).
        checkpoint: the file holding the best model's ``state_dict``.
        table: the CSV table of the runs; ``markdown``: the same as a markdown table.
        plot: the PNG of the scores (``None`` without matplotlib).
    """

    released: bool
    config: dict[str, Any] | None
    score: float | None
    epsilon: float
    delta: float
    selection: str
    runs_drawn: int
    runs: list[RunResult] = field(default_factory=list)
    model: Any = None
    checkpoint: Path | None = None
    table: Path | None = None
    markdown: Path | None = None
    plot: Path | None = None

    def summary(self) -> str:
        """One paragraph: what is released and its ε."""
        if not self.released:
            return (
                f"The search drew {self.runs_drawn} runs: nothing is released (ε = {self.epsilon:.4g} at"
                f" δ = {self.delta:g} is the guarantee of the search as declared)."
            )
        return (
            f"Released: the best of {self.runs_drawn} runs ({self.selection} selection), config {self.config},"
            f" score {self.score:.4g}; ε = {self.epsilon:.4g} at δ = {self.delta:g} for the whole search."
        )


def write_table(runs: Sequence[RunResult], best: int | None, csv_path: Path, markdown_path: Path) -> None:
    """Write the runs as CSV and as a markdown table (the best marked)."""
    keys = sorted({k for r in runs for k in r.config})
    head = ["run", *keys, "sigma", "q", "steps", "score", "cpu_s", "best"]
    rows = [
        [r.index, *(r.config.get(k, "") for k in keys), f"{r.noise_multiplier:.5g}", f"{r.sample_rate:.5g}",
         r.steps, f"{r.score:.5g}", f"{r.cpu_seconds:.1f}", "yes" if r.index == best else ""]
        for r in runs
    ]  # fmt: skip
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head)
        writer.writerows(rows)
    lines = [
        "<!-- every run's score is an operator's diagnostic: only the best run is released under the search's ε -->",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(str(v) for v in row) + " |" for row in rows),
    ]
    markdown_path.write_text("\n".join(lines) + "\n")


def plot_scores(runs: Sequence[RunResult], best: int | None, path: Path, title: str) -> Path | None:
    """The selection score of every run, the best circled; ``None`` when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r.index for r in runs], [r.score for r in runs], "o")
    for r in runs:
        if r.index == best:
            ax.plot([r.index], [r.score], "o", markersize=14, markerfacecolor="none", color="k")
    ax.set_xlabel("run")
    ax.set_ylabel("selection score")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["RunResult", "SearchResult", "plot_scores", "write_table"]
