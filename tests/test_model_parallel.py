"""DPModelParallelStrategy (FSDP2) on 2 CPU processes (gloo): the same mechanism as a brute-force per-example loop and
as DPStrategy, with the model sharded."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_dp import DPModelParallelStrategy
from lightning_dp.errors import DPMisconfigurationError

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "model_parallel_script.py")
sys.path.insert(0, HERE)
from model_parallel_script import make_net  # noqa: E402


def run(out, mode, devices=2, kind="fsdp", ckpt=None, timeout=300):
    root = os.path.dirname(HERE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": root}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    os.makedirs(out, exist_ok=True)
    args = [sys.executable, SCRIPT, str(out), mode, str(devices), kind] + ([str(ckpt)] if ckpt else [])
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tag = f"{mode}-{kind}{'-resumed' if ckpt else ''}-{devices}"
    return [torch.load(os.path.join(out, f"{tag}-rank{r}.pt"), weights_only=True) for r in range(devices)]


def groups_of(net):
    """Per-layer clipping groups: each layer's trained parameters."""
    out = []
    for layer in net:
        params = [p for p in layer.parameters(recurse=False) if p.requires_grad]
        if params:
            out.append(params)
    return out


def brute_force_dp_sgd(mode, steps=2, c=0.5, lr=0.5, n=24):
    """``steps`` steps of DP-SGD without noise, q = 1, one autograd call per example."""
    from helpers import tensor_data

    net = make_net(mode)
    x, y = tensor_data(n=n).tensors
    for step in range(steps):
        if mode == "unfreeze" and step == 1:
            net[0].requires_grad_(True)
        groups = groups_of(net)
        trained = [p for g in groups for p in g]
        total = [torch.zeros_like(p) for p in trained]
        for i in range(n):
            loss = nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1])
            grads = dict(zip(trained, torch.autograd.grad(loss, trained)))
            if mode == "per_layer":
                bound = c / len(groups) ** 0.5
                factors = {}
                for g in groups:
                    norm = torch.sqrt(sum(grads[p].pow(2).sum() for p in g))
                    factors.update({p: torch.clamp(bound / (norm + 1e-12), max=1.0) for p in g})
            else:
                norm = torch.sqrt(sum(v.pow(2).sum() for v in grads.values()))
                factors = dict.fromkeys(trained, torch.clamp(c / (norm + 1e-12), max=1.0))
            for k, p in enumerate(trained):
                total[k] += factors[p] * grads[p]
        with torch.no_grad():
            for p, t in zip(trained, total):
                p -= lr * t / n
    return [p.detach() for p in net.parameters()]


@pytest.mark.parametrize("mode", ["flat", "per_layer", "hooks", "frozen", "unfreeze", "fallback"])
def test_sharded_steps_equal_brute_force_per_example_dp_sgd(tmp_path, mode):
    """q = 1, σ ≈ 0: after two steps the (gathered) sharded parameters equal per-example clipped DP-SGD; both ranks
    end with the same whole model, every parameter sharded; a frozen block is not moved."""
    ranks = run(tmp_path, mode)
    expected = brute_force_dp_sgd(mode)
    assert all(r["world_size"] == 2 and all(r["sharded"]) for r in ranks)
    for got0, got1, want in zip(ranks[0]["after"], ranks[1]["after"], expected):
        assert torch.equal(got0, got1)
        assert torch.allclose(got0, want, atol=1e-4), (got0 - want).abs().max()
    moved = [not torch.equal(a, b) for a, b in zip(ranks[0]["after"], ranks[0]["before"])]
    if mode == "frozen":
        assert moved == [False, False] + [True] * (len(moved) - 2)
    else:
        assert all(moved)


def test_noise_is_sigma_c_over_b_per_coordinate_and_drawn_once_across_ranks(tmp_path):
    """Zero data: the update is the noise. Its std is σC/B on every coordinate (not √2 larger: each coordinate is
    drawn once, by the rank that holds it), and the two shards' draws are independent (not one stream twice)."""
    ranks = run(tmp_path, "noise")
    update = ranks[0]["after"][0] - ranks[0]["before"][0]
    expected = 2.0 * 1.5 / 20
    top, bottom = update[:20], update[20:]  # rank 0's rows, rank 1's rows
    for half in (top, bottom):
        assert half.std().item() == pytest.approx(expected, rel=0.1)
    assert not torch.allclose(top, bottom)
    corr = torch.corrcoef(torch.stack([top.flatten(), bottom.flatten()]))[0, 1]
    assert abs(corr.item()) < 0.1
    assert torch.equal(ranks[0]["after"][0], ranks[1]["after"][0])
    assert ranks[0]["local"]["0.weight"].shape == (20, 50)  # each rank holds half of the weight


def test_ranks_with_different_micro_batch_counts_and_empty_batches_step_together(tmp_path):
    """FSDP2 all-gathers in every forward and backward, so every rank must run as many passes as the busiest one:
    a rank with fewer micro-batches (or an empty Poisson batch) runs passes that add nothing. With the same
    sampling seed and σ ≈ 0 the sharded run equals DPStrategy's."""
    sharded = run(tmp_path / "fsdp", "uneven", kind="fsdp", timeout=150)
    ddp = run(tmp_path / "ddp", "uneven", kind="ddp", timeout=150)
    sizes = list(zip(sharded[0]["sizes"], sharded[1]["sizes"]))
    assert sizes == list(zip(ddp[0]["sizes"], ddp[1]["sizes"]))
    assert any((a + 1) // 2 != (b + 1) // 2 for a, b in sizes), sizes  # different micro-batch counts
    assert any(0 in pair for pair in sizes), sizes  # an empty local batch
    for a, b, before in zip(sharded[0]["after"], ddp[0]["after"], sharded[0]["before"]):
        assert not torch.equal(a, before)
        assert torch.allclose(a, b, atol=1e-5)
    assert sharded[0]["ledger"] == ddp[0]["ledger"]


def test_ledger_equals_dp_strategy_for_the_same_plan(tmp_path):
    sharded = run(tmp_path / "fsdp", "resume", kind="fsdp")
    ddp = run(tmp_path / "ddp", "resume", kind="ddp")
    assert sharded[0]["ledger"] == sharded[1]["ledger"] == ddp[0]["ledger"]
    assert sharded[0]["epsilon"] == ddp[0]["epsilon"]
    assert sharded[0]["global_step"] == 6


@pytest.mark.parametrize("mode", ["resume", "resume_full"])
def test_resume_from_a_sharded_or_full_checkpoint_equals_an_uninterrupted_run(tmp_path, mode):
    """Fixed noise and sampling seeds (streams keyed by step): stopping at step 3, saving a checkpoint (a folder of
    shards, or one full file) and resuming gives the parameters and ledger of the run that never stopped."""
    whole = run(tmp_path / "whole", mode)
    first = run(tmp_path / "interrupted", mode)
    assert first[0]["global_step"] == 3
    ckpt = tmp_path / "interrupted" / "mid.ckpt"
    assert ckpt.is_dir() if mode == "resume" else ckpt.is_file()
    resumed = run(tmp_path / "interrupted", mode, ckpt=ckpt)
    assert resumed[0]["global_step"] == 6
    assert resumed[0]["ledger"] == whole[0]["ledger"]
    for a, b in zip(resumed[0]["after"], whole[0]["after"]):
        assert torch.allclose(a, b, atol=1e-6)


def test_tensor_parallelism_is_refused_with_the_fix():
    with pytest.raises(DPMisconfigurationError, match="tensor_parallel_size=1"):
        DPModelParallelStrategy(noise_multiplier=1.0, tensor_parallel_size=2)


def test_bf16_parameters_with_fp32_sharded_parameters_and_reduction(tmp_path):
    """FSDP2's MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the layers run in bf16, the clipped sums
    are formed and reduce-scattered in fp32 and the sharded parameters stay fp32; the update is brute-force DP-SGD's
    up to bf16 rounding (the autograd cross-check runs at bf16's tolerance)."""
    ranks = run(tmp_path, "bf16")
    expected = brute_force_dp_sgd("bf16")
    for got, want, before in zip(ranks[0]["after"], expected, ranks[0]["before"]):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= 0.1 * (want - before).norm()


def test_a_sharded_strategy_given_to_a_second_trainer_says_why_not():
    import lightning as L

    s = DPModelParallelStrategy(noise_multiplier=1.0)
    L.Trainer(accelerator="cpu", devices=1, strategy=s, logger=False)
    with pytest.raises(DPMisconfigurationError, match="already belongs to another Trainer"):
        L.Trainer(accelerator="cpu", devices=1, strategy=s, logger=False)


def test_a_module_that_was_not_sharded_is_refused_with_the_fix():
    from lightning_dp.model_parallel import check_sharded

    with pytest.raises(DPMisconfigurationError, match="call torch.distributed.fsdp.fully_shard"):
        check_sharded(make_net("flat"))
