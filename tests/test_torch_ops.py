"""Forward values and gradients of the ops against PyTorch (skipped when torch is absent)."""
import numpy as np
import pytest

import tinymoe as tm
import tinymoe.functional as F

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

RNG = np.random.default_rng(7)

# name -> (tinymoe fn, torch fn, number of inputs, input transform)
CASES = {
    "add": (lambda a, b: a + b, lambda a, b: a + b, 2, None),
    "mul": (lambda a, b: a * b, lambda a, b: a * b, 2, None),
    "div": (lambda a, b: a / b, lambda a, b: a / b, 2, lambda x: x + 3.0),
    "pow": (lambda a, b: a ** b, lambda a, b: a ** b, 2, lambda x: np.abs(x) + 0.5),
    "maximum": (F.maximum, torch.maximum, 2, None),
    "matmul": (lambda a, b: a @ b.T, lambda a, b: a @ b.T, 2, None),
    "linear": (lambda a, b: F.linear(a, b.T, b[:, 0]), lambda a, b: a @ b.T + b[:, 0], 2, None),
    "exp": (F.exp, torch.exp, 1, None),
    "log": (F.log, torch.log, 1, lambda x: np.abs(x) + 0.1),
    "sqrt": (F.sqrt, torch.sqrt, 1, lambda x: np.abs(x) + 0.1),
    "abs": (F.abs, torch.abs, 1, None),
    "relu": (F.relu, torch.relu, 1, None),
    "gelu": (F.gelu, torch.nn.functional.gelu, 1, None),
    "tanh": (F.tanh, torch.tanh, 1, None),
    "sigmoid": (F.sigmoid, torch.sigmoid, 1, None),
    "softplus": (F.softplus, torch.nn.functional.softplus, 1, None),
    "erf": (F.erf, torch.erf, 1, None),
    "normal_cdf": (F.normal_cdf, lambda a: torch.distributions.Normal(0., 1.).cdf(a), 1, None),
    "softmax": (lambda a: F.softmax(a, -1), lambda a: torch.softmax(a, -1), 1, None),
    "log_softmax": (lambda a: F.log_softmax(a, 0), lambda a: torch.log_softmax(a, 0), 1, None),
    "logsumexp": (lambda a: F.logsumexp(a, 1), lambda a: torch.logsumexp(a, 1), 1, None),
    "var": (lambda a: a.var(axis=0, ddof=1), lambda a: a.var(dim=0), 1, None),
    "mean": (lambda a: a.mean(axis=1, keepdims=True), lambda a: a.mean(1, keepdim=True), 1, None),
    "max": (lambda a: a.max(axis=1), lambda a: a.amax(1), 1, None),
    "clip": (lambda a: F.clip(a, -0.5, 0.5), lambda a: a.clamp(-0.5, 0.5), 1, None),
    "transpose_reshape": (lambda a: a.T.reshape(-1), lambda a: a.T.reshape(-1), 1, None),
    "fancy_index": (lambda a: a[np.array([0, 2, 0])], lambda a: a[[0, 2, 0]], 1, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_backward_match_torch(name):
    fn, tfn, n, transform = CASES[name]
    arrays = [RNG.standard_normal((3, 4)) for _ in range(n)]
    if transform is not None:
        arrays = [transform(a) for a in arrays]
    ours = [tm.tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    y, ty = fn(*ours), tfn(*theirs)
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    cot = RNG.standard_normal(y.shape)
    y.backward(cot)
    ty.backward(torch.tensor(cot))
    for a, ta in zip(ours, theirs):
        np.testing.assert_allclose(a.grad, ta.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_cross_entropy_matches_torch():
    z = RNG.standard_normal((6, 5))
    y = RNG.integers(0, 5, 6)
    ours = tm.tensor(z, requires_grad=True)
    theirs = torch.tensor(z, requires_grad=True)
    loss, tloss = F.cross_entropy(ours, y), torch.nn.functional.cross_entropy(theirs,
                                                                              torch.tensor(y))
    assert abs(loss.item() - tloss.item()) < 1e-12
    loss.backward()
    tloss.backward()
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-10)


def test_topk_matches_torch_values_and_indices():
    x = RNG.standard_normal((5, 8))
    v, i = F.topk(tm.tensor(x), 3, axis=-1)
    tv, ti = torch.topk(torch.tensor(x), 3, dim=-1)
    np.testing.assert_array_equal(v.numpy(), tv.numpy())
    np.testing.assert_array_equal(i, ti.numpy())
