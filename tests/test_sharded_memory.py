"""The byte counting of ``benchmarks/sharded_memory.py``: local bytes only, on plain tensors and on DTensor shards."""

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "sharded_memory.py")
spec = importlib.util.spec_from_file_location("sharded_memory", PATH)
sharded_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sharded_memory)


def adam_after_one_step(module):
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer


def test_plain_model_counts_every_parameter_once_and_adams_two_moments_and_steps():
    net = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 10))
    net.append(nn.Linear(10, 4))  # 40 + 4 + 40 + 10 + 40 + 4 parameters
    net[2].weight = net[0].weight  # tied: counted once
    assert sharded_memory.parameter_bytes(net) == (40 + 4 + 40 + 10 + 4) * 4
    optimizer = adam_after_one_step(net)
    steps = len(optimizer.state) * optimizer.state[net[0].weight]["step"].element_size()
    assert sharded_memory.optimizer_state_bytes(optimizer) == 2 * (40 + 4 + 40 + 10 + 4) * 4 + steps


@pytest.fixture
def two_rank_mesh():
    """A 2-rank device mesh in this process (the fake backend: no peers, no communication)."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield init_device_mesh("cpu", (2,))
    finally:
        dist.destroy_process_group()


def test_dtensor_parameters_and_state_count_the_local_shard_only(two_rank_mesh):
    """Rank 0 holds 5 of a (10, 4) weight's rows and 2 of its bias's 4 entries: the counts are of those, not of the
    global shapes (which is what ``numel()`` of a DTensor gives)."""
    net = nn.Linear(4, 10, bias=False)
    head = nn.Linear(10, 4)
    net.weight = nn.Parameter(DTensor.from_local(torch.randn(5, 4), two_rank_mesh, [Shard(0)]))
    head.bias = nn.Parameter(DTensor.from_local(torch.randn(2), two_rank_mesh, [Shard(0)]))
    module = nn.Sequential(net, head)
    assert module[0].weight.numel() == 40  # the global size: not what this rank holds
    local = 5 * 4 + 10 * 4 + 2  # sharded weight, plain head weight, sharded head bias
    assert sharded_memory.parameter_bytes(module) == local * 4
    optimizer = adam_after_one_step(module)
    assert isinstance(optimizer.state[module[0].weight]["exp_avg"], DTensor)
    steps = sum(sharded_memory.local_bytes(s["step"]) for s in optimizer.state.values())
    assert sharded_memory.optimizer_state_bytes(optimizer) == 2 * local * 4 + steps
