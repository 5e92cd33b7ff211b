"""Privacy accounting: ε of the run's private releases, σ calibration and the ledger.

One package, one concept per module:

- :mod:`~lightning_dp.accounting.base`: :class:`MechanismSegment` and the :class:`Accountant` protocol;
- :mod:`~lightning_dp.accounting.pld`: :class:`PLDAccountant` (the default: Google's ``dp-accounting`` PLD bound);
- :mod:`~lightning_dp.accounting.prv`: :class:`PRVAccountant` (the ``prv-accountant`` package's bound, made fast);
- :mod:`~lightning_dp.accounting.rdp`: :class:`RDPAccountant` (cheap, loose; the others' fallback);
- :mod:`~lightning_dp.accounting.calibration`: :func:`calibrate_noise_multiplier`, :func:`compute_epsilon`,
  :func:`epsilon_of_segments`, :func:`combine_noise_multipliers`;
- :mod:`~lightning_dp.accounting.ledger`: :class:`PrivacyLedger`.

This ``__init__`` is the only re-export point: import from ``lightning_dp.accounting``.
"""

from lightning_dp.accounting.base import Accountant, EstimatingAccountant, MechanismSegment, gaussian_epsilon
from lightning_dp.accounting.calibration import (
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    RDP_ONLY_ABOVE,
    RELATIVE_EPS_ERROR,
    SCAN_WIDTH,
    calibrate_noise_multiplier,
    combine_noise_multipliers,
    compute_epsilon,
    default_accountant,
    epsilon_of_segments,
)
from lightning_dp.accounting.ledger import PrivacyLedger
from lightning_dp.accounting.pld import PLDAccountant
from lightning_dp.accounting.prv import PRVAccountant
from lightning_dp.accounting.rdp import RDPAccountant

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "RDP_ONLY_ABOVE",
    "RELATIVE_EPS_ERROR",
    "SCAN_WIDTH",
    "Accountant",
    "EstimatingAccountant",
    "MechanismSegment",
    "PLDAccountant",
    "PRVAccountant",
    "PrivacyLedger",
    "RDPAccountant",
    "calibrate_noise_multiplier",
    "combine_noise_multipliers",
    "compute_epsilon",
    "default_accountant",
    "epsilon_of_segments",
    "gaussian_epsilon",
]
