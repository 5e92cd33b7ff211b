"""The fallback's diagnostics: the likely cause of a parameter whose per-sample gradients do not add up to
autograd's gradient in the cross-check (:mod:`lightning_dp.engine.crosscheck`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_dp.engine.contributions import Contribution
from lightning_dp.engine.fallback.capture import Capture
from lightning_dp.engine.fallback.per_example import forward_hooks_suppressed


def explain(
    p: nn.Parameter,
    group: Contribution | None,
    cap: Capture | None,
    layer: nn.Module | None,
    name_of: Callable[[nn.Module | None], str],
    produced: set[str],
) -> str:
    """The likely cause of a parameter whose per-sample gradients do not add up to autograd's gradient: a use
    outside the forward that nothing saw, a layout its layer's rule does not handle, or a wrong rule.

    Args:
        p: the parameter.
        group: the engine's group holding it (None: no group has it).
        cap: the checked micro-batch's capture.
        layer: the module owning ``p``.
        name_of: a module's name.
        produced: the names of the fallback's own groups.
    """
    where = f"'{name_of(layer)}' ({type(layer).__name__})"
    uses = sorted(cap.uses.get(p, set())) if cap is not None else []
    elsewhere = [u for u in uses if u != name_of(layer)]
    if group is None:
        return _unseen_use(where, cap, uses, elsewhere)
    if group.name in produced:
        return (
            f"rule: the torch.func fallback's per-sample gradients for '{group.name}' do not add up; the"
            " parameter is also used where the fallback did not see it (outside the traced module's forward)."
        )
    rule_name = _rule_name(layer)
    own = own_gradient(cap, p, layer)
    if own is not None and cap is not None:
        total = group.clipped_sum(torch.ones(cap.b, device=p.device)).get(p)
        if total is not None and bool((total - own).norm() <= 1e-3 * own.norm() + 1e-30):
            return (
                f"use outside the forward: the per-sample rule {rule_name} of layer {where} is right (its"
                " per-sample gradients add up to the layer's own gradient), but the parameter also gets gradient"
                " from a use that neither the layer's hooks nor a traced torch function saw: inside a custom"
                " autograd.Function, a C++ extension, or code outside the captured forward and backward. Use the"
                " parameter through its layer or torch functions, or register a rule for the module that uses it."
            )
    layout = cap.layouts.get(layer) if cap is not None and layer is not None else None
    if layout is not None:
        return (
            f"layout: layer {where} ran on a {layout} tensor, and its per-sample rule {rule_name} gives wrong"
            " per-sample gradients for it (a rule that assumes contiguous NCHW). Register a rule that handles"
            " any memory format, or make the activations contiguous."
        )
    extra = f" It is also used in {', '.join(elsewhere)}." if elsewhere else ""
    return (
        f"rule: the per-sample rule {rule_name} of layer {where} is wrong for this layer's configuration"
        f" (or its forward differs from what the rule assumes).{extra} Register a correct rule with"
        " lightning_dp.engine.register_grad_sampler, or unregister it to use the torch.func fallback."
    )


def _unseen_use(where: str, cap: Capture | None, uses: list[str], elsewhere: list[str]) -> str:
    """The cause for a parameter that no group holds, yet autograd gives a gradient."""
    if cap is not None and cap.discover and not uses:
        return (
            f"use outside the forward: no layer rule and no torch function call saw {where}'s parameter used"
            " during the captured forward, yet autograd gives it a gradient. It is used where hooks and"
            " torch function modes cannot see it (a torch.ops or C++ extension call, a custom"
            " autograd.Function's internals, code outside the captured forward and backward). Use it through"
            " torch functions in the forward, or register a rule for the module that uses it"
            " (lightning_dp.engine.register_grad_sampler)."
        )
    hidden = (
        f" An in-place op ({', '.join(cap.inplace)}) overwrote a tensor after a layer's hook was registered on"
        " it, and autograd then may not call the hook: build the model without in-place ops (e.g. timm's"
        " LayerScale(inplace=False))."
        if cap is not None and cap.inplace
        else ""
    )
    return (
        f"use outside the forward: the parameter of {where} got no per-sample gradient (used in"
        f" {', '.join(elsewhere) or 'an unhooked place'}), yet autograd gives it a gradient.{hidden}"
    )


def _rule_name(layer: nn.Module | None) -> str:
    """The qualified name of the engine rule registered for ``layer`` ("?" if none)."""
    from lightning_dp.engine.layer_rules import find_rule, registered_ghost_layer

    rule = None if layer is None else (registered_ghost_layer(layer) or find_rule(layer))
    rule_name = getattr(rule, "__qualname__", type(rule).__name__) if rule is not None else "?"
    return f"{getattr(rule, '__module__', '')}.{rule_name}".lstrip(".")


def own_gradient(cap: Capture | None, p: nn.Parameter, layer: nn.Module | None) -> Tensor | None:
    """The gradient ``p`` gets through its layer's own calls on the checked micro-batch (recomputed from the
    recorded inputs and output gradients), or None if not recorded.
    """
    if cap is None or layer is None or not cap.native_calls.get(layer):
        return None
    total = torch.zeros_like(p, dtype=torch.float32)
    with torch.enable_grad(), forward_hooks_suppressed(layer):
        for args, kwargs, grads in cap.native_calls[layer]:
            if 0 not in grads:
                continue
            out = layer(*args, **kwargs)
            (g,) = torch.autograd.grad(out, [p], grads[0], allow_unused=True)
            if g is not None:
                total += g.float()
    return total


__all__ = ["explain", "own_gradient"]
