"""Buffers and the guarantee: a buffer updated from the private batch is a release without noise.

A buffer that records a statistic of the batch (a running maximum of the inputs, a running mean) is saved in every
checkpoint and in the final model: its exact private value would be published while ε covers only the noisy
gradients. The strategy therefore watches every buffer of the module across the user's ``training_step`` (where the
private batch is seen): a buffer that changes there is refused, unless the user declares it:

- ``public_buffers``: changes in ``training_step`` but depends on the parameters and the step count only (an EMA of
  the weights, a step counter); the sample-mixing probe checks that replacing one example leaves it unchanged;
- ``nonprivate_buffers``: a statistic of the private data kept knowingly; it is listed as *not private* in the
  privacy summary and in the checkpoint's privacy metadata.

Buffers computed from the parameters outside ``training_step`` (Lightning's ``WeightAveraging`` callback keeps its
averaged model outside the module; an EMA updated in ``on_train_batch_end`` from the weights) are post-processing of
private outputs and need no declaration. Changes made by hooks outside ``training_step`` are not watched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_dp.errors import DPMisconfigurationError


class PrivateBufferError(DPMisconfigurationError):
    """A buffer changed as a function of the private batch without being declared."""


class BufferWatch:
    """Refuse undeclared buffers that change while the user's step sees the private batch.

    Args:
        public: names of buffers that may change in ``training_step`` without depending on the examples.
        nonprivate: names of buffers holding statistics of the private data, kept knowingly (reported as such).

    Raises:
        DPMisconfigurationError: if a name is in both lists.

    Example:
        >>> watch = BufferWatch(nonprivate=["running_max"])
        >>> module = nn.Module()
        >>> module.register_buffer("running_max", torch.zeros(()))
        >>> watch.bind(module)
        >>> before = watch.snapshot(module)
        >>> watch.check(module, before)  # nothing changed
    """

    def __init__(self, public: Sequence[str] = (), nonprivate: Sequence[str] = ()) -> None:
        self.public = tuple(public)
        self.nonprivate = tuple(nonprivate)
        both = set(self.public) & set(self.nonprivate)
        if both:
            raise DPMisconfigurationError(f"Buffer(s) {sorted(both)} are declared both public and nonprivate.")

    @property
    def declared(self) -> set[str]:
        """Every declared buffer name."""
        return {*self.public, *self.nonprivate}

    def bind(self, module: nn.Module) -> None:
        """Check that every declared name is a buffer of ``module``.

        Raises:
            DPMisconfigurationError: naming the unknown names and the module's buffers.
        """
        names = {n for n, _ in module.named_buffers()}
        unknown = sorted(self.declared - names)
        if unknown:
            raise DPMisconfigurationError(
                f"DPStrategy(public_buffers/nonprivate_buffers) name(s) {unknown} that are not buffers of the module;"
                f" its buffers are {sorted(names) or 'none'}. Use the names of `module.named_buffers()`."
            )

    def snapshot(self, module: nn.Module) -> dict[str, Tensor]:
        """A copy of every undeclared buffer."""
        declared = self.declared
        return {n: b.detach().clone() for n, b in module.named_buffers() if n not in declared}

    def check(self, module: nn.Module, before: dict[str, Tensor]) -> None:
        """Raise if an undeclared buffer differs from ``before`` (and put it back first, so the private value
        does not stay in the model).

        Raises:
            PrivateBufferError: naming the buffer and the three ways out.
        """
        current = dict(module.named_buffers())
        changed = [n for n, old in before.items() if n in current and not _equal(current[n], old)]
        if not changed:
            return
        with torch.no_grad():
            for n in changed:
                if current[n].shape == before[n].shape:
                    current[n].copy_(before[n])
        names = ", ".join(f"'{n}'" for n in changed)
        raise PrivateBufferError(
            f"Buffer {names} changed during training_step, where the private batch is seen. A buffer updated from the"
            " batch (a statistic of the inputs, a running mean) is saved in every checkpoint and in the final model"
            " without noise: it is outside the DP guarantee (it was reset to its value before this step). Stop"
            " updating it from the batch; if it depends on the parameters and the step count only (an EMA of the"
            f" weights, a counter), declare DPStrategy(public_buffers=[{names}]) (the sample-mixing probe checks that"
            " it does not depend on the examples) or update it in on_train_batch_end; to keep it knowingly as a"
            f" non-private statistic, declare DPStrategy(nonprivate_buffers=[{names}]) (it is then listed as not"
            " private in the privacy summary and in the checkpoint)."
        )


def _equal(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a, b)) or (
        a.is_floating_point()
        and bool(torch.equal(a.isnan(), b.isnan()))
        and bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))
    )


__all__ = ["BufferWatch", "PrivateBufferError"]
