"""Privacy auditing: the one-run statistic, and gradient canaries that catch a broken mechanism in a real run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from helpers import ClassifierModule, mlp, trainer
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dp.clipping
import lightning_dp.engine.base
import lightning_dp.noise
from lightning_dp import DPStrategy
from lightning_dp.audit import (
    CanaryAudit,
    InputCanaryAudit,
    count_correct_guesses,
    epsilon_lower_bound_from_scores,
    max_epsilon_lower_bound,
    multi_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from lightning_dp.callbacks import PrivacySummary
from lightning_dp.errors import DPMisconfigurationError, PrivacyAuditError

DELTA = 1e-5
CLAIM = 2.0


# ---------------------------------------------------------------------- the statistic
@pytest.mark.parametrize(("r", "v"), [(10, 10), (100, 97), (100, 62), (500, 400), (1000, 1000), (37, 20)])
def test_delta_zero_bound_is_the_binomial_quantile(r, v):
    """δ = 0: the largest ε with P[Binomial(r, e^ε/(1+e^ε)) ≥ v] ≤ 1 − confidence. P[Bin(r, p) ≥ v] is the
    regularised incomplete beta I_p(v, r − v + 1), so the largest p is a Beta quantile (computed independently)."""
    p = scipy.stats.beta.ppf(0.05, v, r - v + 1)
    expected = max(0.0, math.log(p / (1 - p)))
    got = one_run_epsilon_lower_bound(1000, r, v, delta=0.0, confidence=0.95)
    assert got == pytest.approx(expected, abs=1e-5)
    if got > 0:  # the claim at the bound is rejected, a little above it is not
        assert scipy.stats.binom.sf(v - 1, r, scipy.special.expit(got)) <= 0.05
        assert scipy.stats.binom.sf(v - 1, r, scipy.special.expit(got + 1e-4)) > 0.05


def _brute_force_p_value(m, r, v, eps, delta):
    """Steinke et al.'s p-value term by term with exact binomial coefficients (no scipy)."""
    p = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max((sum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize(("m", "r", "v", "delta"), [(1000, 100, 90, 1e-5), (200, 60, 50, 1e-3), (50, 50, 45, 5e-3)])
def test_delta_positive_p_value_and_bound_match_a_brute_force_computation(m, r, v, delta):
    for eps in (0.0, 0.5, 1.3, 2.7):
        expected = _brute_force_p_value(m, r, v, eps, delta)
        assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-9)
    got = one_run_epsilon_lower_bound(m, r, v, delta, 0.95)
    assert got > 0
    assert _brute_force_p_value(m, r, v, got, delta) <= 0.05 < _brute_force_p_value(m, r, v, got + 1e-5, delta)
    # every ε below the bound is rejected too (the test is monotone in ε), and nothing far above it is
    assert all(_brute_force_p_value(m, r, v, e, delta) <= 0.05 for e in np.linspace(0.0, got, 60))
    assert all(_brute_force_p_value(m, r, v, e, delta) > 0.05 for e in np.linspace(got + 1e-3, got + 5, 60))
    assert got < one_run_epsilon_lower_bound(m, r, v, 0.0, 0.95)  # δ > 0 costs some of the bound


@pytest.mark.parametrize("delta", [0.0, 1e-3])
def test_bound_holds_with_the_stated_confidence_for_an_epsilon_delta_dp_mechanism(delta):
    """Randomised response that, with probability δ, reveals the canary's bit is exactly (ε, δ)-DP per canary; its
    audited bound may exceed ε in at most 5 % of audits (here: well below, the test being conservative)."""
    rng = np.random.default_rng(0)
    eps, m, trials = 1.0, 200, 300
    p = scipy.special.expit(eps)
    over = 0
    for _ in range(trials):
        correct = rng.random(m) < delta + (1 - delta) * p
        over += one_run_epsilon_lower_bound(m, m, int(correct.sum()), delta, 0.95) > eps
    assert over / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    # and the test has power: 20 % more correct guesses than ε allows is caught most of the time
    caught = sum(
        one_run_epsilon_lower_bound(m, m, int((rng.random(m) < min(1.0, p * 1.2)).sum()), delta, 0.95) > eps
        for _ in range(50)
    )
    assert caught >= 40


def test_guesses_count_top_as_in_and_bottom_as_out_with_bonferroni():
    scores = np.array([5.0, -1.0, 3.0, 0.0, -2.0, 4.0])
    included = np.array([True, False, True, True, False, False])
    assert count_correct_guesses(scores, included, 2, 2) == 1 + 2  # top: 0 (in), 5 (out); bottom: 4, 1 (out)
    perfect = np.arange(1000.0)
    eps, r, v = epsilon_lower_bound_from_scores(perfect, perfect >= 500, 0.0, 0.95, guess_fractions=[1.0])
    assert (r, v) == (1000, 1000) and eps == pytest.approx(max_epsilon_lower_bound(1000))
    two = epsilon_lower_bound_from_scores(perfect, perfect >= 500, 0.0, 0.95, guess_fractions=[1.0, 1.0])[0]
    assert two == pytest.approx(one_run_epsilon_lower_bound(1000, 1000, 1000, 0.0, 0.975)) and two < eps


def test_statistic_refuses_impossible_counts_and_too_large_delta():
    with pytest.raises(DPMisconfigurationError, match="num_correct"):
        one_run_epsilon_lower_bound(10, 5, 6)
    with pytest.raises(DPMisconfigurationError, match="2·num_canaries·δ"):
        one_run_epsilon_lower_bound(1000, 10, 10, delta=1e-3)
    with pytest.raises(DPMisconfigurationError, match="confidence"):
        one_run_epsilon_lower_bound(10, 5, 5, confidence=1.0)


# ---------------------------------------------------------------------- canaries in a real run
class _Metrics(Logger):
    """Collects what is logged."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self):
        return "collect"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        self.metrics.update({k: v for k, v in dict(params).items() if isinstance(v, (int, float))})


def _sparse_data(n=64, d=512, active=8):
    """Inputs non-zero on ``active`` of ``d`` features: most weights of a linear model get no real gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, d)
    x[:, :active] = torch.randn(n, active, generator=g)
    return TensorDataset(x, torch.randint(0, 4, (n,), generator=g))


def _audited_run(audit, root=None, clipping="flat", net=None):
    """A tiny run (q = 0.25, 20 steps, claimed ε = 2) with ``audit``; returns the trainer."""
    strategy = DPStrategy(target_epsilon=CLAIM, target_delta=DELTA, sampling_seed=1, noise_seed=1, clipping=clipping)
    torch.manual_seed(0)
    callbacks = [PrivacySummary(print_table=False), audit]
    kw = {} if root is None else {"default_root_dir": root}
    tr = trainer(strategy, max_epochs=5, callbacks=callbacks, logger=_Metrics(), **kw)
    tr.fit(ClassifierModule(net or nn.Linear(512, 4)), DataLoader(_sparse_data(), batch_size=16))
    return tr


@pytest.fixture(scope="module")
def correct_run(tmp_path_factory):
    audit = CanaryAudit(num_canaries=1000, seed=3)
    return _audited_run(audit, tmp_path_factory.mktemp("correct")), audit


def test_a_correct_run_audits_below_its_claim_and_reports_it(correct_run):
    tr, audit = correct_run
    assert audit.claimed_epsilon == pytest.approx(tr.strategy.epsilon) and audit.claimed_epsilon <= CLAIM
    assert 0.0 < audit.epsilon_lower_bound <= audit.claimed_epsilon  # not trivially 0, and below the claim
    logged = tr.loggers[0].metrics
    assert logged["audit/epsilon_lower_bound"] == audit.epsilon_lower_bound
    assert logged["audit/claimed_epsilon"] == audit.claimed_epsilon
    summary = next(cb for cb in tr.callbacks if isinstance(cb, PrivacySummary))
    assert summary.summary["audit/epsilon_lower_bound"] == audit.epsilon_lower_bound
    assert "audited ε ≥" in summary.table


def test_canaries_enter_each_step_with_probability_q_and_only_the_in_set(correct_run):
    tr, audit = correct_run
    steps, q = tr.strategy.last_release_step + 1, tr.strategy.sample_rate
    inc, counts = audit.included, audit.inclusions
    assert abs(inc.sum() - 500) < 4 * math.sqrt(250)  # each canary "in" with probability 1/2
    assert counts[~inc].sum() == 0
    n = inc.sum() * steps  # Bernoulli(q) trials of the "in" canaries
    assert abs(counts[inc].sum() - n * q) < 4 * math.sqrt(n * q * (1 - q))
    # per canary: Binomial(steps, q)
    assert abs(counts[inc].var() - steps * q * (1 - q)) < 0.2 * steps * q * (1 - q)


def test_the_audit_catches_a_run_without_noise(monkeypatch):
    monkeypatch.setattr(lightning_dp.noise, "add_gaussian", lambda values, std, source: values)
    audit = CanaryAudit(num_canaries=1000, seed=3)
    with pytest.raises(PrivacyAuditError, match="above the claimed"):
        _audited_run(audit)
    assert audit.epsilon_lower_bound > CLAIM >= audit.claimed_epsilon


def test_the_audit_catches_a_run_without_clipping(monkeypatch):
    def no_clipping(norms, *args, **kwargs):
        return torch.ones_like(norms)

    monkeypatch.setattr(lightning_dp.clipping, "clip_factors", no_clipping)
    monkeypatch.setattr(lightning_dp.engine.base, "clip_factors", no_clipping)
    audit = CanaryAudit(num_canaries=1000, seed=3, on_violation="warn")
    with pytest.warns(UserWarning, match="EXCEEDS THE CLAIM"):
        _audited_run(audit)
    assert audit.epsilon_lower_bound > CLAIM >= audit.claimed_epsilon


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: CanaryAudit(num_canaries=1), "num_canaries"),
        (lambda: CanaryAudit(confidence=1.5), "confidence"),
        (lambda: CanaryAudit(canary_norm=0.5), "canary_norm"),
        (lambda: CanaryAudit(on_violation="ignore"), "on_violation"),
    ],
)
def test_invalid_audit_arguments_are_refused(make, match):
    with pytest.raises(DPMisconfigurationError, match=match):
        make()


def test_audit_setups_that_cannot_work_are_refused():
    data = DataLoader(_sparse_data(n=32, d=10), batch_size=8)
    with pytest.raises(DPMisconfigurationError, match="trainable coordinate"):  # mlp: 227 coordinates
        trainer(DPStrategy(noise_multiplier=1.0), callbacks=[CanaryAudit(num_canaries=1000)]).fit(
            ClassifierModule(nn.Sequential(mlp()[0], nn.Tanh(), nn.Linear(16, 4))), data
        )
    with pytest.raises(DPMisconfigurationError, match="2·num_canaries·δ"):
        trainer(DPStrategy(noise_multiplier=1.0, target_delta=1e-2), callbacks=[CanaryAudit(num_canaries=60)]).fit(
            ClassifierModule(nn.Linear(10, 4)), data
        )
    with pytest.raises(DPMisconfigurationError, match="DPStrategy"):
        trainer("auto", callbacks=[CanaryAudit(num_canaries=10)]).fit(ClassifierModule(nn.Linear(10, 4)), data)


# ---------------------------------------------------------------------- input-space canaries
def _input_canaries(m=300, d=320, active=8):
    """One canary per unused input feature (amplitude 5, random label): only a canary's own example moves its
    weights, so a model that memorises it has a lower loss on it."""
    g = torch.Generator().manual_seed(5)
    canaries = []
    for j in range(m):
        x = torch.zeros(d)
        x[active + j] = 5.0
        canaries.append((x, torch.randint(0, 4, (), generator=g)))
    return canaries


def _per_sample_loss(module, batch):
    x, y = batch
    return nn.functional.cross_entropy(module(x), y, reduction="none")


def _input_audited_run(audit):
    """Claimed ε = 1, two epochs of the sparse data plus the "in" canaries (about 28 steps)."""
    torch.manual_seed(0)
    strategy = DPStrategy(target_epsilon=1.0, target_delta=DELTA, sampling_seed=1, noise_seed=1)
    tr = trainer(strategy, max_epochs=2, callbacks=[audit])
    tr.fit(ClassifierModule(nn.Linear(320, 4), lr=3.0), DataLoader(audit.wrap(_sparse_data(d=320)), batch_size=16))
    return tr


def test_input_canaries_are_added_with_probability_one_half_and_a_correct_run_audits_below_its_claim():
    audit = InputCanaryAudit(_input_canaries(), _per_sample_loss, seed=2)
    tr = _input_audited_run(audit)
    assert len(tr.train_dataloader.dataset) == 64 + audit.included.sum()
    assert abs(audit.included.sum() - 150) < 4 * math.sqrt(75)
    assert audit.scores.shape == (300,)
    assert audit.epsilon_lower_bound <= audit.claimed_epsilon <= 1.0


def test_input_canaries_catch_a_run_without_noise(monkeypatch):
    monkeypatch.setattr(lightning_dp.noise, "add_gaussian", lambda values, std, source: values)
    audit = InputCanaryAudit(_input_canaries(), _per_sample_loss, seed=2, on_violation="warn")
    with pytest.warns(UserWarning, match="EXCEEDS THE CLAIM"):
        _input_audited_run(audit)
    assert audit.epsilon_lower_bound > 1.0 >= audit.claimed_epsilon


def test_input_canary_audit_needs_the_wrapped_training_set():
    audit = InputCanaryAudit(_input_canaries(m=4, d=16), _per_sample_loss, seed=2)
    with pytest.raises(DPMisconfigurationError, match="wrap"):
        trainer(DPStrategy(noise_multiplier=1.0), callbacks=[audit]).fit(
            ClassifierModule(nn.Linear(16, 4)), DataLoader(_sparse_data(n=32, d=16), batch_size=8)
        )


# ---------------------------------------------------------------------- multi-run
def test_multi_run_audit_of_a_gaussian_mechanism_is_below_its_epsilon_and_catches_too_little_noise():
    """One Gaussian release per run of the canary's bit (sensitivity 1): σ = 2 is ε ≈ 1.99 at δ = 1e-5
    (dp_accounting's PLD, an independent accountant); a tenth of that noise is caught."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    accountant = PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(2.0))
    claim = accountant.get_epsilon(DELTA)
    rng = np.random.default_rng(0)

    def release(sigma):
        return lambda include, run: float(include) + rng.normal(0.0, sigma)

    ok = multi_run_audit(release(2.0), 400, claim, DELTA, seed=1)
    assert ok.epsilon_lower_bound <= claim and ok.num_canaries == 400
    with pytest.raises(PrivacyAuditError):
        multi_run_audit(release(0.2), 400, claim, DELTA, seed=1)
    broken = multi_run_audit(release(0.2), 400, claim, DELTA, seed=1, on_violation="warn")
    assert broken.epsilon_lower_bound > claim and "runs" in broken.describe()


def test_the_audit_state_round_trips_through_a_checkpoint(correct_run):
    _, audit = correct_run
    state = audit.state_dict()
    resumed = CanaryAudit(num_canaries=1000)
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.included, audit.included) and np.array_equal(resumed.scores, audit.scores)
    assert np.array_equal(resumed.inclusions, audit.inclusions)
    with pytest.raises(DPMisconfigurationError, match="num_canaries"):
        CanaryAudit(num_canaries=10).load_state_dict(state)


def test_per_layer_canaries_are_clipped_to_their_layer_bound_and_catch_a_run_without_noise(monkeypatch):
    """Two layers: each canary lies in one and is clipped to C/√2; with the noise off they are still caught."""
    monkeypatch.setattr(lightning_dp.noise, "add_gaussian", lambda values, std, source: values)
    audit = CanaryAudit(num_canaries=1000, seed=3, on_violation="warn")
    net = nn.Sequential(nn.Linear(512, 4), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="EXCEEDS THE CLAIM"):
        tr = _audited_run(audit, clipping="per_layer", net=net)
    assert len(tr.strategy.clipping_groups) == 2
    raw, factors = audit._clipped(tr.strategy)
    assert torch.allclose(raw * factors, torch.full_like(raw, 1.0 / math.sqrt(2)), rtol=1e-5)
    assert audit.epsilon_lower_bound > CLAIM
