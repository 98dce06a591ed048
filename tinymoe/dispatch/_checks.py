"""Argument checks shared by both dispatch backends, so both raise the same errors.

Each check returns the argument in the form the backends compute with (int64 indices,
NumPy arrays) and raises with the op's name, the shapes involved and the fix.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import validate

_is_int = validate.is_int


def _int64(a: np.ndarray, what: str, op: str) -> np.ndarray:
    """An index array as int64; an empty float array (``np.zeros((0, k))``) counts as one."""
    if a.size == 0 and a.dtype == np.float64:
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{op}: {what} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def check_capacity(capacity: Any, op: str) -> int | None:
    """``None`` (dropless) or an integer C >= 1."""
    if capacity is None:
        return None
    if not _is_int(capacity) or capacity < 1:
        raise ValueError(f"{op}: capacity must be an integer >= 1, or None for dropless "
                         f"routing, got {capacity!r}")
    return int(capacity)


def check_expert_index(expert_index: Any, num_experts: Any, op: str) -> tuple[np.ndarray, int]:
    """``expert_index`` as a (T, k) int64 array with every entry in [0, E)."""
    E = validate.num_experts(num_experts, op)
    e = np.asarray(expert_index)
    if e.ndim != 2:
        raise ValueError(f"{op}: expert_index must have shape (T, k) (tokens, choices), got "
                         f"shape {e.shape}; reshape a (T,) top-1 routing with [:, None]")
    if e.shape[1] < 1:
        raise ValueError(f"{op}: expert_index has shape {e.shape}: every token needs k >= 1 "
                         f"choices")
    e = _int64(e, "expert_index", op)
    if e.size:
        lo, hi = int(e.min()), int(e.max())
        if lo < 0 or hi >= E:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{op}: expert_index holds {bad}, outside [0, {E}) for "
                             f"num_experts={E}")
    return e, E


def check_position(position: Any, expert_index: np.ndarray, capacity: int | None,
                   op: str) -> np.ndarray:
    """``position`` as (T, k) int64 with entries in [-1, C) (or >= -1 when dropless)."""
    p = np.asarray(position)
    if p.shape != expert_index.shape:
        raise ValueError(f"{op}: position has shape {p.shape} but expert_index has shape "
                         f"{expert_index.shape}; both are (T, k)")
    p = _int64(p, "position", op)
    if p.size:
        lo, hi = int(p.min()), int(p.max())
        if lo < -1:
            raise ValueError(f"{op}: position holds {lo}; a slot is >= 0, or -1 for a "
                             f"dropped choice")
        if capacity is not None and hi >= capacity:
            raise ValueError(f"{op}: position holds slot {hi}, but capacity is {capacity}; "
                             f"compute positions with the same capacity "
                             f"(assign_positions(..., capacity={capacity}))")
    return p


def check_matrix(x: Any, what: str, op: str) -> np.ndarray:
    """A 2-D floating array (rows, d)."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{op}: {what} must be 2-D (rows, d), got shape {a.shape}; flatten "
                         f"batch and sequence axes first, e.g. x.reshape(-1, d)")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{op}: {what} must be floating point, got dtype {a.dtype}")
    return a


def check_rows(x: Any, num_rows: int, what: str, op: str, rows: str = "T") -> np.ndarray:
    """A 2-D floating array with ``num_rows`` rows."""
    a = check_matrix(x, what, op)
    if a.shape[0] != num_rows:
        raise ValueError(f"{op}: {what} must have shape ({rows}, d) with {rows} = {num_rows}, "
                         f"got shape {a.shape}")
    return a


def check_buffer(buffer: Any, num_experts: int, capacity: int, what: str,
                 op: str) -> np.ndarray:
    b = np.asarray(buffer)
    if b.ndim != 3 or b.shape[:2] != (num_experts, capacity):
        raise ValueError(f"{op}: {what} must have shape (E, C, d) = ({num_experts}, "
                         f"{capacity}, d), got shape {b.shape}")
    if not np.issubdtype(b.dtype, np.floating):
        raise TypeError(f"{op}: {what} must be floating point, got dtype {b.dtype}")
    return b


def check_weight(combine_weight: Any, shape: tuple[int, int], op: str) -> np.ndarray:
    w = np.asarray(combine_weight)
    if w.shape != shape:
        raise ValueError(f"{op}: combine_weight has shape {w.shape} but the routing is "
                         f"(T, k) = {shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"{op}: combine_weight must be floating point, got dtype {w.dtype}")
    return w


def check_order(order: Any, num_tokens: int, k: int, op: str) -> np.ndarray:
    """``order`` as (N,) int64 pair indices t*k + j in [0, T*k)."""
    o = np.asarray(order)
    if o.ndim != 1:
        raise ValueError(f"{op}: order must be 1-D (N,), got shape {o.shape}")
    o = _int64(o, "order", op)
    if o.size:
        lo, hi = int(o.min()), int(o.max())
        if lo < 0 or hi >= num_tokens * k:
            raise ValueError(f"{op}: order holds {lo if lo < 0 else hi}, outside [0, T*k) = "
                             f"[0, {num_tokens * k}); order indexes (token, choice) pairs "
                             f"as t*k + j")
    return o


def check_k(k: Any, op: str) -> int:
    """k, the choices per token: an integer >= 1."""
    return validate.positive_int(k, "k (choices per token)", op)
