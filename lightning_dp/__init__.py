"""lightning_dp: differentially private training for PyTorch Lightning."""

from lightning_dp.accounting import (
    Accountant,
    PLDAccountant,
    PrivacyLedger,
    PRVAccountant,
    RDPAccountant,
    calibrate_noise_multiplier,
    compute_epsilon,
)
from lightning_dp.console import hide_framework_deprecations
from lightning_dp.errors import DPMisconfigurationError, PrivacyTargetError, UnsupportedLayerError
from lightning_dp.model_fixes import fix_model
from lightning_dp.model_parallel import DPModelParallelStrategy
from lightning_dp.strategy import DPStrategy

__version__ = "0.1.0"

hide_framework_deprecations()  # one notice raised inside Lightning on recent torch, in every fit

__all__ = [
    "Accountant",
    "PLDAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "DPMisconfigurationError",
    "DPModelParallelStrategy",
    "DPStrategy",
    "PrivacyLedger",
    "PrivacyTargetError",
    "UnsupportedLayerError",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "fix_model",
    "__version__",
]
