"""The examples run offline: every documented command line of ``vit_transfer.py`` and of the study (tiny variants),
the sweep's tiny mode, and the pieces they are built from (class subsets, local checkpoints, per-class metrics)."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lightning_dp import DPStrategy

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples/configs"
sys.path.insert(0, str(ROOT / "examples"))

import study  # noqa: E402
import vit_transfer as vt  # noqa: E402

# Small enough for CPU tests; the documented configs are run with these overrides.
TINY_MODEL = ["--model.model_kwargs.depth=1", "--model.model_kwargs.embed_dim=48", "--model.model_kwargs.num_heads=3"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
CLASSES = ["a", "b", "c", "d"]


def _run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """An ImageFolder tree: 4 classes (a-d) of 32 px images whose colour depends on the class."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 5)):
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 40, (32, 32, 3)) + np.array([60 * k, 200 - 50 * k, 100], dtype=np.int64)
                Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(folder / f"{i}.png")
    return root


def _cli(args, cwd, monkeypatch):
    monkeypatch.chdir(cwd)
    return vt.main([*args, *QUIET])


# ---------------------------------------------------------------------------------------------------- command lines


def test_cli_example_runs_one_tiny_epoch_offline(tmp_path):
    out = _run(
        [str(ROOT / "examples/vit_transfer.py"), "fit", "--config", str(CONFIGS / "tiny.yaml"),
         "--config", str(CONFIGS / "lpft.yaml"), "--trainer.enable_progress_bar=false"],
        tmp_path,
    )  # fmt: skip
    assert "LP-FT: fine-tuning from step" in out
    assert out.count("lightning_dp: privacy summary") == 1, "a private run ends with the summary table"
    assert "GPU available" not in out and "💡" not in out, "framework chatter is hidden"
    events = list((tmp_path / "runs/tiny").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard logs were written"


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--trainer.strategy.init_args.target_epsilon=2", "--model.finetune=norm+head", "--data.batch_size=64"],
        ["--config", str(CONFIGS / "sparse.yaml")],
    ],
    ids=["tiny", "overrides", "sparse"],
)
def test_documented_tiny_commands(extra, tmp_path, monkeypatch):
    cli = _cli(["fit", "--config", str(CONFIGS / "tiny.yaml"), *extra], tmp_path, monkeypatch)
    metrics = cli.trainer.callback_metrics
    assert {"val/acc", "val/loss", *(f"val/acc_class_{y}" for y in range(4))} <= set(metrics)
    # the model's metrics of private training batches are off by default (the strategy's own labelled diagnostic,
    # nonprivate/step_clip_fraction, is DPStrategy(log_clip_fraction=...)'s business)
    assert not any(k.startswith(("train", "nonprivate/train")) for k in metrics), "private-batch metrics are off"
    assert 0 < cli.trainer.strategy.epsilon <= cli.trainer.strategy.target_epsilon
    assert cli.model.model.get_classifier().out_features == cli.datamodule.num_classes == 4


def test_film_config_runs_with_offline_overrides(tmp_path, monkeypatch):
    """vit_cifar100_film.yaml needs GPUs, the internet and ViT-B: run its command shape on CPU, offline, tiny."""
    cli = _cli(
        ["fit", "--config", str(CONFIGS / "vit_cifar100_film.yaml"), "--model.pretrained=false",
         "--model.model_name=vit_tiny_patch16_224", "--model.model_kwargs={patch_size: 8, depth: 1, embed_dim: 48,"
         " num_heads: 3}", "--data.dataset=synthetic", "--data.num_classes=100", "--data.img_size=32",
         "--data.batch_size=64", "--data.num_workers=0", "--trainer.accelerator=cpu", "--trainer.devices=1",
         "--trainer.precision=32-true", "--trainer.logger=false", "--trainer.max_epochs=1",
         "--trainer.limit_val_batches=1"],
        tmp_path, monkeypatch,
    )  # fmt: skip
    assert cli.model.hparams.num_classes == 100 and cli.model.hparams.img_size == 32
    assert "val/acc_class_99" in cli.trainer.callback_metrics


def test_two_stage_recipe_on_an_image_folder(tree, tmp_path, monkeypatch):
    data = [f"--data.data_dir={tree}"]
    public = _cli(
        ["fit", "--config", str(CONFIGS / "cifar10_public.yaml"), *data, "--data.classes=[0, 1]",
         "--trainer.max_epochs=1", *TINY_MODEL],
        tmp_path, monkeypatch,
    )  # fmt: skip
    ckpt = tmp_path / "runs/cifar10_public/public.ckpt"
    assert ckpt.is_file() and public.model.model.get_classifier().out_features == 2
    assert "nonprivate/train_loss" in public.trainer.callback_metrics  # public data, switched on in the config
    private_args = ["--config", str(CONFIGS / "cifar10_private.yaml"), *data, "--data.classes=[c, d]",
                    "--data.batch_size=8", "--trainer.strategy.init_args.target_delta=1e-3", *TINY_MODEL]  # fmt: skip
    private = _cli(
        ["fit", *private_args, f"--model.checkpoint={ckpt}", "--trainer.max_epochs=1"], tmp_path, monkeypatch
    )
    assert private.model.hparams.checkpoint == str(ckpt) and private.model.hparams.reset_head
    assert private.datamodule.class_names == ["c", "d"] and private.model.hparams.num_classes == 2
    assert {"val/acc_class_0", "val/acc_class_1"} <= set(private.trainer.callback_metrics)
    result = _cli(["test", *private_args, f"--ckpt_path={tmp_path / 'runs/cifar10_private/private.ckpt'}"],
                  tmp_path, monkeypatch)  # fmt: skip
    metrics = result.trainer.callback_metrics
    per_class = [float(metrics[f"test/acc_class_{y}"]) for y in range(2)]
    assert float(metrics["test/acc"]) == pytest.approx(sum(per_class) / 2)  # 5 test images per class


@pytest.mark.parametrize("arg", ["--model.num_classes=4", "--model.img_size=32"])
def test_model_num_classes_and_img_size_are_linked_not_set_twice(arg, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _cli(["fit", "--config", str(CONFIGS / "tiny.yaml"), arg], tmp_path, monkeypatch)
    assert arg.split("=")[0].removeprefix("--") in capsys.readouterr().err


def test_sweep_tiny_writes_csv_and_png(tmp_path):
    _run(
        [str(ROOT / "examples/sweep_cb.py"), "--tiny", "--clip", "1.0", "--batch", "64", "256", "--epochs", "2",
         "--out", str(tmp_path), "--wandb-sweep"],
        tmp_path,
    )  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [int(r["batch"]) for r in rows] == [64, 256]
    for r in rows:
        assert float(r["epsilon_spent"]) <= 4.0 and 0.0 <= float(r["accuracy"]) <= 1.0
        assert abs(float(r["cumulative_noise"]) - float(r["noise_multiplier"]) * int(r["steps"]) ** 0.5) < 1e-6
    png = (tmp_path / "heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "grid" in (tmp_path / "sweep.yaml").read_text()


def _study_args(tree, out):
    return ["--data", str(tree), "--out", str(out), "--public-classes", "0", "1", "--private-classes", "2", "3",
            "--private-size", "16", "--depth", "1", "--embed-dim", "48", "--pretrain-epochs", "1", "--epochs", "2",
            "--batch", "8", "--clip", "0.5", "2", "--epsilon", "8", "--methods-epsilon", "8", "--methods-batch", "8",
            "--methods-clip", "2", "--delta", "1e-3", "--min-steps", "2"]  # fmt: skip


def test_private_search_tiny_reports_both_epsilons(tmp_path):
    import private_search

    report = private_search.main(["--tiny", "--out", str(tmp_path)])
    grid, search = report["grid"], report["search"]
    assert grid["runs"] == 2 and grid["claimed_epsilon"] == 8.0 < grid["composed_epsilon"]
    assert search["epsilon"] <= 8.0 and search["runs_drawn"] >= 1 and 0 <= search["test_acc"] <= 1
    assert json.loads((tmp_path / "report.json").read_text())["search"]["config"] == search["config"]


def test_study_all_stages_on_a_tiny_tree(tree, tmp_path):
    """``python examples/study.py all --data ... --out ...``, shrunk to a 4-class tree and a 1-block ViT."""
    out = tmp_path / "study"
    study.main(["all", *_study_args(tree, out)])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1 + 2 + 5 + 2  # pretrain, grid, methods (the full fine-tuning one reused), baselines
    grid = [r for r in rows if r["stage"] == "grid"]
    for r in grid:
        assert r["epsilon_spent"] <= 8.0 and len(r["per_class"]) == len(r["retained_weight"]) == 2
        assert all(0 < w <= 1 for w in r["retained_weight"])
        assert r["cumulative_noise"] == pytest.approx(r["noise_multiplier"] * r["steps"] ** 0.5)
    for name in ("heatmap.png", "per_class.png", "methods.png", "advisor.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    assert "advisor: B=8" in (out / "summary.md").read_text()
    assert len(list(csv.DictReader(open(out / "grid.csv")))) == 2
    study.main(["grid", *_study_args(tree, out)])  # resumes: nothing left to run
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)


def test_study_runs_trainings_in_parallel_jobs(tree, tmp_path):
    """``--jobs 2``: trainings in two spawned processes (the non-private baselines: no calibration to wait for)."""
    out = tmp_path / "study"
    study.main(["pretrain", *_study_args(tree, out)])
    study.main(["baselines", *_study_args(tree, out), "--jobs", "2"])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["baselines:all-scratch:nonprivate:B8:C0:E2",
                                             "baselines:all:nonprivate:B8:C0:E2", "pretrain"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------- class subsets


def test_class_subset_of_an_image_folder_is_relabelled(tree):
    dm = vt.ImageDataModule(dataset="imagefolder", data_dir=str(tree), classes=[3, "b"], img_size=32)
    assert dm.class_names == ["d", "b"] and dm.num_classes == 2
    dm.setup("fit")
    for dataset, n in ((dm.train_set, 10), (dm.test_set, 5)):
        assert dataset.classes == ["d", "b"] and dataset.class_to_idx == {"d": 0, "b": 1}
        assert sorted(dataset.targets) == [0] * n + [1] * n
        for path, label in dataset.samples:
            assert Path(path).parent.name == ["d", "b"][label]
    x, y = dm.train_set[0]
    assert x.shape == (3, 32, 32) and y in (0, 1)
    small = vt.ImageDataModule(dataset="imagefolder", data_dir=str(tree), classes=[0, 1], train_size=7)
    small.setup("fit")
    assert len(small.train_set) == 7 and len(small.test_set) == 10


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"classes": ["z"]}, ValueError, "Unknown class 'z'"),
        ({"classes": [4]}, ValueError, "out of range"),
        ({"classes": [0, "a"]}, ValueError, "distinct"),
        ({"classes": [0, 1], "num_classes": 3}, ValueError, "num_classes=3"),
        ({"data_dir": "/nonexistent"}, FileNotFoundError, "/nonexistent/train"),
    ],
)
def test_class_subset_errors(tree, kwargs, error, match):
    with pytest.raises(error, match=match):
        vt.ImageDataModule(**{"dataset": "imagefolder", "data_dir": str(tree), **kwargs})


def test_select_classes_on_a_cifar_like_dataset():
    data = SimpleNamespace(
        data=np.arange(6), targets=[0, 1, 2, 0, 1, 2], classes=["x", "y", "z"], class_to_idx={"x": 0, "y": 1, "z": 2}
    )
    vt.select_classes(data, ["z", "x"])
    assert data.data.tolist() == [0, 2, 3, 5] and data.targets == [1, 0, 1, 0] and data.classes == ["z", "x"]


# ---------------------------------------------------------------------------------------------------- checkpoints


def _timm(num_classes=3, **kw):
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=num_classes)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kw})


def _module(checkpoint, num_classes=3, reset_head=True, **kw):
    kwargs = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, **kw}
    return vt.TransferModule(
        checkpoint=str(checkpoint), reset_head=reset_head, num_classes=num_classes, img_size=32, model_kwargs=kwargs
    )


def _same_backbone(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("head."))


@pytest.mark.parametrize("fmt", ["state_dict", "wrapped", "ddp", "safetensors"])
def test_timm_checkpoint_formats_load(fmt, tmp_path):
    source = _timm()
    sd = source.state_dict()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth")
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        obj = {"state_dict": sd, "epoch": 3} if fmt == "wrapped" else sd
        obj = {f"module.{k}": v for k, v in sd.items()} if fmt == "ddp" else obj
        torch.save(obj, path)
    torch.manual_seed(1)
    fresh = _module(path, num_classes=5).model  # new task: 5 classes, new head
    assert _same_backbone(fresh, source) and fresh.head.weight.shape == (5, 48)
    kept = _module(path, reset_head=False).model
    assert torch.equal(kept.head.weight, source.head.weight)
    reset = _module(path).model  # same number of classes, head still re-initialised by default
    assert _same_backbone(reset, source) and not torch.equal(reset.head.weight, source.head.weight)


def test_lightning_checkpoint_of_the_module_loads(tmp_path):
    module = vt.TransferModule(num_classes=2, img_size=32, model_kwargs={"patch_size": 8, "embed_dim": 48, "depth": 2,
                                                                         "num_heads": 3})  # fmt: skip
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,)))
    trainer.fit(module, DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = _module(tmp_path / "m.ckpt", num_classes=3).model
    assert _same_backbone(loaded, module.model)
    torch.save({"pytorch-lightning_version": "2.6", "state_dict": {"net.w": torch.ones(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(vt.CheckpointMismatchError, match="no 'model.\\*' weights"):
        _module(tmp_path / "other.ckpt")


def test_checkpoint_errors_name_the_file_and_the_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        _module(tmp_path / "missing.pth")
    torch.save(_timm(depth=3).state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(vt.CheckpointMismatchError, match=r"not in the model: blocks\.2\."):
        _module(tmp_path / "deeper.pth")
    torch.save(_timm(depth=1).state_dict(), tmp_path / "shallower.pth")
    with pytest.raises(vt.CheckpointMismatchError, match=r"missing in checkpoint: blocks\.1\."):
        _module(tmp_path / "shallower.pth")
    torch.save(_timm(embed_dim=24, num_heads=2).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(vt.CheckpointMismatchError, match=r"shape mismatch: cls_token: checkpoint \(1, 1, 24\)"):
        _module(tmp_path / "narrow.pth")
    torch.save(_timm().state_dict(), tmp_path / "three.pth")
    with pytest.raises(vt.CheckpointMismatchError, match=r"head\.weight: checkpoint \(3, 48\).*reset_head=true"):
        _module(tmp_path / "three.pth", num_classes=5, reset_head=False)
    with pytest.raises(ValueError, match="either pretrained"):
        vt.TransferModule(pretrained=True, checkpoint=str(tmp_path / "three.pth"))


def test_position_embedding_is_resampled_for_another_resolution(tmp_path):
    source = _timm()  # 32 px, 4x4 patches
    torch.save(source.state_dict(), tmp_path / "w.pth")
    kwargs = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
    model = vt.TransferModule(checkpoint=str(tmp_path / "w.pth"), num_classes=3, img_size=64, model_kwargs=kwargs).model
    assert model.pos_embed.shape == (1, 65, 48)
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])  # the class token's embedding is kept
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


# ---------------------------------------------------------------------------------------------------- metrics


def test_per_class_metrics_match_brute_force_after_a_private_run():
    L.seed_everything(0)
    dm = vt.ImageDataModule(dataset="synthetic", num_classes=3, img_size=16, batch_size=32, synthetic_size=96)
    module = vt.TransferModule(num_classes=3, img_size=16, lr=3e-3, log_train_metrics=True,
                               model_kwargs={"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2})  # fmt: skip
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        strategy=DPStrategy(target_epsilon=8.0, target_delta=1e-3))  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert {"nonprivate/train_loss", "nonprivate/train_acc"} <= set(trainer.callback_metrics)
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    module.eval()
    with torch.no_grad():
        pred = torch.cat([module(x).argmax(-1) for x, _ in dm.test_dataloader()])
    y = dm.test_set.y
    for k in range(3):
        assert metrics[f"test/acc_class_{k}"] == pytest.approx((pred[y == k] == k).float().mean().item(), abs=1e-6)
    assert metrics["test/acc"] == pytest.approx((pred == y).float().mean().item(), abs=1e-6)
    assert "test/loss" in metrics and not any(k.startswith("val/") for k in metrics)


# ---------------------------------------------------------------------------------------------------- --help


def _help(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        vt.main(args)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_describes_dp_and_the_recipe(capsys):
    out = _help(["--help"], capsys)
    assert "Lightning Trainer command line tool" not in out
    for words in ("Differentially private", "DPStrategy", "Poisson sampling", "max_grad_norm", "target_epsilon",
                  "cifar10_public.yaml", "cifar10_private.yaml", "configs/tiny.yaml"):  # fmt: skip
        assert words in out, words


def test_fit_help_is_short_plain_text_and_hidden_trainer_options_still_parse(capsys):
    out = _help(["fit", "--help"], capsys)
    assert len(out.splitlines()) < 250, len(out.splitlines())
    assert not re.search(r":(class|paramref|meth|func):|``", out), "no Sphinx markup"
    assert "known subclasses" not in out
    for option in ("--trainer.max_epochs", "--trainer.max_steps", "--trainer.strategy", "--model.lr",
                   "--data.batch_size", "--data.num_workers", "--data.train_size"):  # fmt: skip
        assert option in out, option
    assert "--trainer.barebones" not in out and "fit --trainer.strategy.help lightning_dp.DPStrategy" in out
    tiny = str(CONFIGS / "tiny.yaml")
    config = _help(["fit", "--config", tiny, "--trainer.barebones=true", "--print_config"], capsys)
    assert "barebones: true" in config


def test_images_of_any_aspect_ratio_become_square_batches(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, (w, h) in enumerate([(40, 24), (24, 50)]):
            folder = tmp_path / split / f"class{k}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype("uint8")).save(folder / "0.png")
    dm = vt.ImageDataModule(dataset="imagefolder", data_dir=str(tmp_path), img_size=16, batch_size=2)
    dm.setup("fit")
    x, y = next(iter(DataLoader(dm.train_set, batch_size=2)))
    assert x.shape == (2, 3, 16, 16) and sorted(y.tolist()) == [0, 1]


def test_the_documented_image_folder_recipe_parses(tree, capsys):
    page = (ROOT / "docs/examples.md").read_text(encoding="utf-8")
    section = page.split("## Your own ImageFolder", 1)[1].split("\n## ", 1)[0]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).replace("\\\n", " ")
    args = command.split()[2:]  # after `python examples/vit_transfer.py`
    args = [str(ROOT / a) if a.startswith("examples/") else a.replace("my_data", str(tree)) for a in args]
    config = _help([*args, "--print_config"], capsys)
    for line in ("pretrained: true", "num_workers: 8", "target_epsilon: 8.0", "max_epochs: 5", "classes: null"):
        assert line in config, line
