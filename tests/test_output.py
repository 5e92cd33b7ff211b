"""Quiet, informative runs: the end-of-run privacy table, the chatter filter, and the non-private notice only when a
logger records the diagnostic.
"""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import ClassifierModule, loader, mlp, tensor_data, trainer
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_dp import DPStrategy
from lightning_dp.callbacks import PrivacySummary, format_privacy_summary
from lightning_dp.console import quiet_lightning
from lightning_dp.finetune import LinearProbeThenFineTune

NOTICE = "`nonprivate/step_clip_fraction` is a non-private diagnostic"


@pytest.fixture
def console(capfd, caplog):
    """Everything a run printed since the last call: Lightning's log handler or, under pytest, its log capture."""
    caplog.set_level("INFO")

    def read():
        text = capfd.readouterr().err + "\n".join(r.getMessage() for r in caplog.records)
        caplog.clear()
        return text

    return read


class AllParams(ClassifierModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------- the summary table
def test_summary_table_shows_every_figure_once_on_rank_zero(console):
    summary = PrivacySummary()
    s = DPStrategy(target_epsilon=2.0, max_grad_norm=0.5)
    trainer(s, max_epochs=2, callbacks=[summary]).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    err = console()
    assert err.count("lightning_dp: privacy summary") == 1
    table = summary.table
    assert table in err
    eps = float(re.search(r"ε\s+([0-9.]+)  at δ = 1e-05  \(target 2\)", table).group(1))
    assert eps == pytest.approx(s.epsilon, abs=5e-4) and eps <= 2.0
    assert re.search(rf"noise σ\s+{s.noise_multiplier:.4g}\n", table)
    assert "sample rate q   0.1  (expected batch B = 20, N = 200)" in table
    assert "clipping C      0.5  (flat clipping)" in table
    assert re.search(r"steps\s+20 of 20 planned", table)
    assert re.search(r"ε by mechanism\s+dp-sgd [0-9.]+", table)
    rate = summary.summary["perf/samples_per_second"]
    assert summary.summary["perf/train_steps"] == 20
    assert rate == pytest.approx(20 * 20 / summary.summary["perf/train_seconds"])
    assert re.search(rf"throughput\s+{rate:.1f} samples/s  \(20 steps in", table)


def test_summary_table_lists_the_sigma_of_each_budget_phase():
    summary = PrivacySummary(print_table=False)
    s = DPStrategy(target_epsilon=2.0)
    lpft = LinearProbeThenFineTune(0.5, split="epsilon", model_attr="net", head_pattern=r"^2\.")
    trainer(s, max_epochs=2, callbacks=[lpft, summary]).fit(AllParams(mlp()), loader(tensor_data(), 20))
    (end0, sigma0), (end1, sigma1) = s.noise_phases
    assert (end0, end1) == (10, 20) and sigma0 != sigma1
    assert f"noise σ         steps 0–9: {sigma0:.4g}; steps 10–19: {sigma1:.4g}" in summary.table
    assert summary.summary["dp/noise_phases"]


def test_format_privacy_summary_of_a_bare_summary():
    table = format_privacy_summary(
        {"dp/final_epsilon": 1.23456, "dp/delta": 1e-6, "dp/steps": 7, "dp/planned_steps": 9}
    )
    assert table.splitlines() == [
        "lightning_dp: privacy summary",
        "  ε               1.235  at δ = 1e-06",
        "  steps           7 of 9 planned",
    ]


# ---------------------------------------------------------------------- the chatter filter
def test_quiet_lightning_hides_lightning_chatter_and_keeps_lightning_dp_messages(console):
    with quiet_lightning():
        trainer(DPStrategy(noise_multiplier=1.0), max_steps=2).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
        rank_zero_info("💡 Tip: a product advertisement")
        rank_zero_info("lightning_dp: 💡 Tip: our own message starting like chatter is kept")
    quiet = console()
    assert "GPU available" not in quiet and "`Trainer.fit` stopped" not in quiet and "advertisement" not in quiet
    assert "lightning_dp: N=200" in quiet and "our own message" in quiet
    trainer(DPStrategy(noise_multiplier=1.0), max_steps=2).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    after = console()
    assert "GPU available" in after and "`Trainer.fit` stopped" in after  # closed: everything shows again


def test_quiet_lightning_hides_only_the_listed_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning(dataloader_workers_hint=False):
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
            hint = "The 'train_dataloader' does not have many workers which may be a bottleneck."
            warnings.warn(hint, PossibleUserWarning, stacklevel=1)
            rank_zero_warn("lightning_dp: a warning of ours")
            warnings.warn("some other FutureWarning", FutureWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, after close", FutureWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "lightning_dp: a warning of ours",
        "some other FutureWarning",
        "`isinstance(treespec, LeafSpec)` is deprecated, after close",
    ]


# ---------------------------------------------------------------------- the non-private notice
def test_nonprivate_notice_only_when_a_logger_records_it(console, tmp_path):
    trainer(DPStrategy(noise_multiplier=1.0), max_steps=2).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    assert NOTICE not in console()  # no logger: nothing is recorded anywhere
    logger = CSVLogger(str(tmp_path))
    trainer(DPStrategy(noise_multiplier=1.0), max_steps=2, logger=logger, log_every_n_steps=1).fit(
        ClassifierModule(mlp()), loader(tensor_data(), 20)
    )
    assert console().count(NOTICE) == 1
    s = DPStrategy(noise_multiplier=1.0, log_clip_fraction=False)
    trainer(s, max_steps=2, logger=CSVLogger(str(tmp_path / "off"))).fit(
        ClassifierModule(mlp()), loader(tensor_data(), 20)
    )
    assert NOTICE not in console()


# ---------------------------------------------------------------------- lines of their own, no framework deprecations
_RUN_WITH_A_PROGRESS_BAR = """
import lightning as L
from helpers import ClassifierModule, loader, mlp, tensor_data
from lightning.pytorch.loggers import CSVLogger
from lightning_dp import DPStrategy
trainer = L.Trainer(max_epochs=2, accelerator="cpu", strategy=DPStrategy(noise_multiplier=1.0),
                    logger=CSVLogger("logs"), enable_checkpointing=False, enable_model_summary=False)
trainer.fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
"""


def test_messages_start_their_own_line_under_a_progress_bar_and_no_deprecation_shows(tmp_path):
    """A normal run, without quiet_lightning: stdout (the bar) and stderr (messages) in one stream, as a terminal."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_WITH_A_PROGRESS_BAR], cwd=tmp_path, env=env, timeout=300,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    assert "it/s" in out and NOTICE in out, "the bar and a notice printed while it is open"
    pieces = [p.strip() for p in re.split(r"[\r\n]", out)]
    glued = [p for p in pieces if "lightning_dp:" in p and not p.startswith("lightning_dp:")]
    assert not glued, glued
    assert "deprecated" not in out.lower(), out
