"""Shared helpers for the benchmark scripts: timing medians, a machine line, tables."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable


def median_time(fn: Callable[[], Any], repeats: int = 7, warmup: int = 2,
                number: int = 1) -> float:
    """Median wall time of ``number`` calls of ``fn``, in seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int = 7,
                        warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds.

    Interleaving (a, b, c, a, b, c, ...) spreads any background load over all of the
    implementations instead of penalising whichever ran while the machine was busy.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def try_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def machine() -> str:
    import numpy as np

    torch = try_torch()
    parts = [platform.processor() or platform.machine(), f"{os.cpu_count()} cores",
             f"Python {platform.python_version()}", f"NumPy {np.__version__}"]
    try:
        import numba
        parts.append(f"Numba {numba.__version__}")
    except ImportError:
        pass
    parts.append(f"PyTorch {torch.__version__}" if torch else "PyTorch absent")
    return ", ".join(parts)


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (also readable in a terminal)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
