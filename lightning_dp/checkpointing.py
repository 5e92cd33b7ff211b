"""A private run's identity across fits and checkpoints, and the checks a resume must pass.

:class:`RunState` holds the run id, its journal, the branch (a deliberate fork starts a new one) and the step count
of the current epoch. :func:`restore_run` decides whether a checkpoint's privacy state may be resumed: it must agree
with the checkpoint's progress and with the run's journal, and a checkpoint older than the last executed step (a
fork) is refused unless ``resume_policy="account_forks"`` keeps every executed step in the ledger.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lightning_dp.accounting import PrivacyLedger
from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.journal import JournalError, PrivacyJournal, find_journal

if TYPE_CHECKING:
    from collections.abc import Callable

    import lightning.pytorch as pl

    from lightning_dp.accounting import MechanismSegment

#: where checkpoints hold the privacy state
STATE_KEY = "lightning_dp"
_RUN_KEYS = ("run_id", "journal", "journal_records", "branch", "epoch", "epoch_first_step", "step_offset")


class ResumeError(DPMisconfigurationError):
    """A checkpoint whose privacy state cannot be resumed as it is (fork, missing journal, disagreement)."""


class Ranks(Protocol):
    """The place of this process among the ranks, and the broadcast between them (``DPStrategy`` provides it)."""

    @property
    def global_rank(self) -> int:
        """The rank of this process."""

    @property
    def world_size(self) -> int:
        """Number of ranks."""

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank."""


def default_journal_dir(journal_dir: str | os.PathLike[str] | None, trainer: pl.Trainer | None) -> str:
    """``DPStrategy(journal_dir=...)``, else ``<trainer.default_root_dir>/dp_journal``."""
    if journal_dir is not None:
        return os.fspath(journal_dir)
    root = trainer.default_root_dir if trainer is not None else os.getcwd()
    return os.path.join(root, "dp_journal")


class RunState:
    """The identity of a private run and its journal (the file is written by global rank 0 only)."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.journal_path: str | None = None
        #: step records in the journal (kept on every rank)
        self.records = 0
        self.branch = 0
        #: the trainer's epoch of the last step and the run's step count when that epoch began
        self.epoch = -1
        self.epoch_first_step = 0
        #: the run's step count minus the trainer's ``global_step`` (non-zero when a new Trainer continues a run)
        self.step_offset = 0
        self._journal: PrivacyJournal | None = None
        self._carry: dict[str, Any] | None = None  # a trusted checkpoint's ledger, for a new journal
        self._trainer: Any = None

    def bind_trainer(self, trainer: pl.Trainer, steps_taken: int, from_checkpoint: bool) -> None:
        """Relate the run's step count to ``trainer``'s progress at the start of a fit.

        A checkpoint restores the trainer's progress together with the run; the same trainer continues where it
        was; any other trainer starts counting at zero.
        """
        if not from_checkpoint and trainer is not self._trainer:
            self.step_offset = steps_taken
            self.epoch, self.epoch_first_step = -1, steps_taken
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """What checkpoints record about the run (no seeds)."""
        return {
            "run_id": self.run_id,
            "journal": self.journal_path,
            "journal_records": self.records,
            "branch": self.branch,
            "epoch": self.epoch,
            "epoch_first_step": self.epoch_first_step,
            "step_offset": self.step_offset,
        }

    def load(self, state: dict[str, Any]) -> None:
        """Adopt a restored run (from :func:`restore_run`); the journal is reopened when training starts."""
        self.close()
        self.run_id = state.get("run_id")
        self.journal_path = state.get("journal")
        self.records = int(state.get("journal_records", 0))
        self.branch = int(state.get("branch", 0))
        self.epoch = int(state.get("epoch", -1))
        self.epoch_first_step = int(state.get("epoch_first_step", 0))
        self.step_offset = int(state.get("step_offset") or 0)
        self._carry = state.get("carry")

    def open(
        self,
        ranks: Ranks,
        journal_dir: str | os.PathLike[str] | None,
        trainer: pl.Trainer,
        delta: float,
        steps_taken: int,
    ) -> None:
        """Start (or continue) the journal at the beginning of a fit and record the session.

        Args:
            ranks: this process's rank, the number of ranks and the broadcast between them.
            journal_dir: ``DPStrategy(journal_dir=...)``.
            trainer: the trainer (its ``default_root_dir`` is the default journal directory's parent).
            delta: δ of the run.
            steps_taken: the run's step count when the session starts.
        """
        info: dict[str, Any] = {}
        if ranks.global_rank == 0:
            if self._journal is None:
                if self.journal_path is not None and self._carry is None:
                    self._journal = PrivacyJournal.open(self.journal_path)
                else:
                    directory = default_journal_dir(journal_dir, trainer)
                    self._journal = PrivacyJournal.create(directory, delta, run_id=self.run_id)
                    if self._carry is not None:
                        self._journal.append_carried(self._carry)
                        self._carry = None
                self.run_id, self.journal_path = self._journal.run_id, os.fspath(self._journal.path)
                if self._journal.records != self.records:
                    raise JournalError(
                        f"The privacy journal {self.journal_path} holds {self._journal.records} steps, the run"
                        f" {self.records}: it was changed by another process. Resume from a checkpoint instead."
                    )
            self._journal.append_session(self.branch, steps_taken)
            info = {"run_id": self.run_id, "journal": self.journal_path}
        if ranks.world_size > 1:
            info = ranks.broadcast(info, src=0)
        self.run_id, self.journal_path = info["run_id"], info["journal"]

    def record(self, step: int, epoch: int, event: MechanismSegment | None) -> None:
        """Journal an executed step (rank 0 writes and flushes before the gradient is applied)."""
        if self._journal is not None:
            self._journal.append_step(step, self.branch, event)
        self.records += 1
        if epoch != self.epoch:
            self.epoch, self.epoch_first_step = epoch, step

    def done_in_epoch(self, current_epoch: int, steps_taken: int) -> int:
        """Steps already taken in ``current_epoch`` (a mid-epoch resume)."""
        return steps_taken - self.epoch_first_step if current_epoch == self.epoch else 0

    def sync(self) -> None:
        """Force the journal to disk."""
        if self._journal is not None:
            self._journal.sync()

    def close(self) -> None:
        """Sync and close the journal (it is reopened by the next fit)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None


def _migrate_v1(state: dict[str, Any]) -> dict[str, Any]:
    """The plan state of a version-1 checkpoint (lightning_dp ≤ 0.1: no journal; its sampling seed is dropped)."""
    return {
        "ledger": state["ledger"],
        "released_steps": state["released_steps"],
        "noise_multiplier": state.get("noise_multiplier"),
        "noise_phases": state.get("noise_phases", []),
        "planned_steps": state.get("planned_steps"),
        "sample_rate": state.get("sample_rate"),
        "target_epsilon": state.get("target_epsilon"),
        "delta": state.get("delta"),
        "selection": "poisson" if state.get("poisson_sampling", True) else "shuffle",
        "schedule_key": None,
    }


def _refuse_repeated_evaluations(released: int, updates: int, context: str) -> None:
    """A ledger holding k releases per optimizer update was written by a run whose closure ran k times per batch.

    Raises:
        ResumeError: explaining why its ε is wrong and what to do.
    """
    if updates <= 0 or released <= updates or released % updates:
        return
    k = released // updates
    raise ResumeError(
        f"The privacy state of {context} records {released} private releases for {updates} optimizer steps: its"
        f" closure was evaluated {k} times per sampled batch (SAM, or an optimizer_step that calls the closure twice),"
        " by a version of lightning_dp that allowed it. Each evaluation was accounted as its own Poisson-sampled step,"
        f" but they share one sample: the truth is one subsampled Gaussian mechanism with σ/√{k} per step, so the ε"
        " recorded is too small. This run cannot be continued: start a new run from pretrained weights with an"
        " optimizer that evaluates the closure once (see 'Sharpness-aware minimisation' in the docs for DP-SAT), and"
        " do not report the recorded ε of this checkpoint."
    )


def restore_run(
    state: dict[str, Any],
    checkpoint: dict[str, Any] | None,
    resume_policy: str,
    journal_dir: str | os.PathLike[str] | None,
    trainer: pl.Trainer | None,
    context: str,
    checkpoint_path: str | os.PathLike | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a checkpoint's privacy state and return ``(plan state, run state)`` to continue from.

    Checks: the step count agrees with the checkpoint's ``global_step``; the ledger holds a release for every step
    (Poisson); the journal exists, names the same run, and its first ``journal_records`` steps compose to exactly
    the checkpoint's ledger; no step was executed after the checkpoint was written (else: a fork).

    Args:
        state: the checkpoint's privacy state (``checkpoint["lightning_dp"]``).
        checkpoint: the whole checkpoint (its ``global_step``), if any.
        resume_policy: ``DPStrategy(resume_policy=...)``.
        journal_dir: ``DPStrategy(journal_dir=...)``, where the journal is looked for first.
        trainer: the trainer of the fit (its default journal directory), if any.
        context: what the state came from, for messages.
        checkpoint_path: the checkpoint file (journals next to it are looked for too).

    Raises:
        ResumeError: naming what disagrees and how to proceed (``resume_policy``).
    """
    policy = resume_policy
    version = state.get("version")
    try:
        if version == 1:
            plan_state, run = _migrate_v1(state), None
        elif version == 2:
            plan_state, run = dict(state["plan"]), {k: state.get(k) for k in _RUN_KEYS}
        else:
            raise ResumeError(f"Unknown lightning_dp state version {version!r} in {context}.")
        ledger = PrivacyLedger()
        ledger.load_state_dict(plan_state["ledger"])
        released = int(plan_state["released_steps"])
    except (KeyError, TypeError, ValueError) as err:
        raise ResumeError(f"The privacy state of {context} is malformed ({err!r}); it cannot be resumed.") from err
    offset = int((run or {}).get("step_offset") or 0)
    if checkpoint is not None and "global_step" in checkpoint and int(checkpoint["global_step"]) + offset != released:
        _refuse_repeated_evaluations(released, int(checkpoint["global_step"]) + offset, context)
        raise ResumeError(
            f"The privacy state of {context} records {released} private steps but the checkpoint's progress is"
            f" global_step={checkpoint['global_step']}: ledger and checkpoint disagree (an edited or mixed-up"
            " checkpoint). Resume from a checkpoint written by DPStrategy as it is."
        )
    if plan_state.get("selection", "poisson") == "poisson" and ledger.steps_of("dp-sgd") < released:
        raise ResumeError(
            f"The ledger of {context} records {ledger.steps_of('dp-sgd')} gradient releases for {released} Poisson"
            " steps: it was edited, and ε computed from it would be too small."
        )
    if run is None or run.get("run_id") is None:
        if policy != "trust_checkpoint":
            raise ResumeError(
                f"{context} was written by an older lightning_dp without a privacy journal, so it cannot be checked"
                " that no private step was taken after it. If you are sure it is the run's last checkpoint, resume"
                " with DPStrategy(resume_policy='trust_checkpoint'); its ledger is then taken as complete."
            )
        return plan_state, {"carry": ledger.state_dict(), "journal_records": 0, "epoch": -1}
    candidates: list[Any] = [run.get("journal"), default_journal_dir(journal_dir, trainer)]
    if checkpoint_path is not None:
        here = Path(checkpoint_path).resolve().parent
        candidates += [here / "dp_journal", here.parent / "dp_journal", here.parent.parent / "dp_journal"]
    path = find_journal(str(run["run_id"]), candidates)
    if path is None:
        if policy != "trust_checkpoint":
            raise ResumeError(
                f"The privacy journal of {context} (run {run['run_id']}, last at {run.get('journal')}) was not found,"
                " so it cannot be checked that no private step was taken after this checkpoint. Put the journal back"
                " (or pass DPStrategy(journal_dir=...) where it is), or, if you are sure this is the run's last"
                " checkpoint, resume with DPStrategy(resume_policy='trust_checkpoint')."
            )
        return plan_state, {**run, "journal": None, "carry": ledger.state_dict(), "journal_records": 0}
    contents = PrivacyJournal.read_file(path)
    n = int(run.get("journal_records") or 0)
    if contents.run_id != run["run_id"]:
        raise ResumeError(f"The journal {path} belongs to run {contents.run_id}, not to {context}'s {run['run_id']}.")
    if len(contents.steps) < n:
        raise ResumeError(
            f"The journal {path} holds {len(contents.steps)} steps, fewer than the {n} that {context} had journaled:"
            " the journal was truncated or replaced. The run's privacy loss cannot be verified."
        )
    if contents.ledger(n).segments != ledger.segments:
        raise ResumeError(
            f"The ledger of {context} differs from its journal {path} over the same {n} steps: the checkpoint's"
            " ledger was edited. Resume from an unmodified checkpoint."
        )
    run["journal"] = os.fspath(path)
    if len(contents.steps) > n:
        extra = contents.steps[n:]
        if policy != "account_forks":
            raise ResumeError(
                f"{context} is older than the run's last executed step: the journal {path} records"
                f" {len(extra)} private step(s) taken after it (up to step {extra[-1]['step']}). Their updates may"
                " already be out (checkpoints, logs); resuming from here would drop them from ε. Resume from the"
                " latest checkpoint, or, to branch from this one deliberately with every executed step kept in the"
                " ledger, pass DPStrategy(resume_policy='account_forks')."
            )
        plan_state["ledger"] = contents.ledger().state_dict()
        run["branch"] = contents.branches
        run["journal_records"] = len(contents.steps)
    return plan_state, run


def privacy_state(
    plan_state: dict[str, Any],
    run: RunState,
    max_grad_norm: float,
    clipping: str,
    nonprivate_buffers: tuple[str, ...],
) -> dict[str, Any]:
    """The privacy state that checkpoints hold under ``checkpoint["lightning_dp"]`` (plain numbers; no seeds)."""
    return {
        "version": 2,
        "plan": plan_state,
        **run.state_dict(),
        "max_grad_norm": max_grad_norm,
        "clipping": clipping,
        "nonprivate_buffers": list(nonprivate_buffers),
    }


def restore_on_rank_zero(
    ranks: Ranks, distributed: bool, restore: Callable[[], tuple[dict[str, Any], dict[str, Any]]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``restore`` (:func:`restore_run`) on rank 0 and give every rank its outcome (or its error).

    Raises:
        DPMisconfigurationError: on every rank, when rank 0's checks refused the state.
    """
    if ranks.global_rank == 0:
        try:
            outcome: dict[str, Any] = {"ok": restore()}
        except DPMisconfigurationError as err:
            outcome = {"error": str(err), "type": type(err).__name__}
    else:
        outcome = {}
    outcome = ranks.broadcast(outcome, src=0) if distributed else outcome
    if "error" in outcome:
        raise DPMisconfigurationError(outcome["error"])
    plan_state, run_state = outcome["ok"]
    return plan_state, run_state


def read_checkpoint(load: Callable[[], dict[str, Any]], checkpoint_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint ``load()`` reads.

    Raises:
        DPMisconfigurationError: if the file cannot be read (e.g. truncated).
    """
    try:
        return load()
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise DPMisconfigurationError(
            f"Cannot read the checkpoint {os.fspath(checkpoint_path)} ({type(err).__name__}: {err}). It may be"
            " truncated (e.g. the process died while writing it). Resume from another checkpoint; if it is older"
            " than the last step taken, the journal check will ask you to choose a resume_policy."
        ) from err


def privacy_state_of(checkpoint: dict[str, Any], checkpoint_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checkpoint's privacy state, or None for a checkpoint without training progress.

    Raises:
        DPMisconfigurationError: if the checkpoint holds training progress but no privacy state.
    """
    state = checkpoint.get(STATE_KEY)
    if state is None and checkpoint.get("global_step", 0) > 0:
        raise DPMisconfigurationError(
            f"The checkpoint {checkpoint_path} has training progress but no privacy ledger: it was not"
            " written by DPStrategy, so the steps it took cannot be accounted for. To start private training"
            " from its weights, load them (`Model.load_from_checkpoint(path)`) and call fit without ckpt_path."
        )
    return state


__all__ = [
    "STATE_KEY",
    "Ranks",
    "ResumeError",
    "RunState",
    "default_journal_dir",
    "privacy_state",
    "privacy_state_of",
    "read_checkpoint",
    "restore_on_rank_zero",
    "restore_run",
]
