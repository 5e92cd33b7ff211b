"""Two nodes × one process on this machine, launched as a multi-node job is: one process per node, each started by
hand with ``NODE_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, joined by Lightning into one gloo group (global ranks 0
and 1, local rank 0 on both). Both "nodes" share this machine's filesystem, so anything guarded by the *local* rank
or the node instead of the global rank would be written twice, and sampling sharded by the local rank would draw
the same shard on both nodes: the checks below catch both. Each test runs for ``DPStrategy`` (DDP: rank 0 writes
each checkpoint file) and ``DPModelParallelStrategy`` (FSDP2: a checkpoint is a folder in which every rank writes its
own shards and global rank 0 alone the metadata ``meta.pt``, which holds the privacy state).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from multinode_script import SAMPLING_SEED, N

from lightning_dp.accounting import compute_epsilon
from lightning_dp.batch_selection import PoissonBatchSampler

SCRIPT = os.path.join(os.path.dirname(__file__), "multinode_script.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Strategy kinds the node script can build (its ``STRATEGIES``): DPStrategy and DPModelParallelStrategy.
STRATEGIES = ["dp", "dp_model_parallel"]

#: Variables of other launchers (torchrun, SLURM) that would make Lightning pick another cluster environment.
_FOREIGN = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": ROOT}
    for key in list(env):
        if key in _FOREIGN or key.startswith(("TORCHELASTIC_", "SLURM_", "PMI_", "OMPI_")):
            del env[key]
    return env


def start_nodes(tmp_path, kind, mode, nodes, devices=1):
    """Start one process per node (each as a node of a multi-node job when ``nodes`` > 1); a node with several
    ``devices`` starts the others itself (Lightning's launcher)."""
    port = free_port()
    procs = []
    for node in range(nodes):
        env = base_env()
        if nodes > 1:
            env.update(NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        args = [sys.executable, SCRIPT, str(tmp_path), kind, mode, str(nodes), str(devices)]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_for(procs):
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:  # one node failing leaves the other waiting on the process group
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]


def results(tmp_path, kind, mode, nodes, devices=1):
    """What each rank saw and wrote, by global rank."""
    tag = f"{nodes}n" + (f"{devices}d" if devices > 1 else "")
    world = nodes * devices
    return [torch.load(tmp_path / f"{kind}-{mode}-{tag}-rank{r}.pt", weights_only=True) for r in range(world)]


def assert_written_once_by_global_rank_zero(run_dir, ranks, steps):
    """One journal with one session and each step once, and one checkpoint per step, whose privacy state global rank
    0 alone wrote: the whole file under DDP; under FSDP2 the folder's ``meta.pt``, beside one shard file per rank.
    """
    assert ranks[0]["journal_calls"] and ranks[0]["checkpoints_written"]
    for r in ranks[1:]:
        assert r["journal_calls"] == [], "a rank other than global rank 0 created, opened or appended to a journal"
        assert r["checkpoints_written"] == [], "a rank other than global rank 0 wrote a checkpoint (or its metadata)"
    journals = sorted((run_dir / "journal").iterdir())
    assert len(journals) == 1, journals
    records = [json.loads(line) for line in journals[0].read_text().splitlines()]
    assert [rec["type"] for rec in records] == ["run", "session"] + ["step"] * steps
    assert [rec["step"] for rec in records[2:]] == list(range(steps))
    written = ranks[0]["checkpoints_written"]
    assert len(written) == len(set(written)) == steps
    assert sorted(os.listdir(run_dir / "ckpt")) == sorted(written)
    for name in written:
        path = run_dir / "ckpt" / name
        if path.is_dir():  # a distributed checkpoint: every rank's shards, and rank 0's metadata
            shards = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))
            assert len(shards) == len(ranks), f"{name}: one shard file per global rank, got {shards}"
            assert sorted(os.listdir(path)) == sorted([".metadata", _METADATA_FILENAME, *shards])
            path = path / _METADATA_FILENAME
        ckpt = torch.load(path, weights_only=False)
        state = ckpt["lightning_dp"]
        assert state["journal"] == os.fspath(journals[0])
        assert state["journal_records"] == ckpt["global_step"]
        assert sum(s["steps"] for s in state["plan"]["ledger"]["segments"]) == ckpt["global_step"]


def assert_same_on_every_rank(ranks):
    for r in ranks[1:]:
        for a, b in zip(ranks[0]["after"], r["after"]):
            assert torch.equal(a, b), "parameters must stay bit-identical across nodes"
        assert r["ledger"] == ranks[0]["ledger"] and r["epsilon"] == ranks[0]["epsilon"]


@pytest.mark.parametrize("kind", STRATEGIES)
def test_two_nodes_equal_one_process_and_write_once(tmp_path, kind):
    """q = 1, negligible noise: the nodes' shards are the halves of the dataset by *global* rank (a shard by local
    rank would be 0::2 on both nodes), their union is the one-process batch, and the update equals one process's.
    """
    wait_for(start_nodes(tmp_path, kind, "exact", 2) + start_nodes(tmp_path, kind, "exact", 1))  # side by side
    two, one = results(tmp_path, kind, "exact", 2), results(tmp_path, kind, "exact", 1)[0]
    assert [(r["node_rank"], r["local_rank"], r["global_rank"], r["world_size"]) for r in two] == [
        (0, 0, 0, 2),
        (1, 0, 1, 2),
    ]
    steps = one["global_step"]
    assert steps == 3 and all(r["global_step"] == steps for r in two)
    for step in range(steps):
        shards = [r["indices"][step] for r in two]
        assert shards == [list(range(0, 40, 2)), list(range(1, 40, 2))]
        assert sorted(shards[0] + shards[1]) == one["indices"][step] == list(range(40))
    assert_same_on_every_rank(two)
    for p2, p1, p0 in zip(two[0]["after"], one["after"], one["before"]):
        assert not torch.allclose(p1, p0)
        assert torch.allclose(p2, p1, atol=1e-5)
    assert two[0]["ledger"] == one["ledger"] and two[0]["epsilon"] == one["epsilon"]
    assert_written_once_by_global_rank_zero(tmp_path / "exact-2n", two, steps)
    assert_written_once_by_global_rank_zero(tmp_path / "exact-1n", [one], steps)


@pytest.mark.parametrize("kind", STRATEGIES)
def test_two_nodes_draw_poisson_batches_by_global_rank(tmp_path, kind):
    """q < 1 with a fixed sampling seed: node r draws exactly global rank r's mask over its shard ``r::2`` (not the
    same mask on both nodes, which would include examples 2i and 2i + 1 together). With fixed noise and sampling
    seeds the run equals one node with two processes (the same global ranks) bit for bit: nothing depends on the
    node or the local rank (e.g. the noise stream, under FSDP2 one per rank's shard, is keyed by the global rank).
    """
    wait_for(start_nodes(tmp_path, kind, "poisson", 2) + start_nodes(tmp_path, kind, "poisson", 1, devices=2))
    ranks, one_node = results(tmp_path, kind, "poisson", 2), results(tmp_path, kind, "poisson", 1, devices=2)
    assert [(r["node_rank"], r["local_rank"], r["global_rank"]) for r in one_node] == [(0, 0, 0), (0, 1, 1)]
    for r, same in zip(ranks, one_node):
        assert r["indices"] == same["indices"]
        assert all(torch.equal(a, b) for a, b in zip(r["after"], same["after"])), "the nodes' run differs"
        assert r["ledger"] == same["ledger"]
    steps, q = 4, 10 / N
    for rank, r in enumerate(ranks):
        expected = PoissonBatchSampler(N, q, steps, num_replicas=2, rank=rank, seed=SAMPLING_SEED)
        assert r["indices"] == [sorted(batch) for batch in expected]
    masks = [[[i // 2 for i in batch] for batch in r["indices"]] for r in ranks]
    assert masks[0] != masks[1], "both nodes drew the same mask"
    assert_same_on_every_rank(ranks)
    assert ranks[0]["sample_rate"] == pytest.approx(q)
    assert ranks[0]["ledger"]["segments"] == [
        {"noise_multiplier": 1.0, "sample_rate": pytest.approx(q), "steps": steps, "mechanism": "dp-sgd"}
    ]
    assert ranks[0]["epsilon"] == pytest.approx(compute_epsilon(1.0, q, steps, 1e-5), rel=1e-9)
    assert_written_once_by_global_rank_zero(tmp_path / "poisson-2n", ranks, steps)
