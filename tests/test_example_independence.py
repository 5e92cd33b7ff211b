"""Example independence on every pipeline, and one release per sampled batch (issue 19).

Each pipeline below breaks the premise under the guarantee (each example's clipped gradient depends on that example
alone, and each sampled batch is released once) and finished without a word on the code before this issue. The
sensitivity is measured as ‖S(D) − S(D − j)‖ with q = 1, where S is the clipped sum read from the update (SGD with
lr = 1, the same noise seed for D and D − j so that the noise cancels): each case must be refused, or bounded by C.
"""

import lightning as L
import pytest
import torch
from helpers import ClassifierModule, loader, make_vit, mlp, tensor_data, trainer
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset, default_collate

from lightning_dp import DPMisconfigurationError, DPStrategy
from lightning_dp.probe import SampleMixingError

C = 0.5


def class_sorted_data(n=48, d=10, classes=3, seed=0):
    """Examples ordered by class, as ImageFolder orders them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) * classes // n
    return TensorDataset(torch.randn(n, d, generator=g) + y[:, None].float(), y)


def clipped_sum(module_cls, ds, collate_fn=None, **kw):
    """S = Σ_i clip(g_i) of one step with q = 1, read from the update (SGD, lr = 1, fixed noise seed)."""
    torch.manual_seed(0)
    model = module_cls(mlp(), lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=C, noise_seed=3, sampling_seed=4, **kw)
    dl = DataLoader(ds, batch_size=len(ds), collate_fn=collate_fn or default_collate)
    trainer(strategy, max_steps=1).fit(model, dl)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return (before - after) * len(ds)


def sensitivity(module_cls, ds, j=0, collate_fn=None, **kw):
    """‖S(D) − S(D − j)‖ / C, or ``"refused"`` if the strategy stops the pipeline."""
    try:
        full = clipped_sum(module_cls, ds, collate_fn, **kw)
        rest = clipped_sum(module_cls, Subset(ds, [i for i in range(len(ds)) if i != j]), collate_fn, **kw)
    except SampleMixingError:
        return "refused"
    return float((full - rest).norm()) / C


# ---------------------------------------------------------------------- mixing pipelines
WEIGHTS = torch.tensor([1.0, 3.0, 0.2])


class ClassWeightedMean(ClassifierModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, weight=WEIGHTS)  # mean divides by the batch's sum of weights


class ClassWeightedPerExample(ClassifierModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return (WEIGHTS[y] * F.cross_entropy(self(x), y, reduction="none")).mean()


def test_class_weighted_mean_on_class_sorted_data_is_refused():
    assert sensitivity(ClassWeightedMean, class_sorted_data(), j=47) == "refused"


def test_class_weighted_per_example_loss_is_bounded():
    s = sensitivity(ClassWeightedPerExample, class_sorted_data(), j=47)
    assert s != "refused" and s <= 1.0 + 1e-4


def mixup_collate(items):
    x, y = default_collate(items)
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    soft = F.one_hot(y, 3).float()
    return lam * x + (1 - lam) * x.roll(1, 0), lam * soft + (1 - lam) * soft.roll(1, 0)


class SoftLabels(ClassifierModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)


def test_mixup_in_collate_fn_is_refused():
    assert sensitivity(SoftLabels, tensor_data(48), collate_fn=mixup_collate) == "refused"


class MixUpAfterWarmup(ClassifierModule):
    """Turns MixUp on in the forward after two steps: only a probe at a later step can see it."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.trainer.global_step >= 2:
            x = 0.7 * x + 0.3 * x.roll(1, 0)
        return F.cross_entropy(self(x), y)


def test_mixing_switched_on_after_warmup_is_caught_at_a_later_step():
    s = DPStrategy(noise_multiplier=1.0, probe_budget=1.0)  # every step probed
    with pytest.raises(SampleMixingError):
        trainer(s, max_steps=6).fit(MixUpAfterWarmup(mlp()), loader(tensor_data(), 20))
    assert s.ledger.steps == 2


def test_random_later_probes_keep_to_their_budget():
    s = DPStrategy(noise_multiplier=1.0)
    trainer(s, max_steps=30).fit(ClassifierModule(mlp()), loader(tensor_data(), 40))
    assert s._guards.probe.probes >= 1 and s._guards.probe.rate is not None and 0 <= s._guards.probe.rate <= 1
    s = DPStrategy(noise_multiplier=1.0, probe_budget=0.0)
    trainer(s, max_steps=10).fit(ClassifierModule(mlp()), loader(tensor_data(), 40))
    assert s._guards.probe.probes == 1


def test_probe_has_no_false_alarm_with_dropout_and_augmentation():
    class Augmented(TensorDataset):
        def __getitem__(self, i):  # a random augmentation from the global RNG, per item
            x, y = super().__getitem__(i)
            return x + 0.1 * torch.randn_like(x), y

    vit = make_vit(drop_rate=0.3, drop_path_rate=0.3, attn_drop_rate=0.2)
    ds = Augmented(torch.randn(32, 3, 16, 16), torch.randint(0, 3, (32,)))
    s = DPStrategy(noise_multiplier=1.0, probe_budget=1.0)
    trainer(s, max_steps=3).fit(ClassifierModule(vit), DataLoader(ds, batch_size=8))
    assert s.ledger.steps == 3 and s._guards.probe.probes == 3


# ---------------------------------------------------------------------- one release per sampled batch
class TwiceSGD(torch.optim.SGD):
    """SAM-like: evaluates the closure twice per step."""

    def step(self, closure=None):
        with torch.enable_grad():
            closure()
            closure()
        return super().step()


class SamLike(ClassifierModule):
    def configure_optimizers(self):
        return TwiceSGD(self.parameters(), lr=0.1)


class ClosureTwiceInOptimizerStep(ClassifierModule):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer_closure()
        optimizer.step(closure=optimizer_closure)


@pytest.mark.parametrize("module_cls", [SamLike, ClosureTwiceInOptimizerStep])
def test_a_second_evaluation_of_one_sampled_batch_is_refused(module_cls):
    s = DPStrategy(noise_multiplier=1.0)
    with pytest.raises(DPMisconfigurationError, match="second time on the same sampled batch.*DP-SAT"):
        trainer(s, max_steps=4).fit(module_cls(mlp()), loader(tensor_data(), 25))
    assert s.ledger.steps == 1  # the first evaluation was released (and is accounted); the second never ran


def test_resuming_a_run_whose_closure_was_evaluated_twice_is_refused(tmp_path):
    ckpt = str(tmp_path / "c.ckpt")

    class Save(L.Callback):
        def on_train_end(self, trainer, pl_module):
            trainer.save_checkpoint(ckpt)

    trainer(DPStrategy(noise_multiplier=1.0), max_steps=4, callbacks=[Save()]).fit(
        ClassifierModule(mlp()), loader(tensor_data(), 20)
    )
    c = torch.load(ckpt, weights_only=False)
    c["global_step"] = 2  # what an earlier version wrote after 2 optimizer steps of a closure evaluated twice
    for loop in ("fit_loop",):
        c["loops"][loop]["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["step"]["total"].update(
            ready=2, completed=2
        )
    torch.save(c, ckpt)
    with pytest.raises(DPMisconfigurationError, match="closure was evaluated 2 times"):
        trainer(DPStrategy(noise_multiplier=1.0), max_steps=6).fit(
            ClassifierModule(mlp()), loader(tensor_data(), 20), ckpt_path=ckpt
        )


# ---------------------------------------------------------------------- buffers
class RunningMax(ClassifierModule):
    """Keeps a running maximum of the private inputs in a buffer (not used in forward)."""

    def __init__(self, net, **kw):
        super().__init__(net, **kw)
        self.register_buffer("running_max", torch.tensor(-1e9))

    def training_step(self, batch, batch_idx):
        self.running_max = torch.maximum(self.running_max, batch[0].max().detach())
        return super().training_step(batch, batch_idx)


def test_a_buffer_recording_a_statistic_of_the_batch_is_refused():
    from lightning_dp.buffers import PrivateBufferError

    model = RunningMax(mlp())
    with pytest.raises(PrivateBufferError, match="'running_max'.*nonprivate_buffers"):
        trainer(DPStrategy(noise_multiplier=1.0), max_steps=2).fit(model, loader(tensor_data(), 20))
    assert float(model.running_max) == -1e9  # the private value did not stay in the model


def test_a_declared_nonprivate_buffer_is_reported_as_not_private(tmp_path):
    from lightning_dp.callbacks import PrivacySummary

    model, summary = RunningMax(mlp()), PrivacySummary()
    s = DPStrategy(noise_multiplier=1.0, nonprivate_buffers=["running_max"])
    trainer(s, max_steps=2, callbacks=[summary]).fit(model, loader(tensor_data(), 20))
    assert float(model.running_max) > -1e9
    assert s.state_dict()["nonprivate_buffers"] == ["running_max"]
    assert "running_max" in summary.table and "not private" in summary.table
    ckpt = str(tmp_path / "c.ckpt")
    model.trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["lightning_dp"]["nonprivate_buffers"] == ["running_max"]


def test_a_public_buffer_that_depends_on_the_examples_is_caught_by_the_probe():
    with pytest.raises(SampleMixingError, match="'running_max' is declared public"):
        trainer(DPStrategy(noise_multiplier=1.0, public_buffers=["running_max"]), max_steps=2).fit(
            RunningMax(mlp()), loader(tensor_data(), 20)
        )


class WeightEMA(ClassifierModule):
    """An EMA of the weights in buffers: a function of the (private) parameters only."""

    def __init__(self, net, in_step=False, **kw):
        super().__init__(net, **kw)
        self.in_step = in_step
        self.register_buffer("ema", torch.cat([p.detach().flatten() for p in net.parameters()]))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _update(self):
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * torch.cat([p.detach().flatten() for p in self.net.parameters()]))
            self.steps += 1

    def training_step(self, batch, batch_idx):
        if self.in_step:
            self._update()
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, *args):
        if not self.in_step:
            self._update()


def test_buffers_computed_from_the_parameters_have_a_path_that_is_not_an_error():
    model = WeightEMA(mlp())  # updated in on_train_batch_end: nothing to declare
    trainer(DPStrategy(noise_multiplier=1.0), max_steps=3).fit(model, loader(tensor_data(), 20))
    assert int(model.steps) == 3
    model = WeightEMA(mlp(), in_step=True)  # updated in training_step: declared public, checked by the probe
    s = DPStrategy(noise_multiplier=1.0, public_buffers=["ema", "steps"], probe_budget=1.0)
    trainer(s, max_steps=3).fit(model, loader(tensor_data(), 20))
    assert int(model.steps) == 3  # the probe's passes left no trace


def test_declared_buffers_must_exist():
    with pytest.raises(DPMisconfigurationError, match="not buffers of the module"):
        trainer(DPStrategy(noise_multiplier=1.0, nonprivate_buffers=["nope"]), max_steps=1).fit(
            ClassifierModule(mlp()), loader(tensor_data(), 20)
        )


# ---------------------------------------------------------------------- clear errors
def test_two_training_dataloaders_get_a_clear_error():
    for second in (loader(tensor_data(), 20), loader(tensor_data(100), 20)):
        with pytest.raises(DPMisconfigurationError, match="exactly one training dataloader.*ConcatDataset"):
            trainer(DPStrategy(noise_multiplier=1.0), max_steps=2).fit(
                ClassifierModule(mlp()), [loader(tensor_data(), 20), second]
            )


class Penalty(ClassifierModule):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 1e-2 * sum((p**2).sum() for p in self.parameters())


class Halves(ClassifierModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        h = x.shape[0] // 2
        a = F.cross_entropy(self(x[:h]), y[:h], reduction="sum")
        return (a + F.cross_entropy(self(x[h:]), y[h:], reduction="sum")) / x.shape[0]


class HalfOnly(ClassifierModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x[: x.shape[0] // 2]), y[: x.shape[0] // 2])


@pytest.mark.parametrize("engine", ["ghost", "hooks"])
@pytest.mark.parametrize(
    "module_cls, match",
    [
        (Penalty, "penalty.*weight_decay"),
        (Halves, "whole batch.*in one forward"),
        (HalfOnly, "whole batch.*in one forward"),
    ],
)
def test_misleading_errors_now_name_the_cause(module_cls, match, engine):
    with pytest.raises(DPMisconfigurationError, match=match):
        trainer(DPStrategy(noise_multiplier=1.0, engine=engine), max_steps=2).fit(
            module_cls(mlp()), loader(tensor_data(), 20)
        )


def test_two_optimizers_get_a_dp_specific_error():
    class TwoOptimizers(ClassifierModule):
        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[2].parameters(), lr=0.1),
            ]

    with pytest.raises(DPMisconfigurationError, match="one optimizer with parameter groups"):
        trainer(DPStrategy(noise_multiplier=1.0), max_steps=2).fit(TwoOptimizers(mlp()), loader(tensor_data(), 20))


# ---------------------------------------------------------------------- SPARTA resumes exactly
def _vit_data():
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 3, (32,), generator=g))


def _sparta_run(tmp_path, ckpt_path=None, stop_at=None):
    from lightning_dp.finetune import SparseFineTuning

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if stop_at is not None and trainer.global_step == stop_at:
                trainer.save_checkpoint(str(tmp_path / f"s{stop_at}.ckpt"))
                trainer.should_stop = True

    torch.manual_seed(0)
    model = ClassifierModule(make_vit(), lr=0.05, optimizer="adam")
    sparta = SparseFineTuning(warmup_epochs=1, selection_epochs=1, keep_fraction=0.25)
    s = DPStrategy(noise_multiplier=1.0, sampling_seed=5, noise_seed=6)
    t = trainer(s, max_epochs=3, callbacks=[sparta, StopAt()], default_root_dir=str(tmp_path))
    t.fit(model, DataLoader(_vit_data(), batch_size=8), ckpt_path=ckpt_path)
    return model, sparta, s


def test_sparse_finetuning_resumes_exactly_in_every_phase(tmp_path):
    reference, ref_sparta, ref_s = _sparta_run(tmp_path / "ref")
    ref = {n: p.detach().clone() for n, p in reference.net.named_parameters()}
    for stop_at in (2, 6, 10):  # in warm-up, in selection, in the sparse phase
        d = tmp_path / str(stop_at)
        _sparta_run(d, stop_at=stop_at)
        resumed, sparta, s = _sparta_run(d, ckpt_path=str(d / f"s{stop_at}.ckpt"))
        assert s.ledger.steps == ref_s.ledger.steps == 12
        assert {n: m.tolist() for n, m in sparta.masks.items()} == {n: m.tolist() for n, m in ref_sparta.masks.items()}
        for n, p in resumed.net.named_parameters():
            assert torch.equal(p.detach(), ref[n]), (stop_at, n)


def test_the_documented_dp_sat_recipe_runs_at_no_extra_privacy_cost():
    class DPSAT(L.Callback):  # as in docs/guarantee.md
        def __init__(self, rho=0.05):
            self.rho, self.eps, self.perturbed = rho, {}, 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            grads = {p: p.grad for p in pl_module.parameters() if p.grad is not None}
            if not grads:  # the first step: no private gradient yet
                return
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values())) + 1e-12
            with torch.no_grad():
                for p, g in grads.items():
                    self.eps[p] = self.rho * g / norm
                    p.add_(self.eps[p])
            self.perturbed += 1

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            with torch.no_grad():
                for p, e in self.eps.items():
                    p.sub_(e)
            self.eps = {}

    sat, s = DPSAT(), DPStrategy(noise_multiplier=1.0)
    trainer(s, max_steps=4, callbacks=[sat]).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    assert s.ledger.steps == 4 and sat.perturbed == 3  # one release per step; steps 2-4 took the ascent


def test_probe_budget_must_be_a_share():
    with pytest.raises(DPMisconfigurationError, match="probe_budget is a share"):
        DPStrategy(noise_multiplier=1.0, probe_budget=1.5)
