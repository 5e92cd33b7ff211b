"""The privacy journal: an append-only record, on disk, of every private step a run executed.

A checkpoint records the ledger as it was when the checkpoint was written. Steps taken *after* it — whose models,
metrics and later checkpoints may already be out in the world — are not in it. Resuming from that checkpoint and
counting only its ledger would drop them from ε. The journal closes that gap: each step's ledger event is appended
and flushed before the step's gradient is written into the model, and a resume compares the checkpoint with the
journal. The ledger of a run is always the composition of every event in its journal.

Format: JSON lines. A ``"run"`` header (run id, δ, version), ``"session"`` lines (each fit: its branch and first
step), ``"carried"`` lines (releases made before the journal existed, from a trusted checkpoint) and ``"step"``
lines (``step``, ``branch``, and the ledger ``event`` or null). A line is complete only with its newline; an
incomplete last line (a crash while writing) belongs to a step whose gradient was never written.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lightning_dp.accounting import MechanismSegment, PrivacyLedger
from lightning_dp.errors import DPMisconfigurationError

JOURNAL_VERSION = 1


class JournalError(DPMisconfigurationError):
    """A journal that does not match the checkpoint resumed from, or cannot be read or written."""


@dataclass
class JournalContents:
    """What a journal file holds.

    Attributes:
        run_id: the run's identifier.
        header: the ``"run"`` header record.
        steps: the ``"step"`` records, in order.
        sessions: the ``"session"`` records, in order.
    """

    run_id: str
    header: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    carried: list[dict[str, Any]] = field(default_factory=list)

    @property
    def branches(self) -> int:
        """The number of branches (a deliberate fork starts a new one)."""
        return 1 + max([int(s.get("branch", 0)) for s in self.sessions] + [0])

    def ledger(self, records: int | None = None) -> PrivacyLedger:
        """The ledger of the carried-over releases and the first ``records`` step records (all by default)."""
        ledger = PrivacyLedger()
        for rec in self.carried:
            for seg in rec["ledger"]["segments"]:
                ledger.record(seg["noise_multiplier"], seg["sample_rate"], seg["steps"], seg["mechanism"])
        for rec in self.steps[:records]:
            event = rec.get("event")
            if event is not None:
                ledger.record(event["noise_multiplier"], event["sample_rate"], event["steps"], event["mechanism"])
        return ledger


class PrivacyJournal:
    """An append-only journal file of one run. Use :meth:`create` for a new run and :meth:`open` to continue one.

    Args:
        path: the journal file.
        run_id: the run's identifier (the header's).

    Example:
        >>> import tempfile
        >>> journal = PrivacyJournal.create(tempfile.mkdtemp(), delta=1e-5)
        >>> journal.append_step(0, 0, MechanismSegment(1.0, 0.01, 1))
        >>> journal.read().ledger().steps
        1
    """

    def __init__(self, path: str | os.PathLike, run_id: str) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self._file: IO[str] | None = None
        #: step records written so far (read from the file when opened)
        self.records = 0

    # ------------------------------------------------------------------ creation and reading
    @classmethod
    def create(cls, directory: str | os.PathLike, delta: float, run_id: str | None = None) -> PrivacyJournal:
        """Start the journal of a new run in ``directory`` (file ``<run_id>.jsonl``).

        Raises:
            JournalError: if the directory cannot be written.
        """
        run_id = run_id or uuid.uuid4().hex
        path = Path(directory) / f"{run_id}.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "x", encoding="utf-8") as f:
                header = {"type": "run", "run_id": run_id, "version": JOURNAL_VERSION, "delta": delta}
                f.write(json.dumps({**header, "time": time.time()}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise JournalError(
                f"Cannot write the privacy journal {path} ({err}). Every private step is journaled before its update is"
                " applied; point DPStrategy(journal_dir=...) at a writable directory."
            ) from err
        return cls(path, run_id)

    @classmethod
    def open(cls, path: str | os.PathLike) -> PrivacyJournal:
        """Open an existing journal to continue it.

        Raises:
            JournalError: if it cannot be read or is not a journal.
        """
        contents = cls.read_file(path)
        journal = cls(path, contents.run_id)
        journal.records = len(contents.steps)
        return journal

    @staticmethod
    def read_file(path: str | os.PathLike) -> JournalContents:
        """Parse a journal file (an incomplete last line is ignored: its step was never applied).

        Raises:
            JournalError: if the file cannot be read, has no run header, or has a corrupt complete line.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise JournalError(f"Cannot read the privacy journal {path} ({err}).") from err
        lines = text.split("\n")
        complete = lines[:-1]  # the text after the last newline is an incomplete record (or empty)
        records: list[dict[str, Any]] = []
        for number, line in enumerate(complete, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise JournalError(
                    f"The privacy journal {path} is corrupt at line {number}: it cannot be trusted to hold every step"
                    " of the run."
                ) from err
        if not records or records[0].get("type") != "run" or "run_id" not in records[0]:
            raise JournalError(f"{path} is not a lightning_dp privacy journal (no run header).")
        header = records[0]
        if header.get("version") != JOURNAL_VERSION:
            raise JournalError(f"{path} has journal version {header.get('version')!r}; expected {JOURNAL_VERSION}.")
        contents = JournalContents(run_id=str(header["run_id"]), header=header)
        for rec in records[1:]:
            kind = rec.get("type")
            if kind == "step":
                contents.steps.append(rec)
            elif kind == "session":
                contents.sessions.append(rec)
            elif kind == "carried":
                contents.carried.append(rec)
        return contents

    def read(self) -> JournalContents:
        """Parse this journal's file."""
        return self.read_file(self.path)

    # ------------------------------------------------------------------ appending
    def _handle(self) -> IO[str]:
        if self._file is None:
            try:
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (kept open across steps)
            except OSError as err:
                raise JournalError(f"Cannot append to the privacy journal {self.path} ({err}).") from err
        return self._file

    def _append(self, record: dict[str, Any]) -> None:
        f = self._handle()
        try:
            f.write(json.dumps(record) + "\n")
            f.flush()
        except OSError as err:
            raise JournalError(
                f"Cannot append to the privacy journal {self.path} ({err}); the step was not applied."
            ) from err

    def append_session(self, branch: int, start_step: int, **info: Any) -> None:
        """Record the start of a fit (its branch and first step)."""
        self._append({"type": "session", "branch": branch, "start": start_step, "time": time.time(), **info})
        self.sync()

    def append_carried(self, ledger_state: dict[str, Any]) -> None:
        """Record releases made before this journal existed (a trusted checkpoint's ledger)."""
        self._append({"type": "carried", "ledger": ledger_state, "time": time.time()})
        self.sync()

    def append_step(self, step: int, branch: int, event: MechanismSegment | None) -> None:
        """Record an executed step and its ledger event, flushed to the operating system before returning."""
        ev = None
        if event is not None:
            ev = {
                "noise_multiplier": event.noise_multiplier,
                "sample_rate": event.sample_rate,
                "steps": event.steps,
                "mechanism": event.mechanism,
            }
        self._append({"type": "step", "step": step, "branch": branch, "event": ev})
        self.records += 1

    def sync(self) -> None:
        """Force what was written to disk (before a checkpoint is written, and at the end of a fit)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Sync and close the file."""
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def find_journal(run_id: str, candidates: list[str | os.PathLike | None]) -> Path | None:
    """The first existing ``<run_id>.jsonl`` among candidate files or directories."""
    for cand in candidates:
        if cand is None:
            continue
        p = Path(cand)
        if p.is_dir():
            p = p / f"{run_id}.jsonl"
        if p.name == f"{run_id}.jsonl" and p.is_file():
            return p
    return None


__all__ = ["JOURNAL_VERSION", "JournalContents", "JournalError", "PrivacyJournal", "find_journal"]
