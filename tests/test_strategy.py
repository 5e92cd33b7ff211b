"""DPStrategy end to end through a real Trainer: noise, micro-batching, empty batches, resume, ViT, bf16."""

import lightning as L
import pytest
import torch
from helpers import ClassifierModule, loader, make_vit, mlp, tensor_data, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dp import DPStrategy


def test_noise_std_on_zero_data_matches_sigma_c_over_b():
    sigma, c, b = 2.0, 1.5, 20
    net = nn.Linear(50, 40, bias=False)
    model = ClassifierModule(net, lr=1.0)
    before = net.weight.detach().clone()
    ds = TensorDataset(torch.zeros(400, 50), torch.randint(0, 40, (400,)))
    strategy = DPStrategy(noise_multiplier=sigma, max_grad_norm=c)
    trainer(strategy, max_steps=1).fit(model, loader(ds, b))
    delta = net.weight.detach() - before  # = -lr * noise / B, the data's gradient being exactly zero
    expected = sigma * c / b
    assert delta.std().item() == pytest.approx(expected, rel=0.1)
    assert abs(delta.mean().item()) < 4 * expected / delta.numel() ** 0.5
    assert strategy.ledger.steps == 1


def _fit(strategy, steps=4, batch=40, seed=0, **kw):
    torch.manual_seed(seed)
    model = ClassifierModule(mlp(), **kw)
    trainer(strategy, max_steps=steps).fit(model, loader(tensor_data(), batch))
    return model, trainer


def test_micro_batching_gives_the_same_update(monkeypatch):
    monkeypatch.setattr(DPStrategy, "_epsilon_upper_bound", lambda self: 0.0)
    results = []
    for physical in (None, 7):
        s = DPStrategy(noise_multiplier=1e-9, max_grad_norm=0.5, max_physical_batch_size=physical, sampling_seed=11)
        model, _ = _fit(s, optimizer="adam", lr=0.01)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6)
    torch.manual_seed(0)
    initial = torch.cat([p.flatten() for p in mlp().parameters()])
    assert not torch.allclose(results[0], initial), "the runs did train"


def test_global_step_and_scheduler_count_logical_steps():
    s = DPStrategy(noise_multiplier=1.0, max_physical_batch_size=4)
    model, _ = _fit(s, steps=5, batch=40, scheduler=True)
    t = model.trainer
    assert t.global_step == 5 and s.ledger.steps == 5
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**5)


def test_empty_poisson_batches_take_noise_only_steps():
    ds = tensor_data(n=60)
    model = ClassifierModule(mlp())
    s = DPStrategy(noise_multiplier=1.0, sampling_seed=0)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch[0].shape[0])

    trainer(s, max_epochs=1, callbacks=[Spy()]).fit(model, loader(ds, 1))  # q = 1/60: many empty batches
    assert len(seen) == 60 and seen.count(0) > 5
    assert s.ledger.steps == 60 == model.trainer.global_step


def test_validation_loader_is_not_replaced():
    ds = tensor_data()
    val = DataLoader(ds, batch_size=50)
    s = DPStrategy(noise_multiplier=1.0)
    model = ClassifierModule(mlp())
    t = trainer(s, max_steps=2, num_sanity_val_steps=2, val_check_interval=1)
    t.fit(model, loader(ds, 20), val)
    assert t.val_dataloaders.batch_size == 50 and "val_loss" in t.callback_metrics


def test_target_epsilon_met_and_metrics_logged():
    s = DPStrategy(target_epsilon=1.0, target_delta=1e-4)
    model = ClassifierModule(mlp())
    t = trainer(s, max_epochs=2)
    t.fit(model, loader(tensor_data(), 20))
    assert s.planned_steps == 20 == s.ledger.steps
    assert 0.95 < s.epsilon <= 1.0
    m = t.callback_metrics
    for key in ("dp/epsilon", "dp/noise_multiplier", "dp/sample_rate", "nonprivate/step_clip_fraction"):
        assert key in m
    assert m["dp/epsilon"].item() >= s.epsilon - 1e-6  # the logged value is an upper bound
    assert m["dp/sample_rate"].item() == pytest.approx(0.1)


class _StopAt(L.Callback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.mark.parametrize("mode", ["noise_multiplier", "target_epsilon"])
def test_resume_continues_the_ledger(tmp_path, mode):
    kw = {"noise_multiplier": 1.1} if mode == "noise_multiplier" else {"target_epsilon": 2.0}
    ds = tensor_data()
    full = DPStrategy(**kw)
    trainer(full, max_epochs=2).fit(ClassifierModule(mlp()), loader(ds, 20))

    path = tmp_path / "mid.ckpt"
    first = DPStrategy(**kw)
    trainer(first, max_epochs=2, callbacks=[_StopAt(7, path)]).fit(ClassifierModule(mlp()), loader(ds, 20))
    assert first.ledger.steps == 7
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["lightning_dp"]["plan"]["ledger"]["segments"][0]["steps"] == 7

    resumed = DPStrategy(**kw)
    t = trainer(resumed, max_epochs=2)
    t.fit(ClassifierModule(mlp()), loader(ds, 20), ckpt_path=path)
    assert resumed.ledger.steps == full.ledger.steps == t.global_step == 20
    assert resumed.noise_multiplier == pytest.approx(full.noise_multiplier)
    assert resumed.epsilon == pytest.approx(full.epsilon, rel=1e-9)


def test_resume_with_longer_run_recalibrates_for_the_remaining_steps(tmp_path):
    ds = tensor_data()
    path = tmp_path / "a.ckpt"
    first = DPStrategy(target_epsilon=2.0)
    t = trainer(first, max_epochs=1)
    t.fit(ClassifierModule(mlp()), loader(ds, 20))
    t.save_checkpoint(path)
    resumed = DPStrategy(target_epsilon=2.0)
    trainer(resumed, max_epochs=2).fit(ClassifierModule(mlp()), loader(ds, 20), ckpt_path=path)
    assert resumed.ledger.steps == 20 and len(resumed.ledger) == 2
    assert resumed.noise_multiplier > first.noise_multiplier
    assert resumed.epsilon <= 2.0


def test_checkpoint_without_ledger_is_rejected(tmp_path):
    ds = tensor_data()
    model = ClassifierModule(mlp())
    t = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    t.fit(model, loader(ds, 20))
    t.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(Exception, match="no privacy ledger"):
        trainer(DPStrategy(noise_multiplier=1.0), max_steps=4).fit(
            ClassifierModule(mlp()), loader(ds, 20), ckpt_path=tmp_path / "plain.ckpt"
        )


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_vit_trains_all_parameters_including_raw_ones(precision):
    torch.manual_seed(0)
    vit = make_vit()
    before = {n: p.detach().clone() for n, p in vit.named_parameters()}
    ds = TensorDataset(torch.randn(64, 3, 16, 16), torch.randint(0, 3, (64,)))
    s = DPStrategy(noise_multiplier=0.5, max_physical_batch_size=8)
    trainer(s, max_steps=2, precision=precision).fit(ClassifierModule(vit, optimizer="adam", lr=1e-3), loader(ds, 16))
    for name in ("cls_token", "reg_token", "pos_embed", "blocks.0.ls1.gamma", "patch_embed.proj.weight", "head.bias"):
        p = dict(vit.named_parameters())[name]
        assert p.dtype == torch.float32
        assert not torch.equal(p.detach(), before[name]), f"{name} was not trained"
    assert s.ledger.steps == 2


class _DeclaresHistogram(L.Callback):
    """Declares a release with noise multiplier 2.0 from every other step's batch."""

    def dp_release_noise(self, strategy, step):
        return [2.0] if step % 2 == 0 else []


def test_joint_releases_are_accounted_as_one_gaussian_per_step():
    from lightning_dp.accounting import combine_noise_multipliers

    s = DPStrategy(target_epsilon=2.0)
    t = trainer(s, max_epochs=2, callbacks=[_DeclaresHistogram()])
    t.fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    sigma = s.noise_multiplier
    joint = combine_noise_multipliers(sigma, 2.0)
    segs = [(round(x.noise_multiplier, 12), x.steps) for x in s.ledger.segments]
    assert segs == [(round(joint, 12), 1), (round(sigma, 12), 1)] * 10
    assert s.epsilon <= 2.0
    plain = DPStrategy(target_epsilon=2.0)
    trainer(plain, max_epochs=2).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    assert s.noise_multiplier > plain.noise_multiplier  # the diagnostics' privacy cost is paid by σ


def test_validate_and_test_after_fit_on_the_same_trainer():
    class WithTest(ClassifierModule):
        def test_step(self, batch, batch_idx):
            self.log("test_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    s = DPStrategy(noise_multiplier=1.0)
    t = trainer(s, max_steps=3)
    model = WithTest(mlp())
    t.fit(model, loader(tensor_data(), 20))
    assert "test_loss" in t.test(model, DataLoader(tensor_data(), batch_size=50), verbose=False)[0]
    assert "val_loss" in t.validate(model, DataLoader(tensor_data(), batch_size=50), verbose=False)[0]
    assert s.ledger.steps == 3  # evaluation releases nothing
    frozen = WithTest(mlp().requires_grad_(False))  # evaluating a frozen model is not an error
    trainer(DPStrategy(noise_multiplier=1.0)).test(frozen, DataLoader(tensor_data(), batch_size=50), verbose=False)
