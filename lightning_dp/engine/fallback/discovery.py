"""Where the fallback applies: the units (modules recomputed per example) and the tracing regions (modules whose ops
are traced), planned when the engine is built and completed on the micro-batches checked against autograd.

See :mod:`lightning_dp.engine.fallback.planner` for the whole picture.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_dp.console import notice
from lightning_dp.engine.contributions import Contribution
from lightning_dp.engine.fallback.units import UnitRule, unit_rule_for
from lightning_dp.engine.layout import LocalLayout, ParameterLayout

#: how many names an announcement lists before "and N more"
LISTED = 8


class FallbackPlan:
    """The fallback's plan for one model: its units and tracing regions, announced once each.

    Args:
        module: the model.
        params: its trained parameters.
        native: names of the layers the engine hooks with a rule.
        broadcast: the engine's broadcast parameters.
        param_names: parameter names for messages.
        engine_name: for announcements.
        layout: where the trained parameters live (default: :class:`~lightning_dp.engine.layout.LocalLayout`); under
            a rekeying layout (FSDP2) a layer's parameter during forward and backward is another object than the
            trained one, and :meth:`key_of` maps it back.

    Attributes:
        units: per unit module, the rule that recomputes it per example.
        regions: the modules whose forward is traced op by op (None: the whole forward).
        native: the layers the engine hooks with a rule.
        owner: per parameter, the module that owns it.
        layout: the engine's parameter layout.
    """

    def __init__(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        native: list[str],
        broadcast: list[nn.Parameter],
        param_names: dict[nn.Parameter, str],
        engine_name: str,
        layout: ParameterLayout | None = None,
    ) -> None:
        self.model = module
        self.layout: ParameterLayout = layout if layout is not None else LocalLayout()
        self.trainable = set(params)
        self.param_names = param_names
        self.engine_name = engine_name
        self.module_names: dict[nn.Module, str] = {m: n for n, m in module.named_modules()}
        modules = dict(module.named_modules())
        self.native: set[nn.Module] = {modules[n] for n in native if n in modules}
        self.owner: dict[nn.Parameter, nn.Module] = {}
        for _, m in module.named_modules():
            for p in m._parameters.values():
                if p is not None:
                    self.owner.setdefault(p, m)
        self.units: dict[nn.Module, UnitRule] = {}
        self._unit_names: list[str] = []
        self.regions: set[nn.Module | None] = set()
        self._announced: set[str] = set()

        covered = {p for m in self.native for p in m._parameters.values() if p is not None} | set(broadcast)
        for m in module.modules():
            if unit_rule_for(m) is not None and self.trained_in(m) and not self.inside_unit(m):
                self.add_unit(m)
        leftover = [p for p in params if p not in covered and not self.inside_unit(self.owner[p])]
        for p in leftover:
            self.regions.add(self.owner[p])
        self._announce_plan(leftover)

    def key_of(self, p: Tensor) -> nn.Parameter:
        """The trained parameter that ``p`` (read from a layer, now) stands for: ``p`` itself unless the layout
        rekeys.
        """
        return self.layout.canonical(p) if self.layout.rekeys else p  # type: ignore[return-value]

    def is_trained(self, x: object) -> bool:
        """Whether ``x`` is a trained parameter, or stands for one (FSDP2's unsharded parameter in a forward)."""
        return isinstance(x, nn.Parameter) and self.key_of(x) in self.trainable

    def trained_in(self, m: nn.Module) -> bool:
        """Whether ``m`` (or a submodule) holds a trained parameter."""
        return any(self.is_trained(p) for p in m.parameters())

    def name_of(self, m: nn.Module | None) -> str:
        """``m``'s path in the model (for messages)."""
        if m is None:
            return "<outside any module>"
        return self.module_names.get(m, type(m).__name__) or "<root>"

    def inside_unit(self, m: nn.Module) -> bool:
        """Whether ``m`` is a unit or lies inside one."""
        name = self.module_names.get(m)
        if name is None:
            return False
        return any(u == "" or name == u or name.startswith(u + ".") for u in self._unit_names)

    def add_unit(self, m: nn.Module) -> None:
        """Make ``m`` a unit (replacing units inside it)."""
        name = self.module_names[m]
        inside = [u for u in self.units if is_within(self.module_names[u], name)]
        for u in inside:
            del self.units[u]
        params = {n: self.key_of(p) for n, p in m.named_parameters() if self.is_trained(p)}
        cls = unit_rule_for(m) or UnitRule
        self.units[m] = cls(m, params)
        self._unit_names = [self.module_names[u] for u in self.units]
        self.regions = {r for r in self.regions if r is None or not self.inside_unit(r)}

    def covers(self, group: Contribution) -> bool:
        """Whether an engine group's parameters all belong to modules inside units (the unit's per-sample gradients
        replace the group's).
        """
        keys = [self.key_of(p) for p in group.params]
        return bool(keys) and all(self.inside_unit(self.owner[p]) for p in keys if p in self.owner)

    def fallback_params(self) -> set[nn.Parameter]:
        """The trained parameters the fallback computes per-sample gradients for (as planned so far)."""
        out = {p for rule in self.units.values() for p in rule.params.values()}
        for r in self.regions:
            mods = [self.model] if r is None else [r]
            for m in mods:
                out |= {self.key_of(p) for p in m._parameters.values() if p is not None and self.is_trained(p)}
        return out

    def announce(self, key: str, message: str) -> None:
        """Log ``message`` once per ``key`` (on rank zero)."""
        if key not in self._announced:
            self._announced.add(key)
            notice(f"lightning_dp: {self.engine_name}: {message}")

    def _announce_plan(self, leftover: list[nn.Parameter]) -> None:
        if leftover:
            names = [f"'{self.param_names.get(p, '?')}'" for p in leftover]
            listed = ", ".join(names[:LISTED]) + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")
            self.announce(
                "plan-ops",
                f"no per-layer rule for {listed}: their per-sample gradients are computed with torch.func at the ops"
                " that use them (or, where the batch is folded inside a module, per module).",
            )
        for m in self.units:
            self.announce(
                f"unit:{self.name_of(m)}",
                f"'{self.name_of(m)}' ({type(m).__name__}) is recomputed per example as one unit with torch.func"
                f" ({type(self.units[m]).__name__}).",
            )


def is_within(name: str, outer: str) -> bool:
    """Whether the module path ``name`` is ``outer`` or lies inside it (``""``: the root holds everything)."""
    return outer == "" or name == outer or name.startswith(outer + ".")


__all__ = ["LISTED", "FallbackPlan", "is_within"]
