"""bf16-in / fp32-out contractions: dispatch (checked on the ``meta`` device), the ≤ C bound under the rounding of
clip-scaled bf16 rows (CUDA's path, emulated on CPU), and no fp32 copies of activations or output gradients.
"""

import pytest
import torch
from helpers import brute_force_grads, make_vit
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_dp.clipping import clip_factors
from lightning_dp.engine import GhostEngine
from lightning_dp.engine.layer_rules import Conv2dGhostLayer, EmbeddingGhostLayer, LinearGhostLayer
from lightning_dp.engine.layer_rules.embedding import EmbeddingCaptured
from lightning_dp.engine.layer_rules.matmul import MatmulCaptured
from lightning_dp.engine.precision import (
    bmm_f32,
    emulate_rounded_scaling,
    mm_f32,
    rounds_scaled_rows,
    scale_rows,
    unit_roundoff,
)

BF16 = torch.bfloat16


class _Ops(TorchDispatchMode):
    """Records every aten call: name, input dtypes/shapes, output dtype/shape."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [(a.dtype, tuple(a.shape)) for a in args if isinstance(a, torch.Tensor)]
        result = (out.dtype, tuple(out.shape)) if isinstance(out, torch.Tensor) else None
        self.calls.append((str(func), inputs, result))
        return out

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


# ---------------------------------------------------------------------------------------------- dispatch (meta)
def test_primitives_dispatch_to_out_dtype_on_meta_and_upcast_on_cpu():
    a, b = torch.empty(5, 7, dtype=BF16, device="meta"), torch.empty(7, 3, dtype=BF16, device="meta")
    with _Ops() as ops:
        out = mm_f32(a, b)
        bout = bmm_f32(a[None], b[None])
    assert (out.dtype, out.shape, bout.dtype, bout.shape) == (torch.float32, (5, 3), torch.float32, (1, 5, 3))
    assert [c[1] for c in ops.named("aten.mm.dtype")] == [[(BF16, (5, 7)), (BF16, (7, 3))]]
    assert len(ops.named("aten.bmm.dtype")) == 1
    assert not ops.named("aten._to_copy.default"), "no fp32 copies of the inputs"
    with _Ops() as ops:  # CPU has no out_dtype kernel: the inputs are upcast (exactly) for the product
        out = mm_f32(torch.ones(5, 7, dtype=BF16), torch.ones(7, 3, dtype=BF16))
    assert out.dtype == torch.float32 and float(out[0, 0]) == 7
    assert ops.named("aten.mm.default") and not ops.named("aten.mm.dtype")
    assert rounds_scaled_rows(a) and not rounds_scaled_rows(torch.ones(2, dtype=BF16))
    assert not rounds_scaled_rows(torch.empty(2, device="meta"))  # fp32 stays exact
    with emulate_rounded_scaling():
        assert rounds_scaled_rows(torch.ones(2, dtype=BF16))
    s = scale_rows(torch.empty(4, 6, 2, dtype=BF16, device="meta"), torch.empty(4, device="meta"))
    assert s.dtype == BF16 and s.shape == (4, 6, 2)
    assert scale_rows(torch.ones(4, 6, 2, dtype=BF16), torch.ones(4)).dtype == torch.float32


@pytest.mark.parametrize("t", [1, 8], ids=["rank_one", "sequence"])
@pytest.mark.parametrize("d, p", [(16, 24), (24, 16)], ids=["scale_a", "scale_g"])
def test_linear_layer_on_meta_uses_bf16_products_with_fp32_results(t, d, p):
    b = 4
    layer = LinearGhostLayer(nn.Linear(d, p, device="meta"))
    captured = MatmulCaptured(
        torch.empty(b, t, d, dtype=BF16, device="meta"), torch.empty(b, t, p, dtype=BF16, device="meta")
    )
    factors = torch.empty(b, device="meta")
    with _Ops() as ops:
        sq = layer.squared_norms(captured)
        bound = layer.rounding_bound(captured)
        sums = layer.clipped_sum(captured, factors)
        per_sample = layer.instantiate(captured)
    assert sq.dtype == bound.dtype == torch.float32 and sq.shape == bound.shape == (b,)
    w, bias = layer.module.weight, layer.module.bias
    assert sums[w].dtype == sums[bias].dtype == torch.float32 and sums[w].shape == (p, d) and sums[bias].shape == (p,)
    assert per_sample[w].dtype == torch.float32 and per_sample[w].shape == (b, p, d)
    for name, inputs, result in ops.calls:  # every product of A or G runs on bf16 inputs into an fp32 result
        if name.startswith(("aten.mm.", "aten.bmm.")) and any(BF16 == dt for dt, _ in inputs):
            assert name.endswith(".dtype") and result[0] == torch.float32, name
        assert name not in ("aten._to_copy.default", "aten.copy_.default"), f"a dtype copy: {name} {inputs}"
    scaled = ops.named("aten.mul.out")
    assert len(scaled) == 1 and scaled[0][2] == (BF16, (b, t, min(d, p))), "the smaller side is scaled, in bf16"
    assert len(ops.named("aten.mm.dtype")) == 1


def test_conv_and_embedding_layers_on_meta():
    conv = Conv2dGhostLayer(nn.Conv2d(3, 32, 4, stride=4, device="meta"))
    from lightning_dp.engine.layer_rules import GhostRecord

    x = torch.empty(2, 3, 16, 16, dtype=BF16, device="meta")
    grad = torch.empty(2, 32, 4, 4, dtype=BF16, device="meta")
    captured = conv.collect([GhostRecord([x], grad)])
    assert captured.a.dtype == captured.g.dtype == BF16 and captured.a.shape == (2, 16, 48)
    with _Ops() as ops:
        sq = conv.squared_norms(captured)
        sums = conv.clipped_sum(captured, torch.empty(2, device="meta"))
    assert sq.dtype == torch.float32 and sums[conv.module.weight].shape == (32, 3, 4, 4)
    assert ops.named("aten.bmm.dtype") and ops.named("aten.mm.dtype") and not ops.named("aten._to_copy.default")

    emb = EmbeddingGhostLayer(nn.Embedding(10, 6, device="meta"))
    captured = EmbeddingCaptured(
        torch.empty(2, 5, dtype=torch.long, device="meta"), torch.empty(2, 5, 6, dtype=BF16, device="meta")
    )
    with _Ops() as ops:
        sq = emb.squared_norms(captured)
    assert sq.dtype == torch.float32 and sq.shape == (2,) and ops.named("aten.bmm.dtype")


# ---------------------------------------------------------------------------------------- the bound under rounding
def _cancelling_pairs(b, pairs, d, p, generator):
    """Per example, token pairs whose output gradients almost cancel (``g`` and ``-(g - 1 ulp)``) on one shared
    activation row: ``‖Σ_t g_t a_tᵀ‖`` is tiny against ``Σ_t ‖g_t‖‖a_t‖``, so rounding ``f·G`` to bf16 can move the
    contribution by far more than its own size.
    """
    a_row = torch.randn(b, 1, d, generator=generator).to(BF16)
    a = a_row.expand(b, 2 * pairs, d).contiguous()
    x = (torch.rand(b, pairs, p, generator=generator) + 0.5).to(BF16)
    ulp = torch.ldexp(torch.ones_like(x, dtype=torch.float32), torch.frexp(x.float()).exponent - 8)
    y = -(x.float() - ulp).to(BF16)  # exactly representable: one ulp below x in magnitude
    g = torch.stack([x, y], 2).reshape(b, 2 * pairs, p)
    return a, g


def _contributions_fp64(layer, captured, factors):
    """Each example's clipped weight contribution, formed in fp64 from the rows the engine actually scales."""
    weight = layer.module.weight
    a, g = captured.a, captured.g
    if layer._scales_g(captured):
        g = scale_rows(g, factors)
    else:
        a = scale_rows(a, factors)
    per = torch.einsum("btp,btd->bpd", g.double(), a.double())
    if layer.module.bias is not None:
        bias = factors.double()[:, None] * captured.g.double().sum(1)
        return torch.sqrt(per.flatten(1).pow(2).sum(1) + bias.pow(2).sum(1)), weight
    return per.flatten(1).norm(dim=1), weight


@pytest.mark.parametrize("d, p", [(16, 24), (24, 16)], ids=["scale_a", "scale_g"])
def test_adversarial_bf16_rounding_never_lets_a_clipped_example_exceed_c(d, p):
    gen = torch.Generator().manual_seed(0)
    b, pairs = 256, 4
    a, g = _cancelling_pairs(b, pairs, d, p, gen)
    if d < p:  # the smaller side is scaled: put the cancelling pairs there
        a, g = _cancelling_pairs(b, pairs, p, d, gen)
        a, g = g, a
    layer = LinearGhostLayer(nn.Linear(d, p, bias=False))
    with emulate_rounded_scaling():
        captured = MatmulCaptured(a, g)
        sq = layer.squared_norms(captured)
        bound = layer.rounding_bound(captured)
        assert bound is not None and (bound > 0).all()
        norms = sq.sqrt()
        violations = 0
        for c_scale in (0.3, 0.5, 0.7, 0.9, 0.97):  # clip to various fractions of each example's norm
            c = float(c_scale * norms.median())
            naive = clip_factors(norms, c)  # without the rounding bound
            got, _ = _contributions_fp64(layer, captured, naive)
            violations += int((got > c).sum())
            safe = clip_factors(norms + bound, c)
            got, _ = _contributions_fp64(layer, captured, safe)
            assert (got <= c).all(), f"max {float(got.max() / c):.6f}·C"
    assert violations > 0, "the adversarial data must make plain rounding exceed C (else the test proves nothing)"


def test_bound_is_tight_enough_on_vit_shaped_data_and_off_on_fp32_and_cpu():
    gen = torch.Generator().manual_seed(1)
    b, t, d, p = 8, 197, 256, 768  # ViT-B's T; 2T² ≤ d·p: ghost norms
    a = torch.randn(b, t, d, generator=gen).to(BF16)
    g = (torch.randn(b, t, p, generator=gen) * 1e-3).to(BF16)
    layer = LinearGhostLayer(nn.Linear(d, p))
    captured = MatmulCaptured(a, g)
    assert layer.rounding_bound(captured) is None, "CPU keeps today's path: scaled rows stay fp32"
    assert layer.rounding_bound(MatmulCaptured(a.float(), g.float())) is None
    with emulate_rounded_scaling():
        sq = layer.squared_norms(captured)
        bound = layer.rounding_bound(captured)
        c = float(sq.sqrt().median()) / 2
        factors = clip_factors(sq.sqrt() + bound, c)
        got, _ = _contributions_fp64(layer, captured, factors)
    assert (got <= c).all()
    inflation = float((bound / sq.sqrt()).max())
    assert inflation < 0.1, f"the bound inflates norms by {inflation:.3f}"
    assert inflation > unit_roundoff(BF16), "it is a worst case, larger than one rounding"


def test_engine_with_emulated_rounding_stays_within_c_per_example():
    """Through the ghost engine under CPU bf16 autocast with CUDA's rounding emulated: one example per micro-batch
    (sum loss), so the running sum is that example's contribution; every clipped example stays within C.
    """
    torch.manual_seed(2)
    model = make_vit(embed_dim=32, num_heads=2).eval()
    engine = GhostEngine(model, loss_reduction="sum")
    engine.attach()
    engine.check_against_autograd = False
    c = 0.05
    with emulate_rounded_scaling():
        for _ in range(6):
            x, y = torch.randn(1, 3, 16, 16), torch.randint(0, 3, (1,))
            with engine.capture(1):
                with torch.autocast("cpu", dtype=BF16):
                    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
                loss.backward()
            norm = engine.clip_and_accumulate(c)
            total = torch.sqrt(sum(v.double().pow(2).sum() for v in engine.pop_summed().values()))
            assert float(norm) > c, "the example is clipped"
            assert float(total) <= c
            assert float(total) > 0.9 * c, "the inflation costs little"


def test_bf16_engine_results_match_brute_force_with_rounding_emulated():
    torch.manual_seed(3)
    model = make_vit().eval()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,))
    ref = brute_force_grads(model, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    c = float(norms.median())
    factors = (c / (norms + 1e-6)).clamp(max=1.0)
    expected = torch.cat([torch.einsum("i,i...->...", factors, g).flatten() for g in ref.values()])
    engine = GhostEngine(model)
    engine.attach()
    with emulate_rounded_scaling():
        for _ in range(2):
            with engine.capture(4):
                with torch.autocast("cpu", dtype=BF16):
                    loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
            got = engine.clip_and_accumulate(c)
            assert float((got - norms).norm() / norms.norm()) < 1e-2
            summed = engine.pop_summed()
            flat = torch.cat([summed[p].flatten() for p in ref])
            assert float((flat - expected).norm() / expected.norm()) < 2e-2
