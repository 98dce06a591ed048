"""``tinymoe classroom``: ``check`` lists what grading runs and the marked tests, for every
task; every bad argument ends in one line ``error: ...`` (exit 2), never a traceback."""
import re
from pathlib import Path

import numpy as np

from tinymoe.classroom.cli import main_classroom
from tinymoe.classroom.copies import check, graded_by
from tinymoe.classroom.probes import PROBES
from tinymoe.classroom.registry import TASKS

REPO = Path(__file__).resolve().parents[1]


def test_check_says_what_grading_runs_for_every_task():
    report = check(REPO, collect=False)
    text = report.text()
    for name in TASKS:
        line = re.search(rf"  {name} .*\n.*\n      graded:  (.*)\n", text).group(1)
        assert line == graded_by(name)
        probe = PROBES[name]
        assert f" {len(probe.cases(np.random.default_rng(0)))} cases" in line
        assert f"rtol={probe.rtol:g}, atol={probe.atol:g}" in line
        if probe.notebook:
            assert probe.notebook in line
    assert "tinymoe.moe.hme.em_step" in report.graded["task2_4"]
    assert "tinymoe.dispatch.kernels.block_counts" in report.graded["task5_1"]
    assert "tinymoe.dispatch.reference.block_starts" in report.graded["task5_2"]
    assert "tinymoe.moe.aux_losses.router_z_loss" in report.graded["task4_3"]


def test_check_lists_the_tests_pytest_marks_for_each_task():
    """Collected by pytest itself: markers set by a helper (test_cli's ``tagged``) count, a
    test of another task does not."""
    files = ("tests/test_hme_1994.py", "tests/test_dispatch_kernels.py", "tests/test_cli.py")
    report = check(REPO, paths=files)
    assert report.problems == []
    names = {t: {n.split("::")[1].split("[")[0] for n in ids} for t, ids in report.tests.items()}
    assert "test_em_step_is_in_place_and_counts_newton_steps" in names["task2_4"]
    assert "test_tour_fast_end_to_end" in names["task2_4"]  # marked by a helper
    assert "test_block_counts_by_hand" in names["task5_1"]
    assert "test_block_counts_by_hand" not in names["task5_2"]
    assert "test_block_starts_is_the_exclusive_prefix_sum" in names["task5_2"]
    assert "test_parallel_positions_equal_the_serial_pass" in names["task5_1"] & names["task5_2"]
    assert "test_weighted_least_squares_is_the_weighted_optimum" not in names["task2_4"]
    assert names["task0_1"] == set()  # lesson 00 is not in these files
    text = report.text()
    assert "tests/test_hme_1994.py (" in text


def bad_invocations(tmp: Path) -> list[list[str]]:
    sub = tmp / "submission"
    sub.mkdir(exist_ok=True)
    copy = tmp / "copy"
    (copy / "tinymoe").mkdir(parents=True, exist_ok=True)
    missing = str(tmp / "nowhere")
    return [
        [], ["bogus"], ["grade", missing], ["grade", str(sub), "--solutions", missing],
        ["grade", str(sub), "--task", "task9_9"], ["grade", str(sub), "--task", "4_3"],
        ["grade", str(sub), "--timeout", "0"], ["grade", str(sub), "--timeout", "-3"],
        ["grade", str(sub), "--timeout", "soon"], ["grade", str(sub), "--timeout", "nan"],
        ["grade", str(sub), "--memory", "0"], ["grade", str(sub), "--memory", "lots"],
        ["grade", str(sub), "--seed", "x"], ["grade", str(sub), "--seed", "-1"],
        ["grade", str(sub), "--json"], ["grade", str(sub), "--json", str(tmp / "no" / "r.json")],
        ["test"], ["test", "task9_9", "--dir", str(copy)], ["test", "task4_3", "--dir", missing],
        ["test", "task4_3", "--dir", str(copy), "--timeout", "0"],
        ["check", missing], ["student", str(tmp / "out"), "--src", missing],
        ["instructor", str(tmp / "out2"), "--src", missing], ["student"],
        ["prove", missing], ["prove", missing, "--credit"], ["prove", str(REPO), "--jobs", "0"],
        ["prove", str(REPO), "--credit", "--jobs", "x"], ["site", missing, str(tmp / "site")],
    ]


def test_every_bad_invocation_is_one_line(tmp_path, capsys):
    for argv in bad_invocations(tmp_path):
        status = main_classroom(argv)
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert status == 2, (argv, status, out, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert "Traceback" not in out + err, argv
