"""Choosing hyperparameters under DP: the batch-size advisor and the accounted search.

- :mod:`~lightning_dp.tuning.advisor`: σ√T per batch size for a fixed epoch budget (``python -m lightning_dp.tuning``).
- :mod:`~lightning_dp.tuning.distributions`: the distributions of the number of runs of a search.
- :mod:`~lightning_dp.tuning.accounting`: :func:`search_epsilon`, ε of a whole search (Papernot & Steinke, 2022), and
  the calibration of σ per run so that the search meets a target.
- :mod:`~lightning_dp.tuning.search`: :class:`PrivateSearch`, the search runner.
"""

from lightning_dp.tuning.accounting import calibrate_search_noise, search_epsilon, search_epsilon_of_plans
from lightning_dp.tuning.advisor import (
    DEFAULT_MIN_STEPS,
    DEFAULT_PLATEAU_TOLERANCE,
    BatchSizeAdvice,
    BatchSizeOption,
    advise_batch_size,
    main,
    plot_advice,
)
from lightning_dp.tuning.distributions import (
    GeometricRuns,
    PoissonRuns,
    RunsDistribution,
    TruncatedNegativeBinomialRuns,
)
from lightning_dp.tuning.report import RunResult, SearchResult
from lightning_dp.tuning.search import PrivateSearch, SearchSources, draw_search

__all__ = [
    "DEFAULT_MIN_STEPS",
    "DEFAULT_PLATEAU_TOLERANCE",
    "BatchSizeAdvice",
    "BatchSizeOption",
    "GeometricRuns",
    "PoissonRuns",
    "PrivateSearch",
    "RunResult",
    "SearchResult",
    "SearchSources",
    "RunsDistribution",
    "TruncatedNegativeBinomialRuns",
    "advise_batch_size",
    "calibrate_search_noise",
    "draw_search",
    "main",
    "plot_advice",
    "search_epsilon",
    "search_epsilon_of_plans",
]
