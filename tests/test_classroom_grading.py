"""The trusted grader (tinymoe/classroom/grading.py): hybrid trees, failures that teach, the
student's command, one-line errors.

Submissions are made from this repository by tinymoe.classroom.credit.make_submission
(regions stubbed or planted, marker lines kept, as in the student copy).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinymoe.classroom import main_classroom
from tinymoe.classroom.credit import make_submission, plant
from tinymoe.classroom.grading import (STUDENT_COMMAND, Grader, grade, has_solutions,
                                       write_answers)
from tinymoe.classroom.probes import PROBES
from tinymoe.classroom.registry import TASKS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not has_solutions(REPO), reason="needs the instructor's "
                                "solutions (this tree is a student copy)")


def submission(root: Path, solved=(), planted=None) -> Path:
    with Grader(REPO) as g:
        return make_submission(root, REPO, g.regions, g.tasks, solved=set(solved),
                               planted=planted)


def test_every_task_has_a_probe_and_regions():
    with Grader(REPO) as g:
        assert set(PROBES) == set(TASKS)
        assert all(g.regions[t] for t in TASKS)
        for t, probe in PROBES.items():
            in_notebook = {r.path.endswith(".ipynb") for r in g.regions[t]}
            assert in_notebook == {probe.notebook is not None}, t


def test_plant_changes_the_last_assignment():
    body = ["    x = 1  # one\n", "    y = x * 2\n", "    return y\n"]
    assert plant(body) == ["    x = 1  # one\n", "    y = x * 2 + 1\n", "    return y\n"]
    assert plant(["  return (a, b)\n"]) == ["  return (a, b) + 1\n"]


def test_failures_that_teach_for_a_function_task(tmp_path):
    sub = submission(tmp_path / "s", solved=set(TASKS), planted="task4_3")
    json_path = tmp_path / "g.json"
    report = grade(sub, json_path, tasks=["task4_3", "task4_2"], quiet=True)
    z, other = report.tasks
    assert (z.earned, z.status, other.earned) == (0, "fail", TASKS["task4_2"].points)
    assert "output out (shape ()): max error" in z.notes[0]
    assert "exceeds the tolerance atol=" in z.notes[0]
    entry = json.loads(json_path.read_text())["tests"][0]
    assert entry["name"].startswith("task4_3: ") and entry["score"] == 0
    assert entry["message"].startswith(f"0/{z.cases} cases match; case 0: output out")
    assert entry["test_code"] == STUDENT_COMMAND.format(task="task4_3") == \
        "tinymoe classroom test task4_3"


def test_failures_that_teach_for_a_notebook_exercise(tmp_path):
    """The stubbed exercise cell: its first lines, the error type and message."""
    sub = submission(tmp_path / "s")
    report = grade(sub, tasks=["task0_1"], quiet=True)
    note = report.tasks[0].notes[0]
    assert report.score == 0
    assert "NotImplementedError: tinymoe task 0_1" in note
    assert "in the cell starting: A, B, C = a.numpy(), b.numpy(), c.numpy()" in note


def test_only_the_exercise_cells_count(tmp_path):
    """A cell that fails elsewhere in the notebook, and another task's stub in the same
    notebook, never cost task 0_1 its points."""
    sub = submission(tmp_path / "s", solved={"task0_1"})
    nb_path = sub / "lessons" / "00_autograd.ipynb"
    nb = json.loads(nb_path.read_text())
    nb["cells"].insert(2, {"cell_type": "code", "execution_count": None, "id": "boom",
                           "metadata": {}, "outputs": [], "source": "raise RuntimeError()"})
    nb_path.write_text(json.dumps(nb, indent=1))
    report = grade(sub, tasks=["task0_1", "task0_2"], quiet=True)
    assert [t.earned for t in report.tasks] == [TASKS["task0_1"].points, 0]


def test_missing_marker_or_file_gives_0_with_a_note(tmp_path):
    sub = submission(tmp_path / "s", solved=set(TASKS))
    aux = sub / "tinymoe" / "moe" / "aux_losses.py"
    aux.write_text(aux.read_text().replace("### BEGIN SOLUTION task4_3\n", ""))
    (sub / "tinymoe" / "moe" / "aux_free.py").unlink()
    report = grade(sub, tasks=["task4_3", "task6_3", "task4_2"], quiet=True)
    z, bias, other = report.tasks
    assert (z.earned, bias.earned, other.earned) == (0, 0, TASKS["task4_2"].points)
    assert "tinymoe/moe/aux_losses.py" in z.notes[0] and "found 0" in z.notes[0]
    assert "tinymoe/moe/aux_free.py: missing from the submission" in bias.notes[0]


def test_the_student_command(tmp_path, capsys):
    """``tinymoe classroom test taskN_M`` from the copy's root compares with the answers
    shipped in the copy (public seed) and prints what differed."""
    sub = submission(tmp_path / "s", solved={"task6_3"})
    write_answers(REPO, sub, ["task6_3", "task4_3"])
    cwd = os.getcwd()
    try:
        os.chdir(sub)
        assert main_classroom(["test", "task6_3"]) == 0
        assert main_classroom(["test", "task4_3"]) == 1
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "task6_3" in out and "NotImplementedError: tinymoe task 4_3" in out


def test_pytest_from_the_copy_root_imports_the_copy(tmp_path):
    """pyproject's ``pythonpath = ["."]``: the ``pytest`` command run from a copy's root tests
    the copy's tinymoe even though another tinymoe is installed."""
    pytest_exe = shutil.which("pytest")
    if pytest_exe is None:
        pytest.skip("no pytest command on PATH")
    sub = submission(tmp_path / "s", solved=set(TASKS))
    shutil.copyfile(REPO / "pyproject.toml", sub / "pyproject.toml")
    (sub / "tests").mkdir()
    (sub / "tests" / "test_where.py").write_text(
        "import tinymoe\n\n\ndef test_where():\n"
        f"    assert tinymoe.__file__.startswith({str(sub)!r}), tinymoe.__file__\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([pytest_exe, "-q", "-p", "no:cacheprovider"], cwd=sub, env=env,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-2000:]


@pytest.mark.parametrize("args, message", [
    (["grade", "/no/such/dir"], "error: /no/such/dir: no such directory"),
    (["grade", "tests", "--task", "task9_9"], "error: task9_9: unknown task; known: task0_1"),
    (["grade", "."], "this is the solutions tree itself; pass --solutions DIR"),
    (["grade", "--timeout", "soon"], "--timeout: 'soon' is not a number of seconds > 0"),
    (["grade", "--solutions", "/no/such/dir"], "error: /no/such/dir: no such directory"),
    (["test", "task4_3", "--dir", "/"], "not the root of a tinymoe copy"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_give_one_line_errors(args, message):
    run = subprocess.run([sys.executable, "-m", "tinymoe.classroom", *args], cwd=REPO,
                         capture_output=True, text=True, check=False,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 2
    assert run.stdout == "" and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr


@pytest.mark.skipif(shutil.which("bwrap") is None,
                    reason="bubblewrap (bwrap) is not installed: the bwrap level is skipped")
def test_grading_under_bubblewrap(tmp_path):
    sub = submission(tmp_path / "s", solved={"task4_3"})
    report = grade(sub, tasks=["task4_3", "task4_2"], quiet=True)
    assert [t.earned for t in report.tasks] == [TASKS["task4_3"].points, 0]


SANDBOX_PROBE = r"""
import json, os, socket, sys
hidden, neighbour = sys.argv[1], sys.argv[2]
out = {"hidden": os.listdir(hidden), "neighbour": os.path.exists(neighbour),
       "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
       "nets": sorted(line.split(":")[0].strip() for line in open("/proc/net/dev")
                      if ":" in line)}
try:
    socket.create_connection(("1.1.1.1", 53), timeout=2).close()
    out["network"] = "connected"
except OSError as e:
    out["network"] = type(e).__name__
try:
    open("/usr/tinymoe-sandbox-test", "w").close()
    out["write_system"] = "written"
except OSError as e:
    out["write_system"] = type(e).__name__
with open("mine.txt", "w") as f:  # its own work directory stays writable
    out["write_work"] = f.write("ok")
print(json.dumps(out))
"""


@pytest.mark.skipif(shutil.which("bwrap") is None,
                    reason="bubblewrap (bwrap) is not installed: the bwrap level is skipped")
def test_the_bwrap_level_really_confines_the_child(tmp_path):
    """Under bwrap the child sees neither the instructor's tree (covered) nor a neighbouring
    folder (a fresh /tmp), has no network (its own, empty network namespace), sees only
    its own processes (PID namespace), cannot write the system, can write its work dir."""
    from tinymoe.classroom.sandbox import run_child
    work, neighbour = tmp_path / "work", tmp_path / "other-submission"
    work.mkdir()
    neighbour.mkdir()
    (neighbour / "solution.py").write_text("answer = 42\n")
    run = run_child([sys.executable, "-c", SANDBOX_PROBE, str(REPO), str(neighbour)], work,
                    dict(os.environ), timeout=60, hide=[REPO], use_bwrap=True)
    assert run.returncode == 0 and run.bwrap, run.stderr
    seen = json.loads(run.stdout)
    # only the interpreter's own prefix stays, when it lives inside the tree (CI's venv)
    prefix = Path(sys.prefix)
    kept = [prefix.relative_to(REPO).parts[0]] if REPO in prefix.parents else []
    assert seen["hidden"] == kept and seen["neighbour"] is False
    assert seen["network"] != "connected" and seen["nets"] in ([], ["lo"])
    assert os.getpid() not in seen["pids"] and len(seen["pids"]) <= 3
    assert seen["write_system"] in ("OSError", "PermissionError")
    assert seen["write_work"] == 2 and (work / "mine.txt").read_text() == "ok"
    # the same child without bwrap sees all of it: the level is what hides them
    run = run_child([sys.executable, "-c", SANDBOX_PROBE, str(REPO), str(neighbour)], work,
                    dict(os.environ), timeout=60, hide=[REPO], use_bwrap=False)
    seen = json.loads(run.stdout)
    assert seen["hidden"] != [] and seen["neighbour"] is True and os.getpid() in seen["pids"]
