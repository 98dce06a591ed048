"""The plan of the dropless all-to-all (tinymoe/parallel/alltoallv.py, task 7.2): rows and
displacements from the exchanged counts, and the expert-major regrouping; checked by hand,
on empty experts and silent ranks, and against a one-process dropless layer with the
Alltoallv simulated in NumPy (no MPI needed)."""
import numpy as np
import pytest

from tinymoe.dispatch.functions import dispatch
from tinymoe.moe.topk_router import TopKRouter
from tinymoe.parallel.alltoallv import alltoallv_plan, exchange_counts


@pytest.mark.task7_2
def test_a_plan_worked_by_hand():
    """Two ranks, two local experts, top-1. This rank sends 2 rows to rank 0's expert 0, 1 to
    its expert 1, none to rank 1; it receives 1 and 0 rows from rank 0, 3 and 2 from rank 1."""
    send = np.array([[[2], [1]], [[0], [0]]])  # (D, E/D, k)
    recv = np.array([[[1], [0]], [[3], [2]]])
    plan = alltoallv_plan(send, recv)
    np.testing.assert_array_equal(plan.send_rows, [3, 0])
    np.testing.assert_array_equal(plan.send_displs, [0, 3])
    np.testing.assert_array_equal(plan.recv_rows, [1, 5])
    np.testing.assert_array_equal(plan.recv_displs, [0, 1])
    # arrival: [r0 e0 | r1 e0 e0 e0 | r1 e1 e1] = rows 0 | 1 2 3 | 4 5
    np.testing.assert_array_equal(plan.order, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(plan.offsets, [0, 4, 6])
    top2 = alltoallv_plan(np.ones((2, 1, 2), int), np.array([[[1, 2]], [[3, 1]]]))
    # arrival: r0 (c0: 0 | c1: 1 2), r1 (c0: 3 4 5 | c1: 6); expert-major: c0 of r0, r1, then c1
    np.testing.assert_array_equal(top2.order, [0, 3, 4, 5, 1, 2, 6])
    np.testing.assert_array_equal(top2.offsets, [0, 7])


@pytest.mark.task7_2
def test_empty_experts_and_silent_ranks():
    zero = alltoallv_plan(np.zeros((3, 2, 1), int), np.zeros((3, 2, 1), int))
    for a in zero[:4]:
        np.testing.assert_array_equal(a, [0, 0, 0])
    assert zero.order.shape == (0,) and zero.order.dtype == np.int64
    np.testing.assert_array_equal(zero.offsets, [0, 0, 0])
    plan = alltoallv_plan(np.array([[[0], [4]], [[0], [0]], [[2], [0]]]),
                          np.array([[[0], [0]], [[0], [3]], [[0], [1]]]))
    np.testing.assert_array_equal(plan.send_displs, [0, 4, 4])  # rank 1 gets nothing
    np.testing.assert_array_equal(plan.recv_displs, [0, 0, 3])
    np.testing.assert_array_equal(plan.offsets, [0, 0, 4])  # expert 0 is empty
    np.testing.assert_array_equal(plan.order, [0, 1, 2, 3])


def test_counts_that_are_not_counts_are_refused():
    with pytest.raises(ValueError, match=r"alltoallv_plan: send_counts must be non-negative "
                                         r"integer counts of shape \(D, E/D, k\), got int64 "
                                         r"\(2, 2, 1\) with minimum -1"):
        alltoallv_plan(np.array([[[1], [-1]], [[0], [0]]]), np.zeros((2, 2, 1), int))
    with pytest.raises(ValueError, match=r"recv_counts must be .* got float64 \(2, 2\)"):
        alltoallv_plan(np.zeros((2, 2, 1), int), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"send_counts \(2, 2, 1\) and recv_counts "
                                         r"\(2, 1, 1\) must have one shape"):
        alltoallv_plan(np.zeros((2, 2, 1), int), np.zeros((2, 1, 1), int))
    with pytest.raises(ValueError, match=r"exchange_counts: .* got \(2, 3, 1, 1\)"):
        exchange_counts(np.zeros((2, 3, 1, 1), int))


@pytest.mark.task6_1  # the top-k router's gates
@pytest.mark.task7_2
@pytest.mark.parametrize("D, k", [(2, 1), (4, 2), (2, 2)])
def test_simulated_alltoallv_gives_every_expert_its_one_process_rows(D, k):
    """D ranks of a dropless top-k layer in one process: each rank dispatches its own
    tokens (rows sorted by expert, choice, token), the counts are exchanged (a transpose),
    every rank's rows are cut by its plan's send displacements and glued by the receivers'
    receive displacements (Alltoallv in NumPy); after ``recv[order]`` each rank holds,
    expert by expert, exactly the rows the one-process dispatch gives those experts, in the
    same order. One expert is chosen by no token."""
    T, d, E = 16, 3, 4
    El = E // D
    rng = np.random.default_rng(7)
    router = TopKRouter(d, E, k, router_dtype="float64", rng=0)
    router.W_g.data = rng.standard_normal((d, E))
    router.W_g.data[0, -1] = -40.0  # feature 0 is 1 for every token: the last expert is empty
    x = rng.standard_normal((T, d))
    x[:, 0] = 1.0
    whole = router(x)
    rows_whole = dispatch(x, whole).data  # (N, d) by expert, choice, token
    starts = np.concatenate([[0], np.cumsum(np.bincount(whole.expert_index.ravel(),
                                                        minlength=E))])
    S = T // D
    sends, counts = [], []
    for r in range(D):
        routing = router(x[r * S:(r + 1) * S])
        sends.append(dispatch(x[r * S:(r + 1) * S], routing).data)  # (N_r, d)
        e = routing.expert_index  # (S, k)
        per = np.stack([np.bincount(e[:, c], minlength=E) for c in range(k)], axis=1)
        counts.append(per.reshape(D, El, k))  # (D_dst, E/D, k)
    received = exchange_counts(np.stack(counts))  # (D_dst, D_src, E/D, k)
    plans = [alltoallv_plan(counts[r], received[r]) for r in range(D)]
    for q in range(D):
        p = plans[q]
        recv = np.concatenate([sends[s][plans[s].send_displs[q]:
                                        plans[s].send_displs[q] + plans[s].send_rows[q]]
                               for s in range(D)])  # (M, d) what Alltoallv delivers to q
        assert len(recv) == p.recv_rows.sum()
        np.testing.assert_array_equal(np.diff(p.recv_displs), p.recv_rows[:-1])
        grouped = recv[p.order]  # (M, d) expert-major
        for j in range(El):
            e = q * El + j
            mine = grouped[p.offsets[j]:p.offsets[j + 1]]
            np.testing.assert_array_equal(mine, rows_whole[starts[e]:starts[e + 1]],
                                          err_msg=f"rank {q} expert {e}")
    assert starts[E] - starts[E - 1] == 0  # the empty expert
