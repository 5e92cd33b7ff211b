"""The batch-size advisor: its figures against the calibration (and DPStrategy's σ), the plateau rule, the CLI."""

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import ConvNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import DPMisconfigurationError, DPStrategy
from lightning_dp.accounting import calibrate_noise_multiplier
from lightning_dp.tuning import BatchSizeAdvice, BatchSizeOption, advise_batch_size, main, plot_advice

ROOT = Path(__file__).resolve().parents[1]
# Small T keeps each PRV calibration fast: T = 2·⌈1000/B⌉ = 40, 20, 10.
N, EPOCHS, SIZES, MIN_STEPS = 1000, 2, [50, 100, 200], 15


@pytest.fixture(scope="module")
def advice() -> BatchSizeAdvice:
    return advise_batch_size(2.0, 1e-4, N, EPOCHS, SIZES, max_grad_norm=0.5, min_steps=MIN_STEPS)


def test_figures_match_the_calibration(advice):
    assert [o.batch_size for o in advice.options] == SIZES
    for o in advice.options:
        steps = EPOCHS * math.ceil(N / o.batch_size)
        sigma = calibrate_noise_multiplier(2.0, 1e-4, o.batch_size / N, steps)
        assert o.steps == steps and o.sample_rate == o.batch_size / N
        assert o.noise_multiplier == pytest.approx(sigma, rel=1e-12)
        assert o.cumulative_noise == pytest.approx(sigma * math.sqrt(steps), rel=1e-12)
        assert o.effective_noise == pytest.approx(sigma * 0.5 / o.batch_size, rel=1e-12)
        assert o.enough_steps == (steps >= MIN_STEPS)


def test_recommendation_is_the_smallest_batch_on_the_plateau_with_enough_steps(advice):
    eligible = [o for o in advice.options if o.enough_steps]
    best = min(o.cumulative_noise for o in eligible)
    plateau = [o for o in eligible if o.cumulative_noise <= 1.05 * best]
    assert [o.on_plateau for o in advice.options] == [o in plateau for o in advice.options]
    assert advice.recommended == plateau[0]
    assert not advice.options[-1].enough_steps and not advice.options[-1].on_plateau  # T = 10 < 15
    # σ√T falls with B here (ε = 2); a zero tolerance picks the lowest eligible σ√T, a huge one the smallest B
    strict = advise_batch_size(2.0, 1e-4, N, EPOCHS, SIZES, min_steps=MIN_STEPS, plateau_tolerance=0.0)
    assert strict.recommended.cumulative_noise == best
    loose = advise_batch_size(2.0, 1e-4, N, EPOCHS, SIZES, min_steps=MIN_STEPS, plateau_tolerance=10.0)
    assert loose.recommended.batch_size == SIZES[0]


def test_sigma_is_the_one_dpstrategy_calibrates(advice):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(N, 3, 8, 8), torch.randint(0, 3, (N,)))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = ConvNet()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    strategy = DPStrategy(target_epsilon=2.0, target_delta=1e-4, max_grad_norm=0.5)
    trainer = L.Trainer(max_epochs=EPOCHS, strategy=strategy, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Module(), DataLoader(data, batch_size=100))
    option = next(o for o in advice.options if o.batch_size == 100)
    assert strategy.planned_steps == option.steps == strategy.ledger.steps
    assert strategy.sample_rate == option.sample_rate
    assert strategy.noise_multiplier == option.noise_multiplier


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_sizes": []}, "at least one"),
        ({"batch_sizes": [0, 10]}, "between 1 and"),
        ({"batch_sizes": [2000]}, "between 1 and"),
        ({"batch_sizes": [500, 1000], "min_steps": 5}, "min_steps=5"),
    ],
)
def test_errors_name_the_cause(kwargs, match):
    args = {"epsilon": 2.0, "delta": 1e-4, "num_samples": N, "epochs": EPOCHS, **kwargs}
    with pytest.raises(DPMisconfigurationError, match=match):
        advise_batch_size(**args)


def test_table_and_plot(advice, tmp_path):
    table = advice.table()
    assert "<- recommended" in table and f"T < {advice.min_steps}" in table
    assert len(table.splitlines()) == 2 + len(SIZES)
    png = plot_advice([advice], tmp_path / "advice.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_prints_a_table_and_writes_png_and_csv(tmp_path, capsys):
    argv = ["--epsilon", "2", "--delta", "1e-4", "--num-samples", str(N), "--epochs", str(EPOCHS), "--batch-sizes",
            *map(str, SIZES), "--min-steps", str(MIN_STEPS), "--plot", str(tmp_path / "a.png"),
            "--csv", str(tmp_path / "a.csv")]  # fmt: skip
    (advice,) = main(argv)
    out = capsys.readouterr().out
    assert f"recommended B = {advice.recommended.batch_size}" in out and "sigma*sqrt(T)" in out
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert lines[0].startswith("epsilon,delta,num_samples,epochs,batch_size") and len(lines) == 1 + len(SIZES)
    assert sum(line.endswith("True") for line in lines[1:]) == 1
    assert len(BatchSizeOption.__dataclass_fields__) == 8


def test_module_imports_without_matplotlib_and_plot_says_how_to_install(tmp_path):
    # Hide matplotlib from imports, find_spec and package metadata, as on a machine without it (torchmetrics, which
    # lightning imports, then skips it too).
    code = (
        "import sys, importlib.metadata as md\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Hide())\n"
        "version = md.version\n"
        "def hidden(name):\n"
        "    if name == 'matplotlib':\n"
        "        raise md.PackageNotFoundError(name)\n"
        "    return version(name)\n"
        "md.version = hidden\n"
        "import lightning_dp.tuning as t\n"
        "assert 'matplotlib' not in sys.modules\n"
        "a = t.advise_batch_size(2.0, 1e-4, 1000, 1, [1000], min_steps=1)\n"
        "print(a.recommended.batch_size)\n"
        "try:\n    t.plot_advice(a, 'x.png')\nexcept ModuleNotFoundError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1000\nERR") and "pip install matplotlib" in proc.stdout
