"""The one place where Gaussian noise is added: clipped sum → (optional all-reduce) → noise → normalised gradient."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def privatize(
    summed: dict[nn.Parameter, Tensor],
    noise_std: float,
    normalizer: float,
    generator: torch.Generator | None = None,
    all_reduce: Callable[[Tensor], None] | None = None,
    add_noise: bool = True,
) -> dict[nn.Parameter, Tensor]:
    """Turn per-rank clipped gradient sums into the private gradient ``(Σ_ranks Σ_i clip(g_i) + N(0, std²)) / B``.

    The sums are flattened into one buffer so that DDP needs a single all-reduce, and noise is drawn once for the
    global sum (only where ``add_noise``: on one rank under DDP), never once per rank.

    Args:
        summed: per parameter, the fp32 sum of clipped per-sample gradients on this rank.
        noise_std: σ·C, the std of the Gaussian noise on the global sum.
        normalizer: the expected logical batch size B (q·N); the result is divided by it.
        generator: the RNG for the noise (on the parameters' device).
        all_reduce: an in-place sum across ranks, or None on one device.
        add_noise: whether this rank draws the noise.

    Returns:
        Per parameter, the private gradient in the parameter's dtype.
    """
    params = list(summed)
    if not params:
        return {}
    flat = torch.cat([summed[p].reshape(-1) for p in params])
    if add_noise and noise_std > 0:
        flat += torch.normal(0.0, noise_std, size=flat.shape, device=flat.device, dtype=flat.dtype, generator=generator)
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
