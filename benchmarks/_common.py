"""Shared helpers for the benchmark scripts: timing medians, a machine line, tables, and
the JSON result each benchmark writes to ``benchmarks/results/NAME.json`` (see README.md)."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


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
                        warmup: int = 2,
                        prepare: dict[str, Callable[[], Any]] | None = None
                        ) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds.

    Interleaving (a, b, c, a, b, c, ...) spreads any background load over all of the
    implementations instead of penalising whichever ran while the machine was busy.
    ``prepare[name]``, when given, runs untimed before every call of ``fns[name]`` (e.g.
    ``torch.set_num_threads(1)`` for a one-thread variant).
    """
    prepare = prepare or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            if name in prepare:
                prepare[name]()
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if name in prepare:
                prepare[name]()
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


def machine_info() -> dict[str, Any]:
    """The machine and library versions, for a result file."""
    import numpy as np

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(),
                            "cores": os.cpu_count(), "python": platform.python_version(),
                            "numpy": np.__version__}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for mod in ("numba", "torch", "transformers"):  # versions without importing them
        try:
            info[mod] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            info[mod] = None
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001 (older NumPy: no dict mode)
        info["blas"] = None
    info["threads_env"] = {k: os.environ[k] for k in (
        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
        if k in os.environ}
    return info


def machine_line(info: dict[str, Any]) -> str:
    """``machine_info()`` as one line for a page."""
    parts = [info["cpu"], f"{info['cores']} cores", f"Python {info['python']}",
             f"NumPy {info['numpy']}"]
    if info.get("blas"):
        parts.append(info["blas"])
    for mod, label in (("numba", "Numba"), ("torch", "PyTorch"),
                       ("transformers", "transformers")):
        if info.get(mod):
            parts.append(f"{label} {info[mod]}")
    return ", ".join(parts)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def write_result(name: str, argv: list[str] | None, settings: dict[str, Any],
                 results: dict[str, Any], load_start: float | None = None,
                 folder: Path | None = None) -> Path:
    """Write ``benchmarks/results/NAME.json``: command, machine, date, load, settings, results.

    ``argv``: the script's arguments (None: ``sys.argv[1:]``). ``load_start``: the one-minute
    load average when the run began (the end's is taken here). Returns the path.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    record = {"name": name,
              "command": " ".join(["python", f"benchmarks/bench_{name}.py", *args]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                  "%Y-%m-%d %H:%M UTC"),
              "machine": machine_info(), "load_average": {"start": load_start,
                                                          "end": load_average()},
              "settings": settings, "results": results}
    folder = RESULTS if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path
