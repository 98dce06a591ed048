"""GShard's top-2 gate (Lepikhin et al. 2020, §2.2, Algorithm 1): capacity per group, first
choices before second choices, random routing, normalisation before/after dropping, ℓ_aux."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.moe.aux_losses import gshard_aux_loss, load_balancing_loss
from tinymoe.moe.capacity import capacity_positions, expert_capacity
from tinymoe.moe.gshard import Top2Gate, top2, top2_route

F64 = np.float64


def gshard_tasks(f):  # a Top2Gate forward runs all three regions of lesson 04
    return pytest.mark.task4_1(pytest.mark.task4_2(pytest.mark.task4_3(f)))


def algorithm1(e1, e2, keep2, E, C, S):
    """GShard's Algorithm 1 as written: two passes over each group with counters c_e."""
    T = len(e1)
    pos = np.full((T, 2), -1)
    for g in range(T // S):
        c = np.zeros(E, int)
        for s in range(g * S, (g + 1) * S):  # first pass: every first choice
            if c[e1[s]] < C:
                pos[s, 0] = g * C + c[e1[s]]
            c[e1[s]] += 1  # counted whether or not it fit
        for s in range(g * S, (g + 1) * S):  # second pass
            if keep2[s] and c[e2[s]] < C:
                pos[s, 1] = g * C + c[e2[s]]
                c[e2[s]] += 1
    return pos


def random_gates(rng, T, E, skew=1.0):
    logits = rng.standard_normal((T, E)) + skew * np.linspace(1, 0, E)
    return tm.tensor(logits), tm.tensor(logits).softmax(-1)


# --- positions: Algorithm 1 ---------------------------------------------------------------------
@pytest.mark.task4_1
@pytest.mark.parametrize("seed", range(6))
def test_positions_are_algorithm_1(seed):
    rng = np.random.default_rng(seed)
    E = int(rng.integers(2, 7))
    S = int(rng.integers(1, 12))
    G = int(rng.integers(1, 4))
    C = int(rng.integers(1, S + 1))
    T = G * S
    e1 = rng.integers(0, E, T)
    e2 = (e1 + rng.integers(1, E, T)) % E  # a different expert
    keep2 = rng.random(T) < 0.6
    active = np.stack([np.ones(T, bool), keep2], 1)
    pos, counts = capacity_positions(np.stack([e1, e2], 1), E, C, active=active,
                                     group_size=S)
    np.testing.assert_array_equal(pos, algorithm1(e1, e2, keep2, E, C, S))
    kept = pos >= 0
    np.testing.assert_array_equal(counts, np.bincount(np.stack([e1, e2], 1)[kept],
                                                      minlength=E))


@pytest.mark.task4_1
def test_first_choices_have_priority_over_second_choices():
    # token 0 wants expert 0 second; tokens 1, 2 want it first; C = 2: token 0 loses it
    e = np.array([[1, 0], [0, 1], [0, 1], [2, 1]])
    pos, _ = capacity_positions(e, 3, 2)
    np.testing.assert_array_equal(pos, [[0, -1], [0, 1], [1, -1], [0, -1]])
    # the obvious token-by-token loop would have given token 0 slot 0 of expert 0


@pytest.mark.task4_1
def test_inactive_choices_take_no_slot():
    e = np.array([[0, 1], [0, 1], [1, 0]])
    active = np.array([[True, False], [True, True], [True, True]])
    pos, counts = capacity_positions(e, 2, 3, active=active)
    np.testing.assert_array_equal(pos, [[0, -1], [1, 1], [0, 2]])
    np.testing.assert_array_equal(counts, [3, 2])
    empty, c0 = capacity_positions(e, 2, 3, active=np.zeros((3, 2), bool))
    assert (empty == -1).all() and (c0 == 0).all()


def test_capacity_positions_bad_input():
    with pytest.raises(ValueError, match=r"\(T, k\)"):
        capacity_positions(np.zeros(4, int), 2, 1)
    with pytest.raises(ValueError, match="active"):
        capacity_positions(np.zeros((4, 2), int), 2, 1, active=np.ones((4, 1), bool))
    with pytest.raises(ValueError, match="group_size"):
        capacity_positions(np.zeros((4, 2), int), 2, 1, group_size=3)


# --- the gate -----------------------------------------------------------------------------------
@gshard_tasks
@pytest.mark.parametrize("cf, S", [(1.0, 8), (0.5, 8), (2.0, 6), (1.25, None)])
def test_capacity_per_group_and_at_most_C_per_expert(cf, S):
    rng = np.random.default_rng(0)
    T, E = 24, 4
    logits, probs = random_gates(rng, T, E, skew=2.0)
    r = top2_route(logits, probs, cf, group_size=S, uniform=rng.random(T))
    S_ = T if S is None else S
    C = expert_capacity(S_, E, cf, k=2)
    assert r.stats["group_capacity"] == C and r.capacity == (T // S_) * C
    assert r.stats["num_groups"] == T // S_
    for g in range(T // S_):
        rows = slice(g * S_, (g + 1) * S_)
        e, p = r.expert_index[rows], r.position[rows]
        for j in range(E):
            slots = p[(e == j) & (p >= 0)]
            assert len(slots) <= C
            assert ((slots >= g * C) & (slots < (g + 1) * C)).all()
            assert len(np.unique(slots)) == len(slots)


@gshard_tasks
def test_random_routing_keeps_the_second_expert_when_2_g2_exceeds_u():
    rng = np.random.default_rng(1)
    T, E = 50, 5
    logits, probs = random_gates(rng, T, E)
    u = rng.random(T)
    r = top2_route(logits, probs, capacity_factor=float(E), uniform=u)
    p = probs.numpy()
    e1, e2 = top2(p)
    g2 = p[np.arange(T), e2] / (p[np.arange(T), e1] + p[np.arange(T), e2])
    np.testing.assert_array_equal(r.stats["active"][:, 1], 2 * g2 > u)
    np.testing.assert_array_equal(r.position[:, 1] >= 0, 2 * g2 > u)  # room for all
    assert r.stats["active"][:, 0].all()
    # over many draws the second expert is used with probability 2·g2 (<= 1)
    draws = np.stack([top2_route(logits, probs, float(E), uniform=rng.random(T))
                      .stats["active"][:, 1] for _ in range(400)])
    np.testing.assert_allclose(draws.mean(0), 2 * g2, atol=0.1)


@gshard_tasks
def test_second_policies():
    rng = np.random.default_rng(2)
    logits, probs = random_gates(rng, 12, 4)
    assert top2_route(logits, probs, 4.0, second_policy="all").stats["active"].all()
    none = top2_route(logits, probs, 4.0, second_policy="none")
    assert not none.stats["active"][:, 1].any() and (none.position[:, 1] == -1).all()
    with pytest.raises(ValueError, match="uniform draws"):
        top2_route(logits, probs, 4.0, second_policy="random")


@gshard_tasks
def test_normalise_before_dropping_keeps_g1_below_one():
    """GShard/Mesh TF: a token whose second expert is full keeps g1/(g1+g2) < 1;
    fairseq/DeepSpeed ("after"): a lone survivor gets weight 1."""
    logits = tm.tensor(np.array([[2.0, 1.0, 0.0]] * 3 + [[0.0, 1.5, 0.2]], F64))
    probs = logits.softmax(-1)
    p = probs.numpy()
    # C = ceil(2·4/3) = 3: expert 1 takes token 3's first choice, then the second choices of
    # tokens 0, 1; token 2's second choice overflows
    before = top2_route(logits, probs, 1.0, second_policy="all", normalize="before")
    after = top2_route(logits, probs, 1.0, second_policy="all", normalize="after")
    assert before.stats["group_capacity"] == 3 == before.capacity
    np.testing.assert_array_equal(before.position[:, 1], [1, 2, -1, 0])
    w_b, w_a = before.combine_weight.numpy(), after.combine_weight.numpy()
    g1, g2 = p[0, 0], p[0, 1]
    np.testing.assert_allclose(w_b[2], [g1 / (g1 + g2), g2 / (g1 + g2)])  # kept: g1 < 1
    np.testing.assert_allclose(w_a[2], [1.0, 0.0])                       # renormalised
    np.testing.assert_allclose(w_b[:2].sum(1), 1.0)  # both kept: the two weights sum to 1
    np.testing.assert_allclose(w_a[:2], w_b[:2])
    # what combine sees: the kept weights of token 2
    kept = before.kept
    assert (w_b * kept).sum(1)[2] < 1 and (w_a * kept).sum(1)[2] == pytest.approx(1.0)


@gshard_tasks
def test_a_token_with_both_choices_dropped_overflows():
    logits = tm.tensor(np.array([[3.0, 2.0, -5.0]] * 5, F64))
    r = top2_route(logits, logits.softmax(-1), 0.3, second_policy="all")
    # C = ceil(2·5/3·0.3) = 1: token 0 takes the only slot of expert 0 and of expert 1
    assert r.stats["group_capacity"] == 1
    np.testing.assert_array_equal(r.position, [[0, 0]] + [[-1, -1]] * 4)
    np.testing.assert_array_equal(r.dropped_tokens, [False, True, True, True, True])
    assert r.dropped_fraction == pytest.approx(0.8)  # 4 of 5 tokens reach no expert
    assert (r.stats["active"] & r.dropped_choices).sum() == 8  # active choices found no slot
    assert r.dropped_choice_fraction == pytest.approx(0.8)


@gshard_tasks
def test_aux_loss_is_E_squared_times_the_papers_and_one_at_uniform():
    rng = np.random.default_rng(3)
    S, E = 20, 5
    logits, probs = random_gates(rng, S, E)
    r = top2_route(logits, probs, 1.0, uniform=rng.random(S))
    p = probs.numpy()
    c = np.bincount(p.argmax(1), minlength=E)  # first choices, before dropping
    m = p.mean(0)
    paper = np.sum(c / S * m) / E  # ℓ_aux of §2.2
    assert r.stats["balance_loss"].item() == pytest.approx(E * E * paper, rel=1e-12)
    assert r.aux_losses["balance"].item() == pytest.approx(1e-2 * E * E * paper, rel=1e-12)
    assert gshard_aux_loss(probs, p.argmax(1)).item() == pytest.approx(E * E * paper)
    uniform = tm.tensor(np.full((S, E), 1 / E))
    assert gshard_aux_loss(uniform, np.arange(S) % E).item() == pytest.approx(1.0)
    assert load_balancing_loss(uniform, np.zeros(S, int)).item() == pytest.approx(1.0)


@gshard_tasks
def test_top2_gate_module_training_and_eval():
    rng = np.random.default_rng(4)
    gate = Top2Gate(6, 4, capacity_factor=2.0, rng=0)
    x = tm.tensor(rng.standard_normal((16, 6)).astype(np.float32))
    a, b = gate(x), gate(x)
    assert a.probs.dtype == np.float32 and a.combine_weight.dtype == np.float32
    active_a, active_b = a.stats["active"], b.stats["active"]
    assert not np.array_equal(active_a, active_b) or active_a[:, 1].all()
    gate.eval()
    c, d = gate(x), gate(x)
    np.testing.assert_array_equal(c.position, d.position)  # deterministic in eval
    assert c.stats["active"].all()  # second_policy_eval="all"
    gate.train()
    r = gate(x, uniform=np.ones(16))
    assert not r.stats["active"][:, 1].any()  # 2·g2 <= 1 never beats u = 1


@gshard_tasks
@pytest.mark.parametrize("normalize", ["before", "after"])
def test_top2_gate_gradcheck(normalize):
    rng = np.random.default_rng(5)
    gate = Top2Gate(5, 4, capacity_factor=2.0, normalize=normalize, router_dtype="float64",
                    rng=0)
    gate.W_g.data = rng.standard_normal((5, 4))
    x = tm.tensor(rng.standard_normal((10, 5)), requires_grad=True)
    u = rng.random(10)

    def f(x, W):
        r = gate(x, uniform=u)
        assert (r.kept == r.stats["active"]).all()  # nothing dropped
        return (r.combine_weight, r.stats["balance_loss"], r.stats["z_loss"],
                r.aux_losses["balance"])

    tm.gradcheck(f, [x, gate.W_g], names=["x", "W_g"])


def test_top2_bad_input():
    with pytest.raises(ValueError, match="Top2Gate: top-2 gating needs num_experts >= 2"):
        Top2Gate(4, 1)
    with pytest.raises(ValueError, match="Top2Gate: num_experts=0 must be an integer >= 1"):
        Top2Gate(4, 0)
    with pytest.raises(ValueError, match="Top2Gate: capacity_factor=0.0 must be"):
        Top2Gate(4, 4, capacity_factor=0.0)
    with pytest.raises(ValueError, match="normalize"):
        Top2Gate(4, 4, normalize="sometimes")
    with pytest.raises(ValueError, match="second_policy_train"):
        Top2Gate(4, 4, second_policy_train="gumbel")
    g = Top2Gate(4, 4, rng=0)
    with pytest.raises(ValueError, match=r"\(T, 4\).*\(3, 5\)"):
        g(tm.tensor(np.ones((3, 5), np.float32)))
    logits = tm.tensor(np.zeros((4, 1)))
    with pytest.raises(ValueError, match="at least 2 experts"):
        top2_route(logits, logits.softmax(-1), 1.0, second_policy="all")
