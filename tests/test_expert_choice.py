"""Expert choice routing (Zhou et al. 2022): every expert takes its top-C tokens, C =
ceil(T·c/E) in [1, T], ties to the lower token, slots in descending score, raw-S gates,
through the one MoELayer on both dispatch backends, gradients, and what it costs (causality)."""
import math

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.moe.capacity import expert_capacity
from tinymoe.moe.expert_choice import (
    ExpertChoiceRouter,
    expert_buckets,
    expert_choice_capacity,
    expert_choice_positions,
    experts_per_token,
    unrouted_fraction,
)
from tinymoe.dispatch.routing import Routing
from tinymoe.moe.layer import MoELayer, moe_layer

F64 = np.float64


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def check_expert_choice(S, C, position):
    """Assert that ``position`` (T, E) is expert choice's answer for scores S and capacity C,
    from its definition, without computing it: each expert fills slots 0..C-1 once; a
    chosen token outranks every token left out, and slot c+1's token ranks below slot c's,
    where t ranks above t' when S[t, e] > S[t', e], or the scores tie and t < t'."""
    T, E = S.shape
    assert position.shape == (T, E) and position.dtype == np.int64
    for e in range(E):
        col = position[:, e]
        assert np.all((col >= -1) & (col < C)), (e, col)
        slots = col[col >= 0]
        assert sorted(slots) == list(range(C)), (e, col)  # each slot filled exactly once
        by_slot = np.argsort(np.where(col >= 0, col, C + np.arange(T)))  # slot order, then out
        rank = [(-S[t, e], t) for t in by_slot]
        assert all(a < b for a, b in zip(rank[:C], rank[1:C])), (e, col)  # slots in rank order
        if C < T:
            left_out = min(rank[C:])
            assert rank[C - 1] < left_out, (e, col)  # the last kept outranks all left out


def make_router(d=5, E=3, cf=2.0, seed=0, scale=1.0):
    router = ExpertChoiceRouter(d, E, capacity_factor=cf, router_dtype="float64", rng=seed)
    router.W_g.data = scale * np.random.default_rng(seed + 100).standard_normal((d, E))
    return router


def make_layer(d=5, E=3, f=4, cf=2.0, seed=0, scale=1.0):
    layer = moe_layer(make_router(d, E, cf, seed, scale), f, dtype=F64, rng=seed)
    rng = np.random.default_rng(seed + 200)
    for name in ("b1", "b2"):
        p = getattr(layer.experts, name)
        p.data = 0.1 * rng.standard_normal(p.shape)
    return layer


def direct_loop(layer, x):
    """y_t = Σ_e [t chosen by e] S[t, e] FFN_e(x_t), with S and the choice recomputed here."""
    S = softmax(x @ layer.router.W_g.numpy())  # (T, E)
    T, E = S.shape
    C = expert_choice_capacity(T, E, layer.router.capacity_factor)
    position = expert_choice_positions(S, C)
    check_expert_choice(S, C, position)
    chosen = position >= 0
    y = np.zeros_like(x)
    for t in range(T):
        for e in range(E):
            if chosen[t, e]:
                y[t] += S[t, e] * layer.experts.expert(e, x[t:t + 1]).numpy()[0]
    return y


def margin(S, C):
    """Smallest gap between each expert's C-th and (C+1)-th score (inf when C = T)."""
    if C >= S.shape[0]:
        return math.inf
    top = -np.sort(-S, axis=0)  # (T, E) descending per column
    return float((top[C - 1] - top[C]).min())


# --- capacity -------------------------------------------------------------------------------
@pytest.mark.parametrize("T, E, c, C", [
    (16, 4, 2.0, 8), (10, 4, 1.0, 3), (12, 8, 2.0, 3), (100, 8, 1.1, 14), (10, 1, 1.1, 10),
    (100, 2, 1.1, 55), (3, 1, 2.0, 3), (5, 8, 1.0, 1), (4, 8, 0.5, 1), (7, 1, 1.0, 7),
    (1, 4, 2.0, 1), (64, 8, 0.5, 4)])
def test_capacity_is_the_ceiling_of_T_c_over_E_clamped_to_one_and_T(T, E, c, C):
    assert expert_choice_capacity(T, E, c) == C


def test_capacity_never_below_the_share_and_within_one_and_T():
    rng = np.random.default_rng(0)
    for _ in range(300):
        T, E = int(rng.integers(1, 400)), int(rng.integers(1, 33))
        c = float(rng.choice([0.25, 0.5, 1.0, 1.1, 1.25, 2.0, 3.0, 50.0]))
        C = expert_choice_capacity(T, E, c)
        assert 1 <= C <= T
        assert C >= min(T, T * c / E - 1e-9) and C - 1 < max(T * c / E, 1)


@pytest.mark.task4_1
def test_capacity_is_the_token_choice_rule_with_k_1():
    for T, E, c in [(16, 4, 2.0), (100, 8, 1.1), (5, 8, 1.0), (3, 1, 7.0), (99, 7, 1.25)]:
        assert expert_choice_capacity(T, E, c) == expert_capacity(T, E, c)


# --- the heart: per-expert top-C over tokens -> slots ------------------------------------------
HAND_S = np.array([[0.80, 0.10, 0.10],
                   [0.60, 0.30, 0.10],
                   [0.10, 0.70, 0.20],
                   [0.20, 0.20, 0.60],
                   [0.40, 0.25, 0.35],
                   [0.05, 0.15, 0.80]])
# C = ceil(6·1/3) = 2. Expert 0 takes t0 (.8), t1 (.6); expert 1 t2 (.7), t1 (.3); expert 2
# t5 (.8), t3 (.6). Token 4 is everybody's third choice: nobody takes it.
HAND_POSITION = np.array([[0, -1, -1],
                          [1, 1, -1],
                          [-1, 0, -1],
                          [-1, -1, 1],
                          [-1, -1, -1],
                          [-1, -1, 0]])


@pytest.mark.task6_2
def test_hand_example_positions():
    position = expert_choice_positions(HAND_S, 2)
    assert position.dtype == np.int64 and position.shape == (6, 3)
    np.testing.assert_array_equal(position, HAND_POSITION)


@pytest.mark.task6_2
def test_hand_example_through_the_router():
    """W_g = I and x = log S give back S exactly (up to rounding): scores, choices, slots,
    gates, buckets, experts per token."""
    router = ExpertChoiceRouter(3, 3, capacity_factor=1.0, router_dtype="float64", rng=0)
    router.W_g.data = np.eye(3)
    r = router(tm.tensor(np.log(HAND_S)))
    assert isinstance(r, Routing) and r.aux_losses == {}
    np.testing.assert_allclose(r.probs.numpy(), HAND_S, rtol=1e-13)
    assert r.capacity == 2 == router.capacity and r.num_experts == 3 and r.k == 3
    np.testing.assert_array_equal(r.expert_index, np.tile(np.arange(3), (6, 1)))
    np.testing.assert_array_equal(r.position, HAND_POSITION)
    np.testing.assert_allclose(r.combine_weight.numpy(), HAND_S * (HAND_POSITION >= 0),
                               rtol=1e-13)
    np.testing.assert_array_equal(r.counts, [2, 2, 2])
    np.testing.assert_array_equal(r.counts, (r.position >= 0).sum(axis=0))  # kept per expert
    np.testing.assert_array_equal(expert_buckets(r), [[0, 1], [2, 1], [5, 3]])
    np.testing.assert_array_equal(experts_per_token(r), [1, 2, 1, 1, 0, 1])
    assert unrouted_fraction(r) == pytest.approx(1 / 6)
    assert r.dropped_fraction == pytest.approx(1 / 6)  # token 4: no expert took it
    np.testing.assert_array_equal(r.dropped_tokens, [False] * 4 + [True, False])


@pytest.mark.task6_2
def test_ties_go_to_the_lower_token_index():
    S = np.array([[0.3, 0.5], [0.3, 0.5], [0.4, 0.1], [0.3, 0.5]])
    position = expert_choice_positions(S, 2)
    # expert 0: t2 (.4) first, then the three-way tie at .3 goes to t0
    # expert 1: the three-way tie at .5 goes to t0, then t1
    np.testing.assert_array_equal(position, [[1, 0], [-1, 1], [0, -1], [-1, -1]])
    flat = np.full((5, 3), 1 / 3)
    np.testing.assert_array_equal(expert_choice_positions(flat, 2)[:, 0], [0, 1, -1, -1, -1])


@pytest.mark.task6_2
def test_zero_router_sends_every_expert_to_the_first_tokens():
    """With W_g = 0 all scores tie and ties go to the lowest index: every expert takes tokens
    0..C-1 and the rest of the batch gets no expert at all."""
    router = ExpertChoiceRouter(4, 4, capacity_factor=1.0, router_dtype="float64", rng=0)
    router.W_g.data = np.zeros((4, 4))
    r = router(tm.tensor(np.random.default_rng(0).standard_normal((8, 4))))
    C = r.capacity
    assert C == 2
    np.testing.assert_array_equal(expert_buckets(r), np.tile(np.arange(C), (4, 1)))
    np.testing.assert_array_equal(experts_per_token(r), [4, 4, 0, 0, 0, 0, 0, 0])
    assert unrouted_fraction(r) == 0.75 == r.dropped_fraction


@pytest.mark.task6_2
def test_routing_meets_the_definition_of_expert_choice():
    rng = np.random.default_rng(1)
    for trial in range(60):
        T, E = int(rng.integers(1, 40)), int(rng.integers(1, 9))
        S = rng.random((T, E))
        if trial % 3 == 0:
            S = np.round(S, 1)  # plenty of ties
        C = int(rng.integers(1, T + 1))
        check_expert_choice(S, C, expert_choice_positions(S, C))
    # the check refuses near misses: a swapped pair of slots, a token left out for a worse one
    S = np.array([[0.9, 0.1], [0.5, 0.5], [0.5, 0.7], [0.2, 0.3]])
    good = np.array([[0, -1], [1, 1], [-1, 0], [-1, -1]])
    check_expert_choice(S, 2, good)
    for bad in ([[1, -1], [0, 1], [-1, 0], [-1, -1]], [[0, -1], [-1, 1], [1, 0], [-1, -1]],
                [[0, -1], [1, -1], [-1, 0], [-1, 1]]):
        with pytest.raises(AssertionError):
            check_expert_choice(S, 2, np.array(bad))


@pytest.mark.task6_2
@pytest.mark.parametrize("T, E, c", [(16, 4, 2.0), (10, 4, 1.0), (9, 3, 0.5), (6, 4, 50.0),
                                     (1, 3, 2.0), (13, 1, 1.0)])
def test_every_expert_gets_exactly_C_tokens_one_per_slot(T, E, c):
    router = make_router(d=5, E=E, cf=c, seed=T)
    x = np.random.default_rng(T).standard_normal((T, 5))
    r = router(tm.tensor(x))
    C = expert_choice_capacity(T, E, c)
    assert r.capacity == C
    np.testing.assert_array_equal(r.counts, np.full(E, C))
    for e in range(E):  # column e holds the slots 0..C-1, each exactly once
        np.testing.assert_array_equal(np.sort(r.position[r.position[:, e] >= 0, e]),
                                      np.arange(C))
    buckets = expert_buckets(r)
    assert (buckets >= 0).all()
    assert all(len(set(buckets[e])) == C for e in range(E))  # no token twice in a bucket
    assert experts_per_token(r).sum() == E * C
    assert experts_per_token(r).max() <= E


@pytest.mark.task6_2
def test_slots_hold_tokens_in_descending_score():
    """Slot 0 of each expert is its best token; the bucket is the paper's I of TopK(Sᵀ, C)."""
    rng = np.random.default_rng(2)
    router = make_router(d=6, E=4, cf=2.0, seed=2)
    r = router(tm.tensor(rng.standard_normal((20, 6))))
    S, buckets = r.probs.numpy(), expert_buckets(r)
    for e in range(4):
        col = S[buckets[e], e]  # (C,) scores in slot order
        assert (np.diff(col) <= 0).all()
        assert col[-1] >= np.delete(S[:, e], buckets[e]).max()  # nobody better was left out
    check_expert_choice(S, 10, r.position)  # ties too, from the definition


@pytest.mark.task6_2
def test_gates_are_the_raw_scores_of_the_chosen_pairs():
    rng = np.random.default_rng(3)
    router = make_router(d=5, E=3, cf=1.0, seed=3)
    x = rng.standard_normal((12, 5))
    r = router(tm.tensor(x))
    S = softmax(x @ router.W_g.numpy())
    np.testing.assert_allclose(r.probs.numpy(), S, rtol=1e-12)
    np.testing.assert_allclose(r.logits.numpy(), x @ router.W_g.numpy(), rtol=1e-12)
    chosen = r.position >= 0
    w = r.combine_weight.numpy()
    np.testing.assert_allclose(w[chosen], S[chosen], rtol=1e-12)  # not renormalised
    np.testing.assert_array_equal(w[~chosen], 0.0)
    assert (w.sum(axis=1) <= 1 + 1e-12).all()


@pytest.mark.task6_2
def test_router_computes_in_float32_and_returns_the_models_dtype():
    rng = np.random.default_rng(4)
    router = ExpertChoiceRouter(8, 4, rng=0)
    assert router.W_g.dtype == np.float32 and router.W_g.shape == (8, 4)
    for dt in (np.float32, np.float64):
        x = tm.tensor(rng.standard_normal((10, 8)).astype(dt))
        r = router(x)
        assert r.logits.dtype == np.float32 and r.probs.dtype == np.float32
        assert r.combine_weight.dtype == dt


def test_default_init_is_switchs_truncated_normal():
    w = ExpertChoiceRouter(400, 50, rng=0).W_g.numpy()
    std = math.sqrt(0.1 / 400)
    assert np.abs(w).max() <= 2 * std + 1e-9
    assert abs(w.std() / std - 0.8796) < 0.02  # a normal truncated at 2 sigma


# --- the layer: dispatch + experts + combine -----------------------------------------------------
@pytest.mark.task6_2
@pytest.mark.parametrize("c", [0.5, 1.0, 2.0, 100.0])
def test_layer_equals_the_direct_sum_over_chosen_experts(c):
    rng = np.random.default_rng(5)
    layer = make_layer(d=5, E=4, f=6, cf=c, seed=5)
    x = rng.standard_normal((2, 7, 5))
    y, aux = layer(tm.tensor(x))
    assert y.shape == (2, 7, 5) and aux == {}
    assert isinstance(layer.last_routing, Routing)
    np.testing.assert_allclose(y.numpy().reshape(14, 5), direct_loop(layer, x.reshape(14, 5)),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.task6_2
def test_full_capacity_is_the_dense_softmax_mixture():
    """C = T: every expert takes every token, y = Σ_e S[t, e] FFN_e(x_t)."""
    rng = np.random.default_rng(6)
    layer = make_layer(d=4, E=3, f=5, cf=3.0, seed=6)
    x = rng.standard_normal((9, 4))
    y = layer(tm.tensor(x))[0].numpy()
    assert layer.last_routing.capacity == 9
    S = softmax(x @ layer.router.W_g.numpy())
    dense = sum(S[:, e:e + 1] * layer.experts.expert(e, x).numpy() for e in range(3))
    np.testing.assert_allclose(y, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.task6_2
def test_tokens_no_expert_chose_get_zero_output():
    rng = np.random.default_rng(7)
    layer = make_layer(d=5, E=4, f=6, cf=0.5, seed=7, scale=2.0)
    x = rng.standard_normal((24, 5))
    y = layer(tm.tensor(x))[0].numpy()
    r = layer.last_routing
    none = experts_per_token(r) == 0
    assert none.sum() >= 12  # E·C = 4·3 = 12 pairs for 24 tokens: half at least get nothing
    assert unrouted_fraction(r) == pytest.approx(none.mean())
    np.testing.assert_array_equal(y[none], 0.0)
    assert (np.abs(y[~none]).sum(axis=1) > 0).all()


@pytest.mark.task6_2
def test_both_dispatch_backends_agree():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((16, 5))
    cot = rng.standard_normal((16, 5))
    results = {}
    for backend in ("numpy", "numba"):
        layer = make_layer(d=5, E=4, f=6, cf=1.5, seed=8)
        xt = tm.tensor(x, requires_grad=True)
        with tm.dispatch.use_backend(backend):
            y, _ = layer(xt)
            (y * tm.tensor(cot)).sum().backward()
        results[backend] = {"y": y.numpy(), "x": xt.grad,
                            **{n: p.grad for n, p in layer.named_parameters()}}
    ref, ker = results["numpy"], results["numba"]
    assert set(ker) == {"y", "x", "router.W_g", "experts.W1", "experts.b1", "experts.W2",
                        "experts.b2"}
    for name in ("y", "experts.W1", "experts.b1", "experts.W2", "experts.b2"):
        np.testing.assert_array_equal(ref[name], ker[name])  # copies and fixed-order sums
    for name in ("x", "router.W_g"):  # through dL/dw, a dot product: equal up to rounding
        np.testing.assert_allclose(ref[name], ker[name], rtol=1e-12, atol=1e-13)


@pytest.mark.task6_2
def test_expert_choice_is_not_causal():
    """Changing only the LAST token changes the routing and the output of the FIRST one:
    why expert choice does not suit autoregressive decoding (flaxformer's warning)."""
    router = ExpertChoiceRouter(2, 2, capacity_factor=1.0, router_dtype="float64", rng=0)
    router.W_g.data = np.eye(2)
    p = np.array([[0.6, 0.4], [0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    before = router(tm.tensor(np.log(p))).position
    p[3] = [0.9, 0.1]  # a "future" token becomes a strong candidate for expert 0
    after = router(tm.tensor(np.log(p))).position
    np.testing.assert_array_equal(before[0] >= 0, [True, False])  # t0 had expert 0 ...
    np.testing.assert_array_equal(after[0] >= 0, [False, True])   # ... now expert 1 instead


# --- gradients (float64, random inputs: no ties near the cut) ------------------------------------
@pytest.mark.task6_2
def test_router_gradcheck_of_combine_weights_wrt_x_and_W_g():
    rng = np.random.default_rng(9)
    router = make_router(d=5, E=3, cf=1.5, seed=9)
    x = tm.tensor(rng.standard_normal((8, 5)), requires_grad=True)
    r = router(x)
    assert margin(r.probs.numpy(), r.capacity) > 1e-4

    def f(x_, W_g):
        return router(x_).combine_weight

    tm.gradcheck(f, [x, router.W_g], names=["x", "W_g"])


@pytest.mark.task6_2
def test_layer_gradcheck_wrt_x_and_every_parameter():
    rng = np.random.default_rng(10)
    layer = make_layer(d=4, E=3, f=5, cf=1.5, seed=10)
    x = tm.tensor(rng.standard_normal((8, 4)), requires_grad=True)
    layer(x)
    r = layer.last_routing
    assert margin(r.probs.numpy(), r.capacity) > 1e-4
    params = [x] + [p for _, p in layer.named_parameters()]
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    assert "router.W_g" in names

    tm.gradcheck(lambda *_: layer(x)[0], params, names=names)


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), None, "2", True])
def test_bad_capacity_factor_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="ExpertChoiceRouter: capacity_factor=.*must be"):
        ExpertChoiceRouter(4, 2, capacity_factor=bad)
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_choice_capacity(10, 2, bad)


@pytest.mark.parametrize("shape", [(5, 7), (5,), (2, 5, 4), (0, 3)])
def test_bad_input_shape_names_the_router_and_the_fix(shape):
    router = ExpertChoiceRouter(4, 2, rng=0)
    with pytest.raises(ValueError, match=r"ExpertChoiceRouter\(d_model=4\): x must be "
                                         r"\(T, 4\).*reshape"):
        router(tm.tensor(np.ones(shape, np.float32)))


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="ExpertChoiceRouter: num_experts"):
        ExpertChoiceRouter(4, 0)
    with pytest.raises(ValueError, match="ExpertChoiceRouter: d_model"):
        ExpertChoiceRouter(0, 2)
    with pytest.raises(ValueError, match="router_dtype"):
        ExpertChoiceRouter(4, 2, router_dtype="int8")
    with pytest.raises(ValueError, match="init_scale"):
        ExpertChoiceRouter(4, 2, init_scale=0.0)
    with pytest.raises(TypeError, match="ExpertChoiceRouter.*floating"):
        ExpertChoiceRouter(4, 2, rng=0)(tm.tensor(np.ones((3, 4), np.int64)))
    with pytest.raises(ValueError, match="num_tokens"):
        expert_choice_capacity(0, 2, 1.0)
    with pytest.raises(ValueError, match=r"expert_choice_positions: capacity=5.*\[1, 4\]"):
        expert_choice_positions(np.ones((4, 2)), 5)
    with pytest.raises(ValueError, match="expert_choice_positions: scores must be"):
        expert_choice_positions(np.ones(4), 1)
    with pytest.raises(ValueError, match="MoELayer.*last dim 3"):
        moe_layer(ExpertChoiceRouter(4, 2, rng=0), 8, rng=0)(
            tm.tensor(np.ones((5, 3), np.float32)))
    with pytest.raises(ValueError, match="MoELayer: 3 experts given for a router over "
                                         "num_experts=2"):
        MoELayer(ExpertChoiceRouter(4, 2, rng=0), [tm.nn.Linear(4, 4) for _ in range(3)])


def test_expert_buckets_refuses_a_token_choice_routing():
    r = Routing(np.zeros((3, 1), np.int64), np.ones((3, 1)), np.array([[0], [1], [2]]),
                np.array([3, 0]), 2, 3)
    with pytest.raises(ValueError, match="expert_buckets: needs .* one column per expert"):
        expert_buckets(r)
