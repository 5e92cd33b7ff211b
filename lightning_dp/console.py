"""Quiet console output: hide framework messages that say nothing about the run (opt-in, used by the examples).

Lightning prints, for every ``Trainer``, which accelerators exist ("GPU available: False, used: False", "TPU
available: ..."), advertisements for its cloud products ("💡 Tip: ... litlogger / litmodels"), a line each time a
fit ends by its own limit ("`Trainer.fit` stopped: `max_epochs=30` reached.") and deprecation notices raised inside
its own code. A script that builds several trainers repeats them all. :func:`quiet_lightning` filters exactly these
messages (a fixed list, :data:`CHATTER` and :data:`HARMLESS_WARNINGS`) and nothing else: messages of lightning_dp
(notices, warnings, errors), and every other Lightning warning or error, still show.

It is opt-in: the library itself never calls it.
"""

from __future__ import annotations

import logging
import re
import warnings
from types import TracebackType
from typing import Any

from lightning.fabric.utilities.warnings import PossibleUserWarning

#: Lightning's informational lines that carry nothing about the run (matched at the start of the message).
CHATTER: tuple[str, ...] = (
    r"GPU available: ",
    r"TPU available: ",
    r"HPU available: ",
    r"💡 Tip: ",
    r"`Trainer\.(fit|validate|test|predict)` stopped: ",
)

#: Warnings that are known to be harmless: ``(category, message regex)``.
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch deprecated ``LeafSpec``; Lightning 2.6's own ``_pytree`` still uses it. Nothing for a user to do.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # A script that trains on the CPU on purpose (the examples) on a machine that has a GPU.
    (PossibleUserWarning, r"GPU available but not used"),
)

#: Lightning's hint to add dataloader workers: noise for in-memory tensors, useful for data read from disk.
DATALOADER_WORKERS_HINT = r".*does not have many workers which may be a bottleneck"

#: Loggers through which Lightning's ``rank_zero_info`` messages go.
LIGHTNING_LOGGERS: tuple[str, ...] = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
    "lightning.pytorch",
    "lightning.fabric",
)

#: Messages that are never hidden, whatever they say: lightning_dp's own.
_OWN_PREFIXES = ("lightning_dp", "PrivacyBudget", "LP-FT", "SPARTA", "DPStrategy")


class ChatterFilter(logging.Filter):
    """A logging filter that drops records whose message starts with one of :data:`CHATTER`'s patterns.

    Args:
        patterns: regexes matched at the start of the message.
    """

    def __init__(self, patterns: tuple[str, ...] = CHATTER) -> None:
        super().__init__()
        self._pattern = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record unless it is chatter (lightning_dp's own messages are always kept)."""
        message = record.getMessage()
        if message.startswith(_OWN_PREFIXES):
            return True
        return self._pattern is None or self._pattern.match(message) is None


class quiet_lightning:  # noqa: N801  (used like a function, and as a context manager)
    """Hide Lightning's messages that say nothing about the run; keep everything else.

    Hidden: the lines of :data:`CHATTER` (accelerator availability, product tips, "`Trainer.fit` stopped: ..."), the
    warnings of :data:`HARMLESS_WARNINGS` and, with ``dataloader_workers_hint=False``, Lightning's advice to add
    dataloader workers. Never hidden: anything lightning_dp says, and any other warning or error.

    Call it once at the start of a script (the filters stay until :meth:`close`), or use it as a context manager.

    Args:
        dataloader_workers_hint: keep Lightning's "does not have many workers" hint (turn it off for in-memory data).

    Example:
        >>> from lightning_dp.console import quiet_lightning
        >>> with quiet_lightning(dataloader_workers_hint=False):
        ...     pass  # build trainers and fit here
    """

    def __init__(self, dataloader_workers_hint: bool = True) -> None:
        self._filter = ChatterFilter()
        self._loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
        for logger in self._loggers:
            logger.addFilter(self._filter)
        self._warnings = warnings.catch_warnings()  # restores the warning filters on close
        self._warnings.__enter__()
        for category, message in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        if not dataloader_workers_hint:
            warnings.filterwarnings("ignore", message=DATALOADER_WORKERS_HINT, category=PossibleUserWarning)
        self.closed = False

    def close(self) -> None:
        """Remove the filters (show everything again)."""
        if self.closed:
            return
        for logger in self._loggers:
            logger.removeFilter(self._filter)
        self._warnings.__exit__(None, None, None)
        self.closed = True

    def __enter__(self) -> quiet_lightning:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, *args: Any
    ) -> None:
        self.close()


__all__ = ["CHATTER", "DATALOADER_WORKERS_HINT", "HARMLESS_WARNINGS", "ChatterFilter", "quiet_lightning"]
