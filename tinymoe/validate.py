"""Argument checks, in one place, with one argument order: ``(value, name, where)``.

``where`` names the function or class the user called (``"SwitchRouter"``), ``name`` the
argument (``"d_model"``); every check returns the value in the form the caller computes with
and raises a ``ValueError`` (or ``TypeError``) that says what was wrong and how to fix it::

    validate.positive_int(0, "d_model", "SwitchRouter")
    ValueError: SwitchRouter: d_model must be a positive integer, got 0

The checks of the dispatch kernels' arrays (shapes of ``expert_index``, ``position``,
``order``) live beside the kernels, in ``tinymoe/dispatch/_checks.py``; they use these.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """True for Python and NumPy integers, False for bools (``True`` is not a count)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def positive_int(value: Any, name: str, where: str) -> int:
    """An integer >= 1."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    return int(value)


def count(value: Any, name: str, where: str) -> int:
    """An integer >= 0 (a number of things that may be none)."""
    if not is_int(value) or value < 0:
        raise ValueError(f"{where}: {name} must be an integer >= 0, got {value!r}")
    return int(value)


def num_experts(value: Any, where: str) -> int:
    """The number of experts E: an integer >= 1."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{where}: num_experts={value!r} must be an integer >= 1")
    return int(value)


def top_k(value: Any, num_experts: int, where: str) -> int:
    """k, the experts chosen per token: an integer in [1, E]."""
    if not is_int(value) or not 1 <= value <= num_experts:
        raise ValueError(f"{where}: k={value!r} must be an integer in [1, {num_experts}] for "
                         f"num_experts={num_experts}; choose 1 <= k <= num_experts")
    return int(value)


def capacity_factor(value: Any, where: str) -> float:
    """A capacity factor: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: capacity_factor={value!r} must be a finite number > 0 "
                         f"(1.0 gives each expert exactly its balanced share k·T/E; 1.25 and "
                         f"2.0 are common)")
    return float(value)


def coef(value: Any, name: str, where: str, hint: str = "0 turns the term off") -> float:
    """A loss coefficient or step size: a finite number >= 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{where}: {name}={value!r} must be a finite number >= 0 ({hint})")
    return v


def float_dtype(value: Any, name: str, where: str) -> np.dtype:
    """A NumPy floating dtype."""
    dt = np.dtype(value)
    if not np.issubdtype(dt, np.floating):
        raise TypeError(f"{where}: {name} must be floating (np.float32 or np.float64), got {dt}")
    return dt


def last_dim(x: Any, expected: int, where: str) -> None:
    """``x`` must be floating and end in an axis of width ``expected``: ``Linear(3 -> 4):
    input has last dim 2, expected 3 (input shape (5, 2))``."""
    if x.ndim == 0 or x.shape[-1] != expected:
        got = "no axes" if x.ndim == 0 else f"last dim {x.shape[-1]}"
        raise ValueError(f"{where}: input has {got}, expected {expected} (input shape "
                         f"{x.shape})")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{where}: input dtype {x.dtype} is not floating; token ids go "
                        f"through an Embedding first")


def tokens(x: Any, d_model: int, where: str, min_tokens: int = 0) -> None:
    """``x`` must be (T, d_model) with T >= ``min_tokens``."""
    if x.ndim != 2 or x.shape[1] != d_model or x.shape[0] < min_tokens:
        at_least = f" with T >= {min_tokens} tokens" if min_tokens else ""
        raise ValueError(f"{where}(d_model={d_model}): x must be (T, {d_model}){at_least}, got "
                         f"shape {x.shape}; flatten the leading axes first, e.g. "
                         f"x.reshape(-1, {d_model})")


def finite(a: Any, name: str, where: str, rows: str = "token", cols: str = "expert",
           hint: str = "training has diverged or the input is corrupt: lower the learning "
                       "rate, clip gradients, or check the data for NaN") -> None:
    """A (rows, cols) array or tensor with no NaN or inf; the error names the first bad entry."""
    data = np.asarray(getattr(a, "data", a))
    bad = ~np.isfinite(data)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise FloatingPointError(
            f"{where}: {name} of shape {data.shape} ({data.dtype}) contain {int(bad.sum())} "
            f"NaN/inf entries (first at {rows} {r}, {cols} {c}, value {data[r, c]}); {hint}")
