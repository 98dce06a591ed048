"""Expert parallelism on D simulated devices: the all-to-all (a permutation whose gradient is
the reverse all-to-all), equality with the single-device layer grouped by T/D (forward,
gradients, losses), the bytes on the network against the formula, padding, bad input."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.moe.capacity import expert_capacity
from tinymoe.moe import gshard_layer, switch_layer, sum_losses
from tinymoe.parallel import (
    CommReport,
    ExpertParallelMoE,
    all_to_all,
    alltoall_bytes,
    check_num_devices,
    expert_parallel_forward,
)

F64 = np.float64


def lesson04(f):  # every gate forward runs the three regions of lesson 04
    return pytest.mark.task4_1(pytest.mark.task4_2(pytest.mark.task4_3(f)))


def make(gate="switch", E=4, d=6, f=8, cf=1.0, seed=0, scale=2.0, dtype=F64, **kw):
    router = "float64" if dtype == F64 else "float32"
    build = switch_layer if gate == "switch" else gshard_layer
    layer = build(d, E, f, capacity_factor=cf, router_dtype=router, dtype=dtype, rng=seed,
                  **kw)
    W = layer.router.W_r if gate == "switch" else layer.router.W_g
    rng = np.random.default_rng(seed + 100)
    W.data = (scale * rng.standard_normal((d, E))).astype(W.dtype)
    for name in ("b1", "b2"):
        p = getattr(layer.experts, name)
        p.data = (0.1 * rng.standard_normal(p.shape)).astype(p.dtype)
    return layer


def gate_noise(gate, T, d, seed):
    """Fixed training-mode randomness for all T tokens (each device gets its rows)."""
    rng = np.random.default_rng(seed)
    if gate == "switch":
        return {"jitter_noise": rng.uniform(0.99, 1.01, size=(T, d))}
    return {"uniform": rng.random(T)}


# --- the collective ---------------------------------------------------------------------------
def labelled_chunks(D, shape=(2, 3)):
    """chunks[src][dst] filled with the number 10·src + dst."""
    return [tm.tensor(np.stack([np.full(shape, 10.0 * s + t) for t in range(D)]))
            for s in range(D)]


@pytest.mark.task7_1
@pytest.mark.parametrize("D", [1, 2, 3, 4])
def test_all_to_all_delivers_chunk_src_dst_to_dst(D):
    received = all_to_all(labelled_chunks(D))
    assert len(received) == D
    for dst in range(D):
        assert received[dst].shape == (D, 2, 3)
        for src in range(D):
            np.testing.assert_array_equal(received[dst].numpy()[src], 10.0 * src + dst)
    nested = [[tm.tensor(np.full((2,), 10.0 * s + t)) for t in range(D)] for s in range(D)]
    for dst, buf in enumerate(all_to_all(nested)):  # lists of D chunks per device work too
        np.testing.assert_array_equal(buf.numpy()[:, 0], 10.0 * np.arange(D) + dst)


@pytest.mark.task7_1
@pytest.mark.parametrize("D", [1, 2, 4])
def test_all_to_all_twice_with_roles_swapped_is_the_identity(D):
    rng = np.random.default_rng(D)
    chunks = [tm.tensor(rng.standard_normal((D, 3, 2, 5))) for _ in range(D)]
    back = all_to_all(all_to_all(chunks))  # received[dst][src] sent again from dst to src
    for a, b in zip(chunks, back):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.task7_1
def test_all_to_all_gradcheck():
    rng = np.random.default_rng(0)
    D = 3
    chunks = [tm.tensor(rng.standard_normal((D, 2, 2)), requires_grad=True) for _ in range(D)]
    assert tm.gradcheck(lambda *c: tuple(all_to_all(list(c))), chunks)


@pytest.mark.task7_1
def test_all_to_all_backward_is_the_reverse_all_to_all():
    """dL/dchunks[src][dst] = dL/dreceived[dst][src]: gradients travel back to the sender."""
    rng = np.random.default_rng(1)
    D = 4
    chunks = [tm.tensor(rng.standard_normal((D, 3)), requires_grad=True) for _ in range(D)]
    cot = [rng.standard_normal((D, 3)) for _ in range(D)]
    received = all_to_all(chunks)
    sum((r * tm.tensor(g)).sum() for r, g in zip(received, cot)).backward()
    expected = all_to_all([tm.tensor(g) for g in cot])
    for c, e in zip(chunks, expected):
        np.testing.assert_array_equal(c.grad, e.numpy())


def test_all_to_all_rejects_ragged_buffers():
    with pytest.raises(ValueError, match=r"all_to_all: .*\(D=2, \*chunk\).*pad chunks"):
        all_to_all([np.zeros((2, 3)), np.zeros((3, 3))])
    with pytest.raises(ValueError, match="all_to_all: .*same shape"):
        all_to_all([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="all_to_all: .*non-empty list"):
        all_to_all([])


# --- equal to the single-device layer with group_size = T/D ---------------------------------------
@lesson04
@pytest.mark.task7_1
@pytest.mark.parametrize("gate", ["switch", "top2"])
@pytest.mark.parametrize("D", [1, 2, 4])
def test_forward_and_gradients_equal_the_grouped_layer(gate, D):
    T, E, d = 32, 4, 6
    cf = 1.0 if gate == "switch" else 0.5
    layer = make(gate, E=E, d=d, cf=cf, group_size=T // D)  # one GShard group per device
    ep = ExpertParallelMoE(layer, D)
    assert [n for n, _ in ep.named_parameters()] == \
        ["layer." + n for n, _ in layer.named_parameters()]
    rng = np.random.default_rng(D)
    x = rng.standard_normal((2, T // 2, d))
    cot = rng.standard_normal(x.shape)
    noise = gate_noise(gate, T, d, seed=7)

    def run(model):
        model.zero_grad()
        xt = tm.tensor(x, requires_grad=True)
        y, aux = model(xt, **noise)
        ((y * tm.tensor(cot)).sum() + sum_losses(aux.values())).backward()
        grads = {n: p.grad.copy() for n, p in layer.named_parameters()}
        return y.numpy(), xt.grad, grads, aux["balance"].item(), aux["z"].item()

    y1, gx1, g1, aux1, z1 = run(layer)
    y2, gx2, g2, aux2, z2 = run(ep)
    r1 = layer.last_routing
    assert (r1.stats["active"] & ~r1.kept).sum() > 0  # the capacity per group bites
    np.testing.assert_allclose(y2, y1, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(gx2, gx1, rtol=1e-11, atol=1e-12)
    assert g1.keys() == g2.keys()
    for name in g1:
        np.testing.assert_allclose(g2[name], g1[name], rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose([aux2, z2], [aux1, z1], rtol=1e-12)
    # the devices' routings are the layer's groups, capacity C per group
    for r, cr in enumerate(ep.last_routings):
        assert cr.stats["group_capacity"] == r1.stats["group_capacity"]
        rows = slice(r * T // D, (r + 1) * T // D)
        np.testing.assert_array_equal(cr.expert_index, r1.expert_index[rows])
        np.testing.assert_array_equal(cr.kept, r1.kept[rows])


@lesson04
@pytest.mark.task7_1
@pytest.mark.parametrize("gate", ["switch", "top2"])
def test_eval_mode_float32_matches_and_counts_agree(gate):
    T, E, d, D = 48, 8, 6, 4
    layer = make(gate, E=E, d=d, cf=1.25, dtype=np.float32, group_size=T // D).eval()
    x = np.random.default_rng(3).standard_normal((T, d)).astype(np.float32)
    y1 = layer(tm.tensor(x))[0].numpy()
    y2, routings, rep = expert_parallel_forward(layer, tm.tensor(x), D)
    assert y2.dtype == np.float32
    np.testing.assert_allclose(y2.numpy(), y1, rtol=1e-6, atol=1e-6)
    assert isinstance(rep, CommReport) and len(routings) == D and rep.itemsize == 4
    r1 = layer.last_routing
    assert rep.dropped_tokens.sum() == r1.dropped_tokens.sum()
    np.testing.assert_array_equal(rep.tokens_per_expert.sum(axis=0), r1.counts)
    np.testing.assert_array_equal(rep.demand.sum(axis=0), r1.stats["demand"])
    S = T // D
    for r in range(D):  # tokens per device per expert: the kept choices of group r
        e = r1.expert_index[r * S:(r + 1) * S][r1.kept[r * S:(r + 1) * S]]
        np.testing.assert_array_equal(rep.tokens_per_expert[r], np.bincount(e, minlength=E))
    processed = rep.tokens_per_expert.reshape(D, D, E // D).sum(axis=(0, 2))
    np.testing.assert_array_equal(rep.processed, processed)
    assert rep.load_imbalance == pytest.approx(processed.max() / processed.mean())
    assert "load imbalance" in rep.summary()


# --- bytes on the network ------------------------------------------------------------------
@pytest.mark.task4_1
def test_alltoall_bytes_formula():
    # T=4096, d=256, E=8, D=4, cf 1.25, top-1, float32: C = ceil(1024/8 · 1.25) = 160
    assert alltoall_bytes(4096, 256, 8, 4, 1.25, 1, 4) == 3 * 2 * 160 * 256 * 4 == 983040
    assert alltoall_bytes(4096, 256, 8, 4, 1.25, 2, 4) == 2 * 983040  # top-2: 2·S/E slots
    assert alltoall_bytes(4096, 256, 8, 1, 1.25, 1, 4) == 0  # one device: nothing leaves
    assert alltoall_bytes(64, 16, 8, 8, 1.0, 1, 8) == 7 * 1 * 1 * 16 * 8


@lesson04
@pytest.mark.task7_1
@pytest.mark.parametrize("gate, D, cf", [("switch", 1, 1.0), ("switch", 2, 1.25),
                                         ("switch", 4, 0.5), ("top2", 2, 1.0),
                                         ("top2", 4, 2.0)])
def test_measured_bytes_match_the_formula(gate, D, cf):
    T, E, d = 64, 8, 6
    layer = make(gate, E=E, d=d, cf=cf, dtype=np.float32, group_size=T // D).eval()
    x = np.random.default_rng(4).standard_normal((T, d)).astype(np.float32)
    rep = expert_parallel_forward(layer, tm.tensor(x), D).report
    per_device = alltoall_bytes(T, d, E, D, cf, layer.k, 4)
    assert rep.capacity == expert_capacity(T // D, E, cf, k=layer.k)
    for sent in (rep.dispatch_sent, rep.dispatch_received, rep.combine_sent,
                 rep.combine_received):
        np.testing.assert_array_equal(sent, per_device)  # fixed-size buffers: every device
    assert rep.total_bytes == 2 * D * per_device
    np.testing.assert_array_equal(np.diag(rep.dispatch_traffic), 0)  # own chunk stays home


def balanced_layer(gate, E, D, T):
    """x_t = 10·onehot(t mod E) + 5·onehot(t+1 mod E), W_r = I: every device sends each
    expert exactly S/E first choices (and S/E second choices for top-2)."""
    layer = make(gate, E=E, d=E, cf=1.0, group_size=T // D).eval()
    (layer.router.W_r if gate == "switch" else layer.router.W_g).data = np.eye(E)
    t = np.arange(T)
    x = np.zeros((T, E))
    x[t, t % E] = 10.0
    x[t, (t + 1) % E] = 5.0
    return layer, x


@lesson04
@pytest.mark.task7_1
@pytest.mark.parametrize("gate", ["switch", "top2"])
@pytest.mark.parametrize("D", [1, 2, 4])
def test_padding_is_zero_only_when_routing_is_balanced(gate, D):
    T, E = 32, 4
    layer, x = balanced_layer(gate, E, D, T)
    rep = expert_parallel_forward(layer, tm.tensor(x), D).report
    assert rep.padding_fraction == 0.0 and rep.padding_bytes == 0
    assert rep.dropped_tokens.sum() == 0 and rep.load_imbalance == 1.0
    x[:, 0] += 20.0  # now every token prefers expert 0 first
    rep = expert_parallel_forward(layer, tm.tensor(x), D).report
    assert rep.padding_fraction > 0
    assert (rep.tokens_per_expert < rep.demand).any()  # expert 0 is full: choices dropped
    assert (rep.padding_bytes > 0) == (D > 1)  # with one device nothing is on the network
    assert rep.total_bytes == 2 * D * alltoall_bytes(T, E, E, D, 1.0, layer.k, 8)
    if D > 1:
        assert rep.load_imbalance > 1.0  # device 0, which holds expert 0, does more work


# --- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [0, -1, 1.5, True, "2"])
def test_num_devices_must_be_a_positive_integer(D):
    with pytest.raises(ValueError, match=r"num_devices=.* must be an integer >= 1"):
        check_num_devices(D, 8, 4, "test")
    with pytest.raises(ValueError, match=r"ExpertParallelMoE: num_devices=.* integer >= 1"):
        ExpertParallelMoE(make(), D)


def test_num_devices_must_divide_tokens_and_experts():
    layer = make(E=4)
    with pytest.raises(ValueError, match=r"ExpertParallelMoE: num_experts=4 does not split "
                                         r"over num_devices=3.*choose num_devices in \[1, 2, 4\]"):
        ExpertParallelMoE(layer, 3)
    with pytest.raises(ValueError, match=r"expert_parallel_forward: 10 tokens do not split "
                                         r"over num_devices=4.*choose num_devices in \[1, 2\]"):
        expert_parallel_forward(layer, tm.tensor(np.zeros((10, 6))), 4)
    with pytest.raises(ValueError, match=r"alltoall_bytes: num_experts=8 does not split over "
                                         r"num_devices=3"):
        alltoall_bytes(96, 16, 8, 3)
    with pytest.raises(ValueError, match=r"alltoall_bytes: 100 tokens do not split"):
        alltoall_bytes(100, 16, 8, 8)
    with pytest.raises(ValueError, match=r"alltoall_bytes: d=0 must be an integer >= 1"):
        alltoall_bytes(64, 0, 8, 2)


def test_gate_groups_must_fit_a_device_and_inputs_need_one_row_per_token():
    layer = make(E=4, group_size=16)
    with pytest.raises(ValueError, match=r"group_size=16 does not divide the 8 tokens of a "
                                         r"device.*set group_size=T/D=8"):
        expert_parallel_forward(layer, tm.tensor(np.zeros((32, 6))), 4)
    with pytest.raises(ValueError, match=r"gate input jitter_noise has shape \(5, 6\).*one "
                                         r"row per token"):
        expert_parallel_forward(layer, tm.tensor(np.zeros((32, 6))), 2,
                                jitter_noise=np.ones((5, 6)))
    with pytest.raises(TypeError, match="must be an MoELayer with StackedExperts"):
        expert_parallel_forward(tm.nn.Linear(6, 6), np.zeros((4, 6)), 2)
