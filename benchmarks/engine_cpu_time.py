"""Process CPU time of the bare per-sample clipping engine on a small timm ViT: two code trees side by side.

Each round runs one fresh worker subprocess per tree (alternating, so that a noisy shared machine affects both
alike); a worker times ``capture → forward → backward → clip_and_accumulate → pop_summed`` per step with
``time.process_time()`` after warm-up and reports the median. The table gives, per tree, the median over rounds
and the ratio to the first tree.

Examples:
    git archive main lightning_dp | tar -x -C /tmp/before
    OMP_NUM_THREADS=1 python benchmarks/engine_cpu_time.py /tmp/before . --engine ghost --batch-sizes 32 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _worker(engine_name: str, batch_size: int, steps: int, warmup: int) -> dict[str, float]:
    import timm
    import torch

    from lightning_dp.engine import build_engine

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=100, img_size=32, patch_size=8, depth=6
    ).train()
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 100, (batch_size,))
    engine = build_engine(engine_name, model)
    engine.attach()
    times = []
    for step in range(warmup + steps):
        start = time.process_time()
        with engine.capture(batch_size):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        engine.clip_and_accumulate(1.0)
        engine.pop_summed()
        if step >= warmup:
            times.append(time.process_time() - start)
    return {"cpu_s_per_step": statistics.median(times)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", help="code trees (each holding lightning_dp/) to compare")
    parser.add_argument("--engine", default="ghost", choices=["ghost", "hooks"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        cfg = json.loads(args.worker)
        print("RESULT " + json.dumps(_worker(cfg["engine"], cfg["batch_size"], cfg["steps"], cfg["warmup"])))
        return
    results: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for b in args.batch_sizes:
            for tree in args.trees:
                cfg = dict(engine=args.engine, batch_size=b, steps=args.steps, warmup=args.warmup)
                env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                ).stdout
                line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
                results.setdefault((tree, b), []).append(json.loads(line[7:])["cpu_s_per_step"])
    print(f"| tree | engine | batch | CPU s/step (median of {args.rounds} rounds) | × first tree |")
    print("|---|---|---|---|---|")
    for b in args.batch_sizes:
        base = statistics.median(results[(args.trees[0], b)])
        for tree in args.trees:
            med = statistics.median(results[(tree, b)])
            print(f"| {tree} | {args.engine} | {b} | {med:.4f} | {med / base:.3f} |")


if __name__ == "__main__":
    main()
