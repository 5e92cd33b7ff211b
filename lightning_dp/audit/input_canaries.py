"""``InputCanaryAudit``: the user's own canary examples, added to the training set at random, scored by the loss.

A black-box audit: the canaries are ordinary examples, so they go through everything a real example goes through
(sampling, the user's ``training_step``, the engine's per-sample clipping, the noise); only the trained model is
looked at. It is weaker than the white-box :class:`~lightning_dp.audit.CanaryAudit` (the model must memorise a
canary for it to be guessed), but it tests the engine's clipping of real forward and backward passes end to end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import Dataset, default_collate
from typing_extensions import override

from lightning_dp.audit.result import AuditResult, OnViolation, check_audit_options
from lightning_dp.audit.statistics import epsilon_lower_bound_from_scores
from lightning_dp.callbacks._utils import require_dp_strategy
from lightning_dp.console import notice, warn
from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.randomness import fresh_seed, stream_source
from lightning_dp.reporting import log_final

#: per-sample losses of a batch under the module: ``loss_fn(module, batch) -> Tensor (b,)``
LossFn = Callable[[pl.LightningModule, Any], Tensor]


class CanaryDataset(Dataset):
    """The training set followed by the canaries of an :class:`InputCanaryAudit`'s "in" set.

    Args:
        dataset: the real training set (map-style).
        canaries: the included canary examples.
        owner: the audit that drew them.
    """

    def __init__(self, dataset: Dataset, canaries: Sequence[Any], owner: InputCanaryAudit) -> None:
        self.dataset = dataset
        self.canaries = list(canaries)
        self.owner = owner
        self._real = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._real + len(self.canaries)

    def __getitem__(self, index: int) -> Any:
        if index < self._real:
            return self.dataset[index]
        return self.canaries[index - self._real]


class InputCanaryAudit(Callback):
    """Audit a run with your own canary examples: each is added to the training set with probability 1/2
    (:meth:`wrap`), and after fit the ones with the lowest loss under the trained model are guessed "in".

    Good canaries are examples the model would not fit without seeing them: mislabelled or out-of-distribution
    inputs, one per canary (e.g. a rare token, a pixel pattern, a random label). Each canary that is included is an
    ordinary example of the training set: the run's ε covers it, and the real examples' guarantee is unchanged; the
    trained model carries what it learned from them.

    The number of included canaries changes N, hence q = B/N, by at most ``m/2`` examples; the guesses use the losses
    only. Audit a rehearsal run and publish a model trained on the real data alone, or publish the audited model
    knowingly.

    Args:
        canaries: the canary examples, each as the training dataset's items are (e.g. ``(x, y)``).
        loss_fn: per-sample losses of a collated batch under the module, ``loss_fn(module, batch) -> (b,)``.
        confidence: the probability with which the lower bound holds.
        guess_fractions: guess counts to try, as fractions of the canaries (Bonferroni-corrected).
        delta: δ of the audited claim (default: the strategy's δ).
        on_violation: ``"error"`` (raise :class:`lightning_dp.errors.PrivacyAuditError`) or ``"warn"`` when the
            bound exceeds the claim.
        collate_fn: how canaries are batched for scoring (default: torch's ``default_collate``).
        batch_size: canaries scored at once.
        seed: fix the membership draw (tests only; default: fresh OS entropy).

    Raises:
        DPMisconfigurationError: for invalid arguments; at the start of fit when the training set was not passed
            through :meth:`wrap`.

    Example:
        >>> audit = InputCanaryAudit(canaries, loss_fn=per_sample_loss)  # doctest: +SKIP
        >>> train_set = audit.wrap(train_set)  # doctest: +SKIP
        >>> L.Trainer(strategy=DPStrategy(target_epsilon=2.0), callbacks=[audit]).fit(model, loader(train_set))
        ... # doctest: +SKIP
        >>> audit.epsilon_lower_bound, audit.claimed_epsilon  # doctest: +SKIP
    """

    def __init__(
        self,
        canaries: Sequence[Any],
        loss_fn: LossFn,
        confidence: float = 0.95,
        guess_fractions: Sequence[float] | None = None,
        delta: float | None = None,
        on_violation: OnViolation = "error",
        collate_fn: Callable[[list[Any]], Any] | None = None,
        batch_size: int = 256,
        seed: int | None = None,
    ) -> None:
        check_audit_options(len(canaries), confidence, on_violation)
        self.canaries = list(canaries)
        self.loss_fn = loss_fn
        self.confidence = float(confidence)
        self.guess_fractions = guess_fractions
        self.delta = delta
        self.on_violation = on_violation
        self.collate_fn = collate_fn or default_collate
        self.batch_size = int(batch_size)
        source = stream_source(fresh_seed() if seed is None else seed, "audit", -1)
        self._included = (source.uniform(len(self.canaries)) < 0.5).numpy()
        #: the audited ε lower bound (None before the end of fit)
        self.epsilon_lower_bound: float | None = None
        #: the run's claimed ε at the audit's δ (None before the end of fit)
        self.claimed_epsilon: float | None = None
        #: the full outcome (None before the end of fit)
        self.result: AuditResult | None = None
        #: per canary, minus its loss under the trained model (None before the end of fit)
        self.scores: np.ndarray | None = None

    @property
    def included(self) -> np.ndarray:
        """Which canaries are in the training set (secret until the end of fit)."""
        return self._included.copy()

    def wrap(self, dataset: Dataset) -> CanaryDataset:
        """The training set with this audit's "in" canaries appended: train on it."""
        return CanaryDataset(dataset, [c for c, keep in zip(self.canaries, self._included) if keep], self)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check that the run trains on :meth:`wrap`'s dataset."""
        require_dp_strategy(trainer, self)
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if not (isinstance(dataset, CanaryDataset) and dataset.owner is self):
            raise DPMisconfigurationError(
                "InputCanaryAudit: the training set does not hold this audit's canaries. Train on"
                " `audit.wrap(train_set)` (the real set plus the canaries drawn into the audit)."
            )
        self.epsilon_lower_bound = self.claimed_epsilon = self.result = self.scores = None
        notice(f"lightning_dp audit: {len(self.canaries)} input canaries, about half in the training set.")

    @torch.no_grad()
    def _scores(self, module: pl.LightningModule) -> np.ndarray:
        was_training = module.training
        module.eval()
        try:
            out = []
            for start in range(0, len(self.canaries), self.batch_size):
                batch = self.collate_fn(self.canaries[start : start + self.batch_size])
                batch = module.transfer_batch_to_device(batch, module.device, 0)
                out.append(-self.loss_fn(module, batch).detach().double().cpu().reshape(-1))
            return torch.cat(out).numpy()
        finally:
            module.train(was_training)

    def audit(self, trainer: pl.Trainer, module: pl.LightningModule) -> AuditResult:
        """Score the canaries with ``module`` and bound ε beside the strategy's claim (sets the attributes)."""
        strategy = require_dp_strategy(trainer, self)
        delta = strategy.delta if self.delta is None else self.delta
        self.scores = self._scores(module)
        if self.scores.shape != self._included.shape:
            raise DPMisconfigurationError(
                f"loss_fn must return one loss per example: got {self.scores.size} for {len(self.canaries)} canaries."
            )
        eps, guesses, correct = epsilon_lower_bound_from_scores(
            self.scores, self._included, delta, self.confidence, self.guess_fractions
        )
        claimed = float(strategy.ledger.epsilon(delta))
        m = len(self.canaries)
        self.result = AuditResult(eps, claimed, delta, self.confidence, m, guesses, correct)
        self.epsilon_lower_bound, self.claimed_epsilon = eps, claimed
        return self.result

    def dp_summary_figures(self, strategy: Any) -> dict[str, float]:
        """The audit's figures for the privacy summary (computed now if the end of fit has not yet done it)."""
        trainer = strategy.lightning_module.trainer
        result = self.result if self.result is not None else self.audit(trainer, strategy.lightning_module)
        return result.figures()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Score the canaries, log and print the bound beside the claim, and raise if it exceeds the claim."""
        if not trainer.is_global_zero:
            return
        result = self.result if self.result is not None else self.audit(trainer, pl_module)
        log_final(trainer, {k: result.figures()[k] for k in ("audit/epsilon_lower_bound", "audit/claimed_epsilon")})
        (warn if result.violated else notice)(result.describe())
        result.verdict(self.on_violation)


__all__ = ["CanaryDataset", "InputCanaryAudit", "LossFn"]
