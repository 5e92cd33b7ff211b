"""Work in the backward hooks: layers are processed as their gradients arrive, records are emptied, a rule may run a
module's forward there (``torch.func``), and a capture runs one forward and one backward.
"""

import pytest
import torch
from helpers import brute_force_grads
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_dp.engine import ENGINES, GhostEngine, register_grad_sampler
from lightning_dp.engine.layers import in_backward
from lightning_dp.errors import DPMisconfigurationError


class Gate(nn.Module):
    """``x * sigmoid(w)``: its rule below computes per-sample gradients by running the module under ``torch.func``."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * torch.sigmoid(self.w)


@register_grad_sampler(Gate)
def _gate_rule(layer, activations, backprops):
    params = {"w": layer.w.detach()}

    def pulled(p, x, g):  # <output(x; p), g>: its gradient in p is the per-sample gradient
        return (functional_call(layer, p, (x.unsqueeze(0),)).squeeze(0) * g).sum()

    per_sample = vmap(grad(pulled), in_dims=(None, 0, 0))(params, activations[0], backprops)
    return {layer.w: per_sample["w"]}


def _net():
    return nn.Sequential(nn.Linear(6, 5), Gate(5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_a_rule_may_run_the_module_forward_inside_the_backward_hook(engine_name, clipping):
    torch.manual_seed(0)
    model = _net()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    ref = brute_force_grads(model, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    engine = ENGINES[engine_name](model)
    engine.attach()
    for _ in range(2):  # the second micro-batch clips per layer inside backward
        with engine.capture(7):
            nn.functional.cross_entropy(model(x), y).backward()
        got = engine.clip_and_accumulate(1e9, clipping)  # nothing clipped: the sums are Σ_i g_i
        assert torch.allclose(got, norms, rtol=1e-4)
        summed = engine.pop_summed()
        for p, g in ref.items():
            assert torch.allclose(summed[p], g.sum(0), rtol=1e-4, atol=1e-6)


def test_layers_are_processed_during_backward_and_their_records_emptied():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    engine = GhostEngine(model)
    engine.attach()
    seen = []
    ready = engine._group_ready
    engine._group_ready = lambda group, defer=False: (seen.append((group.name, in_backward())), ready(group, defer))
    with engine.capture(4):
        out = model(torch.randn(4, 6))
        held = [r for records in engine._records.values() for r in records]
        out.sum().backward()
    assert seen == [("2", True), ("0", True)], "each layer is processed in backward, as its gradient arrives"
    assert engine._records == {} and all(r.inputs == [] and r.grad is None for r in held)
    assert engine.last_methods == {"0": "ghost", "2": "ghost"}
    engine.clip_and_accumulate(1.0)


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_one_forward_and_one_backward_per_capture(engine_name):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    engine = ENGINES[engine_name](model)
    engine.check_against_autograd = False
    engine.attach()
    x = torch.randn(3, 4)
    with pytest.raises(DPMisconfigurationError, match="micro-batch"):
        with engine.capture(3):
            loss = model(x).sum()
            loss.backward(retain_graph=True)
            loss.backward()
    with engine.capture(3):  # the engine is usable again
        model(x).sum().backward()
    assert engine.clip_and_accumulate(1.0).shape == (3,)
