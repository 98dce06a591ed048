"""House rules checked on the sources: ruff passes on code and lessons, and nothing cites a
document that is not in the repository.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# --- ruff -------------------------------------------------------------------------------


def _ruff_command() -> list[str] | None:
    """How to run ruff here: the installed package's module, else a ruff on PATH."""
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    exe = shutil.which("ruff")
    return [exe] if exe else None


def _task_stubs() -> list[str]:
    """Files holding classroom task stubs (a student copy), where names go unused on purpose."""
    stub = re.compile(r"raise NotImplementedError\(\s*\\?[\"']tinymoe task \d+_\d+")
    files = [*(ROOT / "tinymoe").rglob("*.py"), *(ROOT / "lessons").glob("*.ipynb")]
    return [p.name for p in files if stub.search(p.read_text(encoding="utf-8"))]


def test_ruff_passes_on_code_and_lessons():
    ruff = _ruff_command()
    if ruff is None:
        pytest.skip('ruff is not installed: python -m pip install -e ".[dev]"')
    stubs = _task_stubs()
    if stubs:
        pytest.skip(f"a student copy: the task stubs in {', '.join(stubs[:3])} leave names "
                    "unused until the tasks are done")
    proc = subprocess.run([*ruff, "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, (
        "ruff check . found problems (the settings are in pyproject.toml; "
        "`ruff check --fix .` repairs some):\n" + proc.stdout[-6000:] + proc.stderr[-2000:])


# --- citations ----------------------------------------------------------------------------

# A document outside the repository cited by name or by its section numbers. State the fact,
# or cite the paper (authors, year, section) or the public implementation by name instead.
OUTSIDE = re.compile(r"reference\s*§|reference A\d\b|DESIGN\.md|moe_algorithms|anchors_teaching",
                     re.IGNORECASE)
SEARCHED = ("tinymoe", "lessons", "docs", "tests", "benchmarks")
SUFFIXES = (".py", ".md", ".ipynb", ".rst", ".txt", ".toml")
SKIP_DIRS = {"__pycache__", "_build", ".ipynb_checkpoints"}


def _sources() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md"]
    for top in SEARCHED:
        files += [p for p in (ROOT / top).rglob("*") if p.is_file()
                  and p.suffix in SUFFIXES and not SKIP_DIRS & set(p.parts)]
    here = Path(__file__).resolve()
    return sorted(p for p in files if p.is_file() and p.resolve() != here)


def test_no_citation_of_documents_outside_the_repository():
    found = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not found, (
        "these lines cite a document that is not in the repository; state the fact, or cite "
        "the paper (authors, year, section) or the public implementation by name:\n"
        + "\n".join(found))


def test_the_citation_pattern_catches_the_old_forms():
    for text in ("see reference §7.5", "(Reference §6.2)", "reference A3", "DESIGN.md",
                 "reference/moe_algorithms.md", "anchors_teaching.md"):
        assert OUTSIDE.search(text), text
    for text in ("tinymoe.dispatch.reference", "the NumPy reference backend",
                 "Fedus et al. 2021, §2.4", "reference implementation"):
        assert not OUTSIDE.search(text), text
