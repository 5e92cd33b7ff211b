"""A griffe extension for the API reference: read lightning_dp's Lightning-style docstrings as Google style.

lightning_dp's docstrings follow Lightning's conventions: an ``Example:`` section (griffe's Google parser knows
``Examples:``) and Sphinx roles such as ``:class:`~lightning_dp.plan.PrivacyPlan``` in the text. This extension
rewrites, before parsing:

- a section title ``Example:`` as ``Examples:``, so that ``>>>`` lines render as code;
- a role naming a ``lightning_dp.`` object as a cross-reference (``~`` shows the last component only), and any
  other role (a relative name, torch, Lightning) as inline code.

A cross-reference to a ``lightning_dp.`` object that the reference does not render fails the strict build, so a
stale name in a docstring is caught.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SECTION = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1) == "~", match.group(2).strip()
    if target.startswith("."):
        target = target[1:]
    shown = target.rsplit(".", 1)[-1] if short else target
    if target.startswith("lightning_dp."):
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"


def rewrite(text: str) -> str:
    """The docstring ``text`` with its ``Example:`` titles and Sphinx roles rewritten (see the module docs)."""
    return _ROLE.sub(_role, _SECTION.sub(r"\1Examples:", text))


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of the loaded package with :func:`rewrite`."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
