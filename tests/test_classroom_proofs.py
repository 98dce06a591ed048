"""CI proofs of the classroom copies (slow): see tinymoe/classroom/proofs.py for the rules.

The student copy's suite runs once per proof, in a subprocess, and each failure is mapped
to the task whose stub raised it. The proofs are first shown to work (and to catch faults)
on the synthetic course tree of test_classroom.py, then applied to this repository, where
they must hold with any number of solution regions, including none.
"""
import importlib.util
import json
from pathlib import Path

import pytest

from tinymoe.classroom.proofs import prove

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _trees():
    """test_classroom.py's synthetic-tree helpers, loaded by path (no sys.path games)."""
    spec = importlib.util.spec_from_file_location(
        "_classroom_trees", Path(__file__).with_name("test_classroom.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trees = _trees()


def test_proofs_hold_on_a_synthetic_course(tmp_path):
    pytest.importorskip("nbclient")
    src = trees.make_tree(tmp_path / "src")
    proof = prove(src, tmp_path / "work", instructor_tests=True)
    assert proof.problems == [], proof.text()
    # the lesson calls add_one before its own exercise: it stops at the library stub
    assert "lessons/00_intro.ipynb: stops at the stub of task0_1" in proof.notes
    run = proof.runs[0]  # the student suite: one run, every task failing at a stub
    assert run.tinymoe_file.startswith(str(tmp_path / "work" / "student"))
    assert {t.nodeid.split("::")[1]: (t.outcome, t.exc_type) for t in run.tests} == {
        "test_add_one": ("failed", "NotImplementedError"),
        "test_double": ("failed", "NotImplementedError"),
        "test_untagged": ("passed", None)}
    assert [t.outcome for t in proof.runs[1].tests] == ["passed"] * 4  # instructor suite


def test_proofs_catch_faults(tmp_path):
    src = trees.make_tree(tmp_path / "src", lesson=False)
    bad = trees.mark('''
        import pytest

        from tinymoe import add_one, double


        @pytest.mark.task0_1
        def test_tagged_but_blind():
            assert True


        @pytest.mark.task0_2
        def test_wrong_error():
            double(None + 1)


        def test_untagged_needs_task0_1():
            assert add_one(1) == 2
        ''')
    (src / "tests" / "test_core.py").write_text(bad)
    (src / "tests" / "test_import.py").write_text("import no_such_module\n")
    problems = "\n".join(prove(src, tmp_path / "work", notebooks=False).problems)
    assert "test_tagged_but_blind: passes against the stubs of task0_1" in problems
    assert "test_wrong_error: fails with TypeError" in problems
    assert "test_untagged_needs_task0_1: an untagged test fails" in problems
    assert "tag it @pytest.mark.task0_1" in problems
    assert "tests/test_import.py: not collectable" in problems
    assert "no test of task0_2 reaches its own stub" in problems


def test_proofs_hold_on_this_repository(tmp_path):
    """The real tree: no leaks, imports, each stubbed task's tests stop at stubs, the rest
    passes, lessons stop at their first stub, the instructor copy is the source."""
    pytest.importorskip("nbclient")
    proof = prove(REPO, tmp_path / "work")
    assert proof.problems == [], proof.text()
    print(proof.text())
    print(json.dumps([t.nodeid for t in proof.runs[0].tests if t.bad], indent=1))
