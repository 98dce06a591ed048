"""Student and instructor copies of a tinymoe source tree, and ``check``.

Both copies take the same files: the package, tests, lessons, benchmarks, docs and the
top-level build and readme files, skipping caches and build outputs. The instructor copy is
those files byte for byte; the student copy has every solution region replaced by its stub
and every hidden-test region deleted (:mod:`.markers`), and its notebooks have no outputs.

Everything is transformed in memory and validated before anything is written, in sorted
order, so a bad marker leaves no half-written copy and regenerating gives identical bytes.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .markers import ClassroomError, Region, load_tasks, strip_file

COPY_DIRS = ("tinymoe", "tests", "lessons", "benchmarks", "docs")
COPY_FILES = ("setup.py", "pyproject.toml", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE",
              "CHANGELOG.md", "pytest.ini", ".gitignore")
SKIP_DIRS = {"__pycache__", ".git", ".pytest_cache", ".hypothesis", ".ipynb_checkpoints",
             ".mypy_cache", ".ruff_cache", "_build", "build", "dist", ".venv"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".nbi", ".nbc", ".egg-info")


def source_files(src) -> list[str]:
    """The files a copy takes, as sorted POSIX paths relative to ``src``."""
    src = Path(src)
    if not src.exists():
        raise ClassroomError(str(src), None, "no such directory")
    if not src.is_dir():
        raise ClassroomError(str(src), None, "not a directory")
    if not (src / "tinymoe").is_dir():
        raise ClassroomError(str(src), None, "not a tinymoe source tree (no tinymoe/ package)")
    found = [name for name in COPY_FILES if (src / name).is_file()]
    for top in COPY_DIRS:
        for dirpath, dirnames, filenames in os.walk(src / top):
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in SKIP_DIRS and not d.endswith(SKIP_SUFFIXES))
            rel = Path(dirpath).relative_to(src)
            found += [(rel / f).as_posix() for f in filenames if not f.endswith(SKIP_SUFFIXES)]
    return sorted(found)


@dataclass
class Tree:
    """A copy in memory: file contents by relative path, and the regions found."""

    files: dict[str, bytes]
    regions: list[Region] = field(default_factory=list)
    problems: list[ClassroomError] = field(default_factory=list)


def build(src, *, student: bool, tasks: Mapping[str, object] | None = None,
          keep_going: bool = False) -> Tree:
    """Read and validate every file; strip them for the student copy.

    Raises the first :class:`ClassroomError`, or with ``keep_going`` records one per file.
    """
    src = Path(src)
    tasks = load_tasks(src) if tasks is None else tasks
    tree = Tree({})
    for rel in source_files(src):
        data = (src / rel).read_bytes()
        try:
            stripped, regions = strip_file(rel, data, tasks)
        except ClassroomError as e:
            if not keep_going:
                raise
            tree.problems.append(e)
            stripped, regions = data, []
        tree.files[rel] = stripped if student else data
        tree.regions += regions
    return tree


def write_tree(tree: Tree, out, src, *, force: bool = False) -> None:
    """Write ``tree`` under ``out``; refuse the source tree and non-empty dirs unless forced.

    ``force`` replaces only the entries a copy owns (``tinymoe/``, ``tests/``, ...) and
    keeps the rest, e.g. the ``.git`` and ``.github`` of a GitHub Classroom template repo.
    """
    out, src = Path(out).resolve(), Path(src).resolve()
    if out == src or src.is_relative_to(out):
        raise ClassroomError(str(out), None, "refusing to write into the source tree itself")
    for top in COPY_DIRS + COPY_FILES:
        if out.is_relative_to(src / top):
            raise ClassroomError(str(out), None, f"refusing to write inside the source's {top}")
    if out.exists() and not out.is_dir():
        raise ClassroomError(str(out), None, "exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ClassroomError(str(out), None, "directory is not empty; pass --force to "
                                 "replace its " + ", ".join(COPY_DIRS) + " and top-level files")
        for top in COPY_DIRS + COPY_FILES:
            target = out / top
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    for rel, data in tree.files.items():
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        shutil.copymode(src / rel, dest)


def student(out_dir, src=".", *, force: bool = False) -> Tree:
    """Write the student copy of ``src`` to ``out_dir`` (stubs, no hidden tests, no outputs)."""
    tree = build(src, student=True)
    write_tree(tree, out_dir, src, force=force)
    return tree


def instructor(out_dir, src=".", *, force: bool = False) -> Tree:
    """Write the instructor copy of ``src`` to ``out_dir``: the same files, unchanged."""
    tree = build(src, student=False)
    write_tree(tree, out_dir, src, force=force)
    return tree


@dataclass
class CheckReport:
    tasks: dict
    regions: list[Region]
    problems: list[ClassroomError]
    tests: dict[str, list[str]]  # task -> the test node ids that carry its marker
    graded: dict[str, str] = field(default_factory=dict)  # task -> what grading runs

    def text(self) -> str:
        lines = ["tasks (tinymoe/classroom/registry.py):"]
        for name, t in self.tasks.items():
            where = [_where(r) for r in self.regions if r.task == name]
            lines.append(f"  {name}  {t.points} pts  {t.title}")
            lines.append(f"      regions: {', '.join(where) or '(none yet)'}")
            lines.append(f"      graded:  {self.graded.get(name) or '(no probe: not graded)'}")
            lines.append(f"      tests:   {_by_file(self.tests[name]) or '(none)'}")
        hidden = [_where(r) for r in self.regions if r.kind == "hidden"]
        lines.append(f"hidden-test regions: {', '.join(hidden) or '(none)'}")
        n_sol = sum(r.kind == "solution" for r in self.regions)
        n_files = len({r.path for r in self.regions if r.kind == "solution"})
        lines.append(f"{n_sol} solution regions in {n_files} files, {len(hidden)} hidden-test "
                     f"regions; {len(self.problems)} problems")
        lines += [f"error: {p}" for p in self.problems]
        return "\n".join(lines)


def _by_file(nodeids: list[str]) -> str:
    """``tests/test_a.py (3: test_x, test_y, ...)``, file by file."""
    files: dict[str, list[str]] = {}
    for n in nodeids:
        path, _, name = n.partition("::")
        files.setdefault(path, []).append(name.split("[")[0])
    parts = []
    for path, names in files.items():
        uniq = list(dict.fromkeys(names))
        shown = ", ".join(uniq[:3]) + (", ..." if len(uniq) > 3 else "")
        parts.append(f"{path} ({len(names)}: {shown})")
    return "; ".join(parts)


def _where(r: Region) -> str:
    cell = f"[cell {r.cell}]" if r.cell is not None else ""
    return f"{r.path}{cell}:{r.begin}-{r.end}"


def graded_by(task: str) -> str | None:
    """What the trusted grader runs for ``task``: its probe, the cases, what it calls."""
    import inspect

    import numpy as np

    from .probes import PROBES
    probe = PROBES.get(task)
    if probe is None:
        return None
    n = len(probe.cases(np.random.default_rng(0)))
    from . import probes
    source = inspect.getsource(probe.run)
    for helper in set(re.findall(r"\b(_\w+)\(", source)):  # the probe's own helpers too
        if inspect.isfunction(getattr(probes, helper, None)):
            source += inspect.getsource(getattr(probes, helper))
    calls = set()
    for m, names in re.findall(r"from (tinymoe[\w.]*) import ([\w, ]+)", source):
        for f in (n.strip() for n in names.split(",")):
            attrs = set(re.findall(rf"\b{f}\.(\w+)\(", source))  # a module: what it calls
            calls |= {f"{m}.{f}.{a}" for a in attrs} if attrs else {f"{m}.{f}"}
    calls = sorted(calls)
    part = "the exercise cell" if probe.mode == "cell" else "its definitions"
    what = (f"{probe.notebook} ({part})" if probe.notebook
            else ", ".join(calls) or "(see the probe)")
    return (f"probe {probe.run.__name__} (tinymoe/classroom/probes.py): {n} cases, runs {what}; "
            f"outputs compared with rtol={probe.rtol:g}, atol={probe.atol:g}")


def check(src=".", *, collect: bool = True, paths: tuple[str, ...] = ("tests",)) -> CheckReport:
    """Validate every marker of the tree (as the student copy would) and list, per task, its
    regions, what grading runs (the probe) and the tests that carry its marker (as pytest
    collects them from ``paths``, so markers set by helpers or from the registry count too)."""
    tasks = load_tasks(src)
    tree = build(src, student=True, tasks=tasks, keep_going=True)
    tests: dict[str, list[str]] = {name: [] for name in tasks}
    if collect and (Path(src) / "tests").is_dir():
        from .runner import run_pytest
        run = run_pytest(src, ["--collect-only", *paths], timeout=600)
        for t in run.tests:
            for name in tasks:
                if name in t.markers:
                    tests[name].append(t.nodeid)
        for err in run.collect_errors:
            tree.problems.append(ClassroomError(err["nodeid"], None, "tests not collectable: "
                                                + err["message"].strip().splitlines()[-1]))
    graded = {name: graded_by(name) for name in tasks}
    return CheckReport(tasks, tree.regions, tree.problems, tests,
                       {k: v for k, v in graded.items() if v})
