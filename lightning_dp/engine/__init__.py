"""Per-sample gradient engines and the registry of per-layer rules."""

from lightning_dp.engine.hooks import HookEngine
from lightning_dp.engine.rules import (
    GradSampleRule,
    find_rule,
    register_broadcast_parameters,
    register_grad_sampler,
)

__all__ = ["GradSampleRule", "HookEngine", "find_rule", "register_broadcast_parameters", "register_grad_sampler"]
