"""The Numba kernels against the NumPy reference: same results, bit for bit, on any routing.

Bit-identical everywhere except the gradient wrt ``combine_weight``: a dot product over d
that the kernel sums in eight lanes and NumPy's einsum in its own SIMD blocks, so there the
check is the rounding bound |difference| <= 2 (d + 1) eps sum_c |a_c g_c|; the kernel's own
order is pinned down exactly by ``test_weight_grad_dot_sums_in_its_documented_order``.

``test_kernels_run_as_python_under_disable_jit`` re-runs a subset of this file with
``NUMBA_DISABLE_JIT=1``, so the kernels' pure-Python form is tested by ``python -m pytest``.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinymoe.dispatch import kernels as K
from tinymoe.dispatch import reference as R

JIT_DISABLED = bool(int(os.environ.get("NUMBA_DISABLE_JIT", "0") or 0))


def assert_same_bits(a, b):
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), \
        f"max |difference| {np.max(np.abs(a.astype(float) - b.astype(float)), initial=0)}"


def assert_dots_close(ref, ker, scale, d):
    """|ref - ker| within the rounding bound of two summation orders of one dot product.

    ``scale`` (T, k) holds sum_c |a_c g_c| of each pair; both orders are within
    d * eps * scale of the exact value, hence of each other within twice that.
    """
    assert ref.dtype == ker.dtype and ref.shape == ker.shape
    eps = np.finfo(ref.dtype).eps
    bound = 2 * (d + 1) * eps * scale + np.finfo(ref.dtype).tiny
    assert (np.abs(ref.astype(np.float64) - ker.astype(np.float64)) <= bound).all()


def relayout(a, how):
    """The same values in another memory layout: C order, transposed (F order) or strided."""
    if how == "transposed":
        return np.ascontiguousarray(a.T).T
    if how == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    return a


@st.composite
def cases(draw):
    T = draw(st.sampled_from([0, 1, 2, 3, 7, 16, 24]))
    E = draw(st.integers(1, 5))
    k = draw(st.sampled_from(sorted({1, min(2, E), E})))
    pattern = draw(st.sampled_from(["distinct", "one_expert", "repeats"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    if pattern == "distinct":
        rows = [rng.permutation(E)[:k] for _ in range(T)]
        e = np.array(rows, dtype=np.int64).reshape(T, k)
    elif pattern == "one_expert":  # every token makes the same choices
        e = np.tile(np.arange(k), (T, 1))
    else:  # repeated experts within a token are legal for the contract
        e = rng.integers(0, E, size=(T, k))
    cap = draw(st.sampled_from(["none", "one", "heavy", "roomy"]))
    capacity = {"none": None, "one": 1, "heavy": max(1, T * k // (3 * E)),
                "roomy": T * k + 1}[cap]
    d = draw(st.sampled_from([0, 1, 5]))
    x_dtype = draw(st.sampled_from([np.float32, np.float64]))
    w_dtype = draw(st.sampled_from([np.float32, np.float64]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    x = rng.standard_normal((T, d)).astype(x_dtype)
    w = rng.random((T, k)).astype(w_dtype)
    return dict(e=e, E=E, k=k, capacity=capacity, x=x, w=w, layout=layout, rng=rng)


def _check_capacity_mode(c):
    e, E, k, C, layout, rng = c["e"], c["E"], c["k"], c["capacity"], c["layout"], c["rng"]
    p, _ = K.assign_positions(e, E, C)
    x, w = relayout(c["x"], layout), relayout(c["w"], layout)
    T, d = x.shape
    buf = R.dispatch(x, e, p, E, C)
    assert_same_bits(buf, K.dispatch(x, e, p, E, C))
    out = relayout(rng.standard_normal((E, C, d)).astype(x.dtype), layout)
    assert_same_bits(R.dispatch_backward(out, e, p, E, C), K.dispatch_backward(out, e, p, E, C))
    y = R.combine(out, e, p, w)
    assert_same_bits(y, K.combine(out, e, p, w))
    g = relayout(rng.standard_normal(y.shape).astype(y.dtype), layout)
    (ref_out, ref_w), (ker_out, ker_w) = (R.combine_backward(g, out, e, p, w),
                                          K.combine_backward(g, out, e, p, w))
    assert_same_bits(ref_out, ker_out)
    kept = p >= 0
    scale = np.zeros((T, k))
    scale[kept] = np.sum(np.abs(out[e[kept], p[kept]].astype(float))
                         * np.abs(np.repeat(g, k, 0).reshape(T, k, d)[kept]), axis=-1)
    assert_dots_close(ref_w, ker_w, scale, d)


def _check_sorted_mode(c):
    e, E, k, C, layout, rng = c["e"], c["E"], c["k"], c["capacity"], c["layout"], c["rng"]
    p, _ = K.assign_positions(e, E, C)
    pos = None if C is None else p
    (o_ref, off_ref), (o_ker, off_ker) = R.sort_tokens(e, E, pos), K.sort_tokens(e, E, pos)
    assert_same_bits(o_ref, o_ker)
    assert_same_bits(off_ref, off_ker)
    assert_same_bits(R.rows_of_order(o_ref, len(e), k), K.rows_of_order(o_ref, len(e), k))
    x, w = relayout(c["x"], layout), relayout(c["w"], layout)
    T, d = x.shape
    rows = R.dispatch_sorted(x, o_ref, k)
    assert_same_bits(rows, K.dispatch_sorted(x, o_ref, k))
    out = relayout(rng.standard_normal(rows.shape).astype(x.dtype), layout)
    assert_same_bits(R.dispatch_sorted_backward(out, o_ref, T, k),
                     K.dispatch_sorted_backward(out, o_ref, T, k))
    y = R.combine_sorted(out, o_ref, w)
    assert_same_bits(y, K.combine_sorted(out, o_ref, w))
    g = relayout(rng.standard_normal(y.shape).astype(y.dtype), layout)
    (ref_out, ref_w), (ker_out, ker_w) = (R.combine_sorted_backward(g, out, o_ref, w),
                                          K.combine_sorted_backward(g, out, o_ref, w))
    assert_same_bits(ref_out, ker_out)
    scale = np.zeros(T * k)
    scale[o_ref] = np.sum(np.abs(out.astype(float)) * np.abs(g[o_ref // k]), axis=-1)
    assert_dots_close(ref_w, ker_w, scale.reshape(T, k), d)


# --- the matrix ------------------------------------------------------------------------------

@given(c=cases())
def test_capacity_mode_matches_reference(c):
    if c["capacity"] is None:
        c["capacity"] = len(c["e"]) * c["k"] + 1  # capacity mode needs a number
    _check_capacity_mode(c)


@given(c=cases())
def test_sorted_mode_matches_reference(c):
    _check_sorted_mode(c)


@given(c=cases())
def test_assign_positions_matches_reference(c):
    ref = R.assign_positions(c["e"], c["E"], c["capacity"])
    ker = K.assign_positions(c["e"], c["E"], c["capacity"])
    assert_same_bits(ref[0], ker[0])
    assert_same_bits(ref[1], ker[1])


# --- positions in parallel: block_counts (task 5_1), block_starts (task 5_2) -------------
E_BLOCKS = np.array([[0, 1], [1, 2], [0, 2], [0, 1], [2, 0]])  # (T, k) = (5, 2)
# priority order (column 0, then column 1): 0 1 0 0 2 | 1 2 2 1 0; blocks of 4 with B = 3:
# [0 1 0 0] [2 1 2 2] [1 0]


@pytest.mark.task5_1
@pytest.mark.parametrize("backend", [R, K], ids=["numpy", "numba"])
def test_block_counts_by_hand(backend):
    counts = backend.block_counts(E_BLOCKS, 3, 3)
    assert counts.dtype == np.int64
    assert counts.tolist() == [[3, 1, 0], [0, 1, 3], [1, 1, 0]]


@pytest.mark.task5_1
@pytest.mark.parametrize("backend", [R, K], ids=["numpy", "numba"])
@given(T=st.integers(0, 25), E=st.integers(1, 5), k=st.integers(1, 3),
       B=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_block_counts_add_up_per_block(backend, T, E, k, B, seed):
    e = np.random.default_rng(seed).integers(0, E, (T, k))
    counts = backend.block_counts(e, E, B)
    assert counts.shape == (B, E)
    prio = e.T.reshape(-1)
    size = R.block_size(prio.size, B)
    for b in range(B):
        assert counts[b].tolist() == np.bincount(prio[b * size:(b + 1) * size],
                                                 minlength=E).tolist()


@pytest.mark.task5_2
@pytest.mark.parametrize("backend", [R, K], ids=["numpy", "numba"])
def test_block_starts_is_the_exclusive_prefix_sum(backend):
    counts = np.array([[3, 1, 0], [0, 1, 3], [1, 1, 0]])
    start = backend.block_starts(counts)
    assert start.dtype == np.int64
    assert start.tolist() == [[0, 0, 0], [3, 1, 0], [3, 2, 3]]  # no block counts itself
    assert backend.block_starts(np.zeros((0, 2), dtype=np.int64)).shape == (0, 2)
    assert backend.block_starts(np.array([[4, 2]])).tolist() == [[0, 0]]


@pytest.mark.task5_1
@pytest.mark.task5_2
@given(c=cases(), B=st.integers(1, 9))
def test_parallel_positions_equal_the_serial_pass(c, B):
    serial = K.assign_positions(c["e"], c["E"], c["capacity"])
    par = K.assign_positions_parallel(c["e"], c["E"], c["capacity"], B)
    assert_same_bits(serial[0], par[0])
    assert_same_bits(serial[1], par[1])


@pytest.mark.parametrize("call, match", [
    (lambda m: m.block_counts(E_BLOCKS, 3, 0), "num_blocks must be a positive integer"),
    (lambda m: m.block_counts(E_BLOCKS, 2, 2), r"holds 2, outside \[0, 2\)"),
    (lambda m: m.block_starts(np.array([1, 2])), r"counts must be a \(B, E\) integer"),
    (lambda m: m.block_starts(np.array([[1.0]])), r"counts must be a \(B, E\) integer"),
    (lambda m: m.block_starts(np.array([[-1]])), "counts holds -1"),
])
@pytest.mark.parametrize("backend", [R, K], ids=["numpy", "numba"])
def test_block_functions_reject_bad_input(backend, call, match):
    with pytest.raises(ValueError, match=match):
        call(backend)


EDGES = {  # (T, E, k, capacity, pattern)
    "no tokens": (0, 3, 2, 2, "distinct"),
    "one token": (1, 3, 2, 1, "distinct"),
    "one expert": (6, 1, 1, 4, "distinct"),
    "k equals E": (9, 4, 4, 3, "distinct"),
    "all to one expert": (12, 4, 1, 5, "one_expert"),
    "capacity one": (10, 3, 2, 1, "distinct"),
    "heavy dropping": (40, 4, 2, 2, "one_expert"),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("edge", list(EDGES))
def test_edge_cases_match_reference(edge, dtype):
    T, E, k, C, pattern = EDGES[edge]
    rng = np.random.default_rng(11)
    if pattern == "one_expert":
        e = np.tile(np.arange(k), (T, 1))
    else:
        e = np.array([rng.permutation(E)[:k] for _ in range(T)], dtype=np.int64).reshape(T, k)
    for layout in ("contiguous", "transposed", "strided"):
        c = dict(e=e, E=E, k=k, capacity=C, layout=layout, rng=rng,
                 x=rng.standard_normal((T, 4)).astype(dtype), w=rng.random((T, k)).astype(dtype))
        _check_capacity_mode(c)
        _check_sorted_mode(c)
        _check_sorted_mode(dict(c, capacity=None))


def test_hand_example_positions_and_order():
    e = np.array([[0, 1], [0, 2], [1, 0], [0, 1]])
    position, counts = K.assign_positions(e, 3, capacity=2)
    np.testing.assert_array_equal(position, [[0, 1], [1, 0], [0, -1], [-1, -1]])
    np.testing.assert_array_equal(counts, [2, 2, 1])
    position, counts = K.assign_positions(e, 3)
    np.testing.assert_array_equal(position, [[0, 1], [1, 0], [0, 3], [2, 2]])
    order, offsets = K.sort_tokens(e, 3)
    np.testing.assert_array_equal(order, [0, 2, 6, 5, 4, 1, 7, 3])
    np.testing.assert_array_equal(offsets, [0, 4, 7, 8])


def test_negative_zero_survives_the_same_way():
    """y = 0 + w*v in both: a -0.0 product becomes +0.0 in both backends."""
    e, p = np.array([[0]]), np.array([[0]])
    out = np.array([[[-0.0, 1.0]]])
    for w in (1.0, -1.0):
        wt = np.array([[w]])
        assert_same_bits(R.combine(out, e, p, wt), K.combine(out, e, p, wt))


def test_weight_grad_dot_sums_in_its_documented_order():
    """Eight lanes (c % 8), each left to right, tail into lane 0, then a fixed tree."""
    rng = np.random.default_rng(9)
    for dtype in (np.float32, np.float64):
        for d in (0, 3, 8, 21):
            rows = rng.standard_normal((3, d)).astype(dtype)
            g = rng.standard_normal((2, d)).astype(dtype)
            row = np.array([[0, 2], [-1, 1]])
            out, grad_rows = np.empty((2, 2), dtype=dtype), np.zeros((3, d), dtype=dtype)
            K._scatter_and_dot(rows, row, g, np.ones((2, 2), dtype=dtype), dtype(0), grad_rows,
                               out)
            expected = np.zeros((2, 2), dtype=dtype)
            for t in range(2):
                for j in range(2):
                    if row[t, j] < 0:
                        continue
                    prod = rows[row[t, j]] * g[t]       # (d,) products, rounded once
                    s = [dtype(0)] * 8
                    for c in range(d - d % 8):
                        s[c % 8] = s[c % 8] + prod[c]
                    for c in range(d - d % 8, d):
                        s[0] = s[0] + prod[c]
                    expected[t, j] = (((s[0] + s[1]) + (s[2] + s[3]))
                                      + ((s[4] + s[5]) + (s[6] + s[7])))
            assert_same_bits(out, expected)


# --- determinism ------------------------------------------------------------------------------

@pytest.mark.skipif(JIT_DISABLED, reason="thread counts need the JIT")
def test_same_bits_for_any_thread_count():
    rng = np.random.default_rng(4)
    T, E, k, d = 3000, 6, 2, 33
    e = np.array([rng.permutation(E)[:k] for _ in range(T)])
    C = T * k // E
    p, _ = K.assign_positions(e, E, C)
    x = rng.standard_normal((T, d)).astype(np.float32)
    w = rng.random((T, k)).astype(np.float32)
    out = rng.standard_normal((E, C, d)).astype(np.float32)
    g = rng.standard_normal((T, d)).astype(np.float32)
    order, _ = K.sort_tokens(e, E)

    def run():
        return [K.dispatch(x, e, p, E, C), K.dispatch_backward(out, e, p, E, C),
                K.combine(out, e, p, w), *K.combine_backward(g, out, e, p, w),
                K.combine_sorted(x[order // k], order, w),
                *K.combine_sorted_backward(g, x[order // k], order, w)]

    before = numba.get_num_threads()
    try:
        results = []
        for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            results.append(run())
            results.append(run())
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_same_bits(a, b)
    # and the bit-identical ones equal the reference at this size too
    assert_same_bits(results[0][2], R.combine(out, e, p, w))
    assert_same_bits(results[0][0], R.dispatch(x, e, p, E, C))


# --- the pure-Python form ---------------------------------------------------------------------

def test_jit_is_disabled_when_asked():
    """Run inside the subprocess below: the kernels are then plain Python functions."""
    if not JIT_DISABLED:
        pytest.skip("only meaningful with NUMBA_DISABLE_JIT=1")
    assert not hasattr(K._gather_rows, "py_func")
    assert not hasattr(K._assign_positions, "py_func")


@pytest.mark.skipif(JIT_DISABLED, reason="this is the test that starts the subprocess")
def test_kernels_run_as_python_under_disable_jit():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    subset = ("jit_is_disabled or hand_example or negative_zero or edge_cases or "
              "capacity_mode_matches or sorted_mode_matches or documented_order")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", subset,
         str(Path(__file__).resolve())],
        check=False, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.split("\n")[-2]


BLOCKS_AS_PYTHON = """
import numpy as np
from tinymoe.dispatch import kernels as K, reference as R
e = np.random.default_rng(1).integers(0, 5, (40, 2))
for B in (1, 3, 9, 100):
    for C in (None, 7):
        p, c = K.assign_positions_parallel(e, 5, C, B)
        q, d = R.assign_positions(e, 5, C)
        assert (p == q).all() and (c == d).all(), (B, C)
    assert (K.block_counts(e, 5, B) == R.block_counts(e, 5, B)).all()
print("block kernels ok")
"""


@pytest.mark.task5_1
@pytest.mark.task5_2
@pytest.mark.skipif(JIT_DISABLED, reason="this is the test that starts the subprocess")
def test_block_kernels_run_as_python_under_disable_jit():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", PYTHONPATH=str(root))
    result = subprocess.run([sys.executable, "-c", BLOCKS_AS_PYTHON], check=False, cwd=root,
                            env=env, capture_output=True, text=True, timeout=300)
    stub = re.search(r"NotImplementedError: (tinymoe task .*)", result.stderr)
    if stub:  # a student copy's stub, raised here as it would be in-process
        raise NotImplementedError(stub.group(1))
    assert result.returncode == 0 and "block kernels ok" in result.stdout, result.stderr[-2000:]
