"""The classroom task registry: one entry per solution region family.

Every ``### BEGIN SOLUTION taskN_M`` region in ``tinymoe/`` and ``lessons/`` names a task
declared here, and every test of that task carries the pytest marker of the same name
(``@pytest.mark.taskN_M``; markers are strict, see ``tests/conftest.py``).

Task ``N_M`` is taught in lesson ``0N``. Points are what ``tinymoe classroom grade`` awards
when all of the task's tests pass.

Rule that keeps grading honest: a test that runs the code of a solution region carries that
region's task marker (it may carry several). Regions therefore sit in functions with few
callers (a loss, an estimator, the NumPy reference of a kernel), never in the autograd engine
that every test runs; the foundation's exercises live in lesson 00 itself.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    title: str
    lesson: str
    points: int


TASKS: dict[str, Task] = {
    # --- lesson 00: the autograd core (exercises in the notebook) -----------------------
    "task0_1": Task("backward by hand through a small graph", "lessons/00_autograd.ipynb", 2),
    "task0_2": Task("a new op: forward and backward of a Function", "lessons/00_autograd.ipynb", 2),
    "task0_3": Task("a central-difference check of your own", "lessons/00_autograd.ipynb", 2),
}
