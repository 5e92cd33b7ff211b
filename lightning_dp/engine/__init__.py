"""Per-sample gradient engines and the registry of per-layer rules."""

from typing import Any

from torch import nn

from lightning_dp.engine.base import ClippingEngine
from lightning_dp.engine.ghost import GhostEngine
from lightning_dp.engine.hooks import HookEngine
from lightning_dp.engine.rules import (
    GradSampleRule,
    find_rule,
    register_broadcast_parameters,
    register_grad_sampler,
)
from lightning_dp.errors import DPMisconfigurationError

#: Per-sample clipping engines by name: subclasses of :class:`ClippingEngine`, built as ``cls(module,
#: loss_reduction=...)``.
#: ``"hooks"`` instantiates every per-sample gradient; ``"ghost"`` uses ghost norms and book-keeping (one backward pass,
#: no per-sample weight gradients).
ENGINES: dict[str, type] = {"hooks": HookEngine, "ghost": GhostEngine}


def build_engine(name: str, module: nn.Module, loss_reduction: str = "mean") -> Any:
    """Build the per-sample gradient engine ``name`` for ``module``.

    Raises:
        DPMisconfigurationError: for an unknown engine name.
    """
    if name not in ENGINES:
        raise DPMisconfigurationError(f"Unknown engine {name!r}; choose one of {sorted(ENGINES)}.")
    return ENGINES[name](module, loss_reduction=loss_reduction)


__all__ = [
    "ClippingEngine",
    "ENGINES",
    "GhostEngine",
    "GradSampleRule",
    "HookEngine",
    "build_engine",
    "find_rule",
    "register_broadcast_parameters",
    "register_grad_sampler",
]
