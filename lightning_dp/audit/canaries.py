"""``CanaryAudit``: white-box gradient canaries in the user's own run, and an ε lower bound after fit.

Each of ``m`` canaries is a *Dirac gradient*: ±``canary_norm``·C on one coordinate of the trainable parameters
(distinct coordinates, random signs). Each is in the audit's "in" set with probability 1/2; an "in" canary enters
each step's clipped sum with the same Poisson probability q as a real example, after passing through the run's
clipping rule (:func:`lightning_dp.clipping.clip_factors`: its norm is far above C, so the rule decides its size).
The strategy then noises the sum as usual. After fit each canary is scored by the sum over steps of the private
gradient on its coordinate (times its sign), the highest scores are guessed "in" and the lowest "out", and the
correct guesses give the lower bound of :mod:`lightning_dp.audit.statistics`.

The canaries are data-independent additions to the clipped sum, so the real examples' guarantee is unchanged; but the
model trained with them carries them (see the docs page "Audit your run").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_dp import clipping
from lightning_dp.audit.result import AuditResult, OnViolation, check_audit_options
from lightning_dp.audit.statistics import (
    default_guess_fractions,
    epsilon_lower_bound_from_scores,
    max_epsilon_lower_bound,
)
from lightning_dp.callbacks._utils import require_dp_strategy
from lightning_dp.console import notice, warn
from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.randomness import RandomSource, stream_source
from lightning_dp.reporting import log_final

if TYPE_CHECKING:
    from lightning_dp.strategy import DPStrategy

#: the step index of the draws made once per audit (coordinates, signs, membership)
_SETUP_STEP = -1


class CanaryAudit(Callback):
    """Audit the run it is attached to with white-box gradient canaries: after fit, an ε lower bound beside the claim.

    Implements :class:`lightning_dp.protocols.AddsToClippedSum` (the strategy lets it add the included canaries to
    each step's clipped sum, on global rank 0, before the noise) and :class:`lightning_dp.protocols.ReportsFigures`
    (the bound goes into :class:`lightning_dp.callbacks.PrivacySummary`). At the end of fit it logs
    ``audit/epsilon_lower_bound`` and ``audit/claimed_epsilon`` to every logger and prints them side by side.

    A correct run audits below its claim (with probability ≥ ``confidence``), usually far below: the canaries are
    worst-case in direction and size, but one run can only show so much (:func:`max_epsilon_lower_bound`, about 5.8
    for 1000 canaries at 95 %, 5.3 after the correction for trying six guess counts; printed at the start of fit).
    A run whose clipping or noise is broken audits above it.

    The canaries cost the model, not the real examples' privacy: they are extra, data-independent contributions of
    norm at most the clipping rule's sensitivity, each in about ``q·m/2`` steps' sums, so the real examples keep
    their guarantee; the trained model carries them (on ``m`` coordinates). Audit a rehearsal run and publish a model
    trained without the callback, or publish the audited model knowingly.

    Args:
        num_canaries: m, the number of canaries (at most the number of trainable coordinates).
        confidence: the probability with which the lower bound holds.
        canary_norm: each canary's gradient norm before clipping, in units of C (above 1: the rule clips it).
        guess_fractions: guess counts to try, as fractions of the canaries (Bonferroni-corrected); default
            :func:`lightning_dp.audit.statistics.default_guess_fractions`.
        delta: δ of the audited claim (default: the strategy's δ).
        on_violation: ``"error"``: raise :class:`lightning_dp.errors.PrivacyAuditError` at the end of fit when the
            bound exceeds the claim; ``"warn"``: only print it.
        seed: fix the audit's randomness (tests only); by default it comes from the strategy's ``"audit"`` stream
            (fresh OS entropy per fit).

    Under per-layer clipping a canary (one coordinate, so one layer) is clipped to that layer's bound C/√L: the
    audit is then weaker (its canaries are √L times smaller than an example may be) but still catches missing noise
    or clipping.

    Raises:
        DPMisconfigurationError: for invalid arguments; at setup without ``DPStrategy``, or with fewer trainable
            coordinates than canaries.

    Example:
        >>> audit = CanaryAudit(num_canaries=1000)
        >>> trainer = L.Trainer(strategy=DPStrategy(target_epsilon=2.0), callbacks=[audit])  # doctest: +SKIP
        >>> trainer.fit(model, dm)  # doctest: +SKIP
        >>> audit.epsilon_lower_bound, audit.claimed_epsilon  # doctest: +SKIP
    """

    def __init__(
        self,
        num_canaries: int = 1000,
        confidence: float = 0.95,
        canary_norm: float = 10.0,
        guess_fractions: Sequence[float] | None = None,
        delta: float | None = None,
        on_violation: OnViolation = "error",
        seed: int | None = None,
    ) -> None:
        check_audit_options(num_canaries, confidence, on_violation)
        if not canary_norm > 1.0:
            raise DPMisconfigurationError(
                f"canary_norm must exceed 1 (a canary's gradient norm in units of C, so that the clipping rule bounds"
                f" it), got {canary_norm}."
            )
        self.num_canaries = num_canaries
        self.confidence = float(confidence)
        self.canary_norm = float(canary_norm)
        self.guess_fractions = guess_fractions
        self.delta = delta
        self.on_violation = on_violation
        self.seed = seed
        #: the audited ε lower bound (None before the end of fit)
        self.epsilon_lower_bound: float | None = None
        #: the run's claimed ε at the audit's δ (None before the end of fit)
        self.claimed_epsilon: float | None = None
        #: the full outcome (None before the end of fit)
        self.result: AuditResult | None = None
        self._names: list[str] = []  # parameter of each canary (by name)
        self._index: Tensor = torch.zeros(0, dtype=torch.long)  # flat coordinate of each canary in its parameter
        self._sign: Tensor = torch.zeros(0)
        self._included = torch.zeros(0, dtype=torch.bool)  # the audit's "in" set
        self._scores = torch.zeros(0, dtype=torch.float64)
        self._inclusions = torch.zeros(0, dtype=torch.long)  # steps each canary entered the sum
        self._params: dict[str, nn.Parameter] = {}
        self._groups: dict[str, Tensor] = {}  # canary ids per parameter name

    # ------------------------------------------------------------------ public state
    @property
    def included(self) -> np.ndarray:
        """Which canaries are in the audit's "in" set (secret until the end of fit)."""
        return self._included.numpy().copy()

    @property
    def inclusions(self) -> np.ndarray:
        """Per canary, the number of steps whose clipped sum it entered (0 for "out" canaries)."""
        return self._inclusions.numpy().copy()

    @property
    def scores(self) -> np.ndarray:
        """Per canary, the sum over steps of the private gradient on its coordinate, times its sign."""
        return self._scores.numpy().copy()

    # ------------------------------------------------------------------ setup
    def _source(self, strategy: DPStrategy, step: int) -> RandomSource:
        if self.seed is not None:
            return stream_source(self.seed, "audit", step)
        return strategy.random_source("audit", step)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check the strategy and the clipping rule."""
        if stage != "fit":
            return
        strategy = require_dp_strategy(trainer, self)
        delta = strategy.delta if self.delta is None else self.delta
        if 2 * self.num_canaries * delta > 1:
            raise DPMisconfigurationError(
                f"2·num_canaries·δ = {2 * self.num_canaries * delta:.3g} > 1: the one-run test cannot reject anything"
                " with this many canaries at this δ. Use fewer canaries or a smaller δ."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Place the canaries (once per audit; a later fit continues it) and say what the audit can show."""
        strategy = require_dp_strategy(trainer, self)
        named = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        if not self._names:
            self._place(strategy, named)
        missing = sorted(set(self._names) - set(named))
        if missing:
            raise DPMisconfigurationError(
                f"CanaryAudit placed canaries on parameters that are no longer trainable: {missing[:3]}. Keep the"
                " trainable set of the first fit, or start a new CanaryAudit."
            )
        self._params = named
        self._groups = self._by_parameter()
        self.epsilon_lower_bound = self.claimed_epsilon = self.result = None
        delta = strategy.delta if self.delta is None else self.delta
        tries = len(default_guess_fractions() if self.guess_fractions is None else self.guess_fractions)
        ceiling = max_epsilon_lower_bound(self.num_canaries, delta, 1.0 - (1.0 - self.confidence) / tries)
        notice(
            f"lightning_dp audit: {self.num_canaries} gradient canaries (about half of them included, each with"
            f" probability q per step); the audit can show at most ε ≥ {ceiling:.3g} at {self.confidence:.0%}"
            " confidence."
        )

    def _place(self, strategy: DPStrategy, named: Mapping[str, nn.Parameter]) -> None:
        sizes = [p.numel() for p in named.values()]
        total = sum(sizes)
        if total < self.num_canaries:
            raise DPMisconfigurationError(
                f"CanaryAudit needs one trainable coordinate per canary: the model has {total}, fewer than"
                f" num_canaries={self.num_canaries}. Use fewer canaries (fewer give a weaker bound) or the multi-run"
                " audit (lightning_dp.audit.multi_run_audit) for a small model."
            )
        source = self._source(strategy, _SETUP_STEP)
        flat = source.permutation(total)[: self.num_canaries]
        offsets = torch.tensor([0, *np.cumsum(sizes).tolist()])
        owner = torch.searchsorted(offsets, flat, right=True) - 1
        names = list(named)
        self._names = [names[i] for i in owner.tolist()]
        self._index = flat - offsets[owner]
        self._sign = torch.where(source.uniform(self.num_canaries) < 0.5, -1.0, 1.0)
        self._included = source.uniform(self.num_canaries) < 0.5
        self._scores = torch.zeros(self.num_canaries, dtype=torch.float64)
        self._inclusions = torch.zeros(self.num_canaries, dtype=torch.long)

    def _by_parameter(self) -> dict[str, Tensor]:
        """Canary ids per parameter name."""
        out: dict[str, list[int]] = {}
        for i, name in enumerate(self._names):
            out.setdefault(name, []).append(i)
        return {name: torch.tensor(ids, dtype=torch.long) for name, ids in out.items()}

    # ------------------------------------------------------------------ during training
    def dp_add_to_clipped_sum(self, strategy: DPStrategy, step: int, summed: dict[nn.Parameter, Tensor]) -> None:
        """Add the "in" canaries drawn for step ``step`` (each with probability q), clipped by the run's rule."""
        if not self._names:
            raise RuntimeError("CanaryAudit: the canaries were not placed (on_train_start did not run).")
        q = float(strategy.sample_rate)
        drawn = (self._source(strategy, step).uniform(self.num_canaries) < q) & self._included
        raw, factors = self._clipped(strategy)
        values = raw * factors * self._sign.float()
        for name, ids in self._groups.items():
            ids = ids[drawn[ids]]
            param = self._params[name]
            if not ids.numel() or param not in summed:
                continue
            target = summed[param]
            if not target.is_contiguous():
                target = summed[param] = target.contiguous()
            target.view(-1).index_add_(0, self._index[ids].to(target.device), values[ids].to(target))
            self._inclusions[ids] += 1

    def _clipped(self, strategy: DPStrategy) -> tuple[Tensor, Tensor]:
        """Each canary's gradient value before clipping (``canary_norm``·C) and its factor under the run's rule. A
        canary lies in one layer, so per-layer clipping bounds it by that layer's C/√L.
        """
        c = strategy.max_grad_norm
        raw = torch.full((self.num_canaries,), self.canary_norm * c, dtype=torch.float32)
        if strategy.clipping == "per_layer":
            bound = clipping.per_layer_bound(c, len(strategy.clipping_groups))
            return raw, clipping.clip_factors(raw, bound, "flat")
        return raw, clipping.clip_factors(raw, c, strategy.clipping)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Score: add each canary's coordinate of the private gradient (times its sign) to its score."""
        if not trainer.is_global_zero or not self._names:
            return
        for name, ids in self._groups.items():
            grad = self._params[name].grad
            if grad is None:
                continue
            values = grad.detach().reshape(-1)[self._index[ids].to(grad.device)].double().cpu()
            self._scores[ids] += values * self._sign[ids].double()

    # ------------------------------------------------------------------ after training
    def audit(self, strategy: DPStrategy) -> AuditResult:
        """The lower bound from the scores so far, beside the strategy's claimed ε (also sets the attributes)."""
        delta = strategy.delta if self.delta is None else self.delta
        eps, guesses, correct = epsilon_lower_bound_from_scores(
            self._scores.numpy(), self._included.numpy(), delta, self.confidence, self.guess_fractions
        )
        claimed = float(strategy.ledger.epsilon(delta))
        self.result = AuditResult(eps, claimed, delta, self.confidence, self.num_canaries, guesses, correct)
        self.epsilon_lower_bound, self.claimed_epsilon = eps, claimed
        return self.result

    def dp_summary_figures(self, strategy: DPStrategy) -> dict[str, float]:
        """The audit's figures for the privacy summary (computed now if the end of fit has not yet done it)."""
        if not self._names:
            return {}
        result = self.result if self.result is not None else self.audit(strategy)
        return result.figures()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute the bound, log it beside the claim, print both, and raise if it exceeds the claim."""
        if not trainer.is_global_zero or not self._names:
            return
        strategy = require_dp_strategy(trainer, self)
        result = self.result if self.result is not None else self.audit(strategy)
        log_final(trainer, {k: result.figures()[k] for k in ("audit/epsilon_lower_bound", "audit/claimed_epsilon")})
        if result.violated:
            warn(result.describe())
        else:
            notice(result.describe())
        result.verdict(self.on_violation)

    # ------------------------------------------------------------------ checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        """The canaries' placement, membership, scores and inclusion counts (tensors and plain values)."""
        return {
            "names": list(self._names),
            "index": self._index,
            "sign": self._sign,
            "included": self._included,
            "scores": self._scores,
            "inclusions": self._inclusions,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue an audit from a checkpoint."""
        if len(state_dict.get("names", [])) != self.num_canaries:
            raise DPMisconfigurationError(
                f"The checkpoint's audit has {len(state_dict.get('names', []))} canaries, this CanaryAudit"
                f" {self.num_canaries}: resume with the same num_canaries."
            )
        self._names = list(state_dict["names"])
        self._index = state_dict["index"].long()
        self._sign = state_dict["sign"].float()
        self._included = state_dict["included"].bool()
        self._scores = state_dict["scores"].double()
        self._inclusions = state_dict["inclusions"].long()


__all__ = ["CanaryAudit"]
