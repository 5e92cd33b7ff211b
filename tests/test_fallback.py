"""The torch.func fallback: where it applies, exactness (dropout replayed, any memory format), and its errors."""

import logging

import pytest
import torch
from helpers import ClassifierModule, brute_force_grads, trainer
from model_zoo import ZOO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import DPStrategy, fix_model
from lightning_dp.engine import ENGINES, HookEngine
from lightning_dp.errors import DPMisconfigurationError


def _rel(a, b):
    return float((a - b).norm() / (b.norm() + 1e-300))


def _per_example_of_batched_forward(model, x, y, state):
    """Per-example gradients of the forward that the batch actually ran (its dropout masks): one backward per example
    through the same batched graph (examples do not interact).
    """
    torch.set_rng_state(state)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    per = {p: [] for p in params}
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        for p, g in zip(params, grads):
            per[p].append(torch.zeros_like(p) if g is None else g)
    return {p: torch.stack(v) for p, v in per.items()}


def _engine_norms_and_sum(engine_name, model, x, y, state):
    engine = ENGINES[engine_name](model)
    engine.attach()
    torch.set_rng_state(state)
    with engine.capture(x.shape[0]):
        nn.functional.cross_entropy(model(x), y).backward()
    per = engine.per_sample_gradients() if isinstance(engine, HookEngine) else None
    norms = engine.clip_and_accumulate(1e9)
    return engine, per, norms, engine.pop_summed()


class FoldingBlock(nn.Module):
    """Folds tokens into the batch (so it becomes a unit), with dropout and a raw scale inside."""

    def __init__(self, d=6, p=0.3):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(p)
        self.gamma = nn.Parameter(torch.randn(d))

    def forward(self, x):
        b, t, d = x.shape
        h = self.drop(torch.tanh(self.fc(x.reshape(b * t, d)))).reshape(b, t, d)
        return x + h * self.gamma


class FoldNet(nn.Module):
    def __init__(self, p=0.3):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.block = FoldingBlock(p=p)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.block(self.inp(x)).mean(1))


def _swin_with_dropout():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(
        num_classes=3, img_size=16, patch_size=2, window_size=4, embed_dim=8, depths=(1, 1), num_heads=(1, 2),
        drop_rate=0.2, attn_drop_rate=0.2, proj_drop_rate=0.2, drop_path_rate=0.3,
    )  # fmt: skip


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize(
    "make, shape", [(FoldNet, (5, 3, 4)), (_swin_with_dropout, (4, 3, 16, 16))], ids=["fold", "swin"]
)
def test_dropout_inside_a_unit_is_the_real_forwards(make, shape, engine_name):
    """In train mode with dropout and drop-path, the unit's per-example recomputation draws the masks of the real
    forward (the generator is replayed), so per-sample gradients are those of the forward that made the loss.
    """
    torch.manual_seed(0)
    model = make().double().train()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    state = torch.get_rng_state()
    ref = _per_example_of_batched_forward(model, x, y, state)
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    engine, per, norms, summed = _engine_norms_and_sum(engine_name, model, x, y, state)
    assert engine._fallback.units, "a unit was chosen"
    assert _rel(norms.double(), ref_norms) < 1e-5
    for p, g in ref.items():
        assert _rel(summed[p].double(), g.sum(0)) < 1e-5
        if per is not None:
            assert _rel(per[p].double(), g) < 1e-5


class SharedDraw(nn.Module):
    """One random draw for the whole batch: per example it cannot be replayed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        b, t, d = x.shape
        return self.fc(x.reshape(b * t, d)).reshape(b, t, d) * (1 + torch.rand(()))


def test_random_draw_that_cannot_be_replayed_is_refused():
    model = nn.Sequential(SharedDraw(), nn.Flatten(), nn.Linear(8, 3))
    engine = HookEngine(model)
    engine.attach()
    with engine.capture(3):
        nn.functional.cross_entropy(model(torch.randn(3, 2, 4)), torch.tensor([0, 1, 2])).backward()
    with pytest.raises(DPMisconfigurationError, match=r"Recomputing '0' \(SharedDraw\).*did not reproduce the forward"):
        engine.clip_and_accumulate(1.0)


class ConvZoo(nn.Module):
    """Convolutions of every kind the engines handle natively."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, groups=4, padding="same", bias=False)
        self.depthwise = nn.Conv2d(8, 8, 5, groups=8, padding=2, padding_mode="reflect")
        self.even = nn.Conv2d(8, 6, 4, padding="same", dilation=2)
        self.strided = nn.Conv2d(6, 6, 3, stride=2, padding=1, padding_mode="circular")
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for conv in (self.plain, self.grouped, self.depthwise, self.even, self.strided):
            x = torch.tanh(conv(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_convolutions_in_any_memory_format(engine_name, memory_format):
    torch.manual_seed(0)
    model = ConvZoo().double().to(memory_format=memory_format)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64).to(memory_format=memory_format)
    y = torch.randint(0, 3, (4,))
    ref = brute_force_grads(model, x, y)
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    state = torch.get_rng_state()
    engine, per, norms, summed = _engine_norms_and_sum(engine_name, model, x, y, state)
    assert not engine._fallback.regions and not engine._fallback.units, "all convolutions are native"
    assert _rel(norms.double(), ref_norms) < 1e-5
    for p, g in ref.items():
        assert _rel(summed[p].double(), g.sum(0)) < 1e-5
        if per is not None:
            assert _rel(per[p].double(), g) < 1e-5


class BagNet(nn.Module):
    def __init__(self, form, mode):
        super().__init__()
        self.form = form
        self.bag = nn.EmbeddingBag(7, 4, mode=mode, padding_idx=0, include_last_offset=form == "offsets_last")
        self.head = nn.Linear(4, 3)

    def forward(self, x, weights=None):
        if self.form == "2d":
            out = self.bag(x, per_sample_weights=weights)
        else:  # 1-D tokens with offsets, given by keyword; bags of lengths 1, 2, 3, ... (repeated tokens)
            lengths = torch.arange(1, x.shape[0] + 1)
            tokens = torch.cat([x[i, :n] for i, n in enumerate(lengths)])
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
            offsets = offsets if self.form == "offsets_last" else offsets[:-1]
            out = self.bag(tokens, offsets=offsets)
        return self.head(out)


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize(
    "form, mode, weighted",
    [("2d", "sum", False), ("2d", "mean", False), ("2d", "sum", True), ("offsets", "sum", False),
     ("offsets_last", "mean", False), ("2d", "max", False)],
)  # fmt: skip
def test_embedding_bag_both_forms(engine_name, form, mode, weighted):
    torch.manual_seed(0)
    model = BagNet(form, mode).double()
    x = torch.tensor([[1, 1, 2, 0], [3, 3, 3, 5], [0, 6, 6, 1], [2, 4, 4, 4]])  # repeats and padding
    w = torch.rand(4, 4, dtype=torch.float64) if weighted else None
    y = torch.tensor([0, 1, 2, 1])
    params = [p for p in model.parameters()]
    ref = {p: [] for p in params}
    for i in range(4):
        if form == "2d":
            out = model(x[i : i + 1], None if w is None else w[i : i + 1])
        else:  # the same bag alone: its tokens as the first bag
            sub = BagNet("2d", mode).double()
            sub.load_state_dict(model.state_dict())
            out = sub(x[i : i + 1, : i + 1])
        loss = nn.functional.cross_entropy(out, y[i : i + 1])
        for p, g in zip(
            params,
            torch.autograd.grad(
                loss, [dict(sub.named_parameters())[n] for n, _ in model.named_parameters()] if form != "2d" else params
            ),
        ):
            ref[p].append(g)
    ref = {p: torch.stack(v) for p, v in ref.items()}
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    engine = ENGINES[engine_name](model)
    engine.attach()
    with engine.capture(4):
        nn.functional.cross_entropy(model(x, w), y).backward()
    per = engine.per_sample_gradients() if isinstance(engine, HookEngine) else None
    norms = engine.clip_and_accumulate(1e9)
    summed = engine.pop_summed()
    assert _rel(norms.double(), ref_norms) < 1e-5
    for p, g in ref.items():
        assert _rel(summed[p].double(), g.sum(0)) < 1e-5
        if per is not None:
            assert _rel(per[p].double(), g) < 1e-5


def _beit_with_dropout():
    from timm.models.beit import Beit

    return Beit(
        num_classes=3, img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, use_rel_pos_bias=True,
        init_values=0.1, drop_rate=0.2, attn_drop_rate=0.2, proj_drop_rate=0.2, drop_path_rate=0.3,
    )  # fmt: skip


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_dropout_around_traced_ops_is_the_real_forwards(engine_name):
    """Beit in train mode: raw tokens, layer scales, q/v biases and a weight used through F.linear are traced at
    their ops, between dropout and drop-path layers.
    """
    torch.manual_seed(0)
    model = _beit_with_dropout().double().train()
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 3, (4,))
    state = torch.get_rng_state()
    ref = _per_example_of_batched_forward(model, x, y, state)
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    engine, per, norms, summed = _engine_norms_and_sum(engine_name, model, x, y, state)
    assert not engine._fallback.units and engine._fallback.regions, "ops, no unit"
    assert _rel(norms.double(), ref_norms) < 1e-5
    for p, g in ref.items():
        assert _rel(summed[p].double(), g.sum(0)) < 1e-5


class SeqFirst(nn.Module):
    """A model whose input and every module keep the batch second: no module keeps it first."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # x: (T, B, 4)
        return self.fc(x).mean(0)


def test_no_module_keeps_the_batch_first():
    model = SeqFirst()
    engine = HookEngine(model)
    engine.attach()
    x = torch.randn(5, 2, 4)  # data (made outside the captured step)
    with engine.capture(2):
        nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    with pytest.raises(
        DPMisconfigurationError, match=r"layer 'fc' \(Linear\) gives 5 rows for 2 examples.*batch_first"
    ):
        engine.clip_and_accumulate(1.0)


class RNNSeqFirst(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(4, 5, num_layers=2)  # batch second
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # (B, T, 4)
        out, h = self.rnn(x.transpose(0, 1))
        h = h[0] if isinstance(h, tuple) else h
        return self.head(out[-1] + h[-1])


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_layers_batch_second_and_hidden_state_used(kind, engine_name):
    torch.manual_seed(0)
    model = RNNSeqFirst(kind).double()
    x, y = torch.randn(4, 6, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    ref = brute_force_grads(model, x, y)
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    engine, per, norms, summed = _engine_norms_and_sum(engine_name, model, x, y, torch.get_rng_state())
    assert set(engine._fallback.units) == {model.rnn}
    assert _rel(norms.double(), ref_norms) < 1e-5
    for p, g in ref.items():
        assert _rel(summed[p].double(), g.sum(0)) < 1e-5


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_inplace_layer_scale_is_traced(engine_name):
    from timm.layers import LayerScale, LayerScale2d

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), LayerScale2d(4, 0.5, inplace=True), nn.Flatten(), nn.Linear(36, 5),
        LayerScale(5, 0.5, inplace=True), nn.Linear(5, 3),
    ).double()  # fmt: skip
    x, y = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    ref = brute_force_grads(model, x, y)
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    engine, per, norms, summed = _engine_norms_and_sum(engine_name, model, x, y, torch.get_rng_state())
    assert engine._fallback.regions == {model[1], model[4]}
    assert _rel(norms.double(), ref_norms) < 1e-5
    for p, g in ref.items():
        assert _rel(summed[p].double(), g.sum(0)) < 1e-5

    # an in-place op on a 3-D Linear output hides the gradient from the Linear's hook: caught and named
    model = nn.Sequential(nn.Linear(4, 5), LayerScale(5, 0.5, inplace=True), nn.Flatten(), nn.Linear(15, 3))
    engine = ENGINES[engine_name](model)
    engine.attach()
    with engine.capture(2):
        model(torch.randn(2, 3, 4)).sum().backward()
    with pytest.raises(DPMisconfigurationError, match=r"'0.weight'.*in-place op \('mul_' in '1'\)"):
        engine.clip_and_accumulate(1.0)


def test_fix_model_replaces_every_batchnorm_with_its_activation():
    from timm.layers import BatchNormAct2d, GroupNormAct

    from lightning_dp.validation import validate_module

    model = ZOO["efficientnet"].build()
    bn_act = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert bn_act, "timm's BatchNormAct2d is in the model (opacus's ModuleValidator.fix leaves it)"
    acts = [type(m.act) for m in bn_act]
    with pytest.raises(DPMisconfigurationError, match="fix_model"):
        validate_module(model)
    first = bn_act[0]
    weight = first.weight.detach().clone()
    assert fix_model(model) is model
    validate_module(model)
    gn = [m for m in model.modules() if isinstance(m, GroupNormAct)]
    assert [type(m.act) for m in gn] == acts, "each keeps its own activation"
    assert torch.equal(gn[0].weight.detach(), weight), "affine weights copied"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    seq = fix_model(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.InstanceNorm1d(6, track_running_stats=True)))
    assert isinstance(seq[1], nn.GroupNorm) and seq[1].num_groups == 1
    assert not seq[2].track_running_stats
    assert isinstance(fix_model(nn.BatchNorm2d(64)), nn.GroupNorm) and fix_model(nn.BatchNorm2d(64)).num_groups == 32


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("family", ["beit", "swin", "torch_lstm"])
def test_fit_through_trainer_announces_once(family, engine_name, monkeypatch):
    """Fitted through a Trainer (sample-mixing probe, checked first step, plain steps): it trains, and each fallback
    choice is announced once.
    """
    import lightning as L

    monkeypatch.setattr(DPStrategy, "_epsilon_upper_bound", lambda self: 0.0)  # ε is not under test
    L.seed_everything(0)
    entry = ZOO[family]
    model = ClassifierModule(entry.build(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(entry.inputs(24, g), torch.randint(0, 3, (24,), generator=g))
    strategy = DPStrategy(noise_multiplier=0.5, max_grad_norm=1.0, max_physical_batch_size=4, engine=engine_name)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        trainer(strategy, max_steps=3).fit(model, DataLoader(ds, batch_size=8, shuffle=True))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert model.trainer.global_step == 3
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    notices = [m for m in handler.messages if "torch.func" in m]
    assert notices and len(notices) == len(set(notices)), notices


class MHAVariants(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        kdim = 5 if kind == "kdim" else None
        self.attn = nn.MultiheadAttention(8, 2, batch_first=kind != "seq_first", kdim=kdim, vdim=kdim, dropout=0.2)
        self.ctx = nn.Linear(8, 5 if kind == "kdim" else 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # (B, T, 8)
        ctx = self.ctx(x.flip(1))
        if self.kind == "seq_first":
            out, _ = self.attn(x.transpose(0, 1), ctx.transpose(0, 1), ctx.transpose(0, 1))
            out = out.transpose(0, 1)
        elif self.kind == "self":
            mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
            mask[:, -1] = True
            out, _ = self.attn(x, x, x, key_padding_mask=mask)
        else:
            out, _ = self.attn(x, ctx, ctx, need_weights=False)
        return self.head(out.mean(1))


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("kind", ["self", "cross", "seq_first", "kdim"])
def test_multihead_attention_native_rule(kind, engine_name):
    """Self- and cross-attention, batch first or not, separate key/value dims, dropout in train mode: per-sample
    gradients of the real forward, from one batched recomputation (no per-example vmap).
    """
    torch.manual_seed(0)
    model = MHAVariants(kind).double().train()
    x, y = torch.randn(4, 5, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    state = torch.get_rng_state()
    ref = _per_example_of_batched_forward(model, x, y, state)
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    engine, per, norms, summed = _engine_norms_and_sum(engine_name, model, x, y, state)
    assert engine._fallback.last_methods == {"attn": "unit:native"}
    assert _rel(norms.double(), ref_norms) < 1e-5
    for p, g in ref.items():
        assert _rel(summed[p].double(), g.sum(0)) < 1e-5
        if per is not None:
            assert _rel(per.get(p, torch.zeros_like(g)).double(), g) < 1e-5
