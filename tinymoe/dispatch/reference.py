"""Token dispatch in plain, vectorised NumPy: the specification the Numba kernels must match.

Every router ends in three (T, k) arrays, one row per token, one column per choice:

    expert_index[t, j]    which expert token t chose in its j-th choice (j = 0 is the best)
    combine_weight[t, j]  the gate value that choice is weighted by
    position[t, j]        the slot of that choice inside its expert's buffer, -1 if dropped

Two layouts for the experts' inputs:

* capacity mode: a buffer (E, C, d); expert e reads ``buffer[e]`` and slot p of it holds the
  token whose choice got ``position == p`` (zeros in slots nobody took);
* sorted (dropless) mode: the N kept (token, choice) pairs as rows (N, d), grouped by expert;
  expert e reads rows ``offsets[e]:offsets[e + 1]``.

``dispatch`` copies tokens in, the experts run, ``combine`` adds their outputs back,

    y_t = sum_j  w_tj * out[e_tj, p_tj]          (over the kept choices, j = 0, 1, ..., k-1)

Both are linear, so their backward passes are the transposed copies (see each function).
The order of every floating-point sum is fixed (choices j = 0..k-1, in that order), which
is what lets the Numba kernels reproduce these results bit for bit.
"""
from __future__ import annotations

import numpy as np

from tinymoe import validate
from tinymoe.dispatch._checks import (check_buffer, check_capacity, check_expert_index,
                                      check_k, check_matrix, check_order, check_position,
                                      check_rows, check_weight)

# --- positions: who gets which slot ------------------------------------------------------


def assign_positions(expert_index: np.ndarray, num_experts: int,
                     capacity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Slot of every choice in its expert's queue, and how many slots each expert fills.

    Convention ("choice-major priority", GShard Algorithm 1 / fairseq / DeepSpeed /
    Mesh TF): all first choices (column 0) queue before all second choices, and within a
    column tokens queue in sequence order. Reading the choices in that order,

        position[t, j] = #{earlier choices (t', j') with expert_index[t', j'] == expert_index[t, j]}

    an *exclusive* prefix sum per expert (fairseq's ``cumsum(mask) - 1`` with
    ``locations2 += sum(mask1)``). With a capacity C the first C choices of an expert are
    kept (``position < C``, exclusive sum so no off-by-one) and the rest get -1 (dropped);
    ``counts[e] = min(#choices of e, C)``. ``capacity=None`` is dropless: nothing is -1.

    Memory: a (T·k, E) one-hot, fine at teaching sizes; the kernel keeps E counters instead.
    """
    e, E = check_expert_index(expert_index, num_experts, "assign_positions")  # (T, k)
    capacity = check_capacity(capacity, "assign_positions")
    T, k = e.shape
    prio = e.T.reshape(-1)                       # (k*T,) experts in priority order, column 0 first
    onehot = prio[:, None] == np.arange(E)       # (k*T, E) which expert each choice picked
    before = np.cumsum(onehot, axis=0) - onehot  # (k*T, E) exclusive prefix sum: earlier picks
    slot = before[np.arange(k * T), prio]        # (k*T,) earlier picks of my own expert
    position = slot.reshape(k, T).T              # (T, k) back to token-major
    counts = np.bincount(e.reshape(-1), minlength=E)  # (E,) choices per expert
    if capacity is not None:
        position = np.where(position < capacity, position, -1)  # (T, k) slots >= C are dropped
        counts = np.minimum(counts, capacity)                    # (E,) at most C kept
    return (np.ascontiguousarray(position, dtype=np.int64),
            np.ascontiguousarray(counts, dtype=np.int64))


# --- positions in parallel: count per block, scan the counts, fill per block --------------
#
# The running counter of assign_positions is serial: choice i needs the count of every
# earlier choice. Cut the choices (in priority order) into B blocks and it parallelises in
# three passes, the way a GPU computes positions: (1) each block counts its own choices per
# expert, (2) an exclusive prefix sum of those counts down the blocks tells each block where
# its first choice of every expert goes, (3) each block fills its slots from there. Passes 1
# and 3 write only their own block's entries: no two threads share a counter.


def block_size(num_choices: int, num_blocks: int) -> int:
    """Choices per block: ceil(T·k / B), at least 1 (the last blocks may be short or empty)."""
    return max(1, -(-int(num_choices) // int(num_blocks)))


def check_num_blocks(num_blocks, op: str) -> int:
    """``num_blocks`` as an int >= 1."""
    return validate.positive_int(num_blocks, "num_blocks", op)


def block_counts(expert_index: np.ndarray, num_experts: int,
                 num_blocks: int) -> np.ndarray:
    """counts[b, e] = the choices of expert e in block b.  (B, E) int64

    The T·k choices in the priority order of :func:`assign_positions` (column 0 first,
    tokens in order within a column) are cut into B blocks of ``block_size(T·k, B)``
    consecutive choices; choice i (in that order) lies in block ``i // block_size``.
    """
    e, E = check_expert_index(expert_index, num_experts, "block_counts")  # (T, k)
    B = check_num_blocks(num_blocks, "block_counts")
    prio = e.T.reshape(-1)                     # (k*T,) experts in priority order
    size = block_size(prio.size, B)
    counts = np.zeros((B, E), dtype=np.int64)  # (B, E)
    ### BEGIN SOLUTION task5_1
    block = np.arange(prio.size) // size                  # (k*T,) the block of each choice
    np.add.at(counts, (block, prio), 1)                    # (B, E) one count per choice
    ### END SOLUTION
    return counts


def check_block_counts(counts, op: str) -> np.ndarray:
    """``counts`` as a (B, E) int64 array of counts >= 0."""
    c = np.asarray(counts)
    if c.ndim != 2 or c.dtype.kind not in "iu":
        raise ValueError(f"{op}: counts must be a (B, E) integer array (block_counts), got "
                         f"shape {c.shape} dtype {c.dtype}")
    if c.size and int(c.min()) < 0:
        raise ValueError(f"{op}: counts holds {int(c.min())}; counts are >= 0")
    return np.ascontiguousarray(c, dtype=np.int64)


def block_starts(counts: np.ndarray) -> np.ndarray:
    """start[b, e] = sum over b' < b of counts[b', e]: the slot where block b's first choice
    of expert e goes, the *exclusive* prefix sum of the block counts down the blocks.  (B, E)
    """
    c = check_block_counts(counts, "block_starts")  # (B, E)
    start = np.zeros_like(c)                   # (B, E)
    ### BEGIN SOLUTION task5_2
    start[1:] = np.cumsum(c[:-1], axis=0)     # (B-1, E) everything the earlier blocks took
    ### END SOLUTION
    return start


# --- capacity mode: buffers (E, C, d) ----------------------------------------------------


def _capacity_args(expert_index, position, num_experts, capacity, op):
    e, E = check_expert_index(expert_index, num_experts, op)  # (T, k)
    C = check_capacity(capacity, op)
    if C is None:
        raise ValueError(f"{op}: capacity mode needs an integer capacity; for dropless "
                         f"routing use the sorted layout (sort_tokens / dispatch_sorted)")
    p = check_position(position, e, C, op)  # (T, k)
    return e, p, E, C


def dispatch(x: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
             num_experts: int, capacity: int) -> np.ndarray:
    """buffer[e_tj, p_tj] = x[t] for every kept choice; zeros in unused slots.  (E, C, d)

    Slots are unique (positions come from a prefix sum), so this is a pure copy.
    """
    e, p, E, C = _capacity_args(expert_index, position, num_experts, capacity, "dispatch")
    x = check_rows(x, e.shape[0], "x", "dispatch")  # (T, d)
    buffer = np.zeros((E, C, x.shape[1]), dtype=x.dtype)  # (E, C, d)
    t, j = np.nonzero(p >= 0)                        # (n,), (n,) the kept choices
    buffer[e[t, j], p[t, j]] = x[t]                  # (n, d) rows into unique slots
    return buffer


def dispatch_backward(grad_buffer: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
                      num_experts: int, capacity: int) -> np.ndarray:
    """dL/dx_t = sum_j dL/dbuffer[e_tj, p_tj] over kept choices, j = 0..k-1.  (T, d)

    The transpose of a copy is a gather; a token sent to two experts gets both gradients.
    """
    e, p, E, C = _capacity_args(expert_index, position, num_experts, capacity,
                                "dispatch_backward")
    g = check_buffer(grad_buffer, E, C, "grad_buffer", "dispatch_backward")  # (E, C, d)
    grad_x = np.zeros((e.shape[0], g.shape[2]), dtype=g.dtype)  # (T, d)
    for j in range(e.shape[1]):  # fixed summation order over the choices
        kept = p[:, j] >= 0                                  # (T,)
        grad_x[kept] += g[e[kept, j], p[kept, j]]            # (n, d)
    return grad_x


def combine(buffer_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
            combine_weight: np.ndarray) -> np.ndarray:
    """y_t = sum_j w_tj * buffer_out[e_tj, p_tj] over kept choices, j = 0..k-1.  (T, d)

    A token whose choices were all dropped gets a zero row (the layer's residual carries it).
    The dtype is that of ``buffer_out * combine_weight``.
    """
    out = np.asarray(buffer_out)
    if out.ndim != 3:
        raise ValueError(f"combine: buffer_out must have shape (E, C, d), got {out.shape}")
    E, C, d = out.shape
    e, p, E, C = _capacity_args(expert_index, position, E, C, "combine")  # (T, k)
    out = check_buffer(out, E, C, "buffer_out", "combine")
    w = check_weight(combine_weight, e.shape, "combine")  # (T, k)
    y = np.zeros((e.shape[0], d), dtype=np.result_type(out, w))  # (T, d)
    for j in range(e.shape[1]):  # fixed summation order over the choices
        kept = p[:, j] >= 0                                              # (T,)
        y[kept] += w[kept, j, None] * out[e[kept, j], p[kept, j]]        # (n, 1) * (n, d)
    return y


def combine_backward(grad_y: np.ndarray, buffer_out: np.ndarray, expert_index: np.ndarray,
                     position: np.ndarray,
                     combine_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of ``combine`` wrt ``buffer_out`` (E, C, d) and ``combine_weight`` (T, k).

        dL/dbuffer_out[e_tj, p_tj] = w_tj * g_t          (unique slots; zeros elsewhere)
        dL/dw_tj = buffer_out[e_tj, p_tj] . g_t          (0 for a dropped choice)
    """
    out = np.asarray(buffer_out)
    if out.ndim != 3:
        raise ValueError(f"combine_backward: buffer_out must have shape (E, C, d), got "
                         f"{out.shape}")
    E, C, _ = out.shape
    e, p, E, C = _capacity_args(expert_index, position, E, C, "combine_backward")  # (T, k)
    w = check_weight(combine_weight, e.shape, "combine_backward")  # (T, k)
    g = check_rows(grad_y, e.shape[0], "grad_y", "combine_backward")  # (T, d)
    grad_out = np.zeros_like(out)                           # (E, C, d)
    grad_w = np.zeros(e.shape, dtype=w.dtype)               # (T, k)
    t, j = np.nonzero(p >= 0)                               # (n,), (n,) the kept choices
    slot_e, slot_p = e[t, j], p[t, j]                       # (n,), (n,)
    grad_out[slot_e, slot_p] = w[t, j, None] * g[t]         # (n, 1) * (n, d) into unique slots
    grad_w[t, j] = np.einsum("nd,nd->n", out[slot_e, slot_p], g[t])  # (n,) row-wise dot
    return grad_out, grad_w


# --- sorted (dropless) mode: rows (N, d) grouped by expert -------------------------------


def sort_tokens(expert_index: np.ndarray, num_experts: int,
                position: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The kept (token, choice) pairs grouped by expert: ``order`` (N,), ``offsets`` (E+1,).

    ``order[i] = t*k + j`` names a pair; pairs are sorted by expert, stably in the priority
    order of :func:`assign_positions` (column 0 first, then tokens in order), so expert e's
    rows are ``order[offsets[e]:offsets[e+1]]`` and ``order[offsets[e] + position[t, j]] ==
    t*k + j``. Pass ``position`` to leave out dropped pairs (-1); without it all T·k pairs
    are kept (dropless).
    """
    e, E = check_expert_index(expert_index, num_experts, "sort_tokens")  # (T, k)
    T, k = e.shape
    prio = e.T.reshape(-1)                               # (k*T,) experts in priority order
    pair = np.arange(T * k).reshape(T, k).T.reshape(-1)  # (k*T,) pair id t*k + j, same order
    if position is not None:
        p = check_position(position, e, None, "sort_tokens")  # (T, k)
        kept = p.T.reshape(-1) >= 0                       # (k*T,)
        prio, pair = prio[kept], pair[kept]               # (N,), (N,)
    order = pair[np.argsort(prio, kind="stable")]         # (N,) grouped by expert, stable
    counts = np.bincount(prio, minlength=E)               # (E,)
    offsets = np.zeros(E + 1, dtype=np.int64)             # (E+1,)
    offsets[1:] = np.cumsum(counts)                       # exclusive prefix sum of counts
    return order.astype(np.int64, copy=False), offsets


def rows_of_order(order: np.ndarray, num_tokens: int, k: int) -> np.ndarray:
    """The inverse of ``order``: row[t, j] = i where order[i] == t*k + j, or -1.  (T, k)"""
    order = check_order(order, num_tokens, check_k(k, "rows_of_order"), "rows_of_order")
    row = np.full(num_tokens * k, -1, dtype=np.int64)  # (T*k,)
    row[order] = np.arange(order.size)                 # (N,) invert the permutation
    return row.reshape(num_tokens, k)                   # (T, k)


def dispatch_sorted(x: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
    """rows[i] = x[order[i] // k]: tokens copied into expert-sorted order.  (N, d)"""
    k = check_k(k, "dispatch_sorted")
    x = check_matrix(x, "x", "dispatch_sorted")                    # (T, d)
    order = check_order(order, x.shape[0], k, "dispatch_sorted")  # (N,)
    return x[order // k]                                             # (N, d)


def dispatch_sorted_backward(grad_rows: np.ndarray, order: np.ndarray, num_tokens: int,
                             k: int) -> np.ndarray:
    """dL/dx_t = sum_j dL/drows[row_tj] over the pairs present, j = 0..k-1.  (T, d)"""
    order = check_order(order, num_tokens, check_k(k, "dispatch_sorted_backward"),
                        "dispatch_sorted_backward")  # (N,)
    row = rows_of_order(order, num_tokens, k)  # (T, k)
    g = check_rows(grad_rows, np.asarray(order).size, "grad_rows", "dispatch_sorted_backward",
                   rows="N")  # (N, d)
    grad_x = np.zeros((num_tokens, g.shape[1]), dtype=g.dtype)  # (T, d)
    for j in range(k):  # fixed summation order over the choices
        kept = row[:, j] >= 0                  # (T,)
        grad_x[kept] += g[row[kept, j]]        # (n, d)
    return grad_x


def combine_sorted(rows_out: np.ndarray, order: np.ndarray,
                   combine_weight: np.ndarray) -> np.ndarray:
    """y_t = sum_j w_tj * rows_out[row_tj] over the pairs present, j = 0..k-1.  (T, d)"""
    w = np.asarray(combine_weight)
    if w.ndim != 2:
        raise ValueError(f"combine_sorted: combine_weight must have shape (T, k), got {w.shape}")
    T, k = w.shape
    w = check_weight(w, (T, k), "combine_sorted")        # (T, k)
    order = check_order(order, T, k, "combine_sorted")   # (N,)
    row = rows_of_order(order, T, k)                     # (T, k)
    out = check_rows(rows_out, np.asarray(order).size, "rows_out", "combine_sorted",
                     rows="N")                           # (N, d)
    y = np.zeros((T, out.shape[1]), dtype=np.result_type(out, w))  # (T, d)
    for j in range(k):  # fixed summation order over the choices
        kept = row[:, j] >= 0                                    # (T,)
        y[kept] += w[kept, j, None] * out[row[kept, j]]          # (n, 1) * (n, d)
    return y


def combine_sorted_backward(grad_y: np.ndarray, rows_out: np.ndarray, order: np.ndarray,
                            combine_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of ``combine_sorted`` wrt ``rows_out`` (N, d) and ``combine_weight`` (T, k).

        dL/drows_out[i] = w_tj * g_t   where order[i] = t*k + j
        dL/dw_tj = rows_out[row_tj] . g_t   (0 for a pair not in ``order``)
    """
    w = np.asarray(combine_weight)
    if w.ndim != 2:
        raise ValueError(f"combine_sorted_backward: combine_weight must have shape (T, k), "
                         f"got {w.shape}")
    T, k = w.shape
    w = check_weight(w, (T, k), "combine_sorted_backward")                  # (T, k)
    order = check_order(order, T, k, "combine_sorted_backward")             # (N,)
    out = check_rows(rows_out, order.size, "rows_out", "combine_sorted_backward",
                     rows="N")                                              # (N, d)
    g = check_rows(grad_y, T, "grad_y", "combine_sorted_backward")          # (T, d)
    t, j = order // k, order % k                                            # (N,), (N,)
    grad_out = (w[t, j, None] * g[t]).astype(out.dtype, copy=False)         # (N, 1) * (N, d)
    grad_w = np.zeros((T, k), dtype=w.dtype)                                # (T, k)
    grad_w[t, j] = np.einsum("nd,nd->n", out, g[t])                         # (N,) row-wise dot
    return grad_out, grad_w
