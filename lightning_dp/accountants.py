"""Deprecated: the accountants moved to :mod:`lightning_dp.accounting` (one package: accountants, ledger, calibration).

Importing from here still works for this release, with a warning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_HOMES = (
    "lightning_dp.accounting",
    "lightning_dp.accounting.base",
    "lightning_dp.accounting.prv",
    "lightning_dp.accounting.rdp",
)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    for home in _HOMES:
        module = importlib.import_module(home)
        if hasattr(module, name):
            warnings.warn(
                f"lightning_dp.accountants.{name} moved to lightning_dp.accounting; lightning_dp.accountants will be"
                " removed in the next release.",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(module, name)
    raise AttributeError(f"module 'lightning_dp.accountants' has no attribute {name!r}")
