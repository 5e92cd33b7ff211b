"""Where a trained parameter's values and gradients live: one process (every tensor whole) or sharded (FSDP2).

The engines name parameters by the ``nn.Parameter`` objects of the module they were built on, the ones the optimizer
steps. A layer rule reads its parameters from the layer when it runs; under FSDP2 (``fully_shard``) those are other
objects (the all-gathered, unsharded parameters) while forward and backward run, and autograd's gradient of a
micro-batch is on them, whole, not on the sharded parameter. A :class:`ParameterLayout` tells the engine template how
to go from one to the other; :class:`LocalLayout` is the identity of one process or DDP, and
``lightning_dp.fully_sharded.FullyShardedLayout`` is FSDP2's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class ParameterLayout(Protocol):
    """How the engine template finds a trained parameter and its micro-batch gradient."""

    @property
    def rekeys(self) -> bool:
        """Whether a layer may hand over another object than the trained parameter (then :meth:`canonical` runs)."""
        ...

    def canonical(self, p: Tensor) -> nn.Parameter:
        """The trained parameter (the one the optimizer holds) that ``p``, read from a layer, stands for."""
        ...

    def autograd_grad(self, p: nn.Parameter) -> Tensor | None:
        """Autograd's gradient of ``p`` for this process's micro-batch, whole (the parameter's full shape), or None."""
        ...

    def clear_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Drop every gradient autograd left for ``params`` (it is not private: it must not reach the optimizer)."""
        ...

    def zeros(self, p: nn.Parameter) -> Tensor:
        """fp32 zeros of ``p``'s whole shape (the clipped sum of a parameter that no example touched)."""
        ...

    def aliases(self, p: nn.Parameter) -> list[Tensor]:
        """The other objects that stand for ``p`` in the layers now (their ``requires_grad`` follows ``p``'s)."""
        ...


class LocalLayout:
    """Every parameter whole in this process (one device, or DDP): the identity."""

    rekeys = False

    def canonical(self, p: Tensor) -> nn.Parameter:
        """``p`` itself."""
        return p  # type: ignore[return-value]

    def autograd_grad(self, p: nn.Parameter) -> Tensor | None:
        """``p.grad``."""
        return p.grad

    def clear_grads(self, params: Iterable[nn.Parameter]) -> None:
        """Set ``p.grad`` to None."""
        for p in params:
            p.grad = None

    def zeros(self, p: nn.Parameter) -> Tensor:
        """``zeros_like(p)`` in fp32."""
        return torch.zeros_like(p, dtype=torch.float32)

    def aliases(self, p: nn.Parameter) -> list[Tensor]:
        """None: the layers use ``p`` itself."""
        return []


__all__ = ["LocalLayout", "ParameterLayout"]
