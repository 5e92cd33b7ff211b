"""Examples with a non-finite per-sample gradient norm: counted and zeroed out, or an error.

An example whose per-sample gradient norm is NaN or infinite (a NaN/inf input row, a ``log(0)`` loss, an overflow;
also a finite gradient whose squared norm overflows fp32) adds exactly zero to the clipped sum under ``"skip"``: the
engine zeroes its stored rows (``torch.where``, as ``0 · NaN = NaN``), computes its factor from a zero norm and
counts it here. Under ``"error"`` a :class:`~lightning_dp.errors.NonFiniteGradientError` is raised instead.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_dp.engine.contributions import Contribution
from lightning_dp.errors import NonFiniteGradientError

NonFiniteMode = Literal["skip", "error"]
NONFINITE_MODES = ("skip", "error")


class NonFiniteCounter:
    """Counts the non-finite examples of an engine's micro-batches (``"skip"``) or raises for them (``"error"``).

    Args:
        mode: ``"skip"`` or ``"error"``.

    Attributes:
        last: how many examples of the last counted micro-batch had a non-finite gradient norm.

    Raises:
        ValueError: for an unknown ``mode``.
    """

    def __init__(self, mode: NonFiniteMode) -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {mode!r}.")
        self.mode = mode
        self.last = 0
        self._total = 0

    def count(self, bad: Tensor) -> int:
        """Count the examples flagged in ``bad`` (``(b,)`` booleans) as non-finite, or raise (``"error"``).

        Raises:
            NonFiniteGradientError: with ``mode="error"``, if any is flagged.
        """
        count = int(bad.sum())  # one host sync per micro-batch: the branches need it
        self.last = count
        if count == 0:
            return 0
        if self.mode == "error":
            indices = tuple(int(i) for i in torch.nonzero(bad).flatten().tolist())
            raise NonFiniteGradientError(
                f"{count} of the {bad.shape[0]} examples of this micro-batch have a non-finite (NaN or infinite)"
                f" per-sample gradient norm (positions {list(indices)} in the micro-batch). Look for NaN/inf in"
                " those examples' inputs and per-sample losses (torch.isfinite), a log(0) or a division by zero in"
                " the loss, or an fp16 overflow. To train on while dropping such examples (each adds exactly zero"
                " to the clipped sum, and is counted), build the engine with nonfinite='skip'.",
                count=count,
                indices=indices,
            )
        self._total += count
        return count

    def zero_out(self, groups: list[Contribution], sq: Tensor) -> Tensor:
        """Count the examples whose squared norm ``sq`` is not finite; zero them out of ``groups`` (``"skip"``) or
        raise (``"error"``).

        Returns:
            ``(b,)`` booleans, True for the finite examples.

        Raises:
            NonFiniteGradientError: with ``mode="error"``, if any example's norm is NaN or infinite.
        """
        finite = torch.isfinite(sq)
        if self.count(~finite) == 0:
            return finite
        for g in groups:
            g.zero_examples(finite)
        return finite

    def pop(self) -> int:
        """How many examples were counted since the last call, and reset."""
        count, self._total = self._total, 0
        return count


__all__ = ["NONFINITE_MODES", "NonFiniteCounter", "NonFiniteMode"]
