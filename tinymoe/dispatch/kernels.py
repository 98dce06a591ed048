"""Token dispatch as Numba kernels: the contract of :mod:`tinymoe.dispatch.reference`, fast.

Same functions, same signatures, same results. How they stay race-free and deterministic
without atomics:

1. positions first. :func:`assign_positions` is a serial O(T·k) pass with one running
   counter per expert (GShard's ``c_e``); it is the exclusive prefix sum of the reference.
2. every parallel loop writes rows that no other iteration writes. Dispatch inverts the
   routing into a table "slot -> (token, choice)" (serial, O(T·k): each slot is taken at
   most once) and then copies slot rows in a ``prange``: a gather, one writer per row.
   Combine loops over tokens in a ``prange``: token t's output row is written only by
   iteration t. A naive ``buffer[e, p] += x[t]`` over tokens in parallel would be safe only
   because the slots are unique; ``y[t] += ...`` over *choices* in parallel would not be.
3. every sum runs in a fixed order: y_t adds its k choices j = 0, 1, ..., k-1, exactly as
   the reference does, so the bits do not depend on the number of threads.

Bit-identical to the reference: everything except the dot products of the gradient wrt
``combine_weight`` (``*_backward``'s second output). There the kernel keeps eight running
sums (see ``_scatter_and_dot``), while NumPy's ``einsum`` sums in its own SIMD-blocked order; the
two agree to rounding, |difference| <= 2 d eps sum_c |a_c g_c| (eps of the dtype).

Empty slots cost nothing to write: the (E, C, d) outputs come from ``np.zeros``, which for
large arrays maps fresh pages that the operating system hands out already zeroed on first
touch, and the kernels write only the rows some (token, choice) owns. The empty slots are
the tail of each expert's buffer, so whole pages of them are never touched at all (writing
zeros into ``np.empty`` instead would fault in and fill every page: ~10 % slower).

Problems smaller than ``PARALLEL_MIN_ELEMENTS`` run on one thread: waking a second thread
costs more than copying a few kilobytes (the bits are the same either way); larger ones on
at most the cores that other processes leave free (:mod:`tinymoe.threads`). Unless you set
it yourself, importing this module sets ``OMP_WAIT_POLICY=PASSIVE`` for Numba's OpenMP
threads: with libgomp's default (spin, then sleep) a parallel call on a machine whose cores
are busy with other processes waited ~12 ms for a time slice (docs/benchmarks.md).

Each kernel is valid Python: with ``NUMBA_DISABLE_JIT=1`` they run (slowly) as written.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before Numba starts its OpenMP threads

import numba
import numpy as np
from numba import prange

from tinymoe import threads
from tinymoe.dispatch._checks import (check_buffer, check_capacity, check_expert_index,
                                      check_k, check_matrix, check_order, check_position,
                                      check_rows, check_weight)
from tinymoe.dispatch.reference import block_size, check_block_counts, check_num_blocks

_jit = numba.njit(cache=True)
_pjit = numba.njit(cache=True, parallel=True)

# --- serial index kernels (O(T k) integers) ----------------------------------------------


@_jit
def _assign_positions(expert_index, num_experts, capacity):
    """Running counter per expert over the choices in priority order; capacity < 0: none."""
    T, k = expert_index.shape
    position = np.empty((T, k), dtype=np.int64)
    fill = np.zeros(num_experts, dtype=np.int64)  # c_e: choices of expert e seen so far
    for j in range(k):          # all first choices before all second choices
        for t in range(T):      # tokens in sequence order within a column
            e = expert_index[t, j]
            p = fill[e]
            fill[e] = p + 1
            position[t, j] = p if (capacity < 0 or p < capacity) else -1
    if capacity >= 0:
        for e in range(num_experts):
            fill[e] = min(fill[e], capacity)
    return position, fill


# --- positions in parallel (reference.block_counts / block_starts): three passes ---------


@_jit
def _count_block(prio, lo, hi, row):
    """row[e] += 1 for every choice lo <= i < hi of expert e (one block, one thread)."""
    ### BEGIN SOLUTION task5_1
    for i in range(lo, hi):
        row[prio[i]] += 1
    ### END SOLUTION


@_pjit
def _block_counts(prio, size, counts):
    """counts[b] = the choices per expert of block b. Parallel over blocks: iteration b
    writes row b only, so no counter is shared (unlike a prange over choices)."""
    n = prio.shape[0]
    for b in prange(counts.shape[0]):
        _count_block(prio, min(n, b * size), min(n, (b + 1) * size), counts[b])


@_jit
def _block_starts(counts, start):
    """start[b, e] = sum over b' < b of counts[b', e] (serial: B·E additions)."""
    B, E = counts.shape
    ### BEGIN SOLUTION task5_2
    for e in range(E):
        below = 0
        for b in range(B):
            start[b, e] = below
            below += counts[b, e]
    ### END SOLUTION


@_pjit
def _fill_blocks(prio, size, start, capacity, slot):
    """slot[i] for the choices of each block, counting on from the block's start; capacity
    < 0: none. Parallel over blocks: iteration b writes its own choices' slots only."""
    n = prio.shape[0]
    for b in prange(start.shape[0]):
        fill = start[b].copy()  # (E,) this block's own counters
        for i in range(min(n, b * size), min(n, (b + 1) * size)):
            e = prio[i]
            p = fill[e]
            fill[e] = p + 1
            slot[i] = p if (capacity < 0 or p < capacity) else -1


@_jit
def _sort_tokens(expert_index, position, use_position, num_experts):
    """Counting sort of the kept pairs by expert, stable in priority order."""
    T, k = expert_index.shape
    counts = np.zeros(num_experts, dtype=np.int64)
    for j in range(k):
        for t in range(T):
            if not use_position or position[t, j] >= 0:
                counts[expert_index[t, j]] += 1
    offsets = np.zeros(num_experts + 1, dtype=np.int64)
    for e in range(num_experts):
        offsets[e + 1] = offsets[e] + counts[e]  # exclusive prefix sum
    fill = offsets[:-1].copy()                   # next free row of each expert
    order = np.empty(offsets[num_experts], dtype=np.int64)
    for j in range(k):
        for t in range(T):
            if not use_position or position[t, j] >= 0:
                e = expert_index[t, j]
                order[fill[e]] = t * k + j
                fill[e] += 1
    return order, offsets


@_jit
def _slot_rows(expert_index, position, capacity):
    """row[t, j] = e*C + p of the flattened (E*C, d) buffer, or -1 when dropped."""
    T, k = expert_index.shape
    row = np.empty((T, k), dtype=np.int64)
    for t in range(T):
        for j in range(k):
            p = position[t, j]
            row[t, j] = expert_index[t, j] * capacity + p if p >= 0 else -1
    return row


@_jit
def _invert_rows(row, num_rows):
    """src[r] = t*k + j for the pair stored in row r, -1 for an empty row."""
    T, k = row.shape
    src = np.full(num_rows, -1, dtype=np.int64)
    for t in range(T):
        for j in range(k):
            if row[t, j] >= 0:
                src[row[t, j]] = t * k + j
    return src


@_jit
def _rows_of_order(order, num_tokens, k):
    """row[t, j] = i where order[i] == t*k + j, or -1."""
    row = np.full((num_tokens, k), -1, dtype=np.int64)
    for i in range(order.shape[0]):
        q = order[i]
        row[q // k, q % k] = i
    return row


# --- parallel row kernels: each output row has exactly one writer -----------------------


@_pjit
def _gather_rows(x, src, k, out):
    """out[r] = x[src[r] // k] where src[r] >= 0; other rows are left as they are (the
    caller passes zeros).  Parallel over output rows."""
    d = out.shape[1]
    for r in prange(out.shape[0]):
        q = src[r]
        if q >= 0:
            t = q // k
            for c in range(d):
                out[r, c] = x[t, c]


@_pjit
def _gather_sum(rows, row, out):
    """out[t] = sum_j rows[row[t, j]] over row >= 0, j = 0..k-1.  Parallel over tokens."""
    T, k = row.shape
    d = out.shape[1]
    for t in prange(T):
        for c in range(d):
            out[t, c] = 0
        for j in range(k):
            r = row[t, j]
            if r >= 0:
                for c in range(d):
                    out[t, c] += rows[r, c]


@_pjit
def _gather_weighted_sum(rows, row, weight, out):
    """out[t] = sum_j weight[t, j] * rows[row[t, j]], j = 0..k-1.  Parallel over tokens."""
    T, k = row.shape
    d = out.shape[1]
    for t in prange(T):
        for c in range(d):
            out[t, c] = 0
        for j in range(k):
            r = row[t, j]
            if r >= 0:
                w = weight[t, j]
                for c in range(d):
                    out[t, c] += w * rows[r, c]


@_pjit
def _scatter_and_dot(rows, row, g, weight, zero, grad_rows, dots):
    """The two gradients of combine in one pass over the tokens (parallel over tokens):

        grad_rows[row[t, j]] = weight[t, j] * g[t]        (each row has one writer)
        dots[t, j] = sum_c rows[row[t, j], c] * g[t, c]   (0 where row < 0)

    The dot keeps eight running sums (lane L adds the c with c % 8 == L, left to right),
    then ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)): a fixed order on every machine
    and thread count. One running sum would wait for each add to finish before the next.
    Rows no pair points at are left as they are (the caller passes zeros).
    """
    T, k = row.shape
    d = g.shape[1]
    d8 = d - d % 8
    for t in prange(T):
        b = g[t]                      # (d,) views: simpler addressing in the inner loops
        for j in range(k):
            r = row[t, j]
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zero
            if r >= 0:
                w = weight[t, j]
                for c in range(d):
                    grad_rows[r, c] = w * b[c]
                a = rows[r]
                for block in range(d8 // 8):
                    c = 8 * block
                    s0 += a[c] * b[c]
                    s1 += a[c + 1] * b[c + 1]
                    s2 += a[c + 2] * b[c + 2]
                    s3 += a[c + 3] * b[c + 3]
                    s4 += a[c + 4] * b[c + 4]
                    s5 += a[c + 5] * b[c + 5]
                    s6 += a[c + 6] * b[c + 6]
                    s7 += a[c + 7] * b[c + 7]
                for c in range(d8, d):
                    s0 += a[c] * b[c]
            dots[t, j] = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


# Below this many elements a copy ends before a second thread would wake up: run serially.
PARALLEL_MIN_ELEMENTS = 1 << 16


@contextlib.contextmanager
def _threads_for(num_elements: int) -> Iterator[None]:
    """One thread for small problems, at most :func:`tinymoe.threads.num_threads` (the
    cores other processes leave free) for large ones; same bits either way (no row has
    two writers)."""
    if numba.config.DISABLE_JIT:
        yield
        return
    before = numba.get_num_threads()
    n = min(before, threads.num_threads()) if num_elements >= PARALLEL_MIN_ELEMENTS else 1
    if n == before:
        yield
        return
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _c(a: np.ndarray) -> np.ndarray:
    """C-contiguous (copies only when needed): the kernels are compiled for that layout."""
    return np.ascontiguousarray(a)


def _zero(*arrays: np.ndarray):
    """A zero of the dtype the reference accumulates a product of these arrays in."""
    return np.result_type(*arrays).type(0)


# --- the contract (see tinymoe.dispatch.reference for the math) --------------------------


def assign_positions(expert_index: np.ndarray, num_experts: int,
                     capacity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Kernel twin of :func:`tinymoe.dispatch.reference.assign_positions` (same convention:
    choice-major priority, exclusive prefix sum, ``position < C`` kept)."""
    e, E = check_expert_index(expert_index, num_experts, "assign_positions")  # (T, k)
    C = check_capacity(capacity, "assign_positions")
    return _assign_positions(_c(e), E, -1 if C is None else C)


def block_counts(expert_index: np.ndarray, num_experts: int, num_blocks: int) -> np.ndarray:
    """Kernel twin of :func:`tinymoe.dispatch.reference.block_counts`.  (B, E)"""
    e, E = check_expert_index(expert_index, num_experts, "block_counts")  # (T, k)
    B = check_num_blocks(num_blocks, "block_counts")
    prio = _c(e.T.reshape(-1))  # (k*T,) experts in priority order
    counts = np.zeros((B, E), dtype=np.int64)  # (B, E)
    with _threads_for(prio.size):
        try:
            _block_counts(prio, block_size(prio.size, B), counts)
        except SystemError as err:  # an exception raised inside a prange arrives wrapped
            if isinstance(err.__cause__, Exception):
                raise err.__cause__ from None
            raise
    return counts


def block_starts(counts: np.ndarray) -> np.ndarray:
    """Kernel twin of :func:`tinymoe.dispatch.reference.block_starts`.  (B, E)"""
    c = check_block_counts(counts, "block_starts")  # (B, E)
    start = np.zeros_like(c)
    _block_starts(c, start)
    return start


def assign_positions_parallel(expert_index: np.ndarray, num_experts: int,
                              capacity: int | None = None,
                              num_blocks: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """:func:`assign_positions` in three passes that parallelise over ``num_blocks`` blocks of
    choices: :func:`block_counts`, :func:`block_starts` (the exclusive prefix sum of the
    counts down the blocks), then every block fills its slots from its start. The same
    ``(position, counts)`` as the serial pass for every number of blocks."""
    e, E = check_expert_index(expert_index, num_experts, "assign_positions_parallel")
    C = check_capacity(capacity, "assign_positions_parallel")
    T, k = e.shape
    counts = block_counts(e, E, num_blocks)        # (B, E) pass 1
    start = block_starts(counts)                   # (B, E) pass 2
    prio = _c(e.T.reshape(-1))                     # (k*T,) priority order
    slot = np.empty(prio.size, dtype=np.int64)     # (k*T,)
    with _threads_for(prio.size):                  # pass 3
        _fill_blocks(prio, block_size(prio.size, counts.shape[0]), start,
                     -1 if C is None else C, slot)
    total = counts.sum(axis=0)                     # (E,) choices per expert
    if C is not None:
        total = np.minimum(total, C)
    return np.ascontiguousarray(slot.reshape(k, T).T), total.astype(np.int64)


def _capacity_args(expert_index, position, num_experts, capacity, op):
    e, E = check_expert_index(expert_index, num_experts, op)
    C = check_capacity(capacity, op)
    if C is None:
        raise ValueError(f"{op}: capacity mode needs an integer capacity; for dropless "
                         f"routing use the sorted layout (sort_tokens / dispatch_sorted)")
    p = check_position(position, e, C, op)
    return _c(e), _c(p), E, C


def dispatch(x: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
             num_experts: int, capacity: int) -> np.ndarray:
    """buffer[e_tj, p_tj] = x[t]; zeros in unused slots.  (E, C, d)"""
    e, p, E, C = _capacity_args(expert_index, position, num_experts, capacity, "dispatch")
    x = _c(check_rows(x, e.shape[0], "x", "dispatch"))             # (T, d)
    src = _invert_rows(_slot_rows(e, p, C), E * C)                 # (E*C,)
    buffer = np.zeros((E * C, x.shape[1]), dtype=x.dtype)          # (E*C, d), see below
    with _threads_for(buffer.size):
        _gather_rows(x, src, e.shape[1], buffer)
    return buffer.reshape(E, C, x.shape[1])                        # (E, C, d)


def dispatch_backward(grad_buffer: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
                      num_experts: int, capacity: int) -> np.ndarray:
    """dL/dx_t = sum_j dL/dbuffer[e_tj, p_tj], j = 0..k-1.  (T, d)"""
    e, p, E, C = _capacity_args(expert_index, position, num_experts, capacity,
                                "dispatch_backward")
    g = _c(check_buffer(grad_buffer, E, C, "grad_buffer", "dispatch_backward"))
    grad_x = np.empty((e.shape[0], g.shape[2]), dtype=g.dtype)     # (T, d)
    with _threads_for(g.size):
        _gather_sum(g.reshape(E * C, g.shape[2]), _slot_rows(e, p, C), grad_x)
    return grad_x


def combine(buffer_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
            combine_weight: np.ndarray) -> np.ndarray:
    """y_t = sum_j w_tj * buffer_out[e_tj, p_tj], j = 0..k-1.  (T, d)"""
    out = np.asarray(buffer_out)
    if out.ndim != 3:
        raise ValueError(f"combine: buffer_out must have shape (E, C, d), got {out.shape}")
    E, C, d = out.shape
    e, p, E, C = _capacity_args(expert_index, position, E, C, "combine")
    out = _c(check_buffer(out, E, C, "buffer_out", "combine"))
    w = _c(check_weight(combine_weight, e.shape, "combine"))       # (T, k)
    y = np.empty((e.shape[0], d), dtype=np.result_type(out, w))    # (T, d)
    with _threads_for(out.size):
        _gather_weighted_sum(out.reshape(E * C, d), _slot_rows(e, p, C), w, y)
    return y


def combine_backward(grad_y: np.ndarray, buffer_out: np.ndarray, expert_index: np.ndarray,
                     position: np.ndarray,
                     combine_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dbuffer_out (E, C, d), dL/dcombine_weight (T, k)); see the reference."""
    out = np.asarray(buffer_out)
    if out.ndim != 3:
        raise ValueError(f"combine_backward: buffer_out must have shape (E, C, d), got "
                         f"{out.shape}")
    E, C, d = out.shape
    e, p, E, C = _capacity_args(expert_index, position, E, C, "combine_backward")
    w = _c(check_weight(combine_weight, e.shape, "combine_backward"))   # (T, k)
    g = _c(check_rows(grad_y, e.shape[0], "grad_y", "combine_backward"))  # (T, d)
    out = _c(out).reshape(E * C, d)                                     # (E*C, d)
    row = _slot_rows(e, p, C)                                           # (T, k)
    grad_out = np.zeros((E * C, d), dtype=out.dtype)                    # (E*C, d)
    dots = np.empty(e.shape, dtype=np.result_type(out, g))              # (T, k)
    with _threads_for(out.size):
        _scatter_and_dot(out, row, g, w, _zero(out, g), grad_out, dots)  # empty slots stay 0
    return grad_out.reshape(E, C, d), dots.astype(w.dtype, copy=False)


def sort_tokens(expert_index: np.ndarray, num_experts: int,
                position: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``order`` (N,) and ``offsets`` (E+1,): a counting sort, stable in priority order."""
    e, E = check_expert_index(expert_index, num_experts, "sort_tokens")
    if position is None:
        return _sort_tokens(_c(e), _c(e), False, E)
    p = check_position(position, e, None, "sort_tokens")
    return _sort_tokens(_c(e), _c(p), True, E)


def rows_of_order(order: np.ndarray, num_tokens: int, k: int) -> np.ndarray:
    """The inverse of ``order``: row[t, j] = i where order[i] == t*k + j, or -1.  (T, k)"""
    k = check_k(k, "rows_of_order")
    order = check_order(order, num_tokens, k, "rows_of_order")
    return _rows_of_order(_c(order), num_tokens, k)


def dispatch_sorted(x: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
    """rows[i] = x[order[i] // k].  (N, d)"""
    k = check_k(k, "dispatch_sorted")
    x = _c(check_matrix(x, "x", "dispatch_sorted"))                # (T, d)
    order = _c(check_order(order, x.shape[0], k, "dispatch_sorted"))  # (N,)
    rows = np.empty((order.size, x.shape[1]), dtype=x.dtype)       # (N, d)
    with _threads_for(rows.size):
        _gather_rows(x, order, k, rows)
    return rows


def dispatch_sorted_backward(grad_rows: np.ndarray, order: np.ndarray, num_tokens: int,
                             k: int) -> np.ndarray:
    """dL/dx_t = sum_j dL/drows[row_tj], j = 0..k-1.  (T, d)"""
    order = check_order(order, num_tokens, check_k(k, "dispatch_sorted_backward"),
                        "dispatch_sorted_backward")                # (N,)
    row = rows_of_order(order, num_tokens, k)                      # (T, k)
    g = _c(check_rows(grad_rows, np.asarray(order).size, "grad_rows",
                      "dispatch_sorted_backward", rows="N"))       # (N, d)
    grad_x = np.empty((num_tokens, g.shape[1]), dtype=g.dtype)     # (T, d)
    with _threads_for(g.size):
        _gather_sum(g, row, grad_x)
    return grad_x


def combine_sorted(rows_out: np.ndarray, order: np.ndarray,
                   combine_weight: np.ndarray) -> np.ndarray:
    """y_t = sum_j w_tj * rows_out[row_tj], j = 0..k-1.  (T, d)"""
    w = np.asarray(combine_weight)
    if w.ndim != 2:
        raise ValueError(f"combine_sorted: combine_weight must have shape (T, k), got {w.shape}")
    T, k = w.shape
    w = _c(check_weight(w, (T, k), "combine_sorted"))              # (T, k)
    order = check_order(order, T, k, "combine_sorted")             # (N,)
    row = rows_of_order(order, T, k)                               # (T, k)
    out = _c(check_rows(rows_out, np.asarray(order).size, "rows_out", "combine_sorted",
                        rows="N"))                                 # (N, d)
    y = np.empty((T, out.shape[1]), dtype=np.result_type(out, w))  # (T, d)
    with _threads_for(out.size):
        _gather_weighted_sum(out, row, w, y)
    return y


def combine_sorted_backward(grad_y: np.ndarray, rows_out: np.ndarray, order: np.ndarray,
                            combine_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dL/drows_out (N, d), dL/dcombine_weight (T, k)); see the reference."""
    w = np.asarray(combine_weight)
    if w.ndim != 2:
        raise ValueError(f"combine_sorted_backward: combine_weight must have shape (T, k), "
                         f"got {w.shape}")
    T, k = w.shape
    w = _c(check_weight(w, (T, k), "combine_sorted_backward"))             # (T, k)
    order = _c(check_order(order, T, k, "combine_sorted_backward"))        # (N,)
    out = _c(check_rows(rows_out, order.size, "rows_out", "combine_sorted_backward",
                        rows="N"))                                         # (N, d)
    g = _c(check_rows(grad_y, T, "grad_y", "combine_sorted_backward"))     # (T, d)
    grad_out = np.zeros(out.shape, dtype=out.dtype)                        # (N, d)
    dots = np.empty((T, k), dtype=np.result_type(out, g))                  # (T, k)
    # check_order makes every row some pair's, so each is written; zeros all the same, so a
    # row nobody owns can never return leftover memory
    with _threads_for(out.size):
        _scatter_and_dot(out, _rows_of_order(order, T, k), g, w, _zero(out, g), grad_out, dots)
    return grad_out, dots.astype(w.dtype, copy=False)
