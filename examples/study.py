"""A small reproduction study of DP transfer learning on CIFAR-10 (or any ImageFolder tree), on CPU.

Public/private split: a tiny ViT is pretrained without privacy on the public classes (default 0-4), then fine-tuned
with DP on a subset of the private classes (default 5-9) under a fixed epoch budget. Stages:

- ``pretrain``: non-private pretraining on the public classes; writes ``OUT/public.ckpt`` (a Lightning checkpoint,
  loaded by the later stages through ``TransferModule(checkpoint=...)`` with a new head).
- ``grid``: full fine-tuning over ε × B × C (Rehn et al., arXiv:2510.20616): does tight ε favour small B and a large
  C, and does the cumulative noise σ√T predict the winning B?
- ``methods``: at one (B, C), per ε: linear probing (``head``), FiLM (``norm+head``, zero head), full fine-tuning
  (``all``), LP-FT (Ke et al., arXiv:2402.18905) and SPARTA sparse fine-tuning (Makni et al., arXiv:2503.12822).
- ``baselines``: non-private full fine-tuning from the public weights, and non-private training from scratch.
- ``plots``: ``grid.csv``, ``methods.csv``, ``heatmap.png``, ``per_class.png``, ``methods.png``, ``advisor.png`` and
  ``summary.md`` from the results.
- ``all``: every stage in order.

Every run appends one JSON line to ``OUT/results.jsonl``; a stage skips the runs already there, so an interrupted
study resumes where it stopped. ``--jobs 2`` runs two trainings at once (one thread each).

    python examples/study.py all --data ../shared/data/cifar10 --out runs/study --jobs 2

The per-class retained weight w_y(C) = mean over the class-y examples of min(1, C/‖g_i‖) is computed from the
per-sample gradient norms of the private training batches (``DPStrategy.last_per_sample_norms``), without noise:
it is a non-private diagnostic, outside the DP guarantee, as is any statistic of the private training data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vit_transfer import ImageDataModule, TransferModule  # noqa: E402

from lightning_dp import DPStrategy  # noqa: E402
from lightning_dp.finetune import LinearProbeThenFineTune, SparseFineTuning  # noqa: E402

METHODS = ("head", "norm+head", "all", "lpft", "sparta")

# ---------------------------------------------------------------------------------------------------- data

_DATA: dict[tuple, TensorDataset] = {}


def _materialise(dataset: Any) -> TensorDataset:
    """Decode every image once (the same transform as ``ImageDataModule``) into tensors."""
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=500):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def load_split(args: argparse.Namespace, part: str) -> TensorDataset:
    """``part``: ``public_train``, ``public_test``, ``private_train`` or ``private_test`` (cached per process)."""
    key = (args.data, part, args.img_size, args.public_size, args.private_size, tuple(args.public_classes),
           tuple(args.private_classes))  # fmt: skip
    if key not in _DATA:
        public = part.startswith("public")
        dm = ImageDataModule(
            dataset="imagefolder",
            data_dir=args.data,
            img_size=args.img_size,
            classes=list(args.public_classes if public else args.private_classes),
            train_size=args.public_size if public else args.private_size,
            subset_seed=args.subset_seed,
        )
        dm.setup("fit")
        _DATA[key] = _materialise(dm.train_set if part.endswith("train") else dm.test_set)
    return _DATA[key]


# ---------------------------------------------------------------------------------------------------- runs


class RetainedWeight(L.Callback):
    """w_y(C) = mean over the class-y examples of the private batches of min(1, C/‖g_i‖), over the whole run.

    A non-private diagnostic: it is computed from private per-sample gradient norms without noise.
    """

    def __init__(self, num_classes: int) -> None:
        self.total = torch.zeros(num_classes, dtype=torch.float64)
        self.count = torch.zeros(num_classes, dtype=torch.float64)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        norms = trainer.strategy.last_per_sample_norms
        y = batch[1]
        if norms is None or len(norms) != len(y) or len(y) == 0:
            return
        clip = trainer.strategy.max_grad_norm
        factor = (clip / norms.detach().double().cpu().clamp_min(1e-12)).clamp(max=1.0)
        self.total.index_add_(0, y.cpu(), factor)
        self.count.index_add_(0, y.cpu(), torch.ones_like(factor))

    def weights(self) -> list[float]:
        return (self.total / self.count.clamp_min(1)).tolist()


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"patch_size": args.patch, "depth": args.depth, "embed_dim": args.embed_dim, "num_heads": args.heads}


def _trainer(args: argparse.Namespace, epochs: int, strategy: Any, callbacks: list) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def _test(trainer: L.Trainer, module: TransferModule, test: TensorDataset, num_classes: int) -> dict[str, Any]:
    metrics = trainer.test(module, DataLoader(test, batch_size=500), verbose=False)[0]
    return {
        "accuracy": metrics["test/acc"],
        "per_class": [metrics[f"test/acc_class_{y}"] for y in range(num_classes)],
    }


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Non-private pretraining on the public classes; saves ``OUT/public.ckpt``."""
    cpu, wall = time.process_time(), time.time()
    L.seed_everything(args.seed, verbose=False)
    train, test = load_split(args, "public_train"), load_split(args, "public_test")
    k = len(args.public_classes)
    module = TransferModule(
        num_classes=k, img_size=args.img_size, lr=args.pretrain_lr, model_kwargs=_model_kwargs(args)
    )
    trainer = _trainer(args, args.pretrain_epochs, "auto", [])
    trainer.fit(module, DataLoader(train, batch_size=args.pretrain_batch, shuffle=True))
    trainer.save_checkpoint(Path(args.out) / "public.ckpt")
    row = {"id": "pretrain", "stage": "pretrain", **_test(trainer, module, test, k)}
    row.update(epochs=args.pretrain_epochs, num_samples=len(train))
    return {**row, "cpu_seconds": time.process_time() - cpu, "seconds": time.time() - wall}


def run_point(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """One fine-tuning run of the private classes; ``spec``: stage, method, epsilon (None: non-private), batch,
    clip, pretrained."""
    torch.set_num_threads(1)
    cpu, wall = time.process_time(), time.time()
    L.seed_everything(spec["seed"], verbose=False)
    train, test = load_split(args, "private_train"), load_split(args, "private_test")
    k = len(args.private_classes)
    method, batch, eps = spec["method"], spec["batch"], spec["epsilon"]
    lr = args.lr * math.sqrt(batch / 256)  # DP-Adam's best learning rate grows roughly with √B (Rehn et al.)
    callbacks: list[L.Callback] = []
    finetune = method if method in ("head", "norm+head", "all") else "all"
    if method == "lpft":
        callbacks.append(LinearProbeThenFineTune(probe_fraction=args.probe_fraction, split="steps"))
    elif method == "sparta":
        callbacks.append(SparseFineTuning(warmup_epochs=1, selection_epochs=1, keep_fraction=args.keep_fraction))
    module = TransferModule(
        num_classes=k,
        img_size=args.img_size,
        checkpoint=str(Path(args.out) / "public.ckpt") if spec["pretrained"] else None,
        finetune=finetune,
        zero_init_head=method == "norm+head",
        lr=lr,
        model_kwargs=_model_kwargs(args),
    )
    strategy: Any = "auto"
    if eps is not None:
        strategy = DPStrategy(
            target_epsilon=eps,
            target_delta=args.delta,
            max_grad_norm=spec["clip"],
            max_physical_batch_size=args.physical_batch,
        )
        callbacks.append(RetainedWeight(k))
    trainer = _trainer(args, args.epochs, strategy, callbacks)
    trainer.fit(module, DataLoader(train, batch_size=batch, shuffle=True))
    row = {**spec, "lr": lr, "num_samples": len(train)}
    row.update(_test(trainer, module, test, k))
    if eps is not None:
        sigma, planned = strategy.noise_multiplier, strategy.planned_steps
        row.update(
            noise_multiplier=sigma,
            sample_rate=strategy.sample_rate,
            steps=strategy.ledger.steps,
            epsilon_spent=strategy.epsilon,
            cumulative_noise=sigma * math.sqrt(planned),
            effective_noise=sigma * spec["clip"] / batch,
            retained_weight=callbacks[-1].weights(),
        )
    row.update(cpu_seconds=time.process_time() - cpu, seconds=time.time() - wall)
    return row


def _point_id(spec: dict[str, Any]) -> str:
    eps = "nonprivate" if spec["epsilon"] is None else f"eps{spec['epsilon']:g}"
    init = "" if spec["pretrained"] else "-scratch"
    seed = f":seed{spec['seed']}" if spec["seed"] else ""
    return f"{spec['stage']}:{spec['method']}{init}:{eps}:B{spec['batch']}:C{spec['clip']:g}:E{spec['epochs']}{seed}"


def specs(args: argparse.Namespace, stage: str) -> list[dict[str, Any]]:
    """The runs of a stage."""
    out = []
    if stage == "grid":
        for eps in args.epsilon:
            for batch in args.batch:
                for clip in args.clip:
                    out.append({"stage": "grid", "method": "all", "epsilon": eps, "batch": batch, "clip": clip,
                                "pretrained": True})  # fmt: skip
    elif stage == "methods":
        for eps in args.methods_epsilon:
            for method in args.methods:
                out.append({"stage": "methods", "method": method, "epsilon": eps, "batch": args.methods_batch,
                            "clip": args.methods_clip, "pretrained": True})  # fmt: skip
    elif stage == "baselines":
        for pretrained in (True, False):
            out.append({"stage": "baselines", "method": "all", "epsilon": None, "batch": args.methods_batch,
                        "clip": 0.0, "pretrained": pretrained})  # fmt: skip
    for spec in out:
        spec.update(epochs=args.epochs, seed=args.seed)
        spec["id"] = _point_id(spec)
    return out


_RUN_KEYS = ("method", "epsilon", "batch", "clip", "pretrained", "epochs", "seed")


def _done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: {"seed": 0, **r} for r in rows}


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    summary = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in row.items()
        if k in ("id", "accuracy", "noise_multiplier", "steps", "epsilon_spent", "cpu_seconds")
    )
    print(summary, flush=True)


def _worker(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """One run, quiet (a worker process, or in-process without a pool: the logging and warning state is restored)."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            return run_point(args, spec)
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def run_stage(args: argparse.Namespace, stage: str, pool: ProcessPoolExecutor | None = None) -> None:
    """Run the missing runs of ``stage`` (in ``pool`` if given), appending each result as it completes."""
    results = Path(args.out) / "results.jsonl"
    if stage == "pretrain":
        if "pretrain" not in _done(results) or not (Path(args.out) / "public.ckpt").exists():
            _append(results, pretrain(args))
        return
    if not (Path(args.out) / "public.ckpt").exists():
        raise FileNotFoundError(f"{Path(args.out) / 'public.ckpt'} is missing: run the 'pretrain' stage first.")
    done = _done(results)
    todo = []
    for spec in specs(args, stage):
        if spec["id"] in done:
            continue
        same = next((r for r in done.values() if all(r.get(k) == spec[k] for k in _RUN_KEYS)), None)
        if same is not None:  # the same training already ran in another stage: reuse it
            _append(results, {**same, "stage": spec["stage"], "id": spec["id"], "reused_from": same["id"]})
        else:
            todo.append(spec)
    if pool is None:
        for spec in todo:
            _append(results, _worker(args, spec))
        return
    for future in as_completed([pool.submit(_worker, args, spec) for spec in todo]):
        _append(results, future.result())


# ---------------------------------------------------------------------------------------------------- report


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import csv

    if not rows:
        return
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("per_class", "retained_weight")]
    k = len(rows[0]["per_class"])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys + [f"acc_class_{y}" for y in range(k)] + [f"w_class_{y}" for y in range(k)])
        for r in rows:
            w = r.get("retained_weight") or [""] * k
            writer.writerow([r.get(key, "") for key in keys] + [f"{a:.4f}" for a in r["per_class"]] + list(w))


def _per_class_plot(grid: list[dict], names: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    epsilons = sorted({r["epsilon"] for r in grid})
    fig, axes = plt.subplots(len(epsilons), 2, figsize=(12, 3.6 * len(epsilons)), squeeze=False)
    for i, eps in enumerate(epsilons):
        rows = [r for r in grid if r["epsilon"] == eps]
        best = max(rows, key=lambda r: r["accuracy"])["batch"]
        rows = sorted((r for r in rows if r["batch"] == best), key=lambda r: r["clip"])
        width = 0.8 / len(rows)
        for j, r in enumerate(rows):
            xs = [y + (j - (len(rows) - 1) / 2) * width for y in range(len(names))]
            axes[i][0].bar(xs, r["per_class"], width, label=f"C={r['clip']:g} (acc {r['accuracy']:.3f})")
            axes[i][1].bar(xs, r["retained_weight"], width, label=f"C={r['clip']:g}")
        for ax, title in ((axes[i][0], "test accuracy per class"), (axes[i][1], "retained weight w_y(C)")):
            ax.set_xticks(range(len(names)), names)
            ax.set_title(f"{title}  (ε={eps:g}, B={best})")
            ax.set_ylim(0, 1.05)
            ax.legend(fontsize=8)
    axes[-1][1].set_xlabel("w_y(C): mean of min(1, C/‖g_i‖) over class y in the private batches (non-private)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _methods_plot(methods: list[dict], baselines: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    epsilons = sorted({r["epsilon"] for r in methods})
    names = [m for m in METHODS if any(r["method"] == m for r in methods)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(epsilons), 1)
    for j, eps in enumerate(epsilons):
        by_method = {r["method"]: r for r in methods if r["epsilon"] == eps}
        acc = [by_method[m]["accuracy"] if m in by_method else float("nan") for m in names]
        std = [by_method[m].get("accuracy_std", 0.0) if m in by_method else 0.0 for m in names]
        seeds = max(r.get("seeds", 1) for r in by_method.values())
        xs = [i + (j - (len(epsilons) - 1) / 2) * width for i in range(len(names))]
        label = f"ε={eps:g}" + (f" (mean ± std of {seeds} seeds)" if seeds > 1 else "")
        bars = ax.bar(xs, acc, width, yerr=std if seeds > 1 else None, capsize=3, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=6 if seeds > 1 else 0)
    for r, style in zip(sorted(baselines, key=lambda r: not r["pretrained"]), ("--", ":")):
        label = "non-private, " + ("public weights" if r["pretrained"] else "from scratch")
        ax.axhline(r["accuracy"], linestyle=style, color="k", label=f"{label} ({r['accuracy']:.3f})")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"fine-tuning methods (B={methods[0]['batch']}, C={methods[0]['clip']:g}, {methods[0]['epochs']} ep.)")
    ax.set_ylim(0, min(1.0, max(r["accuracy"] for r in methods + baselines) + 0.15))
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _average_seeds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (stage and run keys): accuracies and w_y averaged over seeds, with ``seeds`` and
    ``accuracy_std`` (0 for one seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r["stage"], *(r.get(k) for k in _RUN_KEYS if k != "seed"))
        groups.setdefault(key, []).append(r)
    rows = []
    for group in groups.values():
        row = dict(group[0])
        acc = torch.tensor([r["accuracy"] for r in group], dtype=torch.float64)
        row["accuracy"] = acc.mean().item()
        row["accuracy_std"] = acc.std().item() if len(group) > 1 else 0.0
        row["seeds"] = len(group)
        for key in ("cpu_seconds", "seconds"):
            if key in row:
                row[key] = sum(r.get(key, 0.0) for r in group) / len(group)
        for key in ("per_class", "retained_weight"):
            if row.get(key) is not None:
                row[key] = torch.tensor([r[key] for r in group], dtype=torch.float64).mean(0).tolist()
        rows.append(row)
    return rows


def _std(row: dict[str, Any]) -> float | str:
    """The seed standard deviation of a row's accuracy, "-" for one seed."""
    return row["accuracy_std"] if row["seeds"] > 1 else "-"


def report(args: argparse.Namespace) -> None:
    """CSV files, figures and ``summary.md`` from ``results.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    from sweep_cb import heatmaps

    from lightning_dp.tuning import advise_batch_size, plot_advice

    out = Path(args.out)
    runs = list(_done(out / "results.jsonl").values())
    rows = _average_seeds(runs)
    grid = [r for r in rows if r.get("stage") == "grid"]
    methods = [r for r in rows if r.get("stage") == "methods"]
    baselines = [r for r in rows if r.get("stage") == "baselines"]
    names = ImageDataModule(dataset="imagefolder", data_dir=args.data, classes=list(args.private_classes)).class_names
    lines = ["# Study results", ""]
    # one row per training: a run reused by another stage has the same run keys (older results lack "reused_from")
    trained = list({(r["stage"],) if r["stage"] == "pretrain" else tuple(r.get(k) for k in _RUN_KEYS): r
                    for r in runs}.values())  # fmt: skip
    total_cpu = sum(r.get("cpu_seconds", 0.0) for r in trained)
    total_wall = sum(r.get("seconds", 0.0) for r in trained)
    lines.append(
        f"{len(trained)} trainings, {total_cpu / 60:.1f} CPU-minutes in the runs, {total_wall / 60:.1f} minutes of"
        " run time (summed over runs; parallel jobs overlap)."
    )
    pre = [r for r in rows if r.get("stage") == "pretrain"]
    if pre:
        lines.append(f"Public pretraining: test accuracy {pre[0]['accuracy']:.3f} on the public classes"
                     f" ({pre[0]['epochs']} epochs, N={pre[0]['num_samples']}).")  # fmt: skip
    if grid:
        _write_csv(grid, out / "grid.csv")
        hm = [
            {"epsilon_target": r["epsilon"], "epochs": r["epochs"], "clip": r["clip"], "batch": r["batch"],
             "accuracy": r["accuracy"], "effective_noise": r["effective_noise"],
             "cumulative_noise": r["cumulative_noise"]}
            for r in grid
        ]  # fmt: skip
        clips, batches = sorted({r["clip"] for r in grid}), sorted({r["batch"] for r in grid})
        heatmaps(hm, clips, batches, out / "heatmap.png")
        _per_class_plot(grid, names, out / "per_class.png")
        lines += ["", "## Grid: full fine-tuning over (ε, B, C)", ""]
        table = [[f"{r['epsilon']:g}", r["batch"], f"{r['clip']:g}", r["accuracy"], _std(r),
                  r["seeds"], r["noise_multiplier"], r["steps"], r["cumulative_noise"], f"{r['effective_noise']:.2e}",
                  r["epsilon_spent"]]
                 for r in sorted(grid, key=lambda r: (r["epsilon"], r["batch"], r["clip"]))]  # fmt: skip
        header = ["ε", "B", "C", "acc", "± (std)", "seeds", "σ", "T", "σ√T", "σC/B", "ε spent"]
        lines.append(_md_table(header, table))
        advices = []
        lines += ["", "## Which batch size wins, and what σ√T advises", ""]
        for eps in sorted({r["epsilon"] for r in grid}):
            n = grid[0]["num_samples"]
            advice = advise_batch_size(eps, args.delta, n, args.epochs, batches, min_steps=args.min_steps)
            advices.append(advice)
            for clip in clips:
                sub = [r for r in grid if r["epsilon"] == eps and r["clip"] == clip]
                win = max(sub, key=lambda r: r["accuracy"])
                lines.append(f"- ε={eps:g}, C={clip:g}: best B={win['batch']} (acc {win['accuracy']:.3f});"
                             f" advisor: B={advice.recommended.batch_size}")  # fmt: skip
            best = max((r for r in grid if r["epsilon"] == eps), key=lambda r: r["accuracy"])
            lines.append(
                f"- ε={eps:g}: best overall B={best['batch']}, C={best['clip']:g} (acc {best['accuracy']:.3f})"
            )
        plot_advice(advices, out / "advisor.png")
        lines += ["", "```", *(a.table() for a in advices), "```"]
    if methods or baselines:
        _write_csv(methods + baselines, out / "methods.csv")
        if methods:
            _methods_plot(methods, baselines, out / "methods.png")
        lines += ["", "## Methods and baselines", ""]
        table = [[r["method"] + ("" if r["pretrained"] else " (scratch)"),
                  "non-private" if r["epsilon"] is None else f"{r['epsilon']:g}", r["batch"],
                  "-" if r["epsilon"] is None else f"{r['clip']:g}", r["accuracy"], _std(r), r["seeds"],
                  r.get("epsilon_spent", "-"), r["cpu_seconds"]]
                 for r in methods + baselines]  # fmt: skip
        lines.append(_md_table(["method", "ε", "B", "C", "acc", "± (std)", "seeds", "ε spent", "CPU s (mean)"], table))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["pretrain", "grid", "methods", "baselines", "plots", "all"])
    p.add_argument("--data", required=True, help="ImageFolder root with train/ and test/ (e.g. ../shared/data/cifar10)")
    p.add_argument("--out", default="runs/study", help="output folder (results.jsonl, CSVs, PNGs, public.ckpt)")
    p.add_argument("--public-classes", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--private-classes", type=int, nargs="+", default=[5, 6, 7, 8, 9])
    p.add_argument("--public-size", type=int, default=None, help="public training examples (default: all)")
    p.add_argument("--private-size", type=int, default=10_000, help="private training examples (default 10000)")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--pretrain-epochs", type=int, default=5)
    p.add_argument("--pretrain-batch", type=int, default=128)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=3, help="the fixed epoch budget of every private run")
    p.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 8.0])
    p.add_argument("--batch", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--clip", type=float, nargs="+", default=[1.0, 5.0, 25.0])
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate at B=256, scaled with √(B/256)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--methods-epsilon", type=float, nargs="+", default=[1.0])
    p.add_argument("--methods-batch", type=int, default=512)
    p.add_argument("--methods-clip", type=float, default=5.0)
    p.add_argument("--probe-fraction", type=float, default=0.5, help="LP-FT: share of steps spent probing")
    p.add_argument("--keep-fraction", type=float, default=0.2, help="SPARTA: share of rows kept per tensor")
    p.add_argument("--min-steps", type=int, default=20, help="advisor: minimum number of steps")
    p.add_argument("--physical-batch", type=int, default=256)
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once (each on one thread)")
    p.add_argument(
        "--seed", type=int, default=0, help="training seed (repeat a stage with others: the report averages)"
    )
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the private training subset")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    stages = ["pretrain", "grid", "methods", "baselines", "plots"] if args.stage == "all" else [args.stage]
    pool = ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) if args.jobs > 1 else None
    try:
        for stage in stages:
            if stage == "plots":
                report(args)
            else:
                run_stage(args, stage, pool if stage != "pretrain" else None)
    finally:
        if pool is not None:
            pool.shutdown()


if __name__ == "__main__":
    main()
