"""The dispatch backends validate their inputs in one place (tinymoe/dispatch/_checks.py):
``order`` lists each (token, choice) pair at most once, no two kept choices share a slot,
and only float32/float64 arrays reach the kernels; the Numba and NumPy paths raise the same
errors, so neither can return leftover memory or silently drop a gradient."""
import numpy as np
import pytest

from tinymoe.dispatch import backend_module

BACKENDS = ["numpy", "numba"]


def both(call):
    """The errors of ``call(module)`` on both backends: (type, message) pairs, equal."""
    seen = []
    for name in BACKENDS:
        with pytest.raises((ValueError, TypeError)) as e:
            call(backend_module(name))
        seen.append((type(e.value), str(e.value)))
    assert seen[0] == seen[1]
    return seen[0]


def test_repeated_order_entries_are_refused_the_issue_example():
    """Once returned leftover heap values (6.9e-310) from the kernel, 1.0 from NumPy."""
    exc, msg = both(lambda m: m.combine_sorted_backward(
        np.ones((32, 64)), np.ones((64, 64)), np.r_[0:32, 0:32], np.ones((32, 1))))
    assert exc is ValueError
    assert "order holds pair 0 (token 0, choice 0) 2 times" in msg
    assert "combine_sorted_backward" in msg and "range(32)" in msg and "sort_tokens" in msg


@pytest.mark.parametrize("op", ["dispatch_sorted", "dispatch_sorted_backward",
                                "combine_sorted", "rows_of_order"])
def test_every_sorted_op_refuses_a_repeated_pair(op):
    order = np.array([0, 3, 3, 1])  # pair 3 twice: one gradient would be lost
    T, k, d = 2, 2, 3
    args = {"dispatch_sorted": (np.ones((T, d)), order, k),
            "dispatch_sorted_backward": (np.ones((4, d)), order, T, k),
            "combine_sorted": (np.ones((4, d)), order, np.ones((T, k))),
            "rows_of_order": (order, T, k)}[op]
    _, msg = both(lambda m: getattr(m, op)(*args))
    assert msg.startswith(op) and "pair 3 (token 1, choice 1) 2 times" in msg


def test_an_order_without_the_dropped_pairs_is_accepted_and_backends_agree():
    rng = np.random.default_rng(0)
    e = rng.integers(0, 3, size=(6, 2))
    e[:, 1] = (e[:, 0] + 1) % 3  # two different experts per token
    rows, g = rng.standard_normal((12, 4)), rng.standard_normal((6, 4))
    out = {}
    for name in BACKENDS:
        m = backend_module(name)
        pos, _ = m.assign_positions(e, 3, capacity=2)
        order, _ = m.sort_tokens(e, 3, pos)  # a permutation of the kept pairs only
        assert order.size < e.size and len(set(order.tolist())) == order.size
        out[name] = m.combine_sorted_backward(g, rows[:order.size], order, np.ones((6, 2)))
    np.testing.assert_array_equal(out["numpy"][0], out["numba"][0])
    np.testing.assert_allclose(out["numpy"][1], out["numba"][1], rtol=1e-12, atol=1e-12)


E = np.array([[0, 1], [0, 1], [1, 0]])
P_DUP = np.array([[0, 0], [0, 1], [1, -1]])  # token 0 and token 1 both in slot (0, 0)


@pytest.mark.parametrize("op", ["dispatch", "dispatch_backward", "combine",
                                "combine_backward"])
def test_two_choices_in_one_slot_are_refused(op):
    args = {"dispatch": (np.ones((3, 4)), E, P_DUP, 2, 2),
            "dispatch_backward": (np.ones((2, 2, 4)), E, P_DUP, 2, 2),
            "combine": (np.ones((2, 2, 4)), E, P_DUP, np.ones((3, 2))),
            "combine_backward": (np.ones((3, 4)), np.ones((2, 2, 4)), E, P_DUP,
                                 np.ones((3, 2)))}[op]
    _, msg = both(lambda m: getattr(m, op)(*args))
    assert msg.startswith(op) and "slot (expert 0, position 0) is taken by 2 choices" in msg
    assert "assign_positions" in msg


def test_duplicate_slots_refused_in_the_sorted_path_too():
    _, msg = both(lambda m: m.sort_tokens(E, 2, P_DUP))
    assert "slot (expert 0, position 0)" in msg


@pytest.mark.parametrize("dtype, fix", [(np.float16, "astype(np.float32)"),
                                        (np.longdouble, "astype(np.float64)")])
@pytest.mark.parametrize("which", ["x", "buffer", "weight", "grad"])
def test_unsupported_float_dtypes_are_refused_naming_dtype_and_fix(dtype, fix, which):
    if np.dtype(dtype) == np.float64:
        pytest.skip("longdouble is float64 on this platform")
    e, p = np.array([[0], [1]]), np.array([[0], [0]])
    arr = {"x": np.ones((2, 3)), "buffer": np.ones((2, 1, 3)), "weight": np.ones((2, 1)),
           "grad": np.ones((2, 3))}
    arr[which] = arr[which].astype(dtype)
    calls = {"x": lambda m: m.dispatch(arr["x"], e, p, 2, 1),
             "buffer": lambda m: m.combine(arr["buffer"], e, p, arr["weight"]),
             "weight": lambda m: m.combine(arr["buffer"], e, p, arr["weight"]),
             "grad": lambda m: m.combine_backward(arr["grad"], arr["buffer"], e, p,
                                                  arr["weight"])}
    exc, msg = both(calls[which])
    assert exc is TypeError and f"dtype {np.dtype(dtype)}" in msg and fix in msg
    assert "float32 and float64 only" in msg


def test_float16_sorted_path_is_refused_too():
    exc, msg = both(lambda m: m.dispatch_sorted(np.ones((4, 3), np.float16), np.arange(4), 1))
    assert exc is TypeError and "float16" in msg


def test_combine_sorted_backward_kernel_writes_every_row():
    """A valid order covers every row: the kernel's output equals NumPy's exactly, whatever
    was in memory before (the buffer starts from zeros)."""
    rng = np.random.default_rng(3)
    T, k, d = 16, 2, 8
    order = rng.permutation(T * k)
    args = (rng.standard_normal((T, d)), rng.standard_normal((T * k, d)), order,
            rng.standard_normal((T, k)))
    ref = backend_module("numpy").combine_sorted_backward(*args)
    for _ in range(3):
        got = backend_module("numba").combine_sorted_backward(*args)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-12, atol=1e-12)
