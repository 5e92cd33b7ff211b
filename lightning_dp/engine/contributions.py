"""What an engine hands to :meth:`ClippingEngine.clip_and_accumulate` for one captured micro-batch.

A *contribution* is one parameter group's share of the micro-batch (a layer, or a broadcast parameter): its
per-sample squared gradient norms and a way to form its clipped sum ``Σ_i f_i g_i``. The engine base combines the
groups' squared norms into per-sample norms (their sum, for flat clipping), derives the clip factors and asks each
group for its clipped sum; it never needs to know how a group obtained its norms.

Two kinds exist: :class:`PerSampleGradients` holds materialised per-sample gradients (the base can mask them and
zero examples in them itself); an engine may add its own kinds that keep less (the ghost engine keeps activations
and output gradients only, see :class:`~lightning_dp.engine.ghost.GhostContribution`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn
from typing_extensions import override


def zero_examples_of(x: Tensor, keep: Tensor) -> Tensor:
    """``x`` (batch first) with the rows of examples where ``keep`` is False set to exactly zero.

    ``torch.where`` rather than a multiplication by 0: ``0 · NaN`` and ``0 · inf`` are NaN.

    Args:
        x: a tensor whose first dimension indexes the examples.
        keep: ``(b,)`` booleans, True for the examples to keep.
    """
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))


class Contribution(ABC):
    """One parameter group's share of a captured micro-batch of ``b`` examples.

    Values are as the loss gives them: for ``loss_reduction="mean"`` the per-sample gradients are those of the mean
    loss (the base rescales by ``b``). Parameter groups of one micro-batch are disjoint: a parameter used by two
    layers (weight tying) is one group (see :func:`merge_shared`).

    Attributes:
        name: the group's label, e.g. the layer's module name (for diagnostics and, later, per-layer bounds).
    """

    name: str

    @property
    @abstractmethod
    def params(self) -> tuple[nn.Parameter, ...]:
        """The parameters this group has gradients for."""

    @abstractmethod
    def squared_norms(self) -> Tensor:
        """Per-sample squared L2 norms of the group's gradients, shape ``(b,)``, fp32."""

    @abstractmethod
    def clipped_sum(self, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        """``Σ_i factors_i · g_i`` per parameter of the group (fp32, the parameter's shape).

        Args:
            factors: ``(b,)`` fp32 per-sample factors.
        """

    def rounding_bounds(self) -> Tensor | None:
        """Per-sample ``r_i`` (``(b,)`` fp32, as the loss gives it) such that rounding inside :meth:`clipped_sum`
        moves example ``i``'s contribution by at most ``factors_i · r_i`` in norm; None (default) when the clipped
        sum is exact to fp32. The engine takes the clip factors from norms inflated by it.
        """
        return None

    @abstractmethod
    def zero_examples(self, keep: Tensor) -> None:
        """Set the stored data of the examples where ``keep`` is False to exactly zero, so that they add exactly
        nothing to the clipped sum whatever their factor (a NaN row times 0 is still NaN).

        Args:
            keep: ``(b,)`` booleans.
        """

    def rekey(self, key: Callable[[Tensor], nn.Parameter]) -> None:
        """Name the group's parameters by ``key(p)`` from now on (the trained parameters, where a layer handed over
        other objects: FSDP2's unsharded parameters, see :mod:`lightning_dp.engine.layout`).

        Raises:
            TypeError: if the group holds a parameter that ``key`` renames and cannot be renamed.
        """
        if any(key(p) is not p for p in self.params):
            raise TypeError(f"{type(self).__name__} cannot rename its parameters (needed for sharded parameters).")

    def materialize(self) -> PerSampleGradients:
        """The group's per-sample gradients, materialised (needed when a parameter of the group is shared with
        another group, e.g. a weight used both by its layer and by an op elsewhere).

        Raises:
            RuntimeError: if the group cannot instantiate its per-sample gradients.
        """
        raise RuntimeError(
            f"Parameter group {self.name!r} ({type(self).__name__}) shares a parameter with another group but cannot"
            " materialise its per-sample gradients; the engine must instantiate every layer of a shared parameter."
        )


class PerSampleGradients(Contribution):
    """Materialised per-sample gradients ``{p: (b, *p.shape)}`` (fp32) of one parameter group.

    Args:
        name: the group's label.
        grads: per parameter, its per-sample gradients.
    """

    def __init__(self, name: str, grads: dict[nn.Parameter, Tensor]) -> None:
        self.name = name
        self.grads = grads
        self._squared: Tensor | None = None

    @property
    @override
    def params(self) -> tuple[nn.Parameter, ...]:
        return tuple(self.grads)

    @override
    def squared_norms(self) -> Tensor:
        if self._squared is None:
            sq: Tensor | None = None
            for gs in self.grads.values():
                part = gs.reshape(gs.shape[0], -1).pow(2).sum(1, dtype=torch.float32)
                sq = part if sq is None else sq + part
            assert sq is not None, "a contribution has at least one parameter"
            self._squared = sq
        return self._squared

    @override
    def clipped_sum(self, factors: Tensor) -> dict[nn.Parameter, Tensor]:
        return {p: torch.einsum("i,i...->...", factors, gs) for p, gs in self.grads.items()}

    @override
    def zero_examples(self, keep: Tensor) -> None:
        self.grads = {p: zero_examples_of(gs, keep) for p, gs in self.grads.items()}
        self._squared = None

    @override
    def materialize(self) -> PerSampleGradients:
        return self

    @override
    def rekey(self, key: Callable[[Tensor], nn.Parameter]) -> None:
        grads: dict[nn.Parameter, Tensor] = {}
        for p, gs in self.grads.items():
            k = key(p)
            grads[k] = gs if k not in grads else grads[k] + gs
        self.grads = grads

    def mask(self, masks: dict[nn.Parameter, Tensor]) -> bool:
        """Multiply the per-sample gradients of masked parameters by their 0/1 masks (broadcast over the batch).

        Returns:
            Whether any parameter of the group was masked.
        """
        masked = False
        for p, gs in self.grads.items():
            m = masks.get(p)
            if m is not None:
                self.grads[p] = gs * m.to(gs.device, gs.dtype).unsqueeze(0)
                masked = True
        if masked:
            self._squared = None
        return masked

    def add(self, other: PerSampleGradients) -> None:
        """Merge ``other``'s per-sample gradients into this group (summing those of shared parameters)."""
        for p, gs in other.grads.items():
            prev = self.grads.get(p)
            self.grads[p] = gs if prev is None else prev + gs
        self.name = f"{self.name}+{other.name}"
        self._squared = None


def merge_shared(contributions: list[Contribution]) -> list[Contribution]:
    """Merge the groups that share a parameter, so that the groups are disjoint (a per-sample norm is the norm of
    the *sum* of a shared parameter's per-layer gradients, not the sum of their norms).

    Groups without materialised per-sample gradients are materialised (:meth:`Contribution.materialize`) when they
    share a parameter.

    Raises:
        RuntimeError: if a group sharing a parameter cannot materialise its per-sample gradients.
    """
    owner: dict[nn.Parameter, int] = {}
    out: list[Contribution | None] = []
    for c in contributions:
        hits = sorted({owner[p] for p in c.params if p in owner})
        if not hits:
            owner.update(dict.fromkeys(c.params, len(out)))
            out.append(c)
            continue
        group = [g.materialize() for g in [out[i] for i in hits] + [c] if g is not None]
        target = group[0]
        for g in group[1:]:
            target.add(g)
        out[hits[0]] = target
        for i in hits[1:]:
            out[i] = None
        owner.update(dict.fromkeys(target.params, hits[0]))
    return [c for c in out if c is not None]


def apply_masks(groups: list[Contribution], masks: dict[nn.Parameter, Tensor], owner: str) -> bool:
    """Mask the per-sample gradients of the masked parameters in ``groups``; whether any group changed.

    Args:
        groups: the micro-batch's contributions.
        masks: per parameter, a 0/1 tensor broadcastable to its shape.
        owner: the engine's name (diagnostics).

    Raises:
        RuntimeError: if a masked parameter is in a group without materialised per-sample gradients.
    """
    if not masks:
        return False
    changed = False
    for g in groups:
        if isinstance(g, PerSampleGradients):
            changed |= g.mask(masks)
        elif any(p in masks for p in g.params):
            raise RuntimeError(
                f"{owner} gave the masked parameter group {g.name!r} as {type(g).__name__};"
                " a masked group must be PerSampleGradients (masks act on per-sample gradient coordinates)."
            )
    return changed


def squared_norms(groups: list[Contribution], b: int, device: torch.device) -> Tensor:
    """Per-sample squared norms over all ``groups`` (the sum of the groups'), ``(b,)`` in fp32."""
    sq = torch.zeros(b, device=device, dtype=torch.float32)
    for g in groups:
        sq += g.squared_norms()
    return sq


def rounding_bound(groups: list[Contribution]) -> Tensor | None:
    """``sqrt(Σ_groups r_g²)``: a bound on how far the groups' clipped sums may move an example by rounding, per unit
    of its factor (None if every group's sum is exact to fp32).
    """
    parts = [r for r in (g.rounding_bounds() for g in groups) if r is not None]
    if not parts:
        return None
    return torch.stack(parts).pow(2).sum(0).sqrt()


def add_into(target: dict[nn.Parameter, Tensor], sums: dict[nn.Parameter, Tensor]) -> None:
    """Add ``sums`` (per parameter) into the running sums ``target`` (a parameter seen first is stored as is)."""
    for p, value in sums.items():
        acc = target.get(p)
        target[p] = value if acc is None else acc + value


__all__ = [
    "Contribution",
    "PerSampleGradients",
    "add_into",
    "apply_masks",
    "merge_shared",
    "rounding_bound",
    "squared_norms",
    "zero_examples_of",
]
