"""Argument checks shared by both dispatch backends, so both raise the same errors.

Each check returns the argument in the form the backends compute with (int64 indices,
NumPy arrays) and raises with the op's name, the shapes involved and the fix. This is
the one place both backends validate their inputs: index ranges, unique slots (two choices
never share a buffer row), ``order`` holding each (token, choice) pair at most once, and the
float dtypes the kernels are compiled for (float32, float64).
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


FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_float_dtype(a: np.ndarray, what: str, op: str) -> np.ndarray:
    """``a`` must be float32 or float64: the two dtypes both backends compute in."""
    if a.dtype not in FLOAT_DTYPES:
        fix = ("float16/bfloat16 activations: cast with .astype(np.float32) before dispatch "
               "(the router's own precision is set with router_dtype)"
               if np.issubdtype(a.dtype, np.floating) and a.dtype.itemsize < 4 else
               "cast with .astype(np.float64) (or np.float32)")
        raise TypeError(f"{op}: {what} has dtype {a.dtype}; dispatch supports float32 and "
                        f"float64 only: {fix}")
    return a


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
        check_unique_slots(expert_index, p, op)
    return p


def check_unique_slots(expert_index: np.ndarray, position: np.ndarray, op: str) -> None:
    """No two kept choices may share a slot (e, p): one would silently overwrite the other."""
    kept = position >= 0                                            # (T, k)
    e, p = expert_index[kept], position[kept]                       # (n,), (n,)
    slot = e * (int(p.max()) + 1 if p.size else 1) + p              # (n,) one id per (e, p)
    uniq, first, counts = np.unique(slot, return_index=True, return_counts=True)
    if uniq.size != slot.size:
        i = first[np.argmax(counts > 1)]
        raise ValueError(f"{op}: slot (expert {int(e[i])}, position {int(p[i])}) is taken by "
                         f"{int(counts.max())} choices; every kept choice needs its own slot: "
                         f"compute positions with assign_positions")


def check_matrix(x: Any, what: str, op: str) -> np.ndarray:
    """A 2-D floating array (rows, d)."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{op}: {what} must be 2-D (rows, d), got shape {a.shape}; flatten "
                         f"batch and sequence axes first, e.g. x.reshape(-1, d)")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{op}: {what} must be floating point, got dtype {a.dtype}")
    return check_float_dtype(a, what, op)


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
    return check_float_dtype(b, what, op)


def check_weight(combine_weight: Any, shape: tuple[int, int], op: str) -> np.ndarray:
    w = np.asarray(combine_weight)
    if w.shape != shape:
        raise ValueError(f"{op}: combine_weight has shape {w.shape} but the routing is "
                         f"(T, k) = {shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise TypeError(f"{op}: combine_weight must be floating point, got dtype {w.dtype}")
    return check_float_dtype(w, "combine_weight", op)


def check_order(order: Any, num_tokens: int, k: int, op: str) -> np.ndarray:
    """``order`` as (N,) int64 pair indices t*k + j in [0, T*k), each at most once: a
    permutation of ``range(T*k)``, or of the kept pairs when some were dropped."""
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
        uniq, counts = np.unique(o, return_counts=True)
        if uniq.size != o.size:
            q = int(uniq[np.argmax(counts > 1)])
            raise ValueError(f"{op}: order holds pair {q} (token {q // k}, choice {q % k}) "
                             f"{int(counts.max())} times; order must list each (token, "
                             f"choice) pair at most once (a permutation of range(T*k) = "
                             f"range({num_tokens * k}), minus dropped pairs): take it from "
                             f"sort_tokens")
    return o


def check_k(k: Any, op: str) -> int:
    """k, the choices per token: an integer >= 1."""
    return validate.positive_int(k, "k (choices per token)", op)
