"""The trusted grader: per task, a hybrid tree, a sandboxed child, a comparison in the parent.

For each task t of the instructor's registry:

1. **Hybrid tree.** A fresh temporary directory receives the instructor's ``tinymoe/``
   package (and t's lesson notebook for a notebook exercise) from the solutions tree (by
   default the tree this grader runs from); then only t's regions get the student's text,
   the lines between t's markers in the student's file of the same path, matched by their
   ordinal. No other file of the student's copy is read: not its ``conftest.py``, its
   configuration, its registry or its tests. A missing file or marker gives t 0 with a note.
2. **Child.** :mod:`.child` runs t's probe (:mod:`.probes`) in that tree, under the limits
   of :mod:`.sandbox`, on inputs drawn by the parent from a seed chosen at grading time, and
   writes the outputs as arrays (``np.savez``, read back with ``allow_pickle=False`` after a
   size check).
3. **Parent.** The same probe runs on the instructor's own tree; the parent compares each
   output (shape, then ``np.allclose`` with the probe's tolerance) and decides. Hidden
   expectations never enter the child, and every other task's code is the instructor's, so
   a task's grade depends only on its own regions.

The JSON is the *runner result* that GitHub Classroom's ``autograding-grading-reporter``
reads (the format its ``autograding-command-grader`` produces, version 1), one entry per
task::

    {"version": 1, "status": "pass" | "fail" | "error", "max_score": 53,
     "tests": [{"name": "task0_1: ...", "status": "pass", "score": 2, "max_score": 2,
                "message": "4/4 cases match", "test_code": "tinymoe classroom test task0_1",
                "filename": "", "line_no": 0, "duration": 120}]}

``duration`` is in milliseconds. docs/teaching.md has the workflow.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .markers import ClassroomError, Region, find_regions, load_tasks
from .probes import PROBES
from .sandbox import DEFAULT_MEMORY, DEFAULT_TIMEOUT, give_to, run_child, unprivileged_user

STUDENT_COMMAND = "tinymoe classroom test {task}"
MAX_OUTPUT_BYTES = 32 << 20  # outputs a child may return
MAX_RESULT_BYTES = 1 << 20  # its result.json
NOTE_CHARS = 400
_BEGIN = re.compile(r"^[ \t]*###[ \t]+BEGIN SOLUTION[ \t]+(?P<task>\S+)[ \t]*$")
_END = re.compile(r"^[ \t]*###[ \t]+END SOLUTION[ \t]*$")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class TaskResult:
    name: str
    title: str
    points: int
    earned: int = 0
    status: str = "fail"  # pass, fail or error
    cases: int = 0
    matched: int = 0
    notes: list[str] = field(default_factory=list)
    duration_ms: int = 0

    @property
    def summary(self) -> str:
        return f"{self.matched}/{self.cases} cases match"


@dataclass
class GradeReport:
    tasks: list[TaskResult]
    seed: int

    @property
    def score(self) -> int:
        return sum(t.earned for t in self.tasks)

    @property
    def max_score(self) -> int:
        return sum(t.points for t in self.tasks)

    @property
    def status(self) -> str:
        if any(t.status == "error" for t in self.tasks):
            return "error"
        return "pass" if all(t.status == "pass" for t in self.tasks) else "fail"

    def earned(self) -> dict[str, int]:
        return {t.name: t.earned for t in self.tasks}

    def to_json(self) -> dict:
        """The GitHub Classroom runner result (see the module docstring)."""
        return {"version": 1, "status": self.status, "max_score": self.max_score,
                "tests": [{"name": f"{t.name}: {t.title}", "status": t.status,
                           "score": t.earned, "max_score": t.points,
                           "message": "; ".join([t.summary] + t.notes),
                           "test_code": STUDENT_COMMAND.format(task=t.name), "filename": "",
                           "line_no": 0, "duration": t.duration_ms} for t in self.tasks]}

    def table(self) -> str:
        rows = [("task", "title", "cases", "points")]
        for t in self.tasks:
            title = t.title if len(t.title) <= 48 else t.title[:47] + "…"
            rows.append((t.name, title, f"{t.matched}/{t.cases}", f"{t.earned}/{t.points}"))
        rows.append(("total", "", "", f"{self.score}/{self.max_score}"))
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d:>{w[3]}}" for a, b, c, d in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        notes = [f"  {t.name}: {n}" for t in self.tasks for n in t.notes]
        return "\n".join(lines + (["", "what differed (seed "
                                   f"{self.seed}; run `{STUDENT_COMMAND.format(task='taskN_M')}`"
                                   "):"] + notes if notes else []))


# --- regions -------------------------------------------------------------------------------------
def _cell_sources(nb: dict) -> list[tuple[int, str]]:
    out = []
    for i, c in enumerate(nb.get("cells", [])):
        if c.get("cell_type") == "code":
            src = c.get("source", "")
            out.append((i, "".join(src) if isinstance(src, list) else src))
    return out


def solution_regions(solutions: Path, tasks) -> dict[str, list[Region]]:
    """Every solution region of the instructor's tree, by task, in file order."""
    by_task: dict[str, list[Region]] = {name: [] for name in tasks}
    files = sorted(p for p in (solutions / "tinymoe").rglob("*.py") if "__pycache__" not in p.parts)
    files += sorted((solutions / "lessons").glob("*.ipynb"))
    for path in files:
        rel = path.relative_to(solutions).as_posix()
        text = path.read_text(encoding="utf-8")
        if "BEGIN SOLUTION" not in text:
            continue
        if rel.endswith(".py"):
            regions = find_regions(text, path=rel, tasks=tasks)
        else:
            regions = [r for i, src in _cell_sources(json.loads(text))
                       for r in find_regions(src, path=rel, tasks=tasks, cell=i)]
        for r in regions:
            if r.kind == "solution":
                by_task[r.task].append(r)
    return by_task


def _bodies(text: str, task: str) -> list[list[str]]:
    """The bodies (lines with their endings) of ``task``'s regions in one text, leniently:
    other tasks' markers are ignored; a broken region of ``task`` raises ValueError."""
    out: list[list[str]] = []
    open_: list[str] | None = None
    for n, line in enumerate(text.splitlines(True), start=1):
        m = _BEGIN.match(line.rstrip("\r\n"))
        if m and open_ is not None:
            raise ValueError(f"line {n}: a BEGIN marker inside the {task} region opened "
                             f"before it (its END marker is missing)")
        if m and m.group("task") == task:
            open_ = []
        elif open_ is not None and _END.match(line.rstrip("\r\n")):
            out.append(open_)
            open_ = None
        elif open_ is not None:
            open_.append(line)
    if open_ is not None:
        raise ValueError(f"the last {task} region has no END marker")
    return out


def student_bodies(student: Path, regions: list[Region], task: str) -> list[list[str]]:
    """The student's text for each of ``regions`` (same order); ClassroomError when missing."""
    out: list[list[str]] = []
    for rel in dict.fromkeys(r.path for r in regions):
        mine = [r for r in regions if r.path == rel]
        path = student / rel
        if not path.is_file():
            raise ClassroomError(rel, None, f"missing from the submission ({task} lives there)")
        try:
            text = path.read_text(encoding="utf-8")
            if rel.endswith(".ipynb"):
                cells = _cell_sources(json.loads(text))
                bodies = [b for _, src in cells for b in _bodies(src, task)]
            else:
                bodies = _bodies(text, task)
        except (ValueError, UnicodeDecodeError) as e:
            raise ClassroomError(rel, None, f"the {task} region cannot be read: {e}") from None
        if len(bodies) != len(mine):
            raise ClassroomError(rel, None, f"{len(mine)} region(s) of {task} expected between "
                                 f"its BEGIN/END SOLUTION marker lines, found {len(bodies)} "
                                 "(were marker lines deleted or edited?)")
        out += bodies
    return out


def _splice(lines: list[str], regions: list[Region], bodies: list[list[str]]) -> list[str]:
    for r, body in sorted(zip(regions, bodies), key=lambda rb: -rb[0].begin):
        body = [b if b.endswith(("\n", "\r")) else b + "\n" for b in body]
        lines[r.begin:r.end - 1] = body
    return lines


def build_tree(dest: Path, solutions: Path, regions: list[Region],
               bodies: list[list[str]] | None, notebook: str | None) -> None:
    """The instructor's package (+ notebook) at ``dest``, ``regions`` replaced by ``bodies``."""
    shutil.copytree(solutions / "tinymoe", dest / "tinymoe",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    if notebook:
        (dest / notebook).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(solutions / notebook, dest / notebook)
    if bodies is None:
        return
    for rel in dict.fromkeys(r.path for r in regions):
        pairs = [(r, b) for r, b in zip(regions, bodies) if r.path == rel]
        path = dest / rel
        if rel.endswith(".py"):
            lines = path.read_text(encoding="utf-8").splitlines(True)
            path.write_text("".join(_splice(lines, *map(list, zip(*pairs)))), encoding="utf-8")
            continue
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in {r.cell for r, _ in pairs}:
            c = nb["cells"][cell]
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            mine = [(r, b) for r, b in pairs if r.cell == cell]
            c["source"] = "".join(_splice(src.splitlines(True), *map(list, zip(*mine))))
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def has_solutions(root) -> bool:
    """Does the tree at ``root`` hold the instructor's solutions (every task has regions and
    none of them is a stub)? False for a student copy."""
    root = Path(root)
    try:
        regions = solution_regions(root, load_tasks(root))
    except (ClassroomError, OSError, ValueError):
        return False
    return all(regions.values()) and not any(
        "NotImplementedError(" in line for rs in regions.values() for r in rs for line in r.body)


# --- one child run -------------------------------------------------------------------------------
@dataclass
class ProbeRun:
    outputs: dict[str, np.ndarray]
    errors: dict[str, dict]
    notes: list[str]
    seconds: float


def _task_number(task: str) -> int:
    """``task4_1`` -> 41, the second half of the probe's seed; ids with letters
    (``task2b_1``) map to a stable number of their own (a CRC of the id)."""
    digits = task.removeprefix("task").replace("_", "")
    return int(digits) if digits.isdigit() else zlib.crc32(task.encode()) + 1000


def _inputs(task: str, seed: int) -> list[dict[str, np.ndarray]]:
    return PROBES[task].cases(np.random.default_rng([seed, _task_number(task)]))


def _child_env(work: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work / "home"),
            "MPLCONFIGDIR": str(work / "home"), "MPLBACKEND": "Agg", "LANG": "C.UTF-8",
            "TINYMOE_DISPATCH": "numpy", "NUMBA_DISABLE_JIT": "1", "TINYMOE_FAST": "1",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_probe(work: Path, tree_builder, task: str, cases: list[dict[str, np.ndarray]], *,
              timeout: float, memory: int, hide: Iterable[Path] = ()) -> ProbeRun:
    """Build a tree in ``work``, run the child there under the sandbox, read its arrays."""
    work.mkdir(parents=True)
    tree_builder(work / "tree")
    (work / "home").mkdir()
    shutil.copyfile(Path(__file__).with_name("child.py"), work / "child.py")
    user = unprivileged_user()
    preload = list(PROBES[task].preload)
    if PROBES[task].notebook:
        preload += _third_party_imports(work / "tree" / PROBES[task].notebook)
    (work / "job.json").write_text(json.dumps({
        "task": task, "cases": len(cases), "max_bytes": MAX_OUTPUT_BYTES, "preload": preload,
        "drop": [user.pw_uid, user.pw_gid] if user else None}))
    np.savez(work / "inputs.npz", **{f"case{i}.{k}": np.asarray(v)
                                     for i, c in enumerate(cases) for k, v in c.items()})
    give_to(work, user)
    child = run_child([sys.executable, "-I", str(work / "child.py"), str(work)], work,
                      _child_env(work), timeout=timeout, memory=memory, hide=list(hide))
    notes: list[str] = []
    outputs: dict[str, np.ndarray] = {}
    errors: dict[str, dict] = {}
    out, res = work / "out" / "outputs.npz", work / "out" / "result.json"
    if child.timed_out:
        notes.append(f"stopped after the time limit of {timeout:g} s (an endless loop?)")
    elif not (out.is_file() and res.is_file()):
        tail = child.stderr.strip().splitlines()[-3:]
        notes.append(f"the probe crashed (exit {child.returncode}): " + _short(" | ".join(tail)))
    elif out.stat().st_size > MAX_OUTPUT_BYTES + (1 << 20) or \
            res.stat().st_size > MAX_RESULT_BYTES:
        notes.append("the probe wrote more output than allowed")
    else:
        try:
            with np.load(out, allow_pickle=False) as data:
                outputs = {k: data[k] for k in data.files}
            result = json.loads(res.read_text(encoding="utf-8"))
            errors = {str(k): v for k, v in dict(result.get("errors", {})).items()
                      if isinstance(v, dict)}
            where = result.get("tinymoe_file")
            if not (isinstance(where, str) and Path(where).resolve().is_relative_to(
                    (work / "tree").resolve())):
                notes.append(f"tinymoe was not imported from the graded tree ({_short(where)})")
        except (ValueError, OSError, TypeError, AttributeError) as e:
            notes.append(f"unreadable probe output ({type(e).__name__})")
            outputs, errors = {}, {}
    shutil.rmtree(work, ignore_errors=True)  # a tree per run: do not let them pile up
    return ProbeRun(outputs, errors, notes, child.seconds)


def _third_party_imports(notebook: Path) -> list[str]:
    """Modules the lesson's import cell imports, tinymoe's excepted (preloaded by the child)."""
    import ast
    cells = _cell_sources(json.loads(notebook.read_text(encoding="utf-8")))
    names = []
    for node in ast.walk(ast.parse(cells[0][1])) if cells else []:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return [n for n in names if n.split(".")[0] != "tinymoe"]


def _short(text, n: int = NOTE_CHARS) -> str:
    text = " ".join(str(text).split()) if text is not None else ""
    return text if len(text) <= n else text[:n - 1] + "…"


def compare(task: str, expected: ProbeRun, got: ProbeRun, n_cases: int) -> tuple[int, list[str]]:
    """How many cases match, and what differed (at most 3 notes)."""
    probe = PROBES[task]
    if expected is None:  # no reference: the probe must only run without an exception
        expected = ProbeRun({k: v for k, v in got.outputs.items()}, {}, [], 0.0)
    if expected.notes or expected.errors:
        raise ClassroomError(task, None, "the instructor's own code fails its probe: "
                             + "; ".join(expected.notes + [
                                 f"case {k}: {v.get('type')}: {v.get('message')}"
                                 for k, v in expected.errors.items()]))
    if got.notes:
        return 0, got.notes
    notes: list[str] = []
    if "import" in got.errors:
        e = got.errors["import"]
        return 0, [f"importing the package failed: {_short(e.get('type'))}: "
                   f"{_short(e.get('message'))}"]
    matched = 0
    for i in range(n_cases):
        err = got.errors.get(str(i))
        if err is not None:
            msg = f"case {i}: {_short(err.get('type'), 60)}: {_short(err.get('message'))}"
            if probe.notebook and err.get("cell"):
                msg += f" (in the cell starting: {_short(err.get('cell'), 160)})"
            notes.append(msg)
            continue
        prefix = f"case{i}."
        bad = None
        for key in [k for k in expected.outputs if k.startswith(prefix)]:  # probe order
            name, want = key[len(prefix):], expected.outputs[key]
            have = got.outputs.get(key)
            if have is None:
                bad = f"case {i}: output {name} is missing"
            elif have.shape != want.shape:
                bad = f"case {i}: output {name} has shape {have.shape}, expected {want.shape}"
            elif want.size and not np.allclose(have.astype(float), want.astype(float),
                                               rtol=probe.rtol, atol=probe.atol,
                                               equal_nan=True):
                diff = np.abs(have.astype(float) - want.astype(float))
                worst = float(np.nanmax(np.where(np.isnan(diff), np.inf, diff)))
                bad = (f"case {i}: output {name} (shape {want.shape}): max error {worst:.3g} "
                       f"exceeds the tolerance atol={probe.atol:g} + "
                       f"rtol={probe.rtol:g}·|expected|")
            if bad:
                break
        if bad:
            notes.append(bad)
        else:
            matched += 1
    if len(notes) > 3:
        notes = notes[:3] + [f"({len(notes) - 3} more cases differ)"]
    return matched, notes


# --- grading -------------------------------------------------------------------------------------
class Grader:
    """Grades submissions against one solutions tree; caches the instructor's outputs."""

    def __init__(self, solutions=None, *, seed: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT, memory: int = DEFAULT_MEMORY):
        self.solutions = Path(solutions or REPO).resolve()
        if not (self.solutions / "tinymoe" / "classroom" / "registry.py").is_file():
            raise ClassroomError(str(self.solutions), None, "not a tinymoe solutions tree "
                                 "(no tinymoe/classroom/registry.py); pass --solutions DIR")
        self.tasks = load_tasks(self.solutions)
        self.regions = solution_regions(self.solutions, self.tasks)
        self.seed = secrets.randbits(31) if seed is None else int(seed)
        self.timeout, self.memory = timeout, memory
        self._expected: dict[str, ProbeRun] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="tinymoe-grade-"))
        os.chmod(self._tmp, 0o711)  # the child's user may enter its own work dir, not list
        self._n = itertools.count(1)  # thread-safe work-dir numbers

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _work(self, what: str) -> Path:
        # unguessable names: a child cannot find another run's tree by its name
        return self._tmp / f"{next(self._n):04d}-{what}-{secrets.token_hex(8)}"

    def _run(self, task: str, bodies, cases) -> ProbeRun:
        regions, nb = self.regions[task], PROBES[task].notebook
        return run_probe(self._work(task), lambda d: build_tree(d, self.solutions, regions,
                                                                bodies, nb),
                         task, cases, timeout=self.timeout, memory=self.memory,
                         hide=[self.solutions])

    def expected(self, task: str) -> ProbeRun | None:
        if task not in self._expected:
            self._expected[task] = self._run(task, None, _inputs(task, self.seed))
        return self._expected[task]

    def grade_task(self, student: Path, task: str) -> TaskResult:
        t = self.tasks[task]
        r = TaskResult(task, t.title, t.points)
        start = time.perf_counter()
        if task not in PROBES:
            r.status = "error"
            r.notes.append("the grader has no probe for this task")
            return r
        cases = _inputs(task, self.seed)
        r.cases = len(cases)
        if not self.regions[task]:
            r.notes.append("the instructor's tree has no region for this task")
            return r
        try:
            bodies = student_bodies(Path(student), self.regions[task], task)
        except ClassroomError as e:
            r.notes.append(str(e))
            return r
        expected = self.expected(task)
        got = self._run(task, bodies, cases)
        try:
            r.matched, r.notes = compare(task, expected, got, len(cases))
        except ClassroomError as e:  # the grader's own fault: say so, award nothing
            r.status, r.notes = "error", [_short(str(e))]
            return r
        if r.matched == r.cases and not r.notes:
            r.status, r.earned = "pass", t.points
        r.duration_ms = round(1000 * (time.perf_counter() - start))
        return r

    def grade(self, student, names: Iterable[str] | None = None, *,
              against_itself: bool = False) -> GradeReport:
        student = Path(student)
        if not student.is_dir():
            raise ClassroomError(str(student), None, "no such directory to grade")
        if student.resolve() == self.solutions and not against_itself:
            raise ClassroomError(str(student), None, "this is the solutions tree itself; pass "
                                 "--solutions DIR (the instructor's tree) to grade it")
        names = list(self.tasks) if names is None else list(names)
        for n in names:
            if n not in self.tasks:
                raise ClassroomError(n, None, "unknown task; known: " + ", ".join(self.tasks))
        return GradeReport([self.grade_task(student, n) for n in names], self.seed)


PUBLIC_SEED = 0  # the seed of the answers shipped with the student copy (grading draws its own)


def answers_path(root: Path, task: str) -> Path:
    return Path(root) / "tinymoe" / "classroom" / "answers" / f"{task}.npz"


def write_answers(solutions, out, tasks: Iterable[str] | None = None) -> list[Path]:
    """The instructor's probe outputs for the public seed, one ``.npz`` per task, under
    ``out/tinymoe/classroom/answers/``: what ``tinymoe classroom test`` compares a student's
    copy with. Grading draws another seed, so these never reveal a graded output."""
    written = []
    with Grader(solutions, seed=PUBLIC_SEED) as g:
        for task in list(g.tasks) if tasks is None else tasks:
            run = g.expected(task)
            path = answers_path(out, task)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **run.outputs)
            written.append(path)
    return written


def self_test(directory=".", tasks: Iterable[str] = (), *, solutions=None,
              timeout: float = DEFAULT_TIMEOUT, json_path=None) -> GradeReport:
    """The student's command: the grader's probes against the copy at ``directory``.

    Compared with the instructor's tree when ``solutions`` is given, else with the answers
    shipped in the copy (public seed); with neither, only exceptions are reported.
    """
    directory = Path(directory).resolve()
    with Grader(solutions or directory, seed=None if solutions else PUBLIC_SEED,
                timeout=timeout) as g:
        tasks = list(g.tasks) if list(tasks) == ["all"] else list(tasks)
        for task in tasks:
            if task not in g.tasks:
                raise ClassroomError(task, None, "unknown task; known: " + ", ".join(g.tasks))
            path = answers_path(directory, task)
            if solutions is None and path.is_file():
                with np.load(path, allow_pickle=False) as data:
                    g._expected[task] = ProbeRun({k: data[k] for k in data.files}, {}, [], 0.0)
            elif solutions is None:
                g._expected[task] = None
        report = g.grade(directory, tasks, against_itself=solutions is None)
    print(report.table())
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False)
                                   + "\n", encoding="utf-8")
    return report


def grade(directory=".", json_path=None, *, solutions=None, tasks: Iterable[str] | None = None,
          timeout: float = DEFAULT_TIMEOUT, memory: int = DEFAULT_MEMORY,
          seed: int | None = None, quiet: bool = False) -> GradeReport:
    """Grade the submission at ``directory`` task by task; print a table; optionally write JSON.

    ``solutions`` is the instructor's tree (default: the tree this grader runs from),
    ``tasks`` a subset of task names (default: all of the registry's).
    """
    with Grader(solutions, seed=seed, timeout=timeout, memory=memory) as g:
        report = g.grade(directory, tasks)
    if not quiet:
        print(report.table())
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False)
                                   + "\n", encoding="utf-8")
    return report
