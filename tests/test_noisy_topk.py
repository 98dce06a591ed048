"""Noisy top-k gating (Shazeer et al. 2017): the gate, kth_excluding, the load estimator."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tinymoe as tm
from tinymoe.moe.noisy_topk import (NOISE_EPSILON, NoisyTopKGate, keep_top_k_softmax,
                                    kth_excluding, kth_excluding_top, noisy_logits,
                                    noisy_top_k_gating, prob_in_top_k)


def Phi(z):
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z) / math.sqrt(2.0)))


def with_margin(rng, T, d, E, margin=0.05):
    """x, W_g, W_noise, noise (float64) whose noisy logits H have every gap between sorted
    entries >= margin, so the top-k selection does not flip under finite differences."""
    while True:
        x = rng.standard_normal((T, d))
        W_g, W_noise = rng.standard_normal((d, E)), 0.5 * rng.standard_normal((d, E))
        noise = rng.standard_normal((T, E))
        sigma = np.logaddexp(0, x @ W_noise) + NOISE_EPSILON
        H = np.sort(x @ W_g + noise * sigma, axis=1)
        if np.diff(H, axis=1).min() >= margin:
            return x, W_g, W_noise, noise


# --- kth_excluding and the top-(k+1) trick ---------------------------------------------------
@pytest.mark.task3_2
def test_kth_excluding_definition_by_hand():
    v = np.array([3.0, 1.0, 2.0, 0.0])
    assert kth_excluding(v, 1, 0) == 2.0  # without 3: [1, 2, 0], largest 2
    assert kth_excluding(v, 2, 0) == 1.0
    assert kth_excluding(v, 2, 3) == 2.0  # without 0: [3, 1, 2], 2nd largest 2
    np.testing.assert_array_equal(kth_excluding(v, 2), [1.0, 2.0, 1.0, 2.0])
    # the trick from the top k+1 values gives the same numbers
    H = tm.tensor(v[None, :], dtype=np.float64)
    top, _ = tm.functional.topk(H, 3)
    np.testing.assert_array_equal(kth_excluding_top(H, top, 2).numpy()[0], [1, 2, 1, 2])


@pytest.mark.task3_2
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=7),
                  elements=st.integers(-3, 3).map(float)),
       st.data())
def test_top_k_plus_1_trick_equals_definition_even_with_ties(v, data):
    E = v.shape[1]
    k = data.draw(st.integers(1, E - 1))
    H = tm.tensor(v)
    top, _ = tm.functional.topk(H, k + 1)
    np.testing.assert_array_equal(kth_excluding_top(H, top, k).numpy(), kth_excluding(v, k))


def test_kth_excluding_rejects_bad_k():
    with pytest.raises(ValueError, match="kth_excluding: k=4"):
        kth_excluding(np.zeros(4), 4)
    with pytest.raises(ValueError, match="kth_excluding: k=0"):
        kth_excluding(np.zeros(4), 0)


# --- the load estimator, eqs. (8)-(10) -------------------------------------------------------
@pytest.mark.task3_2
@pytest.mark.task3_3
def test_prob_in_top_k_hand_computed():
    """clean = noisy = [1, 0.5, 0, -1], σ = 1, k = 2: thresholds in 0, out 0.5."""
    clean = tm.tensor([[1.0, 0.5, 0.0, -1.0]], dtype=np.float64)
    sigma = tm.tensor(np.ones((1, 4)))
    top, _ = tm.functional.topk(clean, 3)
    P = prob_in_top_k(clean, clean, sigma, top, 2).numpy()[0]
    np.testing.assert_allclose(P, Phi([1.0, 0.5, -0.5, -1.5]), rtol=1e-12)
    np.testing.assert_allclose(P, [0.8413, 0.6915, 0.3085, 0.0668], atol=1e-4)
    assert abs(P.sum() - 1.908) < 1e-3  # close to k


@pytest.mark.task3_1
@pytest.mark.task3_2
@pytest.mark.task3_3
def test_prob_in_top_k_matches_redrawing_one_noise_value():
    """Eq. (8): P(x, i) is the chance that i is in the top k when only ε_i is drawn again."""
    rng = np.random.default_rng(3)
    E, k = 5, 2
    x, W_g, W_noise, noise = with_margin(rng, 1, 3, E)
    out = noisy_top_k_gating(tm.tensor(x), tm.tensor(W_g), tm.tensor(W_noise), k,
                             noise=noise)
    clean, sigma, H = out.stats["clean_logits"].numpy()[0], \
        out.stats["noise_stddev"].numpy()[0], out.logits.numpy()[0]
    n = 20000
    for i in range(E):
        Hs = np.repeat(H[None, :], n, axis=0)  # (n, E)
        Hs[:, i] = clean[i] + rng.standard_normal(n) * sigma[i]
        in_top = (np.argsort(-Hs, axis=1, kind="stable")[:, :k] == i).any(axis=1)
        assert abs(in_top.mean() - out.stats["prob_in_top_k"].numpy()[0, i]) < 0.015


# --- H(x) and the softmax over the kept logits, eqs. (3)-(5) -------------------------------
@pytest.mark.task3_1
def test_noisy_logits_formula():
    rng = np.random.default_rng(0)
    x, W_g, W_n, eps = (rng.standard_normal(s) for s in ((4, 3), (3, 5), (3, 5), (4, 5)))
    clean, H, sigma = noisy_logits(tm.tensor(x), tm.tensor(W_g), tm.tensor(W_n), eps)
    expect_sigma = np.log1p(np.exp(x @ W_n)) + 1e-2
    np.testing.assert_allclose(sigma.numpy(), expect_sigma, rtol=1e-12)
    np.testing.assert_allclose(H.numpy(), x @ W_g + eps * expect_sigma, rtol=1e-12)
    np.testing.assert_allclose(clean.numpy(), x @ W_g, rtol=1e-12)


@pytest.mark.task3_1
def test_softmax_over_kept_logits_equals_masked_softmax():
    rng = np.random.default_rng(1)
    H = rng.standard_normal((6, 5))
    idx, w, top = keep_top_k_softmax(tm.tensor(H), 3)
    masked = np.full_like(H, -np.inf)
    np.put_along_axis(masked, idx, np.take_along_axis(H, idx, 1), 1)
    full = np.exp(masked - masked.max(1, keepdims=True))
    full /= full.sum(1, keepdims=True)
    np.testing.assert_allclose(np.take_along_axis(full, idx, 1), w.numpy(), rtol=1e-12)
    np.testing.assert_allclose(w.numpy().sum(1), 1.0)
    assert top.shape == (6, 4)  # k + 1 values for the estimator


@pytest.mark.task3_1
def test_zero_init_without_noise_routes_to_the_lowest_experts():
    gate = NoisyTopKGate(4, 6, k=2, rng=0).eval()
    out = gate(tm.tensor(np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32)))
    np.testing.assert_array_equal(out.expert_index, np.tile([0, 1], (7, 1)))
    np.testing.assert_allclose(out.combine_weight.numpy(), 0.5)
    np.testing.assert_array_equal(out.stats["load"].numpy(), [7, 7, 0, 0, 0, 0])  # hard counts
    assert gate.W_g.dtype == np.float32 and not gate.W_g.numpy().any()
    assert not gate.W_noise.numpy().any()


@pytest.mark.task3_1
def test_zero_init_with_noise_spreads_the_load():
    """"No signal and some noise" (App. A): the noise alone picks experts, about evenly."""
    gate = NoisyTopKGate(4, 8, k=2, rng=0)
    out = gate(tm.tensor(np.ones((4000, 4), np.float32)))
    counts = out.counts
    assert counts.sum() == 8000 and counts.min() > 900 and counts.max() < 1100
    # σ = softplus(0) + 1e-2 everywhere
    np.testing.assert_allclose(out.stats["noise_stddev"].numpy(), math.log(2) + 1e-2, rtol=1e-6)


@pytest.mark.task3_1
@pytest.mark.task3_2
@pytest.mark.task3_3
def test_eval_is_deterministic_and_train_is_repeatable():
    rng = np.random.default_rng(2)
    x = tm.tensor(rng.standard_normal((9, 4)).astype(np.float32))
    gate = NoisyTopKGate(4, 5, k=2, rng=7)
    gate.W_g.data[...] = rng.standard_normal((4, 5)).astype(np.float32) * 0.1
    a, b = gate(x), gate(x)  # training: fresh noise each call
    assert not np.array_equal(a.logits.numpy(), b.logits.numpy())
    gate.eval()
    c, d = gate(x), gate(x, noise=np.ones((9, 5)))  # eval ignores noise
    np.testing.assert_array_equal(c.combine_weight.numpy(), d.combine_weight.numpy())
    np.testing.assert_array_equal(c.logits.numpy(), c.stats["clean_logits"].numpy())
    assert c.stats["noise_stddev"] is None and c.stats["prob_in_top_k"] is None
    gate2 = NoisyTopKGate(4, 5, k=2, rng=7)
    gate2.W_g.data[...] = gate.W_g.data
    np.testing.assert_array_equal(gate2(x).logits.numpy(), a.logits.numpy())
    eps = rng.standard_normal((9, 5)).astype(np.float32)
    gate.train()
    np.testing.assert_array_equal(gate(x, noise=eps).stats["load"].numpy(),
                                  gate(x, noise=eps).stats["load"].numpy())


@pytest.mark.task3_1
def test_noisy_gating_off_and_k_equal_E_use_hard_counts():
    x = tm.tensor(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32))
    off = NoisyTopKGate(3, 4, k=2, noisy_gating=False)  # training, but no noise
    out = off(x)
    assert out.stats["noise_stddev"] is None and out.stats["prob_in_top_k"] is None
    np.testing.assert_array_equal(out.stats["load"].numpy(), [5, 5, 0, 0])
    full = NoisyTopKGate(3, 4, k=4, rng=0)
    out = full(x)
    assert out.stats["prob_in_top_k"] is None
    np.testing.assert_array_equal(out.stats["load"].numpy(), [5, 5, 5, 5])
    np.testing.assert_allclose(out.combine_weight.numpy().sum(1), 1.0, rtol=1e-6)


# --- gradients -------------------------------------------------------------------------------
@pytest.mark.task3_1
@pytest.mark.task3_2
@pytest.mark.task3_3
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gate_gradcheck(k):
    rng = np.random.default_rng(10 + k)
    x, W_g, W_noise, noise = with_margin(rng, 6, 3, 5)
    inputs = [tm.tensor(a, requires_grad=True) for a in (x, W_g, W_noise)]

    def fn(x, W_g, W_noise):
        out = noisy_top_k_gating(x, W_g, W_noise, k, noise=noise)
        return out.combine_weight, out.probs, out.stats["load"], out.stats["importance"]

    tm.gradcheck(fn, inputs, names=["x", "W_g", "W_noise"])


@pytest.mark.task3_2
@pytest.mark.task3_3
def test_prob_in_top_k_gradcheck_reaches_thresholds_and_sigma():
    rng = np.random.default_rng(5)
    clean = rng.standard_normal((4, 5))
    H = clean + rng.standard_normal((4, 5))
    while np.diff(np.sort(H, 1), axis=1).min() < 0.05:
        H = clean + rng.standard_normal((4, 5))
    sigma = 0.5 + rng.random((4, 5))
    ts = [tm.tensor(a, requires_grad=True) for a in (clean, H, sigma)]

    def fn(clean, H, sigma):
        top, _ = tm.functional.topk(H, 3)
        return prob_in_top_k(clean, H, sigma, top, 2)

    tm.gradcheck(fn, ts, names=["clean", "H", "sigma"])
    # the thresholds are values of H, so H gets a gradient (t2t behaviour)
    P = fn(*ts)
    P.sum().backward()
    assert np.abs(ts[1].grad).sum() > 0


# --- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 5, -1, 2.0])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k="):
        NoisyTopKGate(3, 4, k=k)
    with pytest.raises(ValueError, match="noisy_top_k_gating: k="):
        noisy_top_k_gating(np.zeros((2, 3)), np.zeros((3, 4)), np.zeros((3, 4)), k)


def test_wrong_width_and_shape():
    gate = NoisyTopKGate(3, 4, k=2, rng=0)
    with pytest.raises(ValueError, match=r"input width 5 != d_model 3"):
        gate(tm.tensor(np.zeros((2, 5), np.float32)))
    with pytest.raises(ValueError, match=r"must be \(T, d\)"):
        gate(tm.tensor(np.zeros((2, 2, 3), np.float32)))
    with pytest.raises(ValueError, match="noise has shape"):
        gate(tm.tensor(np.zeros((2, 3), np.float32)), noise=np.zeros((3, 4)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_input_or_weights_raise(bad):
    gate = NoisyTopKGate(3, 4, k=2, rng=0)
    x = np.ones((3, 3), np.float32)
    x[1, 2] = bad
    with pytest.raises(FloatingPointError, match=r"router input x.*NaN/inf.*token 1"):
        gate(tm.tensor(x))
    gate.eval()
    gate.W_g.data[2, 3] = bad
    with pytest.raises(FloatingPointError, match=r"W_g .*row 2, expert 3"):
        gate(tm.tensor(np.ones((3, 3), np.float32)))


@pytest.mark.task3_1
def test_overflowing_logits_raise():
    """Finite inputs and weights whose product overflows float32: inf logits."""
    gate = NoisyTopKGate(2, 4, k=2, rng=0)
    gate.W_g.data[...] = 3e38
    with np.errstate(over="ignore"), pytest.raises(FloatingPointError,
                                                    match=r"router logits x·W_g"):
        gate(tm.tensor(np.full((3, 2), 10.0, np.float32)))


@pytest.mark.task3_1
@pytest.mark.task3_2
@pytest.mark.task3_3
def test_empty_batch():
    gate = NoisyTopKGate(3, 4, k=2, rng=0)
    out = gate(tm.tensor(np.zeros((0, 3), np.float32)))
    assert out.expert_index.shape == (0, 2) and out.combine_weight.shape == (0, 2)
    assert out.probs.shape == (0, 4)
    np.testing.assert_array_equal(out.stats["load"].numpy(), np.zeros(4))
    np.testing.assert_array_equal(out.stats["importance"].numpy(), np.zeros(4))
    assert out.aux_losses["balance"].item() == 0.0
