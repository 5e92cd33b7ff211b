"""Every bad input gets a clear error (or warning) before any training step."""

import lightning as L
import pytest
import torch
from helpers import ClassifierModule, loader, make_vit, mlp, tensor_data, trainer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_dp import DPMisconfigurationError, DPStrategy, PrivacyTargetError, UnsupportedLayerError
from lightning_dp.validation import validate_trainer


class _NoStep(ClassifierModule):
    def training_step(self, batch, batch_idx):
        raise AssertionError("no training step may run")


def _fit(strategy=None, model=None, data=None, **kw):
    strategy = strategy or DPStrategy(noise_multiplier=1.0)
    model = model or _NoStep(mlp())
    data = data if data is not None else loader(tensor_data(), 20)
    trainer(strategy, max_steps=kw.pop("max_steps", 2), **kw).fit(model, data)


def test_both_or_neither_of_target_and_noise():
    with pytest.raises(DPMisconfigurationError, match="exactly one"):
        DPStrategy(target_epsilon=1.0, noise_multiplier=1.0)
    with pytest.raises(DPMisconfigurationError, match="exactly one.*DPStrategy\\(target_epsilon"):
        _fit(DPStrategy())  # constructible (Trainer(strategy="dp") builds it), refused before any step


def test_trainer_strategy_dp_gives_a_dp_strategy():
    import lightning as L

    t = L.Trainer(strategy="dp", accelerator="cpu", devices=1, logger=False)
    assert isinstance(t.strategy, DPStrategy)
    with pytest.raises(DPMisconfigurationError, match="strategy='dp'"):
        t.fit(_NoStep(mlp()), loader(tensor_data(), 20))


def test_batchnorm_points_to_module_validator():
    net = nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(DPMisconfigurationError, match=r"'net.1'.*BatchNorm1d.*lightning_dp.fix_model"):
        _fit(model=_NoStep(net))


def test_no_trainable_parameters():
    with pytest.raises(DPMisconfigurationError, match="no trainable parameters"):
        _fit(model=_NoStep(mlp().requires_grad_(False)))


def test_broadcast_parameter_of_wrong_shape_named():
    from lightning_dp.engine import register_broadcast_parameters

    class Prompt(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = nn.Parameter(torch.zeros(2, 3))

        def forward(self, x):
            return x + self.tokens.sum(0)

    register_broadcast_parameters(Prompt, "tokens")
    with pytest.raises(UnsupportedLayerError, match=r"'net.1.tokens'.*shape \(2, 3\)"):
        _fit(model=_NoStep(nn.Sequential(mlp(), Prompt())))


def test_delta_not_below_one_over_n():
    with pytest.raises(PrivacyTargetError, match="1/N"):
        _fit(DPStrategy(noise_multiplier=1.0, target_delta=1e-2))  # N = 200


def test_unreachable_target():
    with pytest.raises(PrivacyTargetError, match="cannot be reached"):
        _fit(DPStrategy(target_epsilon=1e-6), max_steps=5)


def test_accumulate_grad_batches():
    with pytest.raises(DPMisconfigurationError, match="max_physical_batch_size"):
        _fit(accumulate_grad_batches=2)


def test_gradient_clip_val():
    with pytest.raises(DPMisconfigurationError, match="max_grad_norm"):
        _fit(gradient_clip_val=1.0)


def test_fp16_mixed_precision():
    # On CPU Lightning itself turns 16-mixed into bf16-mixed, so check the validator as a GPU run would reach it.
    t = trainer(DPStrategy(noise_multiplier=1.0))
    with pytest.raises(DPMisconfigurationError, match="GradScaler.*bf16-mixed"):
        validate_trainer(t, "16-mixed")
    with pytest.raises(DPMisconfigurationError, match="not supported"):
        _fit(precision="bf16-true")


def test_gradient_checkpointing():
    vit = make_vit()
    vit.set_grad_checkpointing(True)
    with pytest.raises(DPMisconfigurationError, match="set_grad_checkpointing"):
        _fit(model=_NoStep(vit))


def test_iterable_dataset_without_length():
    class Stream(IterableDataset):
        def __iter__(self):
            for _ in range(100):
                yield torch.randn(10), 0

    with pytest.raises(DPMisconfigurationError, match="iterable dataset"):
        _fit(data=DataLoader(Stream(), batch_size=10))


def test_custom_sampler_rejected():
    ds = tensor_data()
    sampler = torch.utils.data.WeightedRandomSampler(torch.ones(len(ds)), len(ds))
    with pytest.raises(DPMisconfigurationError, match="WeightedRandomSampler"):
        _fit(data=DataLoader(ds, batch_size=20, sampler=sampler))


def test_manual_optimization():
    model = _NoStep(mlp())
    model.automatic_optimization = False
    with pytest.raises(DPMisconfigurationError, match="automatic optimization"):
        _fit(model=model)


def test_training_step_returning_none():
    class Skipper(ClassifierModule):
        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(DPMisconfigurationError, match="return the loss"):
        _fit(model=Skipper(mlp()))


def test_shuffling_opt_out_warns_and_claims_no_amplification():
    s = DPStrategy(noise_multiplier=1.0, poisson_sampling=False)
    with pytest.warns(UserWarning, match="no amplification"):
        trainer(s, max_epochs=2).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    poisson = DPStrategy(noise_multiplier=1.0)
    trainer(poisson, max_epochs=2).fit(ClassifierModule(mlp()), loader(tensor_data(), 20))
    # one release per epoch at sensitivity 2C and q = 1: two Gaussian(σ/2) compositions, no subsampling
    assert [(x.noise_multiplier, x.sample_rate, x.steps) for x in s.ledger.segments] == [(0.5, 1.0, 2)]
    assert s.epsilon > 3 * poisson.epsilon


# ---------------------------------------------------------------------- the length of training
class _Started(Exception):
    """Raised by _StopAtStart: training began (on the old code, after planning 1000 epochs)."""


class _StopAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        raise _Started


def test_target_epsilon_without_max_epochs_or_max_steps_is_an_error_naming_the_fix():
    t = trainer(DPStrategy(target_epsilon=2.0), max_epochs=None, callbacks=[_StopAtStart()])
    with pytest.raises(DPMisconfigurationError, match=r"Lightning plans 1000 epochs.*Trainer\(max_epochs=\.\.\.\)"):
        t.fit(ClassifierModule(mlp()), loader(tensor_data(), 100))


def test_fixed_noise_without_max_epochs_or_max_steps_says_so(caplog):
    t = trainer(DPStrategy(noise_multiplier=1.0), max_epochs=None, callbacks=[_StopAtStart()])
    with caplog.at_level("INFO"), pytest.raises(_Started):
        t.fit(ClassifierModule(mlp()), loader(tensor_data(), 100))
    notices = [r.getMessage() for r in caplog.records if "Lightning plans 1000 epochs" in r.getMessage()]
    assert len(notices) == 1 and "Trainer(max_steps=...)" in notices[0]


@pytest.mark.parametrize("limits", [dict(max_epochs=2), dict(max_epochs=None, max_steps=4)])
def test_a_set_length_of_training_is_accepted(limits, caplog):
    s = DPStrategy(target_epsilon=2.0)
    with caplog.at_level("INFO"):
        trainer(s, **limits).fit(ClassifierModule(mlp()), loader(tensor_data(), 100))
    assert s.planned_steps == 4 and not any("Lightning plans" in r.getMessage() for r in caplog.records)


def test_target_delta_defaults_to_the_documented_delta_and_none_is_refused():
    import inspect

    from lightning_dp.plan import DEFAULT_DELTA

    assert inspect.signature(DPStrategy).parameters["target_delta"].default == DEFAULT_DELTA == 1e-5
    assert DPStrategy(noise_multiplier=1.0).delta == DEFAULT_DELTA
    with pytest.raises(DPMisconfigurationError, match="target_delta must be a positive finite number, got None"):
        DPStrategy(noise_multiplier=1.0, target_delta=None)
