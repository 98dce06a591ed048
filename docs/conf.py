"""Sphinx configuration of the tinymoe site (Sphinx + myst-nb + sphinx-book-theme).

Build, warnings as errors (what ``tests/test_docs.py`` runs)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The lesson notebooks live in ``../lessons`` and are committed without outputs; the build
executes them in fast mode (``TINYMOE_FAST=1``) and renders them with their outputs.
``TINYMOE_DOCS_EXECUTE=off`` skips execution while writing prose, ``=cache`` reuses
outputs between local builds, ``TINYMOE_FAST=0`` renders the full-size runs.

The site loads nothing from outside itself: MathJax is copied into ``_static/`` by the
``sphinx-mathjax-offline`` extension. ``tinymoe classroom site`` builds the students' site
from the student copy, without executing the lessons (docs/teaching.md).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
LESSONS = ROOT / "lessons"

# --- the library under documentation ------------------------------------------------------
# autodoc imports tinymoe from this checkout, and so do the kernels that run the lessons,
# whether or not the package is installed.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
os.environ.setdefault("TINYMOE_FAST", "1")        # small runs: the build stays within CI time
# Figures must come back as notebook outputs: an inherited MPLBACKEND=Agg (the test suite
# sets it) would make the kernels draw into nothing.
os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"


def _link_lessons() -> None:
    """Make ``docs/lessons`` point at ``../lessons`` so the notebooks are part of the site.

    A directory symlink, not copies: the notebooks have one home, they execute with
    ``lessons/`` as their working directory (as in the tests), and tools that walk ``docs/``
    without following links (the classroom copies) do not see them twice. Where symlinks
    are not allowed (Windows without developer mode) the notebooks are copied instead.
    """
    link = DOCS / "lessons"
    if link.is_symlink() and link.resolve() == LESSONS.resolve():
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    try:
        link.symlink_to(os.path.relpath(LESSONS, DOCS), target_is_directory=True)
    except OSError:
        link.mkdir()
        for nb in LESSONS.glob("*.ipynb"):
            shutil.copy2(nb, link / nb.name)


_link_lessons()

# --- project --------------------------------------------------------------------------------
project = "tinymoe"
author = "the tinymoe authors"
copyright = "the tinymoe authors, MIT licence"
try:
    from tinymoe import __version__ as release
except ImportError:  # pragma: no cover - the API page would fail loudly anyway
    release = ""
version = release

sys.path.insert(0, str(DOCS / "_ext"))
extensions = [
    "myst_nb",                   # MyST Markdown pages and executed notebooks
    "sphinx.ext.autodoc",        # the API reference, from the docstrings
    "sphinx.ext.napoleon",       # Google/NumPy-style sections in those docstrings
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",    # MathJax ships in _static/: the math renders offline too
    "tinymoe_docs",              # _ext/: the {lesson} role, {program-help}, plain-text docstrings
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", ".jupyter_cache", "Thumbs.db",
                    ".DS_Store"]

# --- MyST and notebooks ----------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

nb_execution_mode = os.environ.get("TINYMOE_DOCS_EXECUTE", "force")
nb_execution_timeout = 300              # per cell, seconds; fast mode needs far less
nb_execution_raise_on_error = True      # a lesson that fails breaks the build
nb_execution_show_tb = True             # ... and the log shows where
nb_execution_excludepatterns: list[str] = []
nb_merge_streams = True                 # one block per cell instead of interleaved prints

# --- autodoc ---------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = True

# --- HTML --------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "tinymoe"
html_theme_options = {
    "home_page_in_toc": True,
    "show_toc_level": 2,
    "use_download_button": True,
}
html_static_path: list[str] = []

# Warnings policy: the build runs with -W and nothing is suppressed. (Docstrings that are
# still not valid reST after _ext/tinymoe_docs.py's plain-text pass are shown verbatim and
# named in the log; TINYMOE_DOCS_STRICT=1 turns those notes into warnings.)
suppress_warnings: list[str] = []


# --- property docstrings that open with a shape ------------------------------------------------
# ``"""(T, k) bool: the choices that hold a slot."""``: napoleon would read "(T, k) bool" as
# the property's type and cross-reference each name in it (``k`` matches several attributes,
# an error under -W). An empty reST comment put first, before napoleon runs, keeps the text as
# written.
_SHAPE_FIRST = re.compile(r"^\([^()]*\)[ \w\[\].,|]*: ")


def _shape_first_line(app, what, name, obj, options, lines):
    if what == "property" and lines and _SHAPE_FIRST.match(lines[0]):
        lines[:0] = ["..", ""]


def setup(app):
    app.connect("autodoc-process-docstring", _shape_first_line, priority=400)
