"""Adaptive clipping (Andrew et al. 2021): the bound tracks a quantile, its count is accounted, each step clips and
noises with its own C_t, per-layer bounds per group, both engines, micro-batching, resume.
"""

import math
from dataclasses import replace

import lightning as L
import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from helpers import ClassifierModule, brute_force_grads, loader, mlp, tensor_data, trainer
from test_privacy_paths import SaveAt, Updates, indexed_data
from torch import nn
from zoo_check import group_clipped_sum

import lightning_dp.callbacks.adaptive_clipping as adaptive_module
import lightning_dp.private_training as strategy_module
from lightning_dp import DPStrategy
from lightning_dp.accounting import RDPAccountant, calibrate_noise_multiplier, compute_epsilon
from lightning_dp.callbacks import AdaptiveClipping, GradNormHistogram, NormHistogram, quantile_update
from lightning_dp.callbacks.adaptive_clipping import count_below
from lightning_dp.engine import ENGINES, ClippingEngine
from lightning_dp.errors import DPMisconfigurationError

DELTA = 1e-5


def joint_multiplier(*sigmas):
    """The one Gaussian equivalent to independent Gaussians on the same data: (Σ σ_j⁻²)^(-1/2)."""
    return sum(s**-2 for s in sigmas) ** -0.5


def pld_epsilon(sigma, q, steps, delta):
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


# ---------------------------------------------------------------------- the update rule
@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("start", [1e-3, 1e3])
def test_update_converges_to_the_target_quantile_of_a_fixed_norm_distribution(gamma, start):
    g = torch.Generator().manual_seed(0)
    batch, steps = 256, 400
    sigma_b = batch / 20  # Andrew et al.'s default: noise of std 0.05 on the fraction
    c, trace = start, []
    for _ in range(steps):
        norms = torch.exp(torch.randn(batch, generator=g) * 0.7 + 1.0)  # log-normal: quantile exp(1 + 0.7 z_γ)
        centred = float(count_below(norms, torch.tensor([c], dtype=torch.float64))) - batch / 2
        noisy = centred + float(torch.randn((), generator=g)) * sigma_b
        c = quantile_update(c, noisy / batch + 0.5, gamma, 0.2)
        trace.append(c)
    truth = math.exp(1.0 + 0.7 * torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(gamma)).item())
    settled = torch.tensor(trace[-150:])
    assert float(settled.mean()) == pytest.approx(truth, rel=0.06)
    # and the fraction of norms below the settled bound is γ
    norms = torch.exp(torch.randn(100_000, generator=g) * 0.7 + 1.0)
    assert float((norms <= settled.mean()).double().mean()) == pytest.approx(gamma, abs=0.03)


def test_update_direction_and_nan_norms():
    assert quantile_update(2.0, 0.5, 0.5, 0.2) == 2.0
    assert quantile_update(2.0, 0.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1))  # all clipped: C grows
    assert quantile_update(2.0, 1.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.1))  # none clipped: C shrinks
    norms = torch.tensor([[0.5, 3.0], [float("nan"), 0.1], [2.0, 2.0]])
    assert count_below(norms, torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]  # a NaN norm moves no count
    assert count_below(None, torch.tensor([1.0])).tolist() == [0.0]


def test_arguments_are_checked():
    for bad in (dict(target_quantile=0.0), dict(target_quantile=1.0), dict(learning_rate=0.0),
                dict(count_noise_multiplier=-1.0), dict(initial_max_grad_norm=float("inf"))):  # fmt: skip
        with pytest.raises(DPMisconfigurationError):
            AdaptiveClipping(**bad)


# ---------------------------------------------------------------------- accounting
def test_count_noise_is_one_joint_gaussian_in_the_ledger_and_in_epsilon():
    s = DPStrategy(noise_multiplier=1.0, target_delta=DELTA)
    trainer(s, max_steps=10, callbacks=[AdaptiveClipping(count_noise_multiplier=2.0)]).fit(
        ClassifierModule(mlp()), loader(tensor_data(), 20)
    )
    # the centred count Σ(1[‖g‖ ≤ C] − 1/2) moves by ≤ 1/2 per example: noise std 2 is a Gaussian of multiplier 4
    joint = (1.0**-2 + (2.0 / 0.5) ** -2) ** -0.5
    assert [(seg.noise_multiplier, seg.sample_rate, seg.steps) for seg in s.ledger.segments] == [
        (pytest.approx(joint, rel=1e-12), 0.1, 10)
    ]
    ref = pld_epsilon(joint, 0.1, 10, DELTA)
    assert ref <= s.epsilon <= 1.03 * ref
    assert s.epsilon > compute_epsilon(1.0, 0.1, 10, DELTA) * 1.05  # the count is not free


def test_sigma_is_calibrated_to_pay_for_the_count_under_target_epsilon():
    s = DPStrategy(target_epsilon=3.0, target_delta=DELTA, accountant=RDPAccountant())  # RDP: a fast calibration
    ada = AdaptiveClipping()  # σ_b = B/20 = 2
    trainer(s, max_epochs=2, callbacks=[ada]).fit(ClassifierModule(mlp()), loader(tensor_data(), 40))
    sigma = s.noise_multiplier
    assert ada.count_noise_std(s) == pytest.approx(2.0)
    assert [(seg.noise_multiplier, seg.steps) for seg in s.ledger.segments] == [
        (pytest.approx(joint_multiplier(sigma, 2.0 / 0.5), rel=1e-12), 10)
    ]
    assert s.epsilon <= 3.0
    assert sigma > calibrate_noise_multiplier(3.0, DELTA, 0.2, 10, accountant=RDPAccountant()) * 1.05


# ---------------------------------------------------------------------- the bound each step uses
class Spy:
    """Records, per step, the bound the engine clipped with, the noise std of the gradient and the count release."""

    def __init__(self, monkeypatch, engine_cls=ClippingEngine):
        self.clip_bounds, self.noise_stds, self.counts = [], [], []
        clip, privatize = engine_cls.clip_and_accumulate, strategy_module.privatize
        add_gaussian = adaptive_module.add_gaussian

        def spy_clip(engine, max_grad_norm, clipping="flat", *a, **k):
            self.clip_bounds.append((max_grad_norm, engine.per_layer.group_bounds))
            return clip(engine, max_grad_norm, clipping, *a, **k)

        def spy_privatize(summed, noise_std, *a, **k):
            self.noise_stds.append(noise_std)
            return privatize(summed, noise_std, *a, **k)

        def spy_noise(values, std, source):
            exact = values.clone()
            out = add_gaussian(values, std, source)
            self.counts.append((exact, out.clone(), std))
            return out

        monkeypatch.setattr(engine_cls, "clip_and_accumulate", spy_clip)
        monkeypatch.setattr(strategy_module, "privatize", spy_privatize)
        monkeypatch.setattr(adaptive_module, "add_gaussian", spy_noise)


class Norms(L.Callback):
    """The logical batch's per-sample norms (and per-group norms) after each step (runs after AdaptiveClipping)."""

    def __init__(self):
        self.flat, self.groups = [], []

    def on_train_batch_end(self, trainer, *args):
        self.flat.append(trainer.strategy.last_per_sample_norms.clone())
        g = trainer.strategy.last_per_group_norms
        self.groups.append(None if g is None else g.clone())


@pytest.mark.parametrize("engine_name", ["ghost", "hooks"])
def test_each_step_clips_and_noises_with_its_own_adapted_bound(monkeypatch, engine_name):
    spy = Spy(monkeypatch, ClippingEngine)
    ada = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=0.5)
    norms = Norms()
    s = DPStrategy(noise_multiplier=0.7, max_grad_norm=1e-3, max_physical_batch_size=7, engine=engine_name)
    trainer(s, max_steps=8, callbacks=[ada, norms]).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))

    assert len(spy.noise_stds) == 8 and len(spy.counts) == 8
    bounds = []  # the bound of each step: every micro-batch of a step clips with the same C
    it = iter(spy.clip_bounds)
    for flat in norms.flat:
        used = {next(it)[0] for _ in range(math.ceil(flat.numel() / 7))}
        assert len(used) == 1
        bounds.append(used.pop())
    assert next(it, None) is None
    for c, std in zip(bounds, spy.noise_stds):
        assert std == pytest.approx(0.7 * c, rel=1e-12), "noise std is σ·C_t of the same step"
    assert bounds[0] == 1e-3
    for t in range(7):
        exact, noisy, std = spy.counts[t]
        assert std == 0.5
        # the count covers the whole logical batch (all micro-batches), at that step's bound
        n = norms.flat[t].numel()
        assert exact.tolist() == [float((norms.flat[t] <= bounds[t]).sum()) - n / 2]
        expected = quantile_update(bounds[t], float(noisy) / s.plan.expected_batch_size + 0.5, 0.5, 0.2)
        assert bounds[t + 1] == pytest.approx(expected, rel=1e-12)
        assert bounds[t + 1] > bounds[t]  # all norms ≫ C_0: the bound grows towards the median
    assert ada.max_grad_norm > bounds[-1]


# ---------------------------------------------------------------------- per-layer clipping
def test_engine_clips_each_group_to_its_own_bound_and_reports_group_norms():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(6, 10), torch.randint(0, 3, (6,))
    ref = brute_force_grads(model, x, y)
    engine = ENGINES["ghost"](model)
    by_name = dict(model.named_parameters())
    groups = [[by_name[n] for n in names] for names in engine.clipping_groups]
    group_norms = torch.stack([torch.sqrt(sum(ref[p].flatten(1).pow(2).sum(1) for p in g)) for g in groups], 1)
    bounds = [float(group_norms[:, 0].median()), float(group_norms[:, 1].min()) * 0.5]
    c = math.sqrt(sum(b * b for b in bounds))
    engine.attach()
    for first in (True, False):  # the second micro-batch is clipped inside backward
        engine.set_clipping_bound(c, bounds)
        with engine.capture(6):
            nn.functional.cross_entropy(model(x), y).backward()
            assert first or engine.per_layer.pending_sq is not None
        engine.clip_and_accumulate(c, "per_layer")
        assert torch.allclose(engine.last_group_norms, group_norms, rtol=1e-4)
        summed = engine.pop_summed()
        for g, b in zip(groups, bounds):
            expected = group_clipped_sum(ref, [g], b)
            for p in g:
                assert torch.allclose(summed[p], expected[p], rtol=1e-4, atol=1e-6)
    with pytest.raises(DPMisconfigurationError, match="sqrt"):
        engine.set_clipping_bound(c * 0.99, bounds)  # the bounds would exceed the sensitivity C
    with pytest.raises(DPMisconfigurationError, match="one positive finite bound per clipping group"):
        engine.set_clipping_bound(c, bounds[:1])


@pytest.mark.parametrize("engine_name", ["ghost", "hooks"])
def test_per_layer_bounds_follow_each_groups_quantile_and_declare_root_l_sensitivity(monkeypatch, engine_name):
    spy = Spy(monkeypatch, ClippingEngine)
    ada = AdaptiveClipping(target_quantile=0.5, count_noise_multiplier=3.0, initial_max_grad_norm=0.05)
    norms = Norms()
    s = DPStrategy(noise_multiplier=1.0, clipping="per_layer", max_physical_batch_size=8, engine=engine_name)
    trainer(s, max_steps=6, callbacks=[ada, norms]).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))

    groups = s.clipping_groups
    assert len(groups) == 2
    # two centred counts, each moved by ≤ 1/2: L2 sensitivity √2/2, declared as 2σ_b/√2
    assert [(seg.noise_multiplier, seg.steps) for seg in s.ledger.segments] == [
        (pytest.approx(joint_multiplier(1.0, 3.0 / (0.5 * math.sqrt(2))), rel=1e-12), 6)
    ]
    steps = []
    it = iter(spy.clip_bounds)
    for flat in norms.flat:
        used = {(c, b) for c, b in (next(it) for _ in range(math.ceil(flat.numel() / 8)))}
        assert len(used) == 1
        steps.append(used.pop())
    assert steps[0] == (pytest.approx(0.05), (pytest.approx(0.05 / math.sqrt(2)),) * 2)
    for t, ((c, bounds), std) in enumerate(zip(steps, spy.noise_stds)):
        assert c == pytest.approx(math.sqrt(sum(b * b for b in bounds)), rel=1e-12)
        assert std == pytest.approx(1.0 * c, rel=1e-12)
        exact, noisy, _ = spy.counts[t]
        n = norms.flat[t].numel()
        assert exact.tolist() == ((norms.groups[t] <= torch.tensor(bounds)).sum(0).double() - n / 2).tolist()
        if t + 1 < len(steps):
            fractions = (noisy / s.plan.expected_batch_size + 0.5).tolist()
            expected = [quantile_update(b, f, 0.5, 0.2) for b, f in zip(bounds, fractions)]
            assert list(steps[t + 1][1]) == pytest.approx(expected, rel=1e-12)
    # the per-group norms the count used are the per-group norms of the logical batch
    assert all(g.shape == (f.numel(), 2) for f, g in zip(norms.flat, norms.groups))
    assert torch.allclose(norms.groups[-1].pow(2).sum(1).sqrt(), norms.flat[-1], rtol=1e-4)
    assert steps[-1][1][0] != steps[-1][1][1], "each group follows its own quantile"


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_an_empty_poisson_batch_still_releases_a_noised_count(monkeypatch, clipping):
    spy = Spy(monkeypatch, ClippingEngine)
    sizes = Norms()
    s = DPStrategy(noise_multiplier=1.0, clipping=clipping, sampling_seed=0)
    ada = AdaptiveClipping(count_noise_multiplier=1.0)
    trainer(s, max_steps=8, callbacks=[ada, sizes]).fit(ClassifierModule(mlp()), loader(tensor_data(n=100), 1))
    empty = [t for t, f in enumerate(sizes.flat) if f.numel() == 0]
    assert empty, "q = 0.01 over 100 examples: some batches are empty"
    assert len(spy.counts) == 8  # one release per step, empty ones included (a count of 0, noised)
    for t in empty:
        assert spy.counts[t][0].abs().sum() == 0


def test_adaptive_clipping_refuses_clipping_without_a_threshold():
    s = DPStrategy(noise_multiplier=1.0, clipping="normalized")
    with pytest.raises(DPMisconfigurationError, match="clipping='flat' or 'per_layer'"):
        trainer(s, max_steps=1, callbacks=[AdaptiveClipping()]).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))


class FixedBound(L.Callback):
    def dp_clipping_bounds(self, strategy, step, groups):
        return 1.0, None


def test_only_one_callback_may_set_the_bound():
    s = DPStrategy(noise_multiplier=1.0)
    with pytest.raises(DPMisconfigurationError, match="Only one callback may set the clipping bound"):
        trainer(s, max_steps=1, callbacks=[AdaptiveClipping(), FixedBound()]).fit(
            ClassifierModule(mlp()), loader(tensor_data(), 20)
        )


# ---------------------------------------------------------------------- logging and resume
def test_the_bound_is_logged_every_step(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    s = DPStrategy(noise_multiplier=1.0, clipping="per_layer")
    ada = AdaptiveClipping(count_noise_multiplier=2.0)
    t = trainer(s, max_steps=4, callbacks=[ada], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    t.fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    logged = t.logged_metrics
    assert {"dp/max_grad_norm", "dp/unclipped_fraction", "dp/max_grad_norm/net.0", "dp/max_grad_norm/net.2"} <= set(
        logged
    )
    assert float(logged["dp/max_grad_norm"]) == pytest.approx(
        math.sqrt(float(logged["dp/max_grad_norm/net.0"]) ** 2 + float(logged["dp/max_grad_norm/net.2"]) ** 2)
    )


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_resume_continues_with_the_adapted_bound_exactly_like_an_uninterrupted_run(tmp_path, clipping):
    ds = indexed_data()
    ckpt = str(tmp_path / "step3.ckpt")
    kw = dict(noise_multiplier=1.0, noise_seed=1, sampling_seed=2, clipping=clipping)

    def run(callbacks, ckpt_path=None):
        ada = AdaptiveClipping(count_noise_multiplier=2.0, initial_max_grad_norm=0.1)
        with pytest.warns(UserWarning, match="seeds staying secret"):
            torch.manual_seed(0)
            trainer(DPStrategy(**kw), max_steps=6, callbacks=[ada, *callbacks]).fit(
                ClassifierModule(mlp(), lr=0.5), loader(ds, 20), ckpt_path=ckpt_path
            )
        return ada

    full, stopped, resumed = Updates(), Updates(), Updates()
    ada_full = run([full])
    run([stopped, SaveAt(lambda s: ckpt, [3], stop=True)])
    ada_resumed = run([resumed], ckpt_path=ckpt)
    assert resumed.batches == full.batches[3:]
    for a, b in zip(stopped.deltas + resumed.deltas, full.deltas):
        assert torch.allclose(a, b, atol=1e-6)
    assert ada_resumed.max_grad_norm == pytest.approx(ada_full.max_grad_norm, rel=1e-9)
    assert ada_full.max_grad_norm != pytest.approx(0.1, rel=1e-3)
    state = torch.load(ckpt, weights_only=True)["callbacks"]["AdaptiveClipping"]
    assert state["updated_step"] == 2


def test_histograms_estimate_the_clip_fraction_at_a_bound_that_moved():
    hist = NormHistogram(step=0, edges=(1.0, 2.0, 4.0), counts=np.array([0.0, 2.0, 2.0, 0.0]), max_grad_norm=2.0,
                         private=True)  # fmt: skip
    assert hist.clip_fraction() == 0.5  # C is an edge: exact
    assert replace(hist, max_grad_norm=math.sqrt(8.0)).clip_fraction() == pytest.approx(0.25)  # geometric midpoint
    assert replace(hist, max_grad_norm=0.5).clip_fraction() == 1.0  # below every norm
    assert replace(hist, max_grad_norm=8.0).clip_fraction() == 0.0  # the overflow bin is empty
    s = DPStrategy(noise_multiplier=1.0)
    grad_hist = GradNormHistogram(log_every_n_steps=1)
    trainer(s, max_steps=3, callbacks=[AdaptiveClipping(), grad_hist]).fit(
        ClassifierModule(mlp()), loader(tensor_data(), 20)
    )
    release = grad_hist.last_release
    assert release.max_grad_norm == s.max_grad_norm != 1.0 and release.max_grad_norm not in release.edges
    assert 0.0 <= release.clip_fraction() <= 1.0
