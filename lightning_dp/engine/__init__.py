"""Per-sample gradient engines: per-example norms and the clipped sum of a captured micro-batch.

What lives where:

- :mod:`~lightning_dp.engine.base`: the template :class:`ClippingEngine` (its final methods own the privacy rules);
  :mod:`~lightning_dp.engine.hooks` and :mod:`~lightning_dp.engine.ghost`: the two engines (:data:`ENGINES`).
- :mod:`~lightning_dp.engine.contributions`: what an engine hands to the template per parameter group.
- :mod:`~lightning_dp.engine.per_layer`: per-layer clipping (groups, bounds, clipping in backward), a collaborator
  of the template; :mod:`~lightning_dp.engine.nonfinite`: non-finite examples (zeroed and counted, or an error);
  :mod:`~lightning_dp.engine.crosscheck`: the check of per-sample sums against autograd;
  :mod:`~lightning_dp.engine.layout`: where parameters and their gradients live (whole, or sharded by FSDP2).
- :mod:`~lightning_dp.engine.layers`: which layers an engine hooks, broadcast parameters, capture checks;
  :mod:`~lightning_dp.engine.precision`: rounding bounds of the clipped sums.
- :mod:`~lightning_dp.engine.layer_rules`: the per-sample maths of layers, one module per layer family, and the
  registries that find them.
- :mod:`~lightning_dp.engine.fallback`: ``torch.func`` for whatever no layer rule covers.

Where a new layer type's rule goes: one registry per kind of rule, each with one decorator or function; a layer
family's maths (all its kinds of rule) in one module of :mod:`~lightning_dp.engine.layer_rules` named for the family
(``linear``, ``conv``, ``embedding``, ``embedding_bag``, ``norms``, ``scales``, ``broadcast_tokens``), imported by
that package's ``__init__`` so that it registers.

- Per-sample gradients of a layer (the hooks engine, and the ghost engine for layers without a ghost layer):
  :func:`register_grad_sampler` (:mod:`~lightning_dp.engine.layer_rules.grad_sampler_registry`). Opacus's
  registered grad samplers are used after ours.
- Ghost norms and book-keeping of a layer (the ghost engine): a :class:`GhostLayer` subclass with
  :func:`register_ghost_layer` (:mod:`~lightning_dp.engine.layer_rules.ghost_layer_registry`).
- Raw parameters broadcast along the batch (``cls_token``): :func:`register_broadcast_parameters`
  (:mod:`~lightning_dp.engine.layer_rules.broadcast_registry`).
- Modules recomputed per example as a whole (RNNs, attention): ``register_unit_rule``, and their batch dimensions
  ``register_batch_dims`` (:mod:`~lightning_dp.engine.fallback.units`).
- Closed-form per-sample rules of single ops met by traced parameters: ``register_op_rule``
  (:mod:`~lightning_dp.engine.fallback.op_rules`).

A layer without any rule needs nothing: the fallback covers it, and the first micro-batch is checked against autograd.
"""

from torch import nn

from lightning_dp.engine.base import NONFINITE_MODES, ClippingEngine, NonFiniteMode
from lightning_dp.engine.contributions import Contribution, PerSampleGradients
from lightning_dp.engine.ghost import GhostContribution, GhostEngine
from lightning_dp.engine.hooks import HookEngine
from lightning_dp.engine.layer_rules import (
    GhostLayer,
    GhostRecord,
    GradSampleRule,
    MatmulGhostLayer,
    find_rule,
    register_broadcast_parameters,
    register_ghost_layer,
    register_grad_sampler,
)
from lightning_dp.engine.layout import LocalLayout, ParameterLayout
from lightning_dp.errors import DPMisconfigurationError

#: Per-sample clipping engines by name: subclasses of :class:`ClippingEngine`, built as ``cls(module,
#: loss_reduction=..., nonfinite=...)``.
#: ``"hooks"`` instantiates every per-sample gradient; ``"ghost"`` uses ghost norms and book-keeping (one backward pass,
#: no per-sample weight gradients).
ENGINES: dict[str, type[ClippingEngine]] = {"hooks": HookEngine, "ghost": GhostEngine}


def build_engine(
    name: str,
    module: nn.Module,
    loss_reduction: str = "mean",
    nonfinite: NonFiniteMode = "skip",
    layout: ParameterLayout | None = None,
) -> ClippingEngine:
    """Build the per-sample gradient engine ``name`` for ``module``.

    Args:
        name: a key of :data:`ENGINES`.
        module: the model whose trainable parameters are clipped per sample.
        loss_reduction: ``"mean"`` or ``"sum"`` (how the loss combines per-sample losses).
        nonfinite: ``"skip"`` (zero out and count examples with a non-finite gradient norm) or ``"error"``.
        layout: where the parameters live (default: whole in this process; see :mod:`~lightning_dp.engine.layout`).

    Raises:
        DPMisconfigurationError: for an unknown engine name.
    """
    if name not in ENGINES:
        raise DPMisconfigurationError(f"Unknown engine {name!r}; choose one of {sorted(ENGINES)}.")
    return ENGINES[name](module, loss_reduction=loss_reduction, nonfinite=nonfinite, layout=layout)  # type: ignore[arg-type]


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
    "LocalLayout",
    "ParameterLayout",
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
