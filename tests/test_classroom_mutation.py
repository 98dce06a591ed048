"""The mutation proof (tinymoe/classroom/mutation.py) with the trusted grader: for every task
of the registry, a submission with the task's regions stubbed, and one with a planted error,
earn 0 of the task's points from its probe."""
from pathlib import Path

import pytest

from tinymoe.classroom.grading import has_solutions, solution_regions
from tinymoe.classroom.markers import extract_regions, load_tasks
from tinymoe.classroom.mutation import mutant_files, prove_mutations
from tinymoe.classroom.registry import TASKS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not has_solutions(REPO),
                                reason="needs the instructor's solutions (this is a student copy)")


def test_mutants_change_that_task_only():
    tasks = load_tasks(REPO)
    regions = solution_regions(REPO, tasks)["task4_1"]
    for variant in ("stubbed", "planted"):
        files = mutant_files(REPO, regions, "task4_1", tasks, variant)
        assert list(files) == ["tinymoe/moe/capacity.py"]
        text = files["tinymoe/moe/capacity.py"].decode()
        original = (REPO / "tinymoe" / "moe" / "capacity.py").read_text()
        assert text != original
        mine = extract_regions(text, "tinymoe/moe/capacity.py", tasks)
        theirs = extract_regions(original, "tinymoe/moe/capacity.py", tasks)
        changed = [a.task for a, b in zip(mine, theirs) if a.body != b.body]
        assert changed and set(changed) == {"task4_1"}
        if variant == "stubbed":
            assert all("raise NotImplementedError" in a.body for a in mine)
        else:
            assert sum("+ 1" in a.body for a in mine) == 1


def test_a_check_that_passes_the_mutants_is_reported(tmp_path):
    proof = prove_mutations(REPO, tmp_path, only=["task4_3", "task9_9"],
                            check=lambda sub, task: (False, "all cases match"))
    assert proof.caught == {}
    assert proof.problems == {"task4_3": "stubbed: all cases match",
                              "task9_9": "has no solution region"}


@pytest.mark.slow
def test_mutation_proof_on_every_task_with_the_probe_grader(tmp_path):
    """Fast mode (stubbed regions): every task of the registry, one graded run each; the
    planted errors are the credit matrix's "planted" row (tests/test_classroom_credit.py)."""
    proof = prove_mutations(REPO, tmp_path, jobs=2, variants=("stubbed",))
    print(proof.text())
    assert set(proof.caught) == set(TASKS) and proof.problems == {}, proof.text()
    for task, detail in proof.caught.items():
        assert detail.startswith("stubbed: 0/") and "NotImplementedError" in detail, detail


def test_planted_errors_are_caught_too(tmp_path):
    """Full mode on two tasks: a stub and a planted ``+ 1`` each earn 0 (task 2_4's planted
    error lands in the Newton-step count it returns)."""
    proof = prove_mutations(REPO, tmp_path, only=["task2_4", "task5_2"])
    assert proof.problems == {} and sorted(proof.caught) == ["task2_4", "task5_2"], proof.text()
    assert all("; planted: " in d for d in proof.caught.values()), proof.text()
