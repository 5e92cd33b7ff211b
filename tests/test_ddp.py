"""DDP on 2 CPU processes (gloo), launched the way Lightning launches them, against single-process runs."""

import os
import subprocess
import sys

import pytest
import torch

from lightning_dp.accounting import compute_epsilon

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_script.py")


def run(tmp_path, mode, devices, ckpt=None):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": root}
    env.pop("LOCAL_RANK", None)
    args = [sys.executable, SCRIPT, str(tmp_path), mode, str(devices)] + ([str(ckpt)] if ckpt else [])
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tag = f"{mode}{'-resumed' if ckpt else ''}-{devices}"
    return [torch.load(tmp_path / f"{tag}-rank{r}.pt", weights_only=True) for r in range(devices)]


def test_noise_std_is_sigma_c_over_b_with_two_ranks(tmp_path):
    ranks = run(tmp_path, "zero", 2)
    assert all(r["world_size"] == 2 for r in ranks)
    delta = ranks[0]["after"][0] - ranks[0]["before"][0]
    expected = 2.0 * 1.5 / 20  # σ·C/B with B the global logical batch: not √2 larger (noise once), not smaller
    assert delta.std().item() == pytest.approx(expected, rel=0.1)
    assert torch.equal(ranks[0]["after"][0], ranks[1]["after"][0])


@pytest.mark.parametrize("mode", ["exact", "exact_per_layer"])
def test_two_ranks_equal_one_process_without_noise(tmp_path, mode):
    """Flat and per-layer clipping (clipped inside backward from the second micro-batch on) under DDP."""
    two = run(tmp_path, mode, 2)
    one = run(tmp_path, mode, 1)[0]
    assert sum(two[0]["sizes"]) + sum(two[1]["sizes"]) == 3 * 40  # q = 1: the whole set every step, split by rank
    for p2, p1, p0 in zip(two[0]["after"], one["after"], one["before"]):
        assert not torch.allclose(p1, p0)
        assert torch.allclose(p2, p1, atol=1e-5)


def test_audit_canaries_are_added_once_not_once_per_rank(tmp_path):
    """Zero data and q = 1: the update is the "in" canaries' clipped contributions (C = 1.5 each, lr 1, B = 40) on
    their coordinates; with two ranks it equals one process (canaries added on rank 0 only, before the all-reduce)."""
    two = run(tmp_path, "audit", 2)
    one = run(tmp_path, "audit", 1)[0]
    moved = (one["after"][0] - one["before"][0]).abs()
    assert 20 < int((moved > 1e-3).sum()) < 80  # about half of the 100 canaries are "in"
    assert moved.max().item() == pytest.approx(2 * 1.5 / 40, rel=1e-3)  # two steps, each C/B (not 2·C/B)
    assert torch.allclose(two[0]["after"][0], one["after"][0], atol=1e-6)
    assert torch.equal(two[0]["after"][0], two[1]["after"][0])


def test_training_keeps_ranks_identical_and_ledger_matches(tmp_path):
    ranks = run(tmp_path, "train", 2)
    for a, b in zip(ranks[0]["after"], ranks[1]["after"]):
        assert torch.equal(a, b), "parameters must stay bit-identical across ranks"
    assert ranks[0]["ledger"] == ranks[1]["ledger"] and ranks[0]["epsilon"] == ranks[1]["epsilon"]
    assert ranks[0]["global_step"] == 8 and ranks[0]["sample_rate"] == pytest.approx(10 / 200)
    assert ranks[0]["epsilon"] == pytest.approx(compute_epsilon(1.0, 10 / 200, 8, 1e-5), rel=1e-9)
    # the ranks drew different local batches and ran different numbers of micro-batches, yet finished
    assert ranks[0]["sizes"] != ranks[1]["sizes"]
    assert ranks[0]["micro_batches"] != ranks[1]["micro_batches"]


def test_checkpoint_restores_the_ledger_on_every_rank(tmp_path):
    first = run(tmp_path, "resume", 2)
    assert first[0]["global_step"] == 4 and (tmp_path / "mid.ckpt").exists()
    resumed = run(tmp_path, "resume", 2, ckpt=tmp_path / "mid.ckpt")
    for r in resumed:
        assert r["global_step"] == 8
        assert r["ledger"]["segments"] == [
            {"noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 8, "mechanism": "dp-sgd"}
        ]


@pytest.mark.parametrize("mode", ["adaptive", "adaptive_per_layer"])
def test_adaptive_clipping_on_two_ranks_counts_the_global_batch_like_one_process(tmp_path, mode):
    """The count is summed over ranks with its noise drawn once: two ranks move C exactly as one process does."""
    from lightning_dp.accounting import combine_noise_multipliers

    two = run(tmp_path, mode, 2)
    one = run(tmp_path, mode, 1)[0]
    assert two[0]["bounds"] == two[1]["bounds"], "every rank clips with the same C"
    assert len(set(one["bounds"])) == 3, "C moved at every step"
    assert two[0]["bounds"] == pytest.approx(one["bounds"], rel=1e-6)
    for p2, p1 in zip(two[0]["after"], one["after"]):
        assert torch.allclose(p2, p1, atol=1e-5)
    groups = 2 if mode == "adaptive_per_layer" else 1
    joint = combine_noise_multipliers(1e-7, 2.0 / (0.5 * groups**0.5))  # centred counts: sensitivity √L/2
    assert two[0]["ledger"] == two[1]["ledger"] == one["ledger"]
    assert [s["noise_multiplier"] for s in one["ledger"]["segments"]] == [pytest.approx(joint, rel=1e-12)]
