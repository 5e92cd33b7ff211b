"""The one module that adds Gaussian noise: to the clipped gradient sum and to released statistics.

Every draw comes from a :class:`~lightning_dp.randomness.RandomSource` handed in by the caller (one per step and
purpose, see :mod:`lightning_dp.randomness`), never from a global RNG.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_dp.randomness import RandomSource


def add_gaussian(values: Tensor, std: float, source: RandomSource) -> Tensor:
    """``values`` plus independent N(0, std²) noise per entry, in place when possible.

    Args:
        values: the tensor to noise (its device and dtype are kept).
        std: the noise standard deviation (0: returned unchanged).
        source: where the noise comes from.

    Returns:
        The noised tensor (``values`` itself, modified in place).

    Example:
        >>> from lightning_dp.randomness import TorchSource
        >>> add_gaussian(torch.zeros(3), 1.0, TorchSource(0)).shape
        torch.Size([3])
    """
    if std > 0:
        values += source.normal(tuple(values.shape), std, values.device, values.dtype)
    return values


def privatize(
    summed: dict[nn.Parameter, Tensor],
    noise_std: float,
    normalizer: float,
    source: RandomSource | None,
    all_reduce: Callable[[Tensor], None] | None = None,
) -> dict[nn.Parameter, Tensor]:
    """Turn per-rank clipped gradient sums into the private gradient ``(Σ_ranks Σ_i clip(g_i) + N(0, std²)) / B``.

    The sums are flattened into one buffer so that DDP needs a single all-reduce, and noise is drawn once for the
    global sum (only where ``source`` is given: on one rank under DDP), never once per rank.

    Args:
        summed: per parameter, the fp32 sum of clipped per-sample gradients on this rank.
        noise_std: σ·sensitivity, the std of the Gaussian noise on the global sum.
        normalizer: the expected logical batch size B (q·N); the result is divided by it.
        source: the noise source of this step (None on ranks that do not draw the noise).
        all_reduce: an in-place sum across ranks, or None on one device.

    Returns:
        Per parameter, the private gradient in the parameter's dtype.
    """
    params = list(summed)
    if not params:
        return {}
    flat = torch.cat([summed[p].reshape(-1) for p in params])
    if source is not None:
        add_gaussian(flat, noise_std, source)
    if all_reduce is not None:
        all_reduce(flat)
    flat /= normalizer
    out: dict[nn.Parameter, Tensor] = {}
    offset = 0
    for p in params:
        n = p.numel()
        out[p] = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    return out


__all__ = ["add_gaussian", "privatize"]
