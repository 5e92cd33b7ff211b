"""The ghost engine's fallback: per-sample instantiation with a layer's grad-sampler rule.

Any layer with a registered per-sample gradient rule (ours, or an Opacus grad sampler) and no :class:`GhostLayer` of
its own is handled by instantiating its per-sample gradients. For layers with few parameters per channel (LayerNorm,
LayerScale) this is the method of choice; for others it costs the time and memory that ghost norms save, which the
engine announces once when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_dp.engine.layer_rules.ghost_layer import GhostLayer, GhostRecord
from lightning_dp.engine.layer_rules.grad_sampler_registry import GradSampleRule
from lightning_dp.engine.layer_rules.norms import NORM_TYPES
from lightning_dp.engine.layer_rules.scales import SCALE_TYPES

#: Layers with few parameters per channel, for which instantiation by rule is the method (no notice).
_OWN_RULE_TYPES: tuple[type[nn.Module], ...] = (*NORM_TYPES, *SCALE_TYPES)


@dataclass
class RuleCaptured:
    per_sample: dict[nn.Parameter, Tensor] = field(default_factory=dict)  #: ``(b, *p.shape)`` fp32


class RuleGhostLayer(GhostLayer):
    """Per-sample gradients from ``rule(layer, activations, output gradient)``, summed over the layer's calls.

    Args:
        module: the layer.
        rule: its per-sample gradient rule.
    """

    instantiated_label: ClassVar[str] = "rule"

    def __init__(self, module: nn.Module, rule: GradSampleRule) -> None:
        super().__init__(module)
        self.rule = rule

    @property
    @override
    def fallback_notice(self) -> str | None:
        t = type(self.module)
        return None if isinstance(self.module, _OWN_RULE_TYPES) else f"{t.__module__}.{t.__qualname__}"

    @override
    def collect(self, records: list[GhostRecord]) -> RuleCaptured:
        captured = RuleCaptured()
        for r in records:
            assert r.grad is not None
            acts: list[Any] = [x.float() if isinstance(x, Tensor) and x.is_floating_point() else x for x in r.inputs]
            for p, gs in self.rule(self.module, acts, r.grad.float()).items():
                if p.requires_grad:
                    prev = captured.per_sample.get(p)
                    captured.per_sample[p] = gs if prev is None else prev + gs
        return captured

    @override
    def squared_norms(self, captured: RuleCaptured) -> Tensor | None:
        return None

    @override
    def instantiate(self, captured: RuleCaptured) -> dict[nn.Parameter, Tensor]:
        return captured.per_sample

    @override
    def clipped_sum(self, captured: RuleCaptured, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        return {p: torch.einsum("i,i...->...", factors, gs) for p, gs in captured.per_sample.items()}


__all__ = ["RuleGhostLayer"]
