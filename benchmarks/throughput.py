"""Throughput and peak memory of private training modes on timm ViTs, one fresh subprocess per configuration.

Modes (AdamW, synthetic data, the same model and precision in each):

- ``nonprivate``: a plain torch loop, the reference.
- ``opacus_hooks``: Opacus ``GradSampleModule`` + ``DPOptimizer`` (per-sample gradients by hooks).
- ``opacus_ghost``: Opacus ``GradSampleModuleFastGradientClipping`` + ``DPOptimizerFastGradientClipping`` +
  ``DPLossFastGradientClipping`` (ghost clipping, two backward passes).
- ``ldp_hooks`` / ``ldp_ghost``: lightning_dp through a real ``lightning.Trainer`` + ``DPStrategy(engine=...)``, with
  the ε refresh on (its default budget), as in real runs.
- ``engine_hooks`` / ``engine_ghost``: the bare lightning_dp engines in a plain loop (capture → clip → noise → step).
- ``ldp_ghost_per_layer`` / ``engine_ghost_per_layer``: the same with ``clipping="per_layer"`` (clipped in backward).

Opacus cannot handle timm ViT's raw ``cls_token`` / ``pos_embed`` per layer, so they are frozen in the Opacus modes
(column ``raw``); every other mode trains them. The step time is the median over the timed steps after warm-up,
excluding data loading (synthetic batches are already on the device); beside the wall time, the process CPU time per
step (``time.process_time``, all threads: the measure to compare on a shared machine). Peak memory:
``torch.cuda.max_memory_allocated`` on GPU; on CPU the process's peak RSS (``ru_maxrss``) and its growth over the RSS
after imports. The last columns come from ``benchmarks/cost_model.py``: the ghost engine's extra TFLOP and GB per step
for the row's shapes, and the throughput ratio the model predicts on an H100 (calibrated on the measured non-private
ViT-B/16 reference; PREDICTED, NOT MEASURED).

Examples:
    python benchmarks/throughput.py                      # GPU: ViT-Ti/S/B at 224 px, batch 64/128/256
    python benchmarks/throughput.py --models vit_base_patch16_224 --batch-sizes 128 --precision bf16-mixed \
        --modes nonprivate ldp_ghost ldp_ghost_per_layer opacus_ghost --out vitb_bf16.json   # the issue's bar
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/throughput.py --small --precision 32 bf16-mixed   # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # cost_model.py beside this file

ALL_MODES = [
    "nonprivate",
    "opacus_hooks",
    "opacus_ghost",
    "ldp_hooks",
    "ldp_ghost",
    "ldp_ghost_per_layer",
    "engine_hooks",
    "engine_ghost",
    "engine_ghost_per_layer",
]
OPACUS_MODES = {"opacus_hooks", "opacus_ghost"}
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0

#: ``--small`` (CPU): a small ViT-Tiny, and two ViT-B/16 blocks at 224 px (the shapes of the issue's bar: T = 197,
#: d = 768, MLP 3072) at a batch a CPU can afford.
SMALL_CONFIGS = [
    dict(model="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=6, batch_sizes=[32, 64]),
    dict(model="vit_base_patch16_224", img_size=224, patch_size=16, depth=2, batch_sizes=[8]),
]


def engine_and_clipping(mode: str) -> tuple[str, str]:
    """``"ldp_ghost_per_layer"`` → ``("ghost", "per_layer")``; ``"engine_hooks"`` → ``("hooks", "flat")``."""
    rest = mode.split("_", 1)[1]
    if rest.endswith("_per_layer"):
        return rest[: -len("_per_layer")], "per_layer"
    return rest, "flat"


# ---------------------------------------------------------------------------------------------------- worker
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _build_model(cfg: dict[str, Any]) -> Any:
    import timm

    kw = dict(pretrained=False, num_classes=cfg["num_classes"], img_size=cfg["img_size"])
    if cfg.get("patch_size"):
        kw["patch_size"] = cfg["patch_size"]
    if cfg.get("depth"):
        kw["depth"] = cfg["depth"]
    model = timm.create_model(cfg["model"], **kw)
    if cfg["mode"] in OPACUS_MODES:
        for name in ("cls_token", "reg_token", "pos_embed", "dist_token"):
            p = getattr(model, name, None)
            if p is not None:
                p.requires_grad_(False)
    return model


def _autocast(cfg: dict[str, Any], device: Any) -> Any:
    import contextlib

    import torch

    if cfg["precision"] == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _plain_loop(cfg: dict[str, Any], model: Any, device: Any) -> tuple[list[float], list[float]]:
    """Run ``warmup + steps`` steps of the plain-loop modes; return the timed steps' wall and CPU durations."""
    import torch
    from torch import nn

    b = cfg["batch_size"]
    x = torch.randn(b, 3, cfg["img_size"], cfg["img_size"], device=device)
    y = torch.randint(0, cfg["num_classes"], (b,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    mode = cfg["mode"]
    criterion = nn.CrossEntropyLoss()

    if mode == "nonprivate":

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with _autocast(cfg, device):
                loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()

    elif mode == "opacus_hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model)
        dp_opt = DPOptimizer(
            optimizer, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, expected_batch_size=b
        )

        def step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            with _autocast(cfg, device):
                loss = criterion(gsm(x), y)
            loss.backward()
            dp_opt.step()

    elif mode == "opacus_ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=MAX_GRAD_NORM, use_ghost_clipping=True)
        dp_opt = DPOptimizerFastGradientClipping(
            optimizer, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, expected_batch_size=b
        )
        dp_loss = DPLossFastGradientClipping(gsm, dp_opt, nn.CrossEntropyLoss(), loss_reduction="mean")

        def step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            with _autocast(cfg, device):
                loss = dp_loss(gsm(x), y)
            loss.backward()
            dp_opt.step()

    elif mode.startswith("engine_"):
        from lightning_dp.engine import build_engine
        from lightning_dp.noise import privatize
        from lightning_dp.randomness import TorchSource

        engine_name, clipping = engine_and_clipping(mode)
        engine = build_engine(engine_name, model)
        engine.attach()
        source = TorchSource(0)

        def step() -> None:
            with engine.capture(b):
                with _autocast(cfg, device):
                    loss = criterion(model(x), y)
                loss.backward()
            engine.clip_and_accumulate(MAX_GRAD_NORM, clipping)
            grads = privatize(
                engine.pop_summed(), noise_std=NOISE_MULTIPLIER * MAX_GRAD_NORM, normalizer=b, source=source
            )
            for p, g in grads.items():
                p.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    else:
        raise ValueError(mode)

    times, cpu_times = [], []
    for i in range(cfg["warmup"] + cfg["steps"]):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def _lightning_loop(cfg: dict[str, Any], model: Any, device: Any) -> tuple[list[float], list[float]]:
    """Run the lightning_dp modes through a real Trainer; return the timed steps' wall and CPU durations."""
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dp import DPStrategy

    b = cfg["batch_size"]
    total = cfg["warmup"] + cfg["steps"]
    n = b * total
    g = torch.Generator().manual_seed(0)
    # One fixed batch repeated: data loading is not what is measured (the timer excludes it anyway).
    xs = torch.randn(b, 3, cfg["img_size"], cfg["img_size"], generator=g).repeat(total, 1, 1, 1)
    ys = torch.randint(0, cfg["num_classes"], (n,), generator=g)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self._start = self._cpu_start = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            _sync(device)
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            _sync(device)
            self.times.append(time.perf_counter() - self._start)
            self.cpu_times.append(time.process_time() - self._cpu_start)

    # Fixed-size shuffled batches (poisson_sampling=False) so every timed step has exactly `b` examples. The ε
    # refresh keeps its default (a bounded share of the run's time), as in real runs; the median step hides it.
    engine_name, clipping = engine_and_clipping(cfg["mode"])
    strategy = DPStrategy(
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        poisson_sampling=False,
        sampling_seed=0,
        engine=engine_name,
        clipping=clipping,
    )
    timer = Timer()
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        strategy=strategy,
        precision="bf16-mixed" if cfg["precision"] == "bf16-mixed" else "32-true",
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(Module(), DataLoader(TensorDataset(xs, ys), batch_size=b, shuffle=True))
    return timer.times[cfg["warmup"] :], timer.cpu_times[cfg["warmup"] :]


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this (fresh) process."""
    import torch

    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # "fp32" = fp32 weights with TF32 matmuls, as the references
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    rss_after_imports = _rss_mib()
    model = _build_model(cfg).to(device).train()
    if cfg["mode"].startswith("ldp_"):
        times, cpu_times = _lightning_loop(cfg, model, device)
    else:
        times, cpu_times = _plain_loop(cfg, model, device)
    step = statistics.median(times)
    out = dict(
        cfg,
        step_s=step,
        samples_per_s=cfg["batch_size"] / step,
        cpu_s_per_step=statistics.median(cpu_times),
        timed_steps=len(times),
    )
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        out["peak_mib"] = peak
        out["peak_growth_mib"] = peak - rss_after_imports
    return out


# ---------------------------------------------------------------------------------------------------- driver
def _configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    if args.small:
        families = [dict(c) for c in SMALL_CONFIGS if not args.models or c["model"] in args.models]
        steps, warmup = args.steps or 5, args.warmup or 2
    else:
        models = args.models or ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]
        families = [
            dict(model=m, img_size=224, patch_size=None, depth=None, batch_sizes=[64, 128, 256]) for m in models
        ]
        steps, warmup = args.steps or 10, args.warmup or 3
    out = []
    for fam in families:
        img = args.img_size or fam["img_size"]
        patch = args.patch_size or fam["patch_size"]
        depth = args.depth or fam["depth"]
        for precision in args.precision:
            for b in args.batch_sizes or fam["batch_sizes"]:
                for mode in args.modes:
                    out.append(
                        dict(
                            model=fam["model"],
                            batch_size=b,
                            mode=mode,
                            img_size=img,
                            patch_size=patch,
                            depth=depth,
                            num_classes=args.num_classes,
                            precision=precision,
                            steps=steps,
                            warmup=warmup,
                            device=device,
                        )
                    )
    return out


def _cuda_available() -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _run_one(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(cfg, error=f"timeout after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()
    reason = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "?")
    return dict(cfg, error=reason[:160])


def _prediction_key(r: dict[str, Any]) -> tuple:
    clipping = engine_and_clipping(r["mode"])[1]
    return (r["model"], r["img_size"], r.get("patch_size"), r.get("depth"), r["batch_size"], r["precision"], clipping)


def _predictions(results: list[dict[str, Any]]) -> dict[tuple, Any]:
    """The cost model's prediction per (shapes, precision, clipping) of the ghost-engine rows."""
    from cost_model import predict

    out: dict[tuple, Any] = {}
    for r in results:
        if "ghost" not in r["mode"] or r["mode"].startswith("opacus") or "error" in r:
            continue
        key = _prediction_key(r)
        if key not in out:
            try:
                out[key] = predict(r, key[-1])
            except Exception as err:  # the model is a diagnostic: never lose the measured table for it
                print(f"cost model failed for {key}: {err}", file=sys.stderr)
                out[key] = None
    return out


def _table(results: list[dict[str, Any]]) -> str:
    cpu = any(r.get("device") == "cpu" for r in results)
    mem_head = "peak RSS MiB (+growth)" if cpu else "peak MiB"
    head = (
        f"| model | batch | prec | mode | raw params | samples/s | × non-private | CPU s/step | × non-private (CPU)"
        f" | {mem_head} | × non-private (mem) | model: extra TFLOP / GB | predicted H100 × (not measured) |"
    )
    lines = [head, "|" + "---|" * 13]
    ref = {
        (r["model"], r["batch_size"], r["precision"]): r
        for r in results
        if r["mode"] == "nonprivate" and "samples_per_s" in r
    }
    predictions = _predictions(results)
    for r in results:
        raw = "frozen" if r["mode"] in OPACUS_MODES else "trained"
        name = r["model"].replace("_patch16_224", "")
        if r.get("patch_size") or r.get("depth"):
            name += f" ({r['img_size']}px" + (f", p{r['patch_size']}" if r.get("patch_size") else "")
            name += (f", depth {r['depth']}" if r.get("depth") else "") + ")"
        else:
            name += f" ({r['img_size']}px)"
        if "error" in r:
            lines.append(
                f"| {name} | {r['batch_size']} | {r['precision']} | {r['mode']} | {raw} | — | — | — | — |"
                f" error: {r['error']} | — | — | — |"
            )
            continue
        base = ref.get((r["model"], r["batch_size"], r["precision"]))
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}" if base else "—"
        cpu_ratio = f"{base['cpu_s_per_step'] / r['cpu_s_per_step']:.2f}" if base else "—"
        mem_ratio = f"{r['peak_mib'] / base['peak_mib']:.2f}" if base else "—"
        mem = f"{r['peak_mib']:.0f}" + (f" (+{r['peak_growth_mib']:.0f})" if "peak_growth_mib" in r else "")
        model_cols = "— | —"
        if "ghost" in r["mode"] and not r["mode"].startswith("opacus"):
            pred = predictions.get(_prediction_key(r))
            if pred is not None:
                model_cols = f"{pred.extra_tflop:.3f} / {pred.extra_gb:.2f} | {pred.ratio_calibrated:.2f}"
        lines.append(
            f"| {name} | {r['batch_size']} | {r['precision']} | {r['mode']} | {raw} | {r['samples_per_s']:.1f} |"
            f" {ratio} | {r['cpu_s_per_step']:.3f} | {cpu_ratio} | {mem} | {mem_ratio} | {model_cols} |"
        )
    return "\n".join(lines)


def _headline() -> str:
    """The cost model's prediction for the issue's bar: ViT-B/16, 224 px, batch 128, bf16-mixed, on an H100."""
    from cost_model import describe, predict

    cfg = dict(model="vit_base_patch16_224", img_size=224, batch_size=128, precision="bf16-mixed", num_classes=100)
    return "\n".join(describe(predict(cfg, clipping)) for clipping in ("flat", "per_layer"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--small", action="store_true", help="CPU configurations: ViT-Tiny at 32 px, and two ViT-B/16 blocks at 224 px"
    )
    parser.add_argument("--precision", nargs="+", choices=["32", "bf16-mixed"], default=["32"])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--modes", nargs="+", choices=ALL_MODES, default=ALL_MODES)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all configurations; report per-mode medians")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        cfg = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(cfg)), flush=True)
        return

    configs = _configs(args)
    rounds: list[list[dict[str, Any]]] = []
    for _ in range(args.rounds):  # interleaved rounds: a noisy shared machine affects every mode alike
        rounds.append([])
        for cfg in configs:
            r = _run_one(cfg, args.timeout)
            status = r.get("error") or (
                f"{r['samples_per_s']:.1f} samples/s, {r['cpu_s_per_step']:.3f} CPU s/step,"
                f" peak {r['peak_mib']:.0f} MiB"
            )
            print(
                f"[{cfg['model']} b={cfg['batch_size']} {cfg['precision']} {cfg['mode']}] {status}",
                file=sys.stderr,
                flush=True,
            )
            rounds[-1].append(r)
    results = [_median_of(list(runs)) for runs in zip(*rounds)]
    print(_table(results))
    print()
    print(_headline())
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "rounds": rounds}, f, indent=2)


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's runs: the medians of the step times, the largest peak; an error if every run failed."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key in ("step_s", "cpu_s_per_step"):
        out[key] = statistics.median(r[key] for r in ok)
    out["samples_per_s"] = out["batch_size"] / out["step_s"]
    for key in ("peak_mib", "peak_growth_mib"):
        if key in out:
            out[key] = max(r[key] for r in ok)
    out["rounds"] = len(ok)
    return out


if __name__ == "__main__":
    main()
