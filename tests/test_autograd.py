"""The engine: graph walk, accumulation, reuse, deep chains, no_grad, second backward,
unbroadcast, and the errors users see."""
import gc
import weakref

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymoe as tm
import tinymoe.functional as F
from tinymoe.autograd import Function, topological_order, unbroadcast


def leaf(a, dtype=np.float64):
    return tm.tensor(np.asarray(a, dtype=dtype), requires_grad=True)


def test_chain_of_100k_ops_backpropagates_without_recursion_error():
    x = leaf(2.0)
    y = x
    for _ in range(100_000):
        y = y * 1.0
    y.backward()
    assert x.grad == 1.0


def test_reused_tensor_gets_the_sum_of_its_gradients():
    x = leaf([1.0, 2.0, 3.0])
    y = x * x + x * 3.0 + x  # dy/dx = 2x + 4
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * np.array([1, 2, 3]) + 4)


def test_diamond_graph_visits_shared_node_once_with_full_gradient():
    x = leaf(1.5)
    h = x.exp()             # used by two branches
    y = h * 2.0 + h.log()   # dy/dx = 2 e^x + 1
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * np.exp(1.5) + 1)


def test_gradients_accumulate_across_backward_calls_until_zeroed():
    x = leaf([1.0, -1.0])
    (x * 3.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, [6.0, 6.0])
    x.zero_grad()
    assert x.grad is None


def test_second_backward_through_freed_graph_raises_and_retain_graph_allows_it():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()  # allowed: the graph was retained the first time
    np.testing.assert_allclose(x.grad, [4.0, 8.0])
    with pytest.raises(RuntimeError, match="already freed.*retain_graph=True"):
        y.backward()


def test_no_grad_records_nothing_and_restores_state():
    x = leaf([1.0])
    with tm.no_grad():
        y = x * 2.0
        assert not tm.is_grad_enabled()
    assert tm.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf

    @tm.no_grad()
    def f(t):
        return t * 2.0
    assert not f(x).requires_grad


def test_retain_grad_and_detach():
    x = leaf([1.0, 2.0])
    h = (x * 3.0).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad, 2 * h.numpy())
    d = h.detach()
    assert d.is_leaf and not d.requires_grad
    np.testing.assert_array_equal(d.numpy(), h.numpy())


def test_grad_has_shape_and_dtype_of_tensor():
    for dtype in (np.float32, np.float64):
        x = leaf(np.ones((2, 3)), dtype=dtype)
        (x @ tm.tensor(np.ones((3, 4)))).sum().backward()
        assert x.grad.shape == (2, 3) and x.grad.dtype == dtype


def test_topological_order_puts_inputs_first():
    x = leaf(1.0)
    a = x * 2.0
    b = a + 1.0
    order = topological_order(b)  # vertices: leaf tensors and the nodes of op outputs
    assert order.index(x) < order.index(a._node) < order.index(b._node)
    assert order[-1] is b._node


def test_graph_does_not_keep_intermediate_arrays_alive():
    # Add saves nothing for backward, so once the Python name is gone, a's array is freed
    # even though b's node still routes the gradient through a's node (PyTorch does the same).
    x = leaf(np.ones(1000))
    a = x * 2.0
    b = a + 1.0
    data = weakref.ref(a.data)
    del a
    gc.collect()
    assert data() is None
    b.sum().backward()
    np.testing.assert_array_equal(x.grad, np.full(1000, 2.0))


def test_retain_grad_called_after_the_tensor_was_used():
    x = leaf(np.arange(3.0))
    a = x * 2.0
    loss = (a * a).sum()
    a.retain_grad()
    loss.backward()
    np.testing.assert_array_equal(a.grad, 2 * a.numpy())
    np.testing.assert_array_equal(x.grad, 4 * a.numpy())


@pytest.mark.parametrize("g,shape,expected", [
    (np.ones((4, 3)), (3,), np.full(3, 4.0)),
    (np.ones((4, 3)), (4, 1), np.full((4, 1), 3.0)),
    (np.ones((2, 4, 3)), (1, 3), np.full((1, 3), 8.0)),
    (np.ones((2, 3)), (), np.array(6.0)),
    (np.ones((2, 3)), (2, 3), np.ones((2, 3))),
])
def test_unbroadcast(g, shape, expected):
    np.testing.assert_array_equal(unbroadcast(g, shape), expected)


@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_unbroadcast_inverts_broadcasting(shape, data):
    small = tuple(1 if data.draw(st.booleans()) else n for n in shape)
    small = small[data.draw(st.integers(0, len(small))):]
    g = np.random.default_rng(0).standard_normal(shape)
    # <unbroadcast(g), v> == <g, broadcast(v)> for every v: the adjoint of broadcasting
    v = np.random.default_rng(1).standard_normal(small)
    lhs = np.sum(unbroadcast(g, small) * v)
    rhs = np.sum(g * np.broadcast_to(v, shape))
    assert abs(lhs - rhs) < 1e-9
    assert unbroadcast(g, small).shape == small


# --- errors ----------------------------------------------------------------------------------
def test_matmul_inner_dim_error_names_shapes_and_fix():
    with pytest.raises(ValueError, match=r"matmul: \(4, 3\) @ \(4, 2\): inner dims 3 != 4"):
        tm.tensor(np.ones((4, 3))) @ tm.tensor(np.ones((4, 2)))


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(TypeError, match="floating-point.*int64.*dtype=np.float32"):
        tm.tensor([1, 2, 3], requires_grad=True)


def test_broadcast_error_names_op_and_shapes():
    with pytest.raises(ValueError, match=r"add: shapes \(2, 3\) and \(4,\) do not broadcast"):
        tm.tensor(np.ones((2, 3))) + tm.tensor(np.ones(4))


def test_backward_of_non_scalar_needs_grad():
    y = leaf(np.ones(3)) * 2.0
    with pytest.raises(RuntimeError, match=r"not a scalar; pass grad="):
        y.backward()
    with pytest.raises(ValueError, match=r"grad has shape \(2,\)"):
        y.backward(np.ones(2))


def test_backward_on_constant_explains():
    with pytest.raises(RuntimeError, match="does not require grad"):
        tm.tensor([1.0]).sum().backward()


def test_wrong_backward_shape_is_caught_by_engine():
    class Bad(Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, grad):
            return (grad.sum(),)

    with pytest.raises(RuntimeError, match=r"Bad.backward returned a gradient of shape \(\)"):
        Bad.apply(leaf(np.ones(3))).sum().backward()


@pytest.mark.parametrize("call,match", [
    (lambda: F.softmax(tm.tensor(np.ones(3)), axis=2), "softmax: axis 2 is out of range"),
    (lambda: tm.tensor(np.ones(3)).sum(axis=1), "sum: axis 1 is out of range"),
    (lambda: tm.tensor(np.ones(6)).reshape(4, 2), r"reshape: cannot reshape \(6,\)"),
    (lambda: F.topk(tm.tensor(np.ones(3)), 4), r"topk: k=4 must be an integer in \[1, 3\]"),
    (lambda: F.topk(tm.tensor(np.array([1.0, np.nan])), 1), "topk: input contains NaN"),
    (lambda: F.one_hot(np.array([3]), 3), r"one_hot: indices must lie in \[0, 3\)"),
    (lambda: F.dropout(tm.tensor(np.ones(2)), 1.0), r"dropout: p=1.0 must be in \[0, 1\)"),
    (lambda: F.cross_entropy(tm.tensor(np.ones((2, 3))), np.array([0, 3])),
     r"cross_entropy: targets must lie in \[0, 3\)"),
    (lambda: F.cross_entropy(tm.tensor(np.array([[np.nan, 0.0]])), np.array([0])),
     "scores contain NaN or inf"),
    (lambda: F.mse(tm.tensor(np.ones((3, 1))), tm.tensor(np.ones(3))),
     r"mse: prediction \(3, 1\) and target \(3,\) differ"),
    (lambda: tm.tensor(np.ones(3))[5], r"getitem: index 5 does not fit a tensor of shape \(3,\)"),
    (lambda: F.concatenate([tm.tensor(np.ones((2, 3))), tm.tensor(np.ones((2, 4)))]),
     r"concatenate: shapes \(2, 3\), \(2, 4\) do not fit along axis 0"),
    (lambda: F.clip(tm.tensor(np.ones(2)), 1.0, 0.0), "clip: lo=1.0 is larger than hi=0.0"),
    (lambda: tm.tensor(object()), "cannot make a tensor from object"),
    (lambda: F.where(np.array([1, 0]), tm.tensor(np.ones(2)), 0.0), "cond must be a boolean"),
])
def test_bad_input_errors_are_readable(call, match):
    with pytest.raises((ValueError, TypeError, IndexError, FloatingPointError), match=match):
        call()


def test_failed_op_leaves_inputs_unchanged():
    x = leaf(np.ones((2, 3)))
    with pytest.raises(ValueError):
        x @ tm.tensor(np.ones((2, 2)))
    assert x.grad is None and x.is_leaf
    np.testing.assert_array_equal(x.numpy(), np.ones((2, 3)))
