"""Choosing which parameters are fine-tuned: presets for timm models and name patterns for any module.

Which layers to fine-tune is itself a hyperparameter under DP (Cattan et al., arXiv:2210.02156). Presets:

- ``all``: every parameter.
- ``head``: the classifier only (linear probing).
- ``norm+head``: scale and bias of every normalisation layer plus the classifier ("FiLM", Rehn et al.,
  arXiv:2510.20616; pair with ``zero_init_head=True`` as they do).
- ``bias``: every bias term plus the classifier (BiTFiT, Bu et al.).
- ``last_blocks:k``: the last ``k`` blocks (ViT ``blocks``, ConvNeXt/Swin ``stages``/``layers``, ResNet ``layer1..4``),
  the final norm and the classifier.
- ``attention``: the attention layers (``.attn.``) plus the classifier.

Anything else is a regular expression searched in parameter names; several may be combined with ``|`` at the top
level of a list. Every pattern must match at least one parameter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from lightning_dp.errors import DPMisconfigurationError

PRESETS = ("all", "head", "norm+head", "bias", "last_blocks:k", "attention")


@dataclass
class Selection:
    """The result of :func:`select_parameters`.

    Attributes:
        trainable: names of the parameters left trainable.
        num_trainable: number of trainable scalars.
        num_total: number of scalars in the model.
    """

    trainable: list[str] = field(default_factory=list)
    num_trainable: int = 0
    num_total: int = 0

    @property
    def fraction(self) -> float:
        """Share of trainable scalars."""
        return self.num_trainable / max(self.num_total, 1)

    def __str__(self) -> str:
        return (
            f"{self.num_trainable:,} of {self.num_total:,} parameters trainable ({100 * self.fraction:.2f}%)"
            f" in {len(self.trainable)} tensors"
        )


def head_parameter_names(model: nn.Module, head_pattern: str | None = None) -> list[str]:
    """Names of the classifier's parameters: ``head_pattern`` if given, else timm's ``get_classifier()``.

    Raises:
        DPMisconfigurationError: if the classifier cannot be found.
    """
    names = [n for n, _ in model.named_parameters()]
    if head_pattern is not None:
        found = [n for n in names if re.search(head_pattern, n)]
    else:
        get = getattr(model, "get_classifier", None)
        head = get() if callable(get) else None
        ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        found = [n for n, p in model.named_parameters() if id(p) in ids]
    if not found:
        raise DPMisconfigurationError(
            f"Could not find the classifier of {type(model).__name__}: it has no timm `get_classifier()` with"
            " parameters. Pass head_pattern=..., a regular expression matching the head's parameter names"
            f" (e.g. {names[-1]!r})."
        )
    return found


def _block_prefixes(model: nn.Module) -> list[str]:
    for attr in ("blocks", "stages", "layers"):
        container = getattr(model, attr, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container) > 0:
            return [f"{attr}.{i}." for i in range(len(container))]
    resnet = [f"layer{i}." for i in range(1, 10) if isinstance(getattr(model, f"layer{i}", None), nn.Module)]
    if resnet:
        return resnet
    raise DPMisconfigurationError(
        f"{type(model).__name__} has no `blocks`, `stages`, `layers` or `layerN` container for 'last_blocks:k'."
        " Use a name pattern instead."
    )


def _is_norm(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase))
        or "Norm" in type(module).__name__
    )


def _preset_names(model: nn.Module, preset: str, head: list[str]) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if preset == "all":
        return names
    if preset == "head":
        return list(head)
    if preset == "norm+head":
        norm = [
            f"{mn}.{pn}" if mn else pn
            for mn, m in model.named_modules()
            if _is_norm(m)
            for pn, _ in m.named_parameters(recurse=False)
        ]
        return norm + head
    if preset == "bias":
        return [n for n in names if n.endswith("bias")] + head
    if preset == "attention":
        return [n for n in names if ".attn." in n] + head
    if preset.startswith("last_blocks:"):
        try:
            k = int(preset.split(":", 1)[1])
        except ValueError as err:
            raise DPMisconfigurationError(f"'{preset}': k must be an integer, e.g. 'last_blocks:2'.") from err
        prefixes = _block_prefixes(model)
        if not 1 <= k <= len(prefixes):
            raise DPMisconfigurationError(f"'{preset}': the model has {len(prefixes)} blocks.")
        chosen = tuple(prefixes[-k:])
        final_norm = [n for n in names if n.startswith(("norm.", "fc_norm.", "head_drop."))]
        return [n for n in names if n.startswith(chosen)] + final_norm + head
    raise KeyError(preset)


def select_parameters(
    model: nn.Module,
    select: str | Sequence[str],
    *,
    zero_init_head: bool = False,
    head_pattern: str | None = None,
) -> Selection:
    """Make exactly the selected parameters trainable (``requires_grad``) and freeze the rest.

    Args:
        model: the model (e.g. a timm model, or any module with ``head_pattern``).
        select: a preset name (see module docs), a regular expression, or a list of them (union).
        zero_init_head: zero the classifier's weights and bias (FiLM-style fine-tuning starts from a zero head).
        head_pattern: regular expression for the classifier's parameter names, for models without timm's
            ``get_classifier()``.

    Returns:
        What was selected, with parameter counts.

    Raises:
        DPMisconfigurationError: if a pattern matches no parameter, or the head cannot be found for a preset that
            needs it.

    Example:
        >>> model = timm.create_model("vit_base_patch16_224", pretrained=True, num_classes=100)  # doctest: +SKIP
        >>> print(select_parameters(model, "norm+head", zero_init_head=True))  # doctest: +SKIP
        115,300 of 85,875,556 parameters trainable (0.13%) in 52 tensors
    """
    items = [select] if isinstance(select, str) else list(select)
    if not items:
        raise DPMisconfigurationError("Select at least one preset or pattern.")
    names = [n for n, _ in model.named_parameters()]
    needs_head = zero_init_head or any(
        i in ("head", "norm+head", "bias", "attention") or i.startswith("last_blocks:") for i in items
    )
    head = head_parameter_names(model, head_pattern) if needs_head else []
    chosen: set[str] = set()
    for item in items:
        if item in PRESETS or item.startswith("last_blocks:"):
            chosen.update(_preset_names(model, item, head))
            continue
        try:
            regex = re.compile(item)
        except re.error as err:
            raise DPMisconfigurationError(f"{item!r} is neither a preset {PRESETS} nor a valid regex: {err}.") from err
        matched = [n for n in names if regex.search(n)]
        if not matched:
            raise DPMisconfigurationError(
                f"Pattern {item!r} matches no parameter of {type(model).__name__}; it is neither a preset {PRESETS}."
                f" Parameter names look like {names[:3] + names[-2:]}."
            )
        chosen.update(matched)
    report = Selection()
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
        report.num_total += p.numel()
        if name in chosen:
            report.trainable.append(name)
            report.num_trainable += p.numel()
    if zero_init_head:
        params = dict(model.named_parameters())
        for name in head:
            params[name].data.zero_()
    return report
