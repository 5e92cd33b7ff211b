"""Exact contractions of low-precision activations and output gradients, and the rounding of clip-scaled rows.

A product of two bf16 (or two fp16) numbers is exact in fp32, so a matrix product of bf16 inputs accumulated in fp32
with an fp32 result is as exact as the same product of the inputs upcast to fp32. On CUDA (and the ``meta`` device,
which checks shapes and dtypes) torch offers it as ``torch.mm`` / ``torch.bmm`` with ``out_dtype=torch.float32``:
the tensor cores run it, and no fp32 copy of the inputs is made. On CPU, which has no such kernel, the inputs are
upcast to fp32 for the duration of one product.

The clipped sum ``Σ_i f_i G_iᵀ A_i`` needs the factors ``f_i`` inside the contraction. On the tensor-core path the
scaled rows ``f_i · G_i`` are rounded back to the inputs' dtype (bf16: 8 significant bits), and rounding is not
monotone under cancellation: ``‖round(f_i G_i)ᵀ A_i‖`` can exceed ``f_i ‖G_iᵀ A_i‖`` (a clipped example was measured
at 1.00026·C on ViT-shaped data). :func:`scale_rows` rounds once, to nearest, so each scaled entry is within
``u·|f_i G_i[t, k]|`` of its exact value (``u`` = :func:`unit_roundoff`); the layer then reports the per-sample bound
``u · Σ_t ‖a_t‖·‖g_t‖ ≥ ‖(round(f_i G_i) − f_i G_i)ᵀ A_i‖ / f_i`` and the engine takes the clip factors from norms
inflated by it, so that no clipped example exceeds C. On CPU the scaled rows stay in fp32 (today's exact path) unless
:func:`emulate_rounded_scaling` is active (tests use it to exercise the CUDA path's bound on CPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

#: dtypes whose pairwise products are exact in fp32 (8 and 11 significant bits)
LOW_PRECISION = (torch.bfloat16, torch.float16)

#: devices with ``mm`` / ``bmm`` ``out_dtype=torch.float32`` kernels for low-precision inputs
_OUT_DTYPE_DEVICES = ("cuda", "meta")

#: set by :func:`emulate_rounded_scaling` (a module global, not thread-local: CUDA runs backward hooks in another
#: thread; the emulation is for CPU tests only)
_emulate = False


@contextmanager
def emulate_rounded_scaling() -> Iterator[None]:
    """While inside, clip-scaled low-precision rows are rounded back to their dtype on every device, as on CUDA
    (the products themselves stay exact: they are formed in fp32). For tests of the rounding bound on CPU.
    """
    global _emulate
    previous, _emulate = _emulate, True
    try:
        yield
    finally:
        _emulate = previous


def has_out_dtype_kernels(x: Tensor) -> bool:
    """Whether ``x`` is low precision on a device with bf16/fp16-in, fp32-out matrix products."""
    return x.dtype in LOW_PRECISION and x.device.type in _OUT_DTYPE_DEVICES


def rounds_scaled_rows(x: Tensor) -> bool:
    """Whether :func:`scale_rows` returns ``x``'s low-precision dtype (rounding) rather than fp32 (exact to fp32)."""
    return x.dtype in LOW_PRECISION and (x.device.type in _OUT_DTYPE_DEVICES or _emulate)


def unit_roundoff(dtype: torch.dtype) -> float:
    """The relative error bound of rounding to nearest in ``dtype`` (``2^-p`` for ``p`` significant bits)."""
    return {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}.get(dtype, 0.0)


def common(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a`` and ``b`` in one dtype: unchanged when they agree, else both in fp32 (upcasting is exact)."""
    if a.dtype == b.dtype:
        return a, b
    return a.float(), b.float()


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D) with exact products, fp32 accumulation and an fp32 result, without fp32 copies on CUDA."""
    if a.dtype == b.dtype and has_out_dtype_kernels(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def bmm_f32(a: Tensor, b: Tensor) -> Tensor:
    """Batched ``a @ b`` (3-D) with exact products, fp32 accumulation and an fp32 result (see :func:`mm_f32`)."""
    if a.dtype == b.dtype and has_out_dtype_kernels(a):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def gram(x: Tensor) -> Tensor:
    """Per-example ``x_i x_iᵀ`` of ``(b, T, k)`` in fp32 (exact products, fp32 accumulation), upcasting at most once."""
    if has_out_dtype_kernels(x):
        return torch.bmm(x, x.transpose(1, 2), out_dtype=torch.float32)
    x = x.float()
    return torch.bmm(x, x.transpose(1, 2))


def scale_rows(x: Tensor, factors: Tensor) -> Tensor:
    """``factors_i · x_i`` for batch-first ``x``, the product formed in fp32 and rounded once.

    Returns ``x``'s dtype where :func:`rounds_scaled_rows` (each entry within ``u`` relative of the exact product,
    with ``u`` = :func:`unit_roundoff` plus fp32's ``2^-24`` of the intermediate product), else fp32.

    Args:
        x: ``(b, ...)``.
        factors: ``(b,)`` fp32.
    """
    f = factors.to(torch.float32).view(-1, *([1] * (x.dim() - 1)))
    if not rounds_scaled_rows(x):
        return x * f  # promoted to fp32 in one pass
    out = torch.empty_like(x)
    torch.mul(x, f, out=out)  # computed in fp32 (the promoted dtype), rounded once into x's dtype
    return out


def token_norms(x: Tensor) -> Tensor:
    """Per-token L2 norms ``(b, T)`` of ``(b, T, k)`` in fp32 (accumulated in fp32, no copy of ``x``)."""
    if x.dtype == torch.float64:  # a double model (tests, cross-checks): no narrowing inside the reduction
        return torch.linalg.vector_norm(x, 2, dim=-1).float()
    return torch.linalg.vector_norm(x, 2, dim=-1, dtype=torch.float32)


__all__ = [
    "LOW_PRECISION",
    "bmm_f32",
    "common",
    "emulate_rounded_scaling",
    "gram",
    "has_out_dtype_kernels",
    "mm_f32",
    "rounds_scaled_rows",
    "scale_rows",
    "token_norms",
    "unit_roundoff",
]
