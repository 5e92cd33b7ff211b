"""σ calibration and ε of compositions: the functions the strategy, the plan and the budget call.

ε comes from an :class:`~lightning_dp.accounting.Accountant`, by default the PLD accountant
(:class:`~lightning_dp.accounting.PLDAccountant`, on Google's ``dp-accounting`` package, a core dependency: an
independent, fast bound that is monotone in σ at a fixed discretisation), and is always its *upper bound*, so a
reported ε is never optimistic. The ledger is our own code (not Opacus's accountants) because it must
compose heterogeneous mechanisms (DP-SGD steps at several (σ, q), private diagnostics, selection steps) into one ε,
survive checkpoints as plain Python numbers (``torch.load(weights_only=True)`` safe) and be shared by every rank
under DDP. The calibration is our own because it must cover a prior spend and joint releases, and because a guided
search (cheap estimates first, then the reported bound on a bracket of width ``rtol``) needs a few bound evaluations
where a plain bisection needs ~15; a scan below the bracket then makes it robust to a bound that is not monotone in σ
(the PRV bound is not, on short runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

from lightning_dp.accounting.base import Accountant, EstimatingAccountant, MechanismSegment, check_delta
from lightning_dp.accounting.pld import PLDAccountant
from lightning_dp.errors import PrivacyTargetError

#: Relative error allowed in ε by the default accountant's discretisation (measured 0.01-0.1 % above a fine PLD).
RELATIVE_EPS_ERROR = 5e-3
#: Largest noise multiplier ``calibrate_noise_multiplier`` will return before declaring the target unreachable.
MAX_NOISE_MULTIPLIER = 1000.0
#: Above this ε (by the cheap RDP bound) the PLD accountant is not run: its discretisation grows without bound
#: for tiny σ (tens of GiB), and such an ε carries no meaningful guarantee. The RDP value is reported instead.
RDP_ONLY_ABOVE = 100.0
#: Smallest noise multiplier the calibration will try (looser targets get this σ and a smaller ε than asked).
MIN_NOISE_MULTIPLIER = 0.05
#: How far below its bracket the calibration looks for a smaller σ that also meets the target (a relative width):
#: a bound that is not monotone in σ can dip below the target again there.
SCAN_WIDTH = 0.03

_DEFAULT_ACCOUNTANT = PLDAccountant(relative_error=RELATIVE_EPS_ERROR, rdp_only_above=RDP_ONLY_ABOVE)


def default_accountant() -> PLDAccountant:
    """The accountant used when none is given: a shared :class:`~lightning_dp.accounting.PLDAccountant` (its results are
    cached).
    """
    return _DEFAULT_ACCOUNTANT


def epsilon_of_segments(
    segments: Iterable[MechanismSegment], delta: float, accountant: Accountant | None = None
) -> float:
    """ε (an upper bound) of the composition of ``segments`` at ``delta``.

    Args:
        segments: the mechanisms to compose (any mix of σ and q).
        delta: the target δ.
        accountant: who bounds ε; the default PLD accountant if ``None``.

    Returns:
        The upper bound on ε; 0.0 for an empty composition.
    """
    check_delta(delta)
    segments = [s for s in segments if s.steps]
    if not segments:
        return 0.0
    return float((accountant or _DEFAULT_ACCOUNTANT).epsilon(segments, float(delta)))


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


def compute_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: Accountant | None = None
) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps (DP-SGD) at ``delta``, by the default (PLD) accountant.

    Args:
        noise_multiplier: σ, noise std relative to the clipping bound.
        sample_rate: q = expected batch size / dataset size.
        steps: number of optimizer steps.
        delta: the target δ.
        accountant: who bounds ε; the default PLD accountant if ``None``.

    Returns:
        The accountant's upper bound on ε.

    Example:
        >>> round(compute_epsilon(1.0, 0.01, 100, 1e-5), 1)  # doctest: +SKIP
        0.9
    """
    return epsilon_of_segments([MechanismSegment(noise_multiplier, sample_rate, steps)], delta, accountant)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    *,
    prior: Sequence[MechanismSegment] = (),
    joint_noise: Mapping[tuple[float, ...], int] | None = None,
    rtol: float = 5e-3,
    accountant: Accountant | None = None,
) -> float:
    """The smallest σ (to within ``rtol``) whose ε after ``steps`` steps at rate q is at most ``target_epsilon``.

    ε is the accountant's upper bound, the same value the ledger will report, so a run calibrated here reports
    ε ≤ ``target_epsilon``. If the accountant has a cheap ``estimate`` (:class:`EstimatingAccountant`, as the
    default PLD accountant), the search runs on estimates and then checks a bracket of width ``rtol`` around
    their answer with the bound itself. The bound need not be monotone in σ: the grid σ/(1 + ``rtol``)^k below the
    bracket is then scanned down to ``SCAN_WIDTH`` (3 %) below, and the search moves down to any point that meets
    the target, so the answer is at most ``rtol`` above the smallest σ meeting the target unless the bound dips
    below it again further down than that.

    Args:
        target_epsilon: the ε the whole run may spend.
        delta: the target δ.
        sample_rate: q of the steps to calibrate.
        steps: how many steps will be taken with the calibrated σ.
        prior: mechanisms already spent (e.g. a resumed run's ledger) that the target must also cover.
        joint_noise: for steps that also release noised statistics of the same batch, ``{(σ_1, ...): count}``:
            ``count`` of the ``steps`` combine σ with those multipliers (see :func:`combine_noise_multipliers`).
        rtol: relative precision of σ. The returned σ always satisfies the target; ε at σ / (1 + ``rtol``)^k was found
            above the target for every k with (1 + ``rtol``)^k ≤ 1 + ``SCAN_WIDTH`` (unless σ is
            ``MIN_NOISE_MULTIPLIER``).
        accountant: who bounds ε; the default PLD accountant if ``None``.

    Returns:
        σ such that ε(prior + steps × (σ, q)) ≤ target_epsilon.

    Raises:
        PrivacyTargetError: if the target cannot be reached: ε ≤ 0, ``prior`` already spends it, or it needs
            σ > ``MAX_NOISE_MULTIPLIER``.

    Example:
        >>> sigma = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 1000)  # doctest: +SKIP
    """
    check_delta(delta)
    if not target_epsilon > 0:
        raise PrivacyTargetError(f"target_epsilon must be positive, got {target_epsilon}.")
    if steps <= 0:
        raise PrivacyTargetError(f"Cannot calibrate noise for {steps} steps: the run must plan at least one step.")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol}.")
    accountant = accountant or _DEFAULT_ACCOUNTANT
    prior = tuple(prior)
    spent = epsilon_of_segments(prior, delta, accountant)
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

    def segments(sigma: float) -> list[MechanismSegment]:
        planned = [MechanismSegment(combine_noise_multipliers(sigma, *x), sample_rate, n) for x, n in plan.items()]
        return list(prior) + planned

    def bound(sigma: float) -> float:
        return epsilon_of_segments(segments(sigma), delta, accountant)

    if isinstance(accountant, EstimatingAccountant):
        estimator = accountant

        def guide(sigma: float) -> float:
            return float(estimator.estimate(segments(sigma), delta))

    else:
        guide = bound

    def unreachable() -> PrivacyTargetError:
        return PrivacyTargetError(
            f"target_epsilon={target_epsilon} at δ={delta} cannot be reached with {steps} steps at sample rate"
            f" q={sample_rate:.4g}: it needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}. Raise"
            " target_epsilon, train fewer steps or epochs, or use a smaller batch size."
        )

    return _GuidedSearch(bound, guide, target_epsilon, rtol, unreachable).run()


class _GuidedSearch:
    """Find σ with ``bound(σ) ≤ target < bound(σ / (1 + rtol)^k)`` for k = 1 .. the scan, with few evaluations.

    ε(σ) is close to a power law. The search first solves ``guide(σ) = target`` (cheap estimates; a bracketed
    regula falsi in log-log space), then evaluates the bound there and steps to the root of a local power law
    through the bound's value, with the guide's slope, until a bracket of width ``rtol`` is verified with the bound
    itself. The bound need not be monotone: the grid below the bracket is scanned down to ``SCAN_WIDTH`` and the
    search goes on below any point that meets the target. Every returned σ has been checked with the bound.
    """

    def __init__(
        self,
        bound: Callable[[float], float],
        guide: Callable[[float], float],
        target: float,
        rtol: float,
        unreachable: Callable[[], PrivacyTargetError],
    ) -> None:
        self.bound, self.guide, self.target, self.rtol, self.unreachable = bound, guide, target, rtol, unreachable
        self.slope = -2.0  # d log ε / d log σ, refined by the guide search

    def _log_gap(self, fn: Callable[[float], float], sigma: float) -> float:
        eps = fn(sigma)
        return math.log(eps / self.target) if eps > 0 else -math.inf

    def solve_guide(self) -> float:
        """σ in [MIN, MAX] where the guide crosses the target, to a relative ``rtol / 8``."""
        lo, hi = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
        x = 1.0
        gx = self._log_gap(self.guide, x)
        g_lo = g_hi = None
        while True:  # bracket: guide(lo) > target >= guide(hi)
            if gx > 0:
                lo, g_lo = x, gx
                if g_hi is not None or x >= MAX_NOISE_MULTIPLIER:
                    break
                x = min(MAX_NOISE_MULTIPLIER, x * 4.0)
            else:
                hi, g_hi = x, gx
                if g_lo is not None or x <= MIN_NOISE_MULTIPLIER:
                    break
                x = max(MIN_NOISE_MULTIPLIER, x / 4.0)
            gx = self._log_gap(self.guide, x)
        if g_hi is None:
            return MAX_NOISE_MULTIPLIER
        if g_lo is None:
            return MIN_NOISE_MULTIPLIER
        side = 0
        for _ in range(100):  # Illinois regula falsi on u = log σ
            if hi / lo <= 1 + self.rtol / 8:
                break
            u_lo, u_hi = math.log(lo), math.log(hi)
            if math.isfinite(g_hi) and g_lo > g_hi:
                u = (u_lo * g_hi - u_hi * g_lo) / (g_hi - g_lo)
                u = min(max(u, u_lo + 0.01 * (u_hi - u_lo)), u_hi - 0.01 * (u_hi - u_lo))
            else:
                u = 0.5 * (u_lo + u_hi)
            x = math.exp(u)
            gx = self._log_gap(self.guide, x)
            if gx > 0:
                lo, g_lo = x, gx
                if side == 1:
                    g_hi /= 2.0
                side = 1
            else:
                hi, g_hi = x, gx
                if side == -1:
                    g_lo /= 2.0
                side = -1
        g_lo, g_hi = self._log_gap(self.guide, lo), self._log_gap(self.guide, hi)
        if math.isfinite(g_hi) and g_lo > g_hi and hi > lo:
            self.slope = (g_hi - g_lo) / (math.log(hi) - math.log(lo))
        return math.sqrt(lo * hi)

    def predict(self, sigma: float, eps: float) -> float:
        """The root of the power law through (σ, ε) with the guide's slope."""
        if not (eps > 0 and self.slope < 0):
            return sigma
        return sigma * math.exp(math.log(self.target / eps) / self.slope)

    def scan_below(self, sigma: float) -> float | None:
        """The first σ / (1 + rtol)^k, k ≥ 2, down to ``SCAN_WIDTH`` below ``sigma``, whose bound meets the target."""
        step = 1.0 + self.rtol
        k = 2
        while step**k <= (1.0 + SCAN_WIDTH) * (1 + 1e-12) and sigma / step**k >= MIN_NOISE_MULTIPLIER:
            x = sigma / step**k
            if self.bound(x) <= self.target:
                return x
            k += 1
        return None

    def run(self) -> float:
        """The calibrated σ."""
        step = 1.0 + self.rtol
        lo: float | None = None  # bound(lo) > target
        hi: float | None = None  # bound(hi) <= target
        x = self.solve_guide()
        misses = 0
        for _ in range(200):
            eps = self.bound(x)
            if eps <= self.target:
                hi = x if hi is None else min(hi, x)
            else:
                lo = x if lo is None else max(lo, x)
                if x >= MAX_NOISE_MULTIPLIER:
                    raise self.unreachable()
            if hi is not None and (lo is not None and hi <= lo * step * (1 + 1e-12) or hi <= MIN_NOISE_MULTIPLIER):
                lower = self.scan_below(hi)
                if lower is None:
                    return hi
                hi, lo, misses = lower, None, 0  # the bound dipped: search on below the lower point
                x = max(lower / step, MIN_NOISE_MULTIPLIER)
                continue
            pred = self.predict(x, eps)
            # A miss: the bracket is still one-sided. After a few, widen the steps geometrically (a bad guide).
            misses = misses + 1 if lo is None or hi is None else 0
            widen = step ** (2 ** (misses - 2)) if misses >= 3 else step
            if hi is None:  # all points so far are above the target: move up
                assert lo is not None
                x = pred * step**0.25 if pred > lo * step else lo * step
                x = min(max(x, lo * widen), MAX_NOISE_MULTIPLIER)
            elif lo is None:  # all points so far are below the target: move down
                x = pred / step**0.25 if pred < hi / step else hi / step
                x = max(min(x, hi / widen), MIN_NOISE_MULTIPLIER)
            else:  # close the bracket
                ratio = hi / lo
                if ratio <= step * step:
                    x = math.sqrt(lo * hi)
                else:
                    x = min(max(pred * step**0.25, lo * ratio**0.1), hi / ratio**0.1)
        raise RuntimeError("σ calibration did not converge.")  # pragma: no cover
