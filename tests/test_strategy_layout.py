"""The strategy's layout (issue 21): the size bar, no import cycle through the strategy, its checkpointing or the
callbacks (``TYPE_CHECKING`` and function-level imports included), and one budget class shared by the strategy and
the ``PrivacyBudget`` callback.
"""

import pytest
from layout_check import ROOT, imported_modules, size_problems

from lightning_dp.budget_stop import BudgetStop
from lightning_dp.callbacks import PrivacyBudget

CHECKED = [
    "strategy",
    "strategy_properties",
    "strategy_checkpoints",
    "checkpointing",
    "budget_stop",
    "fit_planning",
    "step_guards",
    "step_stages",
    "ranks",
] + sorted(p.stem for p in (ROOT / "callbacks").glob("*.py"))


def _imports(name: str) -> set[str]:
    return imported_modules(name)


def _reachable(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for dep in _imports(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


@pytest.mark.parametrize("stem", CHECKED)
def test_no_strategy_module_over_600_lines_nor_class_over_450(stem):
    path = ROOT / f"{stem}.py" if (ROOT / f"{stem}.py").exists() else ROOT / "callbacks" / f"{stem}.py"
    assert size_problems(path) == []


@pytest.mark.parametrize(
    "name", ["lightning_dp.strategy", "lightning_dp.checkpointing", "lightning_dp.callbacks.privacy_budget"]
)
def test_no_import_cycle_through_the_strategy_its_checkpoints_or_the_callbacks(name):
    assert name not in _reachable(name), f"{name} imports itself through {sorted(_reachable(name))}"


def test_the_strategy_imports_no_callback_and_checkpointing_not_the_strategy():
    assert not {m for m in _reachable("lightning_dp.strategy") if m.startswith("lightning_dp.callbacks")}
    assert "lightning_dp.strategy" not in _reachable("lightning_dp.checkpointing")
    assert "lightning_dp.strategy" not in _reachable("lightning_dp.budget_stop")


def test_the_strategy_and_the_privacy_budget_callback_share_one_budget_class():
    from lightning_dp import DPStrategy

    strategy = DPStrategy(target_epsilon=1.0)
    assert strategy._budget is None  # built at the first fit (tests/test_privacy_paths.py runs it)
    assert isinstance(PrivacyBudget(max_epsilon=1.0)._stop, BudgetStop)
    assert "lightning_dp.budget_stop" in _imports("lightning_dp.private_training")  # the hooks of both strategies


def test_dp_strategy_keeps_the_shared_privacy_signature():
    """DPStrategy spells out its privacy arguments (public API, shown in the docs); they must be exactly those of
    PrivateTraining._init_privacy (shared with DPModelParallelStrategy), with the same defaults."""
    import inspect

    from lightning_dp import DPStrategy
    from lightning_dp.private_training import PrivateTraining

    shared = dict(inspect.signature(PrivateTraining._init_privacy).parameters)
    shared.pop("self")
    own = inspect.signature(DPStrategy.__init__).parameters
    for name, param in shared.items():
        assert name in own, name
        assert own[name].default == param.default, name
    lightning = [n for n in own if n not in shared and n != "self"]
    assert lightning == [
        "accelerator",
        "parallel_devices",
        "cluster_environment",
        "checkpoint_io",
        "precision_plugin",
        "process_group_backend",
        "timeout",
    ]
