"""Sums of per-sample products over the dimensions a parameter was broadcast along: shared by the rules of norms
and scales (and by the fallback's closed-form op rules).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sum_except_batch_and_last(x: Tensor, n_last: int) -> Tensor:
    """``x`` ``(B, ..., *last)`` summed over every dimension but the batch and the last ``n_last``."""
    dims = list(range(1, x.dim() - n_last))
    return x.sum(dim=dims) if dims else x


def reduce_to(product: Tensor, shape: torch.Size) -> Tensor:
    """Sum a per-sample ``(B, *rest)`` product over the dimensions a parameter of ``shape`` was broadcast along
    (aligned to the right, as broadcasting), giving ``(B, *shape)``.
    """
    rest = product.dim() - 1
    target = list(shape)
    while len(target) > rest and target[0] == 1:  # leading size-1 dims broadcast against the batch
        target.pop(0)
    lead = rest - len(target)
    dims = [1 + d for d in range(lead)]
    dims += [1 + lead + j for j, n in enumerate(target) if n == 1 and product.shape[1 + lead + j] != 1]
    out = product.sum(dim=dims, keepdim=True) if dims else product
    return out.reshape(product.shape[0], *shape)


__all__ = ["reduce_to", "sum_except_batch_and_last"]
