"""The capacity-mode MoE layer (GShard / Switch): y = Σ kept w·FFN_e(x), dropped tokens pass
through the residual unchanged, gradients, expert dropout, per-step counters, bad input.

Both are the one :class:`MoELayer`, with a :class:`SwitchRouter` (``switch_layer``) or a
:class:`Top2Gate` (``gshard_layer``) whose Routing has a capacity: (E, C, d) buffers."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.moe.aux_losses import load_balancing_loss
from tinymoe.moe.capacity import expert_capacity
from tinymoe.moe.experts import StackedExperts, batched_ffn
from tinymoe.moe.gshard import gshard_layer
from tinymoe.moe.layer import MoELayer
from tinymoe.moe.switch import SwitchRouter, switch_layer

F64 = np.float64


def lesson04(f):  # every forward of the layer runs the three regions of lesson 04
    return pytest.mark.task4_1(pytest.mark.task4_2(pytest.mark.task4_3(f)))


def router_weight(layer):
    """The router's (d, E) matrix: W_r of the Switch router, W_g of GShard's gate."""
    return layer.router.W_r if isinstance(layer.router, SwitchRouter) else layer.router.W_g


def make(gate="switch", E=4, d=6, f=8, cf=1.0, seed=0, scale=1.0, **kw):
    """A float64 Switch (``switch_layer``) or GShard (``gshard_layer``) layer; GShard's gate
    gets the Switch z-loss coefficient 1e-3 too, so both layers train both losses."""
    build = switch_layer if gate == "switch" else gshard_layer
    if gate == "top2":
        kw.setdefault("z_loss_coef", 1e-3)
    layer = build(d, E, f, capacity_factor=cf, router_dtype="float64", dtype=F64, rng=seed,
                  **kw)
    rng = np.random.default_rng(seed + 100)
    router_weight(layer).data = scale * rng.standard_normal((d, E))
    for name in ("b1", "b2"):
        p = getattr(layer.experts, name)
        p.data = 0.1 * rng.standard_normal(p.shape)
    return layer


def total(aux):
    """The layer's aux losses summed, as a model adds them to its task loss."""
    return tm.moe.sum_losses(aux.values())


def dense_reference(layer, x):
    """Σ over each token's kept choices of w · FFN_e(x_t), every expert run on every token."""
    r = layer.last_routing
    w = r.combine_weight.numpy()
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(r.expert_index.shape[1]):
            if r.position[t, j] >= 0:
                e = r.expert_index[t, j]
                y[t] += w[t, j] * layer.experts.expert(e, x[t:t + 1]).numpy()[0]
    return y


@lesson04
@pytest.mark.parametrize("gate, cf", [("switch", 1.0), ("switch", 4.0), ("top2", 1.0),
                                      ("top2", 0.5)])
def test_layer_equals_the_sum_over_kept_choices(gate, cf):
    rng = np.random.default_rng(1)
    layer = make(gate, cf=cf).eval()
    x = rng.standard_normal((2, 10, 6))
    y, aux = layer(tm.tensor(x))
    assert y.shape == (2, 10, 6) and aux is layer.last_routing.aux_losses
    np.testing.assert_allclose(y.numpy().reshape(20, 6), dense_reference(layer, x.reshape(20, 6)),
                               rtol=1e-12, atol=1e-12)


@lesson04
@pytest.mark.parametrize("gate", ["switch", "top2"])
def test_dropping_is_exact(gate):
    """At most C tokens per expert (per group), in priority order; a dropped token's output
    is 0, so through the residual it leaves the layer exactly as it came in."""
    rng = np.random.default_rng(2)
    T, E, S = 32, 4, 16
    layer = make(gate, E=E, cf=0.5, scale=3.0, group_size=S).eval()
    x = rng.standard_normal((T, 6))
    y = layer(tm.tensor(x))[0].numpy()
    r = layer.last_routing
    C = expert_capacity(S, E, 0.5, k=layer.k)
    assert r.stats["group_capacity"] == C and r.capacity == (T // S) * C
    for g in range(T // S):
        rows = slice(g * S, (g + 1) * S)
        for e in range(E):
            assert ((r.expert_index[rows] == e) & (r.position[rows] >= 0)).sum() <= C
    dropped = r.dropped_tokens
    assert dropped.any() and not dropped.all()
    np.testing.assert_array_equal(y[dropped], 0.0)
    res = make(gate, E=E, cf=0.5, scale=3.0, group_size=S, residual=True).eval()
    out = res(tm.tensor(x))[0].numpy()
    np.testing.assert_array_equal(res.last_routing.dropped_tokens, dropped)
    np.testing.assert_array_equal(out[dropped], x[dropped])  # bit for bit: x + 0
    np.testing.assert_allclose(out[~dropped], x[~dropped] + y[~dropped], rtol=1e-12)
    assert r.dropped_fraction == pytest.approx(dropped.sum() / T)  # a share of the tokens


@lesson04
def test_switch_priority_is_sequence_order():
    rng = np.random.default_rng(3)
    layer = make("switch", E=3, cf=0.5, scale=4.0).eval()
    layer(tm.tensor(rng.standard_normal((30, 6))))
    r = layer.last_routing
    for e in range(3):
        mine = np.flatnonzero(r.expert_index[:, 0] == e)
        kept = r.position[mine, 0] >= 0
        assert not (np.diff(kept.astype(int)) > 0).any()  # kept ones come first


@lesson04
@pytest.mark.parametrize("gate", ["switch", "top2"])
def test_layer_gradcheck(gate):
    """Every parameter and the input, float64, capacity for all tokens, jitter and random
    routing fixed."""
    rng = np.random.default_rng(4)
    T, d = 8, 6
    layer = make(gate, E=3, cf=3.0, d=d, f=5)
    x = tm.tensor(rng.standard_normal((T, d)), requires_grad=True)
    fixed = {"jitter_noise": rng.uniform(0.99, 1.01, (T, d))}
    if gate == "top2":
        fixed["uniform"] = rng.random(T)
    params = [x] + [p for _, p in layer.named_parameters()]
    names = ["x"] + [n for n, _ in layer.named_parameters()]

    def f(*_):
        y, aux = layer(x, **fixed)
        r = layer.last_routing
        assert not (r.stats["active"] & r.dropped_choices).any()
        assert set(aux) == {"balance", "z"}
        return y, total(aux)

    tm.gradcheck(f, params, names=names)


@lesson04
def test_router_losses_and_counters():
    rng = np.random.default_rng(5)
    layer = make("switch", E=4, cf=1.0, aux_loss_coef=0.01, z_loss_coef=0.001)
    _, aux = layer(tm.tensor(rng.standard_normal((3, 8, 6))))
    r = layer.last_routing
    s = r.stats
    assert aux is r.aux_losses and set(aux) == {"balance", "z"}
    assert aux["balance"].item() == pytest.approx(0.01 * s["balance_loss"].item())
    assert aux["z"].item() == pytest.approx(0.001 * s["z_loss"].item())
    assert total(aux).item() == pytest.approx(aux["balance"].item() + aux["z"].item())
    assert s["balance_loss"].item() == pytest.approx(
        load_balancing_loss(r.probs, r.expert_index[:, 0]).item(), rel=1e-12)
    assert r.num_tokens == 24 and s["group_capacity"] == 6 and s["num_groups"] == 1
    assert r.capacity == 6 and r.num_experts == 4
    np.testing.assert_array_equal(r.counts, np.bincount(r.expert_index[r.kept], minlength=4))
    dropped_choices = int((s["active"] & r.dropped_choices).sum())
    assert r.counts.sum() + dropped_choices == s["demand"].sum() == 24
    assert r.dropped_fraction == pytest.approx(r.dropped_tokens.mean())


@lesson04
def test_expert_dropout_on_the_interim_activations():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((12, 6))
    plain = make("switch", cf=4.0)
    drop = make("switch", cf=4.0, expert_dropout=0.5)
    noise = {"jitter_noise": np.ones((12, 6))}
    y0, y1 = plain(tm.tensor(x), **noise)[0].numpy(), drop(tm.tensor(x), **noise)[0].numpy()
    assert not np.allclose(y0, y1)
    drop.eval()
    plain.eval()
    np.testing.assert_allclose(drop(tm.tensor(x))[0].numpy(), plain(tm.tensor(x))[0].numpy(),
                               rtol=1e-12)
    # on the hidden layer: with every hidden unit dropped only the output bias remains
    buf = tm.tensor(rng.standard_normal((4, 3, 6)))
    all_dropped = tm.nn.Dropout(0.0)
    all_dropped.p = 1.0 - 1e-12
    all_dropped.rng = np.random.default_rng(0)
    ex = plain.experts
    with np.errstate(over="ignore"):
        out = batched_ffn(buf, ex.W1, ex.b1, ex.W2, ex.b2, ex.activation, all_dropped).numpy()
    np.testing.assert_allclose(out, np.broadcast_to(ex.b2.numpy()[:, None, :], out.shape),
                               atol=1e-9)
    ex.dropout = all_dropped  # the experts' own dropout module, in their forward
    with np.errstate(over="ignore"):
        out = ex(buf).numpy()
    np.testing.assert_allclose(out, np.broadcast_to(ex.b2.numpy()[:, None, :], out.shape),
                               atol=1e-9)


@lesson04
def test_float16_model_with_float32_router():
    rng = np.random.default_rng(7)
    layer = switch_layer(8, 4, 16, dtype=np.float16, rng=0)
    x = tm.tensor(rng.standard_normal((2, 5, 8)).astype(np.float16), requires_grad=True)
    y, aux = layer(x)
    assert y.dtype == np.float16 and layer.last_routing.probs.dtype == np.float32
    assert layer.router.W_r.dtype == np.float32
    (y.sum() + total(aux)).backward()
    assert x.grad.dtype == np.float16 and layer.router.W_r.grad.dtype == np.float32


@lesson04
def test_custom_router_module():
    router = SwitchRouter(6, 3, capacity_factor=3.0, router_dtype="float64", rng=0)
    experts = StackedExperts(3, 6, 4, dtype=F64, rng=0)
    layer = MoELayer(router, experts)
    assert layer.router is router and layer.experts is experts and layer.k == 1
    x = np.random.default_rng(8).standard_normal((4, 6))
    y, aux = layer(tm.tensor(x))
    assert set(aux) == {"balance", "z"}
    np.testing.assert_allclose(y.numpy(), dense_reference(layer, x), rtol=1e-12, atol=1e-12)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="SwitchRouter: capacity_factor=0 must be"):
        switch_layer(4, 2, 8, capacity_factor=0)
    with pytest.raises(ValueError, match="Top2Gate: capacity_factor=-1.0 must be"):
        gshard_layer(4, 2, 8, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="SwitchRouter: num_experts=0 must be an integer >= 1"):
        switch_layer(4, 0, 8)
    with pytest.raises(TypeError, match="MoELayer: router must be a Module"):
        MoELayer("top3", StackedExperts(2, 4, 8, rng=0))
    with pytest.raises(TypeError, match="MoELayer: router must be a Module"):
        MoELayer(3, StackedExperts(2, 4, 8, rng=0))
    layer = switch_layer(4, 2, 8, rng=0)
    with pytest.raises(ValueError, match=r"last dim 5, expected 4"):
        layer(tm.tensor(np.ones((3, 5), np.float32)))
    grouped = switch_layer(4, 2, 8, group_size=4, rng=0)
    with pytest.raises(ValueError, match="group_size=4"):
        grouped(tm.tensor(np.ones((6, 4), np.float32)))
