"""The sample-mixing probe: a check that no example's gradient depends on another example.

Per-sample clipping bounds one example's influence only if example i's clipped gradient depends on example i alone.
Hooks cannot see a pipeline that mixes examples: a forward with batch statistics (``x - x.mean(0)``), a loss
normalised over the batch by label-dependent weights (``cross_entropy(..., weight=w)`` with the default mean), a
``collate_fn`` that mixes (MixUp/CutMix) or pads to the longest item, a loss over pairs of examples.

The probe works on the **raw dataset items, before collation**: it draws ``m`` items at random from the whole
training set (not from the step's batch: Poisson batches come in index order, and a class-ordered dataset such as
``ImageFolder`` would hand it examples of one class), collates them with the training loader's own ``collate_fn``,
and collates them again with one item, chosen at random, replaced by an item from outside the probed set (one whose
label differs where the items carry one). Both batches go through the user's ``training_step`` and backward under
identical randomness (the same dropout masks, the same MixUp draw); if the per-sample gradient norm of any *other*
example moves, examples are mixed and the run stops with an error that names the first module whose outputs for
the other examples changed (or the loss, or the collate function). Buffers declared public must come out of both
passes equal (they may not depend on the examples).

It runs at the first step of every fit, after every change of the trainable set, and again at random later steps (a
pipeline may switch MixUp on after a warm-up), at a rate set after the first step so that probing costs at most
``budget`` (2 % by default) of the run's time. It restores every RNG state and buffer it touches, releases nothing,
and its outcome (error or not) is a property of the pipeline, not of one example.

What it cannot see (also in the docs' guarantee page): mixing that needs more than ``m`` items to show, or that only
the step's actual batch composition triggers (e.g. a forward that mixes only batches larger than ``m``); a
``training_step`` that behaves differently on the probe's call than on the real one; changes made outside
``training_step`` (in hooks after the update).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from torch import Tensor, nn

from lightning_dp.errors import DPMisconfigurationError
from lightning_dp.microbatches import batch_size_of, slice_batch
from lightning_dp.randomness import RandomSource

#: how many raw items the probe collates
PROBE_EXAMPLES = 8
#: the share of the run's time the probe may take by default
DEFAULT_PROBE_BUDGET = 0.02
#: how many items outside the probed set are tried to find a replacement with another label
_REPLACEMENT_TRIES = 8


class SampleMixingError(DPMisconfigurationError):
    """The forward pass, the loss or the collate function makes one example's gradient depend on other examples."""


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


# ---------------------------------------------------------------------------------------------- comparing two passes
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


@contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Run the block and put every buffer back as it was (the probe must leave no trace in the model)."""
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in saved and buf.shape == saved[name].shape:
                    buf.copy_(saved[name])


def _differ(a: Tensor, b: Tensor, rtol: float) -> bool:
    if a.shape != b.shape:
        return True
    if not a.numel():
        return False
    scale = float(torch.maximum(a.abs().max(), b.abs().max()))
    return bool((a - b).abs().max() > rtol * scale + 1e-6)


def _others(values: Tensor, changed: int) -> Tensor:
    keep = torch.ones(values.shape[0], dtype=torch.bool)
    keep[changed] = False
    return values[keep.to(values.device)]


def _run_passes(
    model: nn.Module,
    per_sample_norms: Callable[[Any, int], Tensor],
    make_batches: Sequence[Callable[[], Any]],
    size: int,
    public_buffers: Sequence[str],
    record: bool,
) -> tuple[list[Tensor], list[dict[str, Tensor]], list[int], list[list[tuple[str, Tensor]]]]:
    """Each batch made and run under the same RNG state, buffers restored after each; RNG restored at the end."""
    states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    outputs: list[list[tuple[str, Tensor]]] = [[] for _ in make_batches]
    norms: list[Tensor] = []
    buffers: list[dict[str, Tensor]] = []
    sizes: list[int] = []
    try:
        for i, make in enumerate(make_batches):
            _set_rng_states(states)  # the same dropout masks, augmentations, MixUp draws ... in both passes
            with _buffers_restored(model):
                batch = make()
                sizes.append(batch_size_of(batch))
                if sizes[-1] != size:
                    break
                if record:
                    with _recording_outputs(model, size, outputs[i]):
                        norms.append(per_sample_norms(batch, size).detach().float().cpu())
                else:
                    norms.append(per_sample_norms(batch, size).detach().float().cpu())
                named = dict(model.named_buffers())
                buffers.append({n: named[n].detach().float().clone() for n in public_buffers if n in named})
    finally:
        _set_rng_states(states)
    return norms, buffers, sizes, outputs


def compare_passes(
    model: nn.Module,
    per_sample_norms: Callable[[Any, int], Tensor],
    make_batches: Sequence[Callable[[], Any]],
    size: int,
    changed: int,
    public_buffers: Sequence[str] = (),
    rtol: float = 1e-3,
) -> None:
    """Run the user's step on two batches that differ in example ``changed`` only; the others must not move.

    Each batch is made (collated) and run under the same RNG state, with every buffer restored afterwards.

    Args:
        model: the LightningModule (its modules are watched to locate the mixing).
        per_sample_norms: runs the user's step on a batch of the given size (forward, loss, backward) and returns
            its per-sample gradient norms, accumulating nothing.
        make_batches: callables returning the batches (called after the RNG state is set): the first two differ in
            example ``changed`` only; any further one (other items) is compared for the public buffers only.
        size: their number of examples.
        changed: the index of the example that differs.
        public_buffers: buffers that may change in ``training_step`` but must not depend on the examples.
        rtol: relative tolerance for "unchanged".

    Raises:
        SampleMixingError: naming where the examples mix.
    """
    norms, buffers, sizes, _ = _run_passes(model, per_sample_norms, make_batches, size, public_buffers, record=False)
    if any(s != size for s in sizes):
        raise SampleMixingError(
            f"The training dataloader's collate_fn turned {size} dataset items into a batch of {sizes[-1]} examples."
            " DP-SGD needs one example per dataset item (each item's gradient is clipped on its own). Make the"
            " collate function stack the items it is given, no more and no fewer."
        )
    for name in public_buffers:
        if name in buffers[0] and any(_differ(buffers[0][name], other[name], rtol) for other in buffers[1:]):
            raise SampleMixingError(
                f"Buffer '{name}' is declared public (DPStrategy(public_buffers=...)) but its update in training_step"
                " depends on the examples: changing one example changed it. A public buffer may depend on the"
                " parameters and the step count only. Declare it in nonprivate_buffers (it is then reported as"
                " outside the guarantee) or stop updating it from the batch."
            )
    if not _differ(_others(norms[0], changed), _others(norms[1], changed), rtol):
        return
    where = (
        "in the loss computed by training_step, or in the collate_fn (no module's output for the other examples"
        " changed before the loss)"
    )
    # Locate the mixing: run both passes again, now recording every module's output (only on this error path).
    outputs = _run_passes(model, per_sample_norms, list(make_batches)[:2], size, (), record=True)[3]
    for (name, a), (_, b) in zip(*outputs):
        if _differ(_others(a, changed), _others(b, changed), rtol):
            where = f"first visible at the output of module '{name or '<root>'}'"
            break
    raise SampleMixingError(
        "Examples are mixed: replacing one example changed the per-sample gradients of the others"
        f" ({where}). Per-sample clipping then no longer bounds one example's influence, and the DP guarantee does"
        " not hold. Common causes: a loss normalised over the batch with label-dependent weights"
        " (cross_entropy(weight=...) with reduction='mean': use reduction='none', multiply by the weights and take"
        " .mean()), MixUp/CutMix (in the model or in collate_fn), padding every item to the batch's longest,"
        " normalising with batch statistics (x - x.mean(0), BatchNorm in train mode), attention or pooling across"
        " the batch dimension, a loss over pairs of examples. Make each example's loss depend on that example only."
        " If you are certain the mixing is harmless, pass DPStrategy(check_sample_mixing=False)."
    )


def find_sample_mixing(
    model: nn.Module,
    per_sample_norms: Callable[[Any, int], Tensor],
    batch: Any,
    size: int,
    rtol: float = 1e-3,
) -> None:
    """Raise :class:`SampleMixingError` if changing example 0 of an already collated ``batch`` changes any other
    example's per-sample gradient (the collated-batch check; :func:`probe_items` also covers ``collate_fn``).

    Args:
        model: the LightningModule.
        per_sample_norms: see :func:`compare_passes`.
        batch: the batch to take the probe examples from.
        size: its number of examples (≥ 2).
        rtol: relative tolerance for "unchanged".

    Raises:
        SampleMixingError: see :func:`compare_passes`.
    """
    m = min(size, PROBE_EXAMPLES)
    probe = slice_batch(batch, slice(0, m), size)
    altered = alter_first_example(probe, m)
    compare_passes(model, per_sample_norms, (lambda: probe, lambda: altered), m, 0, rtol=rtol)


# ---------------------------------------------------------------------------------------------- raw items
def _discrete_leaves(item: Any) -> list[Any]:
    """The labels, tokens, ids ... of a raw item: its ints, strings and non-floating tensors."""
    if isinstance(item, Tensor):
        return [] if item.is_floating_point() or item.is_complex() else [item]
    if isinstance(item, (bool, int, str)):
        return [item]
    if isinstance(item, dict):
        return [x for v in item.values() for x in _discrete_leaves(v)]
    if isinstance(item, (list, tuple)):
        return [x for v in item for x in _discrete_leaves(v)]
    return []


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return type(a) is type(b) and a == b


def _differs_in_labels(a: Any, b: Any) -> bool:
    la, lb = _discrete_leaves(a), _discrete_leaves(b)
    return len(la) != len(lb) or not all(_same(x, y) for x, y in zip(la, lb))


@dataclass
class ProbeItems:
    """The raw dataset items and the training loader's ``collate_fn``: what the probe re-collates.

    Args:
        dataset: the training set (map-style: ``len`` and ``[i]``).
        collate_fn: the training loader's own collate function.
        num_examples: how many items each probe collates.

    Example:
        >>> from torch.utils.data import TensorDataset, default_collate
        >>> items = ProbeItems(TensorDataset(torch.randn(20, 3), torch.arange(20) % 2), default_collate)
        >>> from lightning_dp.randomness import TorchSource
        >>> probed, changed, replacement = items.draw(TorchSource(0))
        >>> len(probed), 0 <= changed < len(probed)
        (8, True)
    """

    dataset: Any
    collate_fn: Callable[[list[Any]], Any]
    num_examples: int = PROBE_EXAMPLES

    def size(self) -> int:
        """How many items a probe collates (0 when the dataset is too small to probe)."""
        m = min(self.num_examples, len(self.dataset) - 1)
        return m if m >= 2 else 0

    def draw(self, source: RandomSource) -> tuple[list[Any], int, Any]:
        """Random items from the whole dataset, the index of the one to replace, and its replacement from outside
        the probed set (one with other labels where the items carry any).
        """
        m = self.size()
        order = source.permutation(len(self.dataset))[: m + max(_REPLACEMENT_TRIES, m)].tolist()
        self._outside = order[m:]
        items = [self.dataset[i] for i in order[:m]]
        changed = min(m - 1, int(float(source.uniform(1)[0]) * m))
        replacement = None
        for i in order[m : m + _REPLACEMENT_TRIES]:
            candidate = self.dataset[i]
            replacement = replacement if replacement is not None else candidate
            if _differs_in_labels(candidate, items[changed]):
                replacement = candidate
                break
        return items, changed, replacement

    def others(self) -> list[Any]:
        """Items from outside the last draw's probed set (as many as it probed, where the dataset has them)."""
        outside = getattr(self, "_outside", [])
        return [self.dataset[i] for i in outside[: self.size()]]


def probe_items(
    module: nn.Module,
    engine: Any,
    loss_of_batch: Callable[[Any], Tensor],
    items: ProbeItems,
    source: RandomSource,
    public_buffers: Sequence[str] = (),
) -> bool:
    """Probe the pipeline on raw items: collate, run the user's step, replace one item, collate and run again.

    Args:
        module: the LightningModule.
        engine: the per-sample clipping engine (``capture`` / ``probe_norms``).
        loss_of_batch: runs the user's ``training_step`` on a batch and returns its loss.
        items: the raw items and collate function of the training loader.
        source: the probe's random source for this step.
        public_buffers: buffers that must not depend on the examples.

    Returns:
        Whether the check ran (a dataset of fewer than three items cannot be probed).

    Raises:
        SampleMixingError: see :func:`compare_passes`.
    """
    m = items.size()
    if m == 0:
        return False
    states = _collect_rng_states(include_cuda=torch.cuda.is_available())
    try:  # loading items may draw augmentations from the global RNG: the step that follows must not see it
        probed, changed, replacement = items.draw(source)
        # Public buffers must not depend on the examples at all: also compare a pass on other items (a statistic such
        # as a running maximum need not move when one item is replaced).
        others = items.others() if public_buffers else []
    finally:
        _set_rng_states(states)
    replaced = [*probed[:changed], replacement, *probed[changed + 1 :]]

    def norms_of(batch: Any, size: int) -> Tensor:
        with _logging_suppressed(module), engine.capture(size):
            loss_of_batch(batch).backward()
        return engine.probe_norms()

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    makers = [
        lambda: move_data_to_device(items.collate_fn(list(probed)), device),
        lambda: move_data_to_device(items.collate_fn(list(replaced)), device),
    ]
    if len(others) == m:
        makers.append(lambda: move_data_to_device(items.collate_fn(list(others)), device))
    compare_passes(module, norms_of, makers, m, changed, public_buffers)
    return True


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


# ---------------------------------------------------------------------------------------------- when to probe
@dataclass
class ProbeSchedule:
    """When the probe runs: at the first step of a fit, after every change of the trainable set, and at random
    later steps, so that probing takes at most ``budget`` of the run's time.

    Later probes are drawn at random (from the run's secret randomness) at a rate of ``budget`` × step time / probe
    time, re-estimated after each probe; a probe is skipped while the time spent probing so far (the mandatory first
    probe included) exceeds ``budget`` of the time spent in steps, so the share holds over the run.

    Args:
        budget: the share of the run's time the probe may take (0: only the first step and trainable-set changes;
            1: every step).

    Example:
        >>> schedule = ProbeSchedule(budget=0.02)
        >>> schedule.due(0.5)  # the first step is always probed
        True
        >>> schedule.ran(0.1)
        >>> schedule.stepped(1.0)
        >>> round(schedule.rate, 6)
        0.2
        >>> schedule.due(0.1)  # 0.1 s of probing is more than 2 % of 1 s of steps: wait
        False
    """

    budget: float = DEFAULT_PROBE_BUDGET
    rate: float | None = None
    pending: bool = True
    probes: int = 0
    probe_seconds: float = 0.0
    step_seconds: float = 0.0
    steps: int = 0
    _last_probe: float = field(default=0.0, repr=False)

    def request(self) -> None:
        """Probe at the next step (a new fit, a changed trainable set)."""
        self.pending = True

    def due(self, uniform: float) -> bool:
        """Whether to probe this step, given a uniform draw in [0, 1) from the probe's random source."""
        if self.pending or self.budget >= 1:
            return True
        if self.rate is None or self.probe_seconds > self.budget * self.step_seconds:
            return False
        return uniform < self.rate

    def ran(self, seconds: float) -> None:
        """Record a probe that ran (its duration)."""
        self.pending = False
        self.probes += 1
        self.probe_seconds += seconds
        self._last_probe = seconds

    def stepped(self, seconds: float) -> None:
        """Record a step's duration (probe excluded) and re-estimate the rate of later probes."""
        self.step_seconds += seconds
        self.steps += 1
        if self._last_probe > 0 and math.isfinite(self._last_probe):
            mean_step = self.step_seconds / self.steps
            self.rate = max(0.0, min(1.0, self.budget * mean_step / self._last_probe))
        else:
            self.rate = 1.0 if self.budget > 0 else 0.0


__all__ = [
    "DEFAULT_PROBE_BUDGET",
    "PROBE_EXAMPLES",
    "ProbeItems",
    "ProbeSchedule",
    "SampleMixingError",
    "alter_first_example",
    "compare_passes",
    "find_sample_mixing",
    "probe_items",
]
