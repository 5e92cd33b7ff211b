"""DP sparse fine-tuning with a private selection of parameter groups (SPARTA, Makni et al., arXiv:2503.12822).

Phases, by epoch: (1) warm-up: DP training of the classifier only; (2) selection (``selection_epochs``): every
candidate parameter takes part in ordinary private steps (the same Poisson sampling, clipping and noise, recorded in
the ledger like any step), but the update is discarded (learning rate 0); the absolute value of each private
(noisy) gradient coordinate is accumulated; (3) the groups — rows (output units/channels) of every candidate tensor
with more than one dimension — are scored by the sum of their accumulated noisy magnitudes, and the top
``keep_fraction`` rows of each tensor (or the top ``num_groups`` rows overall) are kept: pure post-processing of
private outputs; (4) DP training of the kept rows and the classifier only: W = W_init + m ⊙ W_train.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_dp.console import notice
from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.finetune.lpft import find_backbone
from lightning_dp.finetune.selection import head_parameter_names, select_parameters


class SparseFineTuning(pl.Callback):
    """Private selection of parameter rows, then DP fine-tuning of those rows and the classifier.

    Args:
        warmup_epochs: epochs of classifier-only training before selection.
        selection_epochs: epochs of private gradient statistics (no update) for the selection.
        keep_fraction: share of rows kept in each candidate tensor (the paper uses 0.2).
        num_groups: instead of ``keep_fraction``, keep this many rows overall (largest scores across tensors).
        candidates: preset or pattern(s) of the parameters eligible for selection (default: ``"all"``).
        model_attr: attribute of the LightningModule holding the model (default: the timm model found in it).
        head_pattern: regex of the classifier's parameter names, for non-timm models.

    Example:
        >>> trainer = L.Trainer(max_epochs=50, strategy=DPStrategy(target_epsilon=4.0),  # doctest: +SKIP
        ...                     callbacks=[SparseFineTuning(warmup_epochs=5, keep_fraction=0.2)])
    """

    def __init__(
        self,
        warmup_epochs: int = 1,
        selection_epochs: int = 1,
        keep_fraction: float | None = 0.2,
        num_groups: int | None = None,
        candidates: str | list[str] = "all",
        model_attr: str | None = None,
        head_pattern: str | None = None,
    ) -> None:
        if (keep_fraction is None) == (num_groups is None):
            raise DPMisconfigurationError("Give exactly one of keep_fraction and num_groups.")
        if keep_fraction is not None and not 0 < keep_fraction <= 1:
            raise DPMisconfigurationError(f"keep_fraction must be in (0, 1], got {keep_fraction}.")
        if warmup_epochs < 0 or selection_epochs < 1:
            raise DPMisconfigurationError("warmup_epochs must be ≥ 0 and selection_epochs ≥ 1.")
        self.warmup_epochs = warmup_epochs
        self.selection_epochs = selection_epochs
        self.keep_fraction = keep_fraction
        self.num_groups = num_groups
        self.candidates = candidates
        self.model_attr = model_attr
        self.head_pattern = head_pattern
        self.phase = ""
        self.scores: dict[str, Tensor] = {}
        self.masks: dict[str, Tensor] = {}  # name -> bool over rows
        self.initial: dict[str, Tensor] = {}
        self._head: list[str] = []
        self._candidate_names: list[str] = []

    # ------------------------------------------------------------------ phases
    def _phase_of(self, epoch: int) -> str:
        if epoch < self.warmup_epochs:
            return "warmup"
        if epoch < self.warmup_epochs + self.selection_epochs:
            return "selection"
        return "sparse"

    def _enter(self, phase: str, trainer: pl.Trainer, pl_module: pl.LightningModule, resume: bool = False) -> None:
        """Set the trainable parameters (and masks) of ``phase``; ``resume`` keeps the selection's scores so far."""
        model = find_backbone(pl_module, self.model_attr)
        params = dict(model.named_parameters())
        if phase == "warmup":
            select_parameters(model, "head", head_pattern=self.head_pattern)
        elif phase == "selection":
            for name, p in params.items():
                p.requires_grad_(name in self._candidate_names or name in self._head)
            if not (resume and set(self.scores) == set(self._candidate_names)):
                self.scores = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in self._candidate_names}
            self.scores = {n: s.to(params[n].device) for n, s in self.scores.items()}
        else:
            if not self.masks:
                self._select()
            for name, p in params.items():
                p.requires_grad_(name in self._head or (name in self.masks and bool(self.masks[name].any())))
            self.initial = {n: params[n].detach().clone() for n in self.masks}
            kept = sum(int(m.sum()) for m in self.masks.values())
            total = sum(m.numel() for m in self.masks.values())
            notice(f"SPARTA: training {kept} of {total} rows of {len(self.masks)} tensors, and the head")
        self.phase = phase
        if phase == "sparse":  # clip per sample over the kept rows only, as SPARTA does
            trainer.strategy.grad_masks = {
                params[n]: m.to(params[n].device).view(-1, *([1] * (params[n].ndim - 1))).float()
                for n, m in self.masks.items()
            }
        else:
            trainer.strategy.grad_masks = {}
        trainer.strategy.refresh_trainable()

    def _select(self) -> None:
        row_scores = {n: s.reshape(s.shape[0], -1).sum(1) for n, s in self.scores.items()}
        if self.num_groups is not None:
            flat = torch.cat([s for s in row_scores.values()])
            k = min(self.num_groups, flat.numel())
            threshold = torch.topk(flat, k).values.min()
            self.masks = {n: s >= threshold for n, s in row_scores.items()}
        else:
            assert self.keep_fraction is not None
            self.masks = {}
            for n, s in row_scores.items():
                k = max(1, math.ceil(self.keep_fraction * s.numel()))
                mask = torch.zeros_like(s, dtype=torch.bool)
                mask[torch.topk(s, k).indices] = True
                self.masks[n] = mask

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the head and the candidate tensors, and enter the current phase."""
        if not hasattr(trainer.strategy, "refresh_trainable"):
            raise DPMisconfigurationError("SparseFineTuning needs Trainer(strategy=DPStrategy(...)).")
        model = find_backbone(pl_module, self.model_attr)
        self._head = head_parameter_names(model, self.head_pattern)
        chosen = select_parameters(model, self.candidates, head_pattern=self.head_pattern).trainable
        self._candidate_names = [
            n for n in chosen if n not in self._head and dict(model.named_parameters())[n].ndim > 1
        ]
        if not self._candidate_names:
            raise DPMisconfigurationError("SparseFineTuning found no candidate tensor with more than one dimension.")
        # On a resume, the loops' progress (current_epoch) is restored only after on_fit_start; this callback's own
        # state (phase, scores, masks) is restored before it: continue in the phase the checkpoint was written in.
        phase = self.phase or self._phase_of(trainer.current_epoch)
        self._enter(phase, trainer, pl_module, resume=bool(self.phase))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move to the next phase at its first epoch."""
        phase = self._phase_of(trainer.current_epoch)
        if phase != self.phase:
            self._enter(phase, trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Selection: accumulate |private gradient| and discard the update. Sparse: mask the private gradient."""
        if self.phase not in ("selection", "sparse"):
            return
        params = dict(find_backbone(pl_module, self.model_attr).named_parameters())
        if self.phase == "selection":
            for name, p in params.items():
                if p.grad is not None and name in self.scores:
                    self.scores[name] += p.grad.detach().abs().float()
                p.grad = None  # learning rate 0: the step is taken (and charged) but changes nothing
            return
        for name, mask in self.masks.items():
            g = params[name].grad
            if g is not None:
                g.mul_(mask.to(g.device).view(-1, *([1] * (g.ndim - 1))).to(g.dtype))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Keep unselected rows at their initial values (weight decay and momentum would move them)."""
        if self.phase != "sparse":
            return
        params = dict(find_backbone(pl_module, self.model_attr).named_parameters())
        with torch.no_grad():
            for name, mask in self.masks.items():
                p = params[name]
                keep = ~mask.to(p.device).view(-1, *([1] * (p.ndim - 1))).expand_as(p)
                p[keep] = self.initial[name][keep]

    def state_dict(self) -> dict[str, Any]:
        """The phase, the selection's scores so far and the masks: a resume continues exactly where it stopped."""
        return {
            "phase": self.phase,
            "scores": {n: s.detach().cpu().clone() for n, s in self.scores.items()},
            "masks": {n: m.tolist() for n, m in self.masks.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the phase, scores and masks (checkpoints of earlier versions hold the masks only)."""
        self.masks = {n: torch.tensor(m, dtype=torch.bool) for n, m in state_dict.get("masks", {}).items()}
        self.scores = {n: s.clone().float() for n, s in state_dict.get("scores", {}).items()}
        self.phase = state_dict.get("phase", "sparse" if self.masks else "")
