"""Deprecated: the accountants moved to :mod:`lightning_dp.accounting` (one package: accountants, ledger,
calibration). Importing from here still works for this release, with a warning.
"""

from typing import Any

from lightning_dp._moved import moved_attribute

_HOMES = ("lightning_dp.accounting", "lightning_dp.accounting.base", "lightning_dp.accounting.prv")


def __getattr__(name: str) -> Any:
    return moved_attribute("lightning_dp.accountants", name, _HOMES, "lightning_dp.accounting")
