"""The plan of a variable-size all-to-all: what the counts exchange of the dropless mode buys.

In the dropless expert-parallel layer (Mixtral, DeepSeekMoE, MegaBlocks: no capacity, no
padding) rank r sends each rank exactly the rows routed to that rank's experts, and the
router decides those numbers anew in every batch. ``MPI_Alltoallv`` moves such rows, but
every rank must tell it how many rows go where and where they start::

    Alltoallv(send, send_rows, send_displs,  recv, recv_rows, recv_displs)
        rows send[send_displs[q] : send_displs[q] + send_rows[q]]  go to rank q
        rows from rank s land at recv[recv_displs[s] : recv_displs[s] + recv_rows[s]]

A rank knows what it sends, not what it will receive, so the layer first exchanges the
counts (a fixed-size ``MPI_Alltoall`` of integers; in one process, a transpose of the
(D_src, D_dst, ...) count matrix):

    send_counts[q, j, c]  rows this rank sends to the j-th local expert of rank q, as
                          choice c (its c-th expert of a token)                (D, E/D, k)
    recv_counts[s, j, c]  rows rank s sends to my j-th local expert, choice c  (D, E/D, k)

and then every rank computes, with no more communication (:func:`alltoallv_plan`):

    send_rows[q]  = Σ_{j,c} send_counts[q, j, c]      recv_rows[s] = Σ_{j,c} recv_counts[s, j, c]
    send_displs[q] = Σ_{q' < q} send_rows[q']        recv_displs[s] = Σ_{s' < s} recv_rows[s']

(exclusive prefix sums: the first block starts at 0). The received rows are **source-major**
(rank 0's rows, then rank 1's, ...; each sorted by expert, then choice, then token, as the
dispatch sorted them), but the experts' grouped matmul wants them **expert-major**: all of
expert j's rows together, choice by choice, and within a choice in token order, which is
source order (rank s owns tokens s·S .. (s+1)·S - 1). So the plan also gives the
permutation ``order``: ``recv[order]`` is expert j's first-choice rows from rank 0, from rank
1, ..., its second-choice rows from rank 0, ..., then expert j+1's; and ``offsets``
(E/D + 1,), where each local expert's rows start. Block (s, j, c) of the receive buffer
starts at the exclusive prefix sum of ``recv_counts`` in source-major order.

The reverse all-to-all (the combine, and the backward of the dispatch) is the same plan with
sends and receives swapped, and ``argsort(order)`` undoes the regrouping.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class AlltoallvPlan(NamedTuple):
    send_rows: np.ndarray    # (D,) rows this rank sends to each rank
    send_displs: np.ndarray  # (D,) first row of each rank's block in the send buffer
    recv_rows: np.ndarray    # (D,) rows this rank receives from each rank
    recv_displs: np.ndarray  # (D,) first row of each rank's block in the receive buffer
    order: np.ndarray        # (M,) recv[order] is expert-major (expert, choice, source)
    offsets: np.ndarray      # (E/D + 1,) expert j's rows are recv[order][offsets[j]:offsets[j+1]]


def _counts(a: Any, name: str) -> np.ndarray:
    c = np.asarray(a)
    if c.ndim != 3 or c.dtype.kind not in "iu" or (c.size and c.min() < 0):
        raise ValueError(f"alltoallv_plan: {name} must be non-negative integer counts of shape "
                         f"(D, E/D, k), got {c.dtype} {c.shape}"
                         + (f" with minimum {c.min()}" if c.size and c.dtype.kind in "iu"
                            else ""))
    return c.astype(np.int64)


def alltoallv_plan(send_counts: Any, recv_counts: Any) -> AlltoallvPlan:
    """Rows, displacements and the expert-major regrouping of one ``MPI_Alltoallv``.

    ``send_counts`` (D, E/D, k): rows this rank sends to each rank's local experts, per
    choice; ``recv_counts`` (D, E/D, k): what each rank sends this rank's experts (the
    result of the counts exchange). See the module docstring for the formulas.
    """
    send_counts, recv_counts = _counts(send_counts, "send_counts"), _counts(recv_counts,
                                                                            "recv_counts")
    if send_counts.shape != recv_counts.shape:
        raise ValueError(f"alltoallv_plan: send_counts {send_counts.shape} and recv_counts "
                         f"{recv_counts.shape} must have one shape (D ranks, E/D local "
                         f"experts, k choices) on every rank")
    D, El, k = recv_counts.shape
    ### BEGIN SOLUTION task7_2
    send_rows = send_counts.sum(axis=(1, 2))  # (D,) rows to each rank
    recv_rows = recv_counts.sum(axis=(1, 2))  # (D,) rows from each rank
    send_displs = np.cumsum(send_rows) - send_rows  # (D,) exclusive prefix sums
    recv_displs = np.cumsum(recv_rows) - recv_rows  # (D,)
    flat = recv_counts.reshape(-1)  # (D·E/D·k,) blocks in arrival order: source, expert, choice
    start = (np.cumsum(flat) - flat).reshape(D, El, k)  # where block (s, j, c) starts
    blocks = [np.arange(start[s, j, c], start[s, j, c] + recv_counts[s, j, c])
              for j in range(El) for c in range(k) for s in range(D)]  # expert, choice, source
    order = np.concatenate([np.zeros(0, np.int64), *blocks])  # (M,)
    offsets = np.concatenate([[0], np.cumsum(recv_counts.sum(axis=(0, 2)))])  # (E/D + 1,)
    ### END SOLUTION
    as_int = (np.asarray(a, dtype=np.int64) for a in
              (send_rows, send_displs, recv_rows, recv_displs, order, offsets))
    return AlltoallvPlan(*as_int)


def exchange_counts(send_counts: Any) -> np.ndarray:
    """The counts exchange of all D ranks simulated in one process: rank r's
    ``send_counts`` (D_dst, E/D, k) stacked into (D_src, D_dst, E/D, k); returns what each
    rank receives, (D_dst, D_src, E/D, k): ``received[q][s] = send_counts[s][q]``, the
    transpose that ``MPI_Alltoall`` makes of the integers."""
    c = np.asarray(send_counts)
    if c.ndim != 4 or c.shape[0] != c.shape[1]:
        raise ValueError(f"exchange_counts: send_counts must be (D_src, D_dst, E/D, k) with "
                         f"D_src = D_dst, got {c.shape}")
    return np.ascontiguousarray(np.swapaxes(c, 0, 1))  # (D_dst, D_src, E/D, k)


__all__ = ["AlltoallvPlan", "alltoallv_plan", "exchange_counts"]
