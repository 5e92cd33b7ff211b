"""The examples run offline: the LightningCLI transfer example for one tiny epoch, the sweep's tiny mode."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_cli_example_runs_one_tiny_epoch_offline(tmp_path):
    out = _run(
        [str(ROOT / "examples/vit_transfer.py"), "fit", "--config", str(ROOT / "examples/configs/tiny.yaml"),
         "--config", str(ROOT / "examples/configs/lpft.yaml"), "--trainer.enable_progress_bar=false"],
        tmp_path,
    )  # fmt: skip
    assert "LP-FT: fine-tuning from step" in out
    events = list((tmp_path / "runs/tiny").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard logs were written"


def test_sweep_tiny_writes_csv_and_png(tmp_path):
    _run(
        [str(ROOT / "examples/sweep_cb.py"), "--tiny", "--clip", "1.0", "--batch", "64", "256", "--epochs", "2",
         "--out", str(tmp_path), "--wandb-sweep"],
        tmp_path,
    )  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [int(r["batch"]) for r in rows] == [64, 256]
    for r in rows:
        assert float(r["epsilon_spent"]) <= 4.0 and 0.0 <= float(r["accuracy"]) <= 1.0
        assert abs(float(r["cumulative_noise"]) - float(r["noise_multiplier"]) * int(r["steps"]) ** 0.5) < 1e-6
    png = (tmp_path / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "grid" in (tmp_path / "sweep.yaml").read_text()
