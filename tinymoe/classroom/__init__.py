"""Classroom tooling: student and instructor copies from solution markers, and grading.

One source tree holds the solutions, between nbgrader-style markers naming a task of
``tinymoe/classroom/registry.py``. From it:

* :func:`student` writes the copy students get: each solution region replaced by a stub
  raising ``NotImplementedError("tinymoe task N_M: <title> — see <lesson>")``, hidden tests
  removed, notebook outputs cleared;
* :func:`instructor` writes the full copy;
* :func:`grade` is the trusted grader: for each task, a child process runs the task's
  probes in the instructor's tree holding only that task's regions from the submission,
  and the parent compares the outputs with the instructor's, printing a table and writing
  GitHub Classroom's results JSON;
* :func:`check` validates every marker and lists tasks and regions;
* :func:`tinymoe.classroom.proofs.prove` proves, for CI, that the copies behave.

Modules: :mod:`.markers` (regions and stubs), :mod:`.copies`, :mod:`.grading` (with
:mod:`.probes`, :mod:`.child` and :mod:`.sandbox`), :mod:`.credit` (the credit matrix),
:mod:`.runner` (pytest in a subprocess with :mod:`.pytest_plugin`, for the proofs),
:mod:`.proofs`, :mod:`.cli`.
The how-to is docs/teaching.md.
"""
from .cli import main_classroom
from .copies import check, instructor, student
from .grading import grade
from .markers import ClassroomError, Region, strip_notebook, strip_python

__all__ = ["ClassroomError", "Region", "check", "grade", "instructor", "main_classroom",
           "strip_notebook", "strip_python", "student"]
