"""Modern routers: Mixtral/DeepSeekMoE top-k softmax (renormalised or raw gates, the top-k
balance loss, dropless routing) and DeepSeek-V3's auxiliary-loss-free balancing (selection
bias without gradient, the sign-rule bias update, the sequence-wise loss)."""
import math

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.moe.aux_free import (
    AuxFreeRouter,
    aux_free_gates,
    bias_update,
    sequence_balance_loss,
)
from tinymoe.moe.aux_losses import router_z_loss
from tinymoe.dispatch.routing import Routing
from tinymoe.moe.layer import moe_layer
from tinymoe.moe.topk_router import TopKRouter, topk_balance_loss, topk_gates

F64 = np.float64
task6_1 = pytest.mark.task6_1  # runs TopKRouter / topk_balance_loss (their regions)
task6_3 = pytest.mark.task6_3  # runs bias_update (AuxFreeRouter training with speed > 0)
z_loss = pytest.mark.task4_3  # a z_loss_coef > 0 runs router_z_loss (lesson 04's region)


def softmax(z):
    z = np.asarray(z, F64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def identity_router(E, k, **kw):
    """A float64 TopKRouter whose W_g is the identity: the logits are x itself."""
    r = TopKRouter(E, E, k, router_dtype="float64", rng=0, **kw)
    r.W_g.data[...] = np.eye(E)
    return r


def aux_free_identity(E, k, **kw):
    kw.setdefault("bias_update_speed", 0.0)
    r = AuxFreeRouter(E, E, k, router_dtype="float64", rng=0, **kw)
    r.W_g.data[...] = np.eye(E)
    return r


def total(aux):
    """The layer's aux losses summed, as a model adds them to its task loss."""
    return tm.moe.sum_losses(aux.values())


def skewed_inputs(T=256, d=8, E=8, seed=0):
    """Fixed inputs with a constant feature, and W_g row 0 = logit offsets -1.5 .. 1.5:
    the sigmoid router sends nearly every token to the last experts."""
    x = np.random.default_rng(seed).standard_normal((T, d)).astype(np.float32)
    x[:, 0] = 1.0
    return x, np.linspace(-1.5, 1.5, E)


# --- TopKRouter: exact small examples ---------------------------------------------------------
@task6_1
def test_top2_weights_by_hand():
    r = identity_router(4, 2)
    out = r(tm.tensor(np.array([[1.0, 2.0, 0.0, -1.0]])))
    assert isinstance(out, Routing) and out.capacity is None  # dropless
    np.testing.assert_array_equal(out.expert_index, [[1, 0]])  # most probable first
    # e^2 / (e^2 + e^1) = 1 / (1 + e^-1), e^1 / (e^2 + e^1) = 1 / (1 + e)
    w = out.combine_weight.numpy()
    np.testing.assert_allclose(w, [[1 / (1 + math.exp(-1)), 1 / (1 + math.e)]], rtol=1e-14)
    assert w[0, 0] == pytest.approx(0.7310585786300049)
    Z = math.exp(2) + math.exp(1) + 1 + math.exp(-1)
    raw = identity_router(4, 2, normalize=False)(tm.tensor(np.array([[1.0, 2.0, 0.0, -1.0]])))
    np.testing.assert_allclose(raw.combine_weight.numpy(),
                               [[math.exp(2) / Z, math.exp(1) / Z]], rtol=1e-14)
    np.testing.assert_allclose(out.probs.numpy(), softmax([[1.0, 2.0, 0.0, -1.0]]), rtol=1e-14)
    np.testing.assert_array_equal(out.logits.numpy(), [[1.0, 2.0, 0.0, -1.0]])


@task6_1
def test_topk_gates_on_given_probabilities():
    p = tm.tensor(np.array([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]]))
    e, w = topk_gates(p, 2)
    np.testing.assert_array_equal(e, [[1, 3], [0, 1]])
    np.testing.assert_allclose(w.numpy(), [[4 / 7, 3 / 7], [0.5, 0.5]], rtol=1e-14)
    e, w = topk_gates(p, 3, normalize=False)
    np.testing.assert_array_equal(e, [[1, 3, 2], [0, 1, 2]])
    np.testing.assert_allclose(w.numpy(), [[0.4, 0.3, 0.2], [0.25, 0.25, 0.25]], rtol=1e-14)


@task6_1
def test_ties_go_to_the_lowest_index():
    r = identity_router(4, 2)
    x = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 3.0, 3.0], [2.0, 0.0, 2.0, 2.0]])
    out = r(tm.tensor(x))
    np.testing.assert_array_equal(out.expert_index, [[0, 1], [1, 2], [0, 2]])
    np.testing.assert_allclose(out.combine_weight.numpy(), 0.5, rtol=1e-14)
    # zero initialisation: all logits equal, every token goes to experts 0..k-1 (stable sort)
    z = TopKRouter(6, 5, 3, init_scale=0.0, rng=0)
    e = z(np.random.default_rng(0).standard_normal((7, 6))).expert_index
    np.testing.assert_array_equal(e, np.tile([0, 1, 2], (7, 1)))


@task6_1
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_renormalised_gates_are_a_softmax_over_the_kept_logits(k):
    rng = np.random.default_rng(k)
    T, d, E = 20, 6, 5
    r = TopKRouter(d, E, k, router_dtype="float64", rng=1)
    r.W_g.data[...] = rng.standard_normal((d, E))
    x = rng.standard_normal((T, d))
    out = r(tm.tensor(x))
    e, w = out.expert_index, out.combine_weight.numpy()
    logits = x @ r.W_g.data
    kept = np.take_along_axis(logits, e, axis=1)  # (T, k)
    np.testing.assert_allclose(w, softmax(kept), rtol=1e-12, atol=1e-15)  # Mixtral's form
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-12)
    # the chosen experts are the k largest probabilities, in decreasing order
    p = softmax(logits)
    np.testing.assert_array_equal(e, np.argsort(-p, axis=1, kind="stable")[:, :k])
    assert (np.diff(w, axis=1) <= 0).all()
    # normalize=False (DeepSeekMoE) keeps the raw probabilities: they sum to < 1 if k < E
    r.normalize = False
    raw = r(tm.tensor(x)).combine_weight.numpy()
    np.testing.assert_allclose(raw, np.take_along_axis(p, e, axis=1), rtol=1e-12)
    assert (raw.sum(axis=1) < 1.0).all() if k < E else np.allclose(raw.sum(axis=1), 1.0)


@task6_1
def test_top1_renormalised_gate_is_exactly_one():
    """With k = 1 renormalisation the gate is the constant p/p = 1 (no task-loss gradient)."""
    r = TopKRouter(4, 6, 1, router_dtype="float64", rng=2)
    x = tm.tensor(np.random.default_rng(3).standard_normal((9, 4)), requires_grad=True)
    w = r(x).combine_weight
    np.testing.assert_array_equal(w.numpy(), 1.0)
    (w * tm.tensor(np.arange(9.0)[:, None])).sum().backward()
    np.testing.assert_allclose(r.W_g.grad, 0.0, atol=1e-15)


@task6_1
def test_routing_is_dropless_with_the_load_of_every_choice():
    rng = np.random.default_rng(4)
    r = TopKRouter(8, 6, 2, rng=5)
    ro = r(rng.standard_normal((50, 8)).astype(np.float32))
    assert ro.capacity is None and ro.k == 2 and ro.num_experts == 6
    assert not ro.dropped_choices.any() and ro.dropped_fraction == 0.0
    np.testing.assert_array_equal(ro.counts, np.bincount(ro.expert_index.ravel(), minlength=6))
    assert ro.counts.sum() == 100
    assert (ro.expert_index[:, 0] != ro.expert_index[:, 1]).all()


@task6_1
def test_router_runs_in_float32_and_returns_gates_in_the_input_dtype():
    rng = np.random.default_rng(5)
    r = TopKRouter(6, 4, 2, rng=0)
    assert r.W_g.dtype == np.float32
    out = r(tm.tensor(rng.standard_normal((5, 6))))  # float64 input
    assert out.logits.dtype == np.float32 and out.probs.dtype == np.float32
    assert out.combine_weight.dtype == np.float64
    out16 = r(tm.tensor(rng.standard_normal((5, 6)).astype(np.float16)))
    assert out16.logits.dtype == np.float32
    assert out16.combine_weight.dtype == np.float16


# --- the top-k balance loss -------------------------------------------------------------------
@task6_1
@pytest.mark.parametrize("k", [1, 2, 4])
def test_balance_loss_is_one_under_uniform_routing_for_any_k(k):
    E, T = 8, 16
    probs = np.full((T, E), 1.0 / E)
    e = (np.arange(T)[:, None] + np.arange(k)[None, :]) % E  # every expert chosen 2k times
    assert topk_balance_loss(tm.tensor(probs), e).item() == pytest.approx(1.0, abs=1e-12)
    # balanced choices alone give 1 whatever the probabilities (Σ_i P_i = 1)
    p = softmax(np.random.default_rng(k).standard_normal((T, E)))
    assert topk_balance_loss(tm.tensor(p), e).item() == pytest.approx(1.0, abs=1e-12)
    # HF Mixtral sums one f per choice slot: its uniform value is k, k times ours
    mask = np.eye(E)[e]  # (T, k, E)
    hf = float(np.sum(mask.mean(axis=0) * probs.mean(axis=0)) * E)
    assert hf == pytest.approx(k * topk_balance_loss(tm.tensor(probs), e).item())


@task6_1
def test_balance_loss_grows_when_the_routing_is_skewed():
    # every token picks experts 0 and 1, which hold all the probability: f = P = [.5, .5, 0, 0]
    probs = np.tile([0.5, 0.5, 0.0, 0.0], (6, 1))
    e = np.tile([0, 1], (6, 1))
    assert topk_balance_loss(tm.tensor(probs), e).item() == pytest.approx(2.0)
    # a single expert with everything: the maximum, E
    one = np.tile([0.0, 0.0, 1.0, 0.0], (6, 1))
    assert topk_balance_loss(tm.tensor(one), np.full((6, 1), 2)).item() == pytest.approx(4.0)
    rng = np.random.default_rng(6)
    p = softmax(rng.standard_normal((40, 8)) + np.linspace(0, 3, 8))
    e = np.argsort(-p, axis=1, kind="stable")[:, :2]
    assert topk_balance_loss(tm.tensor(p), e).item() > 1.5


@task6_1
def test_balance_loss_gradient_flows_through_P_only():
    rng = np.random.default_rng(7)
    T, E = 10, 5
    p = tm.tensor(softmax(rng.standard_normal((T, E))), requires_grad=True)
    e = rng.integers(0, E, (T, 2))
    topk_balance_loss(p, e).backward()
    f = np.bincount(e.ravel(), minlength=E) / (2 * T)
    np.testing.assert_allclose(p.grad, np.tile(E * f / T, (T, 1)), rtol=1e-12)


@z_loss
@task6_1
def test_router_aux_loss_combines_balance_and_z_loss():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((12, 6))
    r = TopKRouter(6, 4, 2, aux_loss_coef=0.01, z_loss_coef=0.001, rng=0)
    out = r(x)
    bal = topk_balance_loss(out.probs, out.expert_index).item()
    z = router_z_loss(out.logits).item()
    assert set(out.aux_losses) == {"balance", "z"}
    assert out.aux_losses["balance"].item() == pytest.approx(0.01 * bal, rel=1e-6)
    assert out.aux_losses["z"].item() == pytest.approx(0.001 * z, rel=1e-6)
    assert out.total_aux_loss().item() == pytest.approx(0.01 * bal + 0.001 * z, rel=1e-6)
    r.aux_loss_coef = 0.0
    out = r(x)
    assert set(out.aux_losses) == {"z"}
    assert out.total_aux_loss().item() == pytest.approx(0.001 * z, rel=1e-6)
    r.z_loss_coef = 0.0
    out = r(x)
    assert out.aux_losses == {} and out.total_aux_loss() is None


# --- gradients --------------------------------------------------------------------------------
@z_loss
@task6_1
@pytest.mark.parametrize("normalize", [True, False])
def test_router_gradcheck(normalize):
    rng = np.random.default_rng(9)
    r = TopKRouter(5, 4, 2, normalize=normalize, aux_loss_coef=0.1, z_loss_coef=0.01,
                   router_dtype="float64", rng=1)
    r.W_g.data[...] = rng.standard_normal((5, 4))
    x = tm.tensor(rng.standard_normal((7, 5)), requires_grad=True)

    def f(*_):
        out = r(x)
        assert set(out.aux_losses) == {"balance", "z"}
        return out.combine_weight, out.total_aux_loss()

    tm.gradcheck(f, [x, r.W_g], names=["x", "W_g"])


@z_loss
@task6_1
@pytest.mark.parametrize("normalize", [True, False])
def test_layer_with_topk_router_gradcheck(normalize):
    rng = np.random.default_rng(10)
    T, d = 6, 4
    router = TopKRouter(d, 3, 2, normalize=normalize, z_loss_coef=0.01,
                        router_dtype="float64", rng=2)
    router.W_g.data[...] = rng.standard_normal((d, 3))
    layer = moe_layer(router, 5, num_shared=1, dtype=F64, rng=3)
    x = tm.tensor(rng.standard_normal((T, d)), requires_grad=True)
    named = list(layer.named_parameters())
    assert "router.W_g" in [n for n, _ in named]

    def f(*_):
        y, aux = layer(x)
        assert set(aux) == {"balance", "z"}
        return y, total(aux)

    tm.gradcheck(f, [x] + [p for _, p in named], names=["x"] + [n for n, _ in named])


@task6_1
def test_layer_with_a_shared_expert_matches_a_per_token_sum():
    """y_t = Σ_j w_tj FFN_{e_tj}(x_t) + shared(x_t), and the layer keeps the router output."""
    rng = np.random.default_rng(11)
    router = TopKRouter(4, 5, 2, normalize=False, router_dtype="float64", rng=4)
    layer = moe_layer(router, 6, num_shared=1, dtype=F64, rng=5)
    x = rng.standard_normal((2, 3, 4))
    y, aux = layer(tm.tensor(x))
    y = y.numpy().reshape(-1, 4)
    r = layer.last_routing
    x2 = x.reshape(-1, 4)
    w = r.combine_weight.numpy()
    ref = layer.shared[0](tm.tensor(x2)).numpy()
    for t in range(6):
        for j in range(2):
            ref[t] += w[t, j] * layer.experts.expert(int(r.expert_index[t, j]),
                                                     tm.tensor(x2[t:t + 1])).numpy()[0]
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    assert aux is r.aux_losses and set(aux) == {"balance"}


# --- TopKRouter: bad input --------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -1, 5, 2.0, True, None])
def test_topk_router_bad_k(k):
    with pytest.raises(ValueError, match=r"TopKRouter: k=.*1 <= k <= num_experts"):
        TopKRouter(6, 4, k)


def test_topk_router_bad_arguments():
    with pytest.raises(ValueError, match="TopKRouter: aux_loss_coef"):
        TopKRouter(6, 4, 2, aux_loss_coef=-1.0)
    with pytest.raises(ValueError, match="TopKRouter: router_dtype"):
        TopKRouter(6, 4, 2, router_dtype="int8")
    with pytest.raises(ValueError, match="TopKRouter: num_experts"):
        TopKRouter(6, 0, 1)
    r = TopKRouter(6, 4, 2, rng=0)
    with pytest.raises(ValueError, match=r"TopKRouter\(d_model=6\).*reshape"):
        r(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"TopKRouter\(d_model=6\).*reshape"):
        r(np.zeros((2, 3, 6)))


def test_topk_balance_loss_bad_input():
    p = tm.tensor(np.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="topk_balance_loss: router_probs"):
        topk_balance_loss(tm.tensor(np.ones(3)), np.zeros(3, int))
    with pytest.raises(ValueError, match=r"topk_balance_loss: expert_index has shape"):
        topk_balance_loss(p, np.zeros((5, 2), int))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        topk_balance_loss(p, np.full((4, 2), 3))
    with pytest.raises(TypeError, match="integers"):
        topk_balance_loss(p, np.zeros((4, 2)))


# --- aux-free: the bias update rule -------------------------------------------------------------
@task6_3
def test_bias_update_signs():
    b = np.array([0.5, 0.0, -0.25, 0.0, 1.0], dtype=np.float32)
    load = np.array([10, 2, 6, 6, 6])  # mean 6
    new = bias_update(b, load, 0.01)
    # overloaded down, underloaded up, exactly at the mean unchanged
    np.testing.assert_allclose(new, [0.49, 0.01, -0.25, 0.0, 1.0], rtol=1e-6)
    assert new.dtype == np.float32
    np.testing.assert_array_equal(b, [0.5, 0.0, -0.25, 0.0, 1.0])  # pure
    np.testing.assert_array_equal(bias_update(b, np.full(5, 3), 0.01), b)  # balanced: no move
    np.testing.assert_array_equal(bias_update(b, load, 0.0), b)


@task6_3
def test_update_applies_after_routing_from_the_next_batch():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    r = AuxFreeRouter(6, 4, 2, bias_update_speed=0.05, rng=3)
    r.W_g.data[:, 0] += 0.5  # skew toward expert 0
    ref = AuxFreeRouter(6, 4, 2, bias_update_speed=0.0, rng=3)
    ref.load_state_dict(r.state_dict())
    first = r(x)
    np.testing.assert_array_equal(first.expert_index, ref(x).expert_index)
    load = first.counts
    np.testing.assert_array_equal(r.last_load, load)
    np.testing.assert_allclose(r.bias.data, bias_update(np.zeros(4), load, 0.05), rtol=1e-6)
    assert r.bias.data[0] < 0  # expert 0 was overloaded
    ref.bias.data[...] = r.bias.data
    np.testing.assert_array_equal(r(x).expert_index, ref(x).expert_index)
    r.eval()
    before = r.bias.data.copy()
    r(x)
    np.testing.assert_array_equal(r.bias.data, before)  # eval: never updated


@task6_3
def test_bias_updates_balance_a_skewed_router():
    x, offsets = skewed_inputs()

    def run(speed, steps=200):
        r = AuxFreeRouter(8, 8, 2, bias_update_speed=speed, seq_aux_loss_coef=0.0, rng=1)
        r.W_g.data[0, :] = offsets
        ratios = []
        for _ in range(steps):
            r(x)
            ratios.append(r.last_load.max() / r.last_load.mean())
        return np.array(ratios), r

    fixed, r0 = run(0.0)
    assert fixed[0] >= 3.5 and (fixed == fixed[0]).all()  # skewed, and stays so
    np.testing.assert_array_equal(r0.bias.data, 0.0)
    balanced, r1 = run(1e-2)
    assert balanced[0] == fixed[0]  # the first batch is routed with b = 0
    assert balanced[-20:].max() < 1.6  # max/mean load: from 4 to about 1.3
    assert r1.bias.data[0] > 0 > r1.bias.data[-1]  # the favoured experts were pushed down
    assert r1.W_g.grad is None and r1.bias.grad is None  # no gradient training involved


# --- aux-free: the router (eval mode or speed 0: no bias update runs) ----------------------------
def test_eval_mode_never_updates_the_bias():
    x, offsets = skewed_inputs(T=64)
    r = AuxFreeRouter(8, 8, 2, bias_update_speed=0.1, rng=1).eval()
    r.W_g.data[0, :] = offsets
    for _ in range(5):
        out = r(x)
    np.testing.assert_array_equal(r.bias.data, 0.0)
    np.testing.assert_array_equal(r.last_load, out.counts)  # still recorded
    assert out.counts.max() / out.counts.mean() >= 3.5


def test_gates_are_the_normalised_unbiased_affinities():
    x = np.array([[0.0, 1.0, -1.0, 2.0], [3.0, -2.0, 0.5, 0.0]])
    r = aux_free_identity(4, 2, route_scale=2.5)
    out = r(tm.tensor(x))
    s = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(out.probs.numpy(), s, rtol=1e-14)
    np.testing.assert_array_equal(out.expert_index, [[3, 1], [0, 2]])
    e = out.expert_index
    g = np.take_along_axis(s, e, axis=1)
    np.testing.assert_allclose(out.combine_weight.numpy(),
                               2.5 * g / g.sum(axis=1, keepdims=True), rtol=1e-13)
    assert out.capacity is None and set(out.aux_losses) == {"sequence_balance"}


def test_a_constant_added_to_the_bias_changes_nothing():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((30, 6))
    r = AuxFreeRouter(6, 5, 2, bias_update_speed=0.0, router_dtype="float64", rng=4)
    r.bias.data[...] = 0.1 * rng.standard_normal(5)
    a = r(tm.tensor(x))
    r.bias.data[...] += 0.75
    b = r(tm.tensor(x))
    np.testing.assert_array_equal(a.expert_index, b.expert_index)
    np.testing.assert_array_equal(a.combine_weight.numpy(),
                                  b.combine_weight.numpy())
    np.testing.assert_array_equal(a.aux_losses["sequence_balance"].numpy(),
                                  b.aux_losses["sequence_balance"].numpy())


def test_a_large_bias_forces_an_expert_but_its_weight_stays_s_based():
    rng = np.random.default_rng(14)
    x = rng.standard_normal((25, 6))
    r = AuxFreeRouter(6, 5, 2, bias_update_speed=0.0, route_scale=1.0,
                      router_dtype="float64", rng=5)
    r.W_g.data[:, 3] -= 2.0 * x.mean(axis=0) / np.dot(x.mean(axis=0), x.mean(axis=0))
    r.bias.data[3] = 10.0  # far above any affinity gap
    out = r(tm.tensor(x))
    e = out.expert_index
    assert (e[:, 0] == 3).all()  # in every token's top-k, first
    s = out.probs.numpy()
    assert (s[:, 3] < np.sort(s, axis=1)[:, -2]).any()  # often not in the top-2 of s alone
    other = e[:, 1]
    w = out.combine_weight.numpy()
    np.testing.assert_allclose(w[:, 0], s[:, 3] / (s[:, 3] + s[np.arange(25), other]),
                               rtol=1e-13)
    # the other choice is the best of the remaining experts by s (their biases are 0)
    rest = s.copy()
    rest[:, 3] = -np.inf
    np.testing.assert_array_equal(other, rest.argmax(axis=1))


def test_the_bias_gets_no_gradient():
    rng = np.random.default_rng(15)
    router = AuxFreeRouter(4, 3, 2, bias_update_speed=0.0, seq_aux_loss_coef=0.1, rng=6)
    layer = moe_layer(router, 5, num_shared=1, rng=7)
    x = tm.tensor(rng.standard_normal((8, 4)).astype(np.float32), requires_grad=True)
    y, aux = layer(x)
    (y.sum() + total(aux)).backward()
    assert router.W_g.grad is not None and np.abs(router.W_g.grad).sum() > 0
    assert router.bias.grad is None  # an optimizer skips it
    router.bias.data[...] = [0.2, -0.1, 0.0]
    tm.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1).step()
    np.testing.assert_array_equal(router.bias.data, np.float32([0.2, -0.1, 0.0]))


def test_the_bias_is_kept_in_the_state_dict():
    r = AuxFreeRouter(4, 3, 2, rng=0)
    r.bias.data[...] = [0.1, -0.2, 0.3]
    state = r.state_dict()
    assert set(state) == {"W_g", "bias"}
    r2 = AuxFreeRouter(4, 3, 2, rng=1)
    r2.load_state_dict(state)
    np.testing.assert_array_equal(r2.bias.data, np.float32([0.1, -0.2, 0.3]))
    assert r.bias.dtype == np.float32


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sequence_balance_loss_is_one_under_uniform_routing(k):
    E, T = 8, 16
    s = np.full((T, E), 0.3)  # equal sigmoid affinities: s' = 1/E
    e = (np.arange(T)[:, None] + np.arange(k)[None, :]) % E
    assert sequence_balance_loss(tm.tensor(s), e).item() == pytest.approx(1.0, abs=1e-12)
    assert sequence_balance_loss(tm.tensor(s), e, 8).item() == pytest.approx(1.0, abs=1e-12)
    skew = np.tile(np.arange(k), (T, 1))
    s2 = np.where(np.arange(E) < k, 0.9, 0.1)[None].repeat(T, 0)
    # f_i = E/k on the k chosen, P_i = 0.9 / (0.9 k + 0.1 (E - k)): 0.9 E / (0.8 k + 0.1 E)
    want = 0.9 * E / (0.8 * k + 0.1 * E)
    assert sequence_balance_loss(tm.tensor(s2), skew).item() == pytest.approx(want, rel=1e-12)
    assert want > 1.5


def test_sequence_balance_loss_per_sequence_is_the_mean_of_the_sequences():
    rng = np.random.default_rng(16)
    s = 1 / (1 + np.exp(-rng.standard_normal((12, 5))))
    e = np.argsort(-s, axis=1, kind="stable")[:, :2]
    whole = [sequence_balance_loss(tm.tensor(s[i:i + 4]), e[i:i + 4]).item()
             for i in (0, 4, 8)]
    got = sequence_balance_loss(tm.tensor(s), e, 4).item()
    assert got == pytest.approx(np.mean(whole), rel=1e-12)
    assert got != pytest.approx(sequence_balance_loss(tm.tensor(s), e).item(), rel=1e-6)
    # by hand: f_i = E/(kT) · count_i, P_i = mean of s / Σ_j s_j
    f = np.bincount(e.ravel(), minlength=5) * 5 / (2 * 12)
    P = (s / s.sum(axis=1, keepdims=True)).mean(axis=0)
    assert sequence_balance_loss(tm.tensor(s), e).item() == pytest.approx(np.sum(f * P))


@task6_1
def test_sequence_balance_loss_is_the_topk_loss_of_the_normalised_scores():
    rng = np.random.default_rng(17)
    s = 1 / (1 + np.exp(-rng.standard_normal((15, 6))))
    e = np.argsort(-s, axis=1, kind="stable")[:, :3]
    s_norm = s / s.sum(axis=1, keepdims=True)
    assert sequence_balance_loss(tm.tensor(s), e).item() == pytest.approx(
        topk_balance_loss(tm.tensor(s_norm), e).item(), rel=1e-12)


def test_router_aux_loss_and_its_sequences():
    rng = np.random.default_rng(18)
    x = rng.standard_normal((12, 6))
    r = AuxFreeRouter(6, 4, 2, bias_update_speed=0.0, seq_aux_loss_coef=1e-2,
                      sequence_length=4, rng=8)
    out = r(x)
    want = 1e-2 * sequence_balance_loss(out.probs, out.expert_index, 4).item()
    assert out.aux_losses["sequence_balance"].item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="AuxFreeRouter: 10 tokens.*sequence_length=4"):
        r(x[:10])
    r.seq_aux_loss_coef = 0.0
    assert r(x).aux_losses == {} and r(x).total_aux_loss() is None


def test_aux_free_gates_with_a_bias_array():
    s = tm.tensor(np.array([[0.9, 0.8, 0.1, 0.2]]))
    e, w = aux_free_gates(s, np.array([0.0, 0.0, 1.0, 0.0]), 2)
    np.testing.assert_array_equal(e, [[2, 0]])
    np.testing.assert_allclose(w.numpy(), [[0.1, 0.9]], rtol=1e-12)


# --- aux-free: gradients ---------------------------------------------------------------------
def test_aux_free_router_gradcheck():
    rng = np.random.default_rng(19)
    r = AuxFreeRouter(5, 4, 2, bias_update_speed=0.0, seq_aux_loss_coef=0.1,
                      route_scale=2.5, sequence_length=3, router_dtype="float64", rng=9)
    r.W_g.data[...] = rng.standard_normal((5, 4))
    r.bias.data[...] = 0.3 * rng.standard_normal(4)
    x = tm.tensor(rng.standard_normal((6, 5)), requires_grad=True)

    def f(*_):
        out = r(x)
        assert set(out.aux_losses) == {"sequence_balance"}
        return out.combine_weight, out.total_aux_loss()

    tm.gradcheck(f, [x, r.W_g], names=["x", "W_g"])


def test_layer_with_aux_free_router_gradcheck():
    rng = np.random.default_rng(20)
    router = AuxFreeRouter(4, 3, 2, seq_aux_loss_coef=0.1, router_dtype="float64", rng=10)
    router.W_g.data[...] = rng.standard_normal((4, 3))
    layer = moe_layer(router, 5, num_shared=1, dtype=F64, rng=11).eval()  # no updates
    x = tm.tensor(rng.standard_normal((6, 4)), requires_grad=True)
    named = [(n, p) for n, p in layer.named_parameters() if n != "router.bias"]

    def f(*_):
        y, aux = layer(x)
        return y, total(aux)

    tm.gradcheck(f, [x] + [p for _, p in named], names=["x"] + [n for n, _ in named])
    np.testing.assert_array_equal(router.bias.data, 0.0)


# --- aux-free: bad input ---------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -1, 5, 1.5, None])
def test_aux_free_router_bad_k(k):
    with pytest.raises(ValueError, match=r"AuxFreeRouter: k=.*1 <= k <= num_experts"):
        AuxFreeRouter(6, 4, k)


@pytest.mark.parametrize("speed", [-1e-3, float("nan"), float("inf"), "fast"])
def test_aux_free_router_bad_speed(speed):
    with pytest.raises(ValueError, match=r"AuxFreeRouter: bias_update_speed=.*>= 0"):
        AuxFreeRouter(6, 4, 2, bias_update_speed=speed)
    with pytest.raises(ValueError, match=r"bias_update: bias_update_speed"):
        bias_update(np.zeros(4), np.ones(4), speed)


def test_aux_free_bad_arguments():
    with pytest.raises(ValueError, match="AuxFreeRouter: route_scale"):
        AuxFreeRouter(6, 4, 2, route_scale=0.0)
    with pytest.raises(ValueError, match="AuxFreeRouter: seq_aux_loss_coef"):
        AuxFreeRouter(6, 4, 2, seq_aux_loss_coef=-1.0)
    with pytest.raises(ValueError, match="AuxFreeRouter: sequence_length"):
        AuxFreeRouter(6, 4, 2, sequence_length=0)
    r = AuxFreeRouter(6, 4, 2, rng=0)
    with pytest.raises(ValueError, match=r"AuxFreeRouter\(d_model=6\).*reshape"):
        r(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"bias_update: bias and load must both be \(E,\)"):
        bias_update(np.zeros(4), np.ones(3), 0.1)
    with pytest.raises(ValueError, match=r"bias_update: bias and load"):
        r.update_bias(np.ones((2, 4)))
    with pytest.raises(ValueError, match="sequence_balance_loss: 12 tokens"):
        sequence_balance_loss(tm.tensor(np.full((12, 4), 0.5)), np.zeros((12, 2), int), 5)
