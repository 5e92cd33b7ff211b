"""Batch selection: how each step's examples are chosen, paired with the ledger event that choice implies.

Each selection owns its sampler (which examples each step draws) and the ledger event that choice implies, so the
strategy never branches on the sampling mode. (JAX Privacy splits these: its batch selections only iterate batches,
and the DP event lives in its execution plan; here one object keeps the two from drifting apart.) The samplers are
below their policies:

- :class:`PoissonSelection` (the default): every example is in each step independently with probability q; each
  step is one Poisson-subsampled Gaussian release (σ, q).
- :class:`ShuffleSelection` (explicit opt-out only): fixed-size batches of a random permutation. No amplification
  is claimed: a pass over a permutation uses each example at most once, so it is charged as one Gaussian release
  with sensitivity 2C (replace-one adjacency: the ledger records σ/2 at q = 1) at the smallest σ of the pass. Every
  new permutation — every epoch, and every resume — is a new pass and is charged again.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch.utils.data import Sampler

from lightning_dp.accounting import Accountant, MechanismSegment, calibrate_noise_multiplier
from lightning_dp.console import warn
from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.randomness import RandomSource, fresh_seed, stream_source

#: ``step -> the noise multiplier of everything released from that step's batch`` (σ combined with the
#: multipliers of the statistics that callbacks release from the same batch).
MultiplierOf = Callable[[int], float]
#: ``step -> the multipliers of the statistics released from that step's batch besides the gradient``.
ExtrasOf = Callable[[int], tuple[float, ...]]


class BatchSelection(ABC):
    """How a step's batch is selected, and what the ledger records for it.

    A selection is bound to the data once per fit (:meth:`bind`), builds the per-rank batch sampler
    (:meth:`batch_sampler`), and answers the accounting questions: the event an executed step records
    (:meth:`step_event`), the events a range of future steps will record (:meth:`planned_events`), and the σ that
    makes a range of steps meet a target ε (:meth:`calibrate`).
    """

    #: the name used in checkpoints and messages
    name: ClassVar[str]
    #: whether the accounting credits amplification by subsampling
    amplifies: ClassVar[bool]

    def __init__(self) -> None:
        self.num_samples = 0
        self.batch_size = 0
        self.num_replicas = 1
        self.rank = 0
        #: steps an epoch actually runs (after ``limit_train_batches``), set by the plan
        self.epoch_steps = 0

    def bind(self, num_samples: int, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        """Bind to a training set of ``num_samples`` examples and a per-rank ``batch_size``.

        Raises:
            DPMisconfigurationError: if the logical batch exceeds the dataset.
        """
        expected = batch_size * num_replicas
        if num_samples <= 0 or batch_size <= 0:
            raise DPMisconfigurationError(
                f"Need a non-empty training set and batch size, got N={num_samples}, B={expected}."
            )
        if expected > num_samples:
            raise DPMisconfigurationError(f"The logical batch size {expected} exceeds the dataset size {num_samples}.")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch_steps = self.steps_per_epoch

    @property
    def expected_batch_size(self) -> int:
        """B: the expected logical batch over all ranks (per-rank ``batch_size`` × ranks)."""
        return self.batch_size * self.num_replicas

    @property
    def sample_rate(self) -> float:
        """The sampling probability q = B/N."""
        return self.expected_batch_size / self.num_samples

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one full epoch: ⌈N/B⌉."""
        return math.ceil(self.num_samples / self.expected_batch_size)

    def announce(self) -> None:  # noqa: B027  (a hook: most selections have nothing to say)
        """Say once per fit what this selection means for the guarantee (a warning for weaker schemes)."""

    @abstractmethod
    def batch_sampler(self, source_of: SourceOf, position: Callable[[], int]) -> Sampler[list[int]]:
        """Build this rank's batch sampler.

        ``source_of(step, rank)`` gives each step's randomness and ``position()`` the global index of the next step.
        """

    @abstractmethod
    def step_event(self, step: int, multiplier_of: MultiplierOf) -> MechanismSegment | None:
        """The ledger event of executing step ``step`` now (None when the step is covered by an earlier event)."""

    @abstractmethod
    def planned_events(self, start: int, count: int, multiplier_of: MultiplierOf) -> list[MechanismSegment]:
        """The events steps ``start .. start + count - 1`` will record, if they run as planned (an upper bound:
        never fewer or weaker events than :meth:`step_event` will record).
        """

    @abstractmethod
    def calibrate(
        self,
        target_epsilon: float,
        delta: float,
        start: int,
        count: int,
        prior: Sequence[MechanismSegment],
        extras_of: ExtrasOf,
        accountant: Accountant | None = None,
    ) -> float:
        """The smallest σ for which ``prior`` plus steps ``start .. start + count - 1`` (at σ, with the extra
        releases ``extras_of(step)``) stay within ``target_epsilon`` at ``delta`` by ``accountant``'s bound.
        """

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records about the selection (no seeds: nothing to rebuild batches from)."""
        return {"name": self.name}


class PoissonSelection(BatchSelection):
    """Poisson sampling: each example joins each step's batch independently with probability q = B/N.

    Example:
        >>> sel = PoissonSelection()
        >>> sel.bind(num_samples=1000, batch_size=50)
        >>> sel.sample_rate, sel.steps_per_epoch
        (0.05, 20)
    """

    name = "poisson"
    amplifies = True

    def batch_sampler(self, source_of: SourceOf, position: Callable[[], int]) -> Sampler[list[int]]:
        """See :meth:`BatchSelection.batch_sampler`."""
        return PoissonBatchSampler(
            self.num_samples,
            self.sample_rate,
            self.steps_per_epoch,
            self.num_replicas,
            self.rank,
            source_of=source_of,
            position=position,
        )

    def step_event(self, step: int, multiplier_of: MultiplierOf) -> MechanismSegment:
        """One subsampled Gaussian release per step, empty batches included."""
        return MechanismSegment(multiplier_of(step), self.sample_rate, 1)

    def planned_events(self, start: int, count: int, multiplier_of: MultiplierOf) -> list[MechanismSegment]:
        """One event per step, grouped by noise multiplier."""
        per_sigma: dict[float, int] = {}
        for step in range(start, start + count):
            sigma = multiplier_of(step)
            per_sigma[sigma] = per_sigma.get(sigma, 0) + 1
        return [MechanismSegment(s, self.sample_rate, n) for s, n in per_sigma.items()]

    def calibrate(
        self,
        target_epsilon: float,
        delta: float,
        start: int,
        count: int,
        prior: Sequence[MechanismSegment],
        extras_of: ExtrasOf,
        accountant: Accountant | None = None,
    ) -> float:
        """See :meth:`BatchSelection.calibrate`."""
        plan: dict[tuple[float, ...], int] = {}
        for step in range(start, start + count):
            extra = extras_of(step)
            if extra:
                plan[extra] = plan.get(extra, 0) + 1
        return calibrate_noise_multiplier(
            target_epsilon, delta, self.sample_rate, count, prior=prior, joint_noise=plan or None, accountant=accountant
        )


class ShuffleSelection(BatchSelection):
    """Shuffled fixed-size batches, without amplification by subsampling (an explicit opt-out, with a warning).

    Each pass over a fresh permutation is recorded as one Gaussian release with sensitivity 2C at the smallest noise
    multiplier of the pass (σ/2 at q = 1 in the ledger), when its first step runs.
    """

    name = "shuffle"
    amplifies = False

    def __init__(self) -> None:
        super().__init__()
        self._sampler: ShuffleBatchSampler | None = None
        self._recorded_passes = 0

    @property
    def sample_rate(self) -> float:
        """1.0: no amplification is claimed (B/N is not a sampling probability here)."""
        return 1.0

    def announce(self) -> None:
        """Warn that the guarantee is much weaker than with Poisson sampling."""
        warn(
            "DPStrategy(poisson_sampling=False): batches are shuffled, not Poisson-sampled, so the ledger claims no"
            " amplification by subsampling. ε is that of one Gaussian release with sensitivity 2C (replace-one"
            " adjacency) per pass over the data (every epoch, and every resume), far larger than a Poisson-sampled"
            " run's. Use Poisson sampling for the usual DP-SGD guarantee."
        )

    def batch_sampler(self, source_of: SourceOf, position: Callable[[], int]) -> Sampler[list[int]]:
        """See :meth:`BatchSelection.batch_sampler`."""
        self._sampler = ShuffleBatchSampler(
            self.num_samples, self.batch_size, self.num_replicas, self.rank, source_of=source_of, position=position
        )
        self._recorded_passes = 0
        return self._sampler

    def _pass_multiplier(self, start: int, end: int, multiplier_of: MultiplierOf) -> float:
        # sensitivity 2C: the ledger's multiplier is half the smallest σ of the pass
        return min(multiplier_of(k) for k in range(start, max(end, start + 1))) / 2.0

    def step_event(self, step: int, multiplier_of: MultiplierOf) -> MechanismSegment | None:
        """The pass's release at the first step of each new pass; None for the pass's later steps."""
        sampler = self._sampler
        if sampler is None:
            raise RuntimeError("ShuffleSelection.step_event called before its batch sampler was built.")
        if sampler.passes <= self._recorded_passes:
            return None
        self._recorded_passes = sampler.passes
        end = sampler.pass_start + min(len(sampler), self.epoch_steps or len(sampler))
        return MechanismSegment(self._pass_multiplier(step, end, multiplier_of), 1.0, 1)

    def _pass_starts(self, start: int, count: int) -> list[int]:
        """The first steps of the passes that steps ``start .. start + count - 1`` belong to and that are not yet
        recorded (a pass per ``epoch_steps`` steps; the running pass if already recorded is skipped).
        """
        length = max(1, self.epoch_steps or self.steps_per_epoch)
        sampler = self._sampler
        first = start
        if sampler is not None and sampler.passes > 0 and sampler.passes <= self._recorded_passes:
            first = max(start, sampler.pass_start + length)
        return list(range(first, start + count, length))

    def planned_events(self, start: int, count: int, multiplier_of: MultiplierOf) -> list[MechanismSegment]:
        """One release per pass beginning in the range."""
        length = max(1, self.epoch_steps or self.steps_per_epoch)
        return [
            MechanismSegment(self._pass_multiplier(s, s + length, multiplier_of), 1.0, 1)
            for s in self._pass_starts(start, count)
        ]

    def calibrate(
        self,
        target_epsilon: float,
        delta: float,
        start: int,
        count: int,
        prior: Sequence[MechanismSegment],
        extras_of: ExtrasOf,
        accountant: Accountant | None = None,
    ) -> float:
        """σ such that one release per planned pass (σ/2 combined with the worst step's extras) meets the target."""
        passes = max(1, len(self._pass_starts(start, count)))
        worst = max((extras_of(k) for k in range(start, start + count)), key=lambda x: sum(s**-2 for s in x))
        halved = tuple(x / 2.0 for x in worst)
        joint = {halved: passes} if halved else None
        return 2.0 * calibrate_noise_multiplier(
            target_epsilon, delta, 1.0, passes, prior=prior, joint_noise=joint, accountant=accountant
        )


#: Batch selections by name.
SELECTIONS: dict[str, type[BatchSelection]] = {"poisson": PoissonSelection, "shuffle": ShuffleSelection}


# ---------------------------------------------------------------------------------------------- samplers
# Opacus has a Poisson sampler, but its distributed variant skips empty local batches (ranks then hang on
# collectives) and draws the same mask on every rank when the global RNG is seeded alike. These samplers always yield
# a batch (possibly empty) on every rank and step, and draw each step's mask from that step's own random source
# (lightning_dp.randomness): fresh OS entropy per fit by default, so a resumed run never replays earlier batches.
#: ``(step, rank) -> RandomSource``: the sampling randomness of one step.
SourceOf = Callable[[int, int], RandomSource]


def _default_sources(seed: int | None) -> SourceOf:
    root = fresh_seed() if seed is None else int(seed)
    return lambda step, rank: stream_source(root, "sampling", step, rank)


class _StepSampler(Sampler[list[int]]):
    """Shared by the samplers: where each yielded batch's global step index comes from.

    ``position()`` is read when an iteration starts: the number of steps taken so far (the strategy passes its
    count of released steps, which a resume restores before any batch is drawn). Without it the sampler counts the
    batches it has yielded itself, so its epochs differ and never repeat.
    """

    def __init__(self, source_of: SourceOf, position: Callable[[], int] | None) -> None:
        self._source_of = source_of
        self._position = position
        self._yielded = 0
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Record the epoch (called by Lightning); batches are keyed by global step, not by epoch."""
        self.epoch = epoch

    def _start(self) -> int:
        return self._position() if self._position is not None else self._yielded

    def _steps(self, count: int) -> Iterator[int]:
        start = self._start()
        for step in range(start, start + count):
            self._yielded = step + 1
            yield step


class PoissonBatchSampler(_StepSampler):
    """Yields Poisson-subsampled batches: each example is included in each step independently with probability q.

    Under DDP, the dataset is split into ``num_replicas`` disjoint shards (``rank::num_replicas``) and each rank
    draws its shard's inclusion mask from its own random source, so across all ranks every example of the dataset is
    included independently with probability ``sample_rate``; the global batch size is ``Binomial(N, q)``.

    Args:
        num_samples: N, the size of the dataset.
        sample_rate: q, the inclusion probability of each example in each step.
        steps_per_epoch: how many batches one epoch yields (empty batches included).
        num_replicas: number of ranks sharing the dataset.
        rank: this rank.
        seed: a fixed sampling seed (tests only: anyone who knows it can rebuild the batches); default: fresh OS
            entropy. Ignored when ``source_of`` is given.
        source_of: ``(step, rank) -> RandomSource`` (the strategy passes its run's streams).
        position: the global index of the next step, read when an iteration starts.

    Example:
        >>> sampler = PoissonBatchSampler(num_samples=1000, sample_rate=0.064, steps_per_epoch=16)
        >>> len(sampler)
        16
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps_per_epoch: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int | None = None,
        source_of: SourceOf | None = None,
        position: Callable[[], int] | None = None,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}.")
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}.")
        if not (0 <= rank < num_replicas):
            raise ValueError(f"rank {rank} is out of range for {num_replicas} replicas.")
        super().__init__(source_of or _default_sources(seed), position)
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps_per_epoch = int(steps_per_epoch)
        self.num_replicas = num_replicas
        self.rank = rank

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        shard = torch.arange(self.rank, self.num_samples, self.num_replicas)
        for step in self._steps(self.steps_per_epoch):
            mask = self._source_of(step, self.rank).uniform(len(shard)) < self.sample_rate
            yield shard[mask].tolist()


class ShuffleBatchSampler(_StepSampler):
    """Fixed-size batches of a random permutation (each example once per pass). Used only on explicit opt-out.

    This is *not* Poisson sampling: the accountant then claims no amplification by subsampling. Every iteration is
    a new *pass* over a fresh permutation; :attr:`passes` counts them and :attr:`pass_start` is the global step of
    the current pass's first batch (a resumed run starts a new pass, which the ledger charges again).

    Args:
        num_samples: N, the size of the dataset.
        batch_size: the per-rank batch size.
        num_replicas: number of ranks sharing the dataset.
        rank: this rank.
        seed: a fixed shuffling seed (tests only); default: fresh OS entropy. Ignored when ``source_of`` is given.
        source_of: ``(step, rank) -> RandomSource``; the permutation of a pass comes from its first step's source
            on rank 0 (the same on every rank).
        position: the global index of the next step, read when an iteration starts.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int | None = None,
        source_of: SourceOf | None = None,
        position: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(source_of or _default_sources(seed), position)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        #: number of passes started, and the global step of the current pass's first batch
        self.passes = 0
        self.pass_start = -1
        # Every rank yields the same number of batches, so no rank waits on a collective that never comes.
        self._steps_per_pass = math.ceil(math.ceil(num_samples / num_replicas) / batch_size)

    def __len__(self) -> int:
        return self._steps_per_pass

    def __iter__(self) -> Iterator[list[int]]:
        start = self._start()
        perm = self._source_of(start, 0).permutation(self.num_samples)[self.rank :: self.num_replicas].tolist()
        self.passes += 1
        self.pass_start = start
        for i, _ in enumerate(self._steps(self._steps_per_pass)):
            yield perm[i * self.batch_size : (i + 1) * self.batch_size]


__all__ = [
    "SELECTIONS",
    "BatchSelection",
    "PoissonBatchSampler",
    "PoissonSelection",
    "ShuffleBatchSampler",
    "ShuffleSelection",
    "SourceOf",
]
