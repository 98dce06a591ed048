"""The Switch router (Fedus et al. 2021): capacity (eq. 3), raw-p combine weights (eq. 2), the
balancing loss (eqs. 4-6), the router z-loss (ST-MoE eq. 5), jitter, selective precision."""
import math

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.moe.aux_losses import dispatch_fraction, load_balancing_loss, router_z_loss
from tinymoe.moe.capacity import expert_capacity
from tinymoe.moe.precision import round_bfloat16_array
from tinymoe.moe.router_weight import multiplicative_jitter
from tinymoe.moe.switch import SwitchRouter, switch_route
from tinymoe.nn.init import truncated_normal

F64 = np.float64


def switch_tasks(f):  # a SwitchRouter forward runs all three regions of lesson 04
    return pytest.mark.task4_1(pytest.mark.task4_2(pytest.mark.task4_3(f)))


# --- capacity, eq. (3) ------------------------------------------------------------------------
@pytest.mark.task4_1
@pytest.mark.parametrize("T, E, cf, k, C", [
    (64, 8, 1.0, 1, 8), (64, 8, 1.25, 1, 10), (64, 8, 2.0, 1, 16), (10, 4, 1.0, 1, 3),
    (64, 8, 1.0, 2, 16), (12, 4, 1.0, 2, 6), (100, 2, 1.1, 1, 55), (100, 8, 2.2, 2, 55),
    (5, 8, 1.0, 1, 1), (3, 2, 100.0, 1, 3), (0, 4, 1.0, 1, 1), (7, 1, 1.0, 1, 7)])
def test_capacity_is_the_ceiling_clamped_to_one_and_T(T, E, cf, k, C):
    assert expert_capacity(T, E, cf, k=k) == C


@pytest.mark.task4_1
def test_capacity_never_below_the_balanced_share():
    rng = np.random.default_rng(0)
    for _ in range(300):
        T, E = int(rng.integers(1, 500)), int(rng.integers(1, 33))
        cf = float(rng.choice([0.5, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0]))
        C = expert_capacity(T, E, cf)
        assert 1 <= C <= T
        assert C >= min(T, T * cf / E - 1e-9) and C - 1 < max(T * cf / E, 1)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), None, "1", True])
def test_bad_capacity_factor_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(10, 4, bad)
    with pytest.raises(ValueError, match="SwitchRouter: capacity_factor=.* must be a finite "
                                         "number > 0"):
        SwitchRouter(4, 2, capacity_factor=bad)


@pytest.mark.parametrize("E", [0, -2, 1.5, None])
def test_bad_number_of_experts_is_a_clear_error(E):
    with pytest.raises(ValueError, match="num_experts"):
        expert_capacity(10, E, 1.0)
    with pytest.raises(ValueError, match="SwitchRouter: num_experts=.* must be an integer >= 1"):
        SwitchRouter(4, E)


def test_bad_k_and_tokens():
    with pytest.raises(ValueError, match="k="):
        expert_capacity(10, 4, 1.0, k=5)
    with pytest.raises(ValueError, match="num_tokens"):
        expert_capacity(-1, 4, 1.0)


# --- the router ------------------------------------------------------------------------------
def test_router_init_is_a_truncated_normal_with_scale_0_1():
    r = SwitchRouter(400, 50, rng=0)
    std = math.sqrt(0.1 / 400)
    w = r.W_r.numpy()
    assert w.dtype == np.float32 and w.shape == (400, 50)
    assert np.abs(w).max() <= 2 * std + 1e-9
    # a normal truncated at 2 sigma has standard deviation 0.8796 sigma
    assert abs(w.std() / std - 0.8796) < 0.02
    t = truncated_normal(np.random.default_rng(1), (20000,), 3.0)
    assert np.abs(t).max() <= 6.0


@switch_tasks
def test_router_computes_in_float32_whatever_the_input_dtype():
    rng = np.random.default_rng(0)
    r = SwitchRouter(8, 4, rng=0).eval()
    for dt in (np.float16, np.float32, np.float64):
        x = tm.tensor(rng.standard_normal((5, 8)).astype(dt))
        out = r(x)
        logits, probs = out.logits, out.probs
        assert logits.dtype == np.float32 and probs.dtype == np.float32
        ref = x.numpy().astype(np.float64) @ r.W_r.numpy().astype(np.float64)
        np.testing.assert_allclose(logits.numpy(), ref, rtol=1e-5, atol=1e-6)


@switch_tasks
def test_float16_router_is_a_float16_computation_with_float32_weights():
    r = SwitchRouter(8, 4, router_dtype="float16", rng=0).eval()
    out = r(tm.tensor(np.ones((3, 8), np.float32)))
    assert r.W_r.dtype == np.float32 and out.logits.dtype == np.float16
    assert out.probs.dtype == np.float16
    assert out.combine_weight.dtype == np.float32  # cast back to the model's dtype


@switch_tasks
def test_jitter_is_multiplicative_on_the_input_and_only_in_training():
    rng = np.random.default_rng(0)
    x = tm.tensor(rng.standard_normal((64, 8)))
    r = SwitchRouter(8, 4, router_dtype="float64", jitter=0.01, rng=0)
    clean = x.numpy() @ r.W_r.numpy()
    a = r(x).logits
    b = r(x).logits
    assert not np.array_equal(a.numpy(), b.numpy())  # fresh noise every call
    # multiplicative noise in [1 - eps, 1 + eps] on each input entry
    noise = np.random.default_rng(5).uniform(0.99, 1.01, size=(64, 8))
    c = r(x, jitter_noise=noise).logits
    np.testing.assert_allclose(c.numpy(), (x.numpy() * noise) @ r.W_r.numpy(), rtol=1e-12)
    assert np.abs(c.numpy() - clean).max() <= 0.01 * (np.abs(x.numpy()) @
                                                      np.abs(r.W_r.numpy())).max() + 1e-12
    r.eval()
    d1 = r(x).logits
    d2 = r(x, jitter_noise=noise).logits  # explicit noise is ignored in eval too
    np.testing.assert_array_equal(d1.numpy(), clean)
    np.testing.assert_array_equal(d2.numpy(), clean)
    assert multiplicative_jitter(r, (2, 8)) is None
    r.train()
    u = multiplicative_jitter(r, (2, 8))  # training: U(1 - eps, 1 + eps) from r.rng
    assert u.shape == (2, 8) and (np.abs(u - 1) <= 0.01).all()


def test_router_bad_input():
    r = SwitchRouter(8, 4, rng=0)
    with pytest.raises(ValueError,
                       match=r"SwitchRouter\(d_model=8\): x must be \(T, 8\).*\(5, 7\)"):
        r(tm.tensor(np.ones((5, 7), np.float32)))
    with pytest.raises(ValueError, match=r"SwitchRouter: jitter_noise has shape \(5, 7\)"):
        r(tm.tensor(np.ones((5, 8), np.float32)), jitter_noise=np.ones((5, 7)))
    with pytest.raises(ValueError, match="SwitchRouter: router_dtype='int8'"):
        SwitchRouter(8, 4, router_dtype="int8")
    with pytest.raises(ValueError, match="SwitchRouter: jitter=1.5"):
        SwitchRouter(8, 4, jitter=1.5)


def test_bfloat16_rounding():
    one_ulp = 2.0 ** -7  # bfloat16 spacing at 1
    a = np.array([1.0, 1 + one_ulp / 2, 1 + 1.5 * one_ulp, 1 + 0.49 * one_ulp, -3.0, np.inf,
                  65504.0 * 4], np.float32)
    r = round_bfloat16_array(a)
    assert r[0] == 1.0 and r[1] == 1.0  # a tie goes to the even neighbour
    assert r[2] == 1 + 2 * one_ulp and r[3] == 1.0 and r[4] == -3.0 and np.isinf(r[5])
    np.testing.assert_array_equal(round_bfloat16_array(r), r)
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert np.abs(round_bfloat16_array(x) - x).max() <= np.abs(x).max() * 2.0 ** -8


# --- routing: top-1, raw p, capacity ---------------------------------------------------------
@switch_tasks
def test_combine_weight_is_the_raw_probability_of_the_argmax():
    rng = np.random.default_rng(0)
    router = SwitchRouter(6, 5, capacity_factor=5.0, router_dtype="float64", rng=0).eval()
    router.W_r.data[...] = rng.standard_normal((6, 5))
    x = tm.tensor(rng.standard_normal((20, 6)))
    r = router(x)
    p = r.probs.numpy()
    np.testing.assert_array_equal(r.expert_index[:, 0], p.argmax(1))
    w = r.combine_weight.numpy()[:, 0]
    np.testing.assert_allclose(w, p.max(1), rtol=0, atol=0)  # not renormalised: < 1
    assert (w < 1).all() and r.k == 1 and not r.dropped_tokens.any()


@switch_tasks
def test_ties_go_to_the_lowest_expert():
    router = SwitchRouter(4, 3, capacity_factor=3.0, rng=0).eval()
    router.W_r.data[...] = 0.0
    r = router(tm.tensor(np.ones((6, 4), np.float32)))
    assert (r.expert_index == 0).all()
    np.testing.assert_allclose(r.combine_weight.numpy(), 1 / 3, rtol=1e-6)


@switch_tasks
def test_dropping_keeps_the_first_C_tokens_of_each_expert_in_sequence_order():
    rng = np.random.default_rng(3)
    T, E = 40, 4
    logits = tm.tensor(rng.standard_normal((T, E)) + np.array([2.0, 0, 0, -1]))
    r = switch_route(logits, logits.softmax(-1), capacity_factor=1.0)
    C = expert_capacity(T, E, 1.0)
    e = r.expert_index[:, 0]
    for j in range(E):
        mine = np.flatnonzero(e == j)
        kept = mine[r.position[mine, 0] >= 0]
        np.testing.assert_array_equal(kept, mine[:C])  # the first C in sequence order
        np.testing.assert_array_equal(r.position[kept, 0], np.arange(len(kept)))
        assert r.counts[j] == min(len(mine), C)
    assert r.dropped_fraction == pytest.approx(np.mean(r.position[:, 0] < 0))
    np.testing.assert_array_equal(r.stats["demand"], np.bincount(e, minlength=E))


@switch_tasks
def test_capacity_per_group():
    rng = np.random.default_rng(4)
    T, E, S = 24, 3, 8
    logits = tm.tensor(rng.standard_normal((T, E)) + np.array([1.5, 0, 0]))
    probs = logits.softmax(-1)
    r = switch_route(logits, probs, 1.0, group_size=S)
    C = expert_capacity(S, E, 1.0)
    assert r.stats["group_capacity"] == C and r.stats["num_groups"] == 3 and r.capacity == 3 * C
    for g in range(3):
        part = switch_route(logits[g * S:(g + 1) * S], probs[g * S:(g + 1) * S], 1.0)
        pos = r.position[g * S:(g + 1) * S, 0]
        want = np.where(part.position[:, 0] >= 0, g * C + part.position[:, 0], -1)
        np.testing.assert_array_equal(pos, want)
    with pytest.raises(ValueError, match="group_size"):
        switch_route(logits, probs, 1.0, group_size=5)


@switch_tasks
def test_switch_router_gradcheck():
    """Gradients of the combine weights and both losses wrt the input and W_r (float64,
    capacity for every token, fixed jitter)."""
    rng = np.random.default_rng(0)
    router = SwitchRouter(5, 4, capacity_factor=4.0, router_dtype="float64", rng=0)
    router.W_r.data = rng.standard_normal((5, 4))
    x = tm.tensor(rng.standard_normal((9, 5)), requires_grad=True)
    noise = rng.uniform(0.99, 1.01, size=(9, 5))

    def f(x, W):
        r = router(x, jitter_noise=noise)
        assert not r.dropped_tokens.any()
        return (r.combine_weight, r.stats["balance_loss"], r.stats["z_loss"],
                r.aux_losses["balance"], r.aux_losses["z"])

    tm.gradcheck(f, [x, router.W_r], names=["x", "W_r"])


# --- the balancing loss, eqs. (4)-(6) ---------------------------------------------------------
@pytest.mark.task4_2
@pytest.mark.parametrize("N", [2, 4, 8, 64])
def test_aux_loss_is_one_at_uniform_routing(N):
    T = 4 * N
    probs = tm.tensor(np.full((T, N), 1.0 / N))
    expert = np.arange(T) % N  # balanced argmax
    assert load_balancing_loss(probs, expert).item() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(dispatch_fraction(expert, N), np.full(N, 1.0 / N))


@pytest.mark.task4_2
def test_aux_loss_of_a_collapsed_router_is_N():
    N, T = 8, 32
    probs = np.zeros((T, N))
    probs[:, 3] = 1.0
    loss = load_balancing_loss(tm.tensor(probs), np.full(T, 3))
    assert loss.item() == pytest.approx(N)


@pytest.mark.task4_2
def test_aux_loss_formula_and_gradient():
    rng = np.random.default_rng(0)
    T, N = 13, 5
    logits = tm.tensor(rng.standard_normal((T, N)), requires_grad=True)
    e = np.argmax(logits.numpy(), 1)
    p = logits.softmax(-1)
    f = np.bincount(e, minlength=N) / T
    P = p.numpy().mean(0)
    assert load_balancing_loss(p, e).item() == pytest.approx(N * np.sum(f * P), rel=1e-12)
    # (T, k) routing: column 0 counts; (G, S, N) groups: the mean of the groups' losses
    assert load_balancing_loss(p, np.stack([e, (e + 1) % N], 1)).item() == \
        pytest.approx(N * np.sum(f * P))
    pg = p.numpy().reshape(1, T, N)
    assert load_balancing_loss(tm.tensor(pg), e[None]).item() == pytest.approx(
        N * np.sum(f * P))
    tm.gradcheck(lambda z: load_balancing_loss(z.softmax(-1), e), [logits])
    # the gradient flows through P only: dL/dp = N f / T
    pt = tm.tensor(p.numpy(), requires_grad=True)
    load_balancing_loss(pt, e).backward()
    np.testing.assert_allclose(pt.grad, np.broadcast_to(N * f / T, (T, N)), rtol=1e-12)


@pytest.mark.task4_2
def test_aux_loss_groups_are_averaged():
    rng = np.random.default_rng(1)
    G, S, N = 3, 6, 4
    p = rng.dirichlet(np.ones(N), size=(G, S))
    e = p.argmax(-1)
    each = [load_balancing_loss(tm.tensor(p[g]), e[g]).item() for g in range(G)]
    assert load_balancing_loss(tm.tensor(p), e).item() == pytest.approx(np.mean(each))


def test_aux_loss_bad_input():
    p = tm.tensor(np.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="does not match"):
        load_balancing_loss(p, np.zeros(5, int))
    with pytest.raises(TypeError, match="integers"):
        load_balancing_loss(p, np.zeros(4))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        load_balancing_loss(p, np.full(4, 3))
    with pytest.raises(ValueError, match="router_probs"):
        load_balancing_loss(tm.tensor(np.ones(3)), np.zeros(3, int))


# --- the router z-loss, ST-MoE eq. (5) --------------------------------------------------------
@pytest.mark.task4_3
@pytest.mark.parametrize("N", [1, 2, 8, 64])
def test_z_loss_at_zero_logits_is_ln_N_squared(N):
    z = router_z_loss(tm.tensor(np.zeros((7, N))))
    assert z.item() == pytest.approx(math.log(N) ** 2, abs=1e-12)


@pytest.mark.task4_3
def test_z_loss_value_gradient_and_stability():
    rng = np.random.default_rng(0)
    x = tm.tensor(rng.standard_normal((6, 5)) * 3, requires_grad=True)
    lse = np.log(np.exp(x.numpy()).sum(1))
    assert router_z_loss(x).item() == pytest.approx(np.mean(lse ** 2), rel=1e-12)
    router_z_loss(x).backward()
    s = np.exp(x.numpy() - lse[:, None])
    np.testing.assert_allclose(x.grad, 2 * lse[:, None] * s / 6, rtol=1e-10)  # 2·lse·softmax/T
    tm.gradcheck(router_z_loss, [tm.tensor(x.numpy(), requires_grad=True)])
    big = router_z_loss(tm.tensor(np.array([[1000.0, 1000.0]], np.float32)))
    assert np.isfinite(big.item()) and big.item() == pytest.approx((1000 + math.log(2)) ** 2)
    with pytest.raises(ValueError, match="router_logits"):
        router_z_loss(tm.tensor(np.zeros(3)))


# --- selective precision ----------------------------------------------------------------------
@switch_tasks
def test_float32_router_holds_under_float16_inputs():
    """Inputs in float16 whose logits exceed float16's range (65504): the float32 router
    routes them correctly; a float16 router overflows and says so."""
    rng = np.random.default_rng(0)
    d, E = 16, 4
    x16 = (rng.standard_normal((32, d)) * 300).astype(np.float16)
    router32 = SwitchRouter(d, E, capacity_factor=4.0, rng=0).eval()
    router32.W_r.data[...] = (rng.standard_normal((d, E)) * 40).astype(np.float32)
    r = router32(tm.tensor(x16))
    ref_logits = x16.astype(np.float64) @ router32.W_r.numpy().astype(np.float64)
    assert np.abs(ref_logits).max() > 65504  # beyond float16
    assert r.logits.dtype == np.float32 and r.probs.dtype == np.float32
    assert np.isfinite(r.probs.numpy()).all()
    np.testing.assert_array_equal(r.expert_index[:, 0], ref_logits.argmax(1))
    assert r.combine_weight.dtype == np.float16  # cast back to the model's dtype
    router16 = SwitchRouter(d, E, capacity_factor=4.0, router_dtype="float16", rng=0).eval()
    router16.W_r.data[...] = router32.W_r.data
    with pytest.raises(FloatingPointError, match="router_dtype='float32'"):
        router16(tm.tensor(x16))


@switch_tasks
def test_float32_router_keeps_small_differences_that_float16_loses():
    """Footnote 7 of ST-MoE, in float16: logits near 128 differ by less than float16's
    spacing there (0.0625); the float32 router still sees the right winner."""
    d = 2
    W = np.array([[1.0, 1.0], [0.0, 0.01]], np.float32)  # logit 1 = logit 0 + 0.01 x_1
    x = tm.tensor(np.array([[128.0, 1.0]], np.float32))
    for dtype, winner in (("float32", 1), ("float16", 0)):
        router = SwitchRouter(d, 2, capacity_factor=2.0, router_dtype=dtype, rng=0).eval()
        router.W_r.data[...] = W
        assert router(x).expert_index[0, 0] == winner
