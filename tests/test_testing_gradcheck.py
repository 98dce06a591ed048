"""tinymoe.testing.gradcheck: the checker for NumPy / PyTorch code passes correct backward
passes, catches wrong ones with a readable report, and shares tm.gradcheck's method."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.testing import GradcheckError, from_numpy, from_torch, gradcheck


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softmax_vjp(g, z):
    p = softmax(z)
    return p * (g - (g * p).sum(axis=-1, keepdims=True))


def test_correct_vjp_passes_every_element():
    report = gradcheck(softmax, softmax_vjp, [rand(3, 4)], names=["logits"])
    assert report.ok and report.inputs[0].mode == "every element"
    assert report.inputs[0].checks == 12 and report.inputs[0].max_abs_error < 1e-8


def test_wrong_vjp_is_caught_and_named():
    wrong = lambda g, z: softmax(z) * g  # noqa: E731 - forgets the -p·(g·p) term
    with pytest.raises(GradcheckError) as info:
        gradcheck(softmax, wrong, [rand(2, 3)], names=["logits"])
    text = str(info.value)
    assert "gradcheck: FAILED" in text and "MISMATCH logits at (0, 0)" in text
    assert info.value.report.mismatches


def test_small_relative_error_is_caught_without_raising():
    report = gradcheck(np.exp, lambda g, x: g * np.exp(x) * (1 + 3e-3), [rand(4) + 2],
                       raise_exception=False)
    assert not report and 1e-3 < report.mismatches[0].rel_error < 1e-2


def test_large_inputs_use_random_directions_and_still_catch_errors():
    x = rand(30, 30)
    ok = gradcheck(np.tanh, lambda g, x: g * (1 - np.tanh(x) ** 2), [x], max_elements=100,
                   n_directions=5)
    assert ok.inputs[0].mode == "5 random directions" and ok.inputs[0].checks == 5
    with pytest.raises(GradcheckError):
        gradcheck(np.tanh, lambda g, x: g * (1 - np.tanh(x)), [x], max_elements=100)


def test_same_method_and_figures_as_tm_gradcheck():
    """The same function checked by both checkers gives the same numeric gradients."""
    x = rand(3, 2) + 2.0
    ours = gradcheck(lambda a: a ** 3, lambda g, a: 3 * a ** 2 * g, [x], seed=4)
    theirs = tm.gradcheck(lambda a: a ** 3, [tm.tensor(x, requires_grad=True)], seed=4)
    assert ours.inputs[0].checks == theirs.inputs[0].checks == 6
    assert ours.inputs[0].max_abs_error == pytest.approx(theirs.inputs[0].max_abs_error,
                                                         abs=1e-9)


def test_integer_inputs_are_skipped_and_several_outputs_work():
    def f(x, idx):
        return x[idx], (x ** 2).sum(axis=0)

    def vjp(g, x, idx):
        gx = np.zeros_like(x)
        np.add.at(gx, idx, g[0])
        return gx + 2 * x * g[1], None

    report = gradcheck(f, vjp, [rand(4, 2), np.array([0, 0, 3])], names=["x", "idx"])
    assert [r.name for r in report.inputs] == ["x"]
    bad = lambda g, x, idx: (2 * x * g[1], None)  # noqa: E731 - forgets the gather's gradient
    with pytest.raises(GradcheckError, match="MISMATCH x"):
        gradcheck(f, bad, [rand(4, 2), np.array([0, 0, 3])], names=["x", "idx"])


def test_inputs_are_not_modified():
    x = rand(2, 3)
    before = x.copy()
    gradcheck(np.sin, lambda g, x: g * np.cos(x), [x])
    np.testing.assert_array_equal(x, before)


def test_bad_usage_gets_clear_errors():
    with pytest.raises(TypeError, match="float64"):
        gradcheck(np.sin, lambda g, x: g * np.cos(x), [rand(3).astype(np.float32)])
    with pytest.raises(ValueError, match="no floating input"):
        gradcheck(lambda i: i * 1.0, lambda g, i: None, [np.arange(3)])
    with pytest.raises(ValueError, match="2 gradients for 1 inputs|shape"):
        gradcheck(np.sin, lambda g, x: (g, g), [rand(3)])
    noisy = np.random.default_rng(0)
    with pytest.raises(ValueError, match="different outputs"):
        gradcheck(lambda x: x + noisy.standard_normal(x.shape), lambda g, x: g, [rand(3)])
    with pytest.raises(ValueError, match="vjp's gradient for input 0 has shape"):
        gradcheck(np.sin, lambda g, x: g[:1], [rand(3)])


def test_from_numpy_forward_backward_pair():
    def forward(x, w):
        h = x @ w
        return np.maximum(h, 0), (x, w, h)

    def backward(g, cache):
        x, w, h = cache
        gh = g * (h > 0)
        return gh @ w.T, x.T @ gh

    def backward_wrong(g, cache):
        x, w, h = cache
        return g @ w.T, x.T @ g  # forgets the ReLU mask

    x, w = rand(5, 3), rand(3, 4, seed=1)
    assert gradcheck(*from_numpy(forward, backward), [x, w], names=["x", "w"])
    with pytest.raises(GradcheckError, match="MISMATCH x"):
        gradcheck(*from_numpy(forward, backward_wrong), [x, w], names=["x", "w"])


def test_from_torch_function_module_and_parameters():
    torch = pytest.importorskip("torch")
    f, vjp = from_torch(torch.nn.functional.gelu)
    assert gradcheck(f, vjp, [rand(3, 4)])

    class BadSquare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x  # should be 2·x·g

    with pytest.raises(GradcheckError, match="MISMATCH"):
        gradcheck(*from_torch(BadSquare.apply), [rand(3)])

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
    f, vjp = from_torch(layer, params=True)
    ps = [p.detach().double().numpy() for p in layer.parameters()]
    report = gradcheck(f, vjp, [rand(2, 3), *ps], names=["x", "weight", "bias"])
    assert [r.name for r in report.inputs] == ["x", "weight", "bias"]
    assert layer[0].weight.dtype == torch.float32  # the user's module is untouched


def test_reachable_from_the_package():
    import tinymoe.testing

    assert tm.testing.gradcheck is gradcheck is tinymoe.testing.gradcheck
    assert tm.conformance.check is not None
