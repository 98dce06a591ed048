"""The capacity-mode MoE layer (GShard / Switch): y = Σ kept w·FFN_e(x), dropped tokens pass
through the residual unchanged, gradients, expert dropout, per-step counters, bad input."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.moe.capacity import expert_capacity
from tinymoe.moe.capacity_layer import CapacityMoELayer, LayerStats, expert_ffn
from tinymoe.moe.switch import SwitchGate

F64 = np.float64


def lesson04(f):  # every forward of the layer runs the three regions of lesson 04
    return pytest.mark.task4_1(pytest.mark.task4_2(pytest.mark.task4_3(f)))


def make(gate="switch", E=4, d=6, f=8, cf=1.0, seed=0, scale=1.0, **kw):
    layer = CapacityMoELayer(d, E, f, gate=gate, capacity_factor=cf, router_dtype="float64",
                             dtype=F64, rng=seed, **kw)
    rng = np.random.default_rng(seed + 100)
    layer.gate.router.W_r.data = scale * rng.standard_normal((d, E))
    for name in ("b1", "b2"):
        p = getattr(layer.experts, name)
        p.data = 0.1 * rng.standard_normal(p.shape)
    return layer


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
    y = layer(tm.tensor(x))
    assert y.shape == (2, 10, 6)
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
    y = layer(tm.tensor(x)).numpy()
    r = layer.last_routing
    C = expert_capacity(S, E, 0.5, k=layer.k)
    assert r.capacity == C
    for g in range(T // S):
        rows = slice(g * S, (g + 1) * S)
        for e in range(E):
            assert ((r.expert_index[rows] == e) & (r.position[rows] >= 0)).sum() <= C
    dropped = r.dropped_tokens
    assert dropped.any() and not dropped.all()
    np.testing.assert_array_equal(y[dropped], 0.0)
    res = make(gate, E=E, cf=0.5, scale=3.0, group_size=S, residual=True).eval()
    out = res(tm.tensor(x)).numpy()
    np.testing.assert_array_equal(res.last_routing.dropped_tokens, dropped)
    np.testing.assert_array_equal(out[dropped], x[dropped])  # bit for bit: x + 0
    np.testing.assert_allclose(out[~dropped], x[~dropped] + y[~dropped], rtol=1e-12)
    assert layer.stats.dropped_tokens == dropped.sum()


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
        y = layer(x, **fixed)
        assert not (layer.last_routing.active & ~layer.last_routing.kept).any()
        return y, layer.router_loss

    tm.gradcheck(f, params, names=names)


@lesson04
def test_router_losses_and_counters():
    rng = np.random.default_rng(5)
    layer = make("switch", E=4, cf=1.0, aux_loss_coef=0.01, z_loss_coef=0.001)
    layer(tm.tensor(rng.standard_normal((3, 8, 6))))
    r, s = layer.last_routing, layer.stats
    assert isinstance(s, LayerStats)
    assert layer.aux_loss.item() == pytest.approx(0.01 * r.aux_loss.item())
    assert layer.z_loss.item() == pytest.approx(0.001 * r.z_loss.item())
    assert layer.router_loss.item() == pytest.approx(layer.aux_loss.item() +
                                                     layer.z_loss.item())
    assert s.tokens == 24 and s.capacity == 6 and s.num_groups == 1
    np.testing.assert_array_equal(s.load, r.routing.counts)
    assert s.load.sum() + s.dropped_choices == s.demand.sum() == 24
    assert s.dropped_fraction == pytest.approx(r.dropped_fraction)
    assert s.aux_loss == pytest.approx(r.aux_loss.item())


@lesson04
def test_expert_dropout_on_the_interim_activations():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((12, 6))
    plain = make("switch", cf=4.0)
    drop = make("switch", cf=4.0, expert_dropout=0.5)
    noise = {"jitter_noise": np.ones((12, 6))}
    y0, y1 = plain(tm.tensor(x), **noise).numpy(), drop(tm.tensor(x), **noise).numpy()
    assert not np.allclose(y0, y1)
    drop.eval()
    plain.eval()
    np.testing.assert_allclose(drop(tm.tensor(x)).numpy(), plain(tm.tensor(x)).numpy(),
                               rtol=1e-12)
    # on the hidden layer: with every hidden unit dropped only the output bias remains
    buf = tm.tensor(rng.standard_normal((4, 3, 6)))
    all_dropped = tm.nn.Dropout(0.0)
    all_dropped.p = 1.0 - 1e-12
    all_dropped.rng = np.random.default_rng(0)
    with np.errstate(over="ignore"):
        out = expert_ffn(plain.experts, buf, all_dropped).numpy()
    np.testing.assert_allclose(out, np.broadcast_to(plain.experts.b2.numpy()[:, None, :],
                                                    out.shape), atol=1e-9)


@lesson04
def test_float16_model_with_float32_router():
    rng = np.random.default_rng(7)
    layer = CapacityMoELayer(8, 4, 16, dtype=np.float16, rng=0)
    x = tm.tensor(rng.standard_normal((2, 5, 8)).astype(np.float16), requires_grad=True)
    y = layer(x)
    assert y.dtype == np.float16 and layer.last_routing.router_probs.dtype == np.float32
    assert layer.gate.router.W_r.dtype == np.float32
    (y.sum() + layer.router_loss).backward()
    assert x.grad.dtype == np.float16 and layer.gate.router.W_r.grad.dtype == np.float32


@lesson04
def test_custom_gate_module():
    gate = SwitchGate(6, 3, capacity_factor=3.0, router_dtype="float64", rng=0)
    layer = CapacityMoELayer(6, 3, 4, gate=gate, dtype=F64, rng=0)
    assert layer.gate is gate and layer.k == 1
    layer(tm.tensor(np.ones((4, 6))))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="capacity_factor"):
        CapacityMoELayer(4, 2, 8, capacity_factor=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        CapacityMoELayer(4, 2, 8, gate="top2", capacity_factor=-1.0)
    with pytest.raises(ValueError, match="num_experts"):
        CapacityMoELayer(4, 0, 8)
    with pytest.raises(ValueError, match="gate='top3'"):
        CapacityMoELayer(4, 2, 8, gate="top3")
    with pytest.raises(TypeError, match="gate must be"):
        CapacityMoELayer(4, 2, 8, gate=3)
    layer = CapacityMoELayer(4, 2, 8, rng=0)
    with pytest.raises(ValueError, match=r"last dim 5, expected 4"):
        layer(tm.tensor(np.ones((3, 5), np.float32)))
    grouped = CapacityMoELayer(4, 2, 8, group_size=4, rng=0)
    with pytest.raises(ValueError, match="group_size=4"):
        grouped(tm.tensor(np.ones((6, 4), np.float32)))
