"""The privacy ledger: every private release of a run, composed into one ε by an accountant."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from lightning_dp.accounting.base import Accountant, MechanismSegment
from lightning_dp.accounting.calibration import default_accountant, epsilon_of_segments


class PrivacyLedger:
    """The record of every private release of a run, composed into one ε by an accountant (PLD by default).

    Consecutive records of the same mechanism and (σ, q) are merged into one segment, so the ledger stays small.
    The state is plain Python numbers: it is saved in every Lightning checkpoint and restored on resume (the
    accountant is not part of the state).

    Args:
        accountant: who bounds ε (:class:`~lightning_dp.accounting.Accountant`); the default PLD accountant if
            ``None``.

    Example:
        >>> ledger = PrivacyLedger()
        >>> ledger.record(noise_multiplier=1.0, sample_rate=0.01, steps=100)
        >>> ledger.steps
        100
        >>> eps = ledger.epsilon(delta=1e-5)  # doctest: +SKIP
    """

    def __init__(self, accountant: Accountant | None = None) -> None:
        if accountant is not None and not isinstance(accountant, Accountant):
            raise TypeError(f"accountant must have an epsilon(segments, delta) method, got {accountant!r}.")
        self._segments: list[MechanismSegment] = []
        self._accountant = accountant

    @property
    def accountant(self) -> Accountant:
        """The accountant that bounds ε of this ledger."""
        return self._accountant or default_accountant()

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1, mechanism: str = "dp-sgd") -> None:
        """Record ``steps`` applications of a subsampled Gaussian mechanism.

        Args:
            noise_multiplier: σ of the mechanism (noise std / sensitivity).
            sample_rate: q of the mechanism (1.0 when the data was not Poisson-subsampled).
            steps: how many applications to record.
            mechanism: the label under which it shows in :meth:`breakdown`.
        """
        seg = MechanismSegment(float(noise_multiplier), float(sample_rate), int(steps), mechanism)
        last = self._segments[-1] if self._segments else None
        if (
            last is not None
            and last.mechanism == seg.mechanism
            and last.noise_multiplier == seg.noise_multiplier
            and last.sample_rate == seg.sample_rate
        ):
            self._segments[-1] = MechanismSegment(
                last.noise_multiplier, last.sample_rate, last.steps + seg.steps, last.mechanism
            )
        else:
            self._segments.append(seg)

    @property
    def segments(self) -> list[MechanismSegment]:
        """The recorded segments, oldest first."""
        return list(self._segments)

    @property
    def steps(self) -> int:
        """The number of recorded ``"dp-sgd"`` applications (noisy gradient releases)."""
        return self.steps_of("dp-sgd")

    def steps_of(self, mechanism: str) -> int:
        """The number of recorded applications of ``mechanism``."""
        return sum(s.steps for s in self._segments if s.mechanism == mechanism)

    def epsilon(self, delta: float, extra: Sequence[MechanismSegment] = ()) -> float:
        """ε spent at ``delta`` by everything recorded (plus ``extra``, e.g. steps planned but not yet taken).

        Args:
            delta: the target δ.
            extra: further segments to compose with the ledger, e.g. to bound ε a few steps ahead.

        Returns:
            The accountant's upper bound on ε.
        """
        return epsilon_of_segments(self._segments + list(extra), delta, self.accountant)

    def breakdown(self, delta: float) -> dict[str, float]:
        """ε of each mechanism on its own at ``delta`` (they do not add up: composition is sub-additive)."""
        names = dict.fromkeys(s.mechanism for s in self._segments)
        return {
            n: epsilon_of_segments([s for s in self._segments if s.mechanism == n], delta, self.accountant)
            for n in names
        }

    def state_dict(self) -> dict[str, Any]:
        """The ledger as plain Python numbers."""
        return {"version": 1, "segments": [asdict(s) for s in self._segments]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the ledger's content with ``state`` (from :meth:`state_dict`)."""
        if state.get("version") != 1:
            raise ValueError(f"Unknown PrivacyLedger state version {state.get('version')!r}.")
        self._segments = [MechanismSegment(**s) for s in state["segments"]]

    def __len__(self) -> int:
        return len(self._segments)

    def __repr__(self) -> str:
        segs = ", ".join(
            f"{s.mechanism}(σ={s.noise_multiplier:.4g}, q={s.sample_rate:.4g}) × {s.steps}" for s in self._segments
        )
        return f"PrivacyLedger([{segs}])"
