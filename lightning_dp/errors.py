"""Exceptions raised by lightning_dp.

Every error names the cause and the fix. They subclass Lightning's ``MisconfigurationException`` so code that
already catches Lightning configuration errors keeps working.
"""

from lightning.fabric.utilities.exceptions import MisconfigurationException


class DPMisconfigurationError(MisconfigurationException):
    """A model, trainer or data setting that differential privacy cannot honour."""


class UnsupportedLayerError(DPMisconfigurationError):
    """A trainable layer for which no per-sample gradient rule is known."""


class PrivacyTargetError(DPMisconfigurationError):
    """A privacy target (ε, δ) that cannot be met with the planned training run."""


class NonFiniteGradientError(DPMisconfigurationError):
    """Examples whose per-sample gradient norm is NaN or infinite (raised by engines built with
    ``nonfinite="error"``).

    Attributes:
        count: how many examples of the micro-batch had a non-finite per-sample gradient norm.
        indices: their positions in the micro-batch (0-based).
    """

    def __init__(self, message: str, count: int = 0, indices: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.count = count
        self.indices = indices


class PrivacyAuditError(RuntimeError):
    """A privacy audit found an ε lower bound above the claimed ε: the mechanism does not deliver its claim (or,
    with probability at most ``1 − confidence``, the audit was unlucky). Raised by :mod:`lightning_dp.audit`.

    Attributes:
        epsilon_lower_bound: the audited lower bound.
        claimed_epsilon: the ε the run claims.
    """

    def __init__(self, message: str, epsilon_lower_bound: float = 0.0, claimed_epsilon: float = 0.0) -> None:
        super().__init__(message)
        self.epsilon_lower_bound = epsilon_lower_bound
        self.claimed_epsilon = claimed_epsilon
