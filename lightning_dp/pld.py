"""Deprecated: the PLD accountant moved to :mod:`lightning_dp.accounting`. Importing from here still works for this
release, with a warning.
"""

from typing import Any

from lightning_dp._moved import moved_attribute


def __getattr__(name: str) -> Any:
    return moved_attribute("lightning_dp.pld", name, ("lightning_dp.accounting.pld",), "lightning_dp.accounting")
