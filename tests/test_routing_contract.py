"""The routing contract: every router returns one Routing, and the one MoELayer runs any router.

For T tokens, E experts and k choices per token, each router's
:class:`~tinymoe.dispatch.routing.Routing` holds ``expert_index`` (T, k) int64,
``combine_weight`` (T, k) Tensor in the model's dtype, ``position`` (T, k) int64 with -1
exactly for the dropped or inactive choices, ``counts`` (E,) the kept choices per expert,
``probs``/``logits`` (T, E) where the router defines them, ``aux_losses`` scalar Tensors, and
``dropped_fraction`` = the share of **tokens** with no kept choice. ``MoELayer(router,
experts)`` returns ``(y, aux_losses)`` with ``aux_losses`` the router's dict, in the dispatch
mode the router picked (capacity buffers or dropless sorted rows), with shared experts, with
any expert Modules, and with the residual.

Every router's forward runs the solution regions of its lesson, so each case carries those
tasks' markers (the 2017 gate in training: its three regions; the capacity gates: lesson
04's; the modern routers: their own, and the z-loss's when it is on).
"""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.dispatch.routing import Routing
from tinymoe.moe import (
    AuxFreeRouter,
    ExpertChoiceRouter,
    ExpertList,
    HierarchicalGate,
    MoELayer,
    NoisyTopKGate,
    StackedExperts,
    SwitchRouter,
    Top2Gate,
    TopKRouter,
    moe_layer,
)

F64 = np.float64
D, E = 5, 4
NOISY = [pytest.mark.task3_1, pytest.mark.task3_2, pytest.mark.task3_3]
CAPACITY = [pytest.mark.task4_1, pytest.mark.task4_2, pytest.mark.task4_3]


def noisy(rng, d=D, num_experts=E, k=2):
    gate = NoisyTopKGate(d, num_experts, k, w_importance=0.1, w_load=0.1, rng=rng, dtype=F64)
    gate.W_g.data = rng.standard_normal(gate.W_g.shape)
    gate.W_noise.data = 0.3 * rng.standard_normal(gate.W_noise.shape)
    return gate


def hierarchical(rng):
    """2 groups of 2 experts, k = 1 per level: one flat gate over the 4 experts."""
    return HierarchicalGate(noisy(rng, num_experts=2, k=1), [noisy(rng, num_experts=2, k=1)
                                                             for _ in range(2)],
                            w_importance=0.1, w_load=0.1)


def top2(rng):
    gate = Top2Gate(D, E, capacity_factor=1.0, z_loss_coef=1e-3, router_dtype="float64",
                    rng=rng)
    gate.W_g.data = 2.0 * rng.standard_normal((D, E))
    return gate


def switch(rng):
    router = SwitchRouter(D, E, capacity_factor=1.0, router_dtype="float64", rng=rng)
    router.W_r.data = 2.0 * rng.standard_normal((D, E))
    return router


def topk(rng):
    router = TopKRouter(D, E, 2, z_loss_coef=1e-3, router_dtype="float64", rng=rng)
    router.W_g.data = rng.standard_normal((D, E))
    return router


def expert_choice(rng):
    router = ExpertChoiceRouter(D, E, capacity_factor=1.0, router_dtype="float64", rng=rng)
    router.W_g.data = rng.standard_normal((D, E))
    return router


def aux_free(rng):
    router = AuxFreeRouter(D, E, 2, router_dtype="float64", rng=rng)  # trains: bias updates
    router.W_g.data = rng.standard_normal((D, E))
    return router


# name: (builder, markers, capacity mode?, the aux losses it defines, has probs/logits?)
ROUTERS = {
    "noisy_topk": (noisy, NOISY, False, {"balance"}, True),
    "hierarchical": (hierarchical, NOISY, False, {"balance"}, False),
    "top2": (top2, CAPACITY, True, {"balance", "z"}, True),
    "switch": (switch, CAPACITY, True, {"balance", "z"}, True),
    "topk": (topk, [pytest.mark.task6_1, pytest.mark.task4_3], False, {"balance", "z"}, True),
    "expert_choice": (expert_choice, [pytest.mark.task6_2], True, set(), True),
    "aux_free": (aux_free, [pytest.mark.task6_3], False, {"sequence_balance"}, True),
}


def each_router():
    return [pytest.param(name, marks=ROUTERS[name][1], id=name) for name in ROUTERS]


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kept_sum(layer, x):
    """Σ over each token's kept choices of w · expert_e(x_t), each expert run on one token."""
    r = layer.last_routing
    w = r.combine_weight.numpy()
    y = np.zeros_like(x)  # every expert here maps (n, d) to (n, d)
    for t, j in zip(*np.nonzero(r.position >= 0)):
        e = int(r.expert_index[t, j])
        if isinstance(layer.experts, StackedExperts):
            out = layer.experts.expert(e, x[t:t + 1])
        else:
            out = layer.experts[e](tm.tensor(x[t:t + 1]))
            out = out[0] if isinstance(out, tuple) else out  # an MoE layer: (y, aux)
        y[t] += w[t, j] * out.numpy()[0]
    return y


# --- the Routing of every router ------------------------------------------------------------
@pytest.mark.parametrize("name", each_router())
def test_every_router_returns_a_routing_with_the_documented_fields(name):
    build, _, capacity_mode, aux_names, has_probs = ROUTERS[name]
    rng = np.random.default_rng(0)
    router = build(rng)
    T = 12
    x = rng.standard_normal((T, D))
    r = router(tm.tensor(x))
    assert isinstance(r, Routing)
    k = router.k
    assert r.num_tokens == T and r.k == k and r.num_experts == E == router.num_experts

    # expert_index (T, k) int64 in [0, E); combine_weight (T, k) Tensor in x's dtype
    assert isinstance(r.expert_index, np.ndarray) and r.expert_index.dtype == np.int64
    assert r.expert_index.shape == (T, k)
    assert r.expert_index.min() >= 0 and r.expert_index.max() < E
    assert isinstance(r.combine_weight, tm.Tensor) and r.combine_weight.shape == (T, k)
    assert r.combine_weight.dtype == np.float64 and r.combine_weight.requires_grad

    # position (T, k) int64: -1 exactly for the dropped or inactive choices, otherwise a slot
    assert isinstance(r.position, np.ndarray) and r.position.dtype == np.int64
    assert r.position.shape == (T, k) and r.position.min() >= -1
    kept = r.position >= 0
    np.testing.assert_array_equal(r.kept, kept)
    np.testing.assert_array_equal(r.dropped_choices, ~kept)
    if "active" in r.stats:  # GShard's random routing: an inactive choice takes no slot
        assert not (kept & ~r.stats["active"]).any()
    if capacity_mode:
        assert isinstance(r.capacity, int) and r.position.max() < r.capacity
    else:
        assert r.capacity is None and kept.all()  # dropless: every choice is served
    for e in range(E):  # each expert's slots: distinct, and 0..n-1 when dropless
        slots = np.sort(r.position[kept & (r.expert_index == e)])
        assert len(np.unique(slots)) == len(slots)
        if not capacity_mode:
            np.testing.assert_array_equal(slots, np.arange(len(slots)))

    # counts (E,) int64: the kept choices per expert
    assert r.counts.shape == (E,) and r.counts.dtype == np.int64
    np.testing.assert_array_equal(r.counts, np.bincount(r.expert_index[kept], minlength=E))

    # dropped_tokens (T,) and dropped_fraction: the share of TOKENS with no kept choice
    assert r.dropped_tokens.shape == (T,) and r.dropped_tokens.dtype == bool
    np.testing.assert_array_equal(r.dropped_tokens, ~kept.any(axis=1))
    assert r.dropped_fraction == pytest.approx((~kept.any(axis=1)).mean())
    assert r.dropped_choice_fraction == pytest.approx((~kept).mean())

    # the sorted layout: the kept pairs t·k + j grouped by expert
    order, offsets = r.order, r.offsets
    assert offsets.shape == (E + 1,) and offsets[0] == 0 and offsets[-1] == kept.sum()
    for e in range(E):
        pairs = order[offsets[e]:offsets[e + 1]]
        want = np.flatnonzero((kept & (r.expert_index == e)).reshape(-1))
        np.testing.assert_array_equal(np.sort(pairs), want)

    # probs and logits (T, E) where the router defines them
    if has_probs:
        assert r.probs.shape == (T, E) and r.logits.shape == (T, E)
    else:
        assert r.probs is None and r.logits is None

    # aux_losses: scalar Tensors by name, their sum total_aux_loss
    assert set(r.aux_losses) == aux_names
    for loss in r.aux_losses.values():
        assert isinstance(loss, tm.Tensor) and loss.shape == () and np.isfinite(loss.item())
    if aux_names:
        assert r.total_aux_loss().item() == pytest.approx(
            sum(v.item() for v in r.aux_losses.values()))
    else:
        assert r.total_aux_loss() is None


@pytest.mark.parametrize("name", [pytest.param(n, marks=ROUTERS[n][1], id=n)
                                  for n in ("top2", "switch", "topk", "expert_choice")])
def test_softmax_routers_probs_are_the_softmax_of_their_logits(name):
    rng = np.random.default_rng(1)
    router = ROUTERS[name][0](rng).eval()  # eval: no jitter, the logits are x·W exactly
    x = rng.standard_normal((10, D))
    r = router(tm.tensor(x))
    W = router.W_r if isinstance(router, SwitchRouter) else router.W_g
    np.testing.assert_allclose(r.logits.numpy(), x @ W.numpy(), rtol=1e-12)
    np.testing.assert_allclose(r.probs.numpy(), softmax(x @ W.numpy()), rtol=1e-12)


@pytest.mark.parametrize("name", [pytest.param(n, marks=ROUTERS[n][1], id=n)
                                  for n in ("noisy_topk", "aux_free")])
def test_probs_of_the_2017_gate_and_of_the_sigmoid_router(name):
    """The 2017 gate's probs are its sparse G(x) (the kept gates, zero elsewhere) and its
    logits the noisy H(x); DeepSeek-V3's probs are the sigmoid affinities of its logits."""
    rng = np.random.default_rng(2)
    router = ROUTERS[name][0](rng)
    x = rng.standard_normal((9, D))
    r = router(tm.tensor(x))
    if name == "aux_free":
        np.testing.assert_allclose(r.probs.numpy(), 1 / (1 + np.exp(-r.logits.numpy())),
                                   rtol=1e-12)
        return
    G = r.probs.numpy()
    w = r.combine_weight.numpy()
    np.testing.assert_allclose(np.take_along_axis(G, r.expert_index, axis=1), w, rtol=1e-12)
    assert ((G > 0).sum(axis=1) == r.k).all()
    np.testing.assert_allclose(G.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(r.stats["clean_logits"].numpy(), x @ router.W_g.numpy(),
                               rtol=1e-12)
    assert not np.allclose(r.logits.numpy(), r.stats["clean_logits"].numpy())  # H is noisy


@pytest.mark.parametrize("name", [pytest.param(n, marks=ROUTERS[n][1], id=n)
                                  for n in ("top2", "switch", "expert_choice")])
def test_dropped_fraction_counts_tokens_not_choices(name):
    """A tight capacity: some tokens lose every choice (they count), some top-2 tokens lose
    only one (they do not); expert choice leaves tokens that no expert took."""
    rng = np.random.default_rng(3)
    router = ROUTERS[name][0](rng)
    router.capacity_factor = 0.5
    r = router(tm.tensor(rng.standard_normal((40, D))))
    lost_all = ~(r.position >= 0).any(axis=1)
    assert lost_all.any() and not lost_all.all()
    assert r.dropped_fraction == pytest.approx(lost_all.mean())
    if r.k > 1:  # a token that keeps one of its choices is not dropped
        lost_some = (r.position < 0).any(axis=1) & ~lost_all
        assert lost_some.any()
        assert r.dropped_fraction < (r.position < 0).any(axis=1).mean()


# --- the one MoELayer with every router -------------------------------------------------------
@pytest.mark.parametrize("name", each_router())
def test_layer_returns_y_and_the_routers_aux_losses(name):
    build, _, capacity_mode, aux_names, _ = ROUTERS[name]
    rng = np.random.default_rng(4)
    router = build(rng)
    experts = StackedExperts(E, D, 6, dtype=F64, rng=rng)
    experts.b1.data, experts.b2.data = (0.1 * rng.standard_normal(experts.b1.shape),
                                        0.1 * rng.standard_normal(experts.b2.shape))
    layer = MoELayer(router, experts)
    assert layer.router is router and layer.num_experts == E and layer.k == router.k
    x = rng.standard_normal((2, 6, D))
    out = layer(tm.tensor(x))
    assert isinstance(out, tuple) and len(out) == 2
    y, aux = out
    r = layer.last_routing
    assert y.shape == (2, 6, D) and y.dtype == np.float64
    assert aux is r.aux_losses and set(aux) == aux_names  # the layer's aux dict is the router's
    assert (r.capacity is not None) == capacity_mode  # the router picks the dispatch mode
    np.testing.assert_allclose(y.numpy().reshape(12, D), kept_sum(layer, x.reshape(12, D)),
                               rtol=1e-12, atol=1e-12)
    loss = (y * y).sum() + (tm.moe.sum_losses(aux.values()) if aux else 0.0)
    loss.backward()
    assert np.abs(experts.W1.grad).sum() > 0


@pytest.mark.parametrize("name", each_router())
def test_shared_experts_see_every_token_unweighted(name):
    rng = np.random.default_rng(5)
    router = ROUTERS[name][0](rng)
    shared = [tm.nn.FeedForward(D, 3, dtype=F64, rng=rng) for _ in range(2)]
    layer = MoELayer(router, StackedExperts(E, D, 6, dtype=F64, rng=rng), shared=shared)
    assert len(layer.shared) == 2
    x = rng.standard_normal((10, D))
    y, _ = layer(tm.tensor(x))
    want = kept_sum(layer, x) + sum(s(tm.tensor(x)).numpy() for s in shared)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", [pytest.param(n, marks=ROUTERS[n][1], id=n)
                                  for n in ("switch", "topk")])
def test_an_expert_list_of_arbitrary_modules(name):
    """Capacity buffers and sorted rows reach any Modules: a Linear, an FFN, a LayerNorm and
    an MoE layer (its own aux losses are dropped by the outer layer)."""
    rng = np.random.default_rng(6)
    router = ROUTERS[name][0](rng)
    inner = moe_layer(TopKRouter(D, 3, 2, router_dtype="float64", rng=rng), 4, dtype=F64,
                      rng=rng)
    modules = [tm.nn.Linear(D, D, dtype=F64, rng=rng),
               tm.nn.FeedForward(D, 7, "gelu", dtype=F64, rng=rng),
               tm.nn.LayerNorm(D, dtype=F64), inner]
    layer = MoELayer(router, modules)  # a plain list becomes an ExpertList
    assert isinstance(layer.experts, ExpertList) and len(layer.experts) == E
    x = rng.standard_normal((16, D))
    y, aux = layer(tm.tensor(x))
    assert aux is layer.last_routing.aux_losses
    np.testing.assert_allclose(y.numpy(), kept_sum(layer, x), rtol=1e-12, atol=1e-12)
    (y.sum() + tm.moe.sum_losses(aux.values())).backward()
    assert modules[0].weight.grad is not None and inner.router.W_g.grad is not None


@pytest.mark.parametrize("name", [pytest.param(n, marks=ROUTERS[n][1], id=n)
                                  for n in ("switch", "noisy_topk")])
def test_residual_adds_the_input_and_dropped_tokens_leave_unchanged(name):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((24, D))
    outs = {}
    for residual in (False, True):
        gen = np.random.default_rng(8)  # the same router, experts and noise both times
        router = ROUTERS[name][0](gen)
        if name == "switch":
            router.capacity_factor = 0.5  # drop some tokens
        layer = MoELayer(router, StackedExperts(E, D, 6, dtype=F64, rng=gen),
                         residual=residual)
        outs[residual] = layer(tm.tensor(x))[0].numpy(), layer.last_routing
    (y, r), (y_res, r_res) = outs[False], outs[True]
    np.testing.assert_array_equal(r.expert_index, r_res.expert_index)
    np.testing.assert_allclose(y_res, x + y, rtol=1e-12, atol=1e-12)
    dropped = r_res.dropped_tokens
    assert dropped.any() == (name == "switch")
    np.testing.assert_array_equal(y_res[dropped], x[dropped])  # bit for bit


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "expert_choice" else
                                               ROUTERS[n][1], id=n) for n in ROUTERS])
def test_empty_batch(name):  # expert choice picks nothing before its region: none runs
    """T = 0: every layer gives an empty output, zero losses (the z-loss and the balancing
    losses of no tokens are 0, not a mean over nothing) and zero gradients; under expert
    choice every expert picks nothing (one empty slot each)."""
    rng = np.random.default_rng(9)
    router = ROUTERS[name][0](rng)
    layer = MoELayer(router, StackedExperts(E, D, 6, dtype=F64, rng=rng))
    x = tm.tensor(np.zeros((0, D)), requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (0, D)
    assert all(v.item() == 0.0 for v in aux.values())
    (y.sum() + (tm.moe.sum_losses(aux.values()) if aux else 0.0)).backward()
    assert x.grad.shape == (0, D)
    for n, p in layer.named_parameters():
        assert p.grad is None or not p.grad.any(), n  # no token, no gradient
    r = layer.last_routing
    assert r.expert_index.shape == (0, r.k) and r.counts.sum() == 0
    assert r.dropped_fraction == 0.0
    y, _ = layer(tm.tensor(np.zeros((2, 0, D))))
    assert y.shape == (2, 0, D)


def test_the_layer_refuses_what_is_not_a_routing():
    class Wrong(tm.nn.Module):
        d_model, num_experts = D, E

        def forward(self, x):
            return x

    layer = MoELayer(Wrong(), StackedExperts(E, D, 6, rng=0))
    with pytest.raises(TypeError, match="MoELayer: the router returned Tensor, not a Routing"):
        layer(tm.tensor(np.ones((3, D), np.float32)))
