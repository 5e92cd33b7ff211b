"""The universal per-sample gradient fallback: ``torch.func`` for every parameter that no layer rule covers.

See :mod:`lightning_dp.engine.fallback.planner` for where it applies (ops, or the smallest module that keeps the batch
first), :mod:`~lightning_dp.engine.fallback.tracer` and :mod:`~lightning_dp.engine.fallback.units` for how.
"""

from lightning_dp.engine.fallback.mha import MultiheadAttentionRule  # registers the native MHA rule
from lightning_dp.engine.fallback.per_example import BatchedArg, Fingerprint, ForwardState, per_example_vjp
from lightning_dp.engine.fallback.planner import FunctionalFallback
from lightning_dp.engine.fallback.units import (
    UnitCall,
    UnitRule,
    register_batch_dims,
    register_unit_rule,
    unit_rule_for,
)

__all__ = [
    "BatchedArg",
    "Fingerprint",
    "ForwardState",
    "FunctionalFallback",
    "MultiheadAttentionRule",
    "UnitCall",
    "UnitRule",
    "per_example_vjp",
    "register_batch_dims",
    "register_unit_rule",
    "unit_rule_for",
]
