"""The compatibility table: every family of the model zoo, fitted and checked against brute force in both engines.

Per family (``tests/model_zoo.py``: tiny random-weight configurations of timm families and torch layers, nothing
frozen; BatchNorm families after ``lightning_dp.fix_model``):

- **fit**: a ``Trainer`` fit of 3 steps with ``DPStrategy`` (Poisson sampling, micro-batches, the sample-mixing probe,
  the checked first step, noise), per engine. ε is not computed (not under test here).
- **per-sample error**: the model in float64, 3 examples, 2 micro-batches (the checked one, then a plain one) against
  a loop of one autograd call per example. Hooks engine: max over examples of ``‖g_i − ref_i‖ / ‖ref_i‖``; ghost engine
  (which forms no per-sample gradients): max over examples of the relative error of ``‖g_i‖``, and the relative
  error of the clipped sum with C = the median norm. Must be below 1e-5.
- **time / non-private**: process CPU time of one step (``capture`` → forward → backward → ``clip_and_accumulate``,
  fp32, batch 32) over that of a plain forward + backward, median of 5 steps after 2 warm-up steps, side by side in
  one process. The configurations are tiny, so Python overhead per op weighs far more than on real models.
- **fallback**: how the torch.func fallback covered what no layer rule does, per micro-batch: ``op <name>`` calls
  traced at the op that uses the parameter (``closed form``: a rule of ``op_rules``, ``vmap``: recomputed per example),
  ``unit <Type>`` module calls recomputed as a whole (``native``: MHA's batched rule, ``vmap``, or ``loop``: one
  example at a time where an op has no batching rule); ``native``: layer rules only.

Example:
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/compatibility.py --out /tmp/compat.md
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from model_zoo import ZOO, ZooEntry  # noqa: E402
from zoo_check import compare  # noqa: E402

from lightning_dp import DPStrategy, fix_model  # noqa: E402
from lightning_dp.engine import ENGINES  # noqa: E402

TOLERANCE = 1e-5
ENGINE_NAMES = ("hooks", "ghost")


def _model(entry: ZooEntry) -> nn.Module:
    model = entry.build()
    return fix_model(model) if entry.batchnorm else model


def _fit(entry: ZooEntry, engine_name: str) -> str:
    import lightning as L
    from helpers import ClassifierModule
    from torch.utils.data import DataLoader, TensorDataset

    L.seed_everything(0, verbose=False)
    module = ClassifierModule(_model(entry), lr=0.05)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(entry.inputs(32, g), torch.randint(0, 3, (32,), generator=g))
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=8, engine=engine_name)
    trainer = L.Trainer(
        strategy=strategy, accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    try:
        trainer.fit(module, DataLoader(data, batch_size=12, shuffle=True))
    except Exception as e:  # the table reports it
        return f"FAIL {type(e).__name__}: {e}"[:120]
    return "ok" if trainer.global_step == 3 else f"FAIL: {trainer.global_step} steps"


def _errors(entry: ZooEntry, engine_name: str) -> tuple[float, float, float]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = _model(entry).double()
    x = entry.inputs(3, g)
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (3,), generator=g)
    r = compare(engine_name, model, x, y)
    return r.per_sample, r.norms, r.clipped_sum


def _median_cpu(fn, warmup: int = 2, steps: int = 5) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.process_time()
        fn()
        if i >= warmup:
            times.append(time.process_time() - start)
    return statistics.median(times)


def _timing(entry: ZooEntry, batch_size: int) -> tuple[dict[str, float], dict[str, str]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = _model(entry)
    x, y = entry.inputs(batch_size, g), torch.randint(0, 3, (batch_size,), generator=g)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    ratios: dict[str, float] = {}
    methods: dict[str, str] = {}
    base = _median_cpu(plain)
    for name in ENGINE_NAMES:
        engine = ENGINES[name](model)
        engine.attach()

        def private(engine=engine) -> None:
            with engine.capture(batch_size):
                nn.functional.cross_entropy(model(x), y).backward()
            engine.clip_and_accumulate(1.0)
            engine.pop_summed()

        ratios[name] = _median_cpu(private) / base
        summary = engine._fallback.last_summary
        methods[name] = ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in sorted(summary.items())) or "native"
        engine.detach()
    return ratios, methods


def run(families: list[str], batch_size: int) -> list[dict[str, object]]:
    rows = []
    for family in families:
        entry = ZOO[family]
        row: dict[str, object] = {"family": family, "source": entry.source}
        for name in ENGINE_NAMES:
            row[f"fit_{name}"] = _fit(entry, name)
            try:
                row[f"err_{name}"] = _errors(entry, name)
            except Exception as e:  # the table reports it
                row[f"err_{name}"] = f"FAIL {type(e).__name__}: {e}"[:120]
        try:
            ratios, methods = _timing(entry, batch_size)
            row["time"], row["methods"] = ratios, methods["ghost"]
        except Exception as e:
            row["time"], row["methods"] = {}, f"FAIL {type(e).__name__}: {e}"[:120]
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _passed(row: dict[str, object]) -> bool:
    for name in ENGINE_NAMES:
        err = row[f"err_{name}"]
        if row[f"fit_{name}"] != "ok" or not isinstance(err, tuple):
            return False
        ps, norms, summed = err
        if (name == "hooks" and not ps < TOLERANCE) or not norms < TOLERANCE or not summed < TOLERANCE:
            return False
    return True


def _fmt_err(err: object, name: str) -> str:
    if not isinstance(err, tuple):
        return str(err)
    ps, norms, summed = err
    head = f"{ps:.1e}" if name == "hooks" else f"{norms:.1e}"
    return f"{head} / {summed:.1e}"


def _line(row: dict[str, object]) -> str:
    time_ = row["time"]
    assert isinstance(time_, dict)
    cells = [
        f"`{row['family']}`",
        str(row["source"]),
        "✅" if _passed(row) else "❌",
        row["fit_hooks"] if row["fit_hooks"] != "ok" else "ok",
        row["fit_ghost"] if row["fit_ghost"] != "ok" else "ok",
        _fmt_err(row["err_hooks"], "hooks"),
        _fmt_err(row["err_ghost"], "ghost"),
        f"{time_['hooks']:.1f}×" if "hooks" in time_ else "-",
        f"{time_['ghost']:.1f}×" if "ghost" in time_ else "-",
        str(row["methods"]),
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


HEADER = (
    "| family | source | pass | fit hooks | fit ghost | hooks: per-sample / sum error | ghost: norm / sum error"
    " | hooks time | ghost time | fallback (beyond layer rules) |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("families", nargs="*", default=list(ZOO), help="zoo families (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the timing")
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    DPStrategy._epsilon_upper_bound = lambda self: 0.0  # type: ignore[method-assign]  # ε is not under test
    print(HEADER, flush=True)
    rows = run(args.families, args.batch_size)
    table = HEADER + "\n" + "\n".join(_line(r) for r in rows)
    failed = [r["family"] for r in rows if not _passed(r)]
    summary = f"\n{len(rows) - len(failed)} of {len(rows)} families pass" + (f"; failing: {failed}" if failed else "")
    print(summary)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n" + summary + "\n")


if __name__ == "__main__":
    main()
