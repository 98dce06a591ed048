"""The 1994 hierarchical mixture of experts: likelihood, posteriors, gradients, the gates'
dense routing and the prediction through combine, the EM M-steps (weighted least squares,
IRLS), EM's monotone likelihood, bad input, the script."""
import copy
import itertools

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.dispatch import Routing
from tinymoe.moe import HME, fit_em, fit_gradient
from tinymoe.moe.hme import (
    augment,
    em_step,
    irls_logistic_step,
    irls_softmax_step,
    logistic_objective,
    softmax_objective,
    weighted_least_squares,
)


def _regression(n=60, seed=0):
    from tinymoe.app.experiments.hme_1994 import piecewise_data

    return piecewise_data(n, seed)


def _binary(n=60, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, (n, 2))
    y = ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(float)  # XOR: no single logistic fits it
    flip = rng.random(n) < 0.1
    return X, np.where(flip, 1 - y, y)[:, None]


def _naive_likelihood(tree, X, Y):
    """P(y|x) = sum_i g_i sum_j g_{j|i} P_ij(y), written out with explicit loops."""
    xa = augment(X)
    I, J = tree.n_branches, tree.n_experts
    g = np.exp(xa @ tree.v_top.data)
    g /= g.sum(1, keepdims=True)
    total = np.zeros(len(X))
    for i in range(I):
        gl = np.exp(xa @ tree.v_low.data[i])
        gl /= gl.sum(1, keepdims=True)
        for j in range(J):
            eta = xa @ tree.U.data[i, j]  # (n, D)
            if tree.expert == "gaussian":
                var = np.exp(tree.log_var.data[i, j])
                P = np.prod(np.exp(-0.5 * (Y - eta) ** 2 / var) / np.sqrt(2 * np.pi * var), 1)
            else:
                pi = 1 / (1 + np.exp(-eta))
                P = np.prod(pi ** Y * (1 - pi) ** (1 - Y), 1)
            total += g[:, i] * gl[:, j] * P
    return total


@pytest.mark.parametrize("expert", ["gaussian", "logistic"])
def test_likelihood_is_eq_2_8(expert):
    X, Y = _regression() if expert == "gaussian" else _binary()
    tree = HME(2, 1, 2, 3, expert=expert, rng=0, gate_scale=1.0)
    ll = tree.log_likelihood(X, Y, reduction="none").data
    np.testing.assert_allclose(ll, np.log(_naive_likelihood(tree, X, Y)), rtol=1e-10)


@pytest.mark.task2_1
@pytest.mark.parametrize("expert", ["gaussian", "logistic"])
def test_posteriors_sum_to_one_and_multiply(expert):
    X, Y = _regression() if expert == "gaussian" else _binary()
    tree = HME(2, 1, 3, 2, expert=expert, rng=1, gate_scale=1.0)
    post = tree.posteriors(X, Y)
    np.testing.assert_allclose(post.h_top.sum(1), 1.0)
    np.testing.assert_allclose(post.h_low.sum(2), 1.0)
    np.testing.assert_allclose(post.h.sum((1, 2)), 1.0)
    np.testing.assert_allclose(post.h, post.h_top[:, :, None] * post.h_low)  # (2.12)
    joint = np.exp(tree.joint_log(X, Y).data)  # g_i g_{j|i} P_ij
    np.testing.assert_allclose(post.h, joint / joint.sum((1, 2), keepdims=True))


@pytest.mark.task2_1
def test_posteriors_survive_huge_errors():
    X, Y = _regression()
    tree = HME(2, 1, 2, 2, rng=0, variance=1e-4)  # every P_ij underflows to 0
    post = tree.posteriors(X, Y + 100.0)
    assert np.isfinite(post.h).all()
    np.testing.assert_allclose(post.h.sum((1, 2)), 1.0)


@pytest.mark.parametrize("expert", ["gaussian", "logistic"])
def test_gradcheck_log_likelihood(expert):
    X, Y = _regression(12) if expert == "gaussian" else _binary(12)
    tree = HME(2, 1, 2, 2, expert=expert, rng=2, gate_scale=1.0)
    names = [n for n, _ in tree.named_parameters()]
    tm.gradcheck(lambda *ps: tree.log_likelihood(X, Y), list(tree.parameters()), names=names)
    tm.gradcheck(lambda *ps: tree(X), list(tree.parameters()), names=names)


@pytest.mark.task2_1
def test_gradient_is_the_1992_rules():
    """d(sum log P)/dU_ij = sum h_ij (y - mu_ij) x / sigma^2 (2.14), dv_i = sum (h_i - g_i) x
    (2.15), dv_ij = sum h_i (h_j|i - g_j|i) x (2.16): the posteriors drive every gradient."""
    X, Y = _regression(40)
    tree = HME(2, 1, 2, 2, rng=3, gate_scale=1.0, variance=0.5)
    tree.log_likelihood(X, Y, reduction="sum").backward()
    post = tree.posteriors(X, Y)
    xa = augment(X)
    log_g, log_g_low = tree.gates(X)
    g, g_low = np.exp(log_g.data), np.exp(log_g_low.data)
    mu = tree.expert_eta(X).data  # (n, I, J, 1)
    var = np.exp(tree.log_var.data)  # (I, J)
    dU = np.einsum("nij,nijd,na->ijad", post.h, Y[:, None, None, :] - mu, xa) / var[..., None,
                                                                                    None]
    np.testing.assert_allclose(tree.U.grad, dU, atol=1e-9)
    np.testing.assert_allclose(tree.v_top.grad, xa.T @ (post.h_top - g), atol=1e-9)
    dv_low = np.einsum("ni,nij,na->iaj", post.h_top, post.h_low - g_low, xa)
    np.testing.assert_allclose(tree.v_low.grad, dv_low, atol=1e-9)


# --- the gates' routing and the prediction ---------------------------------------------------
@pytest.mark.parametrize("expert", ["gaussian", "logistic"])
def test_the_gates_are_one_dense_routing_over_the_leaves(expert):
    """Leaf i*J + j gets every case, weighted by g_i g_{j|i}; the weights sum to one."""
    X, _ = _regression(20) if expert == "gaussian" else _binary(20)
    tree = HME(2, 1, 2, 3, expert=expert, rng=4, gate_scale=1.0)
    r = tree.route(X)
    assert isinstance(r, Routing) and r.capacity is None and r.num_experts == 6
    np.testing.assert_array_equal(r.expert_index, np.tile(np.arange(6), (20, 1)))  # (n, I*J)
    np.testing.assert_allclose(r.combine_weight.data.sum(axis=1), 1.0)
    assert r.probs is r.combine_weight and r.dropped_fraction == 0.0
    xa = augment(X)
    g = np.exp(xa @ tree.v_top.data)
    g /= g.sum(1, keepdims=True)  # (n, I)
    g_low = np.exp(np.einsum("na,iaj->nij", xa, tree.v_low.data))
    g_low /= g_low.sum(2, keepdims=True)  # (n, I, J)
    np.testing.assert_allclose(r.probs.data, (g[:, :, None] * g_low).reshape(20, 6))
    np.testing.assert_allclose(tree.gate_probs(X), r.probs.data)


@pytest.mark.parametrize("expert", ["gaussian", "logistic"])
def test_the_prediction_is_the_direct_blend(expert):
    """forward = combine(mu, route(X)) = sum_i g_i sum_j g_{j|i} mu_ij, written out."""
    X, _ = _regression(20) if expert == "gaussian" else _binary(20)
    tree = HME(2, 2, 3, 2, expert=expert, rng=5, gate_scale=1.0)
    xa = augment(X)
    w = tree.gate_probs(X).reshape(20, 3, 2)  # (n, I, J)
    mu = np.einsum("na,ijad->nijd", xa, tree.U.data)  # (n, I, J, D)
    if expert == "logistic":
        mu = 1 / (1 + np.exp(-mu))
    np.testing.assert_allclose(tree.predict(X), (w[..., None] * mu).sum(axis=(1, 2)),
                               rtol=1e-12)


# --- the M-step pieces ------------------------------------------------------------------------
@pytest.mark.task2_2
def test_weighted_least_squares_is_the_weighted_optimum():
    rng = np.random.default_rng(0)
    X = augment(rng.standard_normal((50, 3)))
    Y = rng.standard_normal((50, 2))
    w = rng.random(50)
    B = weighted_least_squares(X, Y, w)
    np.testing.assert_allclose(X.T @ (w[:, None] * (Y - X @ B)), 0.0, atol=1e-10)
    # the same as ordinary least squares on rows scaled by sqrt(w)
    ref, *_ = np.linalg.lstsq(np.sqrt(w)[:, None] * X, np.sqrt(w)[:, None] * Y, rcond=None)
    np.testing.assert_allclose(B, ref, atol=1e-10)
    Br = weighted_least_squares(X, Y, w, ridge=3.0)  # ridge: X^T W r = ridge B
    np.testing.assert_allclose(X.T @ (w[:, None] * (Y - X @ Br)), 3.0 * Br, atol=1e-10)


@pytest.mark.task2_3
def test_irls_softmax_step_is_a_newton_step():
    """Newton's method converges to the stationary point of the soft-target objective, the
    objective rises each step, and near the optimum the error squares (quadratic rate)."""
    rng = np.random.default_rng(1)
    X = augment(rng.standard_normal((80, 2)))
    T = rng.dirichlet(np.ones(3), 80)  # soft targets, rows sum to 1
    w = rng.random(80)
    ridge = 1e-3
    V = np.zeros((3, 3))
    values = [softmax_objective(X, T, w, V, ridge)]
    grads = []
    for _ in range(8):
        V = irls_softmax_step(X, T, w, V, ridge)
        values.append(softmax_objective(X, T, w, V, ridge))
        g = np.exp(X @ V)
        g /= g.sum(1, keepdims=True)
        grads.append(np.abs(X.T @ (w[:, None] * (T - g)) - ridge * V).max())
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))
    assert grads[-1] < 1e-10
    assert grads[3] < grads[2] ** 1.5 or grads[2] < 1e-9


@pytest.mark.task2_3
def test_irls_softmax_step_matches_autograd_gradient():
    """The step's gradient term is the gradient of softmax_objective (checked by autograd)."""
    rng = np.random.default_rng(2)
    X = augment(rng.standard_normal((30, 2)))
    T, w = rng.dirichlet(np.ones(2), 30), rng.random(30)
    V = rng.standard_normal((3, 2)) * 0.3
    Vt = tm.tensor(V, requires_grad=True)
    obj = (tm.tensor(w[:, None] * T) * tm.functional.log_softmax(tm.tensor(X) @ Vt)).sum()
    obj.backward()
    V_new = irls_softmax_step(X, T, w, V)
    g = np.exp(X @ V)
    g /= g.sum(1, keepdims=True)
    S = w[:, None, None] * (np.eye(2) * g[:, :, None] - g[:, :, None] * g[:, None, :])
    H = np.einsum("ta,tkl,tb->akbl", X, S, X).reshape(6, 6)
    np.testing.assert_allclose(H @ (V_new - V).reshape(-1), Vt.grad.reshape(-1), atol=1e-8)


def test_irls_logistic_step_reaches_the_weighted_mle():
    X, Y = _binary(100, 3)
    xa = augment(X)
    w = np.random.default_rng(3).random(100)
    B = np.zeros((3, 1))
    for _ in range(25):
        B = irls_logistic_step(xa, Y, w, B, 1e-6)
    pi = 1 / (1 + np.exp(-(xa @ B)))
    np.testing.assert_allclose(xa.T @ (w[:, None] * (Y - pi)), 1e-6 * B, atol=1e-8)
    assert logistic_objective(xa, Y, w, B, 1e-6) >= logistic_objective(xa, Y, w, B * 0.9, 1e-6)


# --- EM -----------------------------------------------------------------------------------------
@pytest.mark.task2_1
@pytest.mark.task2_2
@pytest.mark.task2_3
@pytest.mark.task2_4
@pytest.mark.parametrize("expert,seed", [("gaussian", 0), ("gaussian", 1), ("logistic", 0),
                                         ("logistic", 1)])
def test_em_never_lowers_the_likelihood(expert, seed):
    X, Y = _regression(200, seed) if expert == "gaussian" else _binary(200, seed)
    tree = HME(2, 1, 2, 2, expert=expert, rng=seed)
    hist = fit_em(tree, X, Y, 25, check_monotone=False)
    obj, ll = np.asarray(hist.objective), np.asarray(hist.log_likelihood)
    for it in range(1, len(obj)):  # asserted per iteration
        assert obj[it] >= obj[it - 1] - 1e-9 * abs(obj[it - 1]), f"iteration {it}"
        assert ll[it] >= ll[it - 1] - 1e-6, f"iteration {it}"  # the ridge is negligible
    assert ll[-1] > ll[0] + 0.3
    post = tree.posteriors(X, Y)
    np.testing.assert_allclose(post.h.sum((1, 2)), 1.0)


@pytest.mark.task2_1
@pytest.mark.task2_2
@pytest.mark.task2_3
@pytest.mark.task2_4
def test_em_beats_gradient_in_epochs():
    from tinymoe.app.experiments.hme_1994 import make_tree

    X, Y = _regression(300, 0)
    tree_g = make_tree(0, Y)
    tree_e = copy.deepcopy(tree_g)
    g = fit_gradient(tree_g, X, Y, 200, 0.1)
    e = fit_em(tree_e, X, Y, 10)
    assert g.log_likelihood[-1] > g.log_likelihood[0]
    assert e.log_likelihood[10] > g.log_likelihood[-1]  # 10 EM epochs beat 200 gradient ones


@pytest.mark.task2_1
@pytest.mark.task2_2
@pytest.mark.task2_3
@pytest.mark.task2_4
def test_em_step_is_in_place_and_counts_newton_steps():
    X, Y = _regression(100)
    tree = HME(2, 1, 2, 2, rng=0)
    before = tree.state_dict()
    steps = em_step(tree, X, Y)
    after = tree.state_dict()
    assert steps > 0 and any(not np.array_equal(before[k], after[k]) for k in before)


# --- bad input ----------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="n_experts must be a positive integer, got 0"):
        HME(2, 1, 2, 0)
    with pytest.raises(ValueError, match="n_branches must be a positive integer, got 0"):
        HME(2, 1, 0, 2)
    with pytest.raises(ValueError, match="expert="):
        HME(2, 1, expert="poisson")
    tree = HME(2, 1, 2, 2, rng=0)
    X, Y = _regression(10)
    with pytest.raises(ValueError, match=r"x must be \(T, 2\)"):
        tree.log_likelihood(np.c_[X, X], Y)
    Xn = X.copy()
    Xn[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_em(tree, Xn, Y, 1)
    with pytest.raises(ValueError, match="targets"):
        tree.posteriors(X, np.zeros((10, 2)))
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        HME(2, 1, expert="logistic", rng=0).log_likelihood(X, Y)
    with pytest.raises(FloatingPointError, match="lower lr"):
        fit_gradient(HME(2, 1, rng=0, variance=1e-3), X, Y * 100, 50, lr=1e6)


# --- the reproduction script --------------------------------------------------------------------
@pytest.mark.task2_1
@pytest.mark.task2_2
@pytest.mark.task2_3
@pytest.mark.task2_4
def test_hme_script_end_to_end_fast():
    from tinymoe.app.experiments import hme_1994 as h

    comp, _, tree_e = h.compare(0, n_train=300, grad_epochs=300, em_iters=15)
    assert comp.em_epochs is not None and comp.ratio > 1
    assert comp.rel_err_em < comp.rel_err_linear
    text = h.format_table(h.HMEResult(1, True, 300, 300, 15, h.GRAD_LR, [comp], 0.0))
    assert "5,500" in text and "ratio gradient / EM epochs" in text
    assert h.figure_curves(comp).axes and h.figure_regions(tree_e).axes


def test_hme_script_helpers():
    from tinymoe.app.experiments import hme_1994 as h

    assert h.best_lr({0.01: (-1.0, 0), 0.1: (0.5, 3), 0.03: (-0.2, 0)}) == 0.03
    assert h.final_level([0.0] * 90 + [1.0, 5.0, 1.0, 1.0, -9.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == 1.0
    assert h.first_reaching([0.0, 0.5, 0.4, 0.9], 0.45) == 1
    assert h.first_reaching([0.0, 0.1], 0.5) is None
    X, y = h.piecewise_data(50, 0)
    assert X.shape == (50, 2) and y.shape == (50, 1)
    assert h.relative_error(y, np.full_like(y, y.mean())) == pytest.approx(1.0)
