"""The guards of the private step that keep state across steps: one release per sampled batch, one training loader,
and the schedule of the sample-mixing probe (Lightning glue around :mod:`lightning_dp.probe`).

Stateless guards live in ``lightning_dp.guards``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.probe import ProbeItems, ProbeSchedule, SampleMixingError

if TYPE_CHECKING:
    import lightning.pytorch as pl


class StepGuards:
    """Per-fit guards of ``DPStrategy``'s step.

    Args:
        probe_budget: the share of run time the random later probes may take.
    """

    def __init__(self, probe_budget: float) -> None:
        #: when the probe runs (reset per fit)
        self.probe = ProbeSchedule(probe_budget)
        #: the raw training items the probe draws from (set when the training loader is built)
        self.items: ProbeItems | None = None
        self._loader_key: tuple[int, int] | None = None
        self._released_in_batch = False

    def start_fit(self, probe_budget: float) -> None:
        """A new fit: a fresh probe schedule (its first step is probed) and no training loader yet."""
        self.probe = ProbeSchedule(probe_budget)
        self._loader_key = None

    def new_batch(self) -> None:
        """A new sampled batch: it may release once."""
        self._released_in_batch = False

    def refuse_second_release(self) -> None:
        """One release per sampled batch: a second evaluation of the step on the same batch is refused.

        Raises:
            DPMisconfigurationError: naming the optimizer's double closure evaluation and DP-SAT.
        """
        if self._released_in_batch:
            raise DPMisconfigurationError(
                "training_step ran a second time on the same sampled batch: the optimizer evaluates its closure twice"
                " (SAM, or an optimizer_step that calls the closure twice). Each evaluation would release another noisy"
                " gradient of the same Poisson sample, which is one subsampled Gaussian mechanism with σ/√2, not two"
                " independent steps, so the ε reported would be too small. Use an optimizer that evaluates the closure"
                " once per step. For sharpness-aware training without extra privacy cost, take the ascent direction"
                " from the previous step's private gradient (DP-SAT): see 'Sharpness-aware minimisation' in the docs."
            )
        self._released_in_batch = True

    def refuse_second_train_loader(self, trainer: pl.Trainer) -> None:
        """Lightning processes every loader of a list, dict or ``CombinedLoader`` in one round, before it stores the
        combined loader: a second call in the same round is a second training loader.

        Raises:
            DPMisconfigurationError: suggesting one concatenated dataset.
        """
        key = (id(trainer), id(getattr(trainer.fit_loop, "_combined_loader", None)))
        if key == self._loader_key:
            raise DPMisconfigurationError(
                "DPStrategy trains on exactly one training dataloader, but got several (a list or dict of train"
                " dataloaders, or a CombinedLoader). Poisson sampling draws every example with probability q from one"
                " dataset. Concatenate the datasets (torch.utils.data.ConcatDataset) into one DataLoader."
            )
        self._loader_key = key

    def maybe_probe(
        self, uniform: Callable[[], float], world_size: int, device: torch.device, probe: Callable[[ProbeItems], None]
    ) -> None:
        """Run the sample-mixing probe if this step is due (rank 0's schedule decides for every rank).

        Args:
            uniform: draws this step's number in [0, 1) from the run's secret randomness (the schedule's coin).
            world_size: the number of ranks (the decision and the finding are shared by all).
            device: where the collectives' flags live.
            probe: runs the probe on the training items (:func:`lightning_dp.probe.probe_items`).

        Raises:
            SampleMixingError: on every rank, if any rank's probe found examples mixed.
        """
        if self.items is None:
            return
        due = self.probe.due(uniform())
        if world_size > 1:
            decision = torch.tensor([float(due)], device=device)
            dist.broadcast(decision, src=0)
            due = bool(decision.item())
        if not due:
            return
        started = time.perf_counter()
        error: SampleMixingError | None = None
        try:
            probe(self.items)
        except SampleMixingError as err:
            error = err
        found = error is not None
        if world_size > 1:
            flag = torch.tensor([float(found)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            found = bool(flag.item())
        if error is not None:
            raise error
        if found:
            raise SampleMixingError("The sample-mixing probe of another rank found examples mixed (see its error).")
        self.probe.ran(time.perf_counter() - started)


__all__ = ["StepGuards"]
