"""No answers in the student copy (issue 12, point 7): the copy generated from this repository
holds no line of any task's solution anywhere (another module, a Numba twin, a test, a doc,
a notebook), and no compiled file (``.pyc``, Numba's ``.nbi``/``.nbc`` cache) that would
carry the instructor's code in compiled form.

A solution line counts when it has 20 or more non-space characters; it is searched for with
all white space removed, in every file of the copy (notebooks by their cells' sources)."""
import json
import py_compile
import re
from pathlib import Path

import pytest

from tinymoe.classroom.copies import build, instructor, student
from tinymoe.classroom.grading import has_solutions
from tinymoe.classroom.markers import load_tasks

REPO = Path(__file__).resolve().parents[1]
COMPILED = (".pyc", ".pyo", ".nbi", ".nbc", ".so")
MIN_CHARS = 20


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def solution_lines(src: Path) -> dict[str, set[str]]:
    """task -> the squashed lines of its solution regions with >= MIN_CHARS characters."""
    tree = build(src, student=False, tasks=load_tasks(src))
    out: dict[str, set[str]] = {}
    for r in tree.regions:
        if r.kind != "solution":
            continue
        for line in r.body:
            code = _squash(line.split("#", 1)[0] if not line.lstrip().startswith("#") else "")
            if len(code) >= MIN_CHARS:
                out.setdefault(r.task, set()).add(code)
    return out


def _texts(root: Path):
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        data = path.read_bytes()
        if path.suffix == ".ipynb":
            cells = json.loads(data.decode("utf-8"))["cells"]
            yield rel, "".join("".join(c["source"]) + "\n" for c in cells)
        else:
            yield rel, data.decode("utf-8", errors="replace")


def find_answers(copy: Path, answers: dict[str, set[str]]) -> list[str]:
    found = []
    for rel, text in _texts(copy):
        squashed = _squash(text)
        for task, lines in sorted(answers.items()):
            found += [f"{rel}: {task}: {line}" for line in sorted(lines) if line in squashed]
    return found


pytestmark = pytest.mark.skipif(not has_solutions(REPO),
                                reason="needs the instructor's solutions (this is a student copy)")


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "copy"
    student(out, REPO)
    return out


def test_the_search_finds_a_planted_answer(copy, tmp_path):
    answers = solution_lines(REPO)
    assert set(answers) >= {"task2_4", "task5_1", "task6_2"}, sorted(answers)
    task, line = "task6_2", sorted(answers["task6_2"])[0]
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "helper.py").write_text("x = 1\n" + line + "\n")
    assert find_answers(planted, answers) == [f"helper.py: {task}: {line}"]


def test_no_task_answer_anywhere_in_the_student_copy(copy):
    answers = solution_lines(REPO)
    found = find_answers(copy, answers)
    assert found == [], "answers in the student copy:\n" + "\n".join(found)


def test_no_compiled_files_in_the_student_copy(copy, tmp_path):
    compiled = [p.relative_to(copy).as_posix() for p in copy.rglob("*")
                if p.name.endswith(COMPILED) or p.name == "__pycache__"]
    assert compiled == []
    # an instructor tree full of caches (imported, kernels compiled): the copy leaves them out
    src = tmp_path / "instructor"
    instructor(src, REPO)
    py_compile.compile(str(src / "tinymoe" / "dispatch" / "kernels.py"), doraise=True)
    cache = src / "tinymoe" / "dispatch" / "__pycache__"
    (cache / "kernels._count_block-81.py311.nbi").write_bytes(b"index")
    (cache / "kernels._count_block-81.py311.1.nbc").write_bytes(b"machine code")
    assert any(cache.glob("kernels.*.pyc"))
    out = tmp_path / "student"
    student(out, src)
    assert [p.name for p in out.rglob("*") if p.name.endswith(COMPILED)
            or p.name == "__pycache__"] == []
    assert find_answers(out, solution_lines(src)) == []
