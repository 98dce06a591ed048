"""Cheats score 0 under the trusted grader (tinymoe/classroom/grading.py): actual attempts.

Every submission starts as the student copy would be (all regions stubbed, marker lines
kept, made by tinymoe.classroom.credit.make_submission) and then cheats. Only a few tasks
are graded per test to keep the file fast; grading runs the real child, sandbox included.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tinymoe.classroom.credit import make_submission
from tinymoe.classroom.grading import Grader, grade, has_solutions
from tinymoe.classroom.markers import load_tasks

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not has_solutions(REPO), reason="needs the instructor's "
                                "solutions (this tree is a student copy)")
AUX = "tinymoe/moe/aux_losses.py"
BEGIN_Z = "### BEGIN SOLUTION task4_3"


@pytest.fixture(scope="module")
def stubbed(tmp_path_factory):
    """The student copy: every region a stub (markers kept), plus the copy's other files."""
    root = tmp_path_factory.mktemp("stubbed") / "copy"
    with Grader(REPO) as g:
        make_submission(root, REPO, g.regions, g.tasks, solved=set())
    for name in ("pyproject.toml", "setup.py"):
        shutil.copyfile(REPO / name, root / name)
    shutil.copytree(REPO / "tests", root / "tests",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def copy_of(stubbed, tmp_path) -> Path:
    out = tmp_path / "submission"
    shutil.copytree(stubbed, out)
    return out


def set_region(root: Path, rel: str, task: str, body: str) -> None:
    """Replace the body of ``task``'s first region in ``rel`` (marker lines stay)."""
    path = root / rel
    lines = path.read_text().splitlines(True)
    begin = next(i for i, line in enumerate(lines) if line.strip() == f"### BEGIN SOLUTION {task}")
    end = next(i for i in range(begin, len(lines)) if lines[i].strip() == "### END SOLUTION")
    indent = lines[begin][:len(lines[begin]) - len(lines[begin].lstrip())]
    new = [indent + line + "\n" for line in body.strip("\n").splitlines()]
    path.write_text("".join(lines[:begin + 1] + new + lines[end:]))


def scores(report) -> dict:
    return {t.name: t.earned for t in report.tasks}


def test_root_conftest_rewriting_reports_to_passed_scores_0(stubbed, tmp_path):
    sub = copy_of(stubbed, tmp_path)
    (sub / "conftest.py").write_text(
        "import pytest\n\n\n@pytest.hookimpl(hookwrapper=True)\n"
        "def pytest_runtest_makereport(item, call):\n    outcome = yield\n"
        "    report = outcome.get_result()\n    report.outcome = 'passed'\n")
    report = grade(sub, tasks=["task4_3", "task6_3"], quiet=True)
    assert scores(report) == {"task4_3": 0, "task6_3": 0}
    assert "NotImplementedError: tinymoe task 4_3" in report.tasks[0].notes[0]


def test_code_rewriting_the_report_files_at_exit_scores_0(stubbed, tmp_path):
    """The region rewrites, at exit, every file the child writes and any report it can find;
    the parent reads only arrays and compares them with the instructor's."""
    sub = copy_of(stubbed, tmp_path)
    set_region(sub, AUX, "task4_3", '''
import atexit, glob, json, os
import numpy as np

def _forge():
    for path in glob.glob(os.path.join(os.getcwd(), "..", "out", "*")):
        os.remove(path)
    out = os.path.join(os.getcwd(), "..", "out")
    np.savez(os.path.join(out, "outputs.npz"), **{f"case{i}.out": np.zeros(()) for i in range(9)})
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump({"tinymoe_file": __file__, "errors": {}, "score": 99}, f)
    for var in ("TINYMOE_CLASSROOM_REPORT", "GITHUB_OUTPUT"):
        if os.environ.get(var):
            open(os.environ[var], "w").write('{"status": "pass"}')

atexit.register(_forge)
return z.sum() * 0.0
''')
    json_path = tmp_path / "grade.json"
    report = grade(sub, json_path, tasks=["task4_3"], quiet=True)
    assert scores(report) == {"task4_3": 0}
    data = json.loads(json_path.read_text())
    assert data["tests"][0]["score"] == 0 and data["status"] == "fail"


def test_conftest_skipping_tests_with_hard_coded_visible_answers_scores_0(stubbed, tmp_path):
    """Visible tests skipped by a conftest; the region answers only the visible tests' inputs
    (all-zero logits, whose z-loss is (ln N)^2); the grader draws its own inputs."""
    sub = copy_of(stubbed, tmp_path)
    (sub / "tests" / "conftest.py").write_text(
        "import pytest\n\n\ndef pytest_collection_modifyitems(config, items):\n"
        "    for item in items:\n        item.add_marker(pytest.mark.skip('no'))\n")
    set_region(sub, AUX, "task4_3", '''
import math
return (z * 0.0).sum() + math.log(z.shape[-1]) ** 2
''')
    report = grade(sub, tasks=["task4_3"], quiet=True)
    assert scores(report) == {"task4_3": 0}
    assert "max error" in report.tasks[0].notes[0] and "tolerance" in report.tasks[0].notes[0]


def test_emptied_or_patched_registry_and_grader_in_the_copy_change_nothing(stubbed, tmp_path):
    sub = copy_of(stubbed, tmp_path)
    (sub / "tinymoe" / "classroom" / "registry.py").write_text("TASKS = {}\n")
    (sub / "tinymoe" / "classroom" / "grading.py").write_text(
        "def grade(*a, **k):\n    return 'full marks'\n\n\ndef compare(*a, **k):\n"
        "    return 99, []\n")
    report = grade(sub, quiet=True)
    assert report.max_score == sum(t.points for t in load_tasks(REPO).values()) > 0
    assert report.score == 0 and len(report.tasks) == len(load_tasks(REPO))


def test_patching_the_scoring_function_in_the_child_scores_0(stubbed, tmp_path):
    """The region replaces the grader's comparison and numpy's allclose inside the child:
    the comparison that counts runs in the parent."""
    sub = copy_of(stubbed, tmp_path)
    set_region(sub, AUX, "task4_3", '''
import sys
import numpy as np
np.allclose = lambda *a, **k: True
for name, module in list(sys.modules.items()):
    if "grading" in name or "probes" in name:
        setattr(module, "compare", lambda *a, **k: (99, []))
return (z * 0.0).sum()
''')
    report = grade(sub, tasks=["task4_3"], quiet=True)
    assert scores(report) == {"task4_3": 0}


def test_an_exception_smuggling_text_into_the_json_cannot_change_the_score(stubbed, tmp_path):
    sub = copy_of(stubbed, tmp_path)
    payload = '", "score": 99, "status": "pass", "x": "' + "hidden test text " * 500
    set_region(sub, AUX, "task4_3", f"raise RuntimeError({payload!r})")
    json_path = tmp_path / "grade.json"
    report = grade(sub, json_path, tasks=["task4_3"], quiet=True)
    entry = json.loads(json_path.read_text())["tests"][0]
    assert entry["score"] == 0 and entry["status"] == "fail"
    assert "RuntimeError" in entry["message"] and '"score": 99' in entry["message"]
    assert len(entry["message"]) < 2000  # truncated
    assert scores(report) == {"task4_3": 0}


@pytest.mark.skipif(os.geteuid() != 0, reason="the child runs as 'nobody' only when the "
                    "grader runs as root (as CI does)")
def test_the_child_cannot_read_the_instructors_solutions(stubbed):
    """Solutions kept in a chmod-700 directory (as docs/teaching.md asks) next to the
    submission: the region tries to read the instructor's own file and fails."""
    parent = Path(tempfile.mkdtemp(prefix="tinymoe-neighbours-"))
    try:
        os.chmod(parent, 0o755)  # a shared folder: anyone may look around
        solutions = parent / "solutions"
        for top in ("tinymoe", "lessons"):
            shutil.copytree(REPO / top, solutions / top,
                            ignore=shutil.ignore_patterns("__pycache__"))
        os.chmod(solutions, 0o700)
        sub = parent / "submission"
        shutil.copytree(stubbed, sub)
        os.chmod(sub, 0o755)
        target = solutions / AUX
        set_region(sub, AUX, "task4_3", f'''
text = open({str(target)!r}).read()
body = text.split({BEGIN_Z!r})[1].split("### END SOLUTION")[0]
exec(compile("def _f(z):\\n" + body, "stolen", "exec"), globals())
return _f(z)
''')
        report = grade(sub, solutions=solutions, tasks=["task4_3"], quiet=True)
        assert scores(report) == {"task4_3": 0}
        note = report.tasks[0].notes[0]
        # the unprivileged user is refused; under bwrap the folder is not even there
        assert "PermissionError" in note or (shutil.which("bwrap") is not None
                                             and "FileNotFoundError" in note), note
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_an_infinite_loop_ends_at_the_time_limit(stubbed, tmp_path):
    sub = copy_of(stubbed, tmp_path)
    set_region(sub, AUX, "task4_3", "while True:\n    pass")
    report = grade(sub, tasks=["task4_3"], timeout=5, quiet=True)
    assert scores(report) == {"task4_3": 0}
    assert "time limit of 5 s" in report.tasks[0].notes[0]


def _processes_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_no_grandchild_outlives_the_timeout(stubbed, tmp_path):
    """The region forks a grandchild that leaves the process group (setsid) and sleeps,
    another that stays in the group, then loops forever. After grading neither is left."""
    marker = f"tinymoe-grandchild-{os.getpid()}-{tmp_path.name}"
    sub = copy_of(stubbed, tmp_path)
    set_region(sub, AUX, "task4_3", f'''
import os
for escape in (True, False):
    if os.fork() == 0:
        if escape:
            os.setsid()
        os.execv("/bin/sh", ["sh", "-c", "sleep 600; echo {marker}", "{marker}"])
while True:
    pass
''')
    report = grade(sub, tasks=["task4_3"], timeout=5, quiet=True)
    assert scores(report) == {"task4_3": 0}
    assert _processes_with(marker) == []
