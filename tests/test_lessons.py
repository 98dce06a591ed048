"""The lesson notebooks: committed without outputs, and each one runs end to end.

Notebooks run in fast mode (``TINYMOE_FAST=1``) with the working directory set to
``lessons/``. A notebook's test carries the markers of the tasks taught in it, since its
exercise cells run those tasks' solution regions.
"""
import json
from pathlib import Path

import pytest

from tinymoe.classroom.registry import TASKS

LESSONS = Path(__file__).resolve().parent.parent / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("*.ipynb"))


def _param(path: Path):
    marks = [getattr(pytest.mark, name) for name, task in TASKS.items()
             if Path(task.lesson).name == path.name]
    return pytest.param(path, id=path.stem, marks=marks + [pytest.mark.slow])


def test_there_are_lessons():
    assert any(p.name.startswith("00_") for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.parametrize("path", [_param(p) for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("TINYMOE_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(LESSONS)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
