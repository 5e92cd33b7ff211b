"""Callbacks for private training: observability (private gradient-norm histograms, run summary), budget stops and
adaptive clipping.

They work with :class:`lightning_dp.DPStrategy` only. Statistics of private data are released either noised and
accounted (the default) or labelled ``nonprivate/`` as diagnostics outside the DP guarantee.
"""

from lightning_dp.callbacks.adaptive_clipping import AdaptiveClipping, quantile_update
from lightning_dp.callbacks.grad_norm_histogram import GradNormHistogram, NormHistogram, histogram_quantiles
from lightning_dp.callbacks.privacy_budget import PrivacyBudget
from lightning_dp.callbacks.privacy_summary import PrivacySummary, format_privacy_summary, privacy_summary

__all__ = [
    "AdaptiveClipping",
    "GradNormHistogram",
    "NormHistogram",
    "PrivacyBudget",
    "PrivacySummary",
    "format_privacy_summary",
    "histogram_quantiles",
    "privacy_summary",
    "quantile_update",
]
