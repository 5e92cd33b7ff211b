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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, final

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dp.clipping import ClippingMode, clip_factors
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
        self._plan()
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

    # ------------------------------------------------------------------ configuration
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
        groups += self._contributions()
        # any-model: the groups of layers inside a fallback unit are replaced by the unit's
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
        count = int((~finite).sum())  # one host sync per micro-batch: the branch below needs it
        self.last_nonfinite = count
        if count == 0:
            return finite
        if self.nonfinite == "error":
            indices = tuple(int(i) for i in torch.nonzero(~finite).flatten().tolist())
            raise NonFiniteGradientError(
                f"{count} of the {sq.shape[0]} examples of this micro-batch have a non-finite (NaN or infinite)"
                f" per-sample gradient norm (positions {list(indices)} in the micro-batch). Look for NaN/inf in"
                " those examples' inputs and per-sample losses (torch.isfinite), a log(0) or a division by zero in"
                " the loss, or an fp16 overflow. To train on while dropping such examples (each adds exactly zero"
                " to the clipped sum, and is counted), build the engine with nonfinite='skip'.",
                count=count,
                indices=indices,
            )
        self._nonfinite_count += count
        for g in groups:
            g.zero_examples(finite)
        return finite

    def _release(self) -> None:
        """Clear ``p.grad`` (it holds the micro-batch's non-private gradient) and free the capture."""
        for p in self.params:
            p.grad = None
        self._broadcast_grads = {}
        self._free_capture()
        self._fallback.free()

    @final
    def clip_and_accumulate(
        self, max_grad_norm: float, clipping: ClippingMode = "flat", stability: float = 0.01
    ) -> Tensor:
        """Clip the captured micro-batch with ``clipping`` (see :mod:`lightning_dp.clipping`; the norm is over all
        parameters together) and add the clipped gradients to the running fp32 sum. Frees what the capture stored
        and clears ``p.grad`` (it holds the micro-batch's non-private gradient), also when it raises.

        Args:
            max_grad_norm: C.
            clipping: ``"flat"``, ``"normalized"`` or ``"automatic"``.
            stability: γ of automatic clipping.

        Returns:
            The per-sample gradient norms before clipping, shape ``(b,)``, in fp32 (NaN/inf for a non-finite
            example, which added zero).

        Raises:
            NonFiniteGradientError: with ``nonfinite="error"``, for an example with a non-finite gradient norm.
            DPMisconfigurationError: if the cross-check finds per-sample gradients that do not add up to autograd's.
        """
        b = self._batch_size
        scale = self._scale()
        device = self.params[0].device
        try:
            with full_precision_matmuls():
                groups = self._gather()
                sq = self._squared_norms(groups, b, device)
                if self.check_against_autograd and bool(torch.isfinite(sq).all()):
                    self._check_sums(groups)  # before masks: autograd's p.grad is unmasked
                    self.check_against_autograd = False  # once per run: it costs an extra pass
                if self._apply_masks(groups):
                    sq = self._squared_norms(groups, b, device)
                finite = self._nonfinite_examples(groups, sq)
                norms = (sq * scale**2).sqrt()
                safe = norms if self.last_nonfinite == 0 else torch.where(finite, norms, 0.0)
                factors = clip_factors(safe, max_grad_norm, clipping, stability) * scale
                for g in groups:
                    for p, value in g.clipped_sum(factors).items():
                        acc = self._summed.get(p)
                        self._summed[p] = value if acc is None else acc + value
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
                sq = self._squared_norms(groups, self._batch_size, self.params[0].device)
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
