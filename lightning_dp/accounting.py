"""Privacy accounting: ε of subsampled Gaussian mechanisms with the PRV accountant, σ calibration and the ledger.

All numbers come from the ``prv-accountant`` package (Gopi, Lee & Wutschitz, 2021) and are its *upper bound* on ε,
so a reported ε is never optimistic. The ledger is our own code (not Opacus's accountants) because it must compose
heterogeneous mechanisms (DP-SGD steps at several (σ, q), private diagnostics, selection steps) into one ε, survive
checkpoints as plain Python numbers (``torch.load(weights_only=True)`` safe) and be shared by every rank under DDP.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from lightning_dp.errors import PrivacyTargetError

#: Absolute error allowed in ε by the PRV discretisation. The reported value is an upper bound whatever this is.
EPS_ERROR = 0.01
#: Relative error allowed in δ (as a fraction of δ) by the PRV discretisation.
DELTA_ERROR_FRACTION = 1e-3
#: Largest noise multiplier ``calibrate_noise_multiplier`` will return before declaring the target unreachable.
MAX_NOISE_MULTIPLIER = 1000.0
#: Above this ε (by the cheap RDP bound) the PRV accountant is not run: its discretisation grows without bound
#: for tiny σ (tens of GiB), and such an ε carries no meaningful guarantee. The RDP value is reported instead.
RDP_ONLY_ABOVE = 100.0
#: Smallest noise multiplier the calibration will try (looser targets get this σ and a smaller ε than asked).
MIN_NOISE_MULTIPLIER = 0.05


@dataclass(frozen=True)
class MechanismSegment:
    """``steps`` compositions of a Poisson-subsampled Gaussian mechanism.

    Args:
        noise_multiplier: σ, the noise std divided by the L2 sensitivity.
        sample_rate: q, the probability that an example takes part in one composition (1.0: no subsampling).
        steps: how many times the mechanism was (or will be) applied.
        mechanism: a label for the per-mechanism breakdown, e.g. ``"dp-sgd"``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    mechanism: str = "dp-sgd"

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a positive finite number, got {self.noise_multiplier}.")
        if not (0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}.")
        if self.steps < 0 or int(self.steps) != self.steps:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps}.")


def _group(segments: Iterable[MechanismSegment]) -> tuple[tuple[float, float, int], ...]:
    """Merge segments with the same (σ, q) into (σ, q, total steps), in a canonical order for caching."""
    counts: dict[tuple[float, float], int] = {}
    for seg in segments:
        if seg.steps:
            key = (float(seg.noise_multiplier), float(seg.sample_rate))
            counts[key] = counts.get(key, 0) + int(seg.steps)
    return tuple(sorted((s, q, n) for (s, q), n in counts.items()))


@lru_cache(maxsize=512)
def _epsilon_of_groups(groups: tuple[tuple[float, float, int], ...], delta: float) -> float:
    # prv-accountant is imported lazily: it pulls in scipy and is only needed when ε is asked for.
    from prv_accountant import PRVAccountant
    from prv_accountant.other_accountants import RDP
    from prv_accountant.privacy_random_variables import GaussianMechanism, PoissonSubsampledGaussianMechanism

    if not groups:
        return 0.0
    prvs = [
        GaussianMechanism(noise_multiplier=s)
        if q >= 1.0
        else PoissonSubsampledGaussianMechanism(noise_multiplier=s, sampling_probability=q)
        for s, q, _ in groups
    ]
    steps = [n for _, _, n in groups]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Both are upper bounds on ε: RDP is cheap and loose, PRV tight. Report the smaller.
        rdp_upper = float(RDP(prvs=prvs).compute_epsilon(delta=delta, num_self_compositions=steps)[2])
        if not rdp_upper <= RDP_ONLY_ABOVE:
            return rdp_upper
        try:
            accountant = PRVAccountant(
                prvs=prvs,
                max_self_compositions=steps,
                eps_error=EPS_ERROR,
                delta_error=delta * DELTA_ERROR_FRACTION,
            )
            _, _, eps_upper = accountant.compute_epsilon(delta=delta, num_self_compositions=steps)
        except (MemoryError, ValueError, FloatingPointError):
            return rdp_upper
    return max(0.0, min(float(eps_upper), rdp_upper))


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}.")


def epsilon_of_segments(segments: Iterable[MechanismSegment], delta: float) -> float:
    """ε (PRV upper bound) of the composition of ``segments`` at ``delta``.

    Args:
        segments: the mechanisms to compose (any mix of σ and q).
        delta: the target δ.

    Returns:
        The upper bound on ε; 0.0 for an empty composition.
    """
    _check_delta(delta)
    return _epsilon_of_groups(_group(segments), float(delta))


def combine_noise_multipliers(*noise_multipliers: float) -> float:
    """The noise multiplier of Gaussian releases of the *same* data combined into one mechanism.

    Releasing, from one Poisson batch, a clipped gradient sum (noise σ relative to its sensitivity) and statistics
    with noise multipliers σ_j (each std / its L2 sensitivity) is one Gaussian mechanism with multiplier
    (σ⁻² + Σ σ_j⁻²)^(-1/2), subsampled once. Accounting them as independently subsampled mechanisms would
    under-count the privacy loss, because an example's presence affects all of them at once.

    Example:
        >>> round(combine_noise_multipliers(1.0, 1.0), 4)
        0.7071
    """
    if not noise_multipliers or any(not s > 0 for s in noise_multipliers):
        raise ValueError(f"noise multipliers must be positive, got {noise_multipliers}.")
    return sum(s**-2 for s in noise_multipliers) ** -0.5


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps (DP-SGD) at ``delta``, by the PRV accountant.

    Args:
        noise_multiplier: σ, noise std relative to the clipping bound.
        sample_rate: q = expected batch size / dataset size.
        steps: number of optimizer steps.
        delta: the target δ.

    Returns:
        The PRV accountant's upper bound on ε.

    Example:
        >>> round(compute_epsilon(1.0, 0.01, 100, 1e-5), 1)  # doctest: +SKIP
        0.9
    """
    return epsilon_of_segments([MechanismSegment(noise_multiplier, sample_rate, steps)], delta)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    prior: Sequence[MechanismSegment] = (),
    joint_noise: Mapping[tuple[float, ...], int] | None = None,
    rtol: float = 5e-3,
) -> float:
    """The smallest σ (to within ``rtol``) whose ε after ``steps`` steps at rate q is at most ``target_epsilon``.

    Args:
        target_epsilon: the ε the whole run may spend.
        delta: the target δ.
        sample_rate: q of the steps to calibrate.
        steps: how many steps will be taken with the calibrated σ.
        prior: mechanisms already spent (e.g. a resumed run's ledger) that the target must also cover.
        joint_noise: for steps that also release noised statistics of the same batch, ``{(σ_1, ...): count}``:
            ``count`` of the ``steps`` combine σ with those multipliers (see :func:`combine_noise_multipliers`).
        rtol: relative precision of σ. The returned σ always satisfies the target; it is at most ``rtol`` too large.

    Returns:
        σ such that ε(prior + steps × (σ, q)) ≤ target_epsilon.

    Raises:
        PrivacyTargetError: if the target cannot be reached: ε ≤ 0, ``prior`` already spends it, or it needs
            σ > ``MAX_NOISE_MULTIPLIER``.

    Example:
        >>> sigma = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 1000)  # doctest: +SKIP
    """
    _check_delta(delta)
    if not target_epsilon > 0:
        raise PrivacyTargetError(f"target_epsilon must be positive, got {target_epsilon}.")
    if steps <= 0:
        raise PrivacyTargetError(f"Cannot calibrate noise for {steps} steps: the run must plan at least one step.")
    prior = tuple(prior)
    spent = epsilon_of_segments(prior, delta)
    if spent >= target_epsilon:
        raise PrivacyTargetError(
            f"The privacy budget is already spent: ε={spent:.4g} ≥ target_epsilon={target_epsilon} at δ={delta}."
            " Raise target_epsilon or start a new run on new data."
        )

    plan = dict(joint_noise or {})
    plain = steps - sum(plan.values())
    if plain < 0:
        raise ValueError(f"joint_noise covers {sum(plan.values())} steps, more than steps={steps}.")
    plan[()] = plan.get((), 0) + plain

    def eps(sigma: float) -> float:
        segs = [MechanismSegment(combine_noise_multipliers(sigma, *extra), sample_rate, n) for extra, n in plan.items()]
        return epsilon_of_segments(prior + tuple(segs), delta)

    # Bracket in log-space: eps(lo) > target >= eps(hi).
    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2.0
        if hi > MAX_NOISE_MULTIPLIER:
            raise PrivacyTargetError(
                f"target_epsilon={target_epsilon} at δ={delta} cannot be reached with {steps} steps at sample rate"
                f" q={sample_rate:.4g}: it needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}. Raise"
                " target_epsilon, train fewer steps or epochs, or use a smaller batch size."
            )
    lo = hi / 2.0
    while eps(lo) <= target_epsilon:
        hi = lo
        lo /= 2.0
        if lo < MIN_NOISE_MULTIPLIER:
            return hi
    while (hi - lo) / hi > rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


class PrivacyLedger:
    """The record of every private release of a run, composed into one ε by the PRV accountant.

    Consecutive records of the same mechanism and (σ, q) are merged into one segment, so the ledger stays small.
    The state is plain Python numbers: it is saved in every Lightning checkpoint and restored on resume.

    Example:
        >>> ledger = PrivacyLedger()
        >>> ledger.record(noise_multiplier=1.0, sample_rate=0.01, steps=100)
        >>> ledger.steps
        100
        >>> eps = ledger.epsilon(delta=1e-5)  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self._segments: list[MechanismSegment] = []

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
            The PRV accountant's upper bound on ε.
        """
        return epsilon_of_segments(self._segments + list(extra), delta)

    def breakdown(self, delta: float) -> dict[str, float]:
        """ε of each mechanism on its own at ``delta`` (they do not add up: composition is sub-additive)."""
        names = dict.fromkeys(s.mechanism for s in self._segments)
        return {n: epsilon_of_segments([s for s in self._segments if s.mechanism == n], delta) for n in names}

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
