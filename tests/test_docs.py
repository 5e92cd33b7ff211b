"""The documentation works as written: runnable snippets run, every snippet's imports exist, the quickstart's
command lines run quietly and end with the privacy summary, and the docs site builds with warnings as errors.
"""

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Lightning's lines that quiet runs must not show.
CHATTER = ("GPU available", "TPU available", "💡 Tip", "`Trainer.fit` stopped", "LeafSpec")


def _blocks(page: Path, marked_only: bool) -> list[tuple[str, str]]:
    """``(id, code)`` of the page's Python blocks (only those preceded by ``<!-- test: run -->`` if marked_only)."""
    text = page.read_text(encoding="utf-8")
    pattern = r"(<!-- test: run -->\s*\n)?([ \t]*)```python\n(.*?)\n\2```"
    out = []
    for match in re.finditer(pattern, text, re.S):
        if marked_only and not match.group(1):
            continue
        code = textwrap.dedent(match.group(3))
        line = text[: match.start()].count("\n") + 1
        out.append((f"{page.relative_to(ROOT)}:{line}", code))
    return out


RUNNABLE = [b for page in PAGES for b in _blocks(page, marked_only=True)]
ALL_BLOCKS = [b for page in PAGES for b in _blocks(page, marked_only=False)]


def _run(args, cwd, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def test_the_pages_have_runnable_snippets():
    pages = {block_id.split(":")[0] for block_id, _ in RUNNABLE}
    assert {"README.md", "docs/getting-started.md", "docs/evaluation-export.md"} <= pages


@pytest.mark.parametrize("block_id, code", RUNNABLE, ids=[b[0] for b in RUNNABLE])
def test_runnable_snippet_runs(block_id, code, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    _run([str(script)], tmp_path, timeout=300)


def test_every_snippet_compiles_and_its_imports_exist():
    assert len(ALL_BLOCKS) > len(RUNNABLE)
    for block_id, code in ALL_BLOCKS:
        tree = ast.parse(code, filename=block_id)
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        exec(compile(ast.Module(body=imports, type_ignores=[]), block_id, "exec"), {})


# ---------------------------------------------------------------------- the quickstart's documented command lines
def _quickstart(args, tmp_path):
    out, err = _run([str(ROOT / "examples/quickstart.py"), *args], tmp_path)
    for chatter in CHATTER:
        assert chatter not in out + err, chatter
    return out, err


def _summary_epsilon(err):
    match = re.search(r"lightning_dp: privacy summary\n  ε\s+([0-9.]+)  at δ = 1e-05  \(target ([0-9.]+)\)", err)
    assert match, err
    return float(match.group(1)), float(match.group(2))


def test_quickstart_smoke_run_is_quiet_and_ends_with_the_summary(tmp_path):
    out, err = _quickstart(["--epochs", "3", "--pretrain-epochs", "2"], tmp_path)  # as documented
    assert "public test accuracy" in out and out.count("private test accuracy") == 2
    assert "1 CPU thread(s)" in out
    epsilon, target = _summary_epsilon(err)
    assert target == 4 and 3.5 < epsilon <= 4.0
    assert re.search(r"steps\s+18 of 18 planned", err)  # ⌈717/128⌉ = 6 steps per epoch
    assert re.search(r"throughput\s+[0-9.]+ samples/s", err)
    assert "dp/epsilon=" in out + err  # the progress bar shows ε


def test_quickstart_with_a_tighter_budget(tmp_path):
    _, err = _quickstart(["--epsilon", "1", "--epochs", "1", "--pretrain-epochs", "1", "--threads", "1"], tmp_path)
    epsilon, target = _summary_epsilon(err)
    assert target == 1 and epsilon <= 1.0


# ---------------------------------------------------------------------- the docs site
def test_docs_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    strategy_page = (tmp_path / "site/api/strategy/index.html").read_text(encoding="utf-8")
    assert "target_epsilon" in strategy_page and "noise_phases" in strategy_page
