"""The one transformer LM: layout, every FFN kind, the aux losses a forward returns, equal
active FLOPs, parameter counts against tinymoe.params, the residual pass-through, config
checks."""
import math

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.models import Block, Transformer, TransformerConfig, describe, total_aux_loss
from tinymoe.moe import MoELayer, TopKRouter, moe_layer
from tinymoe.params import count_params

LESSON04 = [pytest.mark.task4_1, pytest.mark.task4_2, pytest.mark.task4_3]


def lesson04(f):  # a forward of a Switch model runs the three regions of lesson 04
    return pytest.mark.task4_1(pytest.mark.task4_2(pytest.mark.task4_3(f)))


def gate_train(f):  # the noisy gate in training mode runs the three regions of lesson 03
    return pytest.mark.task3_1(pytest.mark.task3_2(pytest.mark.task3_3(f)))


TINY = TransformerConfig(vocab_size=11, block_size=8, d_model=16, n_layers=4, n_heads=2,
                         d_ff=24, num_experts=4)
CHAR = TransformerConfig(vocab_size=11, block_size=8, d_model=8, n_heads=2, n_layers=2,
                         num_experts=4, k=2, d_ff=8, kind="noisy_topk", w_importance=0.1,
                         w_load=0.1, moe_every=1, activation="relu", init="lecun",
                         tie_embeddings=False)


def test_layout_moe_ffn_every_other_block():
    m = Transformer(TINY, rng=0)
    assert [b.is_moe for b in m.blocks] == [False, True, False, True]
    assert TINY.moe_layer_ids == [1, 3] and len(m.moe_layers) == 2
    assert all(isinstance(layer, MoELayer) and layer.k == 1 for layer in m.moe_layers)
    assert all(isinstance(b.ffn, tm.nn.FeedForward) for b in m.blocks if not b.is_moe)
    d = Transformer(TINY.replace(kind="dense"), rng=0)
    assert not d.moe_layers and d.cfg.k == 1
    assert all(isinstance(b.ffn, tm.nn.FeedForward) for b in d.blocks)
    every = Transformer(TINY.replace(kind="top2", moe_every=1), rng=0)
    assert [layer.k for layer in every.moe_layers] == [2, 2, 2, 2]


@pytest.mark.parametrize("kind", ["switch", "top2", "dense"])
def test_parameter_counts_match_tinymoe_params(kind):
    m = Transformer(TINY.replace(kind=kind), rng=0)
    pc = count_params(m.params_config())
    attention_biases = 4 * TINY.d_model * TINY.n_layers  # not in tinymoe.params' model
    router_of_one_expert = 2 * TINY.d_model if kind == "dense" else 0
    assert m.num_parameters() == pc.total + attention_biases - router_of_one_expert
    assert m.active_parameters() == pc.active + attention_biases - router_of_one_expert
    assert describe(m) == f"{m.num_parameters():,} / {m.active_parameters():,}"


def test_switch_and_dense_have_the_same_active_flops_up_to_the_router():
    s = Transformer(TINY, rng=0)
    d = Transformer(TINY.replace(kind="dense"), rng=0)
    router = 2 * TINY.d_model * TINY.num_experts  # two Switch layers of d·E weights
    assert s.active_parameters() - d.active_parameters() == router
    assert s.flops_per_token() - d.flops_per_token() == 2 * router
    extra_experts = 2 * (TINY.num_experts - 1) * s.expert_parameters()  # free in FLOPs
    assert s.num_parameters() - d.num_parameters() == extra_experts + router
    t2 = Transformer(TINY.replace(kind="top2"), rng=0)
    assert t2.flops_per_token() - s.flops_per_token() == 2 * 2 * 2 * TINY.d_model * TINY.d_ff


@pytest.mark.parametrize("kind", [pytest.param("switch", marks=LESSON04),
                                  pytest.param("top2", marks=LESSON04), "dense"])
def test_forward_returns_the_aux_losses_and_the_loss_adds_them(kind):
    rng = np.random.default_rng(0)
    m = Transformer(TINY.replace(kind=kind), rng=0)
    ids = rng.integers(0, 11, (3, 9))
    assert m(ids[:, :-1]).shape == (3, 8, 11)  # without return_aux: the logits alone
    logits, aux = m(ids[:, :-1], return_aux=True)
    assert logits.shape == (3, 8, 11) and logits.dtype == np.float32
    assert all(a is layer.last_routing.aux_losses for a, layer in zip(aux, m.moe_layers))
    total, ce = m.loss(ids[:, :-1], ids[:, 1:])  # a new forward: new jitter and routing
    aux = [layer.last_routing.aux_losses for layer in m.moe_layers]  # that forward's
    assert ce.item() == pytest.approx(math.log(11), abs=0.2)  # small init: near uniform
    if kind == "dense":
        assert aux == [] and total is ce
    else:
        assert len(aux) == 2 and all(set(a) == {"balance", "z"} for a in aux)
        extra = sum(v.item() for a in aux for v in a.values())
        assert total.item() == pytest.approx(ce.item() + extra, rel=1e-5)
        assert total_aux_loss(aux).item() == pytest.approx(extra, rel=1e-6)
        # near-uniform router at init: balance ≈ 1 and z ≈ (ln E)² per layer
        assert extra == pytest.approx(2 * (0.01 * 1.0 + 0.001 * math.log(4) ** 2), rel=0.15)
        r = m.moe_layers[0].last_routing  # what the layer decided, for inspection
        assert r.stats["balance_loss"].item() == pytest.approx(aux[0]["balance"].item() / 0.01)
    total.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and np.isfinite(p.grad).all(), name
    assert m.tok.weight.grad is not None  # tied: the head's gradient lands in the embedding


@lesson04
def test_aux_losses_belong_to_their_forward():
    """Two forwards, two sets of losses: nothing is kept on the layers between calls."""
    m = Transformer(TINY, rng=0).eval()
    rng = np.random.default_rng(1)
    a = m(rng.integers(0, 11, (2, 8)), return_aux=True)[1]
    b = m(rng.integers(0, 11, (5, 3)), return_aux=True)[1]
    assert a[0]["balance"] is not b[0]["balance"]
    assert a[0]["balance"].item() != b[0]["balance"].item()
    assert not any(hasattr(layer, name) for layer in m.moe_layers
                   for name in ("aux_loss", "router_loss"))
    assert total_aux_loss([]) is None and total_aux_loss([{}, {}]) is None


def test_total_aux_loss_sums_each_layer_then_the_layers():
    a, b, c = (tm.tensor(np.float32(v)) for v in (0.1, 0.2, 0.7))
    total = total_aux_loss([{"balance": a, "z": b}, {}, {"balance": c}])
    want = np.stack([np.float32(0.1) + np.float32(0.2), np.float32(0.7)]).sum()
    assert total.item() == want  # per layer in dict order, then over the layers


@gate_train
def test_the_2017_char_lm_adds_each_layers_balancing_loss():
    model = Transformer(CHAR, rng=0)
    assert all(layer.router.w_importance == 0.1 for layer in model.moe_layers)
    ids = np.random.default_rng(0).integers(0, 11, size=(3, 8))
    total, ce = model.loss(ids, ids)
    assert total.item() == pytest.approx(ce.item() + sum(
        layer.last_routing.aux_losses["balance"].item() for layer in model.moe_layers),
        rel=1e-5)  # the losses of the loss's own forward (the gate noise differs per call)
    total.backward()
    _, aux = model(ids, return_aux=True)
    assert [set(a) for a in aux] == [{"balance"}, {"balance"}]
    assert model(ids).shape == (3, 8, 11) and len(model.moe_layers) == 2
    assert all(p.grad is not None for p in model.parameters())
    assert isinstance(model.head, tm.nn.Linear)  # untied: a Linear head
    with pytest.raises(ValueError, match="block_size=8"):
        model(np.zeros((1, 9), np.int64))


@pytest.mark.task6_1  # the TopKRouter's gates
def test_a_custom_moe_layer_from_make_moe():
    built = []

    def make_moe(cfg, rng):
        router = TopKRouter(cfg.d_model, cfg.num_experts, cfg.k, aux_loss_coef=0.5, rng=rng)
        built.append(moe_layer(router, cfg.d_ff, num_shared=1, rng=rng))
        return built[-1]

    cfg = CHAR.replace(kind="custom", k=2)
    m = Transformer(cfg, rng=0, make_moe=make_moe)
    assert m.moe_layers == built and len(built) == 2
    ids = np.random.default_rng(3).integers(0, 11, (2, 8))
    total, ce = m.loss(ids, ids)
    assert total.item() == pytest.approx(ce.item() + sum(
        layer.last_routing.aux_losses["balance"].item() for layer in built), rel=1e-5)
    # one shared FFN is active too; the routed experts: k = 2 of 4
    unused = 2 * 2 * (2 * cfg.d_model * cfg.d_ff + cfg.d_ff + cfg.d_model)
    assert m.active_parameters() == m.num_parameters() - unused
    with pytest.raises(ValueError, match="make_moe"):
        Transformer(cfg, rng=0)
    with pytest.raises(ValueError, match="make_moe"):
        Transformer(TINY, rng=0, make_moe=make_moe)


def test_the_same_seed_builds_the_same_weights():
    for cfg in (TINY, TINY.replace(kind="top2"), CHAR):
        a, b = Transformer(cfg, rng=7).state_dict(), Transformer(cfg, rng=7).state_dict()
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_switch_initialisation_scale():
    m = Transformer(TINY.replace(d_model=64, n_heads=4, d_ff=64), rng=0)
    w = m.blocks[0].attn.qkv.weight.numpy()
    std = math.sqrt(0.1 / 64)
    assert np.abs(w).max() <= 2 * std + 1e-7
    assert abs(w.std() / std - 0.88) < 0.05  # a normal truncated at 2σ has std 0.88σ
    e = m.moe_layers[0].experts.W2.numpy()
    assert np.abs(e).max() <= 2 * math.sqrt(0.1 / 64) + 1e-7
    lecun = Transformer(TINY.replace(d_model=64, n_heads=4, d_ff=64, init="lecun"), rng=0)
    assert np.abs(lecun.blocks[0].attn.qkv.weight.numpy()).max() > 2 * std  # not truncated
    assert lecun.tok.weight.numpy().std() == pytest.approx(0.1, rel=0.1)


@lesson04
def test_a_dropped_token_leaves_the_switch_block_through_the_residual():
    rng = np.random.default_rng(1)
    cfg = TINY.replace(capacity_factor=0.25)
    block = Block(cfg, moe=True, rng=np.random.default_rng(0)).eval()
    block.ffn.router.W_r.data *= 50  # confident, unbalanced routing
    x = tm.tensor(rng.standard_normal((2, 8, 16)).astype(np.float32))
    out, aux = block(x)
    out = out.numpy().reshape(16, 16)
    assert set(aux) == {"balance", "z"}
    h = (x + block.attn(block.ln1(x))).numpy().reshape(16, 16)  # after the attention half
    dropped = block.ffn.last_routing.dropped_tokens
    assert dropped.sum() >= 8
    np.testing.assert_array_equal(out[dropped], h[dropped])
    assert not np.allclose(out[~dropped], h[~dropped])


@lesson04
def test_a_few_steps_reduce_the_loss():
    rng = np.random.default_rng(2)
    m = Transformer(TINY, rng=0)
    opt = tm.optim.AdamW(m.parameters(), lr=1e-2)
    ids = rng.integers(0, 11, (4, 9))
    first = None
    for _ in range(15):
        total, ce = m.loss(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        total.backward()
        opt.step()
        first = ce.item() if first is None else first
    assert ce.item() < first - 0.3


def test_config_round_trip_and_checks():
    d = TINY.to_dict()
    assert TransformerConfig.from_dict(d) == TINY
    assert d["k"] == 1 and d["dtype"] == "float32"  # resolved, plain JSON
    assert TINY.replace(kind="top2").k == 2 and TINY.replace(kind="top2").replace(
        kind="switch").k == 1
    assert TransformerConfig(dtype=np.float64).dtype == "float64"
    with pytest.raises(ValueError, match="unknown fields"):
        TransformerConfig.from_dict({**d, "n_experts": 3})
    with pytest.raises(ValueError, match="divisible"):
        TINY.replace(d_model=15)
    with pytest.raises(ValueError, match="kind"):
        TINY.replace(kind="soft")
    with pytest.raises(ValueError, match="leave k unset"):
        TINY.replace(k=2)
    with pytest.raises(ValueError, match="k=5"):
        CHAR.replace(k=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        TINY.replace(capacity_factor=0.0)
    with pytest.raises(ValueError, match="num_experts"):
        TINY.replace(num_experts=0)
    with pytest.raises(ValueError, match="router_dtype"):
        TINY.replace(router_dtype="int8")
    with pytest.raises(ValueError, match="init"):
        TINY.replace(init="xavier")
    with pytest.raises(ValueError, match="activation"):
        TINY.replace(activation="tanh")
    with pytest.raises(ValueError, match="jitter"):
        TINY.replace(jitter=1.0)
    m = Transformer(TINY, rng=0)
    with pytest.raises(ValueError, match="block_size=8"):
        m(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(ValueError, match="out of range"):
        m(np.full((1, 3), 11))


def test_a_config_saved_before_the_new_fields_still_loads():
    """A checkpoint's config from before ``k``, ``init`` and the 2017 settings existed."""
    old = {k: v for k, v in TINY.to_dict().items()
           if k not in ("k", "w_importance", "w_load", "noisy_gating", "init")}
    assert TransformerConfig.from_dict(old) == TINY
