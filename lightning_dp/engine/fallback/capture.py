"""What the fallback records of one captured micro-batch: the module call stack, unit calls and traced ops.

Shared by the fallback's discovery (:mod:`~lightning_dp.engine.fallback.discovery`), its op dispatch
(:mod:`~lightning_dp.engine.fallback.dispatch`), its per-example compute (:mod:`~lightning_dp.engine.fallback.compute`)
and its diagnostics (:mod:`~lightning_dp.engine.fallback.diagnostics`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dp.engine.fallback.per_example import ForwardState
from lightning_dp.engine.fallback.tracer import Derived, OpRecord
from lightning_dp.engine.fallback.units import UnitCall


@dataclass(eq=False)
class Frame:
    """A module call in progress during the captured forward."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    in_unit: bool  #: this module or an enclosing one is a unit
    unit: bool  #: this module is the outermost unit of the stack
    state: ForwardState | None
    fold: str | None = None  #: why the examples cannot be told apart inside (set by a layer or an op)
    region: bool = False  #: the tracing mode was entered here


@dataclass
class Capture:
    """What one captured micro-batch recorded."""

    b: int
    discover: bool
    active: bool = True  #: between start() and end(): the forward and backward of the micro-batch
    frames: list[Frame] = field(default_factory=list)
    unit_calls: dict[nn.Module, list[UnitCall]] = field(default_factory=dict)
    ops: list[OpRecord] = field(default_factory=list)
    derived: dict[int, tuple[Tensor, Derived]] = field(default_factory=dict)
    constants: set[int] = field(default_factory=set)
    unresolved: str | None = None
    reenabled: list[nn.Parameter] = field(default_factory=list)
    dtypes: set[torch.dtype] = field(default_factory=set)  #: parameter and autocast dtypes of the micro-batch
    layouts: dict[nn.Module, str] = field(default_factory=dict)  #: layers whose output was not contiguous
    uses: dict[nn.Parameter, set[str]] = field(default_factory=dict)  #: modules whose ops used a parameter
    #: on a checked micro-batch, the layer calls an engine rule captured: (args, kwargs, output gradient holder)
    native_calls: dict[nn.Module, list[tuple[tuple, dict, dict[int, Tensor]]]] = field(default_factory=dict)
    inplace: list[str] = field(default_factory=list)  #: in-place traced ops (they can hide a tensor from its hooks)
    #: the trained parameter (the optimizer's) that a parameter read from a layer stands for (see
    #: :mod:`lightning_dp.engine.layout`; the identity unless the layout rekeys)
    canonical: Callable[[Tensor], nn.Parameter] | None = None
    #: under a rekeying layout, per parameter (canonical), its value as the forward used it (see :meth:`keep_value`);
    #: None: parameters are read at compute time, where they are whole and unchanged since the forward
    values: dict[nn.Parameter, Tensor] | None = None

    def fold(self, frame: Frame | None, reason: str) -> None:
        """Mark ``frame``'s module (or, outside every module, the whole forward) as folding the examples."""
        if frame is None:
            self.unresolved = self.unresolved or reason
        else:
            frame.fold = frame.fold or reason

    def stack(self) -> tuple[nn.Module, ...]:
        """The modules of the call stack, outermost first."""
        return tuple(f.module for f in self.frames)

    def model_tensor(self, x: Tensor) -> bool:
        """A parameter or buffer of the model (never batched, whatever its shape), also as another object that stands
        for a parameter (FSDP2's unsharded parameter).
        """
        if id(x) in self.constants:
            return True
        return self.canonical is not None and isinstance(x, nn.Parameter) and id(self.canonical(x)) in self.constants

    def key_of(self, p: nn.Parameter) -> nn.Parameter:
        """The trained parameter that ``p``, read from a layer now, stands for."""
        return p if self.canonical is None else self.canonical(p)

    def keep_value(self, key: nn.Parameter, live: Tensor) -> None:
        """Under a rekeying layout, keep a copy of the value of parameter ``key`` as the forward reads it (``live``,
        e.g. FSDP2's unsharded parameter, whose storage is freed once its module's forward or backward is over). Kept
        once per micro-batch (no optimizer step happens inside one); nothing is kept when ``live`` is ``key`` itself
        (a parameter outside any sharded unit is read as it is when needed).
        """
        if self.values is None or live is key or key in self.values:
            return
        self.values[key] = live.detach().clone()


def grad_hook(store: dict[int, Tensor], i: int) -> Callable[[Tensor], None]:
    """A tensor hook that adds the gradient it sees into ``store[i]``."""

    def hook(grad: Tensor) -> None:
        prev = store.get(i)
        store[i] = grad.detach() if prev is None else prev + grad.detach()

    return hook


def common_prefix(stacks: list[tuple[nn.Module, ...]]) -> tuple[nn.Module, ...]:
    """The longest call stack that every one of ``stacks`` starts with."""
    if not stacks:
        return ()
    out: list[nn.Module] = []
    for level in zip(*stacks):
        if all(m is level[0] for m in level):
            out.append(level[0])
        else:
            break
    return tuple(out)


__all__ = ["Capture", "Frame", "common_prefix", "grad_hook"]
