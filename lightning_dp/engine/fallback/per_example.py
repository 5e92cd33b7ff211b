"""Per-example vector-Jacobian products of any function with ``torch.func``: the computation behind the fallback.

For a function ``f(θ, x)`` that the model applied to a whole micro-batch (a module's forward, or one op), the
per-sample gradient of example ``i`` is ``vjp(θ ↦ f(θ, x_i))(g_i)``, with ``x_i`` the example's slice of the batched
inputs (its batch dimension kept, of size 1) and ``g_i`` the slice of the output gradient. :func:`per_example_vjp`
computes all of them at once with ``torch.func.vmap`` over ``vjp``, or, when an op has no batching rule, one example at
a time.

The per-sample gradients must be those of the forward that produced the loss: the recomputation replays the random
number generator's state recorded before the original call (``vmap(..., randomness="different")`` then draws the same
dropout masks as the batched call, which consumes the generator in the same order), and the autocast state. Its
outputs are compared with fingerprints of the original outputs (:class:`Fingerprint`), so a recomputation that
differs from the real forward (draws that cannot be replayed, a forward that depends on other examples, a module whose
state changed) raises instead of producing silently wrong per-sample gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ForwardState:
    """What the recomputation replays of the original call: random number generators and autocast.

    Attributes:
        cpu_rng: the CPU generator's state before the call.
        cuda_rng: per CUDA device index, its generator's state before the call.
        autocast: ``(device type, dtype)`` of an enabled autocast, or None.
    """

    cpu_rng: Tensor
    cuda_rng: dict[int, Tensor]
    autocast: tuple[str, torch.dtype] | None

    @classmethod
    def record(cls, tensors: Sequence[Tensor] = ()) -> ForwardState:
        """The state now (before a call whose tensors live on ``tensors``' devices)."""
        devices = {t.device.index or 0 for t in tensors if t.device.type == "cuda"}
        cuda = {i: torch.cuda.get_rng_state(i) for i in devices}
        autocast = None
        for device_type in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device_type):
                autocast = (device_type, torch.get_autocast_dtype(device_type))
                break
        return cls(torch.get_rng_state(), cuda, autocast)

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Run with the recorded generators and autocast; restore the current generators afterwards."""
        cpu_now = torch.get_rng_state()
        cuda_now = {i: torch.cuda.get_rng_state(i) for i in self.cuda_rng}
        torch.set_rng_state(self.cpu_rng)
        for i, state in self.cuda_rng.items():
            torch.cuda.set_rng_state(state, i)
        ctx = torch.autocast(self.autocast[0], dtype=self.autocast[1]) if self.autocast else nullcontext()
        try:
            with ctx:
                yield
        finally:
            torch.set_rng_state(cpu_now)
            for i, state in cuda_now.items():
                torch.cuda.set_rng_state(state, i)


def _weights(n: int, device: torch.device) -> Tensor:
    # A fixed, non-uniform weighting: a permutation or a shift of values changes the weighted sum.
    return torch.linspace(0.5, 1.5, n, device=device, dtype=torch.float32)


@dataclass
class Fingerprint:
    """Two numbers per example that summarise an output (a weighted sum and a sum of squares), to check that a
    recomputation reproduced it without keeping the output.
    """

    weighted: Tensor  #: ``(b,)``
    squares: Tensor  #: ``(b,)``
    scale: Tensor  #: ``(b,)``: weighted sum of absolute values (the tolerance's scale)
    dtype: torch.dtype

    @classmethod
    def of(cls, x: Tensor, batch_dim: int) -> Fingerprint:
        """The fingerprint of ``x``, whose dimension ``batch_dim`` indexes the examples."""
        flat = x.detach().movedim(batch_dim, 0).reshape(x.shape[batch_dim], -1).float()
        w = _weights(flat.shape[1], flat.device)
        # elementwise products in fp32 (a matmul would run in the autocast dtype inside the user's autocast)
        squares = (flat * flat).sum(1)
        return cls((flat * w).sum(1), squares, (flat.abs() * w).sum(1) + squares, x.dtype)

    def mismatch(self, other: Fingerprint) -> Tensor:
        """Per example, how far ``other`` is from this fingerprint relative to the tolerance (> 1: not the same)."""
        tol = recompute_tolerance(self.dtype) * self.scale + 1e-30
        diff = torch.maximum((self.weighted - other.weighted).abs(), (self.squares - other.squares).abs()) / tol
        # an example that is not finite (NaN/inf input) must be so in both; the engine then drops it
        same_nonfinite = ~torch.isfinite(self.squares) & ~torch.isfinite(other.squares)
        return torch.where(same_nonfinite, torch.zeros((), device=diff.device), diff)


def recompute_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance for a recomputed output: rounding of the same math in another kernel (vmap batches it
    differently), scaled to the dtype's precision.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return max(256 * eps, 1e-12) if dtype in (torch.float32, torch.float64) else 16 * eps


@contextmanager
def forward_hooks_suppressed(module: nn.Module | None) -> Iterator[None]:
    """Without the forward (post) hooks of ``module``'s submodules, e.g. a recording hook that would see vmap's
    batched tensors. Forward pre-hooks stay: some compute the weights (``torch.nn.utils.weight_norm``).
    """
    if module is None:
        yield
        return
    saved = [(m, m._forward_hooks) for m in module.modules() if m._forward_hooks]
    for m, _ in saved:
        m._forward_hooks = type(m._forward_hooks)()
    try:
        yield
    finally:
        for m, hooks in saved:
            m._forward_hooks = hooks


@dataclass
class BatchedArg:
    """A batched input of the recomputed function: the tensor and its batch dimension."""

    value: Tensor
    dim: int = 0


def _select_example(out: Tensor, dim: int, index: Tensor, b: int) -> Tensor:
    """The example's slice of an output: as is if its batch dimension has size 1, else row ``index`` of a batch of
    ``b`` (a function that expands its result to the batch, e.g. ``pos.repeat(B, 1, 1, 1)``).
    """
    if out.shape[dim] == 1 or b == 1:
        return out
    if out.shape[dim] != b:
        raise RuntimeError(
            f"the recomputed output for one example has size {out.shape[dim]} along the batch dimension {dim}"
            f" (expected 1 or {b})"
        )
    return out.index_select(dim, index.reshape(1))


def per_example_vjp(
    fn: Callable[[dict[str, Tensor], list[Tensor]], Sequence[Tensor]],
    primals: dict[str, Tensor],
    batched: list[BatchedArg],
    cotangents: list[BatchedArg],
    batch_size: int,
    state: ForwardState | None = None,
) -> tuple[dict[str, Tensor], list[Tensor], str]:
    """Per-example gradients of ``fn`` with respect to ``primals``.

    Args:
        fn: ``fn(primals, xs) -> outputs``, with ``xs`` the batched inputs of one example (each of size 1 along its
            batch dimension); the outputs are one example's, in the order of ``cotangents``.
        primals: the tensors to differentiate (parameters), not batched.
        batched: the batched inputs.
        cotangents: the output gradients, one per output of ``fn``.
        batch_size: ``b``.
        state: the generators and autocast state to replay.

    Returns:
        ``(grads, outputs, how)``: per primal its per-example gradients ``(b, *shape)`` (fp32), the recomputed outputs
        as batches (the batch along each cotangent's dimension), and ``"vmap"`` or ``"loop"``.
    """
    b = batch_size
    names = list(primals)
    values = tuple(primals[n] for n in names)
    n_in = len(batched)
    out_dims = [c.dim for c in cotangents]

    def one(index: Tensor, *flat: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        xs, gs = list(flat[:n_in]), flat[n_in:]

        def f(*ps: Tensor) -> tuple[Tensor, ...]:
            outs = fn(dict(zip(names, ps)), xs)
            return tuple(_select_example(o, d, index, b) for o, d in zip(outs, out_dims))

        outs, vjp_fn = torch.func.vjp(f, *values)
        grads = vjp_fn(tuple(g.to(o.dtype) for g, o in zip(gs, outs)))
        return tuple(grads), tuple(outs)

    if state is None:  # nothing to replay, but leave the generators as they are
        state = ForwardState.record([*primals.values(), *(a.value for a in batched)])
    try:
        with state.replayed():
            in_dims = (0, *[a.dim for a in batched], *out_dims)
            flat = [a.value.unsqueeze(a.dim + 1) for a in batched] + [c.value.unsqueeze(c.dim + 1) for c in cotangents]
            index = torch.arange(b, device=flat[0].device if flat else values[0].device)
            grads, outs = torch.func.vmap(one, in_dims=in_dims, out_dims=(0, tuple(out_dims)), randomness="different")(
                index, *flat
            )
        how = "vmap"
        outs = [o.squeeze(d + 1) for o, d in zip(outs, out_dims)]
    except Exception as vmap_error:  # an op without a batching rule: one example at a time
        try:
            grads, outs = _loop(one, batched, cotangents, b, state)
        except Exception as loop_error:
            raise loop_error from vmap_error
        how = "loop"
    return {n: g.float() for n, g in zip(names, grads)}, list(outs), how


def _loop(
    one: Callable[..., tuple[tuple[Tensor, ...], tuple[Tensor, ...]]],
    batched: list[BatchedArg],
    cotangents: list[BatchedArg],
    b: int,
    state: ForwardState,
) -> tuple[tuple[Tensor, ...], list[Tensor]]:
    per_grads: list[tuple[Tensor, ...]] = []
    per_outs: list[tuple[Tensor, ...]] = []
    with state.replayed():
        for i in range(b):
            xs = [a.value.narrow(a.dim, i, 1) for a in batched]
            gs = [c.value.narrow(c.dim, i, 1) for c in cotangents]
            index = torch.tensor(i, device=(xs or gs)[0].device)
            g, o = one(index, *xs, *gs)
            per_grads.append(g)
            per_outs.append(o)
    grads = tuple(torch.stack(parts) for parts in zip(*per_grads))
    outs = [torch.cat(parts, dim=c.dim) for parts, c in zip(zip(*per_outs), cotangents)]
    return grads, outs


__all__ = [
    "BatchedArg",
    "Fingerprint",
    "ForwardState",
    "forward_hooks_suppressed",
    "per_example_vjp",
    "recompute_tolerance",
]
