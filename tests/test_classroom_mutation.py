"""The mutation proof (tinymoe/classroom/mutation.py): for every task, the instructor's tree
with only that task's regions stubbed fails the task's graded checks, so no other code in
the tree carries the task's answer. Shown on the synthetic course of test_classroom.py,
then run on this repository (slow: one short pytest run per task)."""
import importlib.util
from pathlib import Path

import pytest

from tinymoe.classroom.copies import build
from tinymoe.classroom.markers import extract_regions, load_tasks
from tinymoe.classroom.mutation import prove_mutations, stub_one_task

REPO = Path(__file__).resolve().parents[1]


def _trees():
    spec = importlib.util.spec_from_file_location(
        "_classroom_trees", Path(__file__).with_name("test_classroom.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trees = _trees()


def test_stub_one_task_stubs_that_task_only(tmp_path):
    src = trees.make_tree(tmp_path / "src")
    tasks = load_tasks(src)
    tree = build(src, student=False, tasks=tasks)
    out = stub_one_task(tree.files, tree.regions, "task0_2", tasks)
    assert sorted(out) == ["lessons/00_intro.ipynb", "tinymoe/core.py"]
    core = out["tinymoe/core.py"].decode()
    answers = {(a.task, a.body.splitlines()[-1].strip()) for a in
               extract_regions(core, "tinymoe/core.py", tasks)}
    assert answers == {("task0_1", "return y"),
                       ("task0_2", trees.STUB2)}
    assert out["tinymoe/core.py"] != tree.files["tinymoe/core.py"]


@pytest.mark.slow
def test_mutation_proof_on_a_synthetic_course(tmp_path):
    src = trees.make_tree(tmp_path / "src", lesson=False)
    proof = prove_mutations(src, tmp_path / "work")
    assert sorted(proof.caught) == ["task0_1", "task0_2"] and proof.problems == {}, proof.text()
    assert "test_add_one stops at the stub" in proof.caught["task0_1"]
    # a task whose tests pass with its stub in place is reported
    (src / "tests" / "test_core.py").write_text(trees.mark('''
        import pytest

        from tinymoe import double


        @pytest.mark.task0_1
        def test_blind():
            assert True


        @pytest.mark.task0_2
        def test_double():
            assert double(3) == 6
        '''))
    proof = prove_mutations(src, tmp_path / "work2")
    assert proof.problems == {"task0_1": "all 1 checks pass with the task stubbed"}
    # any grader can be plugged in as the check
    seen = []
    proof = prove_mutations(src, check=lambda tree, task: (seen.append(task) or True, "ok"))
    assert seen == ["task0_1", "task0_2"] and proof.problems == {}


@pytest.mark.slow
def test_mutation_proof_on_this_repository(tmp_path):
    pytest.importorskip("nbclient")
    proof = prove_mutations(REPO, tmp_path)
    print(proof.text())
    tasks = {r.task for r in build(REPO, student=False).regions if r.kind == "solution"}
    assert set(proof.caught) == tasks and proof.problems == {}, proof.text()
