"""Grade a tree: pytest once, results split by task marker, a table and an autograder JSON.

A task earns its points (from ``TASKS``) when at least one of its tests passes and none
fails or errors; skipped tests (e.g. the PyTorch cross-checks without torch) neither earn
nor cost. A task with no tests, or whose test file could not even be imported, earns
nothing and says why, rather than collecting full marks by default.

The JSON is the *runner result* that GitHub Classroom's ``autograding-grading-reporter``
reads (the format its ``autograding-command-grader`` produces, version 1), with one entry
per task::

    {"version": 1, "status": "pass" | "fail" | "error", "max_score": 11,
     "tests": [{"name": "task0_1: ...", "status": "pass", "score": 3, "max_score": 3,
                "message": "4 passed", "test_code": "pytest -m task0_1",
                "filename": "", "line_no": 0, "duration": 120}]}

``duration`` is in milliseconds. The reporter wants it base64-encoded in a step output;
docs/teaching.md has the workflow.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .markers import load_tasks
from .runner import PytestRun, TestRecord, run_pytest


@dataclass
class TaskResult:
    name: str
    title: str
    points: int
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    earned: int = 0
    status: str = "fail"  # pass, fail or error
    notes: list[str] = field(default_factory=list)
    duration_ms: int = 0


@dataclass
class GradeReport:
    tasks: list[TaskResult]
    runs: list[PytestRun]

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

    def to_json(self) -> dict:
        """The GitHub Classroom runner result (see the module docstring)."""
        return {"version": 1, "status": self.status, "max_score": self.max_score,
                "tests": [{"name": f"{t.name}: {t.title}", "status": t.status,
                           "score": t.earned, "max_score": t.points,
                           "message": "; ".join(
                               [f"{t.passed} passed, {t.failed} failed, {t.skipped} skipped"]
                               + t.notes),
                           "test_code": f"pytest -m {t.name}", "filename": "", "line_no": 0,
                           "duration": t.duration_ms} for t in self.tasks]}

    def table(self) -> str:
        rows = [("task", "title", "passed", "failed", "points")]
        for t in self.tasks:
            title = t.title if len(t.title) <= 48 else t.title[:47] + "…"
            rows.append((t.name, title, str(t.passed), str(t.failed), f"{t.earned}/{t.points}"))
        rows.append(("total", "", "", "", f"{self.score}/{self.max_score}"))
        w = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:>{w[2]}}  {d:>{w[3]}}  {e:>{w[4]}}"
                 for a, b, c, d, e in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        notes = [f"  {t.name}: {n}" for t in self.tasks for n in t.notes]
        return "\n".join(lines + (["", "notes:"] + notes if notes else []))


def _mentions(path: Path, name: str) -> bool:
    """Does the (uncollectable) test file mention the task's marker?"""
    try:
        return re.search(rf"\b{re.escape(name)}\b", path.read_text(encoding="utf-8")) is not None
    except (OSError, UnicodeDecodeError):
        return False


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:200] if lines else ""


def score_task(name: str, task, tests: list[TestRecord], run: PytestRun) -> TaskResult:
    """One task's result from the tests that carry its marker."""
    r = TaskResult(name, task.title, task.points)
    mine = [t for t in tests if name in t.markers]
    r.passed = sum(t.ok for t in mine)
    r.failed = sum(t.bad for t in mine)
    r.skipped = len(mine) - r.passed - r.failed
    r.duration_ms = round(1000 * sum(t.duration for t in mine))
    for t in [t for t in mine if t.bad][:3]:
        r.notes.append(f"{t.nodeid}: {t.exc_type or t.outcome}: {_first_line(t.message)}")
    for err in run.collect_errors:
        if _mentions(run.directory / err["nodeid"], name):
            r.notes.append(f"{err['nodeid']} could not be collected (import error?)")
            r.failed += 1
    if run.broken:
        r.status = "error"
        r.notes.append(f"pytest did not run (exit {run.exitstatus}): {run.tail(3)}")
    elif not mine and r.failed == 0:
        r.notes.append(f"no tests carry @pytest.mark.{name}")
    elif r.failed == 0 and r.passed == 0:
        r.notes.append("all of its tests were skipped")
    elif r.failed == 0:
        r.status, r.earned = "pass", task.points
    return r


def grade(directory=".", json_path=None, *, separate: bool = False,
          tasks: Mapping[str, object] | None = None, timeout: float | None = None,
          extra_args=(), quiet: bool = False) -> GradeReport:
    """Grade the tree at ``directory`` task by task; print a table; optionally write JSON.

    One pytest run selects every task (``-m "task0_1 or task0_2 ..."``) and results are
    split by marker; ``separate=True`` runs ``pytest -m taskN_M`` once per task instead.
    ``tasks`` defaults to the registry of the graded tree (its ``tinymoe/classroom/registry.py``).
    """
    directory = Path(directory).resolve()
    tasks = dict(load_tasks(directory) if tasks is None else tasks)
    names = sorted(tasks, key=_natural)
    runs: list[PytestRun] = []
    results: list[TaskResult] = []
    if names and not separate:
        runs.append(run_pytest(directory, ["-m", " or ".join(names), *extra_args],
                               timeout=timeout))
        results = [score_task(n, tasks[n], runs[0].tests, runs[0]) for n in names]
    for n in names if separate else []:
        runs.append(run_pytest(directory, ["-m", n, *extra_args], timeout=timeout))
        results.append(score_task(n, tasks[n], runs[-1].tests, runs[-1]))
    report = GradeReport(results, runs)
    if not quiet:
        print(report.table())
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False)
                                   + "\n", encoding="utf-8")
    return report


def _natural(name: str):
    """task0_10 after task0_9."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
