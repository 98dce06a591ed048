"""The mutation proof: for every task, the instructor's tree with ONLY that task's solution
regions stubbed fails that task's graded checks.

It shows that no other code in the tree (another module, a Numba twin, a test, a lesson)
still carries the task's answer: if it did, the checks could pass with the stub in place.
One tree is written once; for each task only the files holding its regions are swapped for
their one-task-stubbed versions (:func:`.markers.splice_regions`), checked, and restored.

The graded checks are a ``check(tree, task) -> (failed, detail)`` function, so the proof
can use any grader. The default, :func:`pytest_check`, runs the task's marked tests
(``python -m pytest -m taskN_M -x`` in the tree, the lessons' tests included) and counts
the task as caught when the first failing one fails at the task's own stub (its
error, or a notebook's traceback, names the task).
"""
from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .copies import build, write_tree
from .markers import Region, load_tasks, splice_regions, stub_body, stub_message
from .runner import run_pytest

Check = Callable[[Path, str], "tuple[bool, str]"]


def stub_one_task(files: Mapping[str, bytes], regions: list[Region], task: str,
                  tasks: Mapping[str, object]) -> dict[str, bytes]:
    """The files holding ``task``'s regions, with those regions (and nothing else) stubbed."""
    out: dict[str, bytes] = {}
    for rel in sorted({r.path for r in regions if r.task == task}):
        mine = [r for r in regions if r.path == rel and r.task == task]  # file order
        bodies = {(task, i): "".join(stub_body(task, tasks, r.indent)) for i, r in
                  enumerate(mine)}
        out[rel] = splice_regions(files[rel].decode("utf-8"), rel, tasks, bodies).encode()
    return out


def _test_files(tree: Path, task: str) -> list[str]:
    """The test files that mention ``task``'s marker, and the lessons' test (its notebooks
    take their markers from the registry): collecting only these keeps each run short."""
    pattern = re.compile(rf"\bmark\.{re.escape(task)}\b")
    files = [p.relative_to(tree).as_posix() for p in sorted((tree / "tests").glob("test_*.py"))
             if pattern.search(p.read_text(encoding="utf-8", errors="replace"))
             or p.name == "test_lessons.py"]
    return files


def pytest_check(timeout: float | None = 900) -> Check:
    """Graded checks = the task's marked tests. Caught: one fails at the task's own stub."""
    def check(tree: Path, task: str) -> tuple[bool, str]:
        tasks = load_tasks(tree)
        run = run_pytest(tree, ["-m", task, "-x", *_test_files(tree, task)], timeout=timeout)
        if run.broken:
            return False, f"the checks did not run (exit {run.exitstatus}): {run.tail(5)}"
        failed = [t for t in run.tests if t.outcome in ("failed", "error")]
        if not run.tests:
            return False, "no test carries the task's marker"
        if not failed:
            return False, f"all {len(run.tests)} checks pass with the task stubbed"
        first = failed[0]
        label = stub_message(task, tasks).split(":")[0] + ":"  # "tinymoe task N_M:"
        # a notebook's error carries the traceback, but its recorded message may be cut
        # short: then the run's output (one failure, -x) shows the cell's error at its end
        notebook = first.exc_type == "CellExecutionError" and \
            f"NotImplementedError: {label}" in re.sub(r"\x1b\[[0-9;]*m", "", run.output)
        if label not in (first.message or "") and not notebook:
            return False, (f"{first.nodeid} fails with {first.exc_type}: "
                           f"{(first.message or '').strip()[:160]}, not at the task's stub")
        return True, f"{first.nodeid} stops at the stub"
    return check


@dataclass
class MutationProof:
    caught: dict[str, str] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        lines = [f"caught  {t}: {d}" for t, d in sorted(self.caught.items())]
        lines += [f"MISSED  {t}: {d}" for t, d in sorted(self.problems.items())]
        lines.append(f"{len(self.caught)} tasks caught, {len(self.problems)} missed")
        return "\n".join(lines)


def prove_mutations(src=".", work=None, *, check: Check | None = None,
                    only: list[str] | None = None) -> MutationProof:
    """Run the mutation proof for every task with solution regions (or those in ``only``)."""
    src = Path(src).resolve()
    tasks = load_tasks(src)
    check = check or pytest_check()
    tree = build(src, student=False, tasks=tasks)
    proof = MutationProof()
    with tempfile.TemporaryDirectory(prefix="tinymoe-mutation-") as tmp:
        root = Path(work or tmp).resolve() / "tree"
        write_tree(tree, root, src, force=True)
        with_regions = sorted({r.task for r in tree.regions if r.kind == "solution"})
        for task in only or with_regions:
            if task not in with_regions:
                proof.problems[task] = "has no solution region"
                continue
            stubbed = stub_one_task(tree.files, tree.regions, task, tasks)
            for rel, data in stubbed.items():
                (root / rel).write_bytes(data)
            try:
                ok, detail = check(root, task)
            finally:
                for rel in stubbed:
                    (root / rel).write_bytes(tree.files[rel])
            (proof.caught if ok else proof.problems)[task] = detail
    return proof
