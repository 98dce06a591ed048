"""The mutation proof: for every task, a submission with that task's regions stubbed, and one
with a planted error in them, fail the task's graded checks: the trusted grader's probe
(:mod:`.probes`, run by :class:`.grading.Grader`) earns them 0 points.

It shows that the probe reaches the task's code (a check that passes with the stub in place
tests nothing) and that it notices a small mistake (the planted ``+ 1`` of
:func:`.credit.plant`). That no *other* code of the copy carries a task's answer is shown
by scanning the student copy (tests/test_classroom_answers.py): the grader builds each task's
tree from the instructor's files, so another copy of the answer could not rescue a stub here.

Generic over the registry: every task with solution regions is proved, so a new task needs
nothing here. Each (task, variant) is a submission holding only the files of the task's
regions (all the grader reads of a submission for that task), graded for that task alone.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .credit import plant
from .grading import Grader
from .markers import Region, splice_regions, stub_body
from .probes import PROBES

VARIANTS = ("stubbed", "planted")
Check = Callable[[Path, str], "tuple[bool, str]"]


def mutant_files(solutions: Path, regions: list[Region], task: str, tasks,
                 variant: str) -> dict[str, bytes]:
    """The files holding ``task``'s ``regions`` (in the grader's order) with every region
    stubbed (``"stubbed"``) or the first one carrying a planted error (``"planted"``)."""
    out: dict[str, bytes] = {}
    for rel in dict.fromkeys(r.path for r in regions):
        bodies = {}
        for i, r in enumerate([r for r in regions if r.path == rel]):
            if variant == "stubbed":
                body = stub_body(task, tasks, r.indent)
            elif r is regions[0]:
                body = plant(r.body)
            else:
                body = [b + "\n" for b in r.body]
            bodies[(task, i)] = "".join(body)
        text = (solutions / rel).read_text(encoding="utf-8")
        out[rel] = splice_regions(text, rel, tasks, bodies).encode("utf-8")
    return out


def probe_check(grader: Grader) -> Check:
    """Caught = the grader's probe awards the submission 0 points for the task (and the
    grader itself did not fail)."""
    def check(sub: Path, task: str) -> tuple[bool, str]:
        r = grader.grade_task(sub, task)
        why = (r.notes[0] if r.notes else "").splitlines()[0][:140] if r.notes else ""
        if r.status == "error":
            return False, f"the grader failed: {why}"
        if r.earned:
            return False, f"earns {r.earned}/{r.points} ({r.summary})"
        return True, f"{r.summary}: {why}"
    return check


@dataclass
class MutationProof:
    caught: dict[str, str] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def text(self) -> str:
        lines = [f"caught  {t}: {d}" for t, d in sorted(self.caught.items())]
        lines += [f"MISSED  {t}: {d}" for t, d in sorted(self.problems.items())]
        lines.append(f"{len(self.caught)} tasks caught, {len(self.problems)} missed "
                     f"({self.seconds:.0f} s)")
        return "\n".join(lines)


def prove_mutations(src=".", work=None, *, only: list[str] | None = None,
                    check: Check | None = None, seed: int = 0, timeout: float = 60.0,
                    jobs: int = 2, variants: tuple[str, ...] = VARIANTS) -> MutationProof:
    """Run the mutation proof for every task of the registry (or those in ``only``).
    ``check`` replaces the probe grader (tests plug in their own). ``variants=("stubbed",)``
    is the fast mode (CI): the credit matrix's "planted" row proves the planted errors."""
    start = time.perf_counter()
    proof = MutationProof()
    with Grader(src, seed=seed, timeout=timeout) as g, \
            tempfile.TemporaryDirectory(prefix="tinymoe-mutation-") as tmp:
        check = check or probe_check(g)
        names = list(g.tasks) if only is None else list(only)
        todo = []
        for task in names:
            if task not in g.tasks or not g.regions.get(task):
                proof.problems[task] = "has no solution region"
            elif task not in PROBES:
                proof.problems[task] = "the grader has no probe for it"
            else:
                todo.append(task)

        def one(task: str) -> tuple[str, bool, str]:
            details = []
            for variant in variants:
                sub = Path(work or tmp) / f"{task}-{variant}"
                for rel, data in mutant_files(g.solutions, g.regions[task], task, g.tasks,
                                              variant).items():
                    (sub / rel).parent.mkdir(parents=True, exist_ok=True)
                    (sub / rel).write_bytes(data)
                ok, detail = check(sub, task)
                if not ok:
                    return task, False, f"{variant}: {detail}"
                details.append(f"{variant}: {detail}")
            return task, True, "; ".join(details)

        with ThreadPoolExecutor(max(1, jobs)) as pool:
            for task, ok, detail in pool.map(one, todo):
                (proof.caught if ok else proof.problems)[task] = detail
    proof.seconds = time.perf_counter() - start
    return proof
