"""``nn.Linear`` in the ghost engine: any input rank ``(B, ..., d)``, the middle dimensions being the sequence."""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from typing_extensions import override

from lightning_dp.engine.ghost_layers.base import GhostRecord, register_ghost_layer
from lightning_dp.engine.ghost_layers.matmul import MatmulCaptured, MatmulGhostLayer, as_sequence, cat


def _linear_types() -> tuple[type[nn.Module], ...]:
    try:
        from timm.layers import Linear as TimmLinear  # same math as nn.Linear (a cast under torchscript only)
    except ImportError:  # pragma: no cover - timm is a dependency
        return (nn.Linear,)
    return (nn.Linear, TimmLinear)


@register_ghost_layer(*_linear_types())
class LinearGhostLayer(MatmulGhostLayer):
    """``y = x Wᵀ + b``: the calls concatenated along the sequence."""

    autocast_input: ClassVar[bool] = True

    @override
    def collect(self, records: list[GhostRecord]) -> MatmulCaptured:
        a = cat([as_sequence(r.inputs[0]) for r in records], 1)
        g = cat([as_sequence(r.grad) for r in records if r.grad is not None], 1)
        return self.pair(a, g)


__all__ = ["LinearGhostLayer"]
