"""The engine's layout (issue 21): one home per concept, the size bar, no import cycle, public import paths kept,
per-layer clipping held by the template as its own collaborator, and one layer family's per-sample maths in one
module, found through one registry per kind of rule.
"""

import ast
import importlib
import math
import warnings
from pathlib import Path

import pytest
import torch
from layout_check import MODULES as PACKAGE_MODULES
from layout_check import imported_modules, size_problems
from torch import nn

import lightning_dp
from lightning_dp.engine import ENGINES
from lightning_dp.engine.fallback import op_rules
from lightning_dp.engine.per_layer import ClippingGroups, PerLayerClipper
from lightning_dp.errors import DPMisconfigurationError

ENGINE_DIR = Path(lightning_dp.__file__).parent / "engine"
MODULES = sorted(ENGINE_DIR.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE_DIR.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ENGINE_DIR)))
def test_no_engine_module_over_600_lines_nor_class_over_450(path):
    assert size_problems(path) == []


def test_no_import_cycle_inside_the_engine():
    modules = {_module_name(p): p for p in MODULES}
    graph = {m: imported_modules(m, set(modules)) for m in modules}
    # a package's __init__ imports its submodules; a submodule importing its own package's __init__ is then a cycle
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                pytest.fail(f"import cycle: {' -> '.join([*stack[stack.index(d) :], d])}")
            if d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_public_import_paths_still_work():
    from lightning_dp.engine.base import NONFINITE_MODES, ClippingEngine, NonFiniteMode  # noqa: F401
    from lightning_dp.engine.crosscheck import check_sums_against_autograd as moved
    from lightning_dp.engine.crosscheck import check_tolerance as moved_tol
    from lightning_dp.engine.fallback import FunctionalFallback, UnitRule, register_batch_dims  # noqa: F401
    from lightning_dp.engine.layers import check_sums_against_autograd, check_tolerance

    assert check_sums_against_autograd is moved and check_tolerance is moved_tol
    assert NONFINITE_MODES == ("skip", "error")


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.norm(self.b(self.a(x)))


def test_clipping_groups_merge_modules_that_share_a_parameter():
    model = _Tied()
    plan = ClippingGroups.plan(model, [p for p in model.parameters() if p.requires_grad], [])
    names = {p: n for n, p in model.named_parameters()}
    groups = sorted(sorted(names[p] for p in g) for g in plan.groups)
    assert groups == [["a.bias", "a.weight", "b.bias"], ["norm.bias", "norm.weight"]]
    assert plan.shared == {plan.ids[model.a.weight]}


@pytest.mark.parametrize("engine_name", sorted(ENGINES))
def test_the_template_holds_per_layer_clipping_as_a_collaborator(engine_name):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    engine = ENGINES[engine_name](model)
    assert isinstance(engine.per_layer, PerLayerClipper)
    assert (
        engine.clipping_groups == engine.per_layer.clipping_groups == [("0.weight", "0.bias"), ("1.weight", "1.bias")]
    )
    engine.set_clipping_bound(1.0, [0.6, 0.8])
    assert engine.per_layer.group_bounds == (0.6, 0.8)
    with pytest.raises(DPMisconfigurationError, match="sqrt"):
        engine.set_clipping_bound(1.0, [0.8, 0.8])
    with pytest.raises(DPMisconfigurationError, match="one positive finite bound per clipping group"):
        engine.set_clipping_bound(1.0, [1.0])
    engine.set_clipping_bound(1.0)
    assert engine.per_layer.group_bounds is None


def test_per_layer_clipper_bounds_each_group_by_its_own_c_l():
    """Two groups of one example each with norm 3 and 4: with C_l = (0.6, 0.8) each is scaled to its bound."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    params = list(model.parameters())
    from lightning_dp.engine.contributions import PerSampleGradients

    clipper = PerLayerClipper(model, params, [], {p: str(i) for i, p in enumerate(params)}, "test")
    clipper.set_bounds(1.0, [0.6, 0.8])
    clipper.start(1, 1.0, torch.device("cpu"), checking=True)
    groups = [PerSampleGradients("0", {params[0]: torch.full((1, 1, 1), 3.0)})]
    groups.append(PerSampleGradients("1", {params[1]: torch.full((1, 1, 1), 4.0)}))
    result = clipper.finish(groups, 1.0)
    assert math.isclose(float(result.norms[0]), 5.0, rel_tol=1e-6)
    assert math.isclose(float(result.summed[params[0]].flatten()[0]), 0.6, rel_tol=1e-5)
    assert math.isclose(float(result.summed[params[1]].flatten()[0]), 0.8, rel_tol=1e-5)
    assert torch.allclose(clipper.last_group_norms, torch.tensor([[3.0, 4.0]]))


def test_op_rules_have_one_registry_with_one_entry_point():
    def rule(args, kwargs, tracked, grad, b):
        return None

    try:
        assert op_rules.register_op_rule(rule, "my_op", "__my_op__") is rule
        assert op_rules.OP_RULES["my_op"] is rule and op_rules.OP_RULES["__my_op__"] is rule
    finally:
        op_rules.OP_RULES.pop("my_op", None)
        op_rules.OP_RULES.pop("__my_op__", None)
    assert op_rules.OP_RULES["mul_"] is op_rules.OP_RULES["mul"]


#: each kind of layer rule: its one registering function and the registry module that defines it
REGISTRIES = {
    "register_grad_sampler": "lightning_dp.engine.layer_rules.grad_sampler_registry",
    "register_ghost_layer": "lightning_dp.engine.layer_rules.ghost_layer_registry",
    "register_broadcast_parameters": "lightning_dp.engine.layer_rules.broadcast_registry",
}


def _registering_modules() -> dict[str, set[str]]:
    """Per module of the package, the registry functions it calls (as a decorator or a call) to register a rule."""
    out: dict[str, set[str]] = {}
    for name, path in PACKAGE_MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = getattr(node.func, "id", getattr(node.func, "attr", None))
                if called in REGISTRIES:
                    out.setdefault(name, set()).add(called)
    return out


def test_layer_rules_are_registered_only_by_the_layer_family_modules():
    """Every registration of a layer rule is in a family module of ``engine.layer_rules`` that the package imports
    (so lookups see it whatever the user imported), never in a registry, the engines or elsewhere.
    """
    from lightning_dp.engine.layer_rules import FAMILIES

    families = {m.__name__ for m in FAMILIES}
    outside = {m: sorted(calls) for m, calls in _registering_modules().items() if m not in families}
    assert outside == {}


def test_one_registry_per_kind_of_rule_with_one_function_each():
    defined: dict[str, list[str]] = {}
    for name, path in PACKAGE_MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in REGISTRIES:
                defined.setdefault(node.name, []).append(name)
    assert defined == {fn: [module] for fn, module in REGISTRIES.items()}


def test_a_layer_family_keeps_both_kinds_of_rule_in_one_module():
    """A layer type with a ghost layer of ours and a grad-sampler rule of ours has both in the same module."""
    from lightning_dp.engine.layer_rules import FAMILIES, ghost_layer_registry, grad_sampler_registry

    ghost = ghost_layer_registry._GHOST_LAYERS
    rules = {t: fn for t, (fn, _) in grad_sampler_registry._RULES.items() if fn.__module__.startswith("lightning_dp")}
    both = sorted(set(ghost) & set(rules), key=str)
    assert {nn.Conv1d, nn.Conv2d, nn.Embedding, nn.EmbeddingBag} <= set(both)
    apart = {
        t.__name__: (rules[t].__module__, ghost[t].__module__)
        for t in both
        if rules[t].__module__ != ghost[t].__module__
    }
    assert apart == {}
    assert {fn.__module__ for fn in rules.values()} <= {m.__name__ for m in FAMILIES}


#: the modules the layer rules moved from, and a name each still answers with
OLD_PATHS = [
    ("lightning_dp.engine.rules", "register_grad_sampler", "lightning_dp.engine.layer_rules"),
    ("lightning_dp.engine.rules", "layer_norm_rule", "lightning_dp.engine.layer_rules.norms"),
    ("lightning_dp.engine.rules", "reduce_to", "lightning_dp.engine.layer_rules.reductions"),
    ("lightning_dp.engine.convolution", "conv_patches", "lightning_dp.engine.layer_rules.conv"),
    ("lightning_dp.engine.embedding_bag", "bag_tokens", "lightning_dp.engine.layer_rules.embedding_bag"),
    ("lightning_dp.engine.ghost_layers", "ghost_layer_for", "lightning_dp.engine.layer_rules"),
    ("lightning_dp.engine.ghost_layers.base", "GhostLayer", "lightning_dp.engine.layer_rules"),
    ("lightning_dp.engine.ghost_layers.conv", "Conv2dGhostLayer", "lightning_dp.engine.layer_rules.conv"),
    ("lightning_dp.engine.ghost_layers.embedding", "EmbeddingCaptured", "lightning_dp.engine.layer_rules.embedding"),
    ("lightning_dp.engine.ghost_layers.embedding_bag", "EmbeddingBagGhostLayer", "lightning_dp.engine.layer_rules"),
    ("lightning_dp.engine.ghost_layers.linear", "LinearGhostLayer", "lightning_dp.engine.layer_rules.linear"),
    ("lightning_dp.engine.ghost_layers.matmul", "MatmulCaptured", "lightning_dp.engine.layer_rules.matmul"),
    ("lightning_dp.engine.ghost_layers.rule", "RuleGhostLayer", "lightning_dp.engine.layer_rules.rule_ghost_layer"),
]


@pytest.mark.parametrize(("old", "name", "new"), OLD_PATHS, ids=lambda v: v.rsplit(".", 1)[-1])
def test_the_old_layer_rule_paths_still_import_with_a_deprecation_warning(old, name, new):
    with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to lightning_dp.engine.layer_rules"):
        value = getattr(importlib.import_module(old), name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert value is getattr(importlib.import_module(new), name)
