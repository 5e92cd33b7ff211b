"""What an install brings: W&B is an extra, and nothing in lightning_dp needs it until a run logs to W&B."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("[")[0].split("<")[0].strip().lower() for r in requirements}


def test_wandb_is_an_extra_and_in_dev_not_a_core_dependency():
    project = _project()
    assert "wandb" not in _names(project["dependencies"])
    assert _names(project["optional-dependencies"]["wandb"]) == {"wandb"}
    assert "wandb" in _names(project["optional-dependencies"]["dev"]), "the tests log to W&B offline"


_IMPORT_ALL_WITHOUT_WANDB = """
import importlib, pkgutil, sys
sys.modules["wandb"] = None  # as if it were not installed: `import wandb` raises ImportError
import lightning_dp
names = [m.name for m in pkgutil.walk_packages(lightning_dp.__path__, "lightning_dp.")]
for name in names:
    importlib.import_module(name)
assert "wandb" not in {k for k, v in sys.modules.items() if v is not None}
print(len(names), "modules")
"""


def test_every_module_imports_without_wandb(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL_WITHOUT_WANDB], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "modules" in proc.stdout


def test_logging_to_wandb_without_it_names_the_extra(monkeypatch):
    from lightning_dp.callbacks import grad_norm_histogram

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "lightning-dp\[wandb\]"'):
        grad_norm_histogram.import_wandb()
