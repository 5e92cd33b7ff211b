"""The accounted search: search_epsilon against dp_accounting, the runs distributions, the search's released ε, and
a search resumed after a crash."""

import json
import logging
import math

import lightning as L
import numpy as np
import pytest
import torch
from helpers import mlp, tensor_data
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader

from lightning_dp import DPMisconfigurationError, PrivacyTargetError
from lightning_dp.randomness import SecureSource, TorchSource
from lightning_dp.tuning import (
    GeometricRuns,
    PoissonRuns,
    PrivateSearch,
    SearchSources,
    TruncatedNegativeBinomialRuns,
    calibrate_search_noise,
    draw_search,
    search_epsilon,
    search_epsilon_of_plans,
)
from lightning_dp.tuning.accounting import integer_order_search_epsilon  # noqa: E402

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.rdp import RdpAccountant  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's fractional-order convergence notes

DISTRIBUTIONS = [
    PoissonRuns(8),
    PoissonRuns(1),
    GeometricRuns(10),
    GeometricRuns(1),
    TruncatedNegativeBinomialRuns(10, 0.5),
    TruncatedNegativeBinomialRuns(5, 2.0),
]
# One run's plans, single-run ε from ~0.3 to ~8 (search ε up to ~13): the regime of DP training.
PLANS = [
    [(1.0, 0.01, 1000)],
    [(5.0, 0.004, 10000)],
    [(2.0, 0.1, 50), (10.0, 1.0, 1)],  # DP-SGD and a noisy validation score
    [(0.8, 0.05, 200)],
    [(1.2, 0.256, 40), (3.0, 1.0, 1)],
]


def reference(segments, delta, runs):
    """Papernot–Steinke's bound as dp_accounting computes it (RepeatAndSelectDpEvent, RdpAccountant)."""
    parts = []
    for sigma, q, steps in segments:
        gauss = dp_accounting.GaussianDpEvent(sigma)
        event = gauss if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gauss)
        parts.append(dp_accounting.SelfComposedDpEvent(event, steps))
    accountant = RdpAccountant()
    accountant.compose(runs.dp_event(dp_accounting.ComposedDpEvent(parts)))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("runs", DISTRIBUTIONS, ids=repr)
@pytest.mark.parametrize("segments", PLANS, ids=str)
def test_search_epsilon_is_never_below_dp_accounting_and_within_15_percent(segments, runs):
    ours, ref = search_epsilon(segments, 1e-5, runs), reference(segments, 1e-5, runs)
    assert ref <= ours <= 1.15 * ref, (ours, ref)
    own = integer_order_search_epsilon([segments], 1e-5, runs)  # the independent computation alone
    assert ref <= own, (own, ref)


@pytest.mark.parametrize("runs", [PoissonRuns(8), GeometricRuns(10)], ids=repr)
def test_search_epsilon_stays_within_15_percent_at_large_epsilon(runs):
    segments = [(0.6, 0.05, 2000)]  # one run's ε ≈ 11: integer orders alone are 25 % above dp_accounting here
    ours, ref = search_epsilon(segments, 1e-5, runs), reference(segments, 1e-5, runs)
    assert ref <= ours <= 1.15 * ref, (ours, ref)


@pytest.mark.parametrize("runs", [PoissonRuns(8), GeometricRuns(10), TruncatedNegativeBinomialRuns(5, 2.0)], ids=repr)
def test_search_epsilon_is_never_below_dp_accounting_at_large_epsilon(runs):
    # The integer orders make the bound looser (not optimistic) where the best order falls below 2.
    for segments in ([(0.6, 0.128, 8)], [(0.5, 0.01, 3000)]):
        assert search_epsilon(segments, 1e-5, runs) >= reference(segments, 1e-5, runs)


def test_search_costs_more_than_one_run_and_grows_with_the_mean():
    one = search_epsilon([(1.0, 0.01, 1000)], 1e-5, PoissonRuns(1))
    costs = [search_epsilon([(1.0, 0.01, 1000)], 1e-5, GeometricRuns(m)) for m in (2, 8, 32)]
    assert one < costs[0] < costs[1] < costs[2]


def test_heterogeneous_plans_take_the_worst_order_by_order():
    a, b = [(1.0, 0.01, 1000)], [(3.0, 0.5, 400)]
    runs = GeometricRuns(5)
    mixed = search_epsilon_of_plans([a, b], 1e-5, runs)
    assert mixed >= max(search_epsilon(a, 1e-5, runs), search_epsilon(b, 1e-5, runs))
    assert search_epsilon_of_plans([a, a], 1e-5, runs) == search_epsilon(a, 1e-5, runs)


def test_calibration_meets_the_search_target():
    runs, plans, score = TruncatedNegativeBinomialRuns(6, 0.5), [(0.02, 500), (0.1, 100)], [(10.0, 1.0, 1)]
    sigmas = calibrate_search_noise(4.0, 1e-5, runs, plans, score)
    total = search_epsilon_of_plans([[(s, q, t), *score] for s, (q, t) in zip(sigmas, plans)], 1e-5, runs)
    assert 4.0 * 0.99 <= total <= 4.0
    assert reference([(sigmas[0], *plans[0]), *score], 1e-5, runs) <= 4.0  # dp_accounting agrees
    with pytest.raises(PrivacyTargetError, match="score noise"):
        calibrate_search_noise(0.01, 1e-5, runs, plans, [(0.5, 1.0, 1)])


@pytest.mark.parametrize("source", ["torch", "secure"])
@pytest.mark.parametrize("runs", [PoissonRuns(4), GeometricRuns(3), TruncatedNegativeBinomialRuns(4, 0.5)], ids=repr)
def test_number_of_runs_follows_the_declared_distribution(runs, source):
    src = TorchSource(1234) if source == "torch" else SecureSource(b"k" * 32)
    draws = np.array([runs.sample(src) for _ in range(3000)])
    assert len(set(draws.tolist())) > 3  # random
    ks = np.arange(draws.max() + 1)
    expected = np.array([runs.pmf(int(k)) for k in ks]) * len(draws)
    observed = np.bincount(draws, minlength=len(ks)).astype(float)
    keep = expected >= 5  # pool the sparse tail
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], len(draws) - expected[keep].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    assert draws.mean() == pytest.approx(runs.mean, abs=4 * math.sqrt(runs.variance() / len(draws)))
    if not isinstance(runs, PoissonRuns):
        assert draws.min() >= 1


def test_draws_use_the_search_source_not_global_rngs():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    space = {"max_grad_norm": [0.1, 1.0, 10.0], "lr": [0.01, 0.1]}
    a = draw_search(GeometricRuns(6), space, SearchSources(seed=7))
    assert a == draw_search(GeometricRuns(6), space, SearchSources(seed=7))
    assert torch.equal(torch_state, torch.get_rng_state()) and (np_state == np.random.get_state()[1]).all()
    counts = {len(draw_search(GeometricRuns(6), space, SearchSources())) for _ in range(20)}
    assert len(counts) > 1  # fresh entropy each search
    secure = draw_search(PoissonRuns(6), space, SearchSources(secure=True))
    assert all(c["max_grad_norm"] in space["max_grad_norm"] and c["lr"] in space["lr"] for c in secure)
    with pytest.raises(DPMisconfigurationError, match="secure"):
        SearchSources(secure=True, seed=1)


# ---------------------------------------------------------------------------------------------------- the search
N = 120


class Module(L.LightningModule):
    def __init__(self, lr):
        super().__init__()
        self.net, self.lr = mlp(), lr

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


SPACE = {"max_grad_norm": [0.5, 1.0], "batch_size": [30, 60], "lr": [0.05, 0.2]}


def make_search(tmp_path, callbacks_factory=None, space=SPACE, **kw):
    train, val = tensor_data(N, seed=0), tensor_data(60, seed=1)
    args = dict(
        num_samples=N, runs=GeometricRuns(3), delta=1e-5, target_epsilon=6.0, directory=tmp_path / "search",
        defaults={"epochs": 1}, seed=3, callbacks_factory=callbacks_factory,
    )  # fmt: skip
    args.update(kw)
    return PrivateSearch(
        lambda c: Module(c["lr"]),
        lambda c: (DataLoader(train, batch_size=c["batch_size"]), DataLoader(val, batch_size=60)),
        space,
        **args,
    )


def test_search_releases_the_best_run_with_the_epsilon_of_its_runs(tmp_path):
    result = make_search(tmp_path).run()
    assert result.released and result.runs_drawn == len(result.runs) >= 1
    search = make_search(tmp_path)
    sigmas = search.sigmas()
    plans = [[(sigmas[(q, t)], q, t), (10.0, 1.0, 1)] for q, t in sigmas]  # every plan of the space
    assert sorted(sigmas) == [(30 / N, 4), (60 / N, 2)]
    assert result.epsilon == search_epsilon_of_plans(plans, 1e-5, GeometricRuns(3)) <= 6.0
    for r in result.runs:
        assert r.steps <= search.plan_of(r.config)[1] and r.noise_multiplier == sigmas[search.plan_of(r.config)]
    best = max(result.runs, key=lambda r: r.score)
    assert result.score == best.score and result.config == {"epochs": 1, **best.config}
    assert result.table.read_text().count("\n") == len(result.runs) + 1
    assert result.markdown.exists() and (tmp_path / "search" / "best_model.pt").exists()
    # one search, one group: each run logged under it
    assert sorted(p.name for p in (tmp_path / "search" / "logs" / "search").iterdir()) == [
        f"run_{i}" for i in range(len(result.runs))
    ]


def test_single_plan_search_epsilon_equals_search_epsilon_of_the_run(tmp_path):
    space = {"max_grad_norm": [0.5, 1.0], "lr": [0.05, 0.2]}
    search = make_search(tmp_path, space=space, defaults={"epochs": 1, "batch_size": 60}, target_epsilon=None,
                         noise_multiplier=2.0, selection="public")  # fmt: skip
    result = search.run()
    assert result.selection == "public"
    assert result.epsilon == search_epsilon([(2.0, 0.5, 2)], 1e-5, GeometricRuns(3))


def test_zero_runs_release_nothing(tmp_path):
    search = make_search(tmp_path, runs=PoissonRuns(1))
    seed = next(s for s in range(100) if PoissonRuns(1).sample(SearchSources(seed=s).source("count")) == 0)
    search.seed = seed
    result = search.run()
    assert not result.released and result.model is None and result.runs_drawn == 0
    assert "nothing is released" in result.summary()


class Crash(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        raise RuntimeError("crash")


def test_crashed_search_resumes_without_redrawing_or_retraining(tmp_path):
    trained = []

    def callbacks(config):
        trained.append(config)
        return [Crash()] if len(trained) == 3 else []  # the third run crashes, once

    search = make_search(tmp_path, callbacks, runs=GeometricRuns(6), seed=11)
    drawn = len(draw_search(GeometricRuns(6), search.space, SearchSources(seed=11)))
    assert drawn >= 3
    with pytest.raises(RuntimeError, match="crash"):
        search.run()
    state = json.loads((tmp_path / "search" / "search_state.json").read_text())
    assert state["runs_drawn"] == drawn and len(state["results"]) == 2
    # resume with a different seed: the count and the configurations come from the state file
    resumed = make_search(tmp_path, callbacks, runs=GeometricRuns(6), seed=12)
    result = resumed.run()
    assert result.runs_drawn == drawn == len(result.runs) and len(trained) == drawn + 1  # runs 0, 1 not retrained
    assert [r.config for r in result.runs] == state["configs"]
    assert [vars(r) for r in result.runs[:2]] == state["results"]
    assert result.model is not None
    with pytest.raises(DPMisconfigurationError, match="declared differently"):
        make_search(tmp_path, runs=GeometricRuns(7)).run()


def test_private_score_is_noised_and_public_score_is_not(tmp_path):
    one = {"max_grad_norm": [1.0], "batch_size": [60], "lr": [0.1]}
    noisy = make_search(tmp_path / "a", space=one, runs=GeometricRuns(1), score_noise_multiplier=1000.0,
                        target_epsilon=None, noise_multiplier=2.0).run()  # fmt: skip
    public = make_search(tmp_path / "b", space=one, runs=GeometricRuns(1), selection="public", target_epsilon=None,
                         noise_multiplier=2.0).run()  # fmt: skip
    assert noisy.runs_drawn == public.runs_drawn == 1
    assert not 0 <= noisy.score <= 1  # std 1000/60: the released score carries the noise it is charged for
    assert 0 <= public.score <= 1
    assert noisy.epsilon == search_epsilon([(2.0, 0.5, 2), (1000.0, 1.0, 1)], 1e-5, GeometricRuns(1))
    assert public.epsilon == search_epsilon([(2.0, 0.5, 2)], 1e-5, GeometricRuns(1)) < noisy.epsilon


def test_a_run_that_spends_more_than_its_plan_stops_the_search(tmp_path):
    train, val = tensor_data(N, seed=0), tensor_data(60, seed=1)
    search = PrivateSearch(
        lambda c: Module(c["lr"]),
        lambda c: (DataLoader(train, batch_size=2 * c["batch_size"]), DataLoader(val, batch_size=60)),  # not B
        {"batch_size": [30], "lr": [0.1]},
        num_samples=N, runs=GeometricRuns(1), delta=1e-5, noise_multiplier=2.0, defaults={"epochs": 1},
        directory=tmp_path / "search", seed=0,
    )  # fmt: skip
    with pytest.raises(DPMisconfigurationError, match="spent more than its plan"):
        search.run()
