"""The Lightning-free privacy core, without a Trainer: plan, batch selection, budget guard, ε meter, journal, seeds."""

import json
import math

import pytest
import torch

from lightning_dp.accounting import MechanismSegment, PrivacyLedger, combine_noise_multipliers, compute_epsilon
from lightning_dp.batch_selection import PoissonSelection, ShuffleSelection
from lightning_dp.budget import BudgetGuard
from lightning_dp.errors import DPMisconfigurationError, PrivacyTargetError
from lightning_dp.journal import JournalError, PrivacyJournal
from lightning_dp.plan import PrivacyPlan, planned_total_steps
from lightning_dp.randomness import RandomStreams, SecureSource


# ---------------------------------------------------------------------- planned steps
@pytest.mark.parametrize(
    "args, kw, expected",
    [
        ((3, 2, -1), {}, 6),  # limit_train_batches=3, max_epochs=2: the case
        ((10, 2, 15), {}, 15),
        ((10, None, 7), {}, 7),
        ((10, -1, -1), {}, None),
        ((10, 3, -1), dict(global_step=14, current_epoch=1, done_in_epoch=4), 30),  # a mid-epoch resume
        ((10, 3, 20), dict(global_step=14, current_epoch=1, done_in_epoch=4), 20),
    ],
)
def test_planned_total_steps(args, kw, expected):
    assert planned_total_steps(*args, **kw) == expected


# ---------------------------------------------------------------------- the plan
def test_noise_multiplier_plan_records_one_event_per_step():
    plan = PrivacyPlan(noise_multiplier=1.5)
    plan.bind(num_samples=1000, batch_size=25, num_replicas=2)
    plan.schedule(planned_steps=10)
    assert plan.sample_rate == 0.05 and plan.expected_batch_size == 50
    for _ in range(4):
        plan.record()
    assert plan.ledger.segments == [MechanismSegment(1.5, 0.05, 4)]
    assert plan.cumulative_noise() == pytest.approx(1.5 * math.sqrt(10))


def test_target_plan_calibrates_within_target_and_resumes_with_the_same_sigma():
    plan = PrivacyPlan(target_epsilon=2.0, delta=1e-5)
    plan.bind(num_samples=1000, batch_size=50)
    plan.schedule(planned_steps=40)
    sigma = plan.noise_multiplier
    assert compute_epsilon(sigma, 0.05, 40, 1e-5) <= 2.0 < compute_epsilon(0.98 * sigma, 0.05, 40, 1e-5)
    for _ in range(15):
        plan.record()
    state = json.loads(json.dumps(plan.state_dict()))  # plain numbers
    resumed = PrivacyPlan(target_epsilon=2.0, delta=1e-5)
    resumed.load_state_dict(state)
    resumed.bind(num_samples=1000, batch_size=50)
    resumed.schedule(planned_steps=40)
    assert resumed.noise_multiplier == sigma and resumed.released_steps == 15
    longer = PrivacyPlan(target_epsilon=2.0, delta=1e-5)
    longer.load_state_dict(state)
    longer.bind(num_samples=1000, batch_size=50)
    longer.schedule(planned_steps=80)  # another plan: σ for the rest, on top of what was spent
    assert longer.noise_multiplier > sigma
    full = longer.ledger.segments + longer.planned_segments(15, 65)
    assert PrivacyLedger().epsilon(1e-5, extra=full) <= 2.0


def test_target_plan_with_joint_releases_and_phases():
    plan = PrivacyPlan(target_epsilon=3.0, delta=1e-5)
    plan.bind(num_samples=1000, batch_size=50)
    plan.schedule(40, extras_of=lambda k: (2.0,) if k % 4 == 0 else (), phases_of=lambda n: [(10, 0.4), (n, 1.0)])
    (end1, s1), (end2, s2) = plan.phases
    assert (end1, end2) == (10, 40) and s1 != s2
    assert plan.multiplier_of(0) == pytest.approx(combine_noise_multipliers(s1, 2.0))
    assert plan.multiplier_of(11) == s2
    events = plan.planned_segments(0, 40)
    assert sum(e.steps for e in events) == 40
    assert PrivacyLedger().epsilon(1e-5, extra=events) <= 3.0
    assert PrivacyLedger().epsilon(1e-5, extra=plan.planned_segments(0, 10)) <= 0.4 * 3.0


def test_plan_errors():
    with pytest.raises(DPMisconfigurationError, match="exactly one"):
        PrivacyPlan(target_epsilon=1.0, noise_multiplier=1.0)
    with pytest.raises(DPMisconfigurationError, match="exactly one"):
        PrivacyPlan().schedule(planned_steps=10)  # neither: nothing can be scheduled
    with pytest.raises(PrivacyTargetError, match="finite"):
        PrivacyPlan(target_epsilon=math.inf)
    plan = PrivacyPlan(target_epsilon=1.0)
    with pytest.raises(PrivacyTargetError, match="1/N"):
        plan.bind(num_samples=200_000, batch_size=2)
    plan.bind(num_samples=1000, batch_size=10)
    with pytest.raises(PrivacyTargetError, match="finite run"):
        plan.schedule(None)
    with pytest.raises(DPMisconfigurationError, match="changed during fit"):
        plan.bind(num_samples=900, batch_size=10)


# ---------------------------------------------------------------------- batch selection
def test_shuffle_selection_charges_one_release_per_pass_and_each_resume():
    sel = ShuffleSelection()
    sel.bind(num_samples=100, batch_size=10)
    position = [0]
    sampler = sel.batch_sampler(
        lambda step, rank: __import__("lightning_dp.randomness").randomness.TorchSource(step), lambda: position[0]
    )
    events = []
    for _ in range(2):  # two epochs
        for batch in sampler:
            assert len(batch) == 10
            events.append(sel.step_event(position[0], lambda k: 2.0))
            position[0] += 1
    charged = [e for e in events if e is not None]
    assert len(charged) == 2 and all(e == MechanismSegment(1.0, 1.0, 1) for e in charged)  # σ/2 at q = 1
    # a resume builds a new sampler: its (partial) pass is charged again
    sampler = sel.batch_sampler(
        lambda step, rank: __import__("lightning_dp.randomness").randomness.TorchSource(step), lambda: 25
    )
    next(iter(sampler))
    assert sel.step_event(25, lambda k: 2.0) is not None
    assert len(sel.planned_events(26, 30, lambda k: 2.0)) == 3  # passes starting at 30, 40, 50


def test_poisson_selection_calibrates_like_the_accountant():
    from lightning_dp.accounting import calibrate_noise_multiplier

    sel = PoissonSelection()
    sel.bind(num_samples=2000, batch_size=40)
    sigma = sel.calibrate(2.0, 1e-5, 0, 100, [], lambda k: ())
    assert sigma == calibrate_noise_multiplier(2.0, 1e-5, 0.02, 100)


# ---------------------------------------------------------------------- budget guard
def test_budget_guard_stops_at_the_exact_step_and_uses_the_certificate():
    q, sigma, delta = 0.1, 1.0, 1e-5
    eps7, eps8 = (compute_epsilon(sigma, q, t, delta) for t in (7, 8))
    guard = BudgetGuard((eps7 + eps8) / 2, delta, lookahead=16)
    ledger = PrivacyLedger()

    def planned(start, count):
        return [MechanismSegment(sigma, q, count)] if count else []

    allowed = []
    for step in range(12):
        ok = guard.allowed(ledger, step, planned)
        allowed.append(ok)
        if not ok:
            break
        ledger.record(sigma, q)
    assert allowed == [True] * 7 + [False] and guard.exceeds_at == 7
    assert guard.evaluations <= 6
    certified = BudgetGuard(1.0, delta)
    certified.certify([MechanismSegment(sigma, q, 5)])
    for step in range(5):
        assert certified.allowed(PrivacyLedger(), step, planned)
        certified.consume(MechanismSegment(sigma, q, 1))
    assert certified.evaluations == 0


# ---------------------------------------------------------------------- ε meter


# ---------------------------------------------------------------------- journal
def test_journal_appends_reads_and_ignores_an_incomplete_last_line(tmp_path):
    journal = PrivacyJournal.create(tmp_path, delta=1e-5)
    journal.append_session(0, 0)
    journal.append_step(0, 0, MechanismSegment(1.0, 0.1, 1))
    journal.append_step(1, 0, None)
    journal.close()
    with open(journal.path, "a") as f:
        f.write('{"type": "step", "step": 2')  # the process died while writing
    contents = PrivacyJournal.read_file(journal.path)
    assert [r["step"] for r in contents.steps] == [0, 1] and contents.ledger().steps == 1
    assert PrivacyJournal.open(journal.path).records == 2
    with open(journal.path, "a") as f:
        f.write("\n{broken\n")
    with pytest.raises(JournalError, match="corrupt"):
        PrivacyJournal.read_file(journal.path)


# ---------------------------------------------------------------------- randomness
def test_streams_are_fresh_per_fit_and_fixed_seeds_reproduce():
    streams = RandomStreams()
    streams.refresh()
    a = streams.source("noise", 3).normal((5,), 1.0, torch.device("cpu"), torch.float32)
    streams.refresh()  # a new fit
    b = streams.source("noise", 3).normal((5,), 1.0, torch.device("cpu"), torch.float32)
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    fixed = RandomStreams({"noise": 7})
    fixed.refresh()
    c = fixed.source("noise", 3).normal((5,), 1.0, torch.device("cpu"), torch.float32)
    fixed.refresh()
    torch.manual_seed(1)
    assert torch.equal(c, fixed.source("noise", 3).normal((5,), 1.0, torch.device("cpu"), torch.float32))
    assert not torch.equal(c, fixed.source("noise", 4).normal((5,), 1.0, torch.device("cpu"), torch.float32))
    assert not torch.equal(c, fixed.source("noise", 3, branch=1).normal((5,), 1.0, torch.device("cpu"), torch.float32))


def test_secure_source_draws_gaussians_and_uniforms():
    src = SecureSource(b"\x01" * 32)
    z = src.normal((200_000,), 2.0, torch.device("cpu"), torch.float64)
    assert z.mean().abs() < 4 * 2.0 / math.sqrt(z.numel()) and z.std().item() == pytest.approx(2.0, rel=0.01)
    u = src.uniform(100_000)
    assert 0 <= u.min() and u.max() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    assert sorted(src.permutation(50).tolist()) == list(range(50))


def test_the_plan_calibrates_and_reports_with_its_accountant():
    from lightning_dp import RDPAccountant

    rdp = RDPAccountant()
    plan = PrivacyPlan(target_epsilon=2.0, delta=1e-5, accountant=rdp)
    plan.bind(num_samples=1000, batch_size=50)
    plan.schedule(planned_steps=40)
    sigma = plan.noise_multiplier
    assert rdp.epsilon([MechanismSegment(sigma, 0.05, 40)], 1e-5) <= 2.0
    prv = PrivacyPlan(target_epsilon=2.0, delta=1e-5)
    prv.bind(num_samples=1000, batch_size=50)
    prv.schedule(planned_steps=40)
    assert sigma > prv.noise_multiplier  # RDP is looser than PRV: it needs more noise
    for _ in range(40):
        plan.record()
    assert plan.epsilon() == rdp.epsilon(plan.ledger.segments, 1e-5)


def test_two_draws_for_the_same_purpose_and_step_are_independent():
    streams = RandomStreams({"histogram": 3})
    streams.refresh()
    cpu = torch.device("cpu")
    a = streams.source("histogram", 5).normal((8,), 1.0, cpu, torch.float64)
    b = streams.source("histogram", 5).normal((8,), 1.0, cpu, torch.float64)  # a second callback, same step
    assert not torch.equal(a, b)
    streams.refresh()  # the same seeds, the same order: the same draws
    assert torch.equal(a, streams.source("histogram", 5).normal((8,), 1.0, cpu, torch.float64))


def test_secure_streams_are_fresh_per_fit_and_shared_by_ranks_with_one_root():
    rank0, rank1 = RandomStreams(secure=True), RandomStreams(secure=True)
    rank0.refresh()
    rank1.refresh()
    first = rank0.source("sampling", 3).permutation(20)
    assert not torch.equal(first, rank1.source("sampling", 3).permutation(20))  # independent fresh roots ...
    other = RandomStreams(secure=True)  # another rank in a new fit adopts rank 0's broadcast root: the same shuffle
    other.refresh()
    other.set_root("sampling", rank0.root("sampling"))
    assert torch.equal(first, other.source("sampling", 3).permutation(20))
    assert rank0.root("noise").bit_length() > 64  # 256-bit secrets, not torch seeds
