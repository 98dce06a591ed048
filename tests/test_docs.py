"""The documentation site (docs/): every page reachable, every module documented, and the
Sphinx build itself with warnings as errors (slow: it executes the lessons in fast mode).

The fast tests read the Markdown sources only, so they run without Sphinx installed.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
LESSONS = ROOT / "lessons"
PACKAGE = ROOT / "tinymoe"

# Parts of the package with a page of their own instead of API entries.
NOT_IN_API = ("tinymoe.classroom", "tinymoe.__main__")

_TOCTREE = re.compile(r"^(?P<fence>`{3,}|:{3,})\{toctree\}[^\n]*\n(?P<body>.*?)^(?P=fence)\s*$",
                      re.DOTALL | re.MULTILINE)


def _pages() -> dict[str, Path]:
    """docname -> source: the Markdown pages of docs/ and the lessons (docs/lessons links
    to ../lessons at build time, so a lesson's docname is ``lessons/<stem>``)."""
    pages = {}
    for p in DOCS.rglob("*.md"):
        rel = p.relative_to(DOCS)
        if rel.parts[0] in ("_build", "lessons") or rel.parts[0].startswith("."):
            continue
        pages[rel.with_suffix("").as_posix()] = p
    for nb in LESSONS.glob("*.ipynb"):
        pages[f"lessons/{nb.stem}"] = nb
    return pages


def _glob_regex(pattern: str) -> re.Pattern:
    """Sphinx's toctree glob: ``*`` and ``?`` do not cross ``/``, ``**`` does."""
    out = ""
    for part in re.split(r"(\*\*|\*|\?|\[[^\]]*\])", pattern):
        out += {"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
            part, part if part.startswith("[") else re.escape(part))
    return re.compile(out + r"\Z")


def _toctree_children(docname: str, text: str, pages: dict[str, Path]) -> set[str]:
    base = docname.rpartition("/")[0]
    children = set()
    for block in _TOCTREE.finditer(text):
        lines = [x.strip() for x in block.group("body").splitlines()]
        glob = ":glob:" in lines
        for entry in lines:
            if not entry or entry.startswith(":"):
                continue
            m = re.match(r".*<(.+)>$", entry)
            target = m.group(1) if m else entry
            target = target[1:] if target.startswith("/") else \
                (f"{base}/{target}" if base else target)
            target = os.path.normpath(target).replace(os.sep, "/")
            if glob and re.search(r"[*?\[]", target):
                rx = _glob_regex(target)
                children |= {d for d in pages if rx.match(d)}
            else:
                children.add(target)
    return children


def _reachable(pages: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(docnames reachable from index through toctrees, toctree entries with no page)."""
    seen, missing, todo = {"index"}, set(), deque(["index"])
    while todo:
        doc = todo.popleft()
        src = pages[doc]
        if src.suffix != ".md":
            continue
        for child in _toctree_children(doc, src.read_text(encoding="utf-8"), pages):
            if child not in pages:
                missing.add(f"{child} (in {doc}.md)")
            elif child not in seen:
                seen.add(child)
                todo.append(child)
    return seen, missing


def test_every_lesson_and_page_is_in_a_toctree():
    pages = _pages()
    assert "index" in pages and any(d.startswith("lessons/00_") for d in pages)
    seen, missing = _reachable(pages)
    assert not missing, f"toctree entries without a page: {sorted(missing)}"
    lost = sorted(d for d in pages if d not in seen)
    assert not lost, (f"not reachable from docs/index.md through a toctree: {lost}; lessons "
                      f"are globbed by docs/lessons.md, guide pages by docs/guide/index.md "
                      f"(name them NN_*.md), other pages need a line in a toctree")
    guide = [d for d in pages if d.startswith("guide/") and d != "guide/index"]
    assert len(guide) >= 7


def test_every_lesson_has_a_guide_page():
    """Each lesson NN is named by a guide page with {lesson}`NN`, so the history links it."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in (DOCS / "guide").glob("*.md"))
    named = set(re.findall(r"\{lesson\}`(\d+[a-z]?)`", text))  # 02b: a lesson between 02, 03
    orphans = sorted(nb.name for nb in LESSONS.glob("*.ipynb")
                     if nb.name.split("_")[0] not in named)
    assert not orphans, f"lessons no guide page links with {{lesson}}`NN`: {orphans}"


def _modules() -> list[str]:
    names = []
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if any(x.startswith("_") for x in parts) or name.startswith(NOT_IN_API):
            continue
        names.append(name)
    return names


def test_every_module_is_documented():
    """A module is documented when docs/api.md names it (an automodule line, or a package's
    sentence naming the submodules it re-exports); the command line is docs/cli.md's."""
    text = "\n".join((DOCS / name).read_text(encoding="utf-8") for name in ("api.md", "cli.md"))
    undocumented = [m for m in _modules()
                    if not re.search(rf"(?<![\w.]){re.escape(m)}(?![\w])", text)]
    assert not undocumented, (
        "modules not named in docs/api.md: " + ", ".join(undocumented) + ". Add to "
        "docs/api.md, in the module's section:\n" + "\n".join(
            f"```{{eval-rst}}\n.. automodule:: {m}\n```" for m in undocumented))


# --- the helpers in docs/_ext --------------------------------------------------------------
def _ext():
    spec = importlib.util.spec_from_file_location("tinymoe_docs", DOCS / "_ext" / "tinymoe_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plain_text_docstrings_become_valid_rest():
    ext = _ext()
    cases = {
        "formula block after a paragraph": ["Adam:", "", "    m <- b1 m + g", "    v <- b2 v",
                                            "         + g^2"],
        "unexpected indentation": ["split: train or test", "vowels: the classes,",
                                   "    in order", "scale: 1000"],
        "bars": ["out = |a|; da = grad * sign(a)"],
        "two blocks": ["Eqs:", "", "    a = |x|", "", "    b = c", "", "Text."],
    }
    for what, lines in cases.items():
        assert ext.rst_problems(lines), f"{what}: the case should be invalid as raw reST"
        fixed = ext.plain_text_docstring(lines)
        assert not ext.rst_problems(fixed), f"{what}: {fixed}"
        assert "::" in fixed or r"\|" in "".join(fixed), f"{what}: {fixed}"


def test_valid_rest_docstrings_are_left_alone():
    ext = _ext()
    for lines in (["Summary.", "", "Example::", "", "    x = 1", "        y"],
                  ["1. first item", "   continued", "2. second"],
                  ["term", "    definition"],
                  ["Args:", "    x (int): the x", "        more about x", "", "Returns:",
                   "    y"],
                  ["See :func:`f` and ``a|b``."]):
        assert ext.plain_text_docstring(lines) == lines


def test_program_help_runs_in_process():
    text = _ext().program_help("tinymoe.app.cli:main", "tour")
    assert text.startswith("usage: tinymoe tour") and "--fast" in text


# --- the build ---------------------------------------------------------------------------
def _missing_doc_tools() -> list[str]:
    return [m for m in ("sphinx", "myst_nb", "sphinx_book_theme", "ipykernel")
            if importlib.util.find_spec(m) is None]


def _task_stubs() -> list[str]:
    """Files holding classroom task stubs (a student copy): their lessons cannot run."""
    stub = re.compile(r"raise NotImplementedError\(\s*\\?[\"']tinymoe task \d+_\d+")
    files = [*PACKAGE.rglob("*.py"), *LESSONS.glob("*.ipynb")]
    return [p.name for p in files if stub.search(p.read_text(encoding="utf-8"))]


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(tmp_path):
    missing = _missing_doc_tools()
    if missing:
        pytest.skip(f"the docs build needs {', '.join(missing)}: "
                    f'python -m pip install -e ".[dev,docs]"')
    stubs = _task_stubs()
    if stubs:
        pytest.skip(f"a student copy: task stubs in {', '.join(stubs[:3])} stop the lessons "
                    f"the docs build executes")
    out = tmp_path / "html"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TINYMOE_DOCS_EXECUTE", "MPLBACKEND", "TINYMOE_DOCS_STRICT")}
    env["TINYMOE_FAST"] = "1"
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
                           str(DOCS), str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"sphinx -W failed:\n{log}"
    assert (out / "index.html").is_file()
    for nb in sorted(LESSONS.glob("*.ipynb")):
        page = out / "lessons" / f"{nb.stem}.html"
        assert page.is_file(), f"{nb.name} was not rendered:\n{log}"
        assert "cell_output" in page.read_text(encoding="utf-8"), f"{nb.name} was not executed"
    for md in (DOCS / "guide").glob("*.md"):
        assert (out / "guide" / f"{md.stem}.html").is_file()
    assert (out / "api.html").is_file() and (out / "cli.html").is_file()
