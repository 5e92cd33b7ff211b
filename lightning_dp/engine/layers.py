"""Which layers a per-sample gradient engine must cover: the planning shared by every engine.

An engine covers each trainable parameter either through the layer that owns it (a layer with a per-sample
method) or as a *broadcast parameter*: a raw ``nn.Parameter`` of shape ``(1, ...)`` that the model broadcasts along
the batch (timm ViT's ``cls_token``, ``pos_embed``), whose per-sample gradient is obtained by substituting a
per-sample copy during the forward pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dp.clipping import CLIP_EPS
from lightning_dp.engine.crosscheck import check_sums_against_autograd, check_tolerance
from lightning_dp.engine.layer_rules import broadcast_parameter_names
from lightning_dp.errors import DPMisconfigurationError, UnsupportedLayerError

#: ``(module name, module, parameter name, parameter)`` of a raw parameter broadcast along the batch.
BroadcastParameter = tuple[str, nn.Module, str, nn.Parameter]


@contextmanager
def full_precision_matmuls() -> Iterator[None]:
    """fp32 matmuls without TF32 while norms and clipped sums are formed: TF32 rounds fp32 inputs to 10-bit
    mantissas, which would make per-sample norms (and so the sensitivity bound) approximate.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (a forward then is activation recomputation)."""
    return torch._C._current_graph_task_id() != -1


def check_layer_output(name: str, mod: nn.Module, output: Any) -> None:
    """In a hooked layer's forward, while capturing: the call can be recorded.

    Args:
        name: the layer's name in the model (diagnostics).
        mod: the layer.
        output: what its forward returned.

    Raises:
        DPMisconfigurationError: if the forward runs during backward (activation recomputation).
        UnsupportedLayerError: if the layer's output is not a single tensor.
    """
    if in_backward():
        raise DPMisconfigurationError(
            f"Layer {type(mod).__name__} ran its forward during backward: gradient checkpointing (activation"
            " recomputation) is not compatible with per-sample gradient hooks. Disable it, e.g."
            " `model.set_grad_checkpointing(False)` for timm models."
        )
    if not isinstance(output, Tensor):
        raise UnsupportedLayerError(
            f"Layer '{name}' ({type(mod).__name__}) returned {type(output).__name__}, not a"
            " tensor; its per-sample rule needs a single tensor output."
        )


def check_batch_dimension(name: str, mod: nn.Module, grad: Tensor, batch_size: int) -> None:
    """In a hooked layer's backward: the output gradient's first dimension must index the micro-batch's examples.

    Raises:
        DPMisconfigurationError: otherwise.
    """
    if grad.shape[0] != batch_size:
        raise DPMisconfigurationError(
            f"Layer '{name}' ({type(mod).__name__}) saw a batch dimension of"
            f" {grad.shape[0]} but the micro-batch has {batch_size} examples. Per-sample gradients need every layer's"
            " first dimension to index the examples (do not fold sequence or crop dimensions into the batch)."
        )


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The distinct trainable parameters of ``module``, in registration order.

    Raises:
        DPMisconfigurationError: if there is none.
    """
    params = list(dict.fromkeys(p for p in module.parameters() if p.requires_grad))
    if not params:
        raise DPMisconfigurationError(
            f"{type(module).__name__} has no trainable parameters (all have requires_grad=False). Unfreeze the"
            " parameters to fine-tune, e.g. the classifier head, before fitting with DPStrategy."
        )
    return params


def plan_layers(
    module: nn.Module, supported: Callable[[nn.Module], bool]
) -> tuple[list[tuple[str, nn.Module]], list[BroadcastParameter]]:
    """Split ``module``'s trainable parameters into per-layer work and broadcast parameters.

    Args:
        module: the model.
        supported: whether an engine has a per-sample method for a layer (given the layer).

    Returns:
        ``(layers, broadcast)``: the ``(name, layer)`` pairs owning trainable parameters that ``supported``
        accepts, and the broadcast parameters of the other layers.

    Parameters of the other layers (neither supported nor declared as broadcast) are left to the engine's
    :class:`~lightning_dp.engine.fallback.FunctionalFallback`.

    Raises:
        UnsupportedLayerError: for a broadcast parameter without a leading dimension of size 1.
    """
    layers: list[tuple[str, nn.Module]] = []
    broadcast: list[BroadcastParameter] = []
    for mod_name, mod in module.named_modules():
        direct = {n: p for n, p in mod._parameters.items() if p is not None and p.requires_grad}
        if not direct:
            continue
        if supported(mod):
            layers.append((mod_name, mod))
            continue
        allowed = broadcast_parameter_names(mod)
        if any(n not in allowed for n in direct):
            continue  # no rule: the torch.func fallback covers this module's parameters
        for n, p in direct.items():
            if p.dim() == 0 or p.shape[0] != 1:
                raise UnsupportedLayerError(
                    f"Parameter '{mod_name}.{n}' is registered as broadcast over the batch but has shape"
                    f" {tuple(p.shape)}; a broadcast parameter needs a leading dimension of size 1."
                )
            broadcast.append((mod_name, mod, n, p))
    return layers, broadcast


def bound_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """A layer call's inputs in the order of its ``forward``'s parameters (keyword arguments included, defaults
    filled in), so that a rule sees ``EmbeddingBag(x, offsets=o)`` as ``(x, o, None)``.
    """
    if not kwargs:
        return args
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


@contextmanager
def per_sample_broadcast(
    broadcast: list[BroadcastParameter],
    batch_size: int,
    grads: dict[nn.Parameter, Tensor],
    in_forward: bool = False,
) -> Iterator[None]:
    """Substitute a per-sample copy ``(batch_size, ...)`` for each broadcast parameter while inside.

    On exit the original parameters are put back (state-dict keys never change) and, for each copy that received a
    gradient, ``grads[p]`` is set to its per-sample gradient, shape ``(batch_size, *p.shape)``, in fp32.

    Args:
        broadcast: the broadcast parameters (from :func:`plan_layers`).
        batch_size: the number of examples of the micro-batch.
        grads: filled with the per-sample gradients on exit.
        in_forward: substitute in a forward pre-hook of the owning module, from the value the module holds then,
            instead of once on entry: under FSDP2 (a rekeying :mod:`~lightning_dp.engine.layout`) the module's
            pre-forward puts the all-gathered parameter in place of whatever was there.
    """
    if in_forward:
        with _per_sample_broadcast_in_forward(broadcast, batch_size, grads):
            yield
        return
    expanded: list[tuple[nn.Module, str, nn.Parameter, Tensor]] = []
    for _, mod, name, p in broadcast:
        e = p.detach().expand(batch_size, *p.shape[1:]).clone().requires_grad_(True)
        mod._parameters[name] = e  # type: ignore[assignment]  # restored below; state-dict keys unchanged
        expanded.append((mod, name, p, e))
    try:
        yield
    finally:
        for mod, name, p, e in expanded:
            mod._parameters[name] = p
            if e.grad is not None:
                grads[p] = e.grad.float().reshape(batch_size, *p.shape)


@contextmanager
def _per_sample_broadcast_in_forward(
    broadcast: list[BroadcastParameter], batch_size: int, grads: dict[nn.Parameter, Tensor]
) -> Iterator[None]:
    """:func:`per_sample_broadcast` from forward pre-hooks (registered after FSDP2's own, which it therefore follows):
    one per-sample copy per parameter and micro-batch, made from the module's value at its first call.
    """
    copies: dict[int, tuple[Tensor, Tensor]] = {}  # per parameter: its copy, and the object it replaced
    handles = []
    for k, (_, mod, name, p) in enumerate(broadcast):

        def substitute(module: nn.Module, args: Any, k: int = k, name: str = name, p: nn.Parameter = p) -> None:
            live = module._parameters[name]
            assert live is not None
            if k not in copies:
                e = live.detach().expand(batch_size, *p.shape[1:]).clone().requires_grad_(True)
                copies[k] = (e, live)
            module._parameters[name] = copies[k][0]  # type: ignore[assignment]  # FSDP2's post-forward puts its own back

        handles.append(mod.register_forward_pre_hook(substitute))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for k, (_, mod, name, p) in enumerate(broadcast):
            if k not in copies:
                continue
            e, replaced = copies[k]
            if mod._parameters[name] is e:
                mod._parameters[name] = replaced  # type: ignore[assignment]
            if e.grad is not None:
                grads[p] = e.grad.float().reshape(batch_size, *p.shape)


__all__ = [
    "CLIP_EPS",
    "BroadcastParameter",
    "bound_inputs",
    "check_batch_dimension",
    "check_layer_output",
    "check_sums_against_autograd",
    "check_tolerance",
    "in_backward",
    "per_sample_broadcast",
    "plan_layers",
    "trainable_parameters",
]
