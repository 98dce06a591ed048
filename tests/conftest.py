"""Shared pytest set-up: task markers from the registry, hypothesis profile, headless plots."""
import os

import matplotlib

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
