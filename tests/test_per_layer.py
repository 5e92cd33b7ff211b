"""Per-layer (group-wise) clipping: per-group bounds C/√L against brute force in both engines, clipping inside the
backward pass, the bounds per example, non-finite examples and the noise scale through a Trainer.
"""

import math

import pytest
import torch
from helpers import ClassifierModule, brute_force_grads, loader, make_vit, trainer
from test_fallback import ConvZoo, FoldNet
from test_ghost_engine import EmbedNet, Reused, SeqNet, Tied
from torch import nn
from torch.utils.data import TensorDataset
from zoo_check import group_clipped_sum

from lightning_dp import DPStrategy
from lightning_dp.clipping import CLIPPING_MODES, per_layer_bound, sensitivity
from lightning_dp.engine import ENGINES
from lightning_dp.errors import DPMisconfigurationError, NonFiniteGradientError


def _rel_err(a, b):
    return float((a - b).norm() / (b.norm() + 1e-12))


def _groups(engine, model):
    by_name = dict(model.named_parameters())
    return [[by_name[n] for n in names] for names in engine.clipping_groups]


def _per_layer_reference(ref, groups, c):
    """Brute-force per-layer clipping: per group, factors min(1, C_l/‖g_i^l‖); the flat norms."""
    expected = group_clipped_sum(ref, groups, c / math.sqrt(len(groups)))
    flat = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    return expected, flat


MODELS = {
    "vit": (make_vit, lambda: torch.randn(5, 3, 16, 16)),
    "linear3d": (SeqNet, lambda: torch.randn(5, 50)),
    "embedding_layernorm": (EmbedNet, lambda: torch.randint(0, 6, (5, 7))),
    "reused_layer": (Reused, lambda: torch.randn(5, 10)),
    "weight_tying": (Tied, lambda: torch.randint(0, 3, (5, 6))),
    # a torch.func fallback unit spanning two layers' parameters (its group is split per layer, never counted twice)
    "fallback_unit": (lambda: FoldNet(p=0.0), lambda: torch.randn(5, 3, 4)),
    # grouped and depthwise convolutions (fp32 path) beside single-group ones (linear-layer path)
    "grouped_convs": (ConvZoo, lambda: torch.randn(5, 3, 8, 8)),
}


def test_per_layer_is_a_clipping_mode_with_sensitivity_c():
    assert "per_layer" in CLIPPING_MODES
    assert sensitivity(2.5, "per_layer") == 2.5
    assert per_layer_bound(3.0, 9) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        per_layer_bound(1.0, 0)


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("case", list(MODELS))
def test_per_layer_sums_match_brute_force_and_clip_in_backward(engine_name, case):
    make, make_x = MODELS[case]
    torch.manual_seed(0)
    model = make().eval()
    x = make_x()
    y = torch.randint(0, 3, (x.shape[0],))
    ref = brute_force_grads(model, x, y)
    engine = ENGINES[engine_name](model)
    groups = _groups(engine, model)
    flat_ids = [id(p) for g in groups for p in g]
    assert sorted(flat_ids) == sorted(id(p) for p in engine.params), "the groups partition the parameters"
    flat = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    c = float(flat.median())  # some groups clipped, some not
    expected, _ = _per_layer_reference(ref, groups, c)
    engine.attach()
    for first in (True, False):  # the first micro-batch runs the cross-check; later ones clip in backward
        with engine.capture(x.shape[0]):
            nn.functional.cross_entropy(model(x), y).backward()
            if not first and case != "weight_tying":
                assert engine.per_layer.pending_sq is not None, "groups were clipped inside backward"
        norms = engine.clip_and_accumulate(c, "per_layer")
        assert _rel_err(norms, flat) < 1e-4, "the flat norms are returned in every mode"
        summed = engine.pop_summed()
        for p, e in expected.items():
            assert _rel_err(summed[p], e) < 1e-4
        assert all(p.grad is None for p in engine.params)


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_each_example_within_each_group_bound_and_c(engine_name):
    torch.manual_seed(1)
    model = make_vit().eval()
    engine = ENGINES[engine_name](model, loss_reduction="sum")
    groups = _groups(engine, model)
    c = 0.3
    bound = c / math.sqrt(len(groups))
    engine.attach()
    for _ in range(3):  # one example per micro-batch: the running sum is that example's contribution
        x, y = torch.randn(1, 3, 16, 16) * 10, torch.randint(0, 3, (1,))
        with engine.capture(1):
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        engine.clip_and_accumulate(c, "per_layer")
        summed = engine.pop_summed()
        per_group = torch.stack([torch.sqrt(sum(summed[p].pow(2).sum() for p in g)) for g in groups])
        assert (per_group <= bound * (1 + 1e-6)).all()
        assert float(per_group.max()) == pytest.approx(bound, rel=1e-4), "large gradients are clipped to C_l"
        assert float(per_group.pow(2).sum().sqrt()) <= c * (1 + 1e-6)


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("nonfinite", ["skip", "error"])
def test_nonfinite_examples_in_backward_clipping(engine_name, nonfinite):
    torch.manual_seed(2)
    model = make_vit().eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    engine = ENGINES[engine_name](model, nonfinite=nonfinite)
    groups = _groups(engine, model)
    engine.attach()
    with engine.capture(4):  # the first micro-batch: learns the mode
        nn.functional.cross_entropy(model(x), y).backward()
    engine.clip_and_accumulate(0.1, "per_layer")
    engine.pop_summed()
    poisoned = x.clone()
    poisoned[2] = float("nan")
    keep = torch.tensor([True, True, False, True])
    expected, _ = _per_layer_reference(brute_force_grads(model, x[keep], y[keep]), groups, 0.1)
    with engine.capture(4):
        nn.functional.cross_entropy(model(poisoned), y).backward()
    if nonfinite == "error":
        with pytest.raises(NonFiniteGradientError, match=r"1 of the 4 examples.*positions \[2\]"):
            engine.clip_and_accumulate(0.1, "per_layer")
        assert all(float(v.abs().sum()) == 0 for v in engine.pop_summed().values()), "nothing was added"
        return
    norms = engine.clip_and_accumulate(0.1, "per_layer")
    assert engine.last_nonfinite == 1 and not torch.isfinite(norms[2])
    summed = engine.pop_summed()
    for p, e in expected.items():
        assert torch.isfinite(summed[p]).all()
        assert _rel_err(summed[p], e) < 1e-4


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_probe_norms_and_changed_settings_after_backward_clipping(engine_name):
    torch.manual_seed(3)
    model = make_vit().eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    flat = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in brute_force_grads(model, x, y).values()))
    engine = ENGINES[engine_name](model)
    engine.attach()
    for _ in range(2):
        with engine.capture(4):
            nn.functional.cross_entropy(model(x), y).backward()
        engine.clip_and_accumulate(0.1, "per_layer")
    before = engine.pop_summed()
    with engine.capture(4):
        nn.functional.cross_entropy(model(x), y).backward()
    assert _rel_err(engine.probe_norms(), flat) < 1e-4
    assert all(float(v.abs().sum()) == 0 for v in engine.pop_summed().values()), "probing adds nothing"
    assert any(float(v.abs().sum()) > 0 for v in before.values())
    with engine.capture(4):
        nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(DPMisconfigurationError, match="clipped per layer during its backward pass"):
        engine.clip_and_accumulate(0.2, "per_layer")
    with engine.capture(4):  # the failed call added nothing and left the engine usable
        nn.functional.cross_entropy(model(x), y).backward()
    assert _rel_err(engine.clip_and_accumulate(0.1, "per_layer"), flat) < 1e-4


def test_noise_std_is_sigma_c_over_b_through_a_trainer():
    sigma, c, b = 2.0, 1.5, 20
    net = nn.Sequential(nn.Linear(50, 40, bias=False), nn.Linear(40, 40, bias=False))
    before = net[1].weight.detach().clone()
    ds = TensorDataset(torch.zeros(400, 50), torch.randint(0, 40, (400,)))
    s = DPStrategy(noise_multiplier=sigma, max_grad_norm=c, clipping="per_layer")
    trainer(s, max_steps=1).fit(ClassifierModule(net, lr=1.0), loader(ds, b))
    delta = net[1].weight.detach() - before  # zero inputs: the update is the noise alone
    assert delta.std().item() == pytest.approx(sigma * c / b, rel=0.1)
    assert s.ledger.segments[0].noise_multiplier == sigma


def test_hooks_per_sample_gradients_refused_once_layers_are_clipped_in_backward():
    torch.manual_seed(0)
    model = make_vit().eval()
    engine = ENGINES["hooks"](model)
    engine.attach()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    with engine.capture(4):  # the checked micro-batch keeps everything
        nn.functional.cross_entropy(model(x), y).backward()
    assert set(engine.per_sample_gradients()) == set(engine.params)
    engine.clip_and_accumulate(1.0, "per_layer")
    with engine.capture(4):  # from now on layers are clipped and freed in backward: no partial answer
        nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="per-layer clipping"):
        engine.per_sample_gradients()
    engine.clip_and_accumulate(1.0, "per_layer")


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_gradient_masks_apply_before_per_layer_norms_in_backward(engine_name):
    """Sparse fine-tuning's masks restrict each example's gradient before its group's norm, also when the group is
    clipped inside the backward pass."""
    torch.manual_seed(0)
    model = make_vit().eval()
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 3, (5,))
    ref = brute_force_grads(model, x, y)
    weights = [p for p in model.parameters() if p.dim() == 2][:3]
    masks = {p: (torch.rand(p.shape[0], 1) < 0.5).float() for p in weights}
    ref = {p: g * masks[p] if p in masks else g for p, g in ref.items()}
    engine = ENGINES[engine_name](model)
    engine.set_grad_masks(masks)
    groups = _groups(engine, model)
    flat = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    c = float(flat.median())
    expected, _ = _per_layer_reference(ref, groups, c)
    engine.attach()
    for _ in range(2):  # the checked micro-batch, then clipping in backward
        with engine.capture(x.shape[0]):
            nn.functional.cross_entropy(model(x), y).backward()
        norms = engine.clip_and_accumulate(c, "per_layer")
        assert _rel_err(norms, flat) < 1e-4
        summed = engine.pop_summed()
        for p, e in expected.items():
            assert _rel_err(summed[p], e) < 1e-4
