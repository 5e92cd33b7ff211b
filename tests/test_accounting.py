"""ε against an independent accountant (dp_accounting's PLD), calibration, the accountant protocol and the ledger."""

import math
import warnings

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss

from lightning_dp.accounting import (
    MIN_NOISE_MULTIPLIER,
    Accountant,
    EstimatingAccountant,
    MechanismSegment,
    PLDAccountant,
    PrivacyLedger,
    PRVAccountant,
    RDPAccountant,
    calibrate_noise_multiplier,
    combine_noise_multipliers,
    compute_epsilon,
    default_accountant,
    epsilon_of_segments,
    gaussian_epsilon,
)
from lightning_dp.accounting.prv import _loss_cdf_sf, _prv_bounds
from lightning_dp.accounting.rdp import package_prvs as _package_prvs
from lightning_dp.errors import PrivacyTargetError


def pld_epsilon(segments, delta, interval=1e-4):
    """dp_accounting's PLD (pessimistic, connect-the-dots) with a loss discretisation ``interval``."""
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    for sigma, q, steps in segments:
        event = dp_event.GaussianDpEvent(sigma)
        if q < 1:
            event = dp_event.PoissonSampledDpEvent(q, event)
        acc.compose(event, steps)
    return acc.get_epsilon(delta)


def segs(*triples):
    return [MechanismSegment(*t) for t in triples]


# Reference settings (issue 10). PLD's default interval (1e-4 in loss) is itself ~6 % pessimistic at ε≈0.11 (e):
# there it is refined (2e-5: 0.11093; 1e-5: 0.11075; 2e-6: 0.11070), so the comparison is with an accurate value.
REFERENCE = {
    "a": ([(1.1, 256 / 60000, 14062)], 1e-4),
    "b": ([(1.0, 0.01, 10000)], 1e-4),
    "c": ([(3.0, 4096 / 50000, 488)], 1e-4),
    "mix": ([(1.0, 0.02, 200), (2.0, 0.05, 100), (5.0, 1.0, 3)], 1e-4),
    "small-q": ([(1.2, 0.05, 300), (0.9, 0.02, 1000)], 1e-4),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_epsilon_is_above_pld_and_within_3_percent(name):
    triples, interval = REFERENCE[name]
    ours = epsilon_of_segments(segs(*triples), 1e-5)
    ref = pld_epsilon(triples, 1e-5, interval)
    assert ref <= ours <= 1.03 * ref


def test_small_epsilon_long_run_is_above_pld_and_within_3_percent():
    # e: q = 64/1e6, σ = 0.8, 78,125 steps: ε ≈ 0.11. A fixed eps_error (0.2) gets 0.105 here, below the truth.
    # dp_accounting's PLD converges slowly here: 0.11773 at interval 1e-4, 0.11093 at 2e-5, 0.11075 at 1e-5 and
    # 0.11070 at 2e-6 (`pld_epsilon(..., interval=2e-6)`, ~2 min, so the figure is quoted). The default accountant
    # refines its interval itself and is within 0.1 % of the finest.
    ref = 0.11070
    for accountant in (None, PRVAccountant()):
        ours = compute_epsilon(0.8, 64 / 1e6, 78125, 1e-5, accountant)
        assert ref <= ours <= 1.03 * ref


def test_large_epsilon_200k_steps_is_above_pld_and_within_3_percent():
    # f: q = 0.001, σ = 0.6, 200,000 steps: ε ≈ 8.86.
    ours = compute_epsilon(0.6, 0.001, 200_000, 1e-5)
    ref = pld_epsilon([(0.6, 0.001, 200_000)], 1e-5)
    assert ref <= ours <= 1.03 * ref


@pytest.mark.parametrize(
    "triples",
    [[(20.0, 1.0, 100)], [(2.0, 1.0, 3), (5.0, 1.0, 7)], [(1.0, 1.0, 200)], [(0.5, 1.0, 1)]],
)
def test_composition_without_subsampling_is_the_exact_gaussian_bound(triples):
    ours = epsilon_of_segments(segs(*triples), 1e-5)
    mu = math.sqrt(sum(n / s**2 for s, _, n in triples))
    exact = GaussianPrivacyLoss(standard_deviation=1 / mu).get_delta_for_epsilon
    assert exact(ours) <= 1e-5 < exact(ours * (1 - 1e-6))  # an upper bound, and a tight one
    assert ours == gaussian_epsilon(mu, 1e-5)
    if ours < 10:  # PLD is slow for large ε
        assert ours == pytest.approx(pld_epsilon(triples, 1e-5), rel=1e-3)


def test_gaussian_epsilon_edge_cases():
    assert gaussian_epsilon(1e-9, 1e-5) == 0.0  # δ(0) is already below the target
    assert gaussian_epsilon(1.0, 1e-5) == pytest.approx(4.3772, abs=1e-4)
    assert gaussian_epsilon(1e3, 1e-5) > 5e5 - 1e3  # μ²/2 - μ·4.3 for a huge μ
    with pytest.raises(ValueError, match="delta"):
        gaussian_epsilon(1.0, 0.0)


@pytest.mark.parametrize("sigma, q", [(0.8, 64e-6), (0.6, 0.001), (3.0, 0.08), (1.5, 1.0)])
def test_float64_privacy_loss_cdf_matches_the_package(sigma, q):
    prv = _package_prvs(((sigma, q, 1),))[0]
    t = np.linspace(-2.0, 9.0, 4001)
    cdf, sf = _loss_cdf_sf(sigma, q, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.asarray(prv.cdf(t), dtype=np.float64)
    np.testing.assert_allclose(cdf, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cdf + sf, 1.0, rtol=0, atol=1e-15)
    np.testing.assert_array_less(0.0, sf[t > 0])  # the upper tail keeps its precision instead of rounding to 0


@pytest.mark.parametrize(
    "groups, eps_error",
    [
        (((1.1, 256 / 60000, 14062),), 0.05),
        (((1.0, 0.02, 200), (2.0, 0.05, 100), (2.0, 1.0, 1)), 0.05),
        (((0.8, 64e-6, 5000),), 0.005),
    ],
)
def test_fast_composition_matches_the_package_prv_accountant(groups, eps_error):
    from prv_accountant import PRVAccountant as PackagePRV

    ours = _prv_bounds(groups, 1e-5, eps_error, 1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = PackagePRV(
            prvs=_package_prvs(groups),
            max_self_compositions=[n for *_, n in groups],
            eps_error=eps_error,
            delta_error=1e-8,
        ).compute_epsilon(1e-5, [n for *_, n in groups])
    assert ours[0] == pytest.approx(ref[1], rel=1e-5)  # same estimate
    assert ref[2] <= ours[1] <= ref[2] + 1e-4  # same upper bound (ours adds a float64 rounding allowance)


def test_tiny_delta_redoes_the_composition_in_long_double(monkeypatch):
    # At δ = 1e-10 the float64 FFT noise (measured on the result) would eat δ; the composition is redone in
    # long double, and the bound stays tight instead of falling back to RDP.
    import lightning_dp.accounting.prv as accountants

    dtypes = []
    compose = accountants._compose

    def spy(groups, mesh, left, size, dtype):
        dtypes.append(dtype)
        return compose(groups, mesh, left, size, dtype)

    monkeypatch.setattr(accountants, "_compose", spy)
    ours = PRVAccountant(relative_error=0.0101).epsilon(segs((1.0, 0.001, 2000)), 1e-10)  # not a cached key
    ref = pld_epsilon([(1.0, 0.001, 2000)], 1e-10)
    assert np.longdouble in dtypes
    assert ref <= ours <= 1.03 * ref


def test_fast_composition_handles_a_mean_shift_of_many_cells():
    # At eps_error = 1 the per-step mean shifts add up to more than the domain: the package's reading then
    # wraps around (ε ≈ -2.8 here). The estimate must stay near ε ≈ 8.86.
    est, upper = _prv_bounds(((0.6, 0.001, 200_000),), 1e-5, 1.0, 1e-8)
    assert est == pytest.approx(8.86, rel=0.01)
    assert upper >= est + 1.0


@pytest.mark.parametrize("triples", [[(1.1, 256 / 60000, 14062)], [(1.0, 0.02, 200), (5.0, 1.0, 3)]])
def test_reported_epsilon_is_never_below_the_prv_estimate(triples):
    from prv_accountant import PRVAccountant as PackagePRV

    acc = PRVAccountant()
    reported = acc.epsilon(segs(*triples), 1e-5)
    assert reported >= acc.estimate(segs(*triples), 1e-5)
    groups = tuple((s, q, n) for s, q, n in triples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, package_estimate, _ = PackagePRV(
            prvs=_package_prvs(groups), max_self_compositions=[n for *_, n in groups], eps_error=0.05, delta_error=1e-8
        ).compute_epsilon(1e-5, [n for *_, n in groups])
    assert reported >= package_estimate
    assert reported <= RDPAccountant().epsilon(segs(*triples), 1e-5)  # and never looser than RDP


def test_relative_precision_is_respected():
    acc = PRVAccountant(relative_error=0.002)
    fine = acc.epsilon(segs((1.0, 0.01, 10000)), 1e-5)
    default = PRVAccountant().epsilon(segs((1.0, 0.01, 10000)), 1e-5)
    ref = pld_epsilon([(1.0, 0.01, 10000)], 1e-5)
    assert ref <= fine < default
    assert fine <= 1.003 * ref


def test_tiny_noise_reports_the_rdp_bound():
    # σ = 0.1 at q = 0.5: PRV would need tens of GiB; the (finite, valid) RDP bound is reported.
    ours = compute_epsilon(0.1, 0.5, 1000, 1e-5)
    assert ours == RDPAccountant().epsilon(segs((0.1, 0.5, 1000)), 1e-5)
    assert 100 < ours < math.inf


def test_empty_composition_is_free():
    assert epsilon_of_segments([], 1e-5) == 0.0
    assert epsilon_of_segments(segs((1.0, 0.01, 0)), 1e-5) == 0.0
    assert PRVAccountant().epsilon([], 1e-5) == 0.0


def test_accountants_satisfy_the_protocols():
    assert isinstance(PRVAccountant(), EstimatingAccountant)
    assert isinstance(PLDAccountant(), EstimatingAccountant) and isinstance(default_accountant(), PLDAccountant)
    with pytest.raises(ValueError, match="relative_error"):
        PLDAccountant(relative_error=0.5)
    assert isinstance(RDPAccountant(), Accountant) and not isinstance(RDPAccountant(), EstimatingAccountant)
    with pytest.raises(ValueError, match="relative_error"):
        PRVAccountant(relative_error=0.0)
    with pytest.raises(TypeError, match="epsilon"):
        PrivacyLedger(accountant=object())


def test_calibration_meets_target_tightly():
    q, steps, target = 0.02, 500, 2.0
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps)
    assert compute_epsilon(sigma, q, steps, 1e-5) <= target
    assert compute_epsilon(sigma * 0.98, q, steps, 1e-5) > target  # not wastefully large
    assert compute_epsilon(sigma / 1.005, q, steps, 1e-5) > target  # within rtol


def test_calibration_for_200k_steps_meets_target_tightly():
    q, steps, target = 0.001, 200_000, 8.9
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps)
    assert compute_epsilon(sigma, q, steps, 1e-5) <= target
    assert compute_epsilon(sigma / 1.005, q, steps, 1e-5) > target


def test_calibration_with_prior_spend():
    prior = segs((1.0, 0.02, 200))
    sigma = calibrate_noise_multiplier(3.0, 1e-5, 0.02, 300, prior=prior)
    total = epsilon_of_segments(prior + segs((sigma, 0.02, 300)), 1e-5)
    assert total <= 3.0
    assert epsilon_of_segments(prior + segs((0.98 * sigma, 0.02, 300)), 1e-5) > 3.0


def test_calibration_with_joint_noise():
    extra = (4.0, 8.0)
    sigma = calibrate_noise_multiplier(2.5, 1e-5, 0.02, 400, joint_noise={extra: 100})

    def eps(s):
        joint = combine_noise_multipliers(s, *extra)
        return epsilon_of_segments(segs((s, 0.02, 300), (joint, 0.02, 100)), 1e-5)

    assert eps(sigma) <= 2.5 < eps(0.98 * sigma)


def test_calibration_without_subsampling_uses_the_closed_form():
    sigma = calibrate_noise_multiplier(3.0, 1e-5, 1.0, 50)
    assert compute_epsilon(sigma, 1.0, 50, 1e-5) <= 3.0 < compute_epsilon(sigma / 1.005, 1.0, 50, 1e-5)


def test_loose_target_gets_the_smallest_noise_multiplier():
    sigma = calibrate_noise_multiplier(1e4, 1e-5, 0.01, 10)
    assert sigma == MIN_NOISE_MULTIPLIER
    assert compute_epsilon(sigma, 0.01, 10, 1e-5) <= 1e4


def test_unreachable_target():
    with pytest.raises(PrivacyTargetError, match="cannot be reached"):
        calibrate_noise_multiplier(1e-6, 1e-5, 0.1, 100)
    with pytest.raises(PrivacyTargetError, match="already spent"):
        calibrate_noise_multiplier(0.5, 1e-5, 0.1, 100, prior=[MechanismSegment(0.5, 0.5, 100)])


class CountingAccountant:
    """A test accountant: twice the RDP bound (a valid, loose upper bound), counting its calls."""

    def __init__(self):
        self.calls = 0

    def epsilon(self, segments, delta):
        self.calls += 1
        return 2.0 * RDPAccountant().epsilon(segments, delta)


class MisguidedAccountant(CountingAccountant):
    """An estimating accountant whose estimates are 20 % optimistic: the search must still verify the bound."""

    def __init__(self):
        super().__init__()
        self.estimates = 0

    def estimate(self, segments, delta):
        self.estimates += 1
        return 0.8 * self.epsilon(segments, delta)


def test_custom_accountant_is_used_by_the_ledger():
    acc = CountingAccountant()
    ledger = PrivacyLedger(accountant=acc)
    ledger.record(1.0, 0.01, steps=100)
    ledger.record(1.0, 0.01, mechanism="histogram")
    expected = 2.0 * RDPAccountant().epsilon(segs((1.0, 0.01, 101)), 1e-5)
    assert ledger.epsilon(1e-5) == pytest.approx(expected) and acc.calls == 1
    assert ledger.epsilon(1e-5, extra=segs((1.0, 0.01, 10))) > expected
    assert set(ledger.breakdown(1e-5)) == {"dp-sgd", "histogram"} and acc.calls == 4
    assert ledger.accountant is acc
    assert PrivacyLedger().accountant is default_accountant()


@pytest.mark.parametrize("accountant_cls", [CountingAccountant, MisguidedAccountant])
def test_custom_accountant_is_used_by_calibration(accountant_cls):
    acc = accountant_cls()
    sigma = calibrate_noise_multiplier(3.0, 1e-5, 0.02, 500, accountant=acc)
    assert acc.calls > 0
    assert acc.epsilon(segs((sigma, 0.02, 500)), 1e-5) <= 3.0 < acc.epsilon(segs((sigma / 1.005, 0.02, 500)), 1e-5)
    assert sigma > calibrate_noise_multiplier(3.0, 1e-5, 0.02, 500)  # a looser accountant needs more noise
    if isinstance(acc, MisguidedAccountant):
        assert acc.estimates > 0


def test_ledger_merges_and_round_trips_through_weights_only_load(tmp_path):
    ledger = PrivacyLedger()
    for _ in range(10):
        ledger.record(1.0, 0.01)
    ledger.record(1.0, 0.01, mechanism="histogram")
    ledger.record(2.0, 0.01, steps=5)
    assert len(ledger) == 3 and ledger.steps == 15 and ledger.steps_of("histogram") == 1
    torch.save({"ledger": ledger.state_dict()}, tmp_path / "l.pt")
    state = torch.load(tmp_path / "l.pt", weights_only=True)["ledger"]
    assert state["version"] == 1
    assert all(isinstance(v, (int, float, str)) for s in state["segments"] for v in s.values())
    restored = PrivacyLedger(accountant=RDPAccountant())
    restored.load_state_dict(state)
    assert restored.segments == ledger.segments
    assert restored.epsilon(1e-5) >= ledger.epsilon(1e-5)  # RDP is looser than PRV
    assert set(ledger.breakdown(1e-5)) == {"dp-sgd", "histogram"}


def test_the_old_accounting_modules_still_import_with_a_deprecation_warning():
    import lightning_dp.accountants as old_accountants
    import lightning_dp.pld as old_pld

    with pytest.warns(DeprecationWarning, match="moved to lightning_dp.accounting"):
        assert old_accountants.PRVAccountant is PRVAccountant
    with pytest.warns(DeprecationWarning, match="moved to lightning_dp.accounting"):
        assert old_pld.PLDAccountant is PLDAccountant
