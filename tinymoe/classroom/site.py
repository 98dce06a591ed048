"""The students' course site: the Sphinx docs of the student copy (``tinymoe classroom site``).

The site is built from a student copy made afresh from the given tree, in a temporary
directory, so it holds no solution even when it is pointed at the instructor's tree by
mistake (stripping a student copy gives the same copy). Sphinx runs with warnings as errors.

The lessons are **not executed**: in the student copy their exercise cells raise the task
stubs, and the outputs of any cell after them would either fail or, worse, show the results
of the solution. The lessons appear as the students get them, without outputs. MathJax ships
in the site's ``_static/`` (``sphinx-mathjax-offline``), so the math renders offline.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .copies import build, write_tree
from .markers import ClassroomError


def _check_out(out: Path, src: Path) -> None:
    """OUT is new, empty, or a previous Sphinx build (``.buildinfo``), and not in the source."""
    if out == src or src.is_relative_to(out):
        raise ClassroomError(str(out), None, "refusing to write the site over the source tree")
    if out.is_relative_to(src) and not out.is_relative_to(src / "build"):
        raise ClassroomError(str(out), None, "refusing to write the site inside the source "
                             "tree; use a directory outside it, or under its build/")
    if out.exists() and not out.is_dir():
        raise ClassroomError(str(out), None, "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / ".buildinfo").is_file():
        raise ClassroomError(str(out), None, "directory is not empty and holds no earlier "
                             "site (.buildinfo): choose a new or empty directory")


def site(src, out, *, solutions=None, quiet: bool = True,
         timeout: float | None = 1800) -> Path:
    """Build the students' HTML site of the tree ``src`` into ``out``; return ``out``.

    Refused, leaving ``out`` untouched, when a page would load anything from outside the
    site, or, given the instructor's tree as ``solutions``, when a solution line shows.
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    tree = build(src, student=True)  # validates the tree and every marker
    _check_out(out, src)
    secrets = solution_lines(solutions) if solutions is not None else []
    if "docs/conf.py" not in tree.files:
        raise ClassroomError(str(src), None, "has no docs/conf.py: nothing to build")
    with tempfile.TemporaryDirectory(prefix="tinymoe-site-") as tmp:
        copy = Path(tmp) / "student"
        write_tree(tree, copy, src)
        env = dict(os.environ, TINYMOE_DOCS_EXECUTE="off", PYTHONDONTWRITEBYTECODE="1")
        html = Path(tmp) / "html"
        cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
               "-d", str(Path(tmp) / "doctrees"), str(copy / "docs"), str(html)]
        if quiet:
            cmd.insert(3, "-q")
        try:
            run = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                                 timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ClassroomError(str(src), None, f"the Sphinx build took over {timeout} s") \
                from None
        if run.returncode != 0:
            tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-15:])
            raise ClassroomError(str(src), None, f"the Sphinx build failed (exit "
                                 f"{run.returncode}):\n{tail}")
        bad = external_loads(html) + [f"solution line in {x}" for x in site_leaks(html, secrets)]
        if bad:
            raise ClassroomError(str(src), None, "the built site is not student-safe:\n  "
                                 + "\n  ".join(bad[:20]))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(html, out, symlinks=False)
    return out


# ---------------------------------------------------------------- checks of a built site

def _squeeze(text: str) -> str:
    return "".join(text.split())


def solution_lines(src, min_chars: int = 20) -> list[str]:
    """The solution lines of the tree ``src`` (the instructor's) that a site must not show:
    each line of a solution region with at least ``min_chars`` non-space characters that
    does not also appear outside the solution regions, in any file the copies take."""
    tree = build(src, student=False)
    spans: dict[str, list] = {}
    for r in tree.regions:
        if r.kind == "solution":
            spans.setdefault(r.path, []).append(r)
    secret, outside = set(), []
    for rel, data in tree.files.items():
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        mine = spans.get(rel, [])
        for cell, n, line in _numbered(rel, text):
            if any(r.cell == cell and r.begin < n < r.end for r in mine):
                if len(_squeeze(line)) >= min_chars:
                    secret.add(line.strip())
            else:
                outside.append(_squeeze(line))
    corpus = "\0".join(outside)
    return sorted(t for t in secret if _squeeze(t) not in corpus)


def _numbered(rel: str, text: str):
    """(cell, line number, line) of a file; a notebook's code cells numbered one by one."""
    import json

    if not rel.endswith(".ipynb"):
        yield from ((None, n, t) for n, t in enumerate(text.splitlines(), start=1))
        return
    for i, c in enumerate(json.loads(text).get("cells", [])):
        src = c.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        cell = i if c.get("cell_type") == "code" else None
        yield from ((cell, n, t) for n, t in enumerate(src.splitlines(), start=1))


def _page_text(path: Path) -> str:
    """What a reader (or a search) finds in a built file: HTML without tags and entities."""
    import html
    import re

    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".html":
        raw = html.unescape(re.sub(r"<[^>]*>", "", raw))
    return raw


def site_leaks(html_dir, lines: list[str]) -> list[str]:
    """``path: line`` for every one of ``lines`` found in the built site (tags, entities and
    whitespace ignored): its pages, its search index and its ``_sources``."""
    html_dir = Path(html_dir)
    wanted = {_squeeze(t): t for t in lines}
    found = []
    for path in sorted(html_dir.rglob("*")):
        rel = path.relative_to(html_dir).as_posix()
        if not path.is_file() or (rel.startswith("_static/") and path.suffix != ".html"):
            continue
        if path.suffix not in (".html", ".js", ".txt", ".ipynb", ".md", ".json"):
            continue
        text = _squeeze(_page_text(path))
        found += [f"{rel}: {line}" for key, line in wanted.items() if key in text]
    return found


def external_loads(html_dir) -> list[str]:
    """``path: url`` for every script, style sheet, font or other resource a built page or
    style sheet loads from outside the site (an http(s) or protocol-relative URL)."""
    import re
    from html.parser import HTMLParser

    remote = re.compile(r"^\s*(https?:)?//", re.IGNORECASE)
    out: list[str] = []

    class Loads(HTMLParser):
        def __init__(self, rel):
            super().__init__()
            self.rel = rel

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            url = None
            if tag in ("script", "img", "iframe", "source", "embed"):
                url = a.get("src")
            elif tag == "link" and set((a.get("rel") or "").lower().split()) - {
                    "canonical", "alternate", "next", "prev", "search", "index", "author",
                    "license", "help", "bookmark"}:
                url = a.get("href")
            if url and remote.match(url):
                out.append(f"{self.rel}: <{tag}> {url}")

    html_dir = Path(html_dir)
    for path in sorted(html_dir.rglob("*.html")):
        Loads(path.relative_to(html_dir).as_posix()).feed(
            path.read_text(encoding="utf-8", errors="replace"))
    css_url = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])((?:https?:)?//[^'")\s]+)""",
                         re.IGNORECASE)
    for path in sorted(html_dir.rglob("*.css")):
        text = path.read_text(encoding="utf-8", errors="replace")
        out += [f"{path.relative_to(html_dir).as_posix()}: {m.group(1)}"
                for m in css_url.finditer(text)]
    return out
