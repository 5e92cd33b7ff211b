"""The documentation works as written: runnable snippets run, every snippet's imports exist, the quickstart's
command lines run quietly and end with the privacy summary, and the docs site builds with warnings as errors.
"""

import ast
import html
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


#: Lines of a quoted privacy summary that a rerun reproduces exactly (throughput is measured, accuracy is noisy).
SUMMARY_FIGURES = ("ε ", "noise σ", "sample rate q", "clipping C", "steps", "ε by mechanism")


def _quoted_summary(block_id: str) -> list[str]:
    """The privacy-summary figures the page quotes in the ```text block right after the snippet ``block_id``."""
    page, line = block_id.rsplit(":", 1)
    text = (ROOT / page).read_text(encoding="utf-8")
    after = "\n".join(text.splitlines()[int(line) :])
    block = re.search(r"\n```\n(.*?)```text\n(.*?)\n```", after, re.S)
    if not block or "\n```python" in block.group(1) or "lightning_dp: privacy summary" not in block.group(2):
        return []
    return [ln for ln in block.group(2).splitlines() if ln.strip().startswith(SUMMARY_FIGURES)]


@pytest.mark.parametrize("block_id, code", RUNNABLE, ids=[b[0] for b in RUNNABLE])
def test_runnable_snippet_runs(block_id, code, tmp_path):
    """Each runnable snippet runs; a privacy summary quoted after it is what it prints (the figures that rerun)."""
    script = tmp_path / "snippet.py"
    script.write_text(code, encoding="utf-8")
    out, err = _run([str(script)], tmp_path, timeout=300)
    quoted = _quoted_summary(block_id)
    printed = [ln for ln in (out + err).splitlines() if ln.strip().startswith(SUMMARY_FIGURES)]
    for line in quoted:
        assert line in printed, f"{block_id}: the page quotes {line!r}; the snippet printed {printed}"


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
    text = html.unescape(re.sub(r"<[^>]+>", "", strategy_page))
    assert re.search(r"target_delta: float = 1e-0?5,", text), "the signature shows the default δ the text states"
    for page in (tmp_path / "site/api").glob("*/index.html"):
        shown = html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))
        for internal in ("_PATH", "OneTrainerOnly"):
            assert internal not in shown, f"{internal} in {page.parent.name}"
    assert "css/extra.css" in strategy_page, "long lines wrap (docs/css/extra.css)"
    assert "pre-wrap" in (tmp_path / "site/css/extra.css").read_text(encoding="utf-8")


# ---------------------------------------------------------------------- the README's figures and set-up commands
QUICKSTART_PAGES = ["README.md", "docs/examples.md"]


def _quickstart_output_copy(page: str) -> list[str]:
    """The page's copy of the quickstart's output, written by `quickstart.py --write-readme`."""
    sys.path.insert(0, str(ROOT / "examples"))
    import quickstart

    text = (ROOT / page).read_text(encoding="utf-8")
    start, end = re.escape(quickstart.README_START), re.escape(quickstart.README_END)
    match = re.search(rf"{start}\n```text\n(.*?)\n```\n{end}", text, re.S)
    assert match, f"{page}: the quickstart output block and its markers"
    return match.group(1).splitlines()


def test_quickstart_output_in_the_pages_has_the_privacy_figures_of_a_fit_with_the_quickstart_settings():
    """σ, ε, q and the steps in the pages' copy are those of a fit with the quickstart's settings and data (a linear
    model instead of the ViT: the accounting does not depend on the model). After a change to the accounting,
    regenerate the copies with the command in their marker:
    `python examples/quickstart.py --write-readme README.md docs/examples.md`."""
    sys.path.insert(0, str(ROOT / "examples"))
    import quickstart
    import torch
    from torch import nn

    from lightning_dp.callbacks import PrivacySummary

    args = quickstart.parser().parse_args([])
    private_train, _ = quickstart.digits_split(range(5, 10))
    module = quickstart.Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), lr=0.1)
    summary = PrivacySummary(print_table=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the quickstart: a tiny model is many times slower with threads on busy cores
    try:
        with quickstart.PlanLine() as plan:
            quickstart.fit(
                module, private_train, args.epochs, args.batch_size, "linear", quickstart.make_strategy(args), summary
            )
    finally:
        torch.set_num_threads(threads)
    table = summary.table.splitlines()
    for page in QUICKSTART_PAGES:
        lines = _quickstart_output_copy(page)
        assert quickstart.dp_header(args) in lines, f"{page} shows a run with the quickstart's defaults"
        i = lines.index(quickstart.dp_header(args))
        assert lines[i + 1] == plan.line, page
        shown = lines[i + 2 : i + 2 + len(table)]
        assert [line.split()[0] for line in shown] == [line.split()[0] for line in table], page
        for mine, copied in zip(table, shown):
            if not mine.startswith("  throughput"):  # measured, not recomputed
                assert copied == mine, page
        accuracy = r"      private test accuracy: [01]\.\d{3}  \(trained in \d+ s; without privacy: [01]\.\d{3}\)"
        assert re.fullmatch(accuracy, lines[i + 2 + len(table)]), page
        assert re.fullmatch(r"done in \d+ s", lines[-1]), page
    assert _quickstart_output_copy(QUICKSTART_PAGES[0]) == _quickstart_output_copy(QUICKSTART_PAGES[1])


def test_readme_setup_is_two_commands_that_ci_runs_and_clones_outside_the_package_name():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci/run").read_text(encoding="utf-8").splitlines()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    commands = lambda block: [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]  # noqa: E731
    setup = next(commands(b) for b in blocks if 'pip install -e ".[dev]"' in b)
    assert setup == ['pip install -e ".[dev]"', "pytest -q"]
    quickstart = next(commands(b) for b in blocks if "examples/quickstart.py" in b)
    assert quickstart == ["python examples/quickstart.py"]
    for command in setup + quickstart:
        assert command in ci, command
    clone = next(b for b in blocks if "git clone" in b)
    assert "git clone <repository-url> lightning-dp && cd lightning-dp" in clone, (
        "a clone named lightning_dp shadows the package"
    )
    assert "python3 -m venv .venv" in clone and "python3.11" not in readme
    assert "--index-url https://download.pytorch.org/whl/cpu" in clone, "the CPU-only torch install"
