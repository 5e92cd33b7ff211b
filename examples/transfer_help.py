"""The help of ``examples/vit_transfer.py``: what DP does and the recipe, and a short ``fit --help`` in plain text.

jsonargparse builds each option's help from the docstrings of the Trainer, the module and the data module
(reStructuredText, with Sphinx roles) and lists every Trainer option. :class:`DPHelpFormatter` keeps the first
sentence of each option's help without markup and lists only the main Trainer options (the others are still
accepted); :func:`parser_kwargs` gives LightningCLI the descriptions and the formatter for every subcommand.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from jsonargparse import DefaultHelpFormatter

DESCRIPTION = """\
Differentially private (DP) transfer learning of a timm image classifier, with lightning_dp's DPStrategy.

Each training step samples its batch by Poisson sampling (each example with probability q = B/N), clips every
example's gradient to norm max_grad_norm (C), adds Gaussian noise of std sigma*C to their sum, and steps the optimizer
(AdamW becomes DP-Adam). The run spends at most target_epsilon at target_delta: sigma is calibrated for the planned
steps (set trainer.max_epochs or trainer.max_steps), and the run ends with a privacy summary.

The recipe: start from weights trained without privacy on public data (timm's pretrained weights, or stage 1 below on
your public classes), then fine-tune them privately on the private data, then test:
  1. fit --config examples/configs/cifar10_public.yaml                    # public pretraining, not private
  2. fit --config examples/configs/cifar10_private.yaml --model.checkpoint=runs/cifar10_public/public.ckpt
  3. test --config examples/configs/cifar10_private.yaml --model.checkpoint=... --ckpt_path=...
Try it offline first: fit --config examples/configs/tiny.yaml"""

EPILOG = """\
Options: python examples/vit_transfer.py fit --help (the main ones; every Trainer option is accepted, and
fit --config FILE --print_config prints them all); the DP options: fit --trainer.strategy.help lightning_dp.DPStrategy.
Docs: docs/examples.md and docs/finetuning.md; your own ImageFolder: docs/examples.md#your-own-imagefolder."""

FIT_DESCRIPTION = """\
Train: with trainer.strategy = lightning_dp.DPStrategy (see the configs), privately. The dataloader's batch size
(data.batch_size) is the expected logical batch B; DPStrategy(max_physical_batch_size=...) is what fits in memory."""

FIT_EPILOG = """\
Only the main Trainer options are listed above; every other one is accepted too (--print_config lists them all).
The DP options (target_epsilon, target_delta, noise_multiplier, max_grad_norm, max_physical_batch_size, engine,
clipping, ...): python examples/vit_transfer.py fit --trainer.strategy.help lightning_dp.DPStrategy"""

#: Trainer options listed by ``fit --help`` (the others are accepted, only not listed).
LISTED_TRAINER_OPTIONS = frozenset(
    {
        "accelerator",
        "strategy",
        "devices",
        "num_nodes",
        "precision",
        "logger",
        "callbacks",
        "max_epochs",
        "max_steps",
        "val_check_interval",
        "check_val_every_n_epoch",
        "log_every_n_steps",
        "enable_checkpointing",
        "enable_progress_bar",
        "default_root_dir",
    }
)

_SPHINX_ROLE = re.compile(
    r":(?:py:)?(?:class|meth|func|attr|mod|obj|data|exc|paramref|ref):`~?([^`<]*?)(?:\s*<[^>]*>)?`"
)
_BACKTICKS = re.compile(r"``([^`]*)``|`([^`]*)`")
_KNOWN_SUBCLASSES = re.compile(r", known subclasses:[^)]*")
_FIRST_SENTENCE = re.compile(r"^(.*?(?<!\be\.g)(?<!\bi\.e)\.)(?:\s|$)", re.DOTALL)


def plain_text(text: str) -> str:
    """Docstring text without reStructuredText markup: Sphinx roles and backticks removed, on one line.

    Example:
        >>> plain_text("Uses :class:`~lightning.pytorch.loggers.CSVLogger` (``save_dir``)")
        'Uses CSVLogger (save_dir)'
    """
    text = _SPHINX_ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if m.group(0).count("~") else m.group(1), text)
    text = _BACKTICKS.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
    return " ".join(text.split())


def plain_help(text: str) -> str:
    """An option's help: the first sentence of its docstring description, as plain text.

    Example:
        >>> plain_help("Uses :class:`~lightning.pytorch.loggers.CSVLogger`. Default: ``True``.")
        'Uses CSVLogger.'
    """
    text = plain_text(text)
    first = _FIRST_SENTENCE.match(text)
    return first.group(1) if first else text


class DPHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, shorter: descriptions as written, each option's help in one plain sentence, and only the
    main Trainer options listed (:data:`LISTED_TRAINER_OPTIONS`)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))

    def _get_help_string(self, action: Any) -> str:
        if action.help and not getattr(action, "_jsonargparse_preexpanded_help", False):
            action = copy.copy(action)
            action.help = plain_help(action.help)
        return _KNOWN_SUBCLASSES.sub("", super()._get_help_string(action))

    def start_section(self, heading: str | None) -> None:
        super().start_section(plain_text(heading) if heading else heading)

    def _format_action(self, action: Any) -> str:
        dest = getattr(action, "dest", "") or ""
        if dest.startswith("trainer.") and dest.split(".")[1] not in LISTED_TRAINER_OPTIONS:
            return ""
        return super()._format_action(action)

    def _format_usage(self, usage: Any, actions: Any, groups: Any, prefix: Any) -> str:
        if usage is None and len(actions) > 12:  # a subcommand: its options are listed below
            usage = f"{self._prog} [-c CONFIG] [--trainer.* ...] [--model.* ...] [--data.* ...] [...]"
        return super()._format_usage(usage, actions, groups, prefix)


def parser_kwargs() -> dict[str, Any]:
    """The CLI's descriptions and help formatter, for the main parser and each subcommand."""
    kwargs: dict[str, Any] = {"description": DESCRIPTION, "epilog": EPILOG, "formatter_class": DPHelpFormatter}
    for name in ("fit", "validate", "test", "predict"):
        kwargs[name] = {"formatter_class": DPHelpFormatter, "epilog": FIT_EPILOG}
    kwargs["fit"]["description"] = FIT_DESCRIPTION
    return kwargs
