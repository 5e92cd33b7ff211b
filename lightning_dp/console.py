"""Console output: lightning_dp's messages on lines of their own, and quiet runs (opt-in, used by the examples).

lightning_dp prints its notices and warnings through :func:`notice` and :func:`warn`: like Lightning's
``rank_zero_info`` / ``rank_zero_warn`` (rank zero only, through Lightning's logger and ``warnings``), but an open
progress bar is cleared first and redrawn after, so that a message never lands at the end of a progress-bar line.
On import, lightning_dp also hides one deprecation notice that Lightning's own code raises on recent torch releases
(:data:`FRAMEWORK_DEPRECATIONS`): nothing for a user to do, and it would appear in every run.

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
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from tqdm import tqdm

#: Lightning's informational lines that carry nothing about the run (matched at the start of the message).
CHATTER: tuple[str, ...] = (
    r"GPU available: ",
    r"TPU available: ",
    r"HPU available: ",
    r"💡 Tip: ",
    r"`Trainer\.(fit|validate|test|predict)` stopped: ",
)

#: Deprecation notices raised inside Lightning's own code, hidden from the import of lightning_dp on:
#: ``(category, message regex, module regex)``. torch deprecated ``LeafSpec``; Lightning 2.6's own ``_pytree`` still
#: uses it, in every fit. Only this message, raised from that Lightning module, is hidden.
FRAMEWORK_DEPRECATIONS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
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


@contextmanager
def progress_bars_cleared() -> Iterator[None]:
    """Clear every open tqdm progress bar (Lightning's ``TQDMProgressBar`` included) and redraw them on exit.

    Text written to the terminal inside the block starts on a line of its own instead of at the end of a bar's line.
    """
    with tqdm.external_write_mode():
        yield


def notice(message: str) -> None:
    """Print an informational ``message`` on rank zero (Lightning's ``rank_zero_info``), never glued to a bar.

    Args:
        message: the text; lightning_dp's messages start with ``"lightning_dp: "`` or the callback's name.

    Example:
        >>> notice("lightning_dp: an example notice")
    """
    with progress_bars_cleared():
        rank_zero_info(message)


def warn(message: str, category: type[Warning] | None = None) -> None:
    """Raise a warning on rank zero (Lightning's ``rank_zero_warn``), never printed at the end of a bar's line.

    Args:
        message: the text.
        category: the warning class (``UserWarning`` by default).
    """
    kwargs: dict[str, Any] = {} if category is None else {"category": category}
    with progress_bars_cleared():
        rank_zero_warn(message, stacklevel=5, **kwargs)


def hide_framework_deprecations() -> None:
    """Hide the deprecation notices of :data:`FRAMEWORK_DEPRECATIONS` (raised inside Lightning, not by user code).

    Called once when lightning_dp is imported; every other warning still shows.
    """
    for category, message, module in FRAMEWORK_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


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


__all__ = [
    "CHATTER",
    "DATALOADER_WORKERS_HINT",
    "FRAMEWORK_DEPRECATIONS",
    "HARMLESS_WARNINGS",
    "ChatterFilter",
    "hide_framework_deprecations",
    "notice",
    "progress_bars_cleared",
    "quiet_lightning",
    "warn",
]
