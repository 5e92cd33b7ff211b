"""ε against an independent accountant (dp_accounting's PLD), calibration and the ledger."""

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from lightning_dp.accounting import (
    MechanismSegment,
    PrivacyLedger,
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_of_segments,
)
from lightning_dp.errors import PrivacyTargetError


def pld_epsilon(segments, delta):
    acc = pld_privacy_accountant.PLDAccountant()
    for sigma, q, steps in segments:
        event = dp_event.GaussianDpEvent(sigma)
        if q < 1:
            event = dp_event.PoissonSampledDpEvent(q, event)
        acc.compose(event, steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    "sigma, q, steps",
    [(3.0, 4096 / 50000, 488), (20.0, 1.0, 100), (1.2, 0.05, 300), (0.9, 0.02, 1000)],
)
def test_epsilon_matches_pld_within_3_percent(sigma, q, steps):
    ours = compute_epsilon(sigma, q, steps, 1e-5)
    ref = pld_epsilon([(sigma, q, steps)], 1e-5)
    assert ours == pytest.approx(ref, rel=0.03)
    assert ours >= ref * 0.999, "the PRV upper bound should not be below PLD's estimate"


def test_heterogeneous_composition_matches_pld():
    segs = [(1.0, 0.02, 200), (2.0, 0.05, 100), (5.0, 1.0, 3)]
    ours = epsilon_of_segments([MechanismSegment(*s) for s in segs], 1e-5)
    assert ours == pytest.approx(pld_epsilon(segs, 1e-5), rel=0.03)


def test_calibration_meets_target_tightly():
    q, steps, target = 0.02, 500, 2.0
    sigma = calibrate_noise_multiplier(target, 1e-5, q, steps)
    assert compute_epsilon(sigma, q, steps, 1e-5) <= target
    assert compute_epsilon(sigma * 0.98, q, steps, 1e-5) > target  # not wastefully large


def test_calibration_with_prior_spend():
    prior = [MechanismSegment(1.0, 0.02, 200)]
    sigma = calibrate_noise_multiplier(3.0, 1e-5, 0.02, 300, prior=prior)
    total = epsilon_of_segments(prior + [MechanismSegment(sigma, 0.02, 300)], 1e-5)
    assert total <= 3.0
    assert total > 2.9


def test_unreachable_target():
    with pytest.raises(PrivacyTargetError, match="cannot be reached"):
        calibrate_noise_multiplier(1e-6, 1e-5, 0.1, 100)
    with pytest.raises(PrivacyTargetError, match="already spent"):
        calibrate_noise_multiplier(0.5, 1e-5, 0.1, 100, prior=[MechanismSegment(0.5, 0.5, 100)])


def test_ledger_merges_and_round_trips_through_weights_only_load(tmp_path):
    ledger = PrivacyLedger()
    for _ in range(10):
        ledger.record(1.0, 0.01)
    ledger.record(1.0, 0.01, mechanism="histogram")
    ledger.record(2.0, 0.01, steps=5)
    assert len(ledger) == 3 and ledger.steps == 15 and ledger.steps_of("histogram") == 1
    torch.save({"ledger": ledger.state_dict()}, tmp_path / "l.pt")
    state = torch.load(tmp_path / "l.pt", weights_only=True)["ledger"]
    restored = PrivacyLedger()
    restored.load_state_dict(state)
    assert restored.segments == ledger.segments
    assert restored.epsilon(1e-5) == ledger.epsilon(1e-5)
    assert set(ledger.breakdown(1e-5)) == {"dp-sgd", "histogram"}
