"""Observability callbacks: private gradient-norm histograms, the privacy-budget stop and the run summary."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import time

import lightning as L
import numpy as np
import pytest
import torch
from helpers import ClassifierModule, loader, mlp, tensor_data, trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lightning_dp import DPStrategy
from lightning_dp.accounting import calibrate_noise_multiplier, combine_noise_multipliers, compute_epsilon
from lightning_dp.callbacks import GradNormHistogram, NormHistogram, PrivacyBudget, PrivacySummary, histogram_quantiles
from lightning_dp.callbacks.grad_norm_histogram import geometric_edges
from lightning_dp.errors import DPMisconfigurationError, PrivacyTargetError

DELTA = 1e-5


# ---------------------------------------------------------------------- helpers
def _wandb_records(run_file):
    """Records of an offline W&B run file (LevelDB-log framing of ``wandb.proto`` records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last fragment of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def _items(items):
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


class _Collect(L.Callback):
    """Runs after the histogram callback: keeps each release with the exact norms and labels it came from."""

    def __init__(self, hist):
        self.hist = hist
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        rel = self.hist.last_release
        if rel is not None and rel.step == trainer.strategy.last_release_step:
            norms = trainer.strategy.last_per_sample_norms.detach().cpu().double().numpy()
            self.rows.append((rel, norms, batch[1].numpy()))


def _exact_bins(norms, edges):
    """Bin index of each norm for right-closed bins (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    return np.array([sum(n > e for e in edges) for n in norms], dtype=int)


# ---------------------------------------------------------------------- pure functions
def test_histogram_quantiles_and_clip_fraction_from_counts():
    edges = (0.5, 1.0, 2.0, 4.0)
    # 10 norms in (0.5, 1], 10 in (2, 4]: the median is the top of the first group; the clip fraction (C = 1) 1/2.
    rel = NormHistogram(step=0, edges=edges, counts=np.array([0, 10, 0, 10, 0.0]), max_grad_norm=1.0, private=True)
    p10, p50, p90 = rel.quantiles((0.1, 0.5, 0.9))
    assert p50 == pytest.approx(1.0)
    assert p10 == pytest.approx(0.5 * 2**0.2)  # geometric interpolation inside (0.5, 1]
    assert p90 == pytest.approx(2.0 * 2**0.8)
    assert rel.clip_fraction() == pytest.approx(0.5)
    # Noise: negative counts count as 0; only overflow mass reports the last edge (a lower bound).
    assert rel.clip_fraction() == NormHistogram(0, edges, np.array([-3, 10, 0, 10, 0.0]), 1.0, True).clip_fraction()
    assert histogram_quantiles([0, 0, 0, 0, 7.0], edges, [0.5]) == [4.0]
    assert histogram_quantiles([2.0, 0, 0, 0, 0], edges, [0.5]) == [0.25]  # linear in the first bin [0, 0.5]
    assert all(math.isnan(v) for v in histogram_quantiles([-1.0, 0, 0, 0, 0], edges, [0.1, 0.9]))
    with pytest.raises(ValueError, match="Expected 5 counts"):
        histogram_quantiles([1.0, 2.0], edges, [0.5])
    e = geometric_edges(2.0, bins=16)
    assert len(e) == 17 and 2.0 in e and e[0] == pytest.approx(0.02) and e[-1] == pytest.approx(200.0)
    assert 2.0 in geometric_edges(2.0, bins=5) and len(geometric_edges(2.0, bins=5)) == 7  # C inserted


def test_noise_has_the_declared_std():
    from lightning_dp.randomness import TorchSource

    h = GradNormHistogram(noise_std=2.5)
    counts = torch.arange(40, dtype=torch.float64)
    source = TorchSource(0)
    draws = torch.stack([h.noised(counts, 2.5, source) for _ in range(1500)]) - counts
    std = draws.std(0)
    assert ((std - 2.5).abs() < 0.25).all(), std  # each bin within 10%
    assert draws.mean().abs() < 4 * 2.5 / math.sqrt(draws.numel())
    assert not torch.equal(draws[0], draws[1])  # fresh noise per release


# ---------------------------------------------------------------------- runs
def test_wandb_offline_run_has_histogram_epsilon_and_summary(tmp_path):
    import wandb

    s = DPStrategy(noise_multiplier=1.0)
    hist, summary = GradNormHistogram(noise_std=2.0), PrivacySummary()
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    t = trainer(s, callbacks=[hist, summary], logger=logger, log_every_n_steps=5)
    t.fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    wandb.finish()

    (run_file,) = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*", "run-*.wandb"))
    for _ in range(40):  # W&B's service may still be writing the offline file after finish() returns
        rows, summ = [], {}
        for rec in _wandb_records(run_file):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                rows.append(_items(rec.history.item))
            elif kind == "summary":
                summ.update(_items(rec.summary.update))
        if "dp/final_epsilon" in summ and sum(r.get("dp_hist/grad_norm/_type") == "histogram" for r in rows) >= 2:
            break
        time.sleep(0.25)
    hists = [r for r in rows if r.get("dp_hist/grad_norm/_type") == "histogram"]
    assert [r["trainer/global_step"] for r in hists] == [4, 9]  # steps s with (s + 1) % 5 == 0, Lightning's cadence
    last = hists[-1]
    assert last["dp_hist/grad_norm/values"] == pytest.approx(np.clip(hist.last_release.counts, 0, None).tolist())
    assert last["dp_hist/grad_norm/bins"] == pytest.approx(hist.last_release.display_edges())
    assert len(last["dp_hist/grad_norm/values"]) == len(hist.edges) + 1
    assert any("dp/epsilon" in r for r in rows)
    assert any("dp_hist/grad_norm_p50" in r and r["trainer/global_step"] == 9 for r in rows)
    assert summ["dp/final_epsilon"] == pytest.approx(s.epsilon)
    assert summ["dp/steps"] == 10 and summ["dp/noise_multiplier"] == 1.0 and summ["dp/sample_rate"] == 0.1
    assert summ["dp/epsilon_by_mechanism/dp-sgd"] == pytest.approx(s.epsilon)


def test_tensorboard_nonprivate_histogram_is_exact_and_free(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = DPStrategy(noise_multiplier=1.0, max_grad_norm=0.5)
    hist = GradNormHistogram(private=False, num_classes=3, log_every_n_steps=1)
    collect = _Collect(hist)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    t = trainer(s, callbacks=[hist, collect, PrivacySummary()], logger=logger, log_every_n_steps=1)
    with pytest.warns(UserWarning, match="outside the DP guarantee"):
        t.fit(ClassifierModule(mlp()), loader(tensor_data(), 20))

    # Exact statistics, and no privacy charge: every ledger step is the plain gradient release.
    assert {seg.noise_multiplier for seg in s.ledger.segments} == {1.0} and s.ledger.steps == 10
    assert len(collect.rows) == 10
    for rel, norms, labels in collect.rows:
        bins = _exact_bins(norms, hist.edges)
        np.testing.assert_array_equal(rel.counts, np.bincount(bins, minlength=len(hist.edges) + 1))
        assert rel.clip_fraction() == pytest.approx((norms > 0.5).mean())
        np.testing.assert_array_equal(rel.class_counts, np.bincount(labels, minlength=3))
        np.testing.assert_array_equal(rel.class_clipped, np.bincount(labels, weights=norms > 0.5, minlength=3))
        kept = np.bincount(labels, weights=np.minimum(1.0, 0.5 / norms), minlength=3)
        np.testing.assert_allclose(rel.class_retained, kept, rtol=1e-5)
        metrics = hist.metrics_of(rel)
        y = int(labels[0])
        assert metrics[f"nonprivate/class_{y}/retained_weight"] == pytest.approx(kept[y] / (labels == y).sum())

    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    assert "nonprivate/grad_norm" in acc.Tags()["histograms"]
    events = acc.Histograms("nonprivate/grad_norm")
    assert [e.step for e in events] == list(range(10))
    last_rel = collect.rows[-1][0]
    assert list(events[-1].histogram_value.bucket) == pytest.approx(last_rel.counts.tolist())
    assert list(events[-1].histogram_value.bucket_limit) == pytest.approx(last_rel.display_edges()[1:])
    assert events[-1].histogram_value.num == pytest.approx(len(collect.rows[-1][1]))
    clip = acc.Scalars("nonprivate/clip_fraction")
    assert [e.step for e in clip] == list(range(10))
    assert clip[-1].value == pytest.approx((collect.rows[-1][1] > 0.5).mean(), abs=1e-6)
    assert {"nonprivate/grad_norm_p10", "nonprivate/grad_norm_p50", "dp/epsilon"} <= set(acc.Tags()["scalars"])


def test_private_histogram_in_a_run_is_noised_with_the_declared_std_and_accounted():
    # All norms of this MLP are far below 1000: the bins above hold noise only.
    edges = [1e3 * 1.5**k for k in range(30)]
    s = DPStrategy(noise_multiplier=1.0)
    hist = GradNormHistogram(noise_std=3.0, edges=edges, log_every_n_steps=1)
    collect = _Collect(hist)
    trainer(s, max_epochs=2, callbacks=[hist, collect]).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))

    assert hist.edges == [1.0, *edges]  # C inserted as an edge
    assert len(collect.rows) == 20
    noise = []
    for rel, norms, _ in collect.rows:
        assert norms.max() < 1e3
        noise.append(rel.counts[2:])
        assert abs(rel.counts[:2].sum() - len(norms)) < 6 * 3.0 * math.sqrt(2)
    noise = np.concatenate(noise)  # 20 releases × 29 empty bins
    assert noise.std() == pytest.approx(3.0, rel=0.1)
    assert abs(noise.mean()) < 4 * 3.0 / math.sqrt(noise.size)
    # Each step is recorded as one Gaussian combining the gradient (σ = 1) and the histogram (3.0).
    joint = combine_noise_multipliers(1.0, 3.0)
    assert [(seg.noise_multiplier, seg.steps) for seg in s.ledger.segments] == [(pytest.approx(joint), 20)]


def test_private_histograms_are_paid_by_sigma_under_target_epsilon():
    s = DPStrategy(target_epsilon=2.0, target_delta=DELTA)
    hist = GradNormHistogram(noise_std=2.0, num_classes=3, class_noise_std=4.0, log_every_n_steps=2)
    trainer(s, max_epochs=2, callbacks=[hist]).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))

    sigma = s.noise_multiplier
    joint = combine_noise_multipliers(sigma, 2.0, 4.0, 4.0, 4.0)  # histogram + 3 per-class vectors
    segs = [(seg.noise_multiplier, seg.steps) for seg in s.ledger.segments]
    assert segs == [(sigma, 1), (pytest.approx(joint), 1)] * 10  # steps 1, 3, ... are histogrammed
    assert s.epsilon <= 2.0
    assert sigma > calibrate_noise_multiplier(2.0, DELTA, 0.1, 20)  # without the histograms σ would be smaller
    assert hist.last_release.step == 19 and hist.last_release.class_counts.shape == (3,)


def test_privacy_budget_stops_before_the_step_that_exceeds_it(tmp_path):
    eps7, eps8 = (compute_epsilon(1.0, 0.1, t, DELTA) for t in (7, 8))
    budget_value = (eps7 + eps8) / 2  # steps 1..7 fit the budget, the 8th would exceed it
    s = DPStrategy(noise_multiplier=1.0, target_delta=DELTA)
    budget = PrivacyBudget(max_epsilon=budget_value, dirpath=tmp_path, lookahead=16)
    t = trainer(s, max_epochs=2, callbacks=[budget])
    t.fit(ClassifierModule(mlp()), loader(tensor_data(), 20))

    assert s.ledger.steps == 7 and t.global_step == 7 and budget.stopped_at_step == 7
    assert s.epsilon == pytest.approx(eps7) and s.epsilon <= budget_value
    assert budget.evaluations <= 6  # one look-ahead evaluation, then a bisection over 16 steps
    assert budget.checkpoint_path == os.path.join(tmp_path, "privacy-budget-step=7.ckpt")
    state = torch.load(budget.checkpoint_path, weights_only=False)["lightning_dp"]
    assert state["plan"]["released_steps"] == 7

    # Resumed with the same budget: refuses to take another step.
    s2 = DPStrategy(noise_multiplier=1.0, target_delta=DELTA)
    resumed = PrivacyBudget(max_epsilon=budget_value, dirpath=tmp_path)
    t2 = trainer(s2, max_epochs=2, callbacks=[resumed])
    t2.fit(ClassifierModule(mlp()), loader(tensor_data(), 20), ckpt_path=budget.checkpoint_path)
    assert s2.ledger.steps == 7 and resumed.stopped_at_step == 7 and resumed.checkpoint_path is None


def test_privacy_budget_counts_declared_releases_and_refuses_to_run_past_should_stop():
    eps2 = compute_epsilon(combine_noise_multipliers(1.0, 2.0), 0.1, 2, DELTA)
    eps3 = compute_epsilon(combine_noise_multipliers(1.0, 2.0), 0.1, 3, DELTA)
    s = DPStrategy(noise_multiplier=1.0, target_delta=DELTA)
    hist = GradNormHistogram(noise_std=2.0, log_every_n_steps=1)
    budget = PrivacyBudget(max_epsilon=(eps2 + eps3) / 2, save_checkpoint=False)
    t = trainer(s, max_epochs=2, min_steps=10, callbacks=[hist, budget])  # min_steps overrides should_stop
    with pytest.raises(PrivacyTargetError, match="kept training after `should_stop`"):
        t.fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    assert s.ledger.steps == 2 and budget.stopped_at_step == 2


@pytest.mark.parametrize("callback", [GradNormHistogram(), PrivacyBudget(max_epsilon=1.0), PrivacySummary()])
def test_callbacks_need_the_dp_strategy(callback):
    t = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, callbacks=[callback])
    with pytest.raises(DPMisconfigurationError, match="needs `Trainer\\(strategy=DPStrategy"):
        t.fit(ClassifierModule(mlp()), loader(tensor_data(), 20))


@pytest.mark.parametrize(
    "make",
    [
        lambda: GradNormHistogram(noise_std=0.0),
        lambda: GradNormHistogram(edges=[2.0, 1.0]),
        lambda: GradNormHistogram(edges=[0.0, 1.0]),
        lambda: GradNormHistogram(num_classes=0),
        lambda: GradNormHistogram(bins=0),
        lambda: GradNormHistogram(log_every_n_steps=-1),
        lambda: PrivacyBudget(max_epsilon=0.0),
        lambda: PrivacyBudget(max_epsilon=1.0, lookahead=0),
        lambda: PrivacyBudget(max_epsilon=1.0, delta=1.0),
    ],
)
def test_invalid_arguments_are_refused(make):
    with pytest.raises(DPMisconfigurationError):
        make()


def test_labels_must_align_with_the_per_sample_norms():
    hist = GradNormHistogram(num_classes=3, log_every_n_steps=1, label_getter=lambda batch: batch[1][:1])
    t = trainer(DPStrategy(noise_multiplier=1.0), max_steps=1, callbacks=[hist])
    with pytest.raises(DPMisconfigurationError, match="labels for"):
        t.fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
