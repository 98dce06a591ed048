"""The 2013 deep mixture of experts (tinymoe.moe.deep_moe)."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.losses import cross_entropy
from tinymoe.moe.deep_moe import (
    AssignmentConstraint,
    DeepMoE,
    gate_mutual_information,
    gate_table,
    mixture_layer,
)


def leaf(a):
    return tm.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def test_mixture_layer_is_the_gate_weighted_sum_of_relu_experts():
    rng = np.random.default_rng(0)
    layer = mixture_layer(5, 3, 4, 6, rng=rng)
    assert isinstance(layer, tm.moe.MoELayer)  # the library's one layer, with a dense gate
    x = rng.standard_normal((7, 5))
    z, aux = layer(x)
    assert aux == {}
    g = layer.last_routing.probs
    experts = [np.maximum(x @ f.linear.weight.data + f.linear.bias.data, 0)
               for f in layer.experts]
    gate = layer.router
    hidden = np.maximum(x @ gate.hidden.weight.data + gate.hidden.bias.data, 0)
    logits = hidden @ gate.out.weight.data + gate.out.bias.data
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.allclose(g.data, p)
    assert np.allclose(z.data, sum(p[:, [i]] * e for i, e in enumerate(experts)))


def test_deep_moe_gradcheck_with_and_without_the_constraint():
    rng = np.random.default_rng(1)
    model = DeepMoE(4, 3, (3, 2), (5, 4), 3, rng=rng)
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    tm.gradcheck(lambda x, *ps: cross_entropy(model(x).logits, y), [leaf(x)] + params,
                 names=["x"] + names)
    allowed = np.ones((6, 3), dtype=bool)
    allowed[[0, 2, 5], 1] = False
    layer = model.layers[0]
    tm.gradcheck(lambda x: layer(x, allowed=allowed)[0], [leaf(x)])
    layer(x, allowed=allowed)
    g = layer.last_routing.probs.data
    assert np.allclose(g[[0, 2, 5], 1], 0) and np.allclose(g.sum(1), 1)
    with pytest.raises(ValueError, match="at least one True"):
        layer(x, allowed=np.zeros((6, 3), dtype=bool))


def test_assignment_constraint_keeps_totals_within_the_margin():
    rule = AssignmentConstraint(3, margin=2.0)
    probs = np.tile([0.98, 0.01, 0.01], (60, 1))  # a collapsed gate: expert 0 wins all
    allowed = rule.mask(probs)
    assert rule.totals.max() - rule.totals.min() <= 2.0 + 1.0
    assert not allowed[:, 0].all()  # expert 0 was switched off for some cases
    assert allowed.any(axis=1).all()
    assert np.isclose(rule.totals.sum(), 60.0)  # each case hands out one unit
    free = AssignmentConstraint(3, margin=1e9)
    assert free.mask(probs).all() and np.allclose(free.totals, probs.sum(0))
    with pytest.raises(ValueError, match="margin"):
        AssignmentConstraint(3, margin=-1)
    with pytest.raises(ValueError, match=r"\(n, 3\)"):
        rule.mask(np.ones((2, 4)))


def test_deep_moe_rejects_mismatched_constraints_and_shapes():
    model = DeepMoE(4, 3, (2, 2), (3, 3), 2, rng=0)
    with pytest.raises(ValueError, match="one \\(or None\\) per layer"):
        model(np.zeros((2, 4)), [None])
    with pytest.raises(ValueError, match="same length"):
        DeepMoE(4, 3, (2, 2), (3,))


def test_gate_table_and_mutual_information():
    labels = np.array([0, 0, 1, 1])
    sharp = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    assert np.allclose(gate_table(sharp, labels), [[1, 0], [0, 1]])
    assert np.isclose(gate_mutual_information(sharp, labels), np.log(2))
    flat = np.full((4, 2), 0.5)
    assert np.isclose(gate_mutual_information(flat, labels), 0.0)
    half = np.array([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.25, 0.75]])
    mi = gate_mutual_information(half, labels)
    assert 0 < mi < np.log(2)
    # I = log 2 - H(0.75): the label is uniform and P(e | c) is (0.75, 0.25)
    assert np.isclose(mi, np.log(2) + 0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert np.isnan(gate_table(sharp, labels, n_labels=3)[2]).all()
