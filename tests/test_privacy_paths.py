"""Privacy on every path a real run takes (issue 11): resume, refit, unfreeze, bad examples, checkpoints on trust.

Each numbered case of the issue is a test here, through a real Trainer; every one failed on the code before the fix.
"""

import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from helpers import ClassifierModule, loader, mlp, tensor_data, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import DPMisconfigurationError, DPStrategy
from lightning_dp.callbacks import PrivacyBudget

HERE = os.path.dirname(os.path.abspath(__file__))


class SaveAt(L.Callback):
    """Save a checkpoint after the given global steps; optionally stop after the last."""

    def __init__(self, path_of, steps, stop=False):
        self.path_of, self.steps, self.stop = path_of, set(steps), stop

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step in self.steps:
            trainer.save_checkpoint(self.path_of(trainer.global_step))
            if self.stop and trainer.global_step == max(self.steps):
                trainer.should_stop = True


class Updates(L.Callback):
    """Record each step's parameter change and the indices of the examples in its batch (column 0 of x)."""

    def __init__(self):
        self.deltas, self.batches, self._before = [], [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])
        self.batches.append(sorted(batch[0][:, 0].long().tolist()))

    def on_train_batch_end(self, trainer, pl_module, *args):
        after = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        self.deltas.append(after - self._before)


def indexed_data(n=200, d=10, seed=0):
    """Inputs whose first column is the example's index (to identify batches); labels in 0..2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


def _find_keys(obj, needle):
    if isinstance(obj, dict):
        return [k for k in obj if needle in str(k).lower()] + [x for v in obj.values() for x in _find_keys(v, needle)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _find_keys(v, needle)]
    return []


# ---------------------------------------------------------------------- 1, 2: randomness after a resume
def test_noise_and_batches_never_repeat_after_a_resume_with_seed_everything(tmp_path):
    ds = indexed_data()
    ckpt = str(tmp_path / "step4.ckpt")
    L.seed_everything(0)
    first = Updates()
    trainer(
        DPStrategy(noise_multiplier=1.0), max_steps=8, callbacks=[first, SaveAt(lambda s: ckpt, [4], stop=True)]
    ).fit(ClassifierModule(mlp(), lr=0.5), loader(ds, 20))
    L.seed_everything(0)  # normal practice at the start of every process
    resumed = Updates()
    trainer(DPStrategy(noise_multiplier=1.0), max_steps=8, callbacks=[resumed]).fit(
        ClassifierModule(mlp(), lr=0.5), loader(ds, 20), ckpt_path=ckpt
    )
    assert len(resumed.deltas) == 4
    # No resumed update repeats the noise of an earlier step (the updates would coincide up to the data term).
    for d in resumed.deltas:
        for e in first.deltas:
            assert not torch.allclose(d, e, atol=1e-3)
    # Nor the example sets of the epoch's first steps (the old sampler restarted the epoch from its stored seed).
    for b in resumed.batches:
        assert b not in first.batches[:4]
    # A published checkpoint holds nothing to rebuild batches or noise from.
    state = torch.load(ckpt, weights_only=True)["lightning_dp"]
    assert _find_keys(state, "seed") == []


def test_fixed_seeds_warn_and_resume_exactly_like_an_uninterrupted_run(tmp_path):
    ds = indexed_data()
    ckpt = str(tmp_path / "step3.ckpt")
    kw = dict(noise_multiplier=1.0, noise_seed=1, sampling_seed=2)
    full, stopped = Updates(), Updates()
    with pytest.warns(UserWarning, match="seeds staying secret"):
        torch.manual_seed(0)
        trainer(DPStrategy(**kw), max_steps=6, callbacks=[full]).fit(ClassifierModule(mlp(), lr=0.5), loader(ds, 20))
    torch.manual_seed(0)
    trainer(DPStrategy(**kw), max_steps=6, callbacks=[stopped, SaveAt(lambda s: ckpt, [3], stop=True)]).fit(
        ClassifierModule(mlp(), lr=0.5), loader(ds, 20)
    )
    torch.manual_seed(123)  # the global RNG plays no part
    resumed = Updates()
    trainer(DPStrategy(**kw), max_steps=6, callbacks=[resumed]).fit(
        ClassifierModule(mlp(), lr=0.5), loader(ds, 20), ckpt_path=ckpt
    )
    assert stopped.batches == full.batches[:3] and resumed.batches == full.batches[3:]
    for a, b in zip(stopped.deltas + resumed.deltas, full.deltas):
        assert torch.allclose(a, b, atol=1e-6)


def test_secure_mode_refuses_seeds_and_trains():
    with pytest.raises(DPMisconfigurationError, match="secure_mode"):
        DPStrategy(noise_multiplier=1.0, secure_mode=True, noise_seed=0)
    s = DPStrategy(noise_multiplier=1.0, secure_mode=True)
    trainer(s, max_steps=3).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    assert s.ledger.steps == 3


# ---------------------------------------------------------------------- 3: the trainable set
class AllParams(ClassifierModule):
    """The optimizer holds every parameter (frozen ones too), as when a backbone is unfrozen later."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class NoZeroGrad(AllParams):
    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        pass  # gradients are never cleared by Lightning


class Unfreeze(L.Callback):
    def __init__(self, at_step, module_name="net.0"):
        self.at_step, self.module_name = at_step, module_name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            pl_module.get_submodule(self.module_name).requires_grad_(True)


@pytest.mark.parametrize("module_cls", [AllParams, NoZeroGrad])
def test_parameters_unfrozen_mid_fit_are_trained_privately(module_cls):
    torch.manual_seed(0)
    net = mlp()
    net[0].requires_grad_(False)
    model = module_cls(net, lr=1.0)
    c, b = 1e-4, 20
    updates = Updates()
    s = DPStrategy(noise_multiplier=1e-6, max_grad_norm=c)
    trainer(s, max_steps=6, callbacks=[Unfreeze(2), updates]).fit(model, loader(tensor_data(), b))
    first = net[0].weight.numel() + net[0].bias.numel()
    assert all(d[:first].abs().max() == 0 for d in updates.deltas[:2])  # frozen: unchanged
    assert all(d[:first].abs().max() > 0 for d in updates.deltas[2:])  # unfrozen: trained ...
    for d, batch in zip(updates.deltas, updates.batches):  # ... and clipped: ‖update‖ ≤ lr·C·|batch|/B
        assert d.norm() <= 1.0 * c * len(batch) / b * 1.01 + 1e-7


def test_gradient_accumulation_scheduler_is_refused():
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    with pytest.raises(DPMisconfigurationError, match="GradientAccumulationScheduler"):
        trainer(DPStrategy(noise_multiplier=1.0), max_steps=4, callbacks=[GradientAccumulationScheduler({0: 2})]).fit(
            ClassifierModule(mlp()), loader(tensor_data(), 20)
        )


def test_a_gradient_not_written_by_the_strategy_is_refused():
    class Inject(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            p = next(pl_module.parameters())
            p.grad = torch.ones_like(p)  # a raw, non-private gradient

    with pytest.raises(DPMisconfigurationError, match="did not write"):
        trainer(DPStrategy(noise_multiplier=1.0), max_steps=2, callbacks=[Inject()]).fit(
            ClassifierModule(mlp()), loader(tensor_data(), 20)
        )


# ---------------------------------------------------------------------- 4: the budget is a hard invariant
def test_target_holds_across_a_second_fit_that_continues_training():
    s = DPStrategy(target_epsilon=2.0)
    t = trainer(s, max_epochs=2)
    model = ClassifierModule(mlp())
    t.fit(model, loader(tensor_data(), 20))
    assert s.epsilon <= 2.0 and s.ledger.steps == 20
    t.fit_loop.max_epochs = 4  # train on: σ is recalibrated for what is left of the budget
    t.fit(model, loader(tensor_data(), 20))
    assert s.epsilon <= 2.0 and s.ledger.steps == 40
    assert s.noise_multiplier > 3 * s.ledger.segments[0].noise_multiplier  # a fresh budget would give ~1×


def test_target_holds_for_a_new_strategy_continuing_the_same_module():
    model = ClassifierModule(mlp())
    first = DPStrategy(target_epsilon=2.0)
    trainer(first, max_epochs=1).fit(model, loader(tensor_data(), 20))
    again = DPStrategy(target_epsilon=2.0)  # a new Trainer and strategy, the same (already private) model
    trainer(again, max_epochs=2).fit(model, loader(tensor_data(), 20))
    assert again.ledger.steps == 30 and again.epsilon <= 2.0  # 10 + 20: the new trainer runs 2 epochs
    assert again.noise_multiplier > 3 * first.noise_multiplier  # the rest of the budget, not a fresh one (~1×)


def test_target_holds_after_a_resume_with_another_dataset_size(tmp_path):
    ckpt = str(tmp_path / "a.ckpt")
    trainer(DPStrategy(target_epsilon=2.0), max_epochs=2, callbacks=[SaveAt(lambda s: ckpt, [10], stop=True)]).fit(
        ClassifierModule(mlp()), loader(tensor_data(n=200), 20)
    )
    s = DPStrategy(target_epsilon=2.0)
    trainer(s, max_epochs=2).fit(ClassifierModule(mlp()), loader(tensor_data(n=120), 20), ckpt_path=ckpt)
    assert s.epsilon <= 2.0
    assert {round(seg.sample_rate, 6) for seg in s.ledger.segments} == {0.1, round(20 / 120, 6)}


def test_target_stops_cleanly_when_the_run_takes_more_steps_than_planned(tmp_path):
    class MoreEpochs(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.fit_loop.max_epochs = 5  # after planning: the plan said 2 epochs

    s = DPStrategy(target_epsilon=2.0)
    t = trainer(s, max_epochs=2, callbacks=[MoreEpochs()], default_root_dir=str(tmp_path))
    t.fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    assert s.epsilon <= 2.0
    assert 20 <= s.ledger.steps < 50 and t.global_step == s.ledger.steps
    assert os.path.exists(tmp_path / "checkpoints" / f"privacy-target-step={s.ledger.steps}.ckpt")


def test_privacy_budget_holds_in_a_second_fit():
    budget = PrivacyBudget(max_epsilon=2.0)
    s = DPStrategy(noise_multiplier=1.0)
    t = trainer(s, max_epochs=1, callbacks=[budget])
    model = ClassifierModule(mlp())
    t.fit(model, loader(tensor_data(), 20))
    t.fit_loop.max_epochs = 10
    t.fit(model, loader(tensor_data(), 20))
    assert s.epsilon <= 2.0 and budget.stopped_at_step == s.ledger.steps


def test_planned_steps_honour_limit_train_batches_with_noise_multiplier():
    from lightning_dp.finetune import LinearProbeThenFineTune

    s = DPStrategy(noise_multiplier=1.0)
    lpft = LinearProbeThenFineTune(0.5, model_attr="net", head_pattern=r"^2\.")
    t = trainer(s, max_epochs=2, limit_train_batches=3, callbacks=[lpft])
    t.fit(AllParams(mlp()), loader(tensor_data(), 20))
    assert s.planned_steps == 6 == s.ledger.steps
    assert t.callback_metrics["dp/cumulative_noise"].item() == pytest.approx(math.sqrt(6))
    assert lpft.switched and lpft.switch_step == 3


# ---------------------------------------------------------------------- 5: the journal
def _run_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE])}
    return subprocess.run(
        [sys.executable, os.path.join(HERE, "resume_script.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_resume_from_a_checkpoint_older_than_a_crash_is_a_fork(tmp_path):
    crashed = _run_script(str(tmp_path), "crash")  # checkpoints at steps 3 and 6, killed after step 8
    assert crashed.returncode == 17, crashed.stderr
    refused = _run_script(str(tmp_path), "resume", "3", "strict")
    assert refused.returncode != 0 and "older than the run's last executed step" in refused.stderr
    assert "5 private step(s) taken after it" in refused.stderr
    accounted = _run_script(str(tmp_path), "resume", "3", "account_forks")
    assert accounted.returncode == 0, accounted.stderr
    # Every executed step is charged: 8 before the crash, and 7 more on the new branch (steps 3..9).
    assert "ledger_steps=15 global_step=10" in accounted.stdout


def test_journal_records_every_step_and_sessions(tmp_path):
    from lightning_dp.journal import PrivacyJournal

    s = DPStrategy(noise_multiplier=1.0, journal_dir=tmp_path / "j")
    t = trainer(s, max_steps=3, max_epochs=2)
    model = ClassifierModule(mlp())
    t.fit(model, loader(tensor_data(), 20))
    t.fit_loop.epoch_loop.max_steps = 5
    t.fit(model, loader(tensor_data(), 20))
    contents = PrivacyJournal.read_file(s.journal_path)
    assert [r["step"] for r in contents.steps] == [0, 1, 2, 3, 4]
    assert [x["start"] for x in contents.sessions] == [0, 3]
    assert contents.ledger().segments == s.ledger.segments


# ---------------------------------------------------------------------- 6: examples mixed in the forward
class Centered(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        return self.net(x - x.mean(0))


class HiddenMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(10, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h + h.mean(0))


@pytest.mark.parametrize("net_cls, where", [(Centered, "'net.net.0'"), (HiddenMix, "'net.b'")])
def test_a_forward_that_mixes_examples_is_refused(net_cls, where):
    from lightning_dp.probe import SampleMixingError

    with pytest.raises(SampleMixingError, match=where):
        trainer(DPStrategy(noise_multiplier=1.0), max_steps=2).fit(
            ClassifierModule(net_cls()), loader(tensor_data(), 20)
        )
    s = DPStrategy(noise_multiplier=1.0, check_sample_mixing=False)  # the explicit opt-out
    trainer(s, max_steps=2).fit(ClassifierModule(net_cls()), loader(tensor_data(), 20))
    assert s.ledger.steps == 2


def test_mixing_check_has_no_false_alarm_with_dropout_and_stochastic_depth():
    from helpers import make_vit

    vit = make_vit(drop_rate=0.3, drop_path_rate=0.3, attn_drop_rate=0.2)
    ds = TensorDataset(torch.randn(32, 3, 16, 16), torch.randint(0, 3, (32,)))
    s = DPStrategy(noise_multiplier=1.0)
    trainer(s, max_steps=2).fit(ClassifierModule(vit), DataLoader(ds, batch_size=8))
    assert s.ledger.steps == 2


# ---------------------------------------------------------------------- 8: checkpoints are checked
def _checkpoint(tmp_path, **kw):
    ckpt = str(tmp_path / "c.ckpt")
    trainer(DPStrategy(noise_multiplier=1.0, **kw), max_steps=10, callbacks=[SaveAt(lambda s: ckpt, [5])]).fit(
        ClassifierModule(mlp()), loader(tensor_data(), 20)
    )
    return ckpt


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["lightning_dp"]["plan"]["ledger"].update(segments=[]), "edited"),
        (lambda c: c["lightning_dp"]["plan"]["ledger"]["segments"][0].update(steps=2), "edited"),
        (lambda c: c.update(global_step=3), "disagree"),
        (lambda c: c["lightning_dp"]["plan"].update(released_steps=3), "disagree"),
    ],
)
def test_an_edited_checkpoint_is_refused(tmp_path, edit, match):
    ckpt = _checkpoint(tmp_path)
    c = torch.load(ckpt, weights_only=False)
    edit(c)
    torch.save(c, ckpt)
    with pytest.raises(DPMisconfigurationError, match=match):
        trainer(DPStrategy(noise_multiplier=1.0), max_steps=12).fit(
            ClassifierModule(mlp()), loader(tensor_data(), 20), ckpt_path=ckpt
        )


def test_a_poisson_checkpoint_resumed_with_shuffling_charges_the_partial_epoch(tmp_path):
    ckpt = _checkpoint(tmp_path)  # 5 of the epoch's 10 steps taken, Poisson
    s = DPStrategy(noise_multiplier=1.0, poisson_sampling=False, resume_policy="account_forks")
    with pytest.warns(UserWarning, match="no amplification"):
        trainer(s, max_steps=10).fit(ClassifierModule(mlp()), loader(tensor_data(), 20), ckpt_path=ckpt)
    shuffled = [seg for seg in s.ledger.segments if seg.sample_rate == 1.0]
    assert shuffled and shuffled[0].noise_multiplier == pytest.approx(0.5)  # one pass, sensitivity 2C


def test_a_missing_journal_is_refused_unless_the_checkpoint_is_trusted(tmp_path):
    import shutil

    ckpt = _checkpoint(tmp_path, journal_dir=tmp_path / "journal")
    shutil.rmtree(tmp_path / "journal")
    with pytest.raises(DPMisconfigurationError, match="journal .* was not found"):
        trainer(DPStrategy(noise_multiplier=1.0), max_steps=12).fit(
            ClassifierModule(mlp()), loader(tensor_data(), 20), ckpt_path=ckpt
        )
    s = DPStrategy(noise_multiplier=1.0, resume_policy="trust_checkpoint")
    trainer(s, max_steps=12).fit(ClassifierModule(mlp()), loader(tensor_data(), 20), ckpt_path=ckpt)
    assert s.ledger.steps == 10  # the checkpoint's 5 (taken on trust) and the epoch's other 5


# ---------------------------------------------------------------------- 9: bad numbers and files
@pytest.mark.parametrize(
    "kw",
    [
        dict(target_epsilon=math.inf),
        dict(target_epsilon=math.nan),
        dict(noise_multiplier=math.inf),
        dict(noise_multiplier=math.nan),
        dict(noise_multiplier=1.0, max_grad_norm=math.inf),
        dict(noise_multiplier=1.0, max_grad_norm=math.nan),
        dict(noise_multiplier=1.0, target_delta=math.nan),
    ],
)
def test_non_finite_privacy_parameters_are_refused(kw):
    with pytest.raises(DPMisconfigurationError, match="finite|in \\(0, 1\\)"):
        DPStrategy(**kw)


def test_a_truncated_checkpoint_gets_a_clear_error(tmp_path):
    ckpt = _checkpoint(tmp_path)
    with open(ckpt, "r+b") as f:
        f.truncate(os.path.getsize(ckpt) // 2)
    with pytest.raises(DPMisconfigurationError, match="truncated"):
        trainer(DPStrategy(noise_multiplier=1.0), max_steps=12).fit(
            ClassifierModule(mlp()), loader(tensor_data(), 20), ckpt_path=ckpt
        )


def test_a_strategy_given_to_a_second_trainer_says_why_not():
    s = DPStrategy(noise_multiplier=1.0)
    trainer(s, max_steps=1).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    with pytest.raises(DPMisconfigurationError, match="already belongs to another Trainer"):
        trainer(s, max_steps=1)


def test_loggers_end_with_the_final_epsilon(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    s = DPStrategy(noise_multiplier=1.0)
    logger = CSVLogger(str(tmp_path))
    trainer(s, max_steps=7, logger=logger, log_every_n_steps=5).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    import csv

    rows = [r for r in csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))) if r.get("dp/epsilon")]
    assert float(rows[-1]["dp/epsilon"]) == pytest.approx(s.epsilon)


# ---------------------------------------------------------------------- 7: one NaN / inf example
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("engine", ["ghost", "hooks"])
def test_one_non_finite_example_contributes_nothing(bad, engine):
    ds = indexed_data(n=60)
    ds.tensors[0][7, 3] = bad
    s = DPStrategy(noise_multiplier=0.5, max_grad_norm=1.0, engine=engine)
    model = ClassifierModule(mlp(), lr=0.1)
    updates = Updates()
    with pytest.warns(UserWarning, match="non-finite.*non-private"):  # q = 1: every step holds the bad example
        trainer(s, max_epochs=2, callbacks=[updates]).fit(model, DataLoader(ds, batch_size=60))
    assert all(7 in b for b in updates.batches) and len(updates.batches) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(d).all() and d.abs().max() > 0 for d in updates.deltas)
    assert s.ledger.steps == 2
    with pytest.raises(DPMisconfigurationError, match="non-finite"):
        trainer(DPStrategy(noise_multiplier=0.5, nonfinite="error", engine=engine), max_epochs=1).fit(
            ClassifierModule(mlp()), DataLoader(ds, batch_size=60)
        )
