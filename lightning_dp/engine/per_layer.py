"""Per-layer clipping, a collaborator of the engine template :class:`~lightning_dp.engine.base.ClippingEngine`.

Under ``clipping="per_layer"`` each parameter group (:attr:`PerLayerClipper.clipping_groups`: a hooked layer's trained
parameters, layers sharing a parameter merged, and each broadcast parameter alone) is bounded by its own ``C_l``
(``C/√L`` by default, :func:`lightning_dp.clipping.per_layer_bound`). Since a group's clip factor depends on that group
alone, a group can be clipped as soon as its layer has all its output gradients: after the first ``"per_layer"`` call
(and once the autograd cross-check has run), the engine hands each complete group to :meth:`PerLayerClipper.clip_now`
from its backward hook and frees it, so a micro-batch's per-sample records never all live at once. The clipped sums
wait in a pending sum that the engine adds to its running sum once the micro-batch is done
(:meth:`PerLayerClipper.finish`), after the non-finite examples are counted.

The mode and bounds are fixed at capture time (:meth:`PerLayerClipper.start`); a call of ``clip_and_accumulate`` with
another mode or bound than the micro-batch was clipped with in backward is an error
(:meth:`PerLayerClipper.check_mode`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_dp.clipping import clip_factors, per_layer_bound
from lightning_dp.engine.contributions import (
    Contribution,
    PerSampleGradients,
    add_into,
    rounding_bound,
    squared_norms,
)
from lightning_dp.errors import DPMisconfigurationError


@dataclass(frozen=True)
class ClippingGroups:
    """The parameter groups of per-layer clipping, fixed by the model.

    Attributes:
        ids: per trained parameter, the index of its group.
        groups: the groups' parameters, broadcast parameters first (one each).
        shared: the indices of the groups owned by several modules (their layers' contributions are merged first).
    """

    ids: dict[nn.Parameter, int]
    groups: list[tuple[nn.Parameter, ...]]
    shared: set[int]

    @classmethod
    def plan(cls, module: nn.Module, params: list[nn.Parameter], broadcast: Sequence[nn.Parameter]) -> ClippingGroups:
        """Group the trained ``params`` of ``module``: each broadcast parameter alone, every other parameter with the
        other trained parameters of the module(s) owning it (modules sharing one are merged).
        """
        trained = set(params)
        broadcast_params = list(dict.fromkeys(p for p in broadcast if p in trained))
        broadcast_set = set(broadcast_params)
        parent: dict[int, int] = {}

        def root(x: int) -> int:
            while parent.setdefault(x, x) != x:
                x = parent[x]
            return x

        owner: dict[nn.Parameter, int] = {}
        shared: set[nn.Parameter] = set()
        for mod in module.modules():
            for p in mod._parameters.values():
                if p is None or p not in trained or p in broadcast_set:
                    continue
                if p in owner:
                    parent[root(owner[p])] = root(id(mod))
                    shared.add(p)
                owner[p] = id(mod)
                parent[root(id(mod))] = root(id(mod))
        members: dict[int, list[nn.Parameter]] = {}
        for p in params:
            if p in owner:
                members.setdefault(root(owner[p]), []).append(p)
        groups = [(p,) for p in broadcast_params] + [tuple(ps) for ps in members.values()]
        ids = {p: i for i, ps in enumerate(groups) for p in ps}
        return cls(ids, groups, {ids[p] for p in shared})


@dataclass(frozen=True)
class PerLayerResult:
    """What :meth:`PerLayerClipper.finish` gives back to the engine for one micro-batch.

    Attributes:
        norms: the per-sample norms over all groups, ``(b,)``, fp32 (NaN/inf for a non-finite example).
        nonfinite: ``(b,)`` booleans, True for an example with a non-finite norm in some group.
        summed: the micro-batch's clipped sum per parameter.
    """

    norms: Tensor
    nonfinite: Tensor
    summed: dict[nn.Parameter, Tensor]


class PerLayerClipper:
    """Per-layer clipping for one engine: the clipping groups, their bounds and the clipping in backward.

    Args:
        module: the engine's model.
        params: its trained parameters.
        broadcast: its broadcast parameters (each one clipping group).
        param_names: a name per parameter (diagnostics).
        owner: the engine's name (diagnostics).

    Attributes:
        last_group_norms: per-sample norms of each clipping group (shape ``(b, L)``) of the last micro-batch clipped
            per layer; None after a flat-norm call.
    """

    def __init__(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        broadcast: Sequence[nn.Parameter],
        param_names: dict[nn.Parameter, str],
        owner: str,
    ) -> None:
        self._plan = ClippingGroups.plan(module, params, broadcast)
        self._param_names = param_names
        self._owner = owner
        self._device = params[0].device
        self._batch_size = 0
        self._scale = 1.0
        self._per_layer_c: float | None = None  # the per-layer C seen last: clip in backward from the next capture
        self._inline_c: float | None = None  # the C this capture clips with in backward (None: not in backward)
        self._group_bounds: tuple[float, ...] | None = None  # per-layer bounds C_l by group (None: C/√L each)
        self._inline_bounds: tuple[float, ...] | None = None  # the C_l this capture clips with in backward
        self._pending: dict[nn.Parameter, Tensor] = {}
        self._pending_sq: Tensor | None = None
        self._pending_bad: Tensor | None = None
        self._pending_group_sq: dict[int, Tensor] = {}
        self.last_group_norms: Tensor | None = None

    # ------------------------------------------------------------------ groups
    @property
    def clipping_groups(self) -> list[tuple[str, ...]]:
        """The parameter groups (parameter names), in the order of :meth:`set_bounds`."""
        return [tuple(self._param_names.get(p, "?") for p in group) for group in self._plan.groups]

    @property
    def group_bounds(self) -> tuple[float, ...] | None:
        """The bounds ``C_l`` set by :meth:`set_bounds` (None: ``C/√L`` each)."""
        return self._group_bounds

    @property
    def in_backward(self) -> bool:
        """Whether this capture clips complete groups in backward (:meth:`clip_now`)."""
        return self._inline_c is not None

    @property
    def pending_sq(self) -> Tensor | None:
        """The per-sample squared norms of the groups clipped so far in this micro-batch (None: none yet)."""
        return self._pending_sq

    def group_id(self, group: Contribution) -> int:
        """The clipping group of ``group``'s parameters.

        Raises:
            RuntimeError: if they lie in several clipping groups (an engine bug).
        """
        ids = {self._plan.ids[p] for p in group.params}
        if len(ids) != 1:
            raise RuntimeError(
                f"{self._owner} gave the group {group.name!r} with parameters of {len(ids)} clipping groups;"
                " a contribution must lie within one layer's parameters (or one shared-parameter group)."
            )
        return ids.pop()

    def split(self, group: Contribution) -> list[Contribution]:
        """``group`` as pieces that each lie within one clipping group: a fallback unit's per-sample gradients may
        span several layers (their norms are then summed per clipping group, as for any group split in pieces).
        """
        if len({self._plan.ids[p] for p in group.params}) <= 1 or not isinstance(group, PerSampleGradients):
            return [group]
        pieces: dict[int, dict[nn.Parameter, Tensor]] = {}
        for p, gs in group.grads.items():
            pieces.setdefault(self._plan.ids[p], {})[p] = gs
        return [PerSampleGradients(f"{group.name}[{i}]", grads) for i, grads in pieces.items()]

    def clips_in_backward(self, group: Contribution) -> bool:
        """A group is clipped in backward if it is a whole clipping group of one layer and not tiny: per-sample
        gradients of vector parameters only (norm scales, biases) are as small as a row of activations and wait for
        clipping time, where all waiting groups share one host synchronisation.
        """
        gid = self.group_id(group)
        if gid in self._plan.shared or set(group.params) != set(self._plan.groups[gid]):
            return False
        return not (isinstance(group, PerSampleGradients) and all(p.dim() <= 1 for p in group.params))

    # ------------------------------------------------------------------ configuration
    def set_bounds(self, max_grad_norm: float, group_bounds: Sequence[float] | None = None) -> None:
        """Set C and the groups' bounds of the next captures (see ``ClippingEngine.set_clipping_bound``).

        Raises:
            DPMisconfigurationError: for bounds that are not one positive finite number per group, or whose root sum
                of squares exceeds C.
        """
        if group_bounds is not None:
            bounds = tuple(float(b) for b in group_bounds)
            count = len(self._plan.groups)
            if len(bounds) != count or not all(b > 0 and math.isfinite(b) for b in bounds):
                raise DPMisconfigurationError(
                    f"Per-layer clipping needs one positive finite bound per clipping group ({count}"
                    f" groups: {self.clipping_groups}), got {list(bounds)}."
                )
            total = math.sqrt(sum(b * b for b in bounds))
            if total > float(max_grad_norm) * (1 + 1e-9):
                raise DPMisconfigurationError(
                    f"The per-layer bounds have sqrt(Σ C_l²) = {total:.6g} > max_grad_norm = {max_grad_norm}: one"
                    " example's clipped contribution could then exceed C, the sensitivity the noise is scaled to."
                    " Set max_grad_norm to at least sqrt(Σ C_l²)."
                )
            self._group_bounds = bounds
        else:
            self._group_bounds = None
        if self._per_layer_c is not None:
            self._per_layer_c = float(max_grad_norm)

    def record_mode(self, clipping: str, max_grad_norm: float) -> None:
        """After a clipped micro-batch: per-layer clipping runs in backward from the next capture on; any other mode
        (a norm over all groups) stops it.
        """
        if clipping == "per_layer":
            self._per_layer_c = float(max_grad_norm)
            return
        self._per_layer_c = None
        self.last_group_norms = None

    # ------------------------------------------------------------------ one micro-batch
    def start(self, batch_size: int, scale: float, device: torch.device, checking: bool) -> None:
        """At capture: reset the pending sum and fix the mode and bounds of clipping in backward.

        Args:
            batch_size: the micro-batch's number of examples.
            scale: the factor from the loss's per-sample gradients to the examples' (``b`` for a mean loss).
            device: where the norms live.
            checking: the autograd cross-check runs on this micro-batch (it needs the groups: none is clipped in
                backward).
        """
        self.reset()
        self._batch_size, self._scale, self._device = batch_size, scale, device
        self._inline_c = None if checking else self._per_layer_c
        self._inline_bounds = self._group_bounds

    def reset(self) -> None:
        """Drop the pending sum and norms of the micro-batch."""
        self._pending = {}
        self._pending_sq = None
        self._pending_bad = None
        self._pending_group_sq = {}

    def release(self) -> None:
        """After the micro-batch: drop what it left; nothing is clipped in backward until the next :meth:`start`."""
        self.reset()
        self._inline_c = None

    def check_mode(self, max_grad_norm: float, clipping: str) -> None:
        """The micro-batch may have been clipped in backward (per-layer, with the C of the previous call).

        Raises:
            DPMisconfigurationError: if it was, with another mode or C than asked for now.
        """
        ran = self._inline_c is not None and self._pending_sq is not None
        changed = float(max_grad_norm) != self._inline_c or self._inline_bounds != self._group_bounds
        if ran and (clipping != "per_layer" or changed):
            raise DPMisconfigurationError(
                f"This micro-batch was clipped per layer during its backward pass with max_grad_norm={self._inline_c}"
                f" (the setting of the previous micro-batch), but clip_and_accumulate was called with"
                f" clipping={clipping!r}, max_grad_norm={max_grad_norm}. Per-layer clipping runs in backward, so the"
                " clipping mode and bound must stay the same between micro-batches; build a new engine to change"
                " them."
            )

    def clip_now(self, group: Contribution) -> None:
        """Clip ``group`` (a whole clipping group, see :meth:`clips_in_backward`, already masked) into the pending
        sum, from a backward hook (one host synchronisation: it must be clean before it is dropped).
        """
        if self._inline_c is None:
            raise RuntimeError(f"{self._owner}: clip_now runs only while clipping in backward (see in_backward).")
        self._clip_groups([(self.group_id(group), [group])], self._inline_c, sync_each=True)

    def finish(self, groups: list[Contribution], c: float) -> PerLayerResult:
        """Clip the groups not clipped in backward by their bounds; the micro-batch's norms and clipped sum."""
        by_id: dict[int, list[Contribution]] = {}
        for g in groups:
            for part in self.split(g):
                by_id.setdefault(self.group_id(part), []).append(part)
        self._clip_groups(list(by_id.items()), c, sync_each=False)
        b = self._batch_size
        device = self._device
        per_group = torch.zeros(b, len(self._plan.groups), device=device)
        for gid, gsq in self._pending_group_sq.items():
            per_group[:, gid] = gsq
        self.last_group_norms = per_group.sqrt() * self._scale
        sq = self._pending_sq if self._pending_sq is not None else torch.zeros(b, device=device)
        bad = self._pending_bad if self._pending_bad is not None else torch.zeros(b, dtype=torch.bool, device=device)
        return PerLayerResult((sq * self._scale**2).sqrt(), bad, self._pending)

    # ------------------------------------------------------------------ clipping
    def _clip_groups(self, clipping_groups: list[tuple[int, list[Contribution]]], c: float, sync_each: bool) -> None:
        """Clip each clipping group (its index and a list of its contributions) by ``C_l`` (``C/√L`` unless set by
        :meth:`set_bounds`) into the pending sum.

        Squared norms and non-finite flags accumulate in ``_pending_sq`` / ``_pending_bad`` (and per group in
        ``_pending_group_sq``). Examples with a non-finite norm in a group are zeroed out in that group; the check
        costs one host synchronisation per call, or per group with ``sync_each``.
        """
        bounds = self._inline_bounds if self._inline_c is not None else self._group_bounds
        equal = per_layer_bound(c, len(self._plan.groups))
        parts: list[tuple[list[Contribution], Tensor, float]] = []
        for gid, contributions in clipping_groups:
            sq = squared_norms(contributions, self._batch_size, self._device)
            self._pending_sq = sq if self._pending_sq is None else self._pending_sq + sq
            prior = self._pending_group_sq.get(gid)
            self._pending_group_sq[gid] = sq if prior is None else prior + sq
            bad = ~torch.isfinite(sq)
            self._pending_bad = bad if self._pending_bad is None else self._pending_bad | bad
            parts.append((contributions, sq, equal if bounds is None else bounds[gid]))
            if sync_each:
                self._clip_parts(parts)
                parts = []
        if parts:
            self._clip_parts(parts)

    def _clip_parts(self, parts: list[tuple[list[Contribution], Tensor, float]]) -> None:
        scale = self._scale
        finite = [torch.isfinite(sq) for _, sq, _ in parts]
        if bool(torch.stack([~f for f in finite]).any()):  # the one host sync of these groups
            for (contributions, _, _), keep in zip(parts, finite):
                for g in contributions:
                    g.zero_examples(keep)
        for (contributions, sq, bound), keep in zip(parts, finite):
            norms = torch.where(keep, sq, 0.0).sqrt() * scale
            r = rounding_bound(contributions)
            if r is not None:
                norms = norms + torch.where(keep, r, 0.0) * scale
            factors = clip_factors(norms, bound, "flat") * scale
            for g in contributions:
                add_into(self._pending, g.clipped_sum(factors))


__all__ = ["ClippingGroups", "PerLayerClipper", "PerLayerResult"]
