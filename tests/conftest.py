"""Shared pytest set-up: task markers from the registry, hypothesis profile, headless plots,
and the benchmark scripts as modules."""
import importlib.util
import os
import sys
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from hypothesis import settings  # noqa: E402

from tinymoe.classroom.registry import TASKS  # noqa: E402

# Numba's first call compiles; never let that count against hypothesis' deadline.
settings.register_profile("tinymoe", deadline=None, max_examples=25, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tinymoe"))


def pytest_configure(config):
    for name, task in TASKS.items():
        config.addinivalue_line("markers", f"{name}: {task.title} ({task.points} pts)")
    config.addinivalue_line("markers", "slow: long-running (notebooks, reproductions)")
    config.addinivalue_line("markers", "torch: cross-checks against PyTorch (skipped without it)")


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark(name)``: ``benchmarks/bench_NAME.py`` imported as a module (the
    benchmarks are scripts, not a package)."""
    root = Path(__file__).resolve().parent.parent

    def load(name: str):
        path = root / "benchmarks" / f"bench_{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return load
