"""Recorded runs: one JSON file per ``tinymoe repro NAME --record``.

Every number the docs quote comes from one of these files, never typed by hand::

    record("switch", argv=["switch", "--fast"], seeds=[0, 1], settings={...},
           results={...}, fast=True)   # -> tinymoe/data/records/switch-fast.json
    load("switch", fast=True)["results"]

A file holds: ``name``, ``command`` (``"tinymoe repro " + args``), ``code_version`` (the
git commit when run from a checkout, else ``tinymoe.__version__``), ``date`` (UTC),
``machine`` (platform, CPU count, NumPy/Numba versions), ``seeds``, ``settings`` and
``results`` (nested dicts/lists of JSON numbers and strings).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

import tinymoe
import tinymoe.data

RECORDS = Path(os.environ.get("TINYMOE_RECORDS") or Path(tinymoe.data.__file__).parent / "records")

# The numeric environment of every fast record, recorded and re-run in it: one thread, and on
# x86-64 the AVX2 code paths of OpenBLAS, NumPy and Numba whatever the CPU, so that a rerun
# on an AVX-512 Intel core adds its floats in the same order as an AVX2 AMD core. Without it
# a short training run of a chaotic setting (a step size near the edge of stability) drifts
# by percents between CPUs from last-bit differences alone (measured: the 1991 fast run's
# mean epochs 258 on one machine kind, 274 on another).
_AVX512 = ("AVX512F AVX512CD AVX512VL AVX512BW AVX512DQ AVX512_KNL AVX512_KNM AVX512_SKX "
           "AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR AVX512_FP16")
PINNED_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1", "TINYMOE_PINNED": "1"}
if platform.machine().lower() in ("x86_64", "amd64"):
    PINNED_ENV.update({"OPENBLAS_CORETYPE": "Haswell", "NPY_DISABLE_CPU_FEATURES": _AVX512,
                       "NUMBA_CPU_NAME": "haswell"})


def pinned() -> bool:
    """Whether this process runs in :data:`PINNED_ENV` (set before NumPy was imported)."""
    return all(os.environ.get(k) == v for k, v in PINNED_ENV.items())


def run_pinned(argv: list[str], records_dir: Path | None = None) -> int:
    """``tinymoe repro *argv`` in a child process under :data:`PINNED_ENV` (its records go
    to ``records_dir`` when given); returns the child's exit status."""
    env = {**os.environ, **PINNED_ENV}
    if records_dir is not None:
        env["TINYMOE_RECORDS"] = str(records_dir)
    return subprocess.run([sys.executable, "-m", "tinymoe", "repro", *argv], env=env).returncode


def _path(name: str, fast: bool) -> Path:
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"records: name {name!r} must be letters, digits, '_' or '-' "
                         "(it becomes a file name); e.g. 'switch' or 'vowels-protocol'")
    return RECORDS / f"{name}{'-fast' if fast else ''}.json"


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON numbers/strings/lists/dicts; NumPy scalars and arrays converted.

    A NaN or infinity is refused: a recorded figure must be a number a page can quote.
    """
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist(), where)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"records: {where} is {f}; record a finite number "
                             "(or a string such as 'not reached') instead")
        return f
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"records: {where} has type {type(value).__name__}; record numbers, "
                    "strings, lists or dicts")


def code_version() -> str:
    """The git commit of the checkout tinymoe runs from, else ``tinymoe.__version__``."""
    root = Path(tinymoe.__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return tinymoe.__version__
    commit = out.stdout.strip()
    if out.returncode != 0 or len(commit) != 40:
        return tinymoe.__version__
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "tinymoe",
                            ":!tinymoe/data/records"],  # the records are data, not code
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("+dirty" if dirty else "")


def machine() -> dict:
    """Where a run ran: platform, CPU count, NumPy and Numba versions."""
    try:
        import numba
        numba_version = numba.__version__
    except ImportError:  # pragma: no cover - numba is a dependency
        numba_version = "not installed"
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count() or 0, "numpy": np.__version__, "numba": numba_version,
            "cpu": _cpu_model(), "pinned": pinned()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def record(name: str, *, argv: list[str], seeds: list[int], settings: dict, results: dict,
           fast: bool = False) -> Path:
    """Write ``tinymoe/data/records/{name}{'-fast' if fast else ''}.json``; return its path."""
    path = _path(name, fast)
    data = {
        "name": name,
        "command": "tinymoe repro " + shlex.join(str(a) for a in argv),
        "code_version": code_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "seeds": _plain(list(seeds), "seeds"),
        "settings": _plain(settings, "settings"),
        "results": _plain(results, "results"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def load(name: str, fast: bool = False) -> dict:
    """The recorded run ``name`` (``fast``: its fast-settings run) as a dict."""
    path = _path(name, fast)
    if not path.exists():
        have = sorted(p.stem for p in RECORDS.glob("*.json")) if RECORDS.exists() else []
        raise FileNotFoundError(
            f"records.load: no recorded run {path.name!r} (have: {', '.join(have) or 'none'}); "
            f"make it with `tinymoe repro {name}{' --fast' if fast else ''} --record`"
            f" (a named variant, such as an lr sweep: `tinymoe repro EXPERIMENT ... --record "
            f"--name {name}`)")
    return json.loads(path.read_text(encoding="utf-8"))


def available() -> list[str]:
    """Names of the recorded runs shipped (``'switch'``, ``'switch-fast'``, ...)."""
    return sorted(p.stem for p in RECORDS.glob("*.json")) if RECORDS.exists() else []


# --- what the ``repro`` commands share -------------------------------------------------------
# Long per-step curves are figures' raw data, not figures a page quotes: left out of records.
CURVES = ("history", "load_history", "train_loss", "steps", "mse_curve", "load_curve",
          "grad_curve", "em_curve", "runs_detail")
# Wall-clock figures: recorded, but they depend on the machine, so never compared
# ("measured": the timings and resident memory of `tinymoe repro inference`).
TIMINGS = ("seconds", "step_time", "ms_per_grad_epoch", "ms_per_em_epoch", "measured")


def add_record_argument(ap: Any) -> None:
    """``--record``: write this run's figures to ``tinymoe/data/records/``."""
    ap.add_argument("--record", action="store_true",
                    help="write every reported figure to tinymoe/data/records/NAME[-fast].json "
                         "(the file docs/reproductions.md is rendered from)")


def compact(value: Any, drop: tuple[str, ...] = CURVES) -> Any:
    """``value`` (a ``to_dict()``) without the keys ``drop`` at any depth; NaN becomes the
    string ``'nan'`` (a diverged run) so that the record stays plain JSON."""
    if isinstance(value, dict):
        return {k: compact(v, drop) for k, v in value.items() if k not in drop}
    if isinstance(value, (list, tuple)):
        return [compact(v, drop) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return str(float(value))
    return value


def differences(recorded: Any, fresh: Any, *, rtol: float, atol: float,
                ignore: tuple[str, ...] = TIMINGS, where: str = "results") -> list[str]:
    """Where ``fresh`` differs from ``recorded``: floats beyond ``atol + rtol·|recorded|``,
    any other value not equal, keys missing on either side. Keys in ``ignore`` are skipped."""
    if isinstance(recorded, dict) and isinstance(fresh, dict):
        out = [f"{where}.{k}: only in the record" for k in recorded
               if k not in fresh and k not in ignore]
        out += [f"{where}.{k}: not in the record" for k in fresh
                if k not in recorded and k not in ignore]
        for k in recorded:
            if k in fresh and k not in ignore:
                out += differences(recorded[k], fresh[k], rtol=rtol, atol=atol,
                                   ignore=ignore, where=f"{where}.{k}")
        return out
    if isinstance(recorded, list) and isinstance(fresh, list):
        if len(recorded) != len(fresh):
            return [f"{where}: length {len(recorded)} recorded, {len(fresh)} now"]
        return [d for i, (a, b) in enumerate(zip(recorded, fresh))
                for d in differences(a, b, rtol=rtol, atol=atol, ignore=ignore,
                                     where=f"{where}[{i}]")]
    if isinstance(recorded, float) or isinstance(fresh, float):
        if isinstance(recorded, (int, float)) and isinstance(fresh, (int, float)) \
                and not isinstance(recorded, bool) and not isinstance(fresh, bool):
            if abs(fresh - recorded) <= atol + rtol * abs(recorded):
                return []
    elif recorded == fresh:
        return []
    return [f"{where}: recorded {recorded!r}, now {fresh!r}"]
