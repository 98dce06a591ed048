"""Every op gradient-checked in float64 against central differences.

Inputs are drawn away from kinks and singularities (|x| > 0.1 for abs/relu, x > 0.5 for
log/sqrt), over several shapes including broadcasting and non-contiguous layouts, with
hypothesis drawing the shapes.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import tinymoe as tm
import tinymoe.functional as F

RNG = np.random.default_rng(0)


def away_from_zero(shape, rng, lo=0.1, hi=2.0):
    return rng.uniform(lo, hi, shape) * rng.choice([-1.0, 1.0], shape)


def positive(shape, rng):
    return rng.uniform(0.5, 2.0, shape)


def normal(shape, rng):
    return rng.standard_normal(shape)


def leaf(a):
    return tm.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


# name -> (fn, input makers); every maker takes (shape, rng)
UNARY = {
    "neg": (lambda a: -a, normal),
    "exp": (F.exp, normal),
    "log": (F.log, positive),
    "sqrt": (F.sqrt, positive),
    "abs": (F.abs, away_from_zero),
    "relu": (F.relu, away_from_zero),
    "gelu": (F.gelu, normal),
    "tanh": (F.tanh, normal),
    "sigmoid": (F.sigmoid, normal),
    "softplus": (F.softplus, normal),
    "erf": (F.erf, normal),
    "normal_cdf": (F.normal_cdf, normal),
    "pow_const": (lambda a: a ** 3.0, normal),
    "clip": (lambda a: F.clip(a, -0.5, 0.7), away_from_zero),
    "sum_all": (lambda a: a.sum(), normal),
    "mean_all": (lambda a: a.mean(), normal),
    "max_all": (lambda a: a.max(), normal),
    "var_all": (lambda a: a.var(), normal),
    "var_ddof1": (lambda a: a.var(ddof=1), normal),
    "transpose": (lambda a: a.T, normal),
    "reshape": (lambda a: a.reshape(-1), normal),
    "softmax": (lambda a: a.softmax(axis=-1), normal),
    "log_softmax": (lambda a: a.log_softmax(axis=-1), normal),
    "logsumexp": (lambda a: a.logsumexp(axis=-1), normal),
    "logsumexp_keep": (lambda a: F.logsumexp(a, axis=0, keepdims=True), normal),
    "slice": (lambda a: a[..., ::2], normal),
    "fancy_repeat": (lambda a: a[np.array([0, 0, -1, 0])], normal),
    "topk_values": (lambda a: F.topk(a, 1, axis=-1)[0], normal),
    "astype32_back": (lambda a: F.astype(a, np.float64) * 2.0, normal),
    "unsqueeze": (lambda a: F.unsqueeze(a, 0), normal),
}

BINARY = {
    "add": (lambda a, b: a + b, normal, normal),
    "sub": (lambda a, b: a - b, normal, normal),
    "mul": (lambda a, b: a * b, normal, normal),
    "div": (lambda a, b: a / b, normal, away_from_zero),
    "pow": (lambda a, b: a ** b, positive, normal),
    "maximum": (F.maximum, normal, normal),
    "minimum": (F.minimum, normal, normal),
    "where": (lambda a, b: F.where(a > b, a, b * 2.0), normal, normal),
}

SHAPES = [(3,), (2, 3), (4, 1, 3)]


@pytest.mark.parametrize("name", sorted(UNARY))
@pytest.mark.parametrize("shape", SHAPES)
def test_unary_ops(name, shape):
    fn, make = UNARY[name]
    tm.gradcheck(fn, [leaf(make(shape, RNG))], names=[name])


@pytest.mark.parametrize("name", sorted(BINARY))
@pytest.mark.parametrize("shapes", [((2, 3), (2, 3)), ((2, 3), (3,)), ((4, 1), (1, 5)),
                                    ((2, 1, 3), (4, 3)), ((), (2, 2))])
def test_binary_ops_broadcasting(name, shapes):
    fn, make_a, make_b = BINARY[name]
    a, b = leaf(make_a(shapes[0], RNG)), leaf(make_b(shapes[1], RNG))
    tm.gradcheck(fn, [a, b], names=["a", "b"])


@pytest.mark.parametrize("shapes", [((3, 4), (4, 2)), ((4,), (4, 3)), ((3, 4), (4,)),
                                    ((4,), (4,)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)),
                                    ((1, 3, 4), (2, 4, 2)), ((5, 1, 2, 3), (4, 3, 2))])
def test_matmul_batched_and_vectors(shapes):
    a, b = leaf(normal(shapes[0], RNG)), leaf(normal(shapes[1], RNG))
    tm.gradcheck(lambda a, b: a @ b, [a, b], names=["a", "b"])


@pytest.mark.parametrize("shapes", [((3, 4), (4, 2), (2,)), ((2, 3, 4), (2, 4, 5), (2, 1, 5)),
                                    ((3, 4), (4, 2), (3, 2)), ((4,), (4, 3), (3,)),
                                    ((3, 4), (4, 2), (1, 3, 2))])
def test_linear_fused_bias(shapes):
    # The last two widen the output: the bias's own shape (3, 2) and a new leading axis.
    a, b, c = (leaf(normal(s, RNG)) for s in shapes)
    tm.gradcheck(F.linear, [a, b, c], names=["a", "b", "bias"])
    np.testing.assert_allclose(F.linear(a, b, c).numpy(), (a @ b + c).numpy(), rtol=1e-12)


def test_linear_keeps_the_dtype_rules_of_matmul_plus_add():
    a = tm.tensor(np.ones((2, 3), np.float32))
    w = tm.tensor(np.ones((3, 4), np.float32))
    assert F.linear(a, w, np.ones(4, np.float64)).dtype == (a @ w + np.ones(4)).dtype
    assert F.linear(a, w, np.ones(4, np.float32)).dtype == np.float32


@pytest.mark.parametrize("axis,keepdims", [(0, False), (1, True), ((0, 2), False), (-1, True),
                                           (None, True)])
@pytest.mark.parametrize("op", ["sum", "mean", "max", "var"])
def test_reductions_over_axes(op, axis, keepdims):
    x = leaf(normal((3, 4, 2), RNG))
    tm.gradcheck(lambda a: getattr(a, op)(axis=axis, keepdims=keepdims), [x])


def test_max_splits_gradient_between_ties():
    x = leaf([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]])
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(x.grad, [[0, 0.5, 0.5], [1, 0, 0]])


def test_non_contiguous_inputs():
    base = RNG.standard_normal((6, 5))
    views = {"transposed": base.T, "sliced": base[::2, 1:], "fortran": np.asfortranarray(base)}
    for name, v in views.items():
        x = tm.Tensor(v, requires_grad=True)  # wraps the view itself, no copy
        w = leaf(normal((v.shape[-1], 3), RNG))
        assert not x.data.flags.c_contiguous
        tm.gradcheck(lambda x, w: (x @ w).tanh().softmax(axis=0) * x[:, :1], [x, w],
                     names=[name, "w"])


def test_take_along_axis_scatters_repeated_indices():
    x = leaf(normal((2, 4), RNG))
    idx = np.array([[0, 0, 3], [1, 2, 1]])
    tm.gradcheck(lambda x: F.take_along_axis(x, idx, axis=1), [x])
    y = F.take_along_axis(x, idx, axis=1)
    y.backward(np.ones(y.shape))
    np.testing.assert_array_equal(x.grad, [[2, 0, 0, 1], [0, 2, 1, 0]])


def test_getitem_integer_array_adds_repeated_rows():
    x = leaf(np.zeros((3, 2)))
    x[np.array([2, 2, 0, 2])].sum().backward()
    np.testing.assert_array_equal(x.grad, [[1, 1], [0, 0], [3, 3]])


def test_concatenate_and_stack():
    a, b = leaf(normal((2, 3), RNG)), leaf(normal((4, 3), RNG))
    tm.gradcheck(lambda a, b: F.concatenate([a, b * 2.0], axis=0), [a, b])
    c = leaf(normal((2, 3), RNG))
    tm.gradcheck(lambda a, c: F.stack([a, c], axis=1), [a, c])


def test_topk_values_get_gradient_indices_do_not():
    x = leaf([[0.3, 2.0, -1.0, 1.5]])
    v, i = F.topk(x, 2)
    np.testing.assert_array_equal(i, [[1, 3]])
    v.sum().backward()
    np.testing.assert_array_equal(x.grad, [[0, 1, 0, 1]])
    assert isinstance(i, np.ndarray) and i.dtype == np.int64


def test_topk_ties_go_to_lower_index():
    _, i = F.topk(tm.tensor([[1.0, 1.0, 1.0, 0.0]]), 2)
    np.testing.assert_array_equal(i, [[0, 1]])


def test_one_hot_and_dropout():
    oh = F.one_hot(np.array([2, 0]), 3)
    np.testing.assert_array_equal(oh.numpy(), [[0, 0, 1], [1, 0, 0]])
    x = leaf(np.ones((200, 50)))
    y = F.dropout(x, 0.25, training=True, rng=np.random.default_rng(1))
    kept = y.numpy() != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(y.numpy()[kept], 1 / 0.75)
    assert F.dropout(x, 0.25, training=False) is x
    tm.gradcheck(lambda x: F.dropout(x, 0.5, rng=np.random.default_rng(3)),
                 [leaf(normal((4, 5), RNG))])


@pytest.mark.parametrize("logits", [[1e4, -1e4, 1e4], [-1e4, -1e4 + 1.0, -1e4],
                                    [0.0, 1e4, -1e4]])
def test_softmax_family_is_stable_for_huge_logits(logits):
    x = tm.tensor(np.array(logits))
    for y in [F.softmax(x, 0), F.log_softmax(x, 0), F.logsumexp(x, 0)]:
        assert np.isfinite(y.numpy()).all()
    np.testing.assert_allclose(F.softmax(x, 0).numpy().sum(), 1.0)
    lse = F.logsumexp(x, 0).item()
    assert abs(lse - (max(logits) + np.log(np.sum(np.exp(np.array(logits) - max(logits)))))) < 1e-9
    tm.gradcheck(lambda a: F.log_softmax(a, 0), [leaf(logits)])


def test_float32_stays_float32():
    x = tm.tensor(np.ones((2, 3), dtype=np.float32), requires_grad=True)
    for y in [x * 0.5, x + 1, 2.0 / x, x.softmax(), F.gelu(x), F.erf(x), x ** 2, x.var()]:
        assert y.dtype == np.float32, y
    (x * 0.5).sum().backward()
    assert x.grad.dtype == np.float32 and x.grad.shape == x.shape


def test_new_python_float_data_defaults_to_float32():
    assert tm.tensor([1.0, 2.0]).dtype == np.float32
    assert tm.tensor(np.ones(2)).dtype == np.float64
    assert tm.tensor([1, 2]).dtype == np.int64


@st.composite
def broadcastable_pair(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 4)) for _ in range(ndim))
    other = tuple(1 if draw(st.booleans()) else n for n in shape)
    cut = draw(st.integers(0, ndim - 1))
    return shape, other[cut:]


@given(broadcastable_pair(), st.sampled_from(sorted(BINARY)), st.integers(0, 2**31 - 1))
def test_binary_ops_random_broadcast_shapes(shapes, name, seed):
    rng = np.random.default_rng(seed)
    fn, make_a, make_b = BINARY[name]
    a, b = leaf(make_a(shapes[0], rng)), leaf(make_b(shapes[1], rng))
    if name in ("maximum", "minimum", "where"):  # keep a and b apart: no kinks at ties
        b = leaf(b.numpy() + 3.0 * np.sign(b.numpy() - 0.0 + 1e-9))
    tm.gradcheck(fn, [a, b])


@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(0, 2**31 - 1),
       st.sampled_from(["softmax", "log_softmax", "logsumexp", "gelu", "softplus", "sum",
                        "mean", "var"]))
def test_unary_ops_random_shapes(shape, seed, name):
    fn = UNARY[name][0] if name in UNARY else (lambda a: getattr(a, name)(axis=-1))
    if name in ("sum", "mean", "var"):
        fn = lambda a: getattr(a, name)(axis=-1)  # noqa: E731
    tm.gradcheck(fn, [leaf(normal(tuple(shape), np.random.default_rng(seed)))])


def test_losses_gradcheck():
    z = leaf(normal((5, 4), RNG))
    y = np.array([0, 3, 1, 1, 2])
    tm.gradcheck(lambda z: F.cross_entropy(z, y), [z])
    tm.gradcheck(lambda z: F.nll(F.log_softmax(z), y, reduction="sum"), [z])
    t = leaf(normal((5, 4), RNG))
    tm.gradcheck(lambda z, t: F.mse(z, t), [z, t])


def test_cross_entropy_value():
    z = tm.tensor(np.array([[2.0, 0.0, -1.0]]))
    expected = -np.log(np.exp(2.0) / (np.exp(2.0) + 1 + np.exp(-1.0)))
    assert abs(F.cross_entropy(z, np.array([0])).item() - expected) < 1e-12
