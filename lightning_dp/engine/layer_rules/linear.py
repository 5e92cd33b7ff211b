"""``nn.Linear`` and timm's ``Linear`` (same maths; a cast under torchscript only), any input rank ``(B, ..., d)``,
the middle dimensions being the sequence.

Per-sample gradients: Opacus's ``nn.Linear`` grad sampler (found by lookup for ``nn.Linear``; registered here for
timm's subclass, which overrides ``forward``). Ghost engine: :class:`LinearGhostLayer`, a matrix-product layer.
"""

from __future__ import annotations

from typing import ClassVar

from opacus.grad_sample import GradSampleModule
from torch import nn
from typing_extensions import override

from lightning_dp.engine.layer_rules.ghost_layer import GhostRecord
from lightning_dp.engine.layer_rules.ghost_layer_registry import register_ghost_layer
from lightning_dp.engine.layer_rules.grad_sampler_registry import register_grad_sampler
from lightning_dp.engine.layer_rules.matmul import MatmulCaptured, MatmulGhostLayer, as_sequence, cat

try:
    from timm.layers import Linear as _TimmLinear
except ImportError:  # pragma: no cover - timm is a dependency, but keep the engine importable without it
    _TimmLinear = None

#: the linear layers handled here
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,) if _TimmLinear is None else (nn.Linear, _TimmLinear)

if _TimmLinear is not None:  # it overrides forward, so lookup by nn.Linear would not reach it
    register_grad_sampler(_TimmLinear)(GradSampleModule.GRAD_SAMPLERS[nn.Linear])


@register_ghost_layer(*LINEAR_TYPES)
class LinearGhostLayer(MatmulGhostLayer):
    """``y = x Wᵀ + b``: the calls concatenated along the sequence."""

    autocast_input: ClassVar[bool] = True

    @override
    def collect(self, records: list[GhostRecord]) -> MatmulCaptured:
        a = cat([as_sequence(r.inputs[0]) for r in records], 1)
        g = cat([as_sequence(r.grad) for r in records if r.grad is not None], 1)
        return self.pair(a, g)


__all__ = ["LINEAR_TYPES", "LinearGhostLayer"]
