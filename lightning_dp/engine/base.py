"""The abstract per-sample clipping engine: one template method owns the privacy rules, subclasses the mechanics.

:meth:`ClippingEngine.clip_and_accumulate` is final. For every engine it runs, in this order: fp32 matmuls without
TF32; gathering the subclass's per-sample contributions (per parameter group, see
:mod:`lightning_dp.engine.contributions`); the cross-check of their sums against autograd (first micro-batch);
gradient masks; non-finite examples (zeroed out and counted, or an error); norms and clip factors
(:mod:`lightning_dp.clipping`); the clipped sum; clearing ``p.grad``; freeing what the capture stored. A subclass
only says how it captures a micro-batch and how its per-sample squared norms and ``Σ_i f_i g_i`` are formed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, final

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dp.clipping import ClippingMode, clip_factors
from lightning_dp.engine.contributions import (
    Contribution,
    PerSampleGradients,
    add_into,
    apply_masks,
    merge_shared,
    rounding_bound,
    squared_norms,
)
from lightning_dp.engine.crosscheck import check_contributions, check_tolerance
from lightning_dp.engine.fallback import FunctionalFallback
from lightning_dp.engine.layers import (
    BroadcastParameter,
    check_batch_dimension,
    check_layer_output,
    full_precision_matmuls,
    per_sample_broadcast,
    trainable_parameters,
)
from lightning_dp.engine.layout import LocalLayout, ParameterLayout
from lightning_dp.engine.nonfinite import NONFINITE_MODES, NonFiniteCounter, NonFiniteMode
from lightning_dp.engine.per_layer import PerLayerClipper

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

    Non-finite examples (see :mod:`lightning_dp.engine.nonfinite`): an example whose per-sample gradient norm is NaN
    or infinite adds exactly zero to the clipped sum and is counted in :attr:`last_nonfinite` and the running count
    :meth:`pop_nonfinite` (or, with ``nonfinite="error"``, raises); the norms returned keep its NaN/inf entry. The
    autograd cross-check is deferred to the next micro-batch when the current one has a non-finite example
    (autograd's ``p.grad`` then sums a NaN/inf and cannot be compared).

    Args:
        module: the model whose trainable parameters are clipped per sample.
        loss_reduction: ``"mean"`` if the loss averages per-sample losses over the micro-batch (per-sample
            gradients are then rescaled by ``b``), ``"sum"`` if it sums them.
        nonfinite: ``"skip"`` (default) zeroes out and counts examples with a non-finite per-sample gradient norm;
            ``"error"`` raises :class:`~lightning_dp.errors.NonFiniteGradientError`.

    Per-layer clipping: see :mod:`lightning_dp.engine.per_layer` (the template's :attr:`per_layer` collaborator,
    a :class:`~lightning_dp.engine.per_layer.PerLayerClipper`). The parameter groups (:attr:`clipping_groups`) are
    fixed by the model: each hooked layer's trained parameters (layers sharing a parameter form one group) and each
    broadcast parameter. In this mode an example whose norm is non-finite in a group adds exactly zero *in that
    group* (and is counted once); its other groups are clipped as usual.

    Attributes:
        check_against_autograd: on the next micro-batch without non-finite examples, check that the engine's
            per-sample gradients add up to autograd's ``p.grad`` (once per run; reset after the check).
        grad_masks: per parameter, the 0/1 mask applied to its per-sample gradients (see :meth:`set_grad_masks`).
        per_layer: the per-layer clipping of this engine (its groups, bounds and clipping in backward).

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
        layout: ParameterLayout | None = None,
    ) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        self._nonfinite_counter = NonFiniteCounter(nonfinite)
        self.module = module
        self.layout: ParameterLayout = layout if layout is not None else LocalLayout()
        self.loss_reduction = loss_reduction
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
        self.check_against_autograd = True
        self.grad_masks: dict[nn.Parameter, Tensor] = {}
        self._ready: list[Contribution] = []
        self._plan()
        broadcast = [p for *_, p in self._broadcast]
        self.per_layer = PerLayerClipper(module, self.params, broadcast, self.param_names, type(self).__name__)
        self._fallback = FunctionalFallback(  # any-model: torch.func for what the engine's layer rules do not cover
            module, self.params, self.layer_names, broadcast, self.param_names, type(self).__name__, self.layout
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
    @property
    def clipping_groups(self) -> list[tuple[str, ...]]:
        """The parameter groups of per-layer clipping (parameter names), each bounded by ``C/√L`` with ``L`` their
        number (:func:`lightning_dp.clipping.per_layer_bound`), or by its own ``C_l`` (:meth:`set_clipping_bound`).
        """
        return self.per_layer.clipping_groups

    @property
    def last_group_norms(self) -> Tensor | None:
        """Per-sample norms of each clipping group (shape ``(b, L)``) of the last micro-batch clipped per layer."""
        return self.per_layer.last_group_norms

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
        self._named_by_trained([group])
        if (
            group.params
            and self.per_layer.in_backward
            and not defer
            and not self._fallback.covers(group)  # replaced by its fallback unit's group: clipping it would count twice
            and self.per_layer.clips_in_backward(group)
        ):
            with full_precision_matmuls():
                self._apply_masks([group])
                self.per_layer.clip_now(group)
        else:
            self._ready.append(group)

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
        self.per_layer.set_bounds(max_grad_norm, group_bounds)

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
        check_layer_output(self._fallback.name_of(mod), mod, output)
        return self._fallback.accepts(mod, output)  # any-model: not inside a unit, batch first (else re-planned)

    def _check_batch_dimension(self, mod: nn.Module, grad: Tensor) -> None:
        """In a backward hook: the output gradient's first dimension must index the micro-batch's examples.

        Raises:
            DPMisconfigurationError: otherwise.
        """
        check_batch_dimension(self._fallback.name_of(mod), mod, grad, self._batch_size)

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
        self.layout.clear_grads(self.params)
        self._ready = []
        # Per-layer clipping in backward once the mode is known and autograd's sums are not needed any more.
        self.per_layer.start(batch_size, self._scale(), self.params[0].device, checking=self.check_against_autograd)
        broadcast_grads: dict[nn.Parameter, Tensor] = {}
        self._broadcast_grads = broadcast_grads
        self._start_capture()
        self._fallback.start(batch_size, discover=self.check_against_autograd)  # any-model
        self._capturing = True
        try:
            with per_sample_broadcast(self._broadcast, batch_size, broadcast_grads, in_forward=self.layout.rekeys):
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
        groups += self._ready  # named by the trained parameters when handed over (_group_ready)
        groups += self._named_by_trained(self._contributions())
        self._ready = []
        # the groups of layers inside a fallback unit are replaced by the unit's
        groups = [g for g in groups if not self._fallback.covers(g)]
        groups += self._named_by_trained(self._fallback.contributions())
        return merge_shared([g for g in groups if g.params])

    def _named_by_trained(self, groups: list[Contribution]) -> list[Contribution]:
        """``groups`` with their parameters named by the trained ones (see :mod:`lightning_dp.engine.layout`)."""
        if self.layout.rekeys:
            for g in groups:
                g.rekey(self.layout.canonical)
        return groups

    def _check_sums(self, groups: list[Contribution]) -> None:
        """Compare each group's Σ_i g_i with autograd's ``p.grad`` (see :mod:`lightning_dp.engine.crosscheck`)."""
        aliases = [a.dtype for p in self.params for a in self.layout.aliases(p)]  # FSDP2's bf16 compute copies
        rtol = check_tolerance([*self._fallback.dtypes_seen(), *aliases])
        known = (self.params, self.param_names, self._batch_size, rtol, self._fallback.explain)
        check_contributions(groups, *known, self.layout.autograd_grad)

    def _apply_masks(self, groups: list[Contribution]) -> bool:
        """Mask the per-sample gradients of masked parameters (see :func:`apply_masks`); whether any group changed."""
        return apply_masks(groups, self.grad_masks, type(self).__name__)

    def _count_nonfinite(self, bad: Tensor) -> int:
        """Count the examples flagged in ``bad`` as non-finite, or raise (see :class:`NonFiniteCounter`)."""
        return self._nonfinite_counter.count(bad)

    @property
    def nonfinite(self) -> NonFiniteMode:
        """``"skip"`` or ``"error"``: what a non-finite example does (see :mod:`lightning_dp.engine.nonfinite`)."""
        return self._nonfinite_counter.mode

    @property
    def last_nonfinite(self) -> int:
        """How many examples of the last clipped micro-batch had a non-finite gradient norm."""
        return self._nonfinite_counter.last

    def _release(self) -> None:
        """Clear ``p.grad`` (it holds the micro-batch's non-private gradient) and free the capture."""
        self.layout.clear_grads(self.params)
        self._broadcast_grads = {}
        self._ready = []
        self.per_layer.release()
        self._free_capture()
        self._fallback.free()

    def _finish_per_layer(self, groups: list[Contribution], c: float) -> Tensor:
        """Clip the groups not clipped in backward by their layer bounds, then count non-finite examples (or raise)
        and add the micro-batch's clipped sum to the running sum. Returns the flat per-sample norms.
        """
        result = self.per_layer.finish(groups, c)
        self._count_nonfinite(result.nonfinite)
        add_into(self._summed, result.summed)
        return result.norms

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
                self.per_layer.check_mode(max_grad_norm, clipping)
                groups = self._gather()
                sq = squared_norms(groups, b, device)
                if self.check_against_autograd and bool(torch.isfinite(sq).all()):
                    self._check_sums(groups)  # before masks: autograd's p.grad is unmasked
                    self.check_against_autograd = False  # once per run: it costs an extra pass
                if self._apply_masks(groups):
                    sq = squared_norms(groups, b, device)
                if clipping == "per_layer":
                    norms = self._finish_per_layer(groups, max_grad_norm)
                    self.per_layer.record_mode(clipping, max_grad_norm)  # from now on: in backward
                    return norms
                self.per_layer.record_mode(clipping, max_grad_norm)  # a norm over all groups: not in backward
                finite = self._nonfinite_counter.zero_out(groups, sq)
                norms = (sq * scale**2).sqrt()
                bounds = norms
                r = rounding_bound(groups)
                if r is not None:
                    bounds = norms + r * scale
                safe = bounds if self.last_nonfinite == 0 else torch.where(finite, bounds, 0.0)
                factors = clip_factors(safe, max_grad_norm, clipping, stability) * scale
                for g in groups:
                    add_into(self._summed, g.clipped_sum(factors))
                return norms
        finally:
            self._release()

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
                sq = squared_norms(groups, self._batch_size, self.params[0].device)
                pending = self.per_layer.pending_sq
                if pending is not None:  # groups clipped in backward (their sum is discarded)
                    sq = sq + pending
                return (sq * self._scale() ** 2).sqrt()
        finally:
            self._release()

    @final
    def pop_summed(self) -> dict[nn.Parameter, Tensor]:
        """The clipped sum over all micro-batches since the last call (fp32; zeros for parameters with no
        gradient), and reset it.
        """
        out = {p: self._summed[p] if p in self._summed else self.layout.zeros(p) for p in self.params}
        self._summed = {}
        return out

    @final
    def pop_nonfinite(self) -> int:
        """How many examples were zeroed out for a non-finite gradient norm since the last call, and reset."""
        return self._nonfinite_counter.pop()


__all__ = ["NONFINITE_MODES", "ClippingEngine", "NonFiniteMode"]
