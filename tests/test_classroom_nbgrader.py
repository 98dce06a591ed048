"""nbgrader's own round trip on every lesson: ``generate_assignment`` then ``autograde``.

This proves that the lessons' markers are ones nbgrader 0.9 accepts (it treats any line
that contains the words of a marker as one, prose included). It is a compatibility check
only: nbgrader runs hidden tests inside the student's kernel, so it is not the trusted
grader (docs/teaching.md). Skipped when nbgrader is absent; the ``dev`` extra installs it.

The lessons' solution regions are not in nbgrader solution cells, so the round trip runs
with ``ClearSolutions.enforce_metadata = False``, as docs/teaching.md shows.
"""
import json
import shutil
from pathlib import Path

import pytest

from tinymoe.classroom.markers import find_regions
from tinymoe.classroom.registry import TASKS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LESSONS = sorted((REPO / "lessons").glob("*.ipynb"))


def _code(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def _secret_lines(nb: dict, path: str) -> set[str]:
    """Lines found only inside the solution regions of a notebook's code cells."""
    inside, outside = set(), set()
    for i, src in enumerate(_code(nb)):
        regions = find_regions(src, path=path, tasks=TASKS, cell=i)
        spans = [(r.begin, r.end) for r in regions if r.kind == "solution"]
        for n, line in enumerate(src.splitlines(), start=1):
            (inside if any(b <= n <= e for b, e in spans) else outside).add(line.strip())
    return {t for t in inside - outside if t and not t.startswith("###")}


def test_nbgrader_generate_assignment_and_autograde_every_lesson(tmp_path, monkeypatch):
    pytest.importorskip("nbgrader")
    from nbgrader.apps import NbGraderAPI
    from traitlets.config import Config

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports this tree's tinymoe
    monkeypatch.setenv("TINYMOE_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    root = tmp_path / "course"
    source = root / "source" / "lessons"
    source.mkdir(parents=True)
    for nb in LESSONS:
        shutil.copy(nb, source / nb.name)
    config = Config()
    config.CourseDirectory.root = str(root)
    config.CourseDirectory.course_id = "tinymoe"
    config.ClearSolutions.enforce_metadata = False
    config.Execute.timeout = 600
    api = NbGraderAPI(config=config)

    made = api.generate_assignment("lessons", force=True, create=True)
    assert made["success"], made["error"] + made["log"][-3000:]
    released = root / "release" / "lessons"
    assert sorted(p.name for p in released.glob("*.ipynb")) == [p.name for p in LESSONS]
    for lesson in LESSONS:
        ours = json.loads(lesson.read_text(encoding="utf-8"))
        theirs = json.loads((released / lesson.name).read_text(encoding="utf-8"))
        stubs = sum(src.count("raise NotImplementedError()") for src in _code(theirs))
        regions = sum(src.count("### BEGIN SOLUTION") for src in _code(ours))
        assert stubs == regions, f"{lesson.name}: {regions} regions, {stubs} nbgrader stubs"
        text = "\n".join(_code(theirs))
        assert [t for t in _secret_lines(ours, lesson.name) if t in text] == [], lesson.name
        assert "BEGIN HIDDEN TESTS" not in text

    # the released notebooks, submitted as they are, go through nbgrader's autograder
    shutil.copytree(released, root / "submitted" / "student1" / "lessons")
    graded = api.autograde("lessons", "student1", force=True, create=True)
    assert graded["success"], graded["error"] + graded["log"][-3000:]
    for lesson in LESSONS:
        nb = json.loads((root / "autograded" / "student1" / "lessons" / lesson.name)
                        .read_text(encoding="utf-8"))
        errors = [o["ename"] for c in nb["cells"] if c["cell_type"] == "code"
                  for o in c["outputs"] if o["output_type"] == "error"]
        has_stub = any("### BEGIN SOLUTION" in src
                       for src in _code(json.loads(lesson.read_text(encoding="utf-8"))))
        # it really ran: a lesson with exercises stops at nbgrader's stubs, the rest run clean
        if has_stub:
            assert errors and errors[0] == "NotImplementedError", (lesson.name, errors)
        else:
            assert errors == [], (lesson.name, errors)
