"""The sparsely-gated MoE layer: y = Σ_i G(x)_i E_i(x), dispatch invariants, the stacked-expert
fast path, hierarchical MoE (App. B), gradients and bad input.

The 2017 layer is the one :class:`MoELayer` with a :class:`NoisyTopKGate` (built by
``sparse_moe_layer``); ``layer(x)`` returns ``(y, aux_losses)`` and keeps the gate's
:class:`~tinymoe.dispatch.routing.Routing` in ``layer.last_routing``."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.moe.experts import ExpertList, GroupedLinear, StackedExperts, grouped_linear
from tinymoe.moe.hierarchical import HierarchicalGate, group_output, hierarchical_moe
from tinymoe.moe.layer import MoELayer
from tinymoe.moe.noisy_topk import NoisyTopKGate, sparse_moe_layer

F64 = np.float64
gate_eval = pytest.mark.task3_1  # eval mode runs only the KeepTopK/softmax region


def gate_train(f):  # training mode runs all three regions of the noisy gate
    return pytest.mark.task3_1(pytest.mark.task3_2(pytest.mark.task3_3(f)))


def randomise_gates(layer, rng, scale=1.0):
    for m in layer.modules():
        if isinstance(m, NoisyTopKGate):
            m.W_g.data[...] = scale * rng.standard_normal(m.W_g.shape)
            m.W_noise.data[...] = 0.3 * rng.standard_normal(m.W_noise.shape)


def gate_routings(r):
    """The routings of every noisy gate behind routing ``r`` (a hierarchical gate's primary
    and group gates, or ``r`` itself)."""
    if "primary" in r.stats:
        return [r.stats["primary"], *r.stats["groups"]]
    return [r]


def min_gap(layer):
    """The smallest gap between sorted noisy logits of any gate used in the last forward."""
    gaps = []
    for r in gate_routings(layer.last_routing):
        if r.num_tokens:
            H = np.sort(r.logits.numpy(), axis=1)
            gaps.append(np.diff(H, axis=1).min())
    return min(gaps)


def total(aux):
    """The layer's aux losses summed, as a model adds them to its task loss."""
    return tm.moe.sum_losses(aux.values())


def dense_reference(layer, x):
    """Σ_i G(x)_i E_i(x) with every expert run on every token (the layer's last gates)."""
    G = layer.last_routing.probs.numpy()  # (T, E)
    if isinstance(layer.experts, StackedExperts):
        outs = [layer.experts.expert(e, x).numpy() for e in range(layer.num_experts)]
    else:
        outs = [expert(tm.tensor(x)).numpy() for expert in layer.experts]
    return sum(G[:, [e]] * outs[e] for e in range(layer.num_experts))


# --- y = Σ_i G(x)_i E_i(x) ------------------------------------------------------------------
@gate_train
@pytest.mark.parametrize("k", [1, 2, 4])
def test_layer_equals_the_dense_sum_stacked(k):
    rng = np.random.default_rng(k)
    layer = sparse_moe_layer(6, 5, k, d_ff=7, rng=0, dtype=F64)
    randomise_gates(layer, rng)
    x = rng.standard_normal((11, 6))
    y, _ = layer(tm.tensor(x), noise=rng.standard_normal((11, 5)))
    np.testing.assert_allclose(y.numpy(), dense_reference(layer, x), rtol=1e-12, atol=1e-12)
    layer.eval()
    y, _ = layer(tm.tensor(x))
    np.testing.assert_allclose(y.numpy(), dense_reference(layer, x), rtol=1e-12, atol=1e-12)


@gate_eval
def test_layer_with_any_module_experts_and_the_fast_path_agree():
    rng = np.random.default_rng(0)
    ffns = [tm.nn.FeedForward(6, 8, activation="relu", rng=i, dtype=F64) for i in range(4)]
    generic = sparse_moe_layer(6, 4, 2, experts=ffns, rng=1, dtype=F64).eval()
    assert isinstance(generic.experts, ExpertList)
    randomise_gates(generic, rng)
    fast = sparse_moe_layer(6, 4, 2, experts=None, d_ff=8, rng=1, dtype=F64).eval()
    fast.experts = StackedExperts.from_feedforwards(ffns)
    fast.router.W_g.data[...] = generic.router.W_g.data
    x = rng.standard_normal((2, 9, 6))
    (y1, _), (y2, _) = generic(tm.tensor(x)), fast(tm.tensor(x))
    assert y1.shape == (2, 9, 6)
    np.testing.assert_allclose(y1.numpy(), y2.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y1.numpy().reshape(18, 6),
                               dense_reference(generic, x.reshape(18, 6)), rtol=1e-12)


@gate_eval
def test_experts_may_change_the_width():
    rng = np.random.default_rng(1)
    experts = [tm.nn.Linear(5, 3, rng=i, dtype=F64) for i in range(3)]
    layer = sparse_moe_layer(5, 3, 2, experts=experts, rng=0, dtype=F64).eval()
    randomise_gates(layer, rng)
    x = rng.standard_normal((8, 5))
    y, _ = layer(tm.tensor(x))
    assert y.shape == (8, 3)
    np.testing.assert_allclose(y.numpy(), dense_reference(layer, x), rtol=1e-12)


# --- dispatch invariants ------------------------------------------------------------------------
@gate_train
def test_dispatch_invariants():
    rng = np.random.default_rng(2)
    T, E, k = 40, 6, 3
    layer = sparse_moe_layer(4, E, k, d_ff=5, rng=0, dtype=F64)
    randomise_gates(layer, rng, scale=0.3)
    x = rng.standard_normal((T, 4))
    layer(tm.tensor(x))
    g = layer.last_routing
    counts = g.counts
    assert g.capacity is None and (g.position >= 0).all()  # dropless
    assert counts.sum() == T * k  # dropless: every choice is served
    np.testing.assert_array_equal(counts, np.bincount(g.expert_index.ravel(), minlength=E))
    np.testing.assert_allclose(g.combine_weight.numpy().sum(1), 1.0, rtol=1e-12)
    assert all(len(set(row)) == k for row in g.expert_index)  # k distinct experts
    np.testing.assert_allclose(g.probs.numpy().sum(0), g.stats["importance"].numpy(),
                               rtol=1e-12)
    # permutation round trip: identity experts and weights summing to 1 give back x
    r = tm.dispatch.route(g.expert_index, g.combine_weight.numpy(), E)
    assert sorted(r.order.tolist()) == list(range(T * k))
    np.testing.assert_array_equal(r.order, g.order)  # the layer's own sorted layout
    rows = tm.dispatch.dispatch(tm.tensor(x), r)  # (T·k, d)
    np.testing.assert_array_equal(rows.numpy(), x[r.order // k])
    for e in range(E):  # each expert's block holds exactly the tokens that chose it
        tokens = r.order[r.offsets[e]:r.offsets[e + 1]] // k
        np.testing.assert_array_equal(np.sort(tokens), np.flatnonzero((g.expert_index == e)
                                                                      .any(1)))
    back = tm.dispatch.combine(rows, r)
    np.testing.assert_allclose(back.numpy(), x, rtol=1e-12)


# --- gradients -----------------------------------------------------------------------------------
@gate_train
@pytest.mark.parametrize("k", [1, 2])
def test_layer_gradcheck(k):
    """Task loss + balancing losses, w.r.t. the input, both gate matrices and the experts."""
    rng = np.random.default_rng(20 + k)
    T, d, E = 7, 4, 5
    for _ in range(100):  # draw until the noisy logits have a margin (no top-k flips)
        layer = sparse_moe_layer(d, E, k, d_ff=6, w_importance=0.5, w_load=0.5, rng=0,
                                 dtype=F64)
        randomise_gates(layer, rng)
        x = tm.tensor(rng.standard_normal((T, d)), requires_grad=True)
        noise = rng.standard_normal((T, E))
        layer(x, noise=noise)
        if min_gap(layer) > 0.05:
            break
    params = [p for _, p in layer.named_parameters()]

    def fn(x, *params):
        y, aux = layer(x, noise=noise)
        assert set(aux) == {"balance"}
        return y, total(aux)

    with tm.dispatch.use_backend("numpy"):  # thousands of tiny forwards: skip thread start-up
        tm.gradcheck(fn, [x, *params], names=["x"] + [n for n, _ in layer.named_parameters()])


@gate_train
@tm.dispatch.use_backend("numpy")  # thousands of tiny forwards: skip thread start-up
def test_hierarchical_gradcheck():
    rng = np.random.default_rng(7)
    for _ in range(200):
        layer = hierarchical_moe(3, 3, 3, 2, d_ff=4, w_importance=0.5, w_load=0.5, rng=0,
                                 dtype=F64)
        randomise_gates(layer, rng)
        x = tm.tensor(rng.standard_normal((6, 3)), requires_grad=True)
        seeds = rng.integers(0, 2**31, size=4)

        def fn(x, *params, layer=layer, seeds=seeds):
            for gate, s in zip([m for m in layer.modules() if isinstance(m, NoisyTopKGate)],
                               seeds):
                gate.rng = np.random.default_rng(s)  # the same noise on every call
            y, aux = layer(x)
            return y, total(aux)

        fn(x)
        if min_gap(layer) > 0.05:
            break
    params = [p for _, p in layer.named_parameters()]
    tm.gradcheck(fn, [x, *params], max_elements=40)


# --- hierarchical MoE (Appendix B) ---------------------------------------------------------------
@gate_eval
def test_hierarchical_equals_the_explicit_double_sum():
    rng = np.random.default_rng(3)
    a, b, k, T, d = 3, 4, 2, 13, 5
    layer = hierarchical_moe(d, a, b, k, d_ff=6, w_importance=0.1, w_load=0.1, rng=0,
                             dtype=F64).eval()
    assert isinstance(layer.router, HierarchicalGate) and layer.num_experts == a * b
    randomise_gates(layer, rng)
    x = rng.standard_normal((T, d))
    y, aux = layer(tm.tensor(x))
    primary = layer.router.primary(tm.tensor(x)).probs.numpy()  # (T, a)
    y_ref = np.zeros((T, d))
    imp_ref = np.zeros((a, b))
    for i, gate in enumerate(layer.router.groups):
        Gi = gate(tm.tensor(x)).probs.numpy()  # (T, b): group i's gate on every token
        imp_ref[i] = (primary[:, [i]] * Gi).sum(0)
        for j in range(b):
            Eij = group_output(layer, i, j, x).numpy()  # (T, d)
            y_ref += primary[:, [i]] * Gi[:, [j]] * Eij  # eq. (12)
    np.testing.assert_allclose(y.numpy(), y_ref, rtol=1e-12, atol=1e-12)
    r = layer.last_routing
    np.testing.assert_allclose(r.stats["importance"].numpy(), imp_ref, rtol=1e-12)  # eq. (13)
    # eval: loads are hard counts, so eq. (14) gives the number of tokens per leaf expert
    leaf_counts = np.stack([g.counts for g in r.stats["groups"]])  # (a, b)
    np.testing.assert_allclose(r.stats["load"].numpy(), leaf_counts)
    np.testing.assert_array_equal(r.counts, leaf_counts.reshape(-1))  # flat expert i·b + j
    assert leaf_counts.sum() == T * k * k and r.k == k * k
    assert set(aux) == {"balance"} and aux is r.aux_losses


@gate_train
def test_hierarchical_load_gives_the_primary_gate_a_gradient():
    rng = np.random.default_rng(4)
    layer = hierarchical_moe(4, 3, 3, 2, d_ff=5, w_importance=0.0, w_load=1.0, rng=0,
                             dtype=F64)
    randomise_gates(layer, rng, scale=0.5)
    _, aux = layer(tm.tensor(rng.standard_normal((30, 4))))
    aux["balance"].backward()
    assert np.abs(layer.router.primary.W_g.grad).sum() > 0  # through Load_primary in eq. (14)
    stats = layer.last_routing.stats
    assert stats["load"].shape == (3, 3) and stats["importance"].shape == (3, 3)


# --- determinism ---------------------------------------------------------------------------------
@gate_train
def test_eval_is_deterministic_and_seeded_training_repeats():
    x = tm.tensor(np.random.default_rng(5).standard_normal((3, 4, 6)).astype(np.float32))
    a = sparse_moe_layer(6, 4, 2, d_ff=8, rng=11)
    b = sparse_moe_layer(6, 4, 2, d_ff=8, rng=11)
    np.testing.assert_array_equal(a(x)[0].numpy(), b(x)[0].numpy())  # same seed, same noise
    a.eval()
    np.testing.assert_array_equal(a(x)[0].numpy(), a(x)[0].numpy())
    np.testing.assert_array_equal(a.last_routing.expert_index, np.tile([0, 1], (12, 1)))


# --- the stacked experts' grouped matmul ---------------------------------------------------------
def test_grouped_linear_blocks_and_gradcheck_with_empty_blocks():
    rng = np.random.default_rng(6)
    offsets = np.array([0, 3, 3, 7, 7])  # experts 1 and 3 get no rows
    x = tm.tensor(rng.standard_normal((7, 3)), requires_grad=True)
    W = tm.tensor(rng.standard_normal((4, 3, 2)), requires_grad=True)
    b = tm.tensor(rng.standard_normal((4, 2)), requires_grad=True)
    out = grouped_linear(x, W, b, offsets).numpy()
    np.testing.assert_allclose(out[:3], x.numpy()[:3] @ W.numpy()[0] + b.numpy()[0])
    np.testing.assert_allclose(out[3:], x.numpy()[3:] @ W.numpy()[2] + b.numpy()[2])
    tm.gradcheck(lambda x, W, b: GroupedLinear.apply(x, W, b, offsets=offsets), [x, W, b])
    with pytest.raises(ValueError, match="grouped_linear: offsets"):
        grouped_linear(x, W, b, np.array([0, 3, 3, 7]))
    with pytest.raises(ValueError, match=r"grouped_linear: offsets .* must rise"):
        grouped_linear(x, W, b, np.array([0, 3, 2, 7, 7]))


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 5])
def test_bad_k(k):
    with pytest.raises(ValueError, match=rf"NoisyTopKGate: k={k} must be an integer in \[1, 4\]"):
        sparse_moe_layer(4, 4, k, d_ff=8)


def test_bad_construction():
    with pytest.raises(ValueError, match="sparse_moe_layer: give d_ff"):
        sparse_moe_layer(4, 4, 2)
    with pytest.raises(ValueError, match="3 experts given for a router over num_experts=4"):
        sparse_moe_layer(4, 4, 2, experts=[tm.nn.Linear(4, 4) for _ in range(3)])
    with pytest.raises(ValueError, match="3 experts given for a router over num_experts=4"):
        MoELayer(NoisyTopKGate(4, 4, 2), [tm.nn.Linear(4, 4) for _ in range(3)])
    with pytest.raises(TypeError, match="router must be a Module with num_experts and d_model"):
        MoELayer(tm.nn.Linear(4, 4), [tm.nn.Linear(4, 4) for _ in range(4)])


def test_wrong_input_width():
    layer = sparse_moe_layer(4, 3, 2, d_ff=8, rng=0)
    with pytest.raises(ValueError, match=r"MoELayer.*last dim 5, expected 4"):
        layer(tm.tensor(np.zeros((2, 5), np.float32)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_input(bad):
    layer = sparse_moe_layer(4, 3, 2, d_ff=8, rng=0)
    x = np.zeros((2, 4), np.float32)
    x[1, 0] = bad
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        layer(tm.tensor(x))


@gate_train
@pytest.mark.parametrize("kind", ["stacked", "modules", "hierarchical"])
def test_empty_batch_returns_an_empty_output(kind):
    if kind == "stacked":
        layer = sparse_moe_layer(4, 3, 2, d_ff=8, w_importance=0.1, w_load=0.1, rng=0)
    elif kind == "modules":
        layer = sparse_moe_layer(4, 3, 2, experts=[tm.nn.FeedForward(4, 8, rng=i)
                                                   for i in range(3)], w_load=0.1, rng=0)
    else:
        layer = hierarchical_moe(4, 2, 3, 2, d_ff=8, w_importance=0.1, w_load=0.1, rng=0)
    x = tm.tensor(np.zeros((0, 4), np.float32), requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (0, 4)
    assert total(aux).item() == 0.0
    (y.sum() + total(aux)).backward()
    y, _ = layer(tm.tensor(np.zeros((2, 0, 4), np.float32)))
    assert y.shape == (2, 0, 4)


# --- the Table 6 experiment, end to end in a tiny mode ------------------------------------------
@gate_train
def test_table6_experiment_runs_end_to_end(capsys):
    from tinymoe.app.experiments import table6_2017 as t6

    res = t6.run(fast=True, steps=3, progress=False, settings=((0.0, 0.0), (0.1, 0.1)))
    table = t6.format_table(res)
    assert "| 0.1 | 0.1 |" in table and "1.14" in table  # the paper's max/mean load
    s = res.setting(0.1, 0.1)
    assert np.isfinite([s.val_loss, s.cv_importance, s.cv_load, s.max_over_mean]).all()
    assert len(s.final_fraction) == t6.FAST.num_experts
    assert np.asarray(s.load_history).shape[1] == t6.FAST.num_experts
    t6.figure_load(res)
    assert t6.main_table6(["--fast", "--steps", "2", "--no-progress"]) == 0
    assert "Table 6" in capsys.readouterr().out


# --- capacity buffers: only the filled slots are multiplied --------------------------------------
@pytest.mark.parametrize("relu", [False, True])
def test_buffer_linear_filled_rows_only_and_gradcheck(relu):
    from tinymoe.moe.experts import BufferLinear, buffer_linear
    rng = np.random.default_rng(7)
    rows = np.array([2, 0, 4])  # expert 1 has no tokens, expert 2 a full buffer
    x = tm.tensor(rng.standard_normal((3, 4, 3)), requires_grad=True)
    W = tm.tensor(rng.standard_normal((3, 3, 5)), requires_grad=True)
    b = tm.tensor(rng.standard_normal((3, 5)), requires_grad=True)
    out = buffer_linear(x, W, b, rows, relu=relu).numpy()  # (E, C, d_out)
    for e, n in enumerate(rows):
        want = x.numpy()[e, :n] @ W.numpy()[e] + b.numpy()[e]
        np.testing.assert_allclose(out[e, :n], np.maximum(want, 0) if relu else want)
        assert not out[e, n:].any()  # padding slots: 0
    tm.gradcheck(lambda x, W, b: BufferLinear.apply(x, W, b, rows=rows, relu=relu), [x, W, b])
    with pytest.raises(ValueError, match=r"buffer_linear: rows \[2, 0, 5\] must lie in"):
        buffer_linear(x, W, b, np.array([2, 0, 5]))
    with pytest.raises(ValueError, match="buffer_linear: rows must be"):
        buffer_linear(x, W, b, np.array([2, 0]))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_stacked_experts_skip_padding_same_results_on_filled_slots(activation):
    rng = np.random.default_rng(8)
    ex = StackedExperts(3, 4, 6, activation, dtype=F64, rng=rng)
    for p in (ex.b1, ex.b2):
        p.data = rng.standard_normal(p.shape)
    rows = np.array([3, 1, 0])
    buf = rng.standard_normal((3, 5, 4))
    for e, n in enumerate(rows):
        buf[e, n:] = 0  # what dispatch leaves in the empty slots
    g = rng.standard_normal((3, 5, 4))
    grads = []
    for r in (None, rows):
        for p in ex.parameters():
            p.grad = None
        xt = tm.tensor(buf, requires_grad=True)
        out = ex(xt, rows=r)
        upstream = g.copy()
        for e, n in enumerate(rows):
            upstream[e, n:] = 0  # combine reads no empty slot
        (out * tm.Tensor(upstream)).sum().backward()
        grads.append((out.numpy(), xt.grad, [p.grad.copy() for p in ex.parameters()]))
    (full, dx_full, dp_full), (part, dx_part, dp_part) = grads
    for e, n in enumerate(rows):
        np.testing.assert_allclose(part[e, :n], full[e, :n], rtol=1e-12)
        assert not part[e, n:].any()
    np.testing.assert_allclose(dx_part, dx_full, rtol=1e-12, atol=1e-14)
    for a, b in zip(dp_part, dp_full):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_filled_rows_is_one_past_the_highest_kept_slot():
    from tinymoe.dispatch.routing import Routing
    expert = np.array([[0, 2], [0, 1], [2, 0], [0, 2]])  # (T, k)
    position = np.array([[0, 3], [1, -1], [2, 2], [-1, 0]])  # -1: dropped; slot 0 of a group
    r = Routing(expert, np.ones((4, 2)), position, np.array([3, 0, 3]), 3, 4)
    np.testing.assert_array_equal(r.filled_rows, [3, 0, 4])


def test_ffn_kernels_match_numpy():
    from tinymoe.moe.ffn_kernels import bias_relu_, relu_grad_
    rng = np.random.default_rng(9)
    # one thread for 37 x 7; Numba's threads for 300 x 300 (>= PARALLEL_MIN_ELEMENTS)
    for dtype, shape in [(np.float32, (37, 7)), (np.float64, (37, 7)),
                         (np.float16, (37, 7)), (np.float32, (300, 300))]:
        o = rng.standard_normal(shape).astype(dtype)
        b = rng.standard_normal(shape[1]).astype(dtype)
        for relu in (False, True):
            want = o + b
            np.testing.assert_array_equal(bias_relu_(o.copy(), b, relu),
                                          np.maximum(want, 0) if relu else want)
        h = np.maximum(o, 0)
        grad = rng.standard_normal(o.shape).astype(dtype)
        g = grad.copy()
        db = relu_grad_(g, h)
        np.testing.assert_array_equal(g, grad * (h > 0))
        assert db.dtype == dtype and db.shape == (shape[1],)
        np.testing.assert_allclose(db, (grad * (h > 0)).astype(F64).sum(0),
                                   rtol=1e-3 if dtype == np.float16 else 1e-6, atol=1e-6)


def test_buffer_ffn_equals_two_buffer_linears_and_gradchecks():
    from tinymoe.moe.experts import BufferFFN, buffer_linear
    rng = np.random.default_rng(10)
    rows = np.array([3, 0, 4])
    x = tm.tensor(rng.standard_normal((3, 4, 3)), requires_grad=True)
    W1 = tm.tensor(rng.standard_normal((3, 3, 5)), requires_grad=True)
    b1 = tm.tensor(rng.standard_normal((3, 5)), requires_grad=True)
    W2 = tm.tensor(rng.standard_normal((3, 5, 2)), requires_grad=True)
    b2 = tm.tensor(rng.standard_normal((3, 2)), requires_grad=True)
    fused = BufferFFN.apply(x, W1, b1, W2, b2, rows=rows).numpy()
    two = buffer_linear(buffer_linear(x, W1, b1, rows, relu=True), W2, b2, rows).numpy()
    np.testing.assert_allclose(fused, two, rtol=1e-12)
    tm.gradcheck(lambda x, W1, b1, W2, b2: BufferFFN.apply(x, W1, b1, W2, b2, rows=rows),
                 [x, W1, b1, W2, b2])
    frozen = tm.tensor(W1.numpy())  # an input without a gradient
    tm.gradcheck(lambda x, W2: BufferFFN.apply(x, frozen, b1.numpy(), W2, b2.numpy(),
                                               rows=rows), [x, W2])
    with pytest.raises(ValueError, match="buffer_ffn: buffers"):
        BufferFFN.apply(x, W2, b1, W2, b2, rows=rows)


def test_buffer_ffn_frees_hidden_blocks_unless_the_graph_is_retained():
    from tinymoe.moe.experts import BufferFFN
    rng = np.random.default_rng(11)
    rows = np.array([2, 3])
    x = tm.tensor(rng.standard_normal((2, 3, 4)), requires_grad=True)
    W1 = tm.tensor(rng.standard_normal((2, 4, 5)), requires_grad=True)
    b1, W2, b2 = np.zeros((2, 5)), rng.standard_normal((2, 5, 4)), np.zeros((2, 4))
    out = BufferFFN.apply(x, W1, b1, W2, b2, rows=rows)
    node = out._node
    out.sum().backward(retain_graph=True)
    first = x.grad.copy()
    assert all(h is not None for h in node.hidden)  # kept for a second backward
    out.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * first)
    assert node.hidden == [None, None]  # freed expert by expert
    with pytest.raises(RuntimeError, match="already freed"):
        out.sum().backward()
