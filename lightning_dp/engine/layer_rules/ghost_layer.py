"""The per-layer interface of the ghost engine (in the manner of Opacus's ``grad_sample/``).

One small :class:`GhostLayer` subclass per layer type says how the engine turns the layer's stored calls into
per-sample squared gradient norms and a clipped sum. It lives with its layer family in
:mod:`lightning_dp.engine.layer_rules` and is registered with
:func:`~lightning_dp.engine.layer_rules.ghost_layer_registry.register_ghost_layer`.

Per micro-batch the engine calls, for each hooked layer that took part in the backward pass, as soon as the output
gradients of all the layer's calls have arrived (in the backward hook; the records are then freed)::

    captured = layer.collect(records)        # the layer's calls (inputs, output gradient) in one structure
    sq = layer.squared_norms(captured)       # (b,) fp32, or None: instantiate instead
    per_sample = layer.instantiate(captured) # only when sq is None: {param: (b, *param.shape)} fp32
    ...                                      # the engine derives clip factors f from all layers' norms
    r = layer.rounding_bound(captured)       # (b,) fp32 or None: how far rounding in clipped_sum may add
    sums = layer.clipped_sum(captured, f)    # only when sq is not None: {param: Σ_i f_i g_i} fp32
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from lightning_dp.engine.contributions import zero_examples_of


@dataclass
class GhostRecord:
    """One call of a layer during the captured forward: what :meth:`GhostLayer.keep_inputs` kept of its inputs, and
    its output gradient once backward ran (summed if the output was used several times).
    """

    inputs: list[Any]
    grad: Tensor | None = None


class GhostLayer(ABC):
    """How the ghost engine handles one layer type: one instance per hooked layer.

    A subclass implements :meth:`collect`, :meth:`squared_norms`, :meth:`instantiate` and :meth:`clipped_sum`, and may
    override :meth:`supports` (configurations it handles; others fall back to per-sample instantiation with a rule
    of :func:`~lightning_dp.engine.layer_rules.register_grad_sampler`), :meth:`keep_inputs`, :meth:`rounding_bound`
    and :meth:`zero_examples`.

    All values are as the loss gives them (the engine rescales for ``loss_reduction``); results are fp32 (the
    captured data may stay in the layer's own dtype, e.g. bf16 under autocast, when products are formed exactly:
    see :mod:`lightning_dp.engine.precision`). The captured structure should be a dataclass whose tensor fields
    (or dicts of tensors) have the examples as first dimension: the default :meth:`zero_examples` relies on it.

    Example:
        >>> @register_ghost_layer(nn.Conv1d)  # doctest: +SKIP
        ... class Conv1dGhostLayer(MatmulGhostLayer):
        ...     def collect(self, records):
        ...         ...  # unfold each call into (B, L, C·k) activations and (B, L, out) output gradients

    Attributes:
        module: the layer.
        force_instantiate: set by the engine when the layer's per-sample gradients must be materialised (a parameter
            shared with another layer, or a gradient mask): :meth:`squared_norms` must then return None.
    """

    #: the engine's ``last_methods`` label of a layer whose :meth:`squared_norms` returned None
    instantiated_label: ClassVar[str] = "instantiate"
    #: the layer's forward is one operation that autocast runs in its low-precision dtype (linear, convolution):
    #: the engine then casts the input to that dtype before the forward, so that the input :meth:`keep_inputs`
    #: keeps is the very tensor autograd saves (one copy, not two). Numerically the same as autocast's own cast.
    autocast_input: ClassVar[bool] = False

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.force_instantiate = False

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this class handles ``module``'s configuration (the module's type is already matched)."""
        return True

    @property
    def fallback_notice(self) -> str | None:
        """A name to announce once when the engine is built, if this layer loses the ghost norm's saving."""
        return None

    def trainable(self, name: str) -> nn.Parameter | None:
        """The module's direct parameter ``name`` if it exists and is trained now, else None."""
        p = getattr(self.module, name, None)
        return p if isinstance(p, nn.Parameter) and p.requires_grad else None

    def keep_inputs(self, inputs: tuple[Any, ...]) -> list[Any]:
        """What to store of a call's inputs in the forward hook (default: the inputs, detached)."""
        return [x.detach() if isinstance(x, Tensor) else x for x in inputs]

    @abstractmethod
    def collect(self, records: list[GhostRecord]) -> Any:
        """Bring the layer's calls of one micro-batch (each with its output gradient) into one captured structure.

        Args:
            records: the calls, in forward order; every ``record.grad`` is set.
        """

    @abstractmethod
    def squared_norms(self, captured: Any) -> Tensor | None:
        """Per-sample squared gradient norms over the layer's trained parameters, shape ``(b,)``, fp32; or None
        when the per-sample gradients are to be instantiated (cheaper, or :attr:`force_instantiate`).
        """

    @abstractmethod
    def instantiate(self, captured: Any) -> dict[nn.Parameter, Tensor]:
        """Per-sample gradients ``{param: (b, *param.shape)}`` (fp32) of the layer's trained parameters."""

    @abstractmethod
    def clipped_sum(self, captured: Any, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        """``Σ_i factors_i · g_i`` per trained parameter (fp32, the parameter's shape), without per-sample
        gradients where possible.

        Args:
            captured: from :meth:`collect`.
            factors: ``(b,)`` fp32 per-sample factors.
        """

    def rounding_bound(self, captured: Any) -> Tensor | None:
        """A per-sample bound ``r_i`` such that :meth:`clipped_sum`'s rounding moves example ``i``'s contribution by
        at most ``f_i · r_i`` (in norm, as the loss gives it), or None when the clipped sum is exact to fp32
        (default). The engine takes the clip factors from norms inflated by ``r``, so that a clipped example stays
        within its bound under rounding.
        """
        return None

    def zero_examples(self, captured: Any, keep: Tensor) -> Any:
        """``captured`` with the data of the examples where ``keep`` is False set to exactly zero (default: every
        floating tensor field of the dataclass, and of dict fields, zeroed along its first dimension).
        """
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(captured):
            value = getattr(captured, f.name)
            if isinstance(value, Tensor) and value.is_floating_point():
                changes[f.name] = zero_examples_of(value, keep)
            elif isinstance(value, dict):
                changes[f.name] = {
                    k: zero_examples_of(v, keep) if isinstance(v, Tensor) and v.is_floating_point() else v
                    for k, v in value.items()
                }
        return dataclasses.replace(captured, **changes)


__all__ = ["GhostLayer", "GhostRecord"]
