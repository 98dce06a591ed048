"""Two small Sphinx helpers for the tinymoe site (loaded by ``docs/conf.py``).

``{lesson}`NN```
    A link to ``lessons/NN_*.ipynb``. Before that notebook exists it renders as the plain
    words "lesson NN (not yet written)", so a guide page can name its lesson today and turns
    into a link by itself when the notebook lands (no broken reference, no edit).

``{program-help} module:function``
    The ``--help`` text of a command, produced at build time by calling ``function(argv)``
    in-process with ``argv`` = the ``:args:`` option plus ``--help``, so the CLI page never
    goes stale. A command that prints nothing or an argparse error is a build warning.

Plain-text docstrings
    tinymoe's docstrings are written to be read with ``help()``: reST inline markup
    (````code````, ``:func:`name```) but formulas and examples as indented blocks, and ``|x|``
    for an absolute value or a norm. Read as reST, an indented block after a paragraph is an
    "unexpected indentation" error, a block quote in a proportional font, or, with ``|x|``, a
    substitution that does not exist. :func:`plain_text_docstring` turns such blocks into
    literal blocks (shown exactly as written, in a fixed-width font) and escapes ``|``. It
    leaves alone what is already valid structure: literal blocks after ``::``, lists and
    their continuation lines, definition lists, field lists, directives, doctest blocks
    and napoleon sections (``Args:``, ``Parameters`` + underline, ...). A docstring that is
    still not valid reST after that is shown verbatim (and named in the build log; set
    ``TINYMOE_DOCS_STRICT=1`` to make that a warning), so one malformed docstring cannot
    break the ``-W`` build.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

LESSONS = Path(__file__).resolve().parents[2] / "lessons"

_LIST_ITEM = re.compile(r"^(\s*)([-*+•]|\d+[.)]|\(\d+\)|#\.|[a-z][.)])\s+")
_FIELD = re.compile(r"^\s*:[^:]+:")
_GOOGLE_SECTION = re.compile(
    r"^\s*(Args|Arguments|Attention|Attributes|Caution|Danger|Error|Example|Examples|Hint|"
    r"Important|Keyword Args|Keyword Arguments|Methods|Note|Notes|Other Parameters|"
    r"Parameters|Return|Returns|Raise|Raises|References|See Also|Tip|Todo|Warning|Warnings|"
    r"Warns|Yield|Yields):\s*$")
_UNDERLINE = re.compile(r"^\s*([-=~^\"'`#*+])\1{2,}\s*$")
_INLINE_LITERAL = re.compile(r"``.+?``")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _is_structure(first: str) -> bool:
    """Does a paragraph starting with ``first`` open reST structure that owns indentation?"""
    s = first.strip()
    return bool(_LIST_ITEM.match(first) or _FIELD.match(first) or s.startswith(("..", ">>>"))
                or _GOOGLE_SECTION.match(first))


def _escape_bars(line: str) -> str:
    """``|`` -> ``\\|`` outside ````inline literals````: no substitutions in tinymoe prose."""
    out, pos = [], 0
    for m in _INLINE_LITERAL.finditer(line):
        out.append(line[pos:m.start()].replace("|", r"\|"))
        out.append(m.group(0))
        pos = m.end()
    out.append(line[pos:].replace("|", r"\|"))
    return "".join(out)


def plain_text_docstring(lines: list[str]) -> list[str]:
    """Return ``lines`` (one docstring, dedented) with its plain-text blocks made valid reST.

    Rules, applied to paragraphs (runs of non-blank lines):

    * a paragraph indented deeper than the text before it, after a blank line, becomes a
      literal block (a ``::`` line is inserted before it) unless the text before it ended
      with ``::`` or opened a list, directive, field, section or doctest;
    * a paragraph with a line indented deeper than the line before it (other than a
      list item's or a definition's continuation) becomes a literal block as a whole;
    * ``|`` is escaped everywhere except inside literal blocks and inline literals.
    """
    paragraphs: list[list[str]] = []
    blanks_before: list[int] = []
    blank = 0
    for line in lines:
        if line.strip():
            if blank or not paragraphs:
                paragraphs.append([])
                blanks_before.append(blank)
            paragraphs[-1].append(line)
            blank = 0
        else:
            blank += 1
    trailing = blank

    out: list[str] = []
    prev: list[str] | None = None      # the previous paragraph as emitted (not literal)
    literal_base: int | None = None    # inside a literal block: its introducing indent
    owner_base: int | None = None      # inside a list/directive/section: its indent
    for para, nblank in zip(paragraphs, blanks_before):
        out.extend([""] * nblank)
        ind = _indent(para[0])
        if literal_base is not None:
            if ind > literal_base:         # still inside the literal block: keep as is
                out.extend(para)
                continue
            literal_base = None
        if owner_base is not None:
            if ind > owner_base:           # content of a list item, directive or section
                out.extend(_escape_bars(x) for x in para)
                prev = para
                continue
            owner_base = None
        ends_literal = para[-1].rstrip().endswith("::")
        if _is_structure(para[0]) or any(_UNDERLINE.match(x) for x in para[1:2]):
            owner_base = ind
            out.extend(_escape_bars(x) for x in para)
        elif prev is not None and ind > _indent(prev[0]):
            # an indented block after a paragraph: as if that paragraph had ended with ::
            base = _indent(prev[0])
            out[len(out) - nblank:len(out) - nblank] = ["", " " * base + "::"]
            out.extend(para)
            literal_base = base
            prev = None
            continue
        elif _unexpected_indent(para):
            out.extend([" " * ind + "::", ""])
            out.extend(" " * ind + "    " + x[ind:] for x in para)
            literal_base = ind
            prev = None
            continue
        else:
            out.extend(_escape_bars(x) for x in para)
        if ends_literal:
            literal_base = ind
        prev = para
    out.extend([""] * trailing)
    return out


def _unexpected_indent(para: list[str]) -> bool:
    """A line deeper than the one before it that is not a continuation reST accepts."""
    for i in range(1, len(para)):
        here, before = _indent(para[i]), _indent(para[i - 1])
        if here <= before:
            continue
        item = _LIST_ITEM.match(para[i - 1])
        if item and here == item.end():           # a list item's hanging continuation
            continue
        if i == 1 and all(_indent(x) >= here for x in para[1:]):  # term, then definition
            continue
        return True
    return False


_ROLE = re.compile(r":[\w:.+-]+:`([^`]+)`")
_DIRECTIVE = re.compile(r"^(\s*)\.\. ([\w:+-]+)::")
_IGNORED = ("Unknown interpreted text role", "No role entry for", "Unknown directive type",
            "No directive entry for", 'Trying "')


def rst_problems(lines: list[str]) -> list[str]:
    """docutils' warnings and errors for ``lines`` as reST, ignoring Sphinx-only roles and
    directives (``:func:``, ``.. math::``, ...), which plain docutils does not know."""
    import io

    from docutils.core import publish_doctree

    # Sphinx's roles and directives need a build environment; check them as inline
    # literals and comments instead (their own syntax is Sphinx's to check).
    text = "\n".join(_DIRECTIVE.sub(r"\1.. \2", _ROLE.sub(r"``\1``", x)) for x in lines)
    stream = io.StringIO()
    publish_doctree(text, settings_overrides={
        "report_level": 2, "halt_level": 5, "warning_stream": stream,
        "file_insertion_enabled": False, "raw_enabled": False})
    found = []
    for m in re.finditer(r"^<string>:?(\d*):? \((?:WARNING|ERROR|SEVERE)/\d\) (.*)$",
                         stream.getvalue(), re.MULTILINE):
        if not any(s in m.group(2) for s in _IGNORED):
            found.append(f"line {m.group(1) or '?'}: {m.group(2)}")
    return found


def verbatim(lines: list[str]) -> list[str]:
    """The docstring as one literal block, exactly as ``help()`` shows it."""
    return ["::", ""] + ["    " + x if x.strip() else "" for x in lines] + [""]


def _process_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    """Plain-text blocks become literal blocks; a docstring that is still not valid reST
    after that (say a table with text in a column margin) is shown verbatim rather than
    breaking the -W build. ``TINYMOE_DOCS_STRICT=1`` reports those as warnings instead."""
    import os

    from sphinx.util import logging

    fixed = plain_text_docstring(list(lines))
    problems = rst_problems(fixed)
    if problems:
        log = logging.getLogger(__name__)
        say = log.warning if os.environ.get("TINYMOE_DOCS_STRICT") == "1" else log.info
        say("docstring of %s is not valid reST (%s); shown verbatim", name, problems[0])
        fixed = verbatim(list(lines))
    lines[:] = fixed


# --- the {lesson} role -----------------------------------------------------------------------
def lesson_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """``{lesson}`03``` -> a link to ``lessons/03_*.ipynb``, or plain text until it exists."""
    from docutils import nodes
    from sphinx import addnodes

    number = text.strip()
    found = sorted(LESSONS.glob(f"{number}_*.ipynb"))
    label = f"lesson {number}"
    if not found:
        return [nodes.emphasis(rawtext, f"{label} (not yet written)")], []
    env = inliner.document.settings.env
    ref = addnodes.pending_xref(rawtext, refdomain="std", reftype="doc",
                                reftarget=f"/lessons/{found[0].stem}", refexplicit=True,
                                refwarn=True, refdoc=env.docname)
    ref += nodes.literal(rawtext, f"{label}: {found[0].name}", classes=["xref", "std-doc"])
    return [ref], []


# --- the {program-help} directive ---------------------------------------------------------------
def program_help(target: str, args: str = "", width: int = 90) -> str:
    """What ``module:function`` prints for ``function(shlex.split(args) + ["--help"])``."""
    import contextlib
    import importlib
    import io
    import os
    import shlex

    module, _, func = target.partition(":")
    argv = shlex.split(args) + ["--help"]
    out = io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)          # argparse wraps to the terminal width
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                getattr(importlib.import_module(module), func)(argv)
            except SystemExit:
                pass
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue().rstrip() + "\n"


def _program_help_directive():
    from docutils import nodes
    from docutils.parsers.rst import directives
    from sphinx.util import logging
    from sphinx.util.docutils import SphinxDirective

    logger = logging.getLogger(__name__)

    class ProgramHelp(SphinxDirective):
        required_arguments = 1
        option_spec: ClassVar[dict] = {"args": directives.unchanged}

        def run(self):
            text = program_help(self.arguments[0], self.options.get("args", ""))
            if not text.strip() or ": error:" in text:
                logger.warning("program-help %s %s: no help text, or an error:\n%s",
                               self.arguments[0], self.options.get("args", ""), text,
                               location=self.get_location())
            node = nodes.literal_block(text, text)
            node["language"] = "text"
            return [node]

    return ProgramHelp


def setup(app):
    app.add_role("lesson", lesson_role)
    app.add_directive("program-help", _program_help_directive())
    # before napoleon (priority 500), so it sees the docstring as written
    app.connect("autodoc-process-docstring", _process_docstring, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
