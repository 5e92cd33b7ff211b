"""The abstract per-sample clipping engine: one template method owns the privacy rules, subclasses the mechanics.

:meth:`ClippingEngine.clip_and_accumulate` is final. For every engine it runs, in this order: fp32 matmuls without
TF32; gathering the subclass's per-sample contributions (per parameter group, see
:mod:`lightning_dp.engine.contributions`); the cross-check of their sums against autograd (first micro-batch);
gradient masks; non-finite examples (zeroed out and counted, or an error); norms and clip factors
(:mod:`lightning_dp.clipping`); the clipped sum; clearing ``p.grad``; freeing what the capture stored. A subclass
only says how it captures a micro-batch and how its per-sample squared norms and ``Σ_i f_i g_i`` are formed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, final

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dp.clipping import ClippingMode, clip_factors, per_layer_bound
from lightning_dp.engine.contributions import Contribution, PerSampleGradients, merge_shared
from lightning_dp.engine.fallback import FunctionalFallback
from lightning_dp.engine.layers import (
    BroadcastParameter,
    check_sums_against_autograd,
    check_tolerance,
    full_precision_matmuls,
    in_backward,
    per_sample_broadcast,
    trainable_parameters,
)
from lightning_dp.errors import DPMisconfigurationError, NonFiniteGradientError, UnsupportedLayerError

NonFiniteMode = Literal["skip", "error"]
NONFINITE_MODES = ("skip", "error")

#: Methods of :class:`ClippingEngine` that own the privacy rules; a subclass that overrides one fails to define.
_FINAL_METHODS = ("clip_and_accumulate", "probe_norms", "capture", "pop_summed", "pop_nonfinite")


class ClippingEngine(ABC):
    """Base of the per-sample clipping engines.

    Per physical micro-batch of ``b`` examples::

        with engine.capture(b):
            loss = module.training_step(micro_batch)
            loss.backward()
        norms = engine.clip_and_accumulate(max_grad_norm)
        ...
        summed = engine.pop_summed()  # {param: Σ_i clip(g_i)} over all micro-batches
        skipped = engine.pop_nonfinite()  # examples zeroed out for a non-finite gradient since the last pop

    A subclass implements the mechanics only:

    - :meth:`_plan` (called by ``__init__``): choose the layers to hook; set ``self._broadcast`` (broadcast
      parameters, whose per-sample gradients the base captures, see :func:`~lightning_dp.engine.layers.plan_layers`).
    - :meth:`attach` and :attr:`layer_names`: register its hooks; name the hooked layers.
    - :meth:`_start_capture` / :meth:`_end_capture`: reset and restore its capture state around a micro-batch (the
      base's :meth:`capture` already clears ``p.grad``, sets ``_capturing`` and substitutes broadcast parameters).
    - :meth:`_contributions`: the captured micro-batch as one :class:`~lightning_dp.engine.contributions.Contribution`
      per parameter group (per layer): per-sample squared norms and a clipped-sum method. A group holding a masked
      parameter must be :class:`~lightning_dp.engine.contributions.PerSampleGradients` (masks act on coordinates).
      A subclass should instead hand each group to :meth:`_group_ready` from its backward hook as soon as the layer's
      output gradients are complete (and free the records it was formed from); :meth:`_contributions` then returns
      only the groups that never completed.
    - :meth:`_free_capture`: drop what the capture stored.

    Parameters that no layer rule covers (no rule for their layer, a weight used outside its layer's forward, a layer
    that folds the batch with another dimension) are covered by the base's
    :class:`~lightning_dp.engine.fallback.FunctionalFallback` (``torch.func`` per example, at the op that uses them
    or the smallest module that keeps the batch first); its groups join the engine's in the template.

    Non-finite examples: an example whose per-sample gradient norm is NaN or infinite (a NaN/inf input row, a
    ``log(0)`` loss, an overflow; also a finite gradient whose squared norm overflows fp32) adds exactly zero to the
    clipped sum: its stored rows are zeroed (``torch.where``, as ``0 · NaN = NaN``), its factor is computed from a
    zero norm, and it is counted in :attr:`last_nonfinite` and the running count :meth:`pop_nonfinite`. The norms
    returned keep its NaN/inf entry. With ``nonfinite="error"`` a :class:`~lightning_dp.errors.NonFiniteGradientError`
    is raised instead. The autograd cross-check is deferred to the next micro-batch when the current one has a
    non-finite example (autograd's ``p.grad`` then sums a NaN/inf and cannot be compared).

    Args:
        module: the model whose trainable parameters are clipped per sample.
        loss_reduction: ``"mean"`` if the loss averages per-sample losses over the micro-batch (per-sample
            gradients are then rescaled by ``b``), ``"sum"`` if it sums them.
        nonfinite: ``"skip"`` (default) zeroes out and counts examples with a non-finite per-sample gradient norm;
            ``"error"`` raises :class:`~lightning_dp.errors.NonFiniteGradientError`.

    Per-layer clipping: see the module docstring. The parameter groups (:attr:`clipping_groups`) are fixed by the
    model: each hooked layer's trained parameters (layers sharing a parameter form one group) and each broadcast
    parameter. In this mode an example whose norm is non-finite in a group adds exactly zero *in that group* (and is
    counted once); its other groups are clipped as usual.

    Attributes:
        check_against_autograd: on the next micro-batch without non-finite examples, check that the engine's
            per-sample gradients add up to autograd's ``p.grad`` (once per run; reset after the check).
        grad_masks: per parameter, the 0/1 mask applied to its per-sample gradients (see :meth:`set_grad_masks`).
        last_nonfinite: how many examples of the last clipped micro-batch had a non-finite gradient norm.

    Raises:
        UnsupportedLayerError: if a trainable parameter belongs to a layer without a per-sample method.
        DPMisconfigurationError: if the module has no trainable parameter.
        ValueError: for an unknown ``loss_reduction`` or ``nonfinite``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        overridden = [name for name in _FINAL_METHODS if name in vars(cls)]
        if overridden:
            raise TypeError(
                f"{cls.__name__} overrides {overridden}: these ClippingEngine methods own the privacy rules and are"
                " final; implement _contributions / _start_capture / _end_capture / _free_capture instead."
            )

    def __init__(
        self,
        module: nn.Module,
        loss_reduction: Literal["mean", "sum"] = "mean",
        nonfinite: NonFiniteMode = "skip",
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}.")
        self.module = module
        self.loss_reduction = loss_reduction
        self.nonfinite = nonfinite
        self.params: list[nn.Parameter] = trainable_parameters(module)
        self.param_names: dict[nn.Parameter, str] = {}
        for name, p in module.named_parameters():
            self.param_names.setdefault(p, name)
        self._layers: list[Any] = []
        self._broadcast: list[BroadcastParameter] = []
        self._broadcast_grads: dict[nn.Parameter, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._capturing = False
        self._batch_size = 0
        self._summed: dict[nn.Parameter, Tensor] = {}
        self._nonfinite_count = 0
        self.last_nonfinite = 0
        self.check_against_autograd = True
        self.grad_masks: dict[nn.Parameter, Tensor] = {}
        self._ready: list[Contribution] = []
        self._per_layer_c: float | None = None  # the per-layer C seen last: clip in backward from the next capture
        self._inline_c: float | None = None  # the C this capture clips with in backward (None: not in backward)
        self._group_bounds: tuple[float, ...] | None = None  # per-layer bounds C_l by group (None: C/√L each)
        self._inline_bounds: tuple[float, ...] | None = None  # the C_l this capture clips with in backward
        self._pending_group_sq: dict[int, Tensor] = {}
        #: per-sample norms of each clipping group (shape ``(b, L)``) of the last micro-batch clipped per layer
        self.last_group_norms: Tensor | None = None
        self._pending: dict[nn.Parameter, Tensor] = {}
        self._pending_sq: Tensor | None = None
        self._pending_bad: Tensor | None = None
        self._plan()
        self._group_ids, self._groups, self._shared_groups = self._plan_clipping_groups()
        # ---- any-model: the torch.func fallback for what the engine's layer rules do not cover
        self._fallback = FunctionalFallback(
            module,
            self.params,
            self.layer_names,
            [p for *_, p in self._broadcast],
            self.param_names,
            type(self).__name__,
        )

    # ------------------------------------------------------------------ what a subclass provides
    @abstractmethod
    def _plan(self) -> None:
        """Choose the layers to hook (``self._layers``) and the broadcast parameters (``self._broadcast``)."""

    @abstractmethod
    def attach(self) -> None:
        """Register the hooks (idempotent; handles go to ``self._handles``)."""

    @property
    @abstractmethod
    def layer_names(self) -> list[str]:
        """Names of the hooked layers (for diagnostics)."""

    def _start_capture(self) -> None:  # noqa: B027 - optional hook
        """Reset the subclass's capture state before a micro-batch's forward (``p.grad`` is already cleared)."""

    def _end_capture(self) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`_start_capture` changed, after the micro-batch's backward (also on error)."""

    @abstractmethod
    def _contributions(self) -> list[Contribution]:
        """The captured micro-batch's layer groups (broadcast parameters are added by the base).

        Called inside :func:`~lightning_dp.engine.layers.full_precision_matmuls`, after :meth:`capture` exited.
        """

    @abstractmethod
    def _free_capture(self) -> None:
        """Drop what the capture stored (activations, output gradients, per-sample gradients)."""

    # ------------------------------------------------------------------ parameter groups
    def _plan_clipping_groups(self) -> tuple[dict[nn.Parameter, int], list[tuple[nn.Parameter, ...]], set[int]]:
        """Per trained parameter its group index; the groups: each broadcast parameter alone, every other parameter
        with the other trained parameters of the module(s) owning it (modules sharing one are merged); and the
        indices of the groups owned by several modules (their layers' contributions must be merged first).
        """
        trained = set(self.params)
        broadcast = list(dict.fromkeys(p for *_, p in self._broadcast if p in trained))
        broadcast_set = set(broadcast)
        parent: dict[int, int] = {}

        def root(x: int) -> int:
            while parent.setdefault(x, x) != x:
                x = parent[x]
            return x

        owner: dict[nn.Parameter, int] = {}
        shared: set[nn.Parameter] = set()
        for mod in self.module.modules():
            for p in mod._parameters.values():
                if p is None or p not in trained or p in broadcast_set:
                    continue
                if p in owner:
                    parent[root(owner[p])] = root(id(mod))
                    shared.add(p)
                owner[p] = id(mod)
                parent[root(id(mod))] = root(id(mod))
        members: dict[int, list[nn.Parameter]] = {}
        for p in self.params:
            if p in owner:
                members.setdefault(root(owner[p]), []).append(p)
        groups = [(p,) for p in broadcast] + [tuple(ps) for ps in members.values()]
        ids = {p: i for i, ps in enumerate(groups) for p in ps}
        return ids, groups, {ids[p] for p in shared}

    @property
    def clipping_groups(self) -> list[tuple[str, ...]]:
        """The parameter groups of per-layer clipping (parameter names), each bounded by ``C/√L`` with ``L`` their
        number (:func:`lightning_dp.clipping.per_layer_bound`), or by its own ``C_l`` (:meth:`set_clipping_bound`).
        """
        return [tuple(self.param_names.get(p, "?") for p in group) for group in self._groups]

    def _group_id(self, group: Contribution) -> int:
        ids = {self._group_ids[p] for p in group.params}
        if len(ids) != 1:
            raise RuntimeError(
                f"{type(self).__name__} gave the group {group.name!r} with parameters of {len(ids)} clipping groups;"
                " a contribution must lie within one layer's parameters (or one shared-parameter group)."
            )
        return ids.pop()

    def _split_by_clipping_group(self, group: Contribution) -> list[Contribution]:
        """``group`` as pieces that each lie within one clipping group: a fallback unit's per-sample gradients may
        span several layers (their norms are then summed per clipping group, as for any group split in pieces).
        """
        if len({self._group_ids[p] for p in group.params}) <= 1 or not isinstance(group, PerSampleGradients):
            return [group]
        pieces: dict[int, dict[nn.Parameter, Tensor]] = {}
        for p, gs in group.grads.items():
            pieces.setdefault(self._group_ids[p], {})[p] = gs
        return [PerSampleGradients(f"{group.name}[{i}]", grads) for i, grads in pieces.items()]

    @contextmanager
    def _layer_work(self, full_precision: bool = True) -> Iterator[None]:
        """For subclasses, around the per-layer work of a backward hook: no capture meanwhile (a rule that runs a
        module's forward, e.g. with ``torch.func``, must not be recorded as a call) and, if ``full_precision``,
        fp32 matmuls without TF32 (needed where norms and sums come from different products, as ghost norms).
        """
        capturing, self._capturing = self._capturing, False
        try:
            if full_precision:
                with full_precision_matmuls():
                    yield
            else:
                yield
        finally:
            self._capturing = capturing

    def _group_ready(self, group: Contribution, defer: bool = False) -> None:
        """For subclasses, from a backward hook: ``group``'s layer has all its output gradients for this micro-batch.

        With per-layer clipping in backward (see the module docstring) a whole group is clipped now into this
        micro-batch's pending sum and dropped; otherwise it is kept for :meth:`clip_and_accumulate`.

        Args:
            group: the layer's contribution (its norms may be computed now: the layer's records can be freed).
            defer: keep it for clipping time anyway (e.g. a layer sharing a parameter with another, whose groups
                are merged first).
        """
        if (
            group.params
            and self._inline_c is not None
            and not defer
            and not self._fallback.covers(group)  # replaced by its fallback unit's group: clipping it would count twice
            and self._clips_in_backward(group)
        ):
            with full_precision_matmuls():
                self._apply_masks([group])
                self._clip_groups_per_layer([(self._group_id(group), [group])], self._inline_c, sync_each=True)
        else:
            self._ready.append(group)

    def _clips_in_backward(self, group: Contribution) -> bool:
        """A group is clipped in backward if it is a whole clipping group of one layer and not tiny: per-sample
        gradients of vector parameters only (norm scales, biases) are as small as a row of activations and wait for
        clipping time, where all waiting groups share one host synchronisation.
        """
        gid = self._group_id(group)
        if gid in self._shared_groups or set(group.params) != set(self._groups[gid]):
            return False
        return not (isinstance(group, PerSampleGradients) and all(p.dim() <= 1 for p in group.params))

    # ------------------------------------------------------------------ configuration
    def set_clipping_bound(self, max_grad_norm: float, group_bounds: Sequence[float] | None = None) -> None:
        """Set the bound(s) of the next micro-batches, before their capture (when C changes between steps, e.g.
        under adaptive clipping: per-layer clipping clips in backward with the bound known at capture time).

        Args:
            max_grad_norm: C, the bound on one example's whole contribution.
            group_bounds: under per-layer clipping, the bound ``C_l`` of each of :attr:`clipping_groups` (in that
                order), with ``sqrt(Σ_l C_l²) ≤ C`` so that C stays the sensitivity; None: ``C/√L`` each.

        Raises:
            DPMisconfigurationError: for bounds that are not one positive finite number per group, or whose
                root sum of squares exceeds C.
        """
        if group_bounds is not None:
            bounds = tuple(float(b) for b in group_bounds)
            if len(bounds) != len(self._groups) or not all(b > 0 and math.isfinite(b) for b in bounds):
                raise DPMisconfigurationError(
                    f"Per-layer clipping needs one positive finite bound per clipping group ({len(self._groups)}"
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

    def set_grad_masks(self, masks: dict[nn.Parameter, Tensor]) -> None:
        """Restrict per-sample gradients to masked coordinates *before* norms and clipping (e.g. the rows kept by
        sparse fine-tuning), so the clipping budget is spent on the coordinates that are trained.

        Args:
            masks: per parameter, a 0/1 tensor broadcastable to its shape; parameters not trained are ignored.
        """
        trainable = set(self.params)
        self.grad_masks = {p: m for p, m in masks.items() if p in trainable}

    def detach(self) -> None:
        """Remove all hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._fallback.detach()

    # ------------------------------------------------------------------ capture
    def _should_capture(self, mod: nn.Module, output: Any) -> bool:
        """In a layer's forward hook: whether to record this call (capturing, with grad enabled).

        Raises:
            DPMisconfigurationError: if the forward runs during backward (activation recomputation).
            UnsupportedLayerError: if the layer's output is not a single tensor.
        """
        if not self._capturing or not torch.is_grad_enabled():
            return False
        if in_backward():
            raise DPMisconfigurationError(
                f"Layer {type(mod).__name__} ran its forward during backward: gradient checkpointing (activation"
                " recomputation) is not compatible with per-sample gradient hooks. Disable it, e.g."
                " `model.set_grad_checkpointing(False)` for timm models."
            )
        if not isinstance(output, Tensor):
            raise UnsupportedLayerError(
                f"Layer '{self._fallback.name_of(mod)}' ({type(mod).__name__}) returned {type(output).__name__}, not a"
                " tensor; its per-sample rule needs a single tensor output."
            )
        return self._fallback.accepts(mod, output)  # any-model: not inside a unit, batch first (else re-planned)

    def _check_batch_dimension(self, mod: nn.Module, grad: Tensor) -> None:
        """In a backward hook: the output gradient's first dimension must index the micro-batch's examples.

        Raises:
            DPMisconfigurationError: otherwise.
        """
        b = self._batch_size
        if grad.shape[0] != b:
            raise DPMisconfigurationError(
                f"Layer '{self._fallback.name_of(mod)}' ({type(mod).__name__}) saw a batch dimension of"
                f" {grad.shape[0]} but the micro-batch has {b} examples. Per-sample gradients need every layer's first"
                " dimension to index the examples (do not fold sequence or crop dimensions into the batch)."
            )

    @final
    @contextmanager
    def capture(self, batch_size: int) -> Iterator[None]:
        """Capture one micro-batch: run its forward *and* backward inside.

        ``p.grad`` is cleared on entry (it may hold an earlier release; this micro-batch's autograd gradient is what
        the cross-check compares with). Broadcast parameters are replaced by per-sample copies while inside.

        Args:
            batch_size: the number of examples of the micro-batch.

        Raises:
            RuntimeError: if already capturing (not re-entrant).
        """
        if self._capturing:
            raise RuntimeError(f"{type(self).__name__}.capture is not re-entrant.")
        self._batch_size = batch_size
        for p in self.params:
            p.grad = None
        self._reset_pending()
        # Per-layer clipping in backward once the mode is known and autograd's sums are not needed any more.
        self._inline_c = None if self.check_against_autograd else self._per_layer_c
        self._inline_bounds = self._group_bounds
        broadcast_grads: dict[nn.Parameter, Tensor] = {}
        self._broadcast_grads = broadcast_grads
        self._start_capture()
        self._fallback.start(batch_size, discover=self.check_against_autograd)  # any-model
        self._capturing = True
        try:
            with per_sample_broadcast(self._broadcast, batch_size, broadcast_grads):
                yield
        finally:
            self._capturing = False
            self._fallback.end()  # any-model
            self._end_capture()

    # ------------------------------------------------------------------ the template
    def _scale(self) -> float:
        return float(self._batch_size) if self.loss_reduction == "mean" else 1.0

    def _gather(self) -> list[Contribution]:
        """Broadcast parameters (one group each) and the subclass's layer groups, made disjoint."""
        names = {p: f"{mod_name}.{n}" if mod_name else n for mod_name, _, n, p in self._broadcast}
        groups: list[Contribution] = [
            PerSampleGradients(names.get(p, self.param_names.get(p, "?")), {p: gs})
            for p, gs in self._broadcast_grads.items()
        ]
        groups += self._ready
        groups += self._contributions()
        self._ready = []
        # the groups of layers inside a fallback unit are replaced by the unit's
        groups = [g for g in groups if not self._fallback.covers(g)] + self._fallback.contributions()
        return merge_shared([g for g in groups if g.params])

    def _check_sums(self, groups: list[Contribution]) -> None:
        """Compare each group's Σ_i g_i with autograd's ``p.grad`` (see :func:`check_sums_against_autograd`)."""
        ones = torch.ones(self._batch_size, device=self.params[0].device, dtype=torch.float32)
        totals: dict[nn.Parameter, Tensor] = {}
        spread: dict[nn.Parameter, Tensor] = {}
        group_of: dict[nn.Parameter, Contribution] = {}
        for g in groups:
            sums = g.clipped_sum(ones)
            totals.update(sums)
            width = g.squared_norms().clamp(min=0).sqrt().sum()
            for p in sums:
                spread[p], group_of[p] = width, g
        rtol = check_tolerance(self._fallback.dtypes_seen())
        explain = lambda p: self._fallback.explain(p, group_of.get(p))  # noqa: E731
        check_sums_against_autograd(self.params, totals, self.param_names, spread, rtol, explain)

    def _apply_masks(self, groups: list[Contribution]) -> bool:
        """Mask the per-sample gradients of masked parameters; whether any group changed.

        Raises:
            RuntimeError: if a masked parameter is in a group without materialised per-sample gradients.
        """
        if not self.grad_masks:
            return False
        changed = False
        for g in groups:
            if isinstance(g, PerSampleGradients):
                changed |= g.mask(self.grad_masks)
            elif any(p in self.grad_masks for p in g.params):
                raise RuntimeError(
                    f"{type(self).__name__} gave the masked parameter group {g.name!r} as {type(g).__name__};"
                    " a masked group must be PerSampleGradients (masks act on per-sample gradient coordinates)."
                )
        return changed

    @staticmethod
    def _squared_norms(groups: list[Contribution], b: int, device: torch.device) -> Tensor:
        """Per-sample squared norms over all groups (flat clipping: the sum of the groups'), fp32."""
        sq = torch.zeros(b, device=device, dtype=torch.float32)
        for g in groups:
            sq += g.squared_norms()
        return sq

    def _nonfinite_examples(self, groups: list[Contribution], sq: Tensor) -> Tensor:
        """Count the examples with a non-finite norm; zero them out (``"skip"``) or raise (``"error"``).

        Returns:
            ``(b,)`` booleans, True for the finite examples.

        Raises:
            NonFiniteGradientError: with ``nonfinite="error"``, if any example's norm is NaN or infinite.
        """
        finite = torch.isfinite(sq)
        if self._count_nonfinite(~finite) == 0:
            return finite
        for g in groups:
            g.zero_examples(finite)
        return finite

    def _count_nonfinite(self, bad: Tensor) -> int:
        """Count the examples flagged in ``bad`` (``(b,)`` booleans) as non-finite, or raise (``"error"``).

        Raises:
            NonFiniteGradientError: with ``nonfinite="error"``, if any is flagged.
        """
        count = int(bad.sum())  # one host sync per micro-batch: the branches need it
        self.last_nonfinite = count
        if count == 0:
            return 0
        if self.nonfinite == "error":
            indices = tuple(int(i) for i in torch.nonzero(bad).flatten().tolist())
            raise NonFiniteGradientError(
                f"{count} of the {bad.shape[0]} examples of this micro-batch have a non-finite (NaN or infinite)"
                f" per-sample gradient norm (positions {list(indices)} in the micro-batch). Look for NaN/inf in"
                " those examples' inputs and per-sample losses (torch.isfinite), a log(0) or a division by zero in"
                " the loss, or an fp16 overflow. To train on while dropping such examples (each adds exactly zero"
                " to the clipped sum, and is counted), build the engine with nonfinite='skip'.",
                count=count,
                indices=indices,
            )
        self._nonfinite_count += count
        return count

    def _reset_pending(self) -> None:
        self._ready = []
        self._pending = {}
        self._pending_sq = None
        self._pending_bad = None
        self._pending_group_sq = {}

    def _release(self) -> None:
        """Clear ``p.grad`` (it holds the micro-batch's non-private gradient) and free the capture."""
        for p in self.params:
            p.grad = None
        self._broadcast_grads = {}
        self._reset_pending()
        self._inline_c = None
        self._free_capture()
        self._fallback.free()

    @staticmethod
    def _rounding(groups: list[Contribution]) -> Tensor | None:
        """``sqrt(Σ_groups r_g²)``: a bound on how far the groups' clipped sums may move an example by rounding,
        per unit of its factor (None if every group's sum is exact to fp32).
        """
        parts = [r for r in (g.rounding_bounds() for g in groups) if r is not None]
        if not parts:
            return None
        return torch.stack(parts).pow(2).sum(0).sqrt()

    def _accumulate(self, target: dict[nn.Parameter, Tensor], group: Contribution, factors: Tensor) -> None:
        for p, value in group.clipped_sum(factors).items():
            acc = target.get(p)
            target[p] = value if acc is None else acc + value

    # ------------------------------------------------------------------ per-layer clipping
    def _clip_groups_per_layer(
        self, clipping_groups: list[tuple[int, list[Contribution]]], c: float, sync_each: bool
    ) -> None:
        """Clip each clipping group (its index and a list of its contributions) by ``C_l`` (``C/√L`` unless set by
        :meth:`set_clipping_bound`) into the pending sum.

        Squared norms and non-finite flags accumulate in ``_pending_sq`` / ``_pending_bad`` (and per group in
        ``_pending_group_sq``). Examples with a
        non-finite norm in a group are zeroed out in that group; the check costs one host synchronisation per call,
        or per group with ``sync_each`` (a group clipped in backward must be clean before it is dropped).
        """
        scale = self._scale()
        bounds = self._inline_bounds if self._inline_c is not None else self._group_bounds
        equal = per_layer_bound(c, len(self._groups))
        parts: list[tuple[list[Contribution], Tensor, float]] = []
        for gid, contributions in clipping_groups:
            sq = self._squared_norms(contributions, self._batch_size, self.params[0].device)
            self._pending_sq = sq if self._pending_sq is None else self._pending_sq + sq
            prior = self._pending_group_sq.get(gid)
            self._pending_group_sq[gid] = sq if prior is None else prior + sq
            bad = ~torch.isfinite(sq)
            self._pending_bad = bad if self._pending_bad is None else self._pending_bad | bad
            parts.append((contributions, sq, equal if bounds is None else bounds[gid]))
            if sync_each:
                self._clip_parts(parts, scale)
                parts = []
        if parts:
            self._clip_parts(parts, scale)

    def _clip_parts(self, parts: list[tuple[list[Contribution], Tensor, float]], scale: float) -> None:
        finite = [torch.isfinite(sq) for _, sq, _ in parts]
        if bool(torch.stack([~f for f in finite]).any()):  # the one host sync of these groups
            for (contributions, _, _), keep in zip(parts, finite):
                for g in contributions:
                    g.zero_examples(keep)
        for (contributions, sq, bound), keep in zip(parts, finite):
            norms = torch.where(keep, sq, 0.0).sqrt() * scale
            r = self._rounding(contributions)
            if r is not None:
                norms = norms + torch.where(keep, r, 0.0) * scale
            factors = clip_factors(norms, bound, "flat") * scale
            for g in contributions:
                self._accumulate(self._pending, g, factors)

    def _finish_per_layer(self, groups: list[Contribution], c: float) -> Tensor:
        """Clip the groups not clipped in backward, then count non-finite examples (or raise) and add the pending
        sum to the running sum. Returns the flat per-sample norms.
        """
        by_id: dict[int, list[Contribution]] = {}
        for g in groups:
            for part in self._split_by_clipping_group(g):
                by_id.setdefault(self._group_id(part), []).append(part)
        self._clip_groups_per_layer(list(by_id.items()), c, sync_each=False)
        b = self._batch_size
        device = self.params[0].device
        per_group = torch.zeros(b, len(self._groups), device=device)
        for gid, gsq in self._pending_group_sq.items():
            per_group[:, gid] = gsq
        self.last_group_norms = per_group.sqrt() * self._scale()
        sq = self._pending_sq if self._pending_sq is not None else torch.zeros(b, device=device)
        bad = self._pending_bad if self._pending_bad is not None else torch.zeros(b, dtype=torch.bool, device=device)
        self._count_nonfinite(bad)
        for p, value in self._pending.items():
            acc = self._summed.get(p)
            self._summed[p] = value if acc is None else acc + value
        return (sq * self._scale() ** 2).sqrt()

    @final
    def clip_and_accumulate(
        self, max_grad_norm: float, clipping: ClippingMode = "flat", stability: float = 0.01
    ) -> Tensor:
        """Clip the captured micro-batch with ``clipping`` (see :mod:`lightning_dp.clipping`) and add the clipped
        gradients to the running fp32 sum. Frees what the capture stored and clears ``p.grad`` (it holds the
        micro-batch's non-private gradient), also when it raises.

        The clip factors come from the per-sample norms inflated by the groups' rounding bounds (zero where the
        clipped sums are exact to fp32; see :mod:`lightning_dp.engine.precision`), so that no example exceeds its
        bound under rounding.

        Args:
            max_grad_norm: C.
            clipping: ``"flat"``, ``"normalized"``, ``"automatic"`` (the norm is over all parameters together) or
                ``"per_layer"`` (each parameter group bounded by ``C/√L``, or by the ``C_l`` of
                :meth:`set_clipping_bound`, see :attr:`clipping_groups`; the groups' norms are then in
                :attr:`last_group_norms`). After a ``"per_layer"`` call, later micro-batches are clipped inside their
                backward pass, which needs the same mode and bounds on every call of a step (set new bounds with
                :meth:`set_clipping_bound` before the next capture).
            stability: γ of automatic clipping.

        Returns:
            The per-sample gradient norms before clipping (over all parameters, in every mode), shape ``(b,)``, in
            fp32 (NaN/inf for a non-finite example, which added zero).

        Raises:
            NonFiniteGradientError: with ``nonfinite="error"``, for an example with a non-finite gradient norm.
            DPMisconfigurationError: if the cross-check finds per-sample gradients that do not add up to autograd's,
                or if the micro-batch was clipped in backward with another per-layer C than asked for now.
        """
        b = self._batch_size
        scale = self._scale()
        device = self.params[0].device
        try:
            with full_precision_matmuls():
                self._check_backward_clipping(max_grad_norm, clipping)
                groups = self._gather()
                sq = self._squared_norms(groups, b, device)
                if self.check_against_autograd and bool(torch.isfinite(sq).all()):
                    self._check_sums(groups)  # before masks: autograd's p.grad is unmasked
                    self.check_against_autograd = False  # once per run: it costs an extra pass
                if self._apply_masks(groups):
                    sq = self._squared_norms(groups, b, device)
                if clipping == "per_layer":
                    norms = self._finish_per_layer(groups, max_grad_norm)
                    self._per_layer_c = float(max_grad_norm)  # from now on: in backward
                    return norms
                self._per_layer_c = None  # a norm over all groups: nothing can be clipped in backward
                self.last_group_norms = None
                finite = self._nonfinite_examples(groups, sq)
                norms = (sq * scale**2).sqrt()
                bounds = norms
                r = self._rounding(groups)
                if r is not None:
                    bounds = norms + r * scale
                safe = bounds if self.last_nonfinite == 0 else torch.where(finite, bounds, 0.0)
                factors = clip_factors(safe, max_grad_norm, clipping, stability) * scale
                for g in groups:
                    self._accumulate(self._summed, g, factors)
                return norms
        finally:
            self._release()

    def _check_backward_clipping(self, max_grad_norm: float, clipping: str) -> None:
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

    @final
    def probe_norms(self) -> Tensor:
        """The captured micro-batch's per-sample gradient norms (after masks, as :meth:`clip_and_accumulate` would
        return them), without adding anything to the running sum. Frees the capture and clears ``p.grad``.

        Neither counts non-finite examples nor raises for them (their norms are NaN/inf), and does not run the
        autograd cross-check (it stays due for the next :meth:`clip_and_accumulate`).

        Returns:
            Per-sample norms, shape ``(b,)``, fp32.
        """
        try:
            with full_precision_matmuls():
                groups = self._gather()
                self._apply_masks(groups)
                sq = self._squared_norms(groups, self._batch_size, self.params[0].device)
                if self._pending_sq is not None:  # groups clipped in backward (their sum is discarded)
                    sq = sq + self._pending_sq
                return (sq * self._scale() ** 2).sqrt()
        finally:
            self._release()

    @final
    def pop_summed(self) -> dict[nn.Parameter, Tensor]:
        """The clipped sum over all micro-batches since the last call (fp32; zeros for parameters with no
        gradient), and reset it.
        """
        out = {p: self._summed.get(p, torch.zeros_like(p, dtype=torch.float32)) for p in self.params}
        self._summed = {}
        return out

    @final
    def pop_nonfinite(self) -> int:
        """How many examples were zeroed out for a non-finite gradient norm since the last call, and reset."""
        count, self._nonfinite_count = self._nonfinite_count, 0
        return count


__all__ = ["NONFINITE_MODES", "ClippingEngine", "NonFiniteMode"]
