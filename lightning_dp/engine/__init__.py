"""Per-sample gradient engines, the ghost engine's per-layer classes and the registry of per-layer rules."""

from torch import nn

from lightning_dp.engine.base import NONFINITE_MODES, ClippingEngine, NonFiniteMode
from lightning_dp.engine.contributions import Contribution, PerSampleGradients
from lightning_dp.engine.ghost import GhostContribution, GhostEngine
from lightning_dp.engine.ghost_layers import GhostLayer, GhostRecord, MatmulGhostLayer, register_ghost_layer
from lightning_dp.engine.hooks import HookEngine
from lightning_dp.engine.rules import (
    GradSampleRule,
    find_rule,
    register_broadcast_parameters,
    register_grad_sampler,
)
from lightning_dp.errors import DPMisconfigurationError

#: Per-sample clipping engines by name: subclasses of :class:`ClippingEngine`, built as ``cls(module,
#: loss_reduction=..., nonfinite=...)``.
#: ``"hooks"`` instantiates every per-sample gradient; ``"ghost"`` uses ghost norms and book-keeping (one backward pass,
#: no per-sample weight gradients).
ENGINES: dict[str, type[ClippingEngine]] = {"hooks": HookEngine, "ghost": GhostEngine}


def build_engine(
    name: str, module: nn.Module, loss_reduction: str = "mean", nonfinite: NonFiniteMode = "skip"
) -> ClippingEngine:
    """Build the per-sample gradient engine ``name`` for ``module``.

    Args:
        name: a key of :data:`ENGINES`.
        module: the model whose trainable parameters are clipped per sample.
        loss_reduction: ``"mean"`` or ``"sum"`` (how the loss combines per-sample losses).
        nonfinite: ``"skip"`` (zero out and count examples with a non-finite gradient norm) or ``"error"``.

    Raises:
        DPMisconfigurationError: for an unknown engine name.
    """
    if name not in ENGINES:
        raise DPMisconfigurationError(f"Unknown engine {name!r}; choose one of {sorted(ENGINES)}.")
    return ENGINES[name](module, loss_reduction=loss_reduction, nonfinite=nonfinite)  # type: ignore[arg-type]


__all__ = [
    "ClippingEngine",
    "Contribution",
    "ENGINES",
    "GhostContribution",
    "GhostEngine",
    "GhostLayer",
    "GhostRecord",
    "GradSampleRule",
    "HookEngine",
    "MatmulGhostLayer",
    "NONFINITE_MODES",
    "NonFiniteMode",
    "PerSampleGradients",
    "build_engine",
    "find_rule",
    "register_broadcast_parameters",
    "register_ghost_layer",
    "register_grad_sampler",
]
