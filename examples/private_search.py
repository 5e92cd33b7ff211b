"""An accounted hyperparameter search over (C, B) at a total ε, against the same grid chosen without accounting.

Two ways of choosing the clipping bound C and the batch size B of a private linear probe:

1. **The unaccounted grid** (what users do today): train every (C, B) of the grid with ``DPStrategy(target_epsilon=ε)``,
   pick the best by its validation accuracy, report "ε". That ε covers one run; the grid released the best of
   |grid| runs chosen with a noiseless private validation score, so its honest cost is at most the composition of
   every run (printed) and the validation examples have no protection at all.
2. **The accounted search** (:class:`lightning_dp.tuning.PrivateSearch`): a random number of runs K, drawn from a
   declared distribution, configurations drawn from the same grid, σ calibrated so that the *whole search* meets ε,
   a noisy validation score, and only the best run released. Its ε is the Papernot–Steinke bound of everything it
   releases.

Both report the released model's accuracy on the test split (never used for selection)::

    python examples/private_search.py                          # offline: scikit-learn digits, pixels as features
    python examples/private_search.py --data /work/shared/data/cifar10 --private-size 5000   # CIFAR-10 classes 5-9
    python examples/private_search.py --tiny                   # a smoke run (seconds; the tests run it)

The CIFAR-10 mode is a linear probe on 8×8 average-pooled pixels (192 features) of the private classes 5–9: cheap on
two CPU cores, and honest about what it is (no pretrained features are used). Outputs go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import DPStrategy
from lightning_dp.accounting import epsilon_of_segments
from lightning_dp.console import quiet_lightning
from lightning_dp.tuning import GeometricRuns, PoissonRuns, PrivateSearch, TruncatedNegativeBinomialRuns


class Probe(L.LightningModule):
    def __init__(self, features: int, classes: int, lr: float) -> None:
        super().__init__()
        self.linear, self.lr = nn.Linear(features, classes), lr

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.linear(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self.linear(batch[0]).argmax(1) == batch[1]).float().mean())

    def test_step(self, batch, batch_idx):
        self.log("test_acc", (self.linear(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm] / 16.0, y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def cifar(root: str, classes: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from PIL import Image

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        names = sorted(os.listdir(Path(root) / split))
        xs, ys = [], []
        for label, k in enumerate(classes):
            folder = Path(root) / split / names[k]
            for file in sorted(folder.iterdir()):
                img = np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255.0
                xs.append(img.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).reshape(-1))  # 8×8 average pooling
                ys.append(label)
        return np.stack(xs), np.array(ys)

    x, y = load("train")
    xt, yt = load("test")
    mean, std = x.mean(0), x.std(0) + 1e-6
    return (x - mean) / std, y, (xt - mean) / std, yt


def splits(args: argparse.Namespace) -> dict[str, TensorDataset]:
    x, y, xt, yt = cifar(args.data, args.private_classes) if args.data else digits()
    perm = np.random.default_rng(args.split_seed).permutation(len(y))
    n_val = args.val_size
    n_train = min(args.private_size or len(y) - n_val, len(y) - n_val)
    val, train = perm[:n_val], perm[n_val : n_val + n_train]

    def ds(a, b):
        return TensorDataset(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.long))

    return {"train": ds(x[train], y[train]), "val": ds(x[val], y[val]), "test": ds(xt, yt)}


def quiet_trainer(epochs: int, strategy: DPStrategy | None = None) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, strategy=strategy or "auto", accelerator="cpu", logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip


def test_accuracy(model: L.LightningModule, data: TensorDataset) -> float:
    return float(quiet_trainer(1).test(model, DataLoader(data, batch_size=1024), verbose=False)[0]["test_acc"])


def unaccounted_grid(args, data, features, classes) -> dict:
    """Every grid point at ε per run, best by noiseless validation accuracy."""
    rows, ledgers, best = [], [], None
    for clip in args.clip:
        for batch in args.batch:
            strategy = DPStrategy(target_epsilon=args.epsilon, target_delta=args.delta, max_grad_norm=clip)
            model = Probe(features, classes, args.lr)
            trainer = quiet_trainer(args.epochs, strategy)
            trainer.fit(model, DataLoader(data["train"], batch_size=batch))
            val = float(trainer.validate(model, DataLoader(data["val"], batch_size=1024), verbose=False)[0]["val_acc"])
            ledgers.extend(strategy.ledger.segments)
            rows.append(
                {"max_grad_norm": clip, "batch_size": batch, "val_acc": val, "sigma": strategy.noise_multiplier}
            )
            if best is None or val > best[0]:
                best = (val, model, rows[-1])
    val, model, row = best
    composed = epsilon_of_segments(ledgers, args.delta)
    return {"config": row, "val_acc": val, "test_acc": test_accuracy(model, data["test"]), "claimed_epsilon":
            args.epsilon, "composed_epsilon": composed, "runs": len(rows), "grid": rows}  # fmt: skip


def accounted_search(args, data, features, classes) -> dict:
    runs = {"poisson": PoissonRuns(args.mean), "geometric": GeometricRuns(args.mean),
            "tnb": TruncatedNegativeBinomialRuns(args.mean, args.shape)}[args.runs]  # fmt: skip
    search = PrivateSearch(
        lambda c: Probe(features, classes, c["lr"]),
        lambda c: (DataLoader(data["train"], batch_size=c["batch_size"]), DataLoader(data["val"], batch_size=1024)),
        {"max_grad_norm": args.clip, "batch_size": args.batch},
        num_samples=len(data["train"]), runs=runs, delta=args.delta, target_epsilon=args.epsilon,
        defaults={"epochs": args.epochs, "lr": args.lr}, directory=Path(args.out) / "search",
        score_noise_multiplier=args.score_noise,
    )  # fmt: skip
    result = search.run()
    out = {"epsilon": result.epsilon, "runs_drawn": result.runs_drawn, "distribution": repr(runs),
           "sigmas": {f"q={q:.4g},T={t}": s for (q, t), s in search.sigmas().items()}}  # fmt: skip
    if result.released:
        out.update(config=result.config, noisy_val_acc=result.score, test_acc=test_accuracy(result.model, data["test"]))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 ImageFolder root (default: offline scikit-learn digits)")
    p.add_argument("--private-classes", type=int, nargs="+", default=[5, 6, 7, 8, 9])
    p.add_argument("--private-size", type=int, default=None, help="private training examples (default: all left)")
    p.add_argument("--val-size", type=int, default=400, help="private validation examples")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--epsilon", type=float, default=8.0, help="total ε (of the search; per run for the grid)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, nargs="+", default=[0.1, 1.0, 10.0])
    p.add_argument("--batch", type=int, nargs="+", default=[32, 128, 512])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--runs", choices=["poisson", "geometric", "tnb"], default="tnb")
    p.add_argument("--mean", type=float, default=9.0, help="mean number of runs of the search")
    p.add_argument("--shape", type=float, default=0.5, help="shape of the truncated negative binomial")
    p.add_argument("--score-noise", type=float, default=10.0, help="noise multiplier of the validation score")
    p.add_argument("--out", default="runs/private_search")
    p.add_argument("--tiny", action="store_true", help="a smoke run: 2×1 grid, 1 epoch, mean 2 runs")
    args = p.parse_args(argv)
    if args.tiny:
        args.clip, args.batch, args.epochs, args.mean, args.runs = [1.0, 10.0], [256], 1, 2.0, "geometric"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    with quiet_lightning():  # closed on return: an in-process caller (a test) gets Lightning's messages back
        return run(args)


def run(args: argparse.Namespace) -> dict:
    start = time.process_time()
    data = splits(args)
    features, classes = data["train"].tensors[0].shape[1], int(data["train"].tensors[1].max()) + 1
    print(
        f"data: {args.data or 'digits'}; train {len(data['train'])}, val {len(data['val'])}, test {len(data['test'])}"
    )
    grid = unaccounted_grid(args, data, features, classes)
    print(f"unaccounted grid: {grid['runs']} runs, best {grid['config']}: test acc {grid['test_acc']:.3f};"
          f" claimed ε = {grid['claimed_epsilon']:g}, composition of all runs ε ≤ {grid['composed_epsilon']:.3g}"
          " (validation set unprotected)")  # fmt: skip
    search = accounted_search(args, data, features, classes)
    if "test_acc" in search:
        print(f"accounted search: {search['runs_drawn']} runs ({search['distribution']}), released"
              f" {search['config']}: test acc {search['test_acc']:.3f}; ε = {search['epsilon']:.3g} for the whole"
              " search (validation score noised and charged)")  # fmt: skip
    else:
        print(f"accounted search: drew 0 runs, nothing released (ε = {search['epsilon']:.3g})")
    report = {"grid": grid, "search": search, "cpu_seconds": time.process_time() - start, "args": vars(args)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"process CPU time {report['cpu_seconds']:.0f} s; wrote {Path(args.out) / 'report.json'}")
    return report


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    main()
