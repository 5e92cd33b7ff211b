"""Layer selection presets, LP-FT and DP sparse fine-tuning."""

import lightning as L
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from helpers import ClassifierModule, loader, make_vit, mlp, trainer
from torch.utils.data import TensorDataset

from lightning_dp import DPMisconfigurationError, DPStrategy
from lightning_dp.finetune import LinearProbeThenFineTune, SparseFineTuning, select_parameters

BLOCK = [
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "ls2.gamma",
]  # fmt: skip
HEAD = {"head.weight", "head.bias"}


def blocks(*idx, keep=lambda n: True):
    return {f"blocks.{i}.{n}" for i in idx for n in BLOCK if keep(n)}


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("head", HEAD),
        ("norm+head", blocks(0, 1, keep=lambda n: n.startswith("norm")) | {"norm.weight", "norm.bias"} | HEAD),
        ("bias", blocks(0, 1, keep=lambda n: n.endswith("bias")) | {"patch_embed.proj.bias", "norm.bias"} | HEAD),
        ("last_blocks:1", blocks(1) | {"norm.weight", "norm.bias"} | HEAD),
        ("attention", blocks(0, 1, keep=lambda n: n.startswith("attn.")) | HEAD),
        (r"pos_embed|cls_token", {"pos_embed", "cls_token"}),
    ],
)
def test_presets_select_exactly_the_intended_parameters(preset, expected):
    vit = make_vit()
    report = select_parameters(vit, preset)
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == expected == set(report.trainable)
    assert report.num_trainable == sum(p.numel() for p in vit.parameters() if p.requires_grad)


def test_all_zero_init_and_errors():
    vit = make_vit()
    report = select_parameters(vit, "all", zero_init_head=True)
    assert report.fraction == 1.0 and vit.head.weight.abs().sum() == 0
    with pytest.raises(DPMisconfigurationError, match="matches no parameter"):
        select_parameters(vit, ["head", "blocks\\.7\\."])
    with pytest.raises(DPMisconfigurationError, match="head_pattern"):
        select_parameters(mlp(), "norm+head")
    assert select_parameters(mlp(), "bias", head_pattern=r"^2\.").trainable == ["0.bias", "2.weight", "2.bias"]


class _Changes(L.Callback):
    """Records, per step, which parameters changed."""

    def __init__(self):
        self.changed = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.changed.append({n for n, p in pl_module.named_parameters() if not torch.equal(p, self.before[n])})


def _vit_data(n=64):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g))


def test_lpft_switches_at_the_right_step():
    spy = _Changes()
    lpft = LinearProbeThenFineTune(probe_fraction=0.25)
    s = DPStrategy(noise_multiplier=1.0)
    trainer(s, max_epochs=2, callbacks=[lpft, spy]).fit(ClassifierModule(make_vit(), lr=0.01), loader(_vit_data(), 16))
    assert lpft.switch_step == 2 and s.ledger.steps == 8
    for step, changed in enumerate(spy.changed):
        if step < 2:
            assert changed == {"net.head.weight", "net.head.bias"}, step
        else:
            assert {"net.cls_token", "net.blocks.0.attn.qkv.weight", "net.head.weight"} <= changed, step


def test_lpft_epsilon_split_composes_to_target_and_matches_pld():
    lpft = LinearProbeThenFineTune(probe_fraction=0.5, split="epsilon", epsilon_fraction=0.3)
    s = DPStrategy(target_epsilon=2.0)
    trainer(s, max_epochs=4, callbacks=[lpft]).fit(ClassifierModule(make_vit(), lr=0.01), loader(_vit_data(), 16))
    (end1, sigma1), (end2, sigma2) = s.noise_phases
    assert (end1, end2) == (8, 16) and sigma1 > sigma2
    segs = [(x.noise_multiplier, x.sample_rate, x.steps) for x in s.ledger.segments]
    assert segs == [(sigma1, 0.25, 8), (sigma2, 0.25, 8)]
    acc = pld_privacy_accountant.PLDAccountant()
    for sigma, q, n in segs:
        acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), n)
    assert s.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=0.03)
    assert 1.95 < s.epsilon <= 2.0
    from lightning_dp.accounting import compute_epsilon

    assert compute_epsilon(sigma1, 0.25, 8, 1e-5) <= 0.3 * 2.0 + 1e-9


class _EpochSnapshots(L.Callback):
    def __init__(self):
        self.at_start = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.at_start.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})


def test_sparse_selection_is_charged_and_only_selected_rows_change():
    snaps = _EpochSnapshots()
    sparse = SparseFineTuning(warmup_epochs=1, selection_epochs=1, keep_fraction=0.25)
    s = DPStrategy(noise_multiplier=1.0)
    model = ClassifierModule(make_vit(), lr=0.05, optimizer="adam")
    trainer(s, max_epochs=3, callbacks=[snaps, sparse]).fit(model, loader(_vit_data(), 16))
    assert s.ledger.steps == 12 == model.trainer.global_step  # warm-up, selection and sparse steps all charged
    warm, select, sparse_start = snaps.at_start
    final = {n: p.detach() for n, p in model.net.named_parameters()}
    assert all(torch.equal(select[n], sparse_start[n]) for n in final), "selection steps do not change the model"
    assert not torch.equal(warm["head.weight"], select["head.weight"])
    assert all(torch.equal(warm[n], select[n]) for n in final if not n.startswith("head."))
    assert set(sparse.masks) == {n for n, p in final.items() if p.ndim > 1 and not n.startswith("head.")}
    changed_any = False
    for name, mask in sparse.masks.items():
        rows = final[name].reshape(final[name].shape[0], -1)
        start = sparse_start[name].reshape(rows.shape[0], -1)
        assert int(mask.sum()) == max(1, -(-rows.shape[0] // 4))
        assert torch.equal(rows[~mask], start[~mask]), name
        changed_any |= not torch.equal(rows[mask], start[mask])
    assert changed_any
    assert torch.equal(final["blocks.0.norm1.weight"], sparse_start["blocks.0.norm1.weight"])  # 1-D: not a group
