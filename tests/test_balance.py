"""Balancing losses of Shazeer et al. (2017): CV², importance, load, hierarchical (App. B)."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.moe.balance import (balance_loss, cv, cv_squared, hierarchical_importance,
                                 hierarchical_load, importance, load, max_over_mean)
from tinymoe.moe.noisy_topk import NoisyTopKGate


def test_cv_squared_values_ddof0():
    assert cv_squared(np.array([4.0, 0, 0, 0])).item() == pytest.approx(3.0)  # E - 1
    assert cv_squared(np.array([3.0, 1, 0, 0])).item() == pytest.approx(1.5)  # ddof=1: 2.0
    v = np.random.default_rng(0).random(7) + 0.1
    assert cv_squared(v).item() == pytest.approx(v.var(ddof=0) / v.mean() ** 2, rel=1e-8)
    assert cv(v) == pytest.approx(v.std() / v.mean(), rel=1e-8)
    assert cv_squared(np.zeros(0)).item() == 0.0
    assert cv_squared(np.array([5.0])).item() == 0.0


@pytest.mark.parametrize("v", [[2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
def test_cv_squared_at_perfect_balance_is_zero_with_a_finite_gradient(v):
    x = tm.tensor(np.array(v), requires_grad=True)
    y = cv_squared(x)
    y.backward()
    assert y.item() == 0.0
    assert np.all(np.isfinite(x.grad)) and not x.grad.any()


def test_cv_squared_gradcheck_and_bad_shape():
    x = tm.tensor(np.random.default_rng(1).random(6) + 0.2, requires_grad=True)
    tm.gradcheck(cv_squared, [x])
    with pytest.raises(ValueError, match=r"cv_squared: .*\(2, 3\)"):
        cv_squared(np.ones((2, 3)))


def test_importance_load_and_balance_loss():
    G = np.array([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4]])
    np.testing.assert_allclose(importance(tm.tensor(G)).numpy(), [0.7, 0.9, 0.4])
    P = np.array([[0.9, 0.8, 0.1], [0.2, 0.9, 0.7]])
    np.testing.assert_allclose(load(tm.tensor(P)).numpy(), [1.1, 1.7, 0.8])
    imp, ld = importance(tm.tensor(G)), load(tm.tensor(P))
    expect = 0.1 * cv_squared(imp).item() + 0.2 * cv_squared(ld).item()
    assert balance_loss(imp, ld, 0.1, 0.2).item() == pytest.approx(expect)
    assert balance_loss(imp, ld, 0.0, 0.0).item() == 0.0
    assert max_over_mean([1.0, 1.0, 4.0]) == pytest.approx(2.0)
    assert np.isnan(max_over_mean([0.0, 0.0]))


def test_hierarchical_importance_eq13_and_load_eq14():
    rng = np.random.default_rng(2)
    a, b, T = 3, 4, 10
    Gp = rng.random((T, a)) * (rng.random((T, a)) > 0.4)  # primary gates, some zero
    Gs = rng.random((T, a, b))  # secondary gates of every group on every token
    members = [np.flatnonzero(Gp[:, i] > 0) for i in range(a)]
    imp = hierarchical_importance([tm.tensor(Gp[m, i]) for i, m in enumerate(members)],
                                  [tm.tensor(Gs[m, i]) for i, m in enumerate(members)])
    np.testing.assert_allclose(imp.numpy(), np.einsum("ti,tij->ij", Gp, Gs))  # eq. (13)
    load_p = rng.random(a) * 5
    loads = [rng.random(b) * 3 for _ in range(a)]
    counts = [4, 0, 7]  # group 1 got no tokens: a zero row, no division by zero
    out = hierarchical_load(tm.tensor(load_p), [tm.tensor(v) for v in loads], counts)
    expect = np.stack([load_p[i] * loads[i] / counts[i] if counts[i] else np.zeros(b)
                       for i in range(a)])
    np.testing.assert_allclose(out.numpy(), expect)  # eq. (14)


def test_hierarchical_load_passes_gradient_to_the_primary_load():
    lp = tm.tensor(np.array([2.0, 3.0]), requires_grad=True)
    out = hierarchical_load(lp, [tm.tensor(np.array([1.0, 2.0])),
                                 tm.tensor(np.array([3.0, 1.0]))], [2, 4])
    out.sum().backward()
    np.testing.assert_allclose(lp.grad, [3.0 / 2, 4.0 / 4])


def test_hierarchical_bad_arguments():
    with pytest.raises(ValueError, match="hierarchical_importance: group 0"):
        hierarchical_importance([tm.tensor(np.ones(3))], [tm.tensor(np.ones((2, 4)))])
    with pytest.raises(ValueError, match="hierarchical_load"):
        hierarchical_load(tm.tensor(np.ones(2)), [tm.tensor(np.ones(3))], [1, 1])


@pytest.mark.task3_1
@pytest.mark.task3_2
@pytest.mark.task3_3
def test_balance_losses_train_the_router():
    """From the zero init, the load loss (through P) and the importance loss (through the
    kept gates) both give W_g and W_noise a gradient; a few steps lower CV(importance)."""
    rng = np.random.default_rng(4)
    x = tm.tensor(rng.standard_normal((64, 6)))
    gate = NoisyTopKGate(6, 8, k=2, w_importance=1.0, w_load=1.0, rng=0, dtype=np.float64)
    gate.W_g.data[...] = rng.standard_normal((6, 8)) * 0.5  # start unbalanced
    noise = rng.standard_normal((64, 8))
    first = gate(x, noise=noise)
    first.aux_losses["balance"].backward()
    assert np.abs(gate.W_g.grad).sum() > 0 and np.abs(gate.W_noise.grad).sum() > 0
    before = cv_squared(first.stats["importance"]).item()
    for _ in range(30):
        gate.zero_grad()
        out = gate(x, noise=noise)
        out.aux_losses["balance"].backward()
        for p in gate.parameters():
            p.data -= 0.2 * p.grad
    assert cv_squared(gate(x, noise=noise).stats["importance"]).item() < 0.5 * before
