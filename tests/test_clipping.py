"""Clipping variants (flat, normalized, automatic) against brute force, in both engines, and their noise scale."""

import pytest
import torch
from helpers import ClassifierModule, brute_force_grads, loader, make_vit, trainer
from torch import nn
from torch.utils.data import TensorDataset

from lightning_dp import DPStrategy
from lightning_dp.engine import ENGINES


def _summed(engine_name, model, x, y, c, mode):
    engine = ENGINES[engine_name](model)
    engine.attach()
    with engine.capture(x.shape[0]):
        nn.functional.cross_entropy(model(x), y).backward()
    engine.clip_and_accumulate(c, mode)
    return engine.pop_summed()


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("mode", ["flat", "normalized", "automatic"])
def test_clipped_sums_match_brute_force(engine_name, mode):
    torch.manual_seed(0)
    model = make_vit().eval()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 3, (6,))
    ref = brute_force_grads(model, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    c = float(norms.median())  # some examples clipped, some not
    factors = {
        "flat": (c / (norms + 1e-6)).clamp(max=1),
        "normalized": torch.minimum(torch.full_like(norms, 1 / c), 1 / (norms + 1e-6)),
        "automatic": c / (norms + 0.01),
    }[mode]
    got = _summed(engine_name, model, x, y, c, mode)
    for p, g in ref.items():
        expected = torch.einsum("i,i...->...", factors, g)
        assert float((got[p] - expected).norm() / expected.norm()) < 1e-4
    contrib = factors * norms
    bound = 1.0 if mode == "normalized" else c
    assert (contrib <= bound * (1 + 1e-6)).all()


def test_normalized_is_flat_divided_by_c():
    torch.manual_seed(1)
    model = make_vit().eval()
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 3, (5,))
    flat = _summed("ghost", model, x, y, 0.3, "flat")
    norm = _summed("ghost", model, x, y, 0.3, "normalized")
    for p in flat:
        assert torch.allclose(norm[p] * 0.3, flat[p], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mode, sens", [("normalized", 1.0), ("automatic", 1.5), ("flat", 1.5)])
def test_noise_std_is_sigma_times_sensitivity_over_b(mode, sens):
    sigma, c, b = 2.0, 1.5, 20
    net = nn.Linear(50, 40, bias=False)
    before = net.weight.detach().clone()
    ds = TensorDataset(torch.zeros(400, 50), torch.randint(0, 40, (400,)))
    s = DPStrategy(noise_multiplier=sigma, max_grad_norm=c, clipping=mode)
    trainer(s, max_steps=1).fit(ClassifierModule(net, lr=1.0), loader(ds, b))
    delta = net.weight.detach() - before
    assert delta.std().item() == pytest.approx(sigma * sens / b, rel=0.1)
    assert s.ledger.segments[0].noise_multiplier == sigma  # identical accounting


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_grad_masks_restrict_per_sample_gradients_before_clipping(engine_name):
    torch.manual_seed(2)
    model = make_vit().eval()
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 3, (5,))
    ref = brute_force_grads(model, x, y)
    qkv = model.blocks[0].attn.qkv.weight
    masks = {qkv: (torch.arange(qkv.shape[0]) % 3 == 0).float().view(-1, 1), model.pos_embed: torch.zeros(1)}
    masked = {p: g * masks[p].unsqueeze(0) if p in masks else g for p, g in ref.items()}
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in masked.values()))
    c = float(norms.median())
    factors = (c / (norms + 1e-6)).clamp(max=1)
    engine = ENGINES[engine_name](model)
    engine.set_grad_masks(masks)
    engine.attach()
    with engine.capture(5):
        nn.functional.cross_entropy(model(x), y).backward()
    got_norms = engine.clip_and_accumulate(c)  # the first step also checks the unmasked sums against autograd
    assert torch.allclose(got_norms, norms, rtol=1e-4)
    summed = engine.pop_summed()
    for p, g in masked.items():
        expected = torch.einsum("i,i...->...", factors, g)
        assert float((summed[p] - expected).norm()) <= 1e-4 * float(expected.norm()) + 1e-7
    assert summed[model.pos_embed].abs().max() == 0
