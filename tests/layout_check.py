"""Shared by the layout tests: module names, the size bar, and the lightning_dp modules a file imports."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_dp

ROOT = Path(lightning_dp.__file__).parent
#: every module of the package, by dotted name
MODULES = {
    ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in ROOT.rglob("*.py")
}


def size_problems(path: Path, max_module: int = 600, max_class: int = 450) -> list[str]:
    """The module's line count and each class's, where over the bar."""
    source = path.read_text()
    out = [f"{path.name} has {len(source.splitlines())} lines"] if len(source.splitlines()) > max_module else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > max_class:
            out.append(f"{path.name}: class {node.name} has {node.end_lineno - node.lineno + 1} lines")
    return out


def imported_modules(name: str, modules: set[str] | dict[str, Path] = MODULES) -> set[str]:
    """The modules of ``modules`` that module ``name`` imports anywhere in its source (function-level and
    ``TYPE_CHECKING`` imports included); ``from pkg import submodule`` counts as importing the submodule.
    """
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                out.add(t)
    return out
