"""The credit matrix: proof, by running the grader, that credit is exact per task.

For every task t three submissions are made from the instructor's tree, keeping every marker
line (as the student copy does):

* **only t**: t's regions keep the solution, every other region is the task stub. It must
  earn t's points and nothing else;
* **all but t**: t's regions are stubs, the others solved. It must lose exactly t's points;
* **planted t**: everything solved, but t's first region carries a planted error (made
  mechanically by :func:`plant`: the value of its last assignment, or of its return, gets
  ``+ 1``). It must lose t's points only.

``full=True`` grades every task of every submission (3·N submissions × N tasks). The fast
mode, for CI, grades in each submission only task t: the grader builds each task's tree from
the instructor's files and that task's regions alone, so the other tasks' grades cannot
depend on t (the full run, recorded in docs/, shows it).
"""
from __future__ import annotations

import ast
import json
import shutil
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .grading import Grader, _splice
from .markers import Region, stub_message

STATES = ("only", "all_but", "planted")


def stub_body(region: Region, tasks) -> list[str]:
    """The student copy's body of a region: the two stub lines at the marker's indentation."""
    msg = json.dumps(stub_message(region.task, tasks), ensure_ascii=False)
    return [f"{region.indent}# YOUR CODE HERE\n",
            f"{region.indent}raise NotImplementedError({msg})\n"]


def plant(body: list[str]) -> list[str]:
    """A planted error: ``+ 1`` on the value of the region's last single-target assignment
    (or augmented assignment), else of its last ``return``. Comments of that statement go."""
    lines = [b.rstrip("\r\n") + "\n" for b in body]
    text = textwrap.dedent("".join(lines))
    shift = len(lines[0]) - len(lines[0].lstrip()) - (len(text.splitlines()[0]) -
                                                        len(text.splitlines()[0].lstrip()))
    tree = ast.parse(text)
    stmts = [n for n in ast.walk(tree) if (isinstance(n, ast.Assign) and not any(
        isinstance(t, ast.Tuple) for t in n.targets)) or isinstance(n, ast.AugAssign)]
    if not stmts:
        stmts = [n for n in ast.walk(tree) if isinstance(n, ast.Return) and n.value is not None]
    if not stmts:
        raise ValueError("no assignment or return to plant an error in")
    node = max(stmts, key=lambda n: n.lineno)
    node.value = ast.BinOp(node.value, ast.Add(), ast.Constant(1))
    indent = " " * (shift + node.col_offset)
    new = [indent + line + "\n" for line in ast.unparse(node).splitlines()]
    return lines[:node.lineno - 1] + new + lines[node.end_lineno:]


def make_submission(dest: Path, solutions: Path, regions: dict[str, list[Region]], tasks, *,
                    solved: set[str], planted: str | None = None) -> Path:
    """A copy of the instructor's package and lessons with the given regions stubbed/planted;
    marker lines are kept."""
    for top in ("tinymoe", "lessons"):
        shutil.copytree(solutions / top, dest / top,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    by_file: dict[str, list[tuple[Region, list[str]]]] = {}
    for task, rs in regions.items():
        for i, r in enumerate(rs):
            if task == planted and i == 0:
                body = plant(r.body)
            elif task in solved:
                continue
            else:
                body = stub_body(r, tasks)
            by_file.setdefault(r.path, []).append((r, body))
    for rel, pairs in by_file.items():
        path = dest / rel
        if rel.endswith(".py"):
            lines = path.read_text(encoding="utf-8").splitlines(True)
            rs, bodies = zip(*pairs)
            path.write_text("".join(_splice(lines, list(rs), list(bodies))), encoding="utf-8")
            continue
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in {r.cell for r, _ in pairs}:
            c = nb["cells"][cell]
            src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            rs, bodies = zip(*[(r, b) for r, b in pairs if r.cell == cell])
            c["source"] = "".join(_splice(src.splitlines(True), list(rs), list(bodies)))
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return dest


@dataclass
class Row:
    task: str
    state: str
    expected: dict[str, int]
    earned: dict[str, int]
    notes: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.expected == self.earned


@dataclass
class CreditMatrix:
    full: bool
    seed: int
    rows: list[Row]
    seconds: float

    @property
    def problems(self) -> list[str]:
        out = []
        for r in self.rows:
            for t in sorted(set(r.expected) | set(r.earned)):
                if r.expected.get(t) != r.earned.get(t):
                    why = "; ".join(r.notes.get(t, [])[:2])
                    out.append(f"{r.state} {r.task}: {t} earned {r.earned.get(t)}, expected "
                               f"{r.expected.get(t)}" + (f" ({why})" if why else ""))
        return out

    def text(self) -> str:
        mode = "full" if self.full else "fast"
        lines = [f"credit matrix ({mode}, seed {self.seed}): {len(self.rows)} submissions "
                 f"graded in {self.seconds:.0f} s"]
        lines += [f"FAIL: {p}" for p in self.problems]
        lines.append(f"{len(self.problems)} problems")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"full": self.full, "seed": self.seed, "seconds": round(self.seconds, 1),
                "problems": self.problems,
                "rows": [dict(asdict(r), ok=r.ok) for r in self.rows]}


def credit_matrix(solutions=None, *, full: bool = False, tasks=None, seed: int = 0,
                  timeout: float = 60.0, jobs: int = 2, record=None) -> CreditMatrix:
    """Run the matrix (module docstring); ``record`` writes its JSON there."""
    start = time.perf_counter()
    with Grader(solutions, seed=seed, timeout=timeout) as g, \
            tempfile.TemporaryDirectory(prefix="tinymoe-credit-") as tmp:
        names = list(g.tasks) if tasks is None else list(tasks)
        points = {n: g.tasks[n].points for n in g.tasks}
        for n in names:  # the instructor's outputs, once
            g.expected(n)

        def one(job):
            task, state = job
            solved = {task} if state == "only" else set(g.tasks) - (
                {task} if state == "all_but" else set())
            sub = make_submission(Path(tmp) / f"{state}-{task}", g.solutions, g.regions,
                                  g.tasks, solved=solved,
                                  planted=task if state == "planted" else None)
            graded = list(g.tasks) if full else [task]
            report = g.grade(sub, graded)
            shutil.rmtree(sub, ignore_errors=True)
            expected = {t: (points[t] if t in solved and not (state == "planted" and t == task)
                            else 0) for t in graded}
            return Row(task, state, expected, report.earned(),
                       {t.name: t.notes for t in report.tasks if t.notes})

        with ThreadPoolExecutor(max(1, jobs)) as pool:
            rows = list(pool.map(one, [(t, s) for t in names for s in STATES]))
        matrix = CreditMatrix(full, g.seed, rows, time.perf_counter() - start)
    if record is not None:
        Path(record).write_text(json.dumps(matrix.to_json(), indent=1, ensure_ascii=False)
                                + "\n", encoding="utf-8")
    return matrix
