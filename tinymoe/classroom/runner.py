"""Run a tree's test suite once in a subprocess and read back each test's markers and outcome.

Shared by grading (:mod:`.grading`) and the CI proofs (:mod:`.proofs`). The subprocess is
``python -m pytest -q -p no:cacheprovider --continue-on-collection-errors`` in the tree, with
the tree first on ``sys.path`` (so its own ``tinymoe`` is the one imported) and our small
plugin (:mod:`.pytest_plugin`) writing a JSON report.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PLUGIN_MODULE = "tinymoe_classroom_plugin"
OK_EXIT = (0, 1, 5)  # all passed, some failed, nothing collected


@dataclass
class TestRecord:
    __test__ = False  # not a pytest test class

    nodeid: str
    markers: list[str]
    outcome: str | None  # passed failed error skipped xfailed xpassed (None: never ran)
    exc_type: str | None = None
    message: str | None = None
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.outcome in ("passed", "xpassed")

    @property
    def bad(self) -> bool:
        return self.outcome in ("failed", "error", None)


@dataclass
class PytestRun:
    directory: Path
    args: list[str]
    exitstatus: int  # pytest's exit code; -1 when the run timed out
    output: str
    tests: list[TestRecord] = field(default_factory=list)
    collect_errors: list[dict] = field(default_factory=list)
    tinymoe_file: str | None = None  # where the run imported tinymoe from
    seconds: float = 0.0

    @property
    def broken(self) -> bool:
        """True when pytest could not run the suite (conftest error, crash, timeout)."""
        return self.exitstatus not in OK_EXIT

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-n:])


def run_pytest(directory, args=(), *, timeout: float | None = None,
               env: dict | None = None) -> PytestRun:
    """Run ``python -m pytest ARGS`` in ``directory`` and collect the per-test report."""
    directory = Path(directory).resolve()
    args = list(args)
    with tempfile.TemporaryDirectory(prefix="tinymoe-classroom-") as tmp:
        shutil.copyfile(Path(__file__).with_name("pytest_plugin.py"),
                        Path(tmp) / f"{PLUGIN_MODULE}.py")
        report_path = Path(tmp) / "report.json"
        environ = dict(os.environ if env is None else env)
        environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (tmp, str(directory), environ.get("PYTHONPATH", "")) if p)
        environ["TINYMOE_CLASSROOM_REPORT"] = str(report_path)
        environ["PYTHONDONTWRITEBYTECODE"] = "1"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-p", PLUGIN_MODULE, "--continue-on-collection-errors", *args]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, check=False, cwd=directory, env=environ, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            exitstatus, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            exitstatus = -1
            output = (out.decode(errors="replace") if isinstance(out, bytes) else out) + \
                f"\n[tinymoe classroom] pytest timed out after {timeout} s"
        run = PytestRun(directory, args, exitstatus, output,
                        seconds=time.perf_counter() - start)
        if report_path.is_file():
            data = json.loads(report_path.read_text(encoding="utf-8"))
            run.tests = [TestRecord(**t) for t in data["tests"]]
            run.collect_errors = data["collect_errors"]
            run.tinymoe_file = data["tinymoe_file"]
    return run
