"""Deprecated import paths: a module that moved keeps answering, with a ``DeprecationWarning``, for one release."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from typing import Any


def moved_attribute(old: str, name: str, homes: Sequence[str], new: str | None = None) -> Any:
    """``name`` looked up on the deprecated module ``old``: found in the first of ``homes`` that has it.

    Args:
        old: the deprecated module's name (``lightning_dp.sampling``).
        name: the attribute asked for.
        homes: the modules it may have moved to, in order.
        new: where to import it from now (for the message); None: the home where it was found.

    Raises:
        AttributeError: for dunder names and names no home has.
    """
    if not name.startswith("__"):
        for home in homes:
            module = importlib.import_module(home)
            if hasattr(module, name):
                warnings.warn(
                    f"{old}.{name} moved to {new or home}.{name}; {old} will be removed in the next release.",
                    DeprecationWarning,
                    stacklevel=3,
                )
                return getattr(module, name)
    raise AttributeError(f"module {old!r} has no attribute {name!r}")
