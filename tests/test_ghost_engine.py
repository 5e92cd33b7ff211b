"""GhostEngine (book-keeping, ghost norms): norms and clipped sums against brute force, and against HookEngine."""

import logging

import lightning as L
import pytest
import torch
from helpers import ClassifierModule, TextNet, brute_force_grads, make_vit, mlp, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import DPStrategy
from lightning_dp.engine import ENGINES, GhostEngine, HookEngine, build_engine
from lightning_dp.errors import DPMisconfigurationError


def _rel_err(a, b):
    return float((a - b).norm() / (b.norm() + 1e-12))


class SeqNet(nn.Module):
    """Linear layers on a (B, T, d) sequence: one ghost (2T² ≤ d·p), one instantiated (2T² > d·p)."""

    def __init__(self, t=5):
        super().__init__()
        self.t = t
        self.inp = nn.Linear(10, 16)  # T=5: 50 ≤ 160 → ghost
        self.narrow = nn.Linear(16, 2, bias=False)  # 50 > 32 → instantiate
        self.head = nn.Linear(2, 3)  # 2-D input, T=1 → ghost

    def forward(self, x):
        h = torch.tanh(self.inp(x.view(x.shape[0], self.t, 10)))
        return self.head(self.narrow(h).mean(1))


class ConvOnly(nn.Module):
    """A ViT-style patch embedding (stride = kernel) and an overlapping, padded, dilated convolution."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 6, 4, stride=4)
        self.conv = nn.Conv2d(6, 5, 3, padding=2, dilation=2, bias=False)
        self.fc = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(self.patch(x))).flatten(1))


class EmbedNet(nn.Module):
    """Embedding with repeated tokens and a padding index, then LayerNorm."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4, padding_idx=0)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.ln(self.emb(x)).sum(1))


class Reused(nn.Module):
    """One Linear called twice per forward (its calls' gradients add up per sample)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.fc(torch.tanh(self.fc(x))))


class Tied(nn.Module):
    """An Embedding whose weight is shared with the output Linear (weight tying): instantiated, not ghost."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(3, 5)
        self.out = nn.Linear(5, 3, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x).mean(1))


class Conv1dNet(nn.Module):
    """Conv1d layers: strided (ghost), padded and dilated without bias (ghost), pointwise (2T² > d·p: instantiated)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(3, 6, 4, stride=2)  # (B, 3, 8) → (B, 6, 3): d=12, p=6, T=3 → ghost
        self.b = nn.Conv1d(6, 5, 3, padding=2, dilation=2, bias=False)  # d=18, p=5 → ghost
        self.c = nn.Conv1d(5, 2, 1)  # d=5, p=2: 18 > 10 → instantiate
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.b(torch.tanh(self.a(x))))
        return self.fc(self.c(h).flatten(1))


CASES = {
    "linear2d": (mlp, lambda: torch.randn(7, 10)),
    "linear3d": (SeqNet, lambda: torch.randn(6, 50)),
    "conv2d": (ConvOnly, lambda: torch.randn(5, 3, 8, 8)),
    "embedding_layernorm": (EmbedNet, lambda: torch.randint(0, 6, (6, 7))),
    "reused_layer": (Reused, lambda: torch.randn(5, 10)),
    "weight_tying": (Tied, lambda: torch.randint(0, 3, (4, 6))),
    "vit_raw_params": (make_vit, lambda: torch.randn(4, 3, 16, 16)),
    "conv1d": (Conv1dNet, lambda: torch.randn(5, 3, 8)),
}


def _reference(model, x, y):
    ref = brute_force_grads(model, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    return ref, norms


def _expected_sum(ref, norms, c):
    factors = (c / (norms + 1e-6)).clamp(max=1.0)
    return {p: torch.einsum("i,i...->...", factors, g) for p, g in ref.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_norms_and_clipped_sum_match_brute_force(case):
    make, make_x = CASES[case]
    torch.manual_seed(0)
    model = make().eval()  # eval: no dropout, so the per-example loop sees the same function
    x = make_x()
    y = torch.randint(0, 3, (x.shape[0],))
    ref, norms = _reference(model, x, y)
    c = float(norms.median())  # some examples clipped, some not
    expected = _expected_sum(ref, norms, c)
    names = {p: n for n, p in model.named_parameters()}
    engine = GhostEngine(model)
    engine.attach()
    # The first micro-batch runs with autograd's parameter gradients (and checks them); later ones skip them.
    for first in (True, False):
        assert engine.check_against_autograd is first
        with engine.capture(x.shape[0]):
            nn.functional.cross_entropy(model(x), y).backward()
        got = engine.clip_and_accumulate(c)
        assert got.dtype == torch.float32 and got.shape == (x.shape[0],)
        assert _rel_err(got, norms) < 1e-4
        summed = engine.pop_summed()
        assert set(summed) == set(expected)
        for p, e in expected.items():
            assert summed[p].dtype == torch.float32
            assert _rel_err(summed[p], e) < 1e-4, names[p]
        assert all(p.grad is None for p in engine.params)
        assert all(p.requires_grad for p in engine.params), "requires_grad restored after capture"
        assert engine._records == {}, "activations and output gradients are freed"


def test_method_choice_per_layer():
    torch.manual_seed(0)
    model = SeqNet()
    engine = GhostEngine(model)
    engine.attach()
    with engine.capture(3):
        model(torch.randn(3, 50)).sum().backward()
    engine.clip_and_accumulate(1.0)
    assert engine.last_methods == {"inp": "ghost", "narrow": "instantiate", "head": "ghost"}

    vit = make_vit()
    engine = GhostEngine(vit)
    engine.attach()
    with engine.capture(2):
        vit(torch.randn(2, 3, 16, 16)).sum().backward()
    engine.clip_and_accumulate(1.0)
    assert engine.last_methods["patch_embed.proj"] == "ghost"
    assert engine.last_methods["blocks.0.attn.qkv"] == "ghost"
    assert {n for _, _, n, _ in engine._broadcast} == {"cls_token", "reg_token", "pos_embed"}

    tied = Tied()
    engine = GhostEngine(tied)
    engine.attach()
    with engine.capture(2):
        tied(torch.randint(0, 3, (2, 4))).sum().backward()
    engine.clip_and_accumulate(1.0)
    assert engine.last_methods == {"emb": "instantiate", "out": "instantiate"}


def test_conv1d_is_native_including_grouped():
    torch.manual_seed(0)
    model = Conv1dNet().eval()
    engine = GhostEngine(model)
    engine.attach()
    with engine.capture(3):
        model(torch.randn(3, 3, 8)).sum().backward()
    engine.clip_and_accumulate(1.0)
    assert engine.last_methods == {"a": "ghost", "b": "ghost", "c": "instantiate", "fc": "ghost"}

    grouped = nn.Sequential(nn.Conv1d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 4, 3)).eval()
    x, y = torch.randn(4, 4, 6), torch.randint(0, 3, (4,))
    ref, norms = _reference(grouped, x, y)
    engine = GhostEngine(grouped)
    engine.attach()
    with engine.capture(4):
        nn.functional.cross_entropy(grouped(x), y).backward()
    assert _rel_err(engine.clip_and_accumulate(1e9), norms) < 1e-4
    assert engine.last_methods["0"] == "instantiate"  # native: per group, instantiated as it is cheaper here
    summed = engine.pop_summed()
    for p, g in ref.items():
        assert _rel_err(summed[p], g.sum(0)) < 1e-4


@pytest.mark.parametrize("chunks", [[6], [2, 4], [1, 2, 3]])
def test_micro_batches_equal_one_batch(chunks):
    torch.manual_seed(1)
    model = make_vit().eval()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 3, (6,))
    ref, norms = _reference(model, x, y)
    c = 0.05
    expected = _expected_sum(ref, norms, c)
    engine = GhostEngine(model)
    engine.attach()
    start, got_norms = 0, []
    for size in chunks:
        xs, ys = x[start : start + size], y[start : start + size]
        with engine.capture(size):
            nn.functional.cross_entropy(model(xs), ys).backward()
        got_norms.append(engine.clip_and_accumulate(c))
        start += size
    assert torch.allclose(torch.cat(got_norms), norms, rtol=1e-4)
    summed = engine.pop_summed()
    for p, e in expected.items():
        assert _rel_err(summed[p], e) < 1e-4
    assert all(float(v.abs().sum()) == 0 for v in engine.pop_summed().values()), "pop_summed resets"


def test_sum_loss_reduction():
    torch.manual_seed(3)
    model = SeqNet()
    x, y = torch.randn(5, 50), torch.randint(0, 3, (5,))
    ref, norms = _reference(model, x, y)
    engine = GhostEngine(model, loss_reduction="sum")
    engine.attach()
    with engine.capture(5):
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    assert _rel_err(engine.clip_and_accumulate(1e6), norms) < 1e-4
    summed = engine.pop_summed()
    for p, g in ref.items():
        assert _rel_err(summed[p], g.sum(0)) < 1e-4


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(4)
    model = make_vit().eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    ref, norms = _reference(model, x, y)
    c = float(norms.median())
    expected = _expected_sum(ref, norms, c)
    engine = GhostEngine(model)
    engine.attach()
    for _ in range(2):  # with and without autograd's parameter gradients
        with engine.capture(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        got = engine.clip_and_accumulate(c)
        assert got.dtype == torch.float32
        assert _rel_err(got, norms) < 1e-2
        summed = engine.pop_summed()
        assert all(v.dtype == torch.float32 for v in summed.values())
        assert (
            _rel_err(torch.cat([summed[p].flatten() for p in ref]), torch.cat([e.flatten() for e in expected.values()]))
            < 1e-2
        )


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class Conv3dNet(nn.Module):
    """A Conv3d (only Opacus's grad sampler, no ghost norm) and a GroupNorm (our rule: instantiated, no notice)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4 * 2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x.view(x.shape[0], 3, 2, 4, 4)))).flatten(1))


def test_fallback_rule_with_notice():
    torch.manual_seed(5)
    model = Conv3dNet().eval()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        engine = GhostEngine(model)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    notices = [m for m in handler.messages if "GhostEngine has no ghost norm" in m]
    assert len(notices) == 1 and "Conv3d" in notices[0] and "GroupNorm" not in notices[0], handler.messages
    x, y = torch.randn(5, 96), torch.randint(0, 3, (5,))
    ref, norms = _reference(model, x, y)
    c = float(norms.median())
    expected = _expected_sum(ref, norms, c)
    engine.attach()
    for _ in range(2):
        with engine.capture(5):
            nn.functional.cross_entropy(model(x), y).backward()
        assert _rel_err(engine.clip_and_accumulate(c), norms) < 1e-4
        summed = engine.pop_summed()
        for p, e in expected.items():
            assert _rel_err(summed[p], e) < 1e-4
    assert engine.last_methods == {"conv": "rule", "norm": "rule", "fc": "ghost"}


def test_text_model_and_errors_like_hook_engine():
    torch.manual_seed(6)
    model = TextNet()
    x, y = torch.randint(0, 20, (6, 4)), torch.randint(0, 3, (6,))
    ref, norms = _reference(model, x, y)
    engine = GhostEngine(model)
    engine.attach()
    with engine.capture(6):
        nn.functional.cross_entropy(model(x), y).backward()
    assert _rel_err(engine.clip_and_accumulate(1.0), norms) < 1e-4

    with pytest.raises(DPMisconfigurationError, match="no trainable parameters"):
        GhostEngine(mlp().requires_grad_(False))

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.s

    scaled = nn.Sequential(nn.Linear(4, 3), Scale())  # no rule: the torch.func fallback traces its op
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ref, norms = _reference(scaled, x, y)
    engine = GhostEngine(scaled)
    engine.attach()
    with engine.capture(5):
        nn.functional.cross_entropy(scaled(x), y).backward()
    assert _rel_err(engine.clip_and_accumulate(1e9), norms) < 1e-5

    # a weight used outside its layer's forward: tests/test_engine.py::test_weight_used_outside_its_layer_is_traced


def test_registered_and_built_by_name():
    assert ENGINES["ghost"] is GhostEngine
    assert isinstance(build_engine("ghost", mlp()), GhostEngine)


def _fit_vit(engine_name, steps=2):
    L.seed_everything(0)
    model = ClassifierModule(make_vit(), lr=1e-2, optimizer="adam")
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(48, 3, 16, 16, generator=g), torch.randint(0, 3, (48,), generator=g))
    strategy = DPStrategy(
        noise_multiplier=0.5,
        max_grad_norm=0.1,
        max_physical_batch_size=5,
        sampling_seed=3,
        noise_seed=4,
        engine=engine_name,
    )
    trainer(strategy, max_steps=steps).fit(model, DataLoader(ds, batch_size=12, shuffle=True))
    return model, strategy


def test_same_update_as_hook_engine_through_trainer(monkeypatch):
    monkeypatch.setattr(DPStrategy, "_epsilon_upper_bound", lambda self: 0.0)  # ε is not under test: skip the PRV
    L.seed_everything(0)
    initial = [p.detach().clone() for p in make_vit().parameters()]
    results = {}
    for name in ("hooks", "ghost"):
        model, strategy = _fit_vit(name)
        assert isinstance(strategy._engine, GhostEngine if name == "ghost" else HookEngine)
        assert model.trainer.global_step == 2
        results[name] = [p.detach().clone() for p in model.parameters()]
    for h, g in zip(results["hooks"], results["ghost"]):
        assert torch.allclose(h, g, atol=1e-5)
    assert any(not torch.allclose(h, p0) for h, p0 in zip(results["hooks"], initial)), "the runs did train"
