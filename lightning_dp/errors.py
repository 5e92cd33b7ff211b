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
