"""What every per-sample clipping engine shares: its parameters, hooks bookkeeping and the running clipped sum."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dp.clipping import ClippingMode
from lightning_dp.engine.layers import BroadcastParameter, full_precision_matmuls, in_backward, trainable_parameters
from lightning_dp.errors import DPMisconfigurationError, UnsupportedLayerError


class ClippingEngine:
    """Base of the engines. A subclass plans its layers (``_plan``), registers hooks (``attach``), captures one
    micro-batch (``capture``) and clips it (``_clip_and_accumulate``, adding to the sum with ``_add``).

    Per physical micro-batch of ``b`` examples::

        with engine.capture(b):
            loss = module.training_step(micro_batch)
            loss.backward()
        norms = engine.clip_and_accumulate(max_grad_norm)
        ...
        summed = engine.pop_summed()  # {param: Σ_i clip(g_i)} over all micro-batches

    Args:
        module: the model whose trainable parameters are clipped per sample.
        loss_reduction: ``"mean"`` if the loss averages per-sample losses over the micro-batch (per-sample
            gradients are then rescaled by ``b``), ``"sum"`` if it sums them.

    Raises:
        UnsupportedLayerError: if a trainable parameter belongs to a layer without a per-sample method.
        DPMisconfigurationError: if the module has no trainable parameter.
    """

    def __init__(self, module: nn.Module, loss_reduction: Literal["mean", "sum"] = "mean") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}.")
        self.module = module
        self.loss_reduction = loss_reduction
        self.params: list[nn.Parameter] = trainable_parameters(module)
        self.param_names: dict[nn.Parameter, str] = {}
        for name, p in module.named_parameters():
            self.param_names.setdefault(p, name)
        self._layers: list[Any] = []
        self._broadcast: list[BroadcastParameter] = []
        self._handles: list[RemovableHandle] = []
        self._capturing = False
        self._batch_size = 0
        self._summed: dict[nn.Parameter, Tensor] = {}
        self.check_against_autograd = True
        self.grad_masks: dict[nn.Parameter, Tensor] = {}
        self._plan()

    def _plan(self) -> None:
        raise NotImplementedError

    def set_grad_masks(self, masks: dict[nn.Parameter, Tensor]) -> None:
        """Restrict per-sample gradients to masked coordinates *before* norms and clipping (e.g. the rows kept by
        sparse fine-tuning), so the clipping budget is spent on the coordinates that are trained.

        Args:
            masks: per parameter, a 0/1 tensor broadcastable to its shape; parameters not trained are ignored.
        """
        trainable = set(self.params)
        self.grad_masks = {p: m for p, m in masks.items() if p in trainable}

    def _apply_masks(self, per_sample: dict[nn.Parameter, Tensor]) -> None:
        for p, gs in per_sample.items():
            mask = self.grad_masks.get(p)
            if mask is not None:
                per_sample[p] = gs * mask.to(gs.device, gs.dtype).unsqueeze(0)

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
                f"Layer {type(mod).__name__} returned {type(output).__name__}, not a tensor; its per-sample rule"
                " needs a single tensor output."
            )
        return True

    def _begin_capture(self, batch_size: int) -> None:
        """Start capturing a micro-batch of ``batch_size`` examples (not re-entrant)."""
        if self._capturing:
            raise RuntimeError(f"{type(self).__name__}.capture is not re-entrant.")
        self._batch_size = batch_size
        for p in self.params:  # p.grad may hold an earlier release; this micro-batch's autograd grad is checked
            p.grad = None

    def detach(self) -> None:
        """Remove all hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _scale(self) -> float:
        return float(self._batch_size) if self.loss_reduction == "mean" else 1.0

    def _add(self, p: nn.Parameter, value: Tensor) -> None:
        acc = self._summed.get(p)
        self._summed[p] = value if acc is None else acc + value

    def clip_and_accumulate(
        self, max_grad_norm: float, clipping: ClippingMode = "flat", stability: float = 0.01
    ) -> Tensor:
        """Clip the captured micro-batch with ``clipping`` (see :mod:`lightning_dp.clipping`; the norm is over all
        parameters together) and add the clipped gradients to the running fp32 sum. Frees what the capture stored
        and clears ``p.grad`` (it holds the micro-batch's non-private gradient).

        Returns:
            The per-sample gradient norms before clipping, shape ``(b,)``, in fp32.
        """
        with full_precision_matmuls():
            return self._clip_and_accumulate(max_grad_norm, clipping, stability)

    def _clip_and_accumulate(self, max_grad_norm: float, clipping: ClippingMode, stability: float) -> Tensor:
        raise NotImplementedError

    def probe_norms(self) -> Tensor:
        """The per-sample norms of the captured micro-batch, adding nothing to the running sum (TEMPORARY)."""
        saved, check = self._summed, self.check_against_autograd
        self._summed = {}
        try:
            return self.clip_and_accumulate(1.0, "flat")
        finally:
            self._summed, self.check_against_autograd = saved, check

    def pop_summed(self) -> dict[nn.Parameter, Tensor]:
        """The clipped sum over all micro-batches since the last call (fp32; zeros for parameters with no
        gradient), and reset it.
        """
        out = {p: self._summed.get(p, torch.zeros_like(p, dtype=torch.float32)) for p in self.params}
        self._summed = {}
        return out
