"""The credit matrix in its fast mode (tinymoe/classroom/credit.py): for every task t, a copy
with only t solved earns t's points, all but t solved loses t's points, a planted error in t
loses t's points. It runs the real grader on 3 submissions per task."""
import json
from pathlib import Path

import pytest

from tinymoe.classroom.credit import credit_matrix
from tinymoe.classroom.grading import has_solutions
from tinymoe.classroom.registry import TASKS

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not has_solutions(REPO), reason="needs the instructor's solutions (this is a student copy)")]


def test_credit_is_exact_per_task(tmp_path):
    record = tmp_path / "credit.json"
    matrix = credit_matrix(REPO, record=record)
    assert matrix.problems == [], matrix.text()
    assert len(matrix.rows) == 3 * len(TASKS)
    rows = {(r.task, r.state): r for r in matrix.rows}
    for t, task in TASKS.items():
        assert rows[t, "only"].earned == {t: task.points}
        assert rows[t, "all_but"].earned == {t: 0}
        assert rows[t, "planted"].earned == {t: 0}
        assert any("max error" in n or "Error" in n for n in rows[t, "planted"].notes[t])
    data = json.loads(record.read_text())
    assert data["full"] is False and data["problems"] == [] and \
        len(data["rows"]) == 3 * len(TASKS)
