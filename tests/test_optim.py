"""tm.optim: update rules against hand-computed values, convergence, clipping, schedules,
state dicts and readable errors."""
import math

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.nn import Linear, Parameter
from tinymoe.optim import (
    SGD,
    Adam,
    AdamW,
    LinearWarmupCosine,
    clip_grad_norm_,
    cosine_schedule,
)

F64 = np.float64
P0, G1, G2 = np.array([1.0, -2.0]), np.array([0.5, -0.1]), np.array([0.2, 0.3])


def param_with_grad(value=P0, grad=G1, dtype=F64):
    p = Parameter(np.array(value, dtype=dtype))
    p.grad = np.array(grad, dtype=dtype)
    return p


def two_steps(opt, p):
    opt.step()
    after_one = p.data.copy()
    p.grad = G2.astype(p.dtype)
    opt.step()
    return after_one, p.data.copy()


# ------------------------------------------------------------------------ SGD

def test_sgd_one_step_and_weight_decay():
    p = param_with_grad()
    SGD([p], lr=0.1).step()
    np.testing.assert_allclose(p.data, [0.95, -1.99], rtol=1e-15)
    p = param_with_grad()
    SGD([p], lr=0.1, weight_decay=0.1).step()  # g + 0.1 p = [0.6, -0.3]
    np.testing.assert_allclose(p.data, [0.94, -1.97], rtol=1e-15)


def test_sgd_momentum_two_steps():
    p = param_with_grad()
    one, two = two_steps(SGD([p], lr=0.1, momentum=0.9), p)
    np.testing.assert_allclose(one, P0 - 0.1 * G1)  # b1 = g1
    np.testing.assert_allclose(two, one - 0.1 * (0.9 * G1 + G2))  # b2 = 0.9 b1 + g2


def test_sgd_nesterov_two_steps():
    p = param_with_grad()
    one, two = two_steps(SGD([p], lr=0.1, momentum=0.9, nesterov=True), p)
    np.testing.assert_allclose(one, P0 - 0.1 * (G1 + 0.9 * G1))
    b2 = 0.9 * G1 + G2
    np.testing.assert_allclose(two, one - 0.1 * (G2 + 0.9 * b2))


# ------------------------------------------------------------------------ Adam / AdamW

def adam_by_hand(p, grads, lr, b1, b2, eps, wd=0.0, decoupled=False):
    m = v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


def test_adam_first_step_is_lr_times_sign():
    p = param_with_grad()
    Adam([p], lr=0.1).step()  # m_hat = g, v_hat = g^2: the step is lr g / |g|
    np.testing.assert_allclose(p.data, [0.9, -1.9], rtol=1e-7)


def test_adam_two_steps_match_the_formulas():
    p = param_with_grad()
    opt = Adam([p], lr=0.1, betas=(0.8, 0.99), eps=1e-3)
    one, two = two_steps(opt, p)
    np.testing.assert_allclose(one, adam_by_hand(P0, [G1], 0.1, 0.8, 0.99, 1e-3), rtol=1e-14)
    np.testing.assert_allclose(two, adam_by_hand(P0, [G1, G2], 0.1, 0.8, 0.99, 1e-3),
                               rtol=1e-14)
    st = opt.state[0]
    assert st["step"] == 2
    np.testing.assert_allclose(st["exp_avg"], 0.8 * 0.2 * G1 + 0.2 * G2)
    np.testing.assert_allclose(st["exp_avg_sq"], 0.99 * 0.01 * G1 ** 2 + 0.01 * G2 ** 2)


def test_adam_l2_enters_the_moments_adamw_decays_the_weights():
    p = param_with_grad()
    opt = Adam([p], lr=0.1, weight_decay=0.1)
    opt.step()
    np.testing.assert_allclose(opt.state[0]["exp_avg"], 0.1 * (G1 + 0.1 * P0))
    p.grad = G2.copy()
    opt.step()
    np.testing.assert_allclose(p.data, adam_by_hand(P0, [G1, G2], 0.1, 0.9, 0.999, 1e-8,
                                                    wd=0.1), rtol=1e-14)

    p = param_with_grad()
    opt = AdamW([p], lr=0.1, weight_decay=0.1)
    opt.step()  # p (1 - lr wd) - lr sign(g)
    np.testing.assert_allclose(p.data, [0.99 - 0.1, -1.98 + 0.1], rtol=1e-7)
    np.testing.assert_allclose(opt.state[0]["exp_avg"], 0.1 * G1)  # decay is not in m
    p.grad = G2.copy()
    opt.step()
    np.testing.assert_allclose(p.data, adam_by_hand(P0, [G1, G2], 0.1, 0.9, 0.999, 1e-8,
                                                    wd=0.1, decoupled=True), rtol=1e-14)
    assert AdamW([p]).weight_decay == 0.01


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1), lambda ps: Adam(ps, lr=0.1),
                                  lambda ps: AdamW(ps, lr=0.1),
                                  lambda ps: SGD(ps, lr=0.1, momentum=0.9)])
def test_updates_in_place_keep_dtype_and_skip_missing_grads(make):
    p = param_with_grad(dtype=np.float32)
    q = Parameter(np.ones(3, np.float32))  # no grad: untouched
    opt = make([p, q])
    data = p.data
    for _ in range(3):
        opt.step()
    assert p.data is data and p.dtype == np.float32 and p.grad.dtype == np.float32
    assert not np.allclose(p.data, P0)
    np.testing.assert_array_equal(q.data, 1.0)
    assert opt.state[1] == {}


QUAD_C, QUAD_T = np.array([1.0, 10.0]), np.array([1.0, 2.0])


def minimise_quadratic(make_opt, steps):
    """f(p) = 1/2 sum c (p - t)^2, minimised through autograd."""
    p = Parameter(np.array([5.0, -3.0]))
    opt = make_opt([p])
    for _ in range(steps):
        opt.zero_grad()
        d = p - QUAD_T
        (d * d * QUAD_C * 0.5).sum().backward()
        opt.step()
    return p.data


@pytest.mark.parametrize("make,steps,tol", [
    (lambda ps: SGD(ps, lr=0.05), 400, 1e-6),
    (lambda ps: SGD(ps, lr=0.02, momentum=0.9), 400, 1e-6),
    (lambda ps: SGD(ps, lr=0.02, momentum=0.9, nesterov=True), 400, 1e-6),
    (lambda ps: Adam(ps, lr=0.05), 600, 1e-3),
    (lambda ps: AdamW(ps, lr=0.05, weight_decay=1e-3), 600, 1e-2),
])
def test_optimizers_converge_on_a_quadratic(make, steps, tol):
    np.testing.assert_allclose(minimise_quadratic(make, steps), QUAD_T, atol=tol)


# ------------------------------------------------------------------------ clipping

def test_clip_grad_norm_exact_value_and_scaling():
    a, b = param_with_grad([0.0, 0.0], [3.0, 4.0]), param_with_grad([[0.0]], [[12.0]])
    c = Parameter(np.zeros(2))  # no grad: ignored
    total = clip_grad_norm_([a, b, c], max_norm=6.5)
    assert total == 13.0  # sqrt(9 + 16 + 144), before clipping
    scale = 6.5 / (13.0 + 1e-6)
    np.testing.assert_allclose(a.grad, [3 * scale, 4 * scale], rtol=1e-15)
    np.testing.assert_allclose(b.grad, [[12 * scale]], rtol=1e-15)
    assert c.grad is None
    assert clip_grad_norm_([a, b], max_norm=100.0) == pytest.approx(6.5)
    np.testing.assert_allclose(a.grad, [3 * scale, 4 * scale], rtol=1e-15)  # not clipped
    assert clip_grad_norm_([c], 1.0) == 0.0


def test_clip_grad_norm_keeps_dtype_and_accepts_one_tensor():
    p = param_with_grad([0.0, 0.0], [30.0, 40.0], dtype=np.float32)
    assert clip_grad_norm_(p, 5.0) == pytest.approx(50.0)
    assert p.grad.dtype == np.float32
    np.testing.assert_allclose(p.grad, [3.0, 4.0], rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_grad_norm_refuses_non_finite_gradients(bad):
    a = param_with_grad([0.0, 0.0], [1.0, 1.0])
    b = param_with_grad([0.0, 0.0], [bad, 1.0])
    with pytest.raises(FloatingPointError, match=r"NaN/inf in parameters #1 \(2,\)"):
        clip_grad_norm_([a, b], 1.0)
    np.testing.assert_array_equal(a.grad, [1.0, 1.0])  # nothing was scaled


def test_clip_grad_norm_bad_max_norm():
    with pytest.raises(ValueError, match="max_norm=0 must be > 0"):
        clip_grad_norm_([param_with_grad()], 0)


# ------------------------------------------------------------------------ schedules

def test_cosine_schedule_values():
    def f(s):
        return cosine_schedule(s, total=100, warmup=10, lr_max=1.0, lr_min=0.1)

    assert f(0) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.55)  # halfway through the cosine
    assert f(100) == 0.1 and f(10_000) == 0.1
    after = [f(s) for s in range(10, 101)]
    assert np.all(np.diff(after) <= 0)
    assert cosine_schedule(0, 10, 0, 2.0) == 2.0
    sched = LinearWarmupCosine(total=100, warmup=10, lr_max=1.0, lr_min=0.1)
    assert [sched(s) for s in range(120)] == [f(s) for s in range(120)]
    assert "warmup=10" in repr(sched)


@pytest.mark.parametrize("kwargs,match", [
    ({"total": 0, "warmup": 0, "lr_max": 1.0}, "total=0"),
    ({"total": 10, "warmup": 11, "lr_max": 1.0}, "warmup=11"),
    ({"total": 10, "warmup": 1, "lr_max": 0.0}, "lr_max=0.0 must be > 0"),
    ({"total": 10, "warmup": 1, "lr_max": 1.0, "lr_min": 2.0}, "lr_min=2.0"),
])
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cosine_schedule(0, **kwargs)
    with pytest.raises(ValueError, match=match):
        LinearWarmupCosine(**kwargs)


def test_schedule_step_must_be_non_negative():
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        cosine_schedule(-1, 10, 1, 1.0)


# ------------------------------------------------------------------------ errors

@pytest.mark.parametrize("make,match", [
    (lambda ps: SGD(ps, lr=0), "lr=0 must be > 0"),
    (lambda ps: SGD(ps, lr=-0.1), "lr=-0.1 must be > 0"),
    (lambda ps: Adam(ps, lr=float("nan")), "lr must be a finite number"),
    (lambda ps: SGD(ps, lr="0.1"), "lr must be a finite number"),
    (lambda ps: SGD(ps, lr=0.1, momentum=1.0), r"momentum=1.0 must be in \[0, 1\)"),
    (lambda ps: SGD(ps, lr=0.1, momentum=-0.5), "momentum"),
    (lambda ps: SGD(ps, lr=0.1, nesterov=True), "nesterov=True needs momentum > 0"),
    (lambda ps: SGD(ps, lr=0.1, weight_decay=-1), "weight_decay=-1 must be >= 0"),
    (lambda ps: Adam(ps, betas=(1.0, 0.999)), r"beta1=1.0 must be in \[0, 1\)"),
    (lambda ps: Adam(ps, betas=(0.9, 1.0)), r"beta2=1.0 must be in \[0, 1\)"),
    (lambda ps: AdamW(ps, betas=(-0.1, 0.9)), "beta1=-0.1"),
    (lambda ps: Adam(ps, betas=(0.9,)), "betas must be a pair"),
    (lambda ps: Adam(ps, eps=-1e-8), "eps=-1e-08 must be >= 0"),
    (lambda ps: AdamW(ps, weight_decay=-0.01), "AdamW: weight_decay=-0.01"),
])
def test_bad_hyper_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make([param_with_grad()])


def test_bad_parameter_lists():
    lin = Linear(2, 2)
    params = lin.parameters()
    SGD(params, lr=0.1)
    with pytest.raises(ValueError, match="used up"):
        SGD(params, lr=0.1)  # the generator is exhausted
    with pytest.raises(ValueError, match="got no parameters"):
        Adam([])
    with pytest.raises(TypeError, match="requires_grad=True, got ndarray"):
        Adam([np.ones(2)])
    with pytest.raises(TypeError, match="requires_grad=True, got Tensor"):
        Adam([tm.tensor([1.0, 2.0])])
    p = param_with_grad()
    assert len(SGD([p, p], lr=0.1).params) == 1  # duplicates once


def test_step_errors():
    p = param_with_grad()
    opt = SGD([p], lr=0.1)
    p.grad = np.ones(3)
    with pytest.raises(ValueError, match=r"gradient of shape \(3,\) for a parameter of shape"):
        opt.step()
    p.grad = G1.copy()
    opt.lr = -1.0
    with pytest.raises(ValueError, match="lr=-1.0 must be >= 0"):
        opt.step()
    opt.lr = 0.0  # a schedule may end at 0
    opt.step()
    np.testing.assert_array_equal(p.data, P0)


# ------------------------------------------------------------------------ state dicts

def train(model, opt, steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x, y = rng.standard_normal((8, 3)), rng.standard_normal((8, 2))
        opt.zero_grad()
        tm.losses.mse(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("make", [lambda ps: Adam(ps, lr=0.05, weight_decay=0.01),
                                  lambda ps: AdamW(ps, lr=0.05, betas=(0.8, 0.9)),
                                  lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True)])
def test_checkpoint_resumes_exactly(make, tmp_path):
    ref = Linear(3, 2, dtype=F64, rng=0)
    ref_opt = make(ref.parameters())
    train(ref, ref_opt, 3, seed=0)
    train(ref, ref_opt, 2, seed=1)

    model = Linear(3, 2, dtype=F64, rng=0)
    opt = make(model.parameters())
    train(model, opt, 3, seed=0)
    tm.nn.save(model, tmp_path / "model.npz", metadata={"step": 3})
    tm.nn.save(opt, tmp_path / "optim.npz")

    model2 = Linear(3, 2, dtype=F64, rng=99)
    opt2 = make(model2.parameters())
    opt2.lr = 1.0  # restored from the checkpoint
    assert tm.nn.load_into(model2, tmp_path / "model.npz") == {"step": 3}
    tm.nn.load_into(opt2, tmp_path / "optim.npz")
    assert opt2.lr == 0.05
    train(model2, opt2, 2, seed=1)
    for a, b in zip(ref.parameters(), model2.parameters()):
        np.testing.assert_array_equal(a.data, b.data)


def test_optimizer_state_dict_round_trip_and_refusals():
    p = param_with_grad()
    opt = Adam([p], lr=0.1, betas=(0.8, 0.9))
    opt.step()
    sd = opt.state_dict()
    assert set(sd) == {"kind", "hyper.lr", "hyper.betas", "hyper.eps", "hyper.weight_decay",
                       "state.0.step", "state.0.exp_avg", "state.0.exp_avg_sq"}
    sd["state.0.exp_avg"][...] = 0  # a copy
    assert np.all(opt.state[0]["exp_avg"] != 0)

    other = Adam([param_with_grad()], lr=0.5)
    other.load_state_dict(opt.state_dict())
    assert other.betas == (0.8, 0.9) and other.lr == 0.1 and other.state[0]["step"] == 1

    fresh = Adam([param_with_grad()], lr=0.5)
    for bad, match in [
        (SGD([p], lr=0.1).state_dict(), "saved by SGD, not Adam"),
        ({**opt.state_dict(), "state.0.exp_avg": np.zeros(3)}, r"state.0.exp_avg: shape \(3,\)"),
        ({**opt.state_dict(), "state.1.exp_avg": np.zeros(2)}, "unexpected key state.1.exp_avg"),
        ({k: v for k, v in opt.state_dict().items() if k != "state.0.exp_avg_sq"},
         "state of parameter 0 has"),
    ]:
        with pytest.raises(ValueError, match=match):
            fresh.load_state_dict(bad)
        assert fresh.lr == 0.5 and fresh.state == [{}]  # unchanged
    assert "Adam(1 parameters, lr=0.5" in repr(fresh)


def test_optim_module_is_reachable_lazily():
    assert tm.optim.AdamW is AdamW and callable(tm.optim.clip_grad_norm_)
    assert math.isclose(tm.optim.cosine_schedule(5, 10, 0, 1.0), 0.5)
