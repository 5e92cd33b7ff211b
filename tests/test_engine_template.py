"""The engine template method (ClippingEngine.clip_and_accumulate): privacy rules shared by every engine.

Non-finite per-sample gradients, norms without accumulating (probe_norms), masks and gradient clearing for any
subclass.
"""

import pytest
import torch
from helpers import brute_force_grads, make_vit
from test_ghost_engine import EmbedNet, SeqNet
from torch import nn

from lightning_dp.engine import ENGINES, ClippingEngine, PerSampleGradients, build_engine
from lightning_dp.engine.contributions import Contribution
from lightning_dp.errors import DPMisconfigurationError, NonFiniteGradientError


def _rel_err(a, b):
    return float((a - b).norm() / (b.norm() + 1e-12))


def _clipped_reference(model, x, y, c, keep):
    """Brute-force norms of the kept examples and Σ_{kept} clip(g_i)."""
    ref = brute_force_grads(model, x[keep], y[keep])
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
    factors = (c / (norms + 1e-6)).clamp(max=1.0)
    return norms, {p: torch.einsum("i,i...->...", factors, g) for p, g in ref.items()}


def _poisoned_images(b=6):
    x = torch.randn(b, 3, 16, 16)
    x[1, 0, 3, 5] = float("nan")  # one NaN pixel
    x[4] = float("inf")  # a whole row of inf
    keep = torch.ones(b, dtype=torch.bool)
    keep[[1, 4]] = False
    return x, keep


# ---------------------------------------------------------------------------------------------- non-finite examples
@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_nonfinite_examples_add_exactly_nothing(engine_name):
    torch.manual_seed(0)
    model = make_vit().eval()
    x, keep = _poisoned_images()
    y = torch.randint(0, 3, (6,))
    norms_ref, expected = _clipped_reference(model, x, y, 0.05, keep)
    engine = build_engine(engine_name, model)
    engine.attach()
    for check in (True, False):  # with autograd's gradients (cross-check due) and, for ghost, without them
        engine.check_against_autograd = check
        with engine.capture(6):
            nn.functional.cross_entropy(model(x), y).backward()
        norms = engine.clip_and_accumulate(0.05)
        assert engine.last_nonfinite == 2
        assert not torch.isfinite(norms[~keep]).any(), "the returned norms show the non-finite examples"
        assert _rel_err(norms[keep], norms_ref) < 1e-4
        summed = engine.pop_summed()
        for p, e in expected.items():
            assert torch.isfinite(summed[p]).all()
            assert _rel_err(summed[p], e) < 1e-4
        assert all(p.grad is None for p in engine.params)
        # the cross-check cannot compare with autograd's NaN gradient: deferred, not failed, not consumed
        assert engine.check_against_autograd is check
    assert engine.pop_nonfinite() == 4
    assert engine.pop_nonfinite() == 0


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("model_cls", [SeqNet, EmbedNet], ids=["linear3d", "embedding"])
def test_nonfinite_per_sample_loss_is_zeroed_in_every_layer_kind(engine_name, model_cls):
    """A NaN/inf in the per-sample loss weight: ghost, instantiated, embedding and rule layers all see it."""
    torch.manual_seed(1)
    model = model_cls().eval()
    x = torch.randn(5, 50) if model_cls is SeqNet else torch.randint(0, 6, (5, 7))
    y = torch.randint(0, 3, (5,))
    w = torch.ones(5)
    w[0], w[3] = float("nan"), float("inf")
    keep = torch.isfinite(w)
    norms_ref, expected = _clipped_reference(model, x, y, 0.5, keep)
    engine = ENGINES[engine_name](model)
    engine.check_against_autograd = False
    engine.attach()
    with engine.capture(5):
        (nn.functional.cross_entropy(model(x), y, reduction="none") * w).mean().backward()
    norms = engine.clip_and_accumulate(0.5)
    assert engine.last_nonfinite == 2
    assert _rel_err(norms[keep], norms_ref) < 1e-4
    summed = engine.pop_summed()
    for p, e in expected.items():
        assert _rel_err(summed[p], e) < 1e-4


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_nonfinite_error_mode(engine_name):
    torch.manual_seed(2)
    model = make_vit().eval()
    x, keep = _poisoned_images()
    y = torch.randint(0, 3, (6,))
    engine = build_engine(engine_name, model, nonfinite="error")
    engine.attach()
    with engine.capture(6):
        nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(NonFiniteGradientError, match=r"2 of the 6 examples.*positions \[1, 4\].*nonfinite='skip'"):
        engine.clip_and_accumulate(1.0)
    assert issubclass(NonFiniteGradientError, DPMisconfigurationError)
    assert all(p.grad is None for p in engine.params), "p.grad is cleared on error too"
    assert all(float(v.abs().sum()) == 0 for v in engine.pop_summed().values()), "nothing was added"
    # the capture was freed: a clean micro-batch works and is not mixed with the failed one
    norms_ref, expected = _clipped_reference(model, x, y, 1.0, keep)
    with engine.capture(4):
        nn.functional.cross_entropy(model(x[keep]), y[keep]).backward()
    assert _rel_err(engine.clip_and_accumulate(1.0), norms_ref) < 1e-4
    assert engine.last_nonfinite == 0
    for p, e in engine.pop_summed().items():
        assert _rel_err(e, expected[p]) < 1e-4


@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
def test_cross_check_is_deferred_past_a_nonfinite_micro_batch_not_skipped(engine_name):
    from test_engine import HiddenUse

    model = HiddenUse()  # a weight used where no hook or traced op sees it
    engine = ENGINES[engine_name](model)
    engine.attach()
    x = torch.randn(3, 4)
    x[0] = float("nan")
    with engine.capture(3):
        model(x).sum().backward()
    engine.clip_and_accumulate(1.0)  # cannot compare with a NaN p.grad: deferred
    assert engine.check_against_autograd
    with engine.capture(3):
        model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(DPMisconfigurationError, match="use outside the forward"):
        engine.clip_and_accumulate(1.0)


def test_nonfinite_option_is_validated():
    with pytest.raises(ValueError, match="nonfinite"):
        build_engine("ghost", nn.Linear(2, 2), nonfinite="ignore")


# ---------------------------------------------------------------------------------------------- probe_norms
@pytest.mark.parametrize("engine_name", ["hooks", "ghost"])
@pytest.mark.parametrize("masked", [False, True])
def test_probe_norms_equal_clip_norms_and_leave_the_sum_alone(engine_name, masked):
    torch.manual_seed(3)
    model = make_vit().eval()
    x, y = torch.randn(5, 3, 16, 16), torch.randint(0, 3, (5,))
    engine = ENGINES[engine_name](model)
    if masked:
        qkv = model.blocks[0].attn.qkv.weight
        engine.set_grad_masks({qkv: (torch.arange(qkv.shape[0]) % 2 == 0).float().view(-1, 1)})
    engine.attach()
    x0, y0 = torch.randn(3, 3, 16, 16), torch.randint(0, 3, (3,))
    with engine.capture(3):
        nn.functional.cross_entropy(model(x0), y0).backward()
    engine.clip_and_accumulate(0.1)  # a running sum to leave untouched
    before = {p: v.clone() for p, v in engine._summed.items()}

    with engine.capture(5):
        nn.functional.cross_entropy(model(x), y).backward()
    probed = engine.probe_norms()
    assert probed.dtype == torch.float32 and probed.shape == (5,)
    assert all(p.grad is None for p in engine.params)
    assert engine._summed.keys() == before.keys()
    assert all(torch.equal(engine._summed[p], v) for p, v in before.items())

    with engine.capture(5):
        nn.functional.cross_entropy(model(x), y).backward()
    clipped = engine.clip_and_accumulate(0.1)
    assert torch.allclose(probed, clipped, rtol=1e-5)
    if not masked:
        ref = brute_force_grads(model, x, y)
        ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in ref.values()))
        assert _rel_err(probed, ref_norms) < 1e-4


# ---------------------------------------------------------------------------------------------- any subclass
class GivenEngine(ClippingEngine):
    """A minimal engine whose per-sample gradients are given by the test (one group per parameter)."""

    def _plan(self):
        self.given = {}
        self.freed = 0

    def attach(self):
        pass

    @property
    def layer_names(self):  # the layers whose per-sample gradients the test gives (none left to the fallback)
        return [n for n, m in self.module.named_modules() if m._parameters]

    def _contributions(self):
        return [PerSampleGradients(self.param_names[p], dict([(p, gs)])) for p, gs in self.given.items()]

    def _free_capture(self):
        self.given = {}
        self.freed += 1


def test_template_clears_grads_masks_and_frees_for_any_subclass():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    engine = GivenEngine(model, loss_reduction="sum")
    w0, b0, w1, b1 = engine.params
    per_sample = {p: torch.randn(5, *p.shape) for p in engine.params}
    per_sample[w1][2, 0, 0] = float("nan")  # one poisoned example
    mask = (torch.arange(4) % 2 == 0).float().view(-1, 1)
    engine.set_grad_masks({w0: mask})
    engine.check_against_autograd = False
    with engine.capture(5):
        model(torch.randn(5, 3)).sum().backward()  # leaves p.grad set
    assert all(p.grad is not None for p in engine.params)
    engine.given = dict(per_sample)
    norms = engine.clip_and_accumulate(1.0)
    assert all(p.grad is None for p in engine.params), "p.grad cleared"
    assert engine.freed == 1 and engine.given == {}, "capture freed"
    assert engine.last_nonfinite == 1 and torch.isnan(norms[2])
    masked = {**per_sample, w0: per_sample[w0] * mask}
    keep = torch.tensor([True, True, False, True, True])
    ref_norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in masked.values()))
    assert torch.allclose(norms[keep], ref_norms[keep], rtol=1e-5)
    factors = (1.0 / (ref_norms[keep] + 1e-6)).clamp(max=1.0)
    summed = engine.pop_summed()
    for p, g in masked.items():
        assert torch.allclose(summed[p], torch.einsum("i,i...->...", factors, g[keep]), rtol=1e-5, atol=1e-7)
    assert summed[w0][1::2].abs().max() == 0, "masked rows get nothing"


def test_masked_parameter_in_a_norm_only_group_is_refused():
    class NormOnly(Contribution):
        def __init__(self, p):
            self.name, self.p = "norm-only", p

        @property
        def params(self):
            return (self.p,)

        def squared_norms(self):
            return torch.ones(2)

        def clipped_sum(self, factors):
            return {self.p: torch.zeros_like(self.p)}

        def zero_examples(self, keep):
            pass

    class NormOnlyEngine(GivenEngine):
        def _contributions(self):
            return [NormOnly(p) for p in self.params]

    model = nn.Linear(2, 2)
    engine = NormOnlyEngine(model)
    engine.set_grad_masks({model.weight: torch.ones(2, 2)})
    engine.check_against_autograd = False
    with engine.capture(2):
        pass
    with pytest.raises(RuntimeError, match="masked parameter group"):
        engine.clip_and_accumulate(1.0)


def test_template_methods_are_final_and_the_base_abstract():
    with pytest.raises(TypeError, match="abstract"):
        ClippingEngine(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="final"):

        class Bypass(GivenEngine):
            def clip_and_accumulate(self, max_grad_norm, clipping="flat", stability=0.01):
                return torch.zeros(0)


def test_shared_parameter_groups_are_merged_before_norms():
    """Two layers' per-sample gradients of one parameter: the norm is that of their sum."""
    model = nn.Linear(3, 2, bias=False)
    engine = GivenEngine(model)
    engine.check_against_autograd = False
    (w,) = engine.params
    g1, g2 = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    engine._contributions = lambda: [PerSampleGradients("a", {w: g1}), PerSampleGradients("b", {w: g2})]
    with engine.capture(4):
        pass
    norms = engine.clip_and_accumulate(1e9)
    assert torch.allclose(norms, 4 * (g1 + g2).flatten(1).norm(dim=1), rtol=1e-5)
    assert torch.allclose(engine.pop_summed()[w], 4 * (g1 + g2).sum(0), rtol=1e-5)  # mean loss: scale b
