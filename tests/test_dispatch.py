"""Token dispatch: the NumPy reference (the spec), the autograd Functions, backend choice.

The lesson-05 tasks (block_counts, block_starts: positions computed in parallel) are tested
in tests/test_dispatch_kernels.py; nothing here runs their regions.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe.dispatch import (Routing, backend_module, combine, combine_sorted, dispatch,
                              dispatch_sorted, get_backend, kernels, reference, route,
                              set_backend, use_backend)

R = reference
RNG = np.random.default_rng(5)

# The hand-made routing used throughout: 4 tokens, k = 2, 3 experts.
#   column 0 (first choices):  t0->0  t1->0  t2->1  t3->0
#   column 1 (second choices): t0->1  t1->2  t2->0  t3->1
# Queue of expert 0: t0c0, t1c0, t3c0, then the second choice t2c1.
# Queue of expert 1: t2c0, then t0c1, t3c1.  Queue of expert 2: t1c1.
E_HAND = np.array([[0, 1], [0, 2], [1, 0], [0, 1]])
P_DROPLESS = np.array([[0, 1], [1, 0], [0, 3], [2, 2]])
P_CAP2 = np.array([[0, 1], [1, 0], [0, -1], [-1, -1]])


def _routing(e, w, num_experts, capacity):
    """A Routing whose positions come from the kernel (not from the task-5_2 region)."""
    position, counts = kernels.assign_positions(e, num_experts, capacity)
    return Routing(np.asarray(e, dtype=np.int64), w, position, counts, num_experts, capacity)


def _random_routing(T, E, k, rng):
    """Distinct experts per token, in a random priority order."""
    rows = [rng.permutation(E)[:k] for _ in range(T)]
    return np.array(rows, dtype=np.int64).reshape(T, k)


@pytest.fixture(autouse=True)
def _restore_backend():
    from tinymoe.dispatch import backend
    saved = backend._active
    yield
    backend._active = saved


# --- assign_positions: the convention ----------------------------------------------------

def test_priority_order_hand_example():
    position, counts = R.assign_positions(E_HAND, 3)
    np.testing.assert_array_equal(position, P_DROPLESS)
    np.testing.assert_array_equal(counts, [4, 3, 1])
    position, counts = R.assign_positions(E_HAND, 3, capacity=2)
    np.testing.assert_array_equal(position, P_CAP2)
    np.testing.assert_array_equal(counts, [2, 2, 1])
    assert position.dtype == np.int64 and counts.dtype == np.int64


def test_first_choices_beat_earlier_tokens_second_choices():
    # token 0's second choice is expert 1; token 1's first choice is expert 1, capacity 1:
    # choice-major priority keeps token 1 (an interleaved per-token order would keep token 0)
    position, counts = R.assign_positions(np.array([[0, 1], [1, 0]]), 2, capacity=1)
    np.testing.assert_array_equal(position, [[0, -1], [0, -1]])
    np.testing.assert_array_equal(counts, [1, 1])


def test_capacity_keeps_exactly_c_no_off_by_one():
    e = np.zeros((10, 1), dtype=np.int64)  # every token wants expert 0
    for C in (1, 3, 9, 10, 11):
        position, counts = R.assign_positions(e, 2, capacity=C)
        kept = min(C, 10)
        np.testing.assert_array_equal(position[:, 0], [*range(kept), *[-1] * (10 - kept)])
        np.testing.assert_array_equal(counts, [kept, 0])


@given(T=st.integers(0, 30), E=st.integers(1, 6), data=st.data())
def test_assign_positions_invariants(T, E, data):
    k = data.draw(st.integers(1, E), label="k")
    capacity = data.draw(st.one_of(st.none(), st.integers(1, 2 * T + 2)), label="capacity")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    e = _random_routing(T, E, k, np.random.default_rng(seed))
    position, counts = R.assign_positions(e, E, capacity)
    assert position.shape == (T, k) and counts.shape == (E,)
    prio_e, prio_p = e.T.reshape(-1), position.T.reshape(-1)  # choices in priority order
    for expert in range(E):
        p = prio_p[prio_e == expert]
        n_kept = len(p) if capacity is None else min(len(p), capacity)
        # the kept choices take slots 0, 1, ..., n-1 in priority order; the rest are dropped
        np.testing.assert_array_equal(p, [*range(n_kept), *[-1] * (len(p) - n_kept)])
        assert counts[expert] == n_kept
    if capacity is None:
        assert (position >= 0).all()
    else:
        assert (counts <= capacity).all() and position.max(initial=-1) < capacity


def test_assign_positions_edge_cases():
    position, counts = R.assign_positions(np.zeros((0, 2), dtype=np.int64), 4, capacity=3)
    assert position.shape == (0, 2) and counts.tolist() == [0, 0, 0, 0]
    position, counts = R.assign_positions(np.array([[0]]), 1)
    assert position.tolist() == [[0]] and counts.tolist() == [1]
    position, _ = R.assign_positions(np.array([[0, 1, 2]] * 3), 3, capacity=1)  # k = E
    np.testing.assert_array_equal(position, [[0, 0, 0], [-1, -1, -1], [-1, -1, -1]])
    # int32 indices are accepted and the result is int64
    position, _ = R.assign_positions(E_HAND.astype(np.int32), 3)
    assert position.dtype == np.int64


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("args, error, match", [
    ((np.array([[0, 3]]), 3), ValueError, r"holds 3, outside \[0, 3\)"),
    ((np.array([[-1]]), 3), ValueError, r"holds -1"),
    ((np.array([[0]]), 0), ValueError, "num_experts=0 must be an integer >= 1"),
    ((np.array([[0]]), 2, 0), ValueError, "capacity must be an integer >= 1"),
    ((np.array([[0]]), 2, 1.5), ValueError, "capacity must be an integer >= 1"),
    ((np.array([[0]]), 2, True), ValueError, "capacity must be an integer >= 1"),
    ((np.array([0, 1]), 2), ValueError, r"shape \(T, k\)"),
    ((np.zeros((3, 0), dtype=np.int64), 2), ValueError, "k >= 1"),
    ((np.array([[0.0, 1.0]]), 2), TypeError, "integers"),
])
def test_assign_positions_errors(backend, args, error, match):
    with pytest.raises(error, match=match):
        backend_module(backend).assign_positions(*args)


# --- capacity mode -------------------------------------------------------------------------

def test_dispatch_and_combine_hand_example():
    x = np.arange(4 * 2, dtype=np.float64).reshape(4, 2) + 1  # token t's row: [2t+1, 2t+2]
    buf = R.dispatch(x, E_HAND, P_CAP2, 3, 2)
    expected = np.zeros((3, 2, 2))
    expected[0, 0], expected[0, 1] = x[0], x[1]  # expert 0 keeps t0, t1 (t3 is dropped)
    expected[1, 0], expected[1, 1] = x[2], x[0]  # expert 1: t2 (first), t0 (second)
    expected[2, 0] = x[1]                        # expert 2: t1; slot 1 stays empty
    np.testing.assert_array_equal(buf, expected)

    w = np.array([[0.75, 0.25], [0.5, 0.5], [1.0, 3.0], [2.0, 2.0]])
    y = R.combine(buf * 10, E_HAND, P_CAP2, w)
    np.testing.assert_array_equal(y, [10 * x[0], 10 * x[1], 10 * x[2], [0, 0]])  # t3 all dropped


@given(T=st.integers(0, 25), E=st.integers(1, 5), data=st.data())
def test_backward_is_the_adjoint(T, E, data):
    """<dispatch(x), G> = <x, dispatch_backward(G)> and the same for combine (float64)."""
    k = data.draw(st.integers(1, E), label="k")
    C = data.draw(st.integers(1, T * k + 1), label="capacity")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    e, d = _random_routing(T, E, k, rng), 3
    p, _ = kernels.assign_positions(e, E, C)
    x, G = rng.standard_normal((T, d)), rng.standard_normal((E, C, d))
    lhs = np.sum(R.dispatch(x, e, p, E, C) * G)
    assert np.isclose(lhs, np.sum(x * R.dispatch_backward(G, e, p, E, C)))
    w, g = rng.standard_normal((T, k)), rng.standard_normal((T, d))
    y = R.combine(G, e, p, w)
    grad_out, grad_w = R.combine_backward(g, G, e, p, w)
    assert np.isclose(np.sum(y * g), np.sum(G * grad_out))  # linear in buffer_out
    assert np.isclose(np.sum(y * g), np.sum(w * grad_w))    # linear in combine_weight
    assert (grad_w[p < 0] == 0).all()


def test_dropped_tokens_give_zero_output_and_zero_weight_grad():
    rng = np.random.default_rng(1)
    e = np.zeros((6, 1), dtype=np.int64)
    p, _ = kernels.assign_positions(e, 2, capacity=2)
    buf_out = rng.standard_normal((2, 2, 4))
    y = R.combine(buf_out, e, p, np.ones((6, 1)))
    assert (y[2:] == 0).all() and (y[:2] != 0).all()
    _, grad_w = R.combine_backward(np.ones((6, 4)), buf_out, e, p, np.ones((6, 1)))
    assert (grad_w[2:] == 0).all()


def test_combine_matches_the_gshard_einsum():
    """Oracle: GShard's einsum form (Lepikhin et al. 2020, Algorithm 2),
    y = einsum('sec,ecm->sm', combine (T, E, C), out)."""
    rng = np.random.default_rng(2)
    T, E, k, C, d = 40, 4, 2, 12, 5
    e = _random_routing(T, E, k, rng)
    p, _ = kernels.assign_positions(e, E, C)
    w, x = rng.random((T, k)), rng.standard_normal((T, d))
    comb = np.zeros((T, E, C))  # the one-hot tensor the library never builds
    for t in range(T):
        for j in range(k):
            if p[t, j] >= 0:
                comb[t, e[t, j], p[t, j]] = w[t, j]
    np.testing.assert_allclose(R.dispatch(x, e, p, E, C),
                               np.einsum("sec,sm->ecm", comb > 0, x), rtol=0, atol=0)
    out = rng.standard_normal((E, C, d))
    np.testing.assert_allclose(R.combine(out, e, p, w), np.einsum("sec,ecm->sm", comb, out),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (dict(capacity=None), "capacity mode needs an integer capacity"),
    (dict(position=P_DROPLESS), "position holds slot 3, but capacity is 2"),
    (dict(position=np.full((4, 2), -2)), "position holds -2"),
    (dict(position=np.zeros((4, 1), dtype=np.int64)), r"position has shape \(4, 1\)"),
    (dict(x=np.zeros((5, 3))), r"x must have shape \(T, d\) with T = 4"),
    (dict(x=np.zeros((4, 3), dtype=np.int64)), "floating point"),
])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_dispatch_errors(backend, bad, match):
    args = dict(x=np.zeros((4, 3)), expert_index=E_HAND, position=P_CAP2, num_experts=3,
                capacity=2)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        backend_module(backend).dispatch(**args)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_combine_errors(backend):
    m = backend_module(backend)
    with pytest.raises(ValueError, match=r"combine_weight has shape \(4, 1\)"):
        m.combine(np.zeros((3, 2, 5)), E_HAND, P_CAP2, np.zeros((4, 1)))
    with pytest.raises(ValueError, match=r"buffer_out must have shape \(E, C, d\)"):
        m.combine(np.zeros((6, 5)), E_HAND, P_CAP2, np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"holds 2, outside \[0, 2\)"):
        m.combine(np.zeros((2, 2, 5)), E_HAND, P_CAP2, np.zeros((4, 2)))


# --- sorted (dropless) mode ---------------------------------------------------------------

def test_sort_tokens_hand_example():
    order, offsets = R.sort_tokens(E_HAND, 3)
    # pair id t*k + j; expert 0: t0c0, t1c0, t3c0, t2c1 -- same queue as the positions
    np.testing.assert_array_equal(order, [0, 2, 6, 5, 4, 1, 7, 3])
    np.testing.assert_array_equal(offsets, [0, 4, 7, 8])
    order, offsets = R.sort_tokens(E_HAND, 3, position=P_CAP2)  # dropped pairs left out
    np.testing.assert_array_equal(order, [0, 2, 4, 1, 3])
    np.testing.assert_array_equal(offsets, [0, 2, 4, 5])


@given(T=st.integers(0, 30), E=st.integers(1, 6), data=st.data())
def test_sorted_layout_is_the_packed_buffer(T, E, data):
    k = data.draw(st.integers(1, E), label="k")
    C = data.draw(st.one_of(st.none(), st.integers(1, T + 1)), label="capacity")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    e = _random_routing(T, E, k, rng)
    p, counts = kernels.assign_positions(e, E, C)
    order, offsets = R.sort_tokens(e, E, None if C is None else p)
    np.testing.assert_array_equal(np.diff(offsets), counts)
    t, j = np.nonzero(p >= 0)
    np.testing.assert_array_equal(order[offsets[e[t, j]] + p[t, j]], t * k + j)
    if C is None:  # dropless: a permutation of all T*k pairs
        np.testing.assert_array_equal(np.sort(order), np.arange(T * k))
    x = rng.standard_normal((T, 3))
    rows = R.dispatch_sorted(x, order, k)
    if C is not None:
        buf = R.dispatch(x, e, p, E, C)
        for ex in range(E):
            np.testing.assert_array_equal(rows[offsets[ex]:offsets[ex + 1]], buf[ex, :counts[ex]])


def test_dropless_round_trip_is_the_identity():
    rng = np.random.default_rng(3)
    T, E, k = 50, 5, 2
    e = _random_routing(T, E, k, rng)
    order, _ = R.sort_tokens(e, E)
    x = rng.standard_normal((T, 7))
    rows = R.dispatch_sorted(x, order, k)                       # (T*k, d)
    w = np.full((T, k), 1.0 / k)
    np.testing.assert_allclose(R.combine_sorted(rows, order, w), x, rtol=1e-15)
    # sending every token's row back: the gradient of dispatch is k copies summed
    np.testing.assert_allclose(R.dispatch_sorted_backward(rows, order, T, k), k * x)


def test_sorted_errors():
    with pytest.raises(ValueError, match=r"order holds 8, outside \[0, T\*k\) = \[0, 8\)"):
        R.dispatch_sorted(np.zeros((4, 2)), np.array([8]), 2)
    with pytest.raises(ValueError, match=r"rows_out must have shape \(N, d\) with N = 2"):
        R.combine_sorted(np.zeros((3, 2)), np.array([0, 1]), np.zeros((4, 2)))
    with pytest.raises(ValueError,
                       match=r"k \(choices per token\) must be a positive integer, got 0"):
        R.dispatch_sorted(np.zeros((4, 2)), np.array([0]), 0)


# --- autograd Functions: gradient checks ---------------------------------------------------

def _grad_inputs(T=7, E=3, k=2, d=4, C=3, seed=0):
    rng = np.random.default_rng(seed)
    e = _random_routing(T, E, k, rng)
    x = tm.tensor(rng.standard_normal((T, d)), requires_grad=True, dtype=np.float64)
    w = tm.tensor(rng.random((T, k)), requires_grad=True, dtype=np.float64)
    return e, x, w, rng


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("capacity", [3, None])
def test_gradcheck_dispatch(backend, capacity):
    set_backend(backend)
    e, x, w, _ = _grad_inputs()
    r = _routing(e, w, 3, capacity)
    assert capacity is None or r.dropped_choices.any()  # some choices are dropped
    tm.gradcheck(lambda x: dispatch(x, r), [x], names=["x"])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("capacity", [3, None])
def test_gradcheck_combine(backend, capacity):
    set_backend(backend)
    e, _, w, rng = _grad_inputs()
    r = _routing(e, w, 3, capacity)
    shape = (3, 3, 4) if capacity else (int(r.counts.sum()), 4)
    out = tm.tensor(rng.standard_normal(shape), requires_grad=True, dtype=np.float64)
    tm.gradcheck(lambda out, w: combine(out, Routing(e, w, r.position, r.counts, 3, capacity)),
                 [out, w], names=["buffer_out", "combine_weight"])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_gradcheck_layer_end_to_end(backend):
    """x -> dispatch -> per-expert tanh(buf @ W_e) -> combine: grads to x, W and the gate."""
    set_backend(backend)
    e, x, w, rng = _grad_inputs(T=6, E=3, k=2, d=3, C=4)
    W = tm.tensor(rng.standard_normal((3, 3, 3)), requires_grad=True, dtype=np.float64)

    def layer(x, w, W):
        r = _routing(e, w, 3, 4)
        h = (dispatch(x, r) @ W).tanh()   # (E, C, d) @ (E, d, d): expert e's weights
        return combine(h, r)

    tm.gradcheck(layer, [x, w, W], names=["x", "combine_weight", "W"])


def test_sorted_functions_match_explicit_calls():
    e, x, w, _ = _grad_inputs(C=None)
    r = _routing(e, w, 3, None)
    rows = dispatch_sorted(x, r)
    assert rows.shape == (e.size, 4)
    y = combine_sorted(rows, r)
    assert isinstance(y, tm.Tensor) and y.shape == (7, 4)
    np.testing.assert_allclose(y.data, x.data * w.data.sum(1, keepdims=True), rtol=1e-12)


def test_combine_without_weight_grad():
    e, x, _, rng = _grad_inputs()
    w = rng.random((7, 2))  # a plain array: no gradient wanted
    r = _routing(e, w, 3, 3)
    buf = dispatch(x, r)
    combine(buf, r).sum().backward()
    assert x.grad is not None and x.grad.shape == (7, 4)


# --- Routing and route() --------------------------------------------------------------------

def test_route_builds_a_routing_with_the_numba_backend():
    set_backend("numba")
    w = np.ones((4, 2)) / 2
    r = route(tm.tensor(E_HAND), w, 3, capacity=2)
    np.testing.assert_array_equal(r.position, P_CAP2)
    np.testing.assert_array_equal(r.counts, [2, 2, 1])
    assert (r.num_tokens, r.k, r.capacity) == (4, 2, 2)
    np.testing.assert_array_equal(r.dropped_choices, P_CAP2 < 0)
    assert r.dropped_choice_fraction == 3 / 8  # 3 of the 8 choices found their expert full
    np.testing.assert_array_equal(r.dropped_tokens, [False, False, False, True])
    assert r.dropped_fraction == 1 / 4  # ... and token 3 lost both: 1 of 4 tokens
    np.testing.assert_array_equal(r.offsets, [0, 2, 4, 5])
    np.testing.assert_array_equal(r.order, [0, 2, 4, 1, 3])


def test_route_with_the_numpy_backend():
    with use_backend("numpy"):
        r = route(E_HAND, np.ones((4, 2)), 3)
    np.testing.assert_array_equal(r.position, P_DROPLESS)
    np.testing.assert_array_equal(r.offsets, [0, 4, 7, 8])


# --- backend choice -------------------------------------------------------------------------

def test_backend_choice():
    set_backend("numpy")
    assert get_backend() == "numpy" and backend_module() is reference
    with use_backend("numba") as m:
        assert get_backend() == "numba" and m is kernels
    assert get_backend() == "numpy"
    with pytest.raises(ValueError, match="valid backends are 'numba', 'numpy'"):
        set_backend("torch")
    with pytest.raises(ValueError, match="unknown dispatch backend"), use_backend("cuda"):
        pass
    assert get_backend() == "numpy"


def test_use_backend_restores_after_an_error():
    set_backend("numba")
    with pytest.raises(RuntimeError), use_backend("numpy"):
        raise RuntimeError
    assert get_backend() == "numba"


def test_backend_from_environment(monkeypatch):
    from tinymoe.dispatch import backend
    monkeypatch.setattr(backend, "_active", None)
    monkeypatch.setenv("TINYMOE_DISPATCH", "numpy")
    assert get_backend() == "numpy"
    monkeypatch.setattr(backend, "_active", None)
    monkeypatch.delenv("TINYMOE_DISPATCH")
    assert get_backend() == "numba"  # the default
    monkeypatch.setattr(backend, "_active", None)
    monkeypatch.setenv("TINYMOE_DISPATCH", "fortran")
    with pytest.raises(ValueError, match="TINYMOE_DISPATCH.*'fortran'"):
        get_backend()


def test_numba_is_imported_lazily():
    code = ("import sys, tinymoe as tm, tinymoe.dispatch as d; "
            "assert 'numba' not in sys.modules, 'imported too early'; "
            "d.set_backend('numpy'); d.backend_module(); assert 'numba' not in sys.modules; "
            "d.set_backend('numba'); d.backend_module(); assert 'numba' in sys.modules")
    env = {k: v for k, v in os.environ.items() if k != "TINYMOE_DISPATCH"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# --- against PyTorch's autograd (skipped without torch) -------------------------------------

@pytest.mark.torch
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_layer_matches_pytorch(backend):
    """dispatch -> tanh -> combine and its gradients, against index_select/index_add."""
    torch = pytest.importorskip("torch")
    set_backend(backend)
    e, x, w, rng = _grad_inputs(T=20, E=4, k=2, d=5, C=6)
    r = _routing(e, w, 4, 6)
    y = combine(dispatch(x, r).tanh(), r)
    g = rng.standard_normal(y.shape)
    y.backward(g)

    t, j = np.nonzero(r.position >= 0)
    tok, slot = torch.from_numpy(t), torch.from_numpy(e[t, j] * 6 + r.position[t, j])
    pair = torch.from_numpy(t * 2 + j)
    xt = torch.tensor(x.data, requires_grad=True)
    wt = torch.tensor(w.data, requires_grad=True)
    buf = xt.new_zeros(4 * 6, 5).index_copy(0, slot, xt.index_select(0, tok)).tanh()
    rows = buf.index_select(0, slot) * wt.reshape(-1).index_select(0, pair)[:, None]
    yt = rows.new_zeros(20, 5).index_add(0, tok, rows)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(y.data, yt.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(x.grad, xt.grad.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(w.grad, wt.grad.numpy(), rtol=1e-12, atol=1e-14)
