"""Conditional computation: stochastic binary gates and their gradient estimators
(tinymoe.moe.conditional)."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe import ops
from tinymoe.moe.conditional import (
    GatedBlocks,
    BlockGatedNet,
    bernoulli_log_prob,
    estimator_study,
    expected_over_gates,
    gate_configurations,
    reinforce_surrogate,
    sparsity_regularisers,
    stochastic_times_smooth,
    straight_through,
)


def leaf(a):
    return tm.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def quadratic(rng, K=3):
    W, t = rng.standard_normal((K, 2)), rng.standard_normal(2)

    def loss(h):
        d = ops.matmul(ops.unsqueeze(h, 0), W).reshape((2,)) - t
        return (d * d).sum()
    return loss


@pytest.mark.task2b_1
def test_stochastic_times_smooth_value_mean_and_gradient():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 5))
    u = rng.random((4, 5))
    h = stochastic_times_smooth(leaf(a), u)
    s = np.sqrt(1 / (1 + np.exp(-a)))
    assert np.allclose(h.data, (u < s) * s)
    # the gradient flows through sqrt(sigm(a)) only, with b held fixed
    tm.gradcheck(lambda a: stochastic_times_smooth(a, u), [leaf(a)])
    x = leaf(a)
    stochastic_times_smooth(x, u).sum().backward()
    p = 1 / (1 + np.exp(-a))
    assert np.allclose(x.grad, (u < s) * 0.5 * np.sqrt(p) * (1 - p))
    # E[h] = sigm(a): average over many uniforms
    many = stochastic_times_smooth(np.zeros((20000,)), np.random.default_rng(1).random(20000))
    assert abs(many.data.mean() - 0.5) < 0.02


@pytest.mark.task2b_2
def test_reinforce_surrogate_gradient_is_cost_times_b_minus_p():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 3)), (rng.random((5, 3)) < 0.5).astype(float)
    cost, base = rng.random(5) * 3, 1.2
    x = leaf(a)
    reinforce_surrogate(x, b, cost, base).backward()
    p = 1 / (1 + np.exp(-a))
    assert np.allclose(x.grad, (cost - base)[:, None] * (b - p) / 5)
    tm.gradcheck(lambda a: reinforce_surrogate(a, b, cost, base), [leaf(a)])
    value = reinforce_surrogate(a, b, cost, base).item()
    logp = b * np.log(p) + (1 - b) * np.log(1 - p)
    assert np.isclose(value, ((cost - base)[:, None] * logp).sum() / 5)
    with pytest.raises(ValueError, match="cost must be"):
        reinforce_surrogate(a, b, cost[:3])


def test_bernoulli_log_prob_and_straight_through():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(6) * 3, (rng.random(6) < 0.5).astype(float)
    tm.gradcheck(lambda a: bernoulli_log_prob(a, b), [leaf(a)])
    assert np.isfinite(bernoulli_log_prob(np.array([800.0, -800.0]), np.array([0.0, 1.0])).data
                       ).all()
    p, u = rng.random(6), rng.random(6)
    x = leaf(p)
    out = straight_through(x, u)
    assert np.array_equal(out.data, (u < p).astype(float))
    (out * np.arange(6.0)).sum().backward()
    assert np.allclose(x.grad, np.arange(6.0))  # the identity in p
    with pytest.raises(ValueError, match="uniforms"):
        straight_through(p, u[:3])


def test_expected_over_gates_is_exact():
    rng = np.random.default_rng(4)
    loss = quadratic(rng)
    p = rng.uniform(0.1, 0.9, 3)
    configs = gate_configurations(3)
    assert configs.shape == (8, 3) and len({tuple(c) for c in configs}) == 8
    direct = sum(np.prod(np.where(b > 0, p, 1 - p)) * loss(tm.tensor(b)).item() for b in configs)
    assert np.isclose(expected_over_gates(p, lambda b: loss(tm.tensor(b))).item(), direct)
    tm.gradcheck(lambda q: expected_over_gates(q, lambda b: loss(tm.tensor(b))), [leaf(p)])


@pytest.mark.task2b_1
def test_estimator_study_reinforce_is_unbiased_and_the_others_are_not():
    rng = np.random.default_rng(5)
    study = estimator_study(rng.standard_normal(3), quadratic(rng))
    assert study["reinforce"].bias < 1e-10 and study["reinforce+baseline"].bias < 1e-10
    assert study["reinforce+baseline"].variance < study["reinforce"].variance
    assert study["straight-through"].bias > 1e-3  # biased ...
    assert study["straight-through"].variance < study["reinforce+baseline"].variance  # ... calm
    assert study["stochastic-times-smooth"].bias > 1e-3
    # the two units have different objectives, hence different true gradients
    assert not np.allclose(study["reinforce"].exact, study["stochastic-times-smooth"].exact)


@pytest.mark.task2b_1
def test_estimator_study_matches_monte_carlo_for_reinforce():
    rng = np.random.default_rng(6)
    a, loss = rng.standard_normal(3), quadratic(rng)
    exact = estimator_study(a, loss)["reinforce"]
    p = 1 / (1 + np.exp(-a))
    b = (np.random.default_rng(7).random((40000, 3)) < p).astype(float)
    L = np.array([loss(tm.tensor(r)).item() for r in np.unique(b, axis=0)])
    index = {tuple(r): i for i, r in enumerate(np.unique(b, axis=0))}
    g = np.array([L[index[tuple(r)]] for r in b])[:, None] * (b - p)
    assert np.allclose(g.mean(0), exact.mean, atol=4 * g.std(0).max() / 200)


@pytest.mark.task2b_3
def test_sparsity_regularisers_match_the_formulas_and_gradcheck():
    rng = np.random.default_rng(8)
    sigma = rng.uniform(0.05, 0.95, (6, 4))
    reg = sparsity_regularisers(sigma, 0.3)
    assert np.isclose(reg["L_b"].item(), np.abs(sigma.mean(0) - 0.3).sum())
    assert np.isclose(reg["L_e"].item(), np.abs(sigma.mean(1) - 0.3).mean())
    assert np.isclose(reg["L_v"].item(), -sigma.var(0).sum())
    for name in ("L_b", "L_e", "L_v"):
        tm.gradcheck(lambda s, name=name: sparsity_regularisers(s, 0.3)[name], [leaf(sigma)])
    with pytest.raises(ValueError, match="tau"):
        sparsity_regularisers(sigma, 0.0)


def test_block_gated_layer_masks_whole_blocks_and_gradchecks():
    rng = np.random.default_rng(9)
    layer = GatedBlocks(5, 3, 2, rng=rng)
    x = rng.standard_normal((4, 5))
    u = rng.random((4, 3))
    out = layer(x, mode="sample", u=u)
    sigma = 1 / (1 + np.exp(-out.logits.data))
    assert np.array_equal(out.mask, (u < sigma).astype(float))
    dense = layer(x, mode="all").h.data.reshape(4, 3, 2)
    assert np.allclose(out.h.data.reshape(4, 3, 2), dense * out.mask[:, :, None])
    names = [n for n, _ in layer.linear.named_parameters()]
    tm.gradcheck(lambda x, *ps: layer(x, mode="sample", u=u).h, [leaf(x)]
                 + list(layer.linear.parameters()), names=["x"] + names)
    with pytest.raises(ValueError, match="mode"):
        layer(x, mode="sometimes")


@pytest.mark.task2b_2
def test_block_gated_net_trains_its_policy_by_reinforce():
    rng = np.random.default_rng(10)
    net = BlockGatedNet(6, 3, n_blocks=4, block=3, rng=rng)
    x = rng.standard_normal((8, 6))
    logits, outs = net(x, rng=np.random.default_rng(0))
    assert logits.shape == (8, 3) and len(outs) == 2
    cost = rng.random(8)
    surrogate = sum(reinforce_surrogate(o.logits, o.mask, cost) for o in outs)
    surrogate.backward()
    assert all(np.abs(p.grad).sum() > 0 for p in net.policy_parameters())
    assert net.classifier.weight.grad is None  # the surrogate touches only the policies
