"""Privacy auditing: an empirical *lower* bound on ε from the user's own run.

- :func:`one_run_epsilon_lower_bound` (and :func:`one_run_p_value`, :func:`epsilon_lower_bound_from_scores`): the
  test of Steinke, Nasr & Jagielski (NeurIPS 2023, "Privacy auditing with one (1) training run").
- :class:`CanaryAudit`: white-box gradient canaries inserted into a ``DPStrategy`` run, scored after fit.
- :class:`InputCanaryAudit`: the user's own canary examples, added to the training set at random and scored by the
  trained model's loss (black-box).
- :func:`multi_run_audit`: many small runs with and without one canary, for the tightest bound.

See the docs page "Audit your run".
"""

from lightning_dp.audit.canaries import CanaryAudit
from lightning_dp.audit.input_canaries import CanaryDataset, InputCanaryAudit
from lightning_dp.audit.multi_run import TrainAndScore, draw_memberships, multi_run_audit
from lightning_dp.audit.result import AuditResult
from lightning_dp.audit.statistics import (
    count_correct_guesses,
    default_guess_fractions,
    epsilon_lower_bound_from_scores,
    max_epsilon_lower_bound,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)

__all__ = [
    "AuditResult",
    "CanaryAudit",
    "CanaryDataset",
    "InputCanaryAudit",
    "TrainAndScore",
    "count_correct_guesses",
    "default_guess_fractions",
    "draw_memberships",
    "epsilon_lower_bound_from_scores",
    "max_epsilon_lower_bound",
    "multi_run_audit",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
]
