"""Proofs that the copies do what they promise, for CI (``tinymoe classroom prove``).

* **No leaks**: no line that occurs only inside a solution or hidden-test region of a source
  file appears in the student version of that file, and no hidden-test marker is left (the
  solution markers stay around each stub).
* **Student copy**: ``import tinymoe`` works; its test suite runs *once*; every test tagged
  with a stubbed task fails with a task stub's ``NotImplementedError`` and nothing else (a
  test may stop at the stub of a task it depends on, but each task has at least one test
  that reaches its own stub); every other test passes or skips.
* **Student notebooks** stop at their first stub (or, with no stub on their path, finish).
* **Instructor copy**: byte-identical to the source; optionally its suite and notebooks pass.

Tasks without solution regions yet are not stubbed, so their tests just count as "other
tests": the proofs hold for a tree with many, few or no regions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .copies import build, source_files, write_tree
from .markers import (BEGIN_HIDDEN, END_HIDDEN, STUB_PREFIX, Region, load_tasks,
                      stub_task)
from .runner import PytestRun, run_pytest


@dataclass
class Proof:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runs: list[PytestRun] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([f"note: {n}" for n in self.notes] + [f"FAIL: {p}" for p in self.problems]
                         + [f"{len(self.problems)} problems"])


def _text_lines(rel: str, data: bytes) -> list[tuple[int | None, int, str]]:
    """(cell, line, text) for every line of a .py file or of every cell of a notebook."""
    text = data.decode("utf-8")
    if not rel.endswith(".ipynb"):
        return [(None, n, line) for n, line in enumerate(text.splitlines(), start=1)]
    out = []
    for i, cell in enumerate(json.loads(text).get("cells", [])):
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        out += [(i, n, line) for n, line in enumerate(src.splitlines(), start=1)]
    return out


def _is_stub(line: str) -> bool:
    """A stub's own line (a student copy keeps its stubs between the markers)."""
    return line == "# YOUR CODE HERE" or \
        line.startswith(f'raise NotImplementedError("{STUB_PREFIX}')


def leaks(source: dict[str, bytes], student: dict[str, bytes], regions: list[Region]) -> list[str]:
    """Lines found only inside regions of a source file that survive in its student version."""
    problems = []
    for rel in sorted({r.path for r in regions}):
        mine = [r for r in regions if r.path == rel]
        inside = lambda c, n: any(r.cell == c and r.begin <= n <= r.end for r in mine)  # noqa
        outside = {t.strip() for c, n, t in _text_lines(rel, source[rel]) if not inside(c, n)}
        secret = {t.strip() for r in mine for t in r.body if t.strip()} - outside
        secret = {t for t in secret if not _is_stub(t)}  # a student copy's own regions
        for c, n, t in _text_lines(rel, student[rel]):
            where = f"{rel}" + (f" cell {c}" if c is not None else "") + f" line {n}"
            if t.strip() in secret:
                problems.append(f"{where}: region line leaked into the student copy: {t.strip()!r}")
            elif t.lstrip().startswith("#") and any(k in t for k in (BEGIN_HIDDEN, END_HIDDEN)):
                problems.append(f"{where}: hidden-test marker left in the student copy: "
                                f"{t.strip()!r}")
    return problems


def check_student_run(run: PytestRun, tasks, stubbed: set[str], proof: Proof,
                      notebook_only: frozenset[str] = frozenset()) -> None:
    """Apply the student-copy rules (module docstring) to one run of its suite.

    Tasks whose regions all sit in lesson notebooks (``notebook_only``) need no test in this
    run: executing the student notebooks (:func:`check_notebooks`) proves them instead.
    """
    if run.broken:
        proof.problems.append(f"the student suite did not run (exit {run.exitstatus}):\n"
                              + run.tail())
        return
    if run.tinymoe_file and not Path(run.tinymoe_file).resolve().is_relative_to(run.directory):
        proof.problems.append(f"the student suite imported tinymoe from {run.tinymoe_file}, "
                              f"not from the student copy {run.directory}")
    for err in run.collect_errors:
        proof.problems.append(f"{err['nodeid']}: not collectable in the student copy: "
                              + err["message"].strip().splitlines()[-1])
    reached: dict[str, set[str]] = {t: set() for t in stubbed}
    for t in run.tests:
        mine = set(t.markers) & stubbed
        hit = stub_task(t.message or "", tasks) if t.exc_type == "NotImplementedError" else None
        what = f"{t.exc_type}: {(t.message or '').strip()[:160]}"
        if mine and t.ok:
            proof.problems.append(f"{t.nodeid}: passes against the stubs of "
                                  f"{', '.join(sorted(mine))}, so it does not test them")
        elif mine and t.bad:
            if hit in stubbed:
                for task in mine:
                    reached[task].add(hit)
            else:
                proof.problems.append(f"{t.nodeid}: fails with {what}, not with a task stub")
        elif not mine and t.bad:
            hint = f"; tag it @pytest.mark.{hit}" if hit else ""
            proof.problems.append(f"{t.nodeid}: an untagged test fails in the student copy "
                                  f"({what}){hint}")
    for task in sorted(stubbed):
        if task in notebook_only and not any(task in t.markers for t in run.tests):
            continue
        if not any(task in t.markers for t in run.tests):
            proof.problems.append(f"{task} has solution regions but no tests in this run")
        elif task not in reached[task]:
            others = ", ".join(sorted(reached[task])) or "nothing"
            proof.problems.append(f"no test of {task} reaches its own stub (they stop at: "
                                  f"{others}); add one that calls the {task} code directly")
    proof.notes.append(f"student suite: {len(run.tests)} tests in {run.seconds:.1f} s")


def run_notebook(path: Path, pythonpath: Path, timeout: int = 600) -> tuple[str, str] | None:
    """Execute a notebook in a fresh python3 kernel; ``(ename, evalue)`` of the first error."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(pythonpath), os.environ.get("PYTHONPATH", "")) if p),
        TINYMOE_FAST="1", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute(env=env, cwd=str(path.parent))
    except CellExecutionError as e:
        return e.ename, e.evalue
    return None


def check_notebooks(root: Path, tasks, regions: list[Region], proof: Proof, *,
                    student: bool) -> None:
    """Student notebooks stop at a task stub; instructor notebooks run to the end."""
    with_regions = {r.path for r in regions if r.kind == "solution"}
    for nb in sorted((root / "lessons").glob("*.ipynb")):
        rel = nb.relative_to(root).as_posix()
        err = run_notebook(nb, root)
        if err is None:
            if student and rel in with_regions:
                proof.problems.append(f"{rel}: has solution regions but ran to the end")
            continue
        ename, evalue = err
        task = stub_task(evalue, tasks) if ename == "NotImplementedError" else None
        if not student or task is None:
            proof.problems.append(f"{rel}: stopped with {ename}: {evalue.strip()[:160]}")
        else:
            proof.notes.append(f"{rel}: stops at the stub of {task}")


def prove(src=".", work=None, *, pytest_args=("-m", "not slow"), notebooks: bool = True,
          instructor_tests: bool = False, timeout: float | None = None) -> Proof:
    """Build both copies under ``work`` (a temporary dir by default) and prove them."""
    src = Path(src).resolve()
    tasks = load_tasks(src)
    proof = Proof()
    with tempfile.TemporaryDirectory(prefix="tinymoe-prove-") as tmp:
        work = Path(work or tmp).resolve()
        stu, ins = build(src, student=True, tasks=tasks), build(src, student=False, tasks=tasks)
        write_tree(stu, work / "student", src, force=True)
        write_tree(ins, work / "instructor", src, force=True)
        proof.problems += leaks(ins.files, stu.files, stu.regions)
        stubbed = {r.task for r in stu.regions if r.kind == "solution"}
        proof.notes.append(f"{len(stu.regions)} regions; stubbed tasks: "
                           f"{', '.join(sorted(stubbed)) or 'none'}")
        for rel in source_files(src):
            if (work / "instructor" / rel).read_bytes() != (src / rel).read_bytes():
                proof.problems.append(f"instructor copy differs from the source: {rel}")
        imp = subprocess.run([sys.executable, "-c", "import tinymoe"], cwd=work / "student",
                             check=False, capture_output=True, text=True, env=dict(
                                 os.environ, PYTHONPATH=str(work / "student")))
        if imp.returncode != 0:
            proof.problems.append("the student copy does not import:\n" + imp.stderr[-1500:])
        run = run_pytest(work / "student", pytest_args, timeout=timeout)
        proof.runs.append(run)
        in_code = {r.task for r in stu.regions if r.kind == "solution"
                   and not r.path.endswith(".ipynb")}
        check_student_run(run, tasks, stubbed, proof, frozenset(stubbed - in_code))
        if instructor_tests:
            run = run_pytest(work / "instructor", pytest_args, timeout=timeout)
            proof.runs.append(run)
            bad = [t.nodeid for t in run.tests if t.bad] + [e["nodeid"] for e in run.collect_errors]
            if run.broken or bad:
                proof.problems.append(f"instructor suite fails: {bad[:5]}\n{run.tail()}")
        if notebooks:
            check_notebooks(work / "student", tasks, stu.regions, proof, student=True)
            if instructor_tests:
                check_notebooks(work / "instructor", tasks, ins.regions, proof, student=False)
    return proof
