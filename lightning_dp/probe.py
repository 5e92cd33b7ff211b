"""Detecting a forward pass (or loss) that mixes examples, before the first private step releases anything.

Per-sample clipping bounds one example's influence only if example i's loss depends on example i's input alone.
A forward that mixes examples (``x - x.mean(0)``, ``h + h.mean(0)``, batch statistics, attention across the
batch) lets one example move every other example's gradient, and the clipped sum by far more than C. Hooks cannot
see that. The probe runs the user's ``training_step`` on a few examples of the batch twice — once as they are, once
with only example 0 altered — under identical randomness, and compares the other examples' per-sample gradient
norms. Any change means examples mix; the error then names the first module whose other rows changed.

The probe costs two small forward/backward passes at the first step (and after the trainable set changes). It
runs with logging suppressed and restores every RNG state, so the step it precedes is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch import Tensor, nn

from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.sampling import batch_size_of, slice_batch

#: how many examples of the batch the probe uses
PROBE_EXAMPLES = 4


class SampleMixingError(DPMisconfigurationError):
    """The forward pass or the loss makes one example's gradient depend on other examples."""


def alter_first_example(batch: Any, size: int) -> Any:
    """A copy of ``batch`` in which only example 0 differs (every per-sample tensor's row 0 is changed).

    Floating-point rows are shifted by a fixed pattern; integer rows (tokens, labels) take another example's values
    (so they stay valid); booleans are flipped.
    """
    if isinstance(batch, Tensor):
        if batch.ndim == 0 or batch.shape[0] != size:
            return batch
        out = batch.clone()
        if out.is_floating_point() or out.is_complex():
            gen = torch.Generator().manual_seed(0)
            scale = float(out.detach().float().abs().mean()) + 1.0
            shift = torch.randn(out[0].shape, generator=gen).to(out.device, out.dtype)
            out[0] = out[0] + scale * shift
        elif out.dtype == torch.bool:
            out[0] = ~out[0]
        else:  # take another example's values (valid tokens/labels); unchanged if all examples agree
            other = next((k for k in range(1, size) if not torch.equal(out[0], out[k])), None)
            if other is not None:
                out[0] = out[other]
        return out
    if isinstance(batch, dict):
        return type(batch)({k: alter_first_example(v, size) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        items = [alter_first_example(v, size) for v in batch]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            return type(batch)(*items)
        return type(batch)(items)
    return batch


@contextmanager
def _recording_outputs(model: nn.Module, size: int, into: list[tuple[str, Tensor]]) -> Iterator[None]:
    names = {m: n for n, m in model.named_modules()}

    def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.ndim >= 1 and output.shape[0] == size:
            into.append((names.get(mod, "?"), output.detach().float().clone()))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _differ(a: Tensor, b: Tensor, rtol: float) -> bool:
    if a.shape != b.shape:
        return True
    scale = float(torch.maximum(a.abs().max(), b.abs().max())) if a.numel() else 0.0
    return bool((a - b).abs().max() > rtol * scale + 1e-6) if a.numel() else False


def find_sample_mixing(
    model: nn.Module,
    per_sample_norms: Callable[[Any, int], Tensor],
    batch: Any,
    size: int,
    rtol: float = 1e-3,
) -> None:
    """Raise :class:`SampleMixingError` if changing example 0 changes any other example's per-sample gradient.

    Args:
        model: the LightningModule (its modules are watched to locate the mixing).
        per_sample_norms: runs the user's step on a batch of the given size (forward, loss, backward) and returns
            its per-sample gradient norms, accumulating nothing.
        batch: the logical or micro-batch to take the probe examples from.
        size: its number of examples (≥ 2).
        rtol: relative tolerance for "unchanged".

    Raises:
        SampleMixingError: naming the first module whose other examples' outputs changed (or the loss).
    """
    m = min(size, PROBE_EXAMPLES)
    probe = slice_batch(batch, slice(0, m), size)
    altered = alter_first_example(probe, m)
    states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    outputs: list[list[tuple[str, Tensor]]] = [[], []]
    norms: list[Tensor] = []
    try:
        for i, b in enumerate((probe, altered)):
            _set_rng_states(states)  # the same dropout masks, augmentations, ... in both passes
            with _recording_outputs(model, m, outputs[i]):
                norms.append(per_sample_norms(b, m).detach().float())
    finally:
        _set_rng_states(states)
    if not _differ(norms[0][1:], norms[1][1:], rtol):
        return
    where = "in the loss computed by training_step (no module's output mixes them)"
    for (name, a), (_, b) in zip(*outputs):
        if _differ(a[1:], b[1:], rtol):
            where = f"first visible at the output of module '{name or '<root>'}'"
            break
    raise SampleMixingError(
        "Examples are mixed in the forward pass: changing one example changed the per-sample gradients of the others"
        f" ({where}). Per-sample clipping then no longer bounds one example's influence, and the DP guarantee does"
        " not hold. Common causes: normalising with batch statistics (x - x.mean(0), BatchNorm in train mode),"
        " mixup/cutmix, attention or pooling across the batch dimension, a loss over pairs of examples. Make each"
        " example's loss depend on that example only. If you are certain the mixing is harmless, pass"
        " DPStrategy(check_sample_mixing=False)."
    )


class _logging_suppressed:
    """Silence ``self.log`` / ``self.log_dict`` of a LightningModule while the probe runs its training_step."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.module.log = _no_log  # type: ignore[method-assign]
        self.module.log_dict = _no_log  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        del self.module.log
        del self.module.log_dict


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


def probe_training_step(module: nn.Module, engine: Any, loss_of_batch: Callable[[Any], Tensor], batch: Any) -> bool:
    """Run :func:`find_sample_mixing` on ``batch`` through the user's step, if it holds at least two examples.

    Args:
        module: the LightningModule.
        engine: the per-sample clipping engine (``capture`` / ``probe_norms``).
        loss_of_batch: runs the user's ``training_step`` on a batch and returns its loss.
        batch: the logical batch of the step about to run.

    Returns:
        Whether the check ran (a batch of one example cannot mix examples: the check then waits).

    Raises:
        SampleMixingError: see :func:`find_sample_mixing`.
    """
    size = batch_size_of(batch)
    if size < 2:
        return False

    def norms_of(probe: Any, m: int) -> Tensor:
        with _logging_suppressed(module), engine.capture(m):
            loss_of_batch(probe).backward()
        return engine.probe_norms()

    find_sample_mixing(module, norms_of, batch, size)
    return True


__all__ = ["PROBE_EXAMPLES", "SampleMixingError", "alter_first_example", "find_sample_mixing", "probe_training_step"]
