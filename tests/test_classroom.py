"""The classroom tooling: stripping, copies, check, grading (tinymoe/classroom/).

Everything runs on small synthetic trees built in tmp_path, plus one leak check over the
real repository. The slow end-to-end proofs live in test_classroom_proofs.py.

The marker lines are assembled at run time (``@BEGIN task0_1`` -> the real marker), so this
file, which the stripper also reads when it copies tests/, contains no marker of its own.
"""
import json
import textwrap
from pathlib import Path

import pytest

from tinymoe.classroom import ClassroomError, check, instructor, main_classroom, student
from tinymoe.classroom.copies import build, source_files
from tinymoe.classroom.markers import (Answer, extract_regions, splice_regions, strip_notebook,
                                       strip_python, stub_task)
from tinymoe.classroom.proofs import leaks

REPO = Path(__file__).resolve().parents[1]
SOL = "SOLUTION"
HID = "HIDDEN TESTS"
TOKENS = {"@BEGIN": f"### BEGIN {SOL}", "@END": f"### END {SOL}",
          "@HBEGIN": f"### BEGIN {HID}", "@HEND": f"### END {HID}"}


def mark(text: str) -> str:
    """Dedent and replace the @BEGIN/@END/@HBEGIN/@HEND tokens by the real markers."""
    text = textwrap.dedent(text).lstrip("\n")
    for token in sorted(TOKENS, key=len, reverse=True):
        text = text.replace(token, TOKENS[token])
    return text


class T:  # a stand-in for tinymoe.classroom.registry.Task
    def __init__(self, title, lesson, points):
        self.title, self.lesson, self.points = title, lesson, points


TASKS = {"task0_1": T("add one", "lessons/00_intro.ipynb", 3),
         "task0_2": T("double it", "lessons/00_intro.ipynb", 2)}
STUB1 = 'raise NotImplementedError("tinymoe task 0_1: add one — see lessons/00_intro.ipynb")'
STUB2 = 'raise NotImplementedError("tinymoe task 0_2: double it — see lessons/00_intro.ipynb")'

# ---------------------------------------------------------------- a synthetic course tree

TASKS_PY = '''
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    title: str
    lesson: str
    points: int


TASKS = {
    "task0_1": Task("add one", "lessons/00_intro.ipynb", 3),
    "task0_2": Task("double it", "lessons/00_intro.ipynb", 2),
    "task0_3": Task("no tests yet", "lessons/00_intro.ipynb", 1),
    "task0_4": Task("tests that do not import", "lessons/00_intro.ipynb", 1),
}
'''

CORE_PY = '''
"""A tiny library with two exercises."""


def add_one(x):
    """Return x + 1."""
    @BEGIN task0_1
    y = x + 1  # the secret of task 0_1
    return y
    @END


class Doubler:
    def __call__(self, x):
        @BEGIN task0_2
        return x * 2  # the secret of task 0_2
        @END


double = Doubler()
'''

CONFTEST_PY = '''
from tinymoe.classroom.registry import TASKS


def pytest_configure(config):
    for name, task in TASKS.items():
        config.addinivalue_line("markers", f"{name}: {task.title}")
    config.addinivalue_line("markers", "slow: slow")
'''

TEST_CORE_PY = '''
import pytest

from tinymoe import add_one, double


@pytest.mark.task0_1
def test_add_one():
    assert add_one(1) == 2


@pytest.mark.task0_2
def test_double():
    assert double(3) == 6


def test_untagged():
    assert 1 + 1 == 2


@HBEGIN
@pytest.mark.task0_1
def test_add_one_hidden():
    assert add_one(-1) == 0  # the hidden check
@HEND
'''

PYTEST_INI = "[pytest]\ntestpaths = tests\naddopts = --strict-markers\n"


def notebook(cells) -> dict:
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "language": "python",
                                                        "display_name": "Python 3"}},
            "nbformat": 4, "nbformat_minor": 5}


def code(cid, source, outputs=(), count=None):
    return {"cell_type": "code", "id": cid, "metadata": {"tags": ["keep-me"]},
            "execution_count": count, "outputs": list(outputs), "source": source}


def markdown(cid, source):
    return {"cell_type": "markdown", "id": cid, "metadata": {}, "source": source}


LESSON = notebook([
    markdown("intro", "# Lesson 0\nExercise 0_1 lives in the library."),
    code("imports", "from tinymoe import add_one, double\nprint(add_one(1))",
         outputs=[{"output_type": "stream", "name": "stdout", "text": "2\n"}], count=1),
    code("mine", mark("""
        def triple(x):
            @BEGIN task0_2
            return 3 * x  # the secret of the notebook
            @END
        triple(2)""").rstrip("\n")),
    code("checks", mark("""
        assert triple(1) == 3
        @HBEGIN
        assert triple(0) == 0  # hidden in the notebook
        @HEND""").rstrip("\n")),
])


def make_tree(root: Path, lesson: bool = True) -> Path:
    """Write the synthetic course tree under ``root`` and return it."""
    files = {"tinymoe/__init__.py": "from .core import add_one, double\n",
             "tinymoe/classroom/registry.py": TASKS_PY.lstrip("\n"),
             "tinymoe/core.py": mark(CORE_PY),
             "tests/conftest.py": CONFTEST_PY.lstrip("\n"),
             "tests/test_core.py": mark(TEST_CORE_PY), "pytest.ini": PYTEST_INI,
             "setup.py": "from setuptools import setup\nsetup(name='mini')\n",
             "README.md": "# mini\n", "tinymoe/__pycache__/core.cpython-311.pyc": "junk",
             "mini.egg-info/PKG-INFO": "junk", "docs/_build/index.html": "junk",
             "notes.txt": "not copied\n"}
    if lesson:
        files["lessons/00_intro.ipynb"] = json.dumps(LESSON, indent=2) + "\n"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- stripping .py files

def test_stub_replaces_region_at_marker_indentation():
    src = mark('''
        def f(x):
            """Doc."""
            @BEGIN task0_1
            y = x + 1
            return y
            @END


        class C:
        \tdef g(self):
        \t\t@BEGIN task0_2
        \t\treturn 2
        \t\t@END
        ''')
    new, regions = strip_python(src, path="pkg/mod.py", tasks=TASKS)
    assert new == mark(f'def f(x):\n    """Doc."""\n    @BEGIN task0_1\n    # YOUR CODE HERE\n'
                       f"    {STUB1}\n    @END\n\n\n"
                       f"class C:\n\tdef g(self):\n\t\t@BEGIN task0_2\n\t\t# YOUR CODE HERE\n"
                       f"\t\t{STUB2}\n\t\t@END\n")
    assert strip_python(new, path="pkg/mod.py", tasks=TASKS)[0] == new  # idempotent
    assert [(r.task, r.begin, r.end, r.indent) for r in regions] == [
        ("task0_1", 3, 6, "    "), ("task0_2", 11, 13, "\t\t")]
    assert regions[0].body == ["    y = x + 1", "    return y"]


def test_stub_keeps_crlf_and_untouched_text():
    src = mark("""
        import os\r
        def f():\r
            @BEGIN task0_1\r
            return 1\r
            @END\r
        x = 1  # unrelated\r
        """)
    new, _ = strip_python(src, path="m.py", tasks=TASKS)
    assert new == mark("import os\r\ndef f():\r\n    @BEGIN task0_1\r\n    # YOUR CODE HERE\r\n"
                       f"    {STUB1}\r\n    @END\r\nx = 1  # unrelated\r\n")


def test_stub_message_names_the_task():
    assert stub_task("tinymoe task 0_2: double it — see x", TASKS) == "task0_2"
    assert stub_task("tinymoe task 9_9: who", TASKS) is None
    assert stub_task("something else", TASKS) is None


def test_hidden_tests_are_deleted():
    src = mark("""
        def test_a():
            assert True


        @HBEGIN
        def test_hidden():
            assert False
        @HEND
        def test_b():
            pass
        """)
    new, regions = strip_python(src, path="tests/test_x.py", tasks=TASKS)
    assert new == "def test_a():\n    assert True\n\n\ndef test_b():\n    pass\n"
    assert [r.kind for r in regions] == ["hidden"]


def test_mentions_of_markers_in_strings_are_not_markers():
    src = f'"""Write a line ``### BEGIN {SOL} taskN_M`` above your code."""\nx = "### END {SOL}"\n'
    assert strip_python(src, path="m.py", tasks=TASKS) == (src, [])


# ---------------------------------------------------------------- a student's answers

def test_extract_regions_reads_a_students_answers():
    core = mark(CORE_PY)
    stu, _ = strip_python(core, path="tinymoe/core.py", tasks=TASKS)
    assert extract_regions(stu, "tinymoe/core.py", TASKS) == [
        Answer("task0_1", 0, f"    # YOUR CODE HERE\n    {STUB1}\n"),
        Answer("task0_2", 0, f"        # YOUR CODE HERE\n        {STUB2}\n")]
    # whatever the student writes between the markers is the answer, marker-like text included
    edited = stu.replace(f"    # YOUR CODE HERE\n    {STUB1}\n",
                         mine := "    # I END SOLUTION here\n    y = x + 1\n\n    return y\n")
    assert extract_regions(edited, "tinymoe/core.py", TASKS)[0] == ("task0_1", 0, mine)
    # the inverse: splicing the instructor's bodies back gives the instructor's file
    solved = {(a.task, a.ordinal): a.body for a in extract_regions(core, "c.py", TASKS)}
    assert splice_regions(stu, "c.py", TASKS, solved) == core
    assert splice_regions(core, "c.py", TASKS, {("task0_2", 0): "        return 0"}) == \
        core.replace("return x * 2  # the secret of task 0_2", "return 0")
    with pytest.raises(ClassroomError, match="no such solution region: task0_1 #1"):
        splice_regions(core, "c.py", TASKS, {("task0_1", 1): "pass\n"})


def test_extract_regions_of_a_notebook_counts_regions_per_task():
    nb = notebook([code("a", mark("def f():\n    @BEGIN task0_2\n    return 1\n    @END")),
                   markdown("m", mark("@BEGIN task0_1 in prose is not a region")),
                   code("b", mark("def g():\n    @BEGIN task0_2\n    return 2\n    @END\n"))])
    text = json.dumps(nb)
    assert extract_regions(text, "n.ipynb", TASKS) == [
        Answer("task0_2", 0, "    return 1\n"), Answer("task0_2", 1, "    return 2\n")]
    new = splice_regions(text, "n.ipynb", TASKS, {("task0_2", 1): "    return 3\n"})
    assert [a.body for a in extract_regions(new, "n.ipynb", TASKS)] == \
        ["    return 1\n", "    return 3\n"]


STUDENT_DAMAGE = {
    "no end": ("def f():\n    @BEGIN task0_1\n    return 1\n", 2, "has no '### END SOLUTION'"),
    "end damaged": ("def f():\n    @BEGIN task0_1\n    return 1\n    ## END SOLUTION\n", 2,
                    "line 4 looks like a damaged marker"),
    "begin deleted": ("def f():\n    return 1\n    @END\n", 3, "restore the BEGIN"),
    "next begin": ("@BEGIN task0_1\n@BEGIN task0_2\n@END\n", 1, "before the next"),
    "task renamed": ("@BEGIN task0_9\n@END\n", 1, "unknown task 'task0_9'"),
    "task deleted": ("@BEGIN\n@END\n", 1, "without a task name"),
}


@pytest.mark.parametrize("case", sorted(STUDENT_DAMAGE))
def test_extract_regions_names_damaged_markers(case):
    text, line, words = STUDENT_DAMAGE[case]
    with pytest.raises(ClassroomError) as e:
        extract_regions(mark(text), "tinymoe/core.py", TASKS)
    assert str(e.value).startswith(f"tinymoe/core.py:{line}: ") and words in str(e.value)


# ---------------------------------------------------------------- errors name file and line

ERRORS = {
    "nested": ("def f():\n    @BEGIN task0_1\n    @BEGIN task0_2\n", 3, "nested region"),
    "unterminated": ("def f():\n    @BEGIN task0_1\n    return 1\n", 2, "unterminated"),
    "stray end": ("def f():\n    return 1\n    @END\n", 3, "stray"),
    "unknown task": ("def f():\n    @BEGIN task7_7\n    @END\n", 2, "unknown task 'task7_7'"),
    "no task name": ("def f():\n    @BEGIN\n    @END\n", 2, "needs a task name"),
    "wrong end": ("def f():\n    @BEGIN task0_1\n    @HEND\n", 3, "which needs"),
    "malformed": (f"def f():\n    # BEGIN {SOL} task0_1\n", 2, "malformed marker"),
    "trailing text": ("def f():\n    @BEGIN task0_1 please\n", 2, "malformed marker"),
    "module level": ("@BEGIN task0_1\nx = 1\n@END\n", 1, "outside a function body"),
    "cuts a block": ("def f(x):\n    if x:\n    @BEGIN task0_1\n        return 1\n    @END\n",
                     3, "would not parse"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors_name_file_and_line(case):
    text, line, words = ERRORS[case]
    with pytest.raises(ClassroomError) as e:
        strip_python(mark(text), path="pkg/mod.py", tasks=TASKS)
    assert e.value.path == "pkg/mod.py" and e.value.line == line
    assert str(e.value).startswith(f"pkg/mod.py:{line}: ") and words in str(e.value)


def test_notebook_errors_name_cell_and_line():
    nb = notebook([markdown("a", "hi"), code("b", mark("x = 1\n@END"))])
    with pytest.raises(ClassroomError, match=r"^lessons/n\.ipynb: cell 1, line 2: stray"):
        strip_notebook(json.dumps(nb), path="lessons/n.ipynb", tasks=TASKS)


# ---------------------------------------------------------------- notebooks

def test_notebook_cell_by_cell():
    new, regions = strip_notebook(json.dumps(LESSON), path="lessons/00_intro.ipynb", tasks=TASKS)
    nb = json.loads(new)
    assert [c["id"] for c in nb["cells"]] == ["intro", "imports", "mine", "checks"]
    assert nb["cells"][0] == {**LESSON["cells"][0],
                              "source": ["# Lesson 0\n", "Exercise 0_1 lives in the library."]}
    codes = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in codes)
    assert all(c["metadata"] == {"tags": ["keep-me"]} for c in codes)
    assert "".join(nb["cells"][2]["source"]) == mark(
        f"def triple(x):\n    @BEGIN task0_2\n    # YOUR CODE HERE\n    {STUB2}\n    @END\n"
        "triple(2)")
    assert "".join(nb["cells"][3]["source"]) == "assert triple(1) == 3"
    assert [(r.kind, r.cell, r.begin) for r in regions] == [("solution", 2, 2), ("hidden", 3, 2)]
    assert new.endswith("}\n") and "\n \"cells\": [\n" in new  # nbformat's layout


def test_notebook_dump_matches_nbformat():
    nbformat = pytest.importorskip("nbformat")
    new, _ = strip_notebook(json.dumps(LESSON), path="n.ipynb", tasks=TASKS)
    assert nbformat.writes(nbformat.reads(new, as_version=4)) + "\n" == new


# ---------------------------------------------------------------- copies

def test_student_and_instructor_copies(tmp_path):
    src = make_tree(tmp_path / "src")
    student(tmp_path / "stu", src)
    instructor(tmp_path / "ins", src)
    expected = ["README.md", "lessons/00_intro.ipynb", "pytest.ini", "setup.py",
                "tests/conftest.py", "tests/test_core.py", "tinymoe/__init__.py",
                "tinymoe/classroom/registry.py", "tinymoe/core.py"]
    assert source_files(src) == expected
    stu, ins = tree_bytes(tmp_path / "stu"), tree_bytes(tmp_path / "ins")
    assert sorted(stu) == sorted(ins) == expected
    assert ins == {rel: (src / rel).read_bytes() for rel in expected}
    core = stu["tinymoe/core.py"].decode()
    assert mark(f'def add_one(x):\n    """Return x + 1."""\n    @BEGIN task0_1\n'
                f"    # YOUR CODE HERE\n    {STUB1}\n    @END\n") in core
    assert "secret" not in core
    assert f"        {STUB2.replace('double it', 'double it')}\n" in core
    tests = stu["tests/test_core.py"].decode()
    assert "test_add_one_hidden" not in tests and "def test_untagged" in tests
    lesson = stu["lessons/00_intro.ipynb"].decode()
    assert "secret" not in lesson and "hidden in the notebook" not in lesson
    assert "keep-me" in lesson and '"outputs": []' in lesson
    assert stu["README.md"] == ins["README.md"]


def test_regeneration_is_byte_identical(tmp_path):
    src = make_tree(tmp_path / "src")
    student(tmp_path / "a", src)
    student(tmp_path / "b", src)
    first = tree_bytes(tmp_path / "a")
    assert first == tree_bytes(tmp_path / "b")
    # --force regenerates in place: the copy's own entries are replaced, stale files go,
    # and what the copy does not own (a template repo's .git, .github) stays.
    (tmp_path / "a" / ".github").mkdir()
    (tmp_path / "a" / ".github" / "classroom.yml").write_text("keep\n")
    (tmp_path / "a" / "tests" / "test_stale.py").write_text("stale\n")
    student(tmp_path / "a", src, force=True)
    again = tree_bytes(tmp_path / "a")
    assert again.pop(".github/classroom.yml") == b"keep\n"
    assert again == first


def test_copies_refuse_bad_destinations(tmp_path):
    src = make_tree(tmp_path / "src")
    for out in (src, src / "tinymoe" / "copy", src / "tests", tmp_path):
        with pytest.raises(ClassroomError, match="refusing"):
            student(out, src, force=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ClassroomError, match="not empty; pass --force"):
        instructor(tmp_path / "full", src)
    student(src / "build" / "student", src)  # inside the source tree but outside its entries
    assert (src / "build" / "student" / "tinymoe" / "core.py").is_file()


def test_bad_marker_writes_nothing(tmp_path):
    src = make_tree(tmp_path / "src")
    (src / "tinymoe" / "broken.py").write_text(mark("def f():\n    @BEGIN task0_1\n"))
    with pytest.raises(ClassroomError, match=r"tinymoe/broken\.py:2: unterminated"):
        student(tmp_path / "out", src)
    assert not (tmp_path / "out").exists()
    assert main_classroom(["student", str(tmp_path / "out"), "--src", str(src)]) == 2


def test_no_region_line_leaks(tmp_path):
    src = make_tree(tmp_path / "src")
    stu, ins = build(src, student=True), build(src, student=False)
    assert len(stu.regions) == 5 and leaks(ins.files, stu.files, stu.regions) == []
    # the check itself notices a leak
    bad = dict(stu.files)
    bad["tinymoe/core.py"] += b"y = x + 1  # the secret of task 0_1\n"
    assert len(leaks(ins.files, bad, stu.regions)) == 1


def test_check_lists_tasks_and_regions(tmp_path, capsys):
    src = make_tree(tmp_path / "src")
    assert main_classroom(["check", str(src)]) == 0
    out = capsys.readouterr().out
    assert "regions: tinymoe/core.py:6-9" in out and "tests:   tests/test_core.py" in out
    assert "lessons/00_intro.ipynb[cell 2]:2-4" in out and "3 solution regions in 2 files" in out
    (src / "tinymoe" / "bad.py").write_text(mark("def f():\n    @END\n"))
    report = check(src)
    assert [(p.path, p.line) for p in report.problems] == [("tinymoe/bad.py", 2)]
    assert main_classroom(["check", str(src)]) == 1


def test_real_repo_student_copy_has_no_solutions():
    """For every region of the repository, no line of its body survives in the student copy.

    (Building the copy also validates every marker against tinymoe/classroom/registry.py.)
    """
    stu, ins = build(REPO, student=True), build(REPO, student=False)
    assert sorted(stu.files) == sorted(ins.files)
    assert leaks(ins.files, stu.files, stu.regions) == []


def test_bad_arguments_give_one_line_errors(tmp_path, capsys):
    src = make_tree(tmp_path / "src", lesson=False)
    (tmp_path / "file").write_text("x\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x\n")
    broken = make_tree(tmp_path / "broken", lesson=False)
    (broken / "tinymoe" / "classroom" / "registry.py").write_text("TASKS = {\n")
    cases = [
        (["student", str(tmp_path / "o1"), "--src", str(tmp_path / "nowhere")],
         "no such directory"),
        (["instructor", str(tmp_path / "o2"), "--src", str(tmp_path / "file")], "not a directory"),
        (["student", str(tmp_path / "o3"), "--src", str(tmp_path / "full")],
         "not a tinymoe source tree"),
        (["student", str(src / "tests" / "x"), "--src", str(src)], "inside the source's tests"),
        (["student", str(src), "--src", str(src)], "into the source tree itself"),
        (["instructor", str(tmp_path / "full"), "--src", str(src)], "not empty; pass --force"),
        (["student", str(tmp_path / "file"), "--src", str(src)], "not a directory"),
        (["student", str(tmp_path / "o4"), "--src", str(broken)], "task registry does not load"),
        (["check", str(tmp_path / "nowhere")], "no such directory"),
        (["check", str(broken)], "task registry does not load"),
    ]
    for argv, words in cases:
        assert main_classroom(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4"))
    assert (tmp_path / "file").read_text() == "x\n"


def test_a_student_copy_of_a_student_copy_is_the_same_and_leaks_nothing(tmp_path):
    src = make_tree(tmp_path / "src")
    student(tmp_path / "a", src)
    student(tmp_path / "b", tmp_path / "a")
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    stu, ins = build(tmp_path / "a", student=True), build(tmp_path / "a", student=False)
    assert len(stu.regions) == 3 and leaks(ins.files, stu.files, stu.regions) == []
