"""Deprecated: the PLD accountant moved to :mod:`lightning_dp.accounting` (accountants, ledger, calibration).

Importing from here still works for this release, with a warning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_HOMES = ("lightning_dp.accounting.pld",)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    for home in _HOMES:
        module = importlib.import_module(home)
        if hasattr(module, name):
            warnings.warn(
                f"lightning_dp.pld.{name} moved to lightning_dp.accounting; lightning_dp.pld will be removed in"
                " the next release.",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(module, name)
    raise AttributeError(f"module 'lightning_dp.pld' has no attribute {name!r}")
