"""Per-sample gradients and the clipped sum against brute force."""

import pytest
import torch
from helpers import ConvNet, TextNet, brute_force_grads, make_vit, mlp
from torch import nn

from lightning_dp.engine import HookEngine, register_grad_sampler
from lightning_dp.errors import DPMisconfigurationError


def _engine_grads(model, x, y):
    engine = HookEngine(model)
    engine.attach()
    with engine.capture(x.shape[0]):
        nn.functional.cross_entropy(model(x), y).backward()
    grads = engine.per_sample_gradients()
    return engine, grads


def _rel_err(a, b):
    return float((a - b).norm() / (b.norm() + 1e-12))


@pytest.mark.parametrize(
    "make, x",
    [
        (mlp, lambda: torch.randn(7, 10)),
        (ConvNet, lambda: torch.randn(5, 3, 8, 8)),
        (TextNet, lambda: torch.randint(0, 20, (6, 4))),
        (make_vit, lambda: torch.randn(4, 3, 16, 16)),
    ],
    ids=["mlp", "convnet", "embedding", "vit"],
)
def test_per_sample_gradients_match_brute_force(make, x):
    torch.manual_seed(0)
    model = make().eval()  # eval: no dropout, so the per-example loop sees the same function
    x = x()
    y = torch.randint(0, 3, (x.shape[0],))
    ref = brute_force_grads(model, x, y)
    _, got = _engine_grads(model, x, y)
    names = {p: n for n, p in model.named_parameters()}
    assert set(got) == set(ref), "every trainable parameter gets per-sample gradients"
    for p, g in got.items():
        assert g.shape == (x.shape[0], *p.shape)
        assert _rel_err(g, ref[p]) < 1e-4, names[p]


def test_vit_raw_parameters_are_covered_and_state_dict_unchanged():
    model = make_vit()
    keys = list(model.state_dict())
    engine = HookEngine(model)
    names = {n for _, _, n, _ in engine._broadcast}
    assert names == {"cls_token", "reg_token", "pos_embed"}
    engine.attach()
    with engine.capture(2):
        model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert list(model.state_dict()) == keys
    assert isinstance(model.cls_token, nn.Parameter)


@pytest.mark.parametrize("chunks", [[6], [2, 4], [1, 2, 3]])
def test_clipped_sum_matches_brute_force(chunks):
    torch.manual_seed(1)
    model = make_vit().eval()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 3, (6,))
    ref = brute_force_grads(model, x, y)
    c = 0.05
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    factors = (c / (norms + 1e-6)).clamp(max=1)
    assert (factors < 1).any() and (factors == 1).any() or True
    expected = {p: torch.einsum("i,i...->...", factors, g) for p, g in ref.items()}
    engine = HookEngine(model)
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


def test_clipping_actually_bounds_each_example():
    torch.manual_seed(2)
    model = mlp()
    x, y = torch.randn(1, 10) * 100, torch.randint(0, 3, (1,))
    engine = HookEngine(model)
    engine.attach()
    with engine.capture(1):
        nn.functional.cross_entropy(model(x), y).backward()
    norm = engine.clip_and_accumulate(0.5)
    assert norm.item() > 0.5
    total = torch.sqrt(sum(g.pow(2).sum() for g in engine.pop_summed().values()))
    assert total.item() == pytest.approx(0.5, rel=1e-4)


def test_sum_loss_reduction():
    torch.manual_seed(3)
    model = mlp()
    x, y = torch.randn(5, 10), torch.randint(0, 3, (5,))
    ref = brute_force_grads(model, x, y)
    engine = HookEngine(model, loss_reduction="sum")
    engine.attach()
    with engine.capture(5):
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    for p, g in engine.per_sample_gradients().items():
        assert _rel_err(g, ref[p]) < 1e-4


def test_bf16_autocast_norms_close_to_fp32():
    torch.manual_seed(4)
    model = make_vit().eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    ref = brute_force_grads(model, x, y)
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    engine = HookEngine(model)
    engine.attach()
    with engine.capture(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    grads = engine.per_sample_gradients()
    assert all(g.dtype == torch.float32 for g in grads.values())
    norms = engine.clip_and_accumulate(1.0)
    assert _rel_err(norms, ref_norms) < 2e-2


def test_layer_without_rule_is_covered_by_the_fallback_and_a_rule_makes_it_native():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x * self.s

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), Scale())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ref = brute_force_grads(model, x, y)
    engine, got = _engine_grads(model, x, y)
    assert engine._fallback.regions == {model[1]}, "the fallback traces the ops of the layer without a rule"
    for p, g in ref.items():
        assert _rel_err(got[p], g) < 1e-5
    engine.clip_and_accumulate(1.0)  # the exact cross-check agrees
    # registering a rule makes it native (nothing left to the fallback)
    register_grad_sampler(Scale)(lambda layer, acts, back: {layer.s: acts[0] * back})
    assert HookEngine(model)._fallback.regions == set()


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_weight_used_outside_its_layer_is_traced_at_the_op(engine_name, caplog):
    from lightning_dp.engine import ENGINES

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(nn.functional.linear(self.fc(x), self.fc.weight))

    torch.manual_seed(0)
    model = Tied()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ref = brute_force_grads(model, x, y)
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    engine = ENGINES[engine_name](model)
    engine.attach()
    for _ in range(2):  # the checked micro-batch (every op watched), then a plain one
        with caplog.at_level("INFO"), engine.capture(6):
            nn.functional.cross_entropy(model(x), y).backward()
        assert _rel_err(engine.clip_and_accumulate(1e9), ref_norms) < 1e-5
        summed = engine.pop_summed()
        for p, g in ref.items():
            assert _rel_err(summed[p], g.sum(0)) < 1e-5
    notices = [r.getMessage() for r in caplog.records if "outside its layer's forward" in r.getMessage()]
    assert len(notices) == 1 and "'fc.weight'" in notices[0]


class _HiddenMatmul(torch.autograd.Function):
    """Uses a weight inside a custom autograd Function: no hook and no torch function mode sees the use."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, g.t() @ x


class HiddenUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return _HiddenMatmul.apply(self.fc(x), self.fc.weight)


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_hidden_use_of_a_weight_is_caught_and_named(engine_name):
    from lightning_dp.engine import ENGINES

    model = HiddenUse()
    engine = ENGINES[engine_name](model)
    engine.attach()
    with engine.capture(3):
        model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(DPMisconfigurationError, match=r"'fc.weight'.*Cause: use outside the forward.*rule .* is right"):
        engine.clip_and_accumulate(1.0)


def test_wrong_rule_is_caught_and_named():
    class Doubler(nn.Linear):
        def forward(self, x):
            return super().forward(x)

    def wrong(layer, acts, back):
        return {layer.weight: 2 * torch.einsum("bo,bi->boi", back, acts[0]), layer.bias: back}

    register_grad_sampler(Doubler)(wrong)
    model = nn.Sequential(Doubler(4, 3))
    engine = HookEngine(model)
    engine.attach()
    with engine.capture(3):
        model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(DPMisconfigurationError, match=r"'0.weight'.*Cause: rule: the per-sample rule .*wrong"):
        engine.clip_and_accumulate(1.0)


def test_no_trainable_parameters():
    model = mlp().requires_grad_(False)
    with pytest.raises(DPMisconfigurationError, match="no trainable parameters"):
        HookEngine(model)


def test_gradient_checkpointing_detected_at_runtime():
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return checkpoint(self.fc, x, use_reentrant=True)

    model = Ckpt()
    engine = HookEngine(model)
    engine.attach()
    with pytest.raises(DPMisconfigurationError, match="checkpointing"):
        with engine.capture(2):
            model(torch.randn(2, 4, requires_grad=True)).sum().backward()


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_convnext_film_parameters_match_brute_force(engine_name):
    """timm ConvNeXt with FiLM selection: LayerNorm2d (channels of NCHW) and the head's norm and linear layer."""
    import timm

    from lightning_dp.engine import ENGINES
    from lightning_dp.finetune import select_parameters

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3).eval()
    select_parameters(model, "norm+head")
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 3, (3,))
    ref = brute_force_grads(model, x, y)
    engine = ENGINES[engine_name](model)
    engine.attach()
    with engine.capture(3):
        nn.functional.cross_entropy(model(x), y).backward()
    norms = engine.clip_and_accumulate(1e9)  # no clipping: the sum is the plain sum of per-sample gradients
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    assert torch.allclose(norms, ref_norms, rtol=1e-4)
    summed = engine.pop_summed()
    for p, g in ref.items():
        assert _rel_err(summed[p], g.sum(0)) < 1e-4


def test_embedding_with_padding_index_matches_brute_force():
    """The padding row gets no gradient (autograd's rule); Opacus's grad sampler would add the padding tokens' output
    gradients to it.
    """
    from test_ghost_engine import EmbedNet

    torch.manual_seed(0)
    model = EmbedNet().eval()
    x = torch.randint(0, 6, (5, 7))
    x[:, 0] = 0  # every example has a padding token
    y = torch.randint(0, 3, (5,))
    ref = brute_force_grads(model, x, y)
    engine, got = _engine_grads(model, x, y)
    for p, g in got.items():
        assert _rel_err(g, ref[p]) < 1e-4
    assert got[model.emb.weight][:, 0].abs().max() == 0
    engine.clip_and_accumulate(1.0)  # the cross-check agrees with autograd


def test_layout_the_rule_does_not_handle_is_named():
    """A rule that reads its input as contiguous NCHW storage (as Opacus's conv sampler assumes) is wrong on a
    channels-last tensor: the cross-check names the layout as the cause.
    """

    class ChannelScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * self.w.view(1, -1, 1, 1)

    def nchw_rule(layer, acts, back):
        x = acts[0]
        as_nchw = x.as_strided(x.shape, torch.empty(x.shape).stride())  # the storage read as contiguous NCHW
        return {layer.w: (as_nchw * back).sum((2, 3))}

    register_grad_sampler(ChannelScale)(nchw_rule)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ChannelScale(), nn.Flatten(), nn.Linear(64, 3))
    x = torch.randn(3, 3, 6, 6)
    for fmt, error in ((torch.contiguous_format, None), (torch.channels_last, "Cause: layout: layer '1'")):
        model = model.to(memory_format=fmt)
        engine = HookEngine(model)
        engine.attach()
        with engine.capture(3):
            model(x.to(memory_format=fmt)).sum().backward()
        if error is None:
            engine.clip_and_accumulate(1.0)
        else:
            with pytest.raises(
                DPMisconfigurationError, match=rf"'1.w'.*{error} \(ChannelScale\) ran on a channels_last"
            ):
                engine.clip_and_accumulate(1.0)
        engine.detach()
