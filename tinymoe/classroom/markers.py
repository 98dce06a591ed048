"""Solution and hidden-test regions: find them, check them, strip them.

A solution region is a line ``### BEGIN SOLUTION taskN_M`` and, further down at any
indentation, a line ``### END SOLUTION``: nbgrader's delimiters, so an nbgrader user can still
feed our notebooks to its ``ClearSolutions``. A hidden-test region is delimited by lines
``### BEGIN HIDDEN TESTS`` and ``### END HIDDEN TESTS``. (docs/teaching.md shows them in
place: a marker alone on an indented line of this docstring would count as a real one.)

In the student copy a solution region keeps its two marker lines, and its body becomes two
lines at the BEGIN marker's indentation, ``# YOUR CODE HERE`` and
``raise NotImplementedError("tinymoe task N_M: <title> — see <lesson>")``; a hidden-test region
is deleted. Everything else is kept byte for byte. Because the markers stay, stripping a
student copy again gives the same copy, and the grader finds a student's answer to a task as
the text between that task's markers (:func:`extract_regions`, :func:`splice_regions`).

Rules, each refused with a :class:`ClassroomError` naming the file and line:

* a comment line (first non-blank character ``#``) that mentions ``BEGIN SOLUTION``,
  ``END SOLUTION``, ``BEGIN HIDDEN TESTS`` or ``END HIDDEN TESTS`` must be exactly one of the
  four markers: ``###``, the keyword, the task name after BEGIN SOLUTION, nothing else. Text
  that mentions a marker in the middle of a line (a docstring, a string) is not a marker;
* ``BEGIN SOLUTION`` names a task registered in ``tinymoe/classroom/registry.py``;
* regions do not nest, are closed by their own kind of END, and every END has a BEGIN;
* in ``.py`` files a stub sits inside a function body (otherwise the student copy could
  not be imported) and the stripped file still parses.
"""
from __future__ import annotations

import ast
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

BEGIN_SOLUTION, END_SOLUTION = "BEGIN SOLUTION", "END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"
KEYWORDS = (BEGIN_SOLUTION, END_SOLUTION, BEGIN_HIDDEN, END_HIDDEN)

_MARKER_RE = re.compile(r"^(?P<indent>[ \t]*)###[ \t]+(?P<keyword>"
                        + "|".join(map(re.escape, KEYWORDS))
                        + r")(?:[ \t]+(?P<arg>\S+))?[ \t]*$")
STUB_PREFIX = "tinymoe task "  # every stub message starts with this, then "N_M: "
_STUB_RE = re.compile(r"^tinymoe task (?P<label>[^:\s]+):")


class ClassroomError(Exception):
    """A marker problem, located: ``path:line: message`` (notebooks: ``path: cell C, line L``)."""

    def __init__(self, path: str, line: int | None, message: str, cell: int | None = None):
        self.path, self.line, self.message, self.cell = path, line, message, cell
        where = path
        if cell is not None:
            where += f": cell {cell}, line {line}"
        elif line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {message}")


@dataclass
class Region:
    """One marked region of one file (or one notebook cell). Lines are 1-based, inclusive."""

    path: str
    kind: str  # "solution" or "hidden"
    task: str | None  # the task of a solution region, None for hidden tests
    begin: int
    end: int
    indent: str
    body: list[str] = field(default_factory=list)  # the lines between the markers
    cell: int | None = None


def task_label(task: str) -> str:
    """``task0_4`` -> ``0_4``: the name students see in the stub message."""
    return task.removeprefix("task")


def stub_task(message: str, tasks: Mapping[str, object]) -> str | None:
    """The task whose stub raised ``message`` (a NotImplementedError text), or None."""
    m = _STUB_RE.match(message.strip())
    if not m:
        return None
    by_label = {task_label(name): name for name in tasks}
    return by_label.get(m.group("label"))


def stub_message(task: str, tasks: Mapping[str, object]) -> str:
    t = tasks[task]
    return f"{STUB_PREFIX}{task_label(task)}: {t.title} — see {t.lesson}"


def stub_body(task: str, tasks: Mapping[str, object], indent: str, nl: str = "\n") -> list[str]:
    """The two lines that replace a solution region's body in the student copy."""
    msg = json.dumps(stub_message(task, tasks), ensure_ascii=False)
    return [f"{indent}# YOUR CODE HERE{nl}", f"{indent}raise NotImplementedError({msg}){nl}"]


def _lines(text: str) -> list[str]:
    """Split keeping each line's own ending (\\n, \\r\\n or \\r) so untouched text round-trips."""
    return list(io.StringIO(text, newline=""))


def _ending(line: str) -> str:
    return line[len(line.rstrip("\r\n")):]


def find_regions(text: str, *, path: str, tasks: Mapping[str, object],
                 cell: int | None = None) -> list[Region]:
    """Parse and validate every region of ``text``; raise ClassroomError on the first problem."""
    regions: list[Region] = []
    open_: Region | None = None
    for n, raw in enumerate(_lines(text), start=1):
        line = raw.rstrip("\r\n")
        stripped = line.lstrip()
        if not (stripped.startswith("#") and any(k in stripped for k in KEYWORDS)):
            if open_ is not None:
                open_.body.append(line)
            continue
        m = _MARKER_RE.match(line)
        if not m:
            raise ClassroomError(path, n, f"malformed marker {stripped!r}: write "
                                 f"'### {BEGIN_SOLUTION} taskN_M', '### {END_SOLUTION}', "
                                 f"'### {BEGIN_HIDDEN}' or '### {END_HIDDEN}' alone on the line",
                                 cell)
        keyword, arg = m.group("keyword"), m.group("arg")
        if keyword.startswith("BEGIN"):
            if open_ is not None:
                raise ClassroomError(path, n, f"nested region: '### {keyword}' inside the "
                                     f"region opened at line {open_.begin}", cell)
            kind = "solution" if keyword == BEGIN_SOLUTION else "hidden"
            if kind == "solution":
                if arg is None:
                    raise ClassroomError(path, n, f"'### {BEGIN_SOLUTION}' needs a task name: "
                                         f"'### {BEGIN_SOLUTION} taskN_M'", cell)
                if arg not in tasks:
                    known = ", ".join(sorted(tasks)) or "none"
                    raise ClassroomError(path, n, f"unknown task {arg!r}: add it to TASKS in "
                                         f"tinymoe/classroom/registry.py (known: {known})", cell)
            elif arg is not None:
                raise ClassroomError(path, n, f"'### {BEGIN_HIDDEN}' takes no argument", cell)
            open_ = Region(path, kind, arg, n, n, m.group("indent"), cell=cell)
        else:
            if arg is not None:
                raise ClassroomError(path, n, f"'### {keyword}' takes no argument", cell)
            if open_ is None:
                raise ClassroomError(path, n, f"stray '### {keyword}' with no open region", cell)
            want = END_SOLUTION if open_.kind == "solution" else END_HIDDEN
            if keyword != want:
                raise ClassroomError(path, n, f"'### {keyword}' closes the region opened at "
                                     f"line {open_.begin}, which needs '### {want}'", cell)
            open_.end = n
            regions.append(open_)
            open_ = None
    if open_ is not None:
        want = END_SOLUTION if open_.kind == "solution" else END_HIDDEN
        raise ClassroomError(path, open_.begin, f"unterminated region: no '### {want}' "
                             "before the end of the " + ("cell" if cell is not None else "file"),
                             cell)
    return regions


@dataclass
class Stripped:
    """The student version of one text: ``origin[i]`` is the source line of output line i+1."""

    text: str
    regions: list[Region]
    origin: list[int]
    stub_lines: list[int]  # output line numbers of the ``raise NotImplementedError`` lines


def strip_text(text: str, *, path: str, tasks: Mapping[str, object],
               cell: int | None = None) -> Stripped:
    """Replace solution regions by stubs and delete hidden-test regions; keep the rest as is."""
    regions = find_regions(text, path=path, tasks=tasks, cell=cell)
    lines = _lines(text)
    out: list[str] = []
    origin: list[int] = []
    stubs: list[int] = []
    n = 0  # lines[:n] are done
    for r in regions:
        out += lines[n:r.begin - 1]
        origin += range(n + 1, r.begin)
        end_nl = _ending(lines[r.end - 1])
        if r.kind == "solution":
            nl = _ending(lines[r.begin - 1]) or "\n"
            out += [lines[r.begin - 1], *stub_body(r.task, tasks, r.indent, nl), lines[r.end - 1]]
            origin += [r.begin, r.begin, r.begin, r.end]
            stubs.append(len(out) - 1)
        elif not end_nl and out:  # a hidden region ended the text without a newline
            out[-1] = out[-1].rstrip("\r\n")
        n = r.end
    out += lines[n:]
    origin += range(n + 1, len(lines) + 1)
    return Stripped("".join(out), regions, origin, stubs)


def check_python(s: Stripped, path: str) -> None:
    """The stripped module must parse, and each stub must sit inside a function body."""
    try:
        tree = ast.parse(s.text)
    except SyntaxError as e:
        ok = e.lineno is not None and 0 < e.lineno <= len(s.origin)
        raise ClassroomError(path, s.origin[e.lineno - 1] if ok else e.lineno,
                             f"the student copy would not parse ({e.msg}); "
                             "does a region cut a block in half?") from None
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(range(node.body[0].lineno, node.end_lineno + 1))
    for line in s.stub_lines:
        if line not in in_function:
            raise ClassroomError(path, s.origin[line - 1], "solution region outside a function "
                                 "body: its stub would raise when the student copy is imported")


def strip_python(text: str, *, path: str, tasks: Mapping[str, object]) -> tuple[str, list[Region]]:
    """Student version of a ``.py`` file, validated (see :func:`check_python`)."""
    s = strip_text(text, path=path, tasks=tasks)
    if s.regions:
        check_python(s, path)
    return s.text, s.regions


def dump_notebook(nb: dict) -> str:
    """Serialise as ``nbformat.write`` does: sorted keys, indent 1, UTF-8, trailing newline."""
    for c in nb.get("cells", []):
        if isinstance(c.get("source"), str):
            c["source"] = c["source"].splitlines(True)
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False,
                      separators=(",", ": ")) + "\n"


def strip_notebook(text: str, *, path: str,
                   tasks: Mapping[str, object]) -> tuple[str, list[Region]]:
    """Student version of a notebook, code cell by code cell; outputs and counts cleared.

    Cell ids and metadata are kept; markdown and raw cells are left alone.
    """
    try:
        nb = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClassroomError(path, e.lineno, f"not a JSON notebook: {e.msg}") from None
    regions: list[Region] = []
    for i, c in enumerate(nb.get("cells", [])):
        if c.get("cell_type") != "code":
            continue
        src = c.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        s = strip_text(src, path=path, tasks=tasks, cell=i)
        c["source"] = s.text
        c["outputs"] = []
        c["execution_count"] = None
        regions += s.regions
    return dump_notebook(nb), regions


def strip_file(rel: str, data: bytes, tasks: Mapping[str, object]) -> tuple[bytes, list[Region]]:
    """Student version of one file of the tree: ``.py`` and ``.ipynb`` stripped, others as is."""
    if not rel.endswith((".py", ".ipynb")):
        return data, []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ClassroomError(rel, None, f"not UTF-8 ({e.reason})") from None
    strip = strip_python if rel.endswith(".py") else strip_notebook
    new, regions = strip(text, path=rel, tasks=tasks)
    return new.encode("utf-8"), regions


def load_tasks(root) -> dict:
    """The ``TASKS`` registry of the tree at ``root``: its ``tinymoe/classroom/registry.py``,
    run as a file.

    Falls back to the installed ``tinymoe.classroom.registry`` when the tree has no registry.
    """
    import runpy
    from pathlib import Path

    root = Path(root)
    if not root.is_dir():
        raise ClassroomError(str(root), None, "no such directory" if not root.exists()
                             else "not a directory")
    path = root / "tinymoe" / "classroom" / "registry.py"
    if not path.is_file():
        from tinymoe.classroom.registry import TASKS
        return dict(TASKS)
    try:
        tasks = runpy.run_path(str(path), run_name="_tinymoe_classroom_tasks")["TASKS"]
        return dict(tasks)
    except Exception as e:  # the registry is code: any error in it is the instructor's to fix
        raise ClassroomError(str(path), getattr(e, "lineno", None), "the task registry does not "
                             f"load ({type(e).__name__}: {e}); it must define a dict TASKS") \
            from None


# ---------------------------------------------------------------- answers in a student's file

class Answer(NamedTuple):
    """A student's answer: the text between the markers of the ``ordinal``-th region (0-based)
    of ``task`` in one file (notebooks: counted over the code cells in order)."""

    task: str
    ordinal: int
    body: str


def _solution_spans(text: str, *, path: str, tasks: Mapping[str, object],
                    cell: int | None = None) -> list[tuple[str, int, int]]:
    """``(task, begin, end)`` 0-based line indices of the marker lines of each solution region.

    Lenient where a student may write anything: only a line that is exactly a solution
    marker counts; hidden-test markers and other text are body. Refuses what would make the
    answer ambiguous: a region with no END, a stray END, an unknown task, a BEGIN without one.
    """
    spans: list[tuple[str, int, int]] = []
    open_: tuple[str, int] | None = None
    suspects: list[int] = []  # comment lines that mention a keyword but are not a marker
    for i, raw in enumerate(_lines(text)):
        line = raw.rstrip("\r\n")
        m = _MARKER_RE.match(line)
        keyword = m.group("keyword") if m else None
        if keyword not in (BEGIN_SOLUTION, END_SOLUTION):
            if line.lstrip().startswith("#") and (BEGIN_SOLUTION in line or END_SOLUTION in line):
                suspects.append(i + 1)
            continue
        arg = m.group("arg")
        if keyword == BEGIN_SOLUTION:
            if arg is None:
                raise ClassroomError(path, i + 1, f"'### {BEGIN_SOLUTION}' without a task name: "
                                     f"restore '### {BEGIN_SOLUTION} taskN_M'", cell)
            if arg not in tasks:
                raise ClassroomError(path, i + 1, f"unknown task {arg!r} after "
                                     f"'### {BEGIN_SOLUTION}'", cell)
            if open_ is not None:
                raise ClassroomError(path, open_[1] + 1, f"the region of {open_[0]} has no "
                                     f"'### {END_SOLUTION}' before the next '### "
                                     f"{BEGIN_SOLUTION}' (line {i + 1}): restore it", cell)
            open_ = (arg, i)
        else:
            if arg is not None:
                raise ClassroomError(path, i + 1, f"'### {END_SOLUTION}' takes no argument", cell)
            if open_ is None:
                raise ClassroomError(path, i + 1, f"'### {END_SOLUTION}' with no '### "
                                     f"{BEGIN_SOLUTION} taskN_M' above it: restore the BEGIN "
                                     "marker", cell)
            spans.append((open_[0], open_[1], i))
            open_ = None
    if open_ is not None:
        hint = (f" (line {', '.join(map(str, suspects))} looks like a damaged marker)"
                if suspects else "")
        raise ClassroomError(path, open_[1] + 1, f"the region of {open_[0]} has no "
                             f"'### {END_SOLUTION}' line{hint}: restore it", cell)
    return spans


def _code_cells(text: str, path: str) -> tuple[dict, list[tuple[int, dict, str]]]:
    try:
        nb = json.loads(text)
    except json.JSONDecodeError as e:
        raise ClassroomError(path, e.lineno, f"not a JSON notebook: {e.msg}") from None
    if not isinstance(nb, dict) or not isinstance(nb.get("cells", []), list):
        raise ClassroomError(path, None, "not a notebook: no list of cells")
    cells = []
    for i, c in enumerate(nb.get("cells", [])):
        if isinstance(c, dict) and c.get("cell_type") == "code":
            src = c.get("source", "")
            cells.append((i, c, "".join(src) if isinstance(src, list) else str(src)))
    return nb, cells


def extract_regions(text: str, path: str, tasks: Mapping[str, object]) -> list[Answer]:
    """Every solution region of a student's ``.py`` or ``.ipynb`` file, as
    ``Answer(task, ordinal, body)`` in file order (``body``: the lines between the markers,
    with their endings).

    Whatever the student wrote between the markers is the answer; a missing or damaged
    marker raises :class:`ClassroomError` naming the line (a grader gives the file's tasks 0
    with that message).
    """
    counts: dict[str, int] = {}
    out: list[Answer] = []

    def add(src: str, cell: int | None) -> None:
        lines = _lines(src)
        for task, b, e in _solution_spans(src, path=path, tasks=tasks, cell=cell):
            out.append(Answer(task, counts.get(task, 0), "".join(lines[b + 1:e])))
            counts[task] = counts.get(task, 0) + 1

    if path.endswith(".ipynb"):
        for i, _, src in _code_cells(text, path)[1]:
            add(src, i)
    else:
        add(text, None)
    return out


def splice_regions(text: str, path: str, tasks: Mapping[str, object],
                   bodies: Mapping[tuple[str, int], str]) -> str:
    """``text`` with the body of region ``(task, ordinal)`` replaced by ``bodies[task, ordinal]``
    (markers kept); the inverse of :func:`extract_regions`. Builds hybrid trees: the
    instructor's file with one task's answers taken from a student, or stubbed."""
    counts: dict[str, int] = {}
    used: set[tuple[str, int]] = set()

    def splice(src: str, cell: int | None) -> str:
        lines = _lines(src)
        n, out = 0, []
        for task, b, e in _solution_spans(src, path=path, tasks=tasks, cell=cell):
            key = (task, counts.get(task, 0))
            counts[task] = key[1] + 1
            if key not in bodies:
                continue
            body = bodies[key]
            if body and not body.endswith(("\n", "\r")):
                body += "\n"
            out += lines[n:b + 1] + [body]
            n = e
            used.add(key)
        return "".join(out + lines[n:])

    if path.endswith(".ipynb"):
        nb, cells = _code_cells(text, path)
        for i, c, src in cells:
            c["source"] = splice(src, i)
        new = dump_notebook(nb)
    else:
        new = splice(text, None)
    missing = sorted(set(bodies) - used)
    if missing:
        raise ClassroomError(path, None, "no such solution region: " + ", ".join(
            f"{t} #{k}" for t, k in missing))
    return new
