"""The tiny Switch Transformer LM and its dense baseline: layout, equal active FLOPs,
parameter counts against tinymoe.params, the residual pass-through, config checks."""
import math

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.models.switch_lm import (
    Block,
    DenseLM,
    SwitchLMConfig,
    SwitchTransformerLM,
    build_model,
    describe,
)
from tinymoe.moe.capacity_layer import CapacityMoELayer
from tinymoe.params import count_params


def lesson04(f):  # a forward of a Switch model runs the three regions of lesson 04
    return pytest.mark.task4_1(pytest.mark.task4_2(pytest.mark.task4_3(f)))


TINY = SwitchLMConfig(vocab_size=11, block_size=8, d_model=16, n_layers=4, n_heads=2,
                      d_ff=24, num_experts=4)


def test_layout_switch_ffn_every_other_block():
    m = build_model(TINY, rng=0)
    assert isinstance(m, SwitchTransformerLM)
    assert [b.is_moe for b in m.blocks] == [False, True, False, True]
    assert TINY.moe_layer_ids == [1, 3] and len(m.moe_layers) == 2
    d = build_model(TINY.replace(kind="dense"), rng=0)
    assert isinstance(d, DenseLM) and not d.moe_layers and d.router_loss() is None
    assert DenseLM(TINY, rng=0).cfg.kind == "dense"
    with pytest.raises(ValueError, match="DenseLM"):
        SwitchTransformerLM(TINY.replace(kind="dense"))


@pytest.mark.parametrize("kind", ["switch", "top2", "dense"])
def test_parameter_counts_match_tinymoe_params(kind):
    m = build_model(TINY.replace(kind=kind), rng=0)
    pc = count_params(m.params_config())
    attention_biases = 4 * TINY.d_model * TINY.n_layers  # not in tinymoe.params' model
    router_of_one_expert = 2 * TINY.d_model if kind == "dense" else 0
    assert m.num_parameters() == pc.total + attention_biases - router_of_one_expert
    assert m.active_parameters() == pc.active + attention_biases - router_of_one_expert
    assert describe(m) == f"{m.num_parameters():,} / {m.active_parameters():,}"


def test_switch_and_dense_have_the_same_active_flops_up_to_the_router():
    s = build_model(TINY, rng=0)
    d = build_model(TINY.replace(kind="dense"), rng=0)
    router = 2 * TINY.d_model * TINY.num_experts  # two Switch layers of d·E weights
    assert s.active_parameters() - d.active_parameters() == router
    assert s.flops_per_token() - d.flops_per_token() == 2 * router
    extra_experts = 2 * (TINY.num_experts - 1) * s.expert_parameters()  # free in FLOPs
    assert s.num_parameters() - d.num_parameters() == extra_experts + router
    t2 = build_model(TINY.replace(kind="top2"), rng=0)
    assert t2.flops_per_token() - s.flops_per_token() == 2 * 2 * 2 * TINY.d_model * TINY.d_ff


LESSON04 = [pytest.mark.task4_1, pytest.mark.task4_2, pytest.mark.task4_3]


@pytest.mark.parametrize("kind", [pytest.param("switch", marks=LESSON04),
                                  pytest.param("top2", marks=LESSON04), "dense"])
def test_forward_loss_and_gradients(kind):
    rng = np.random.default_rng(0)
    m = build_model(TINY.replace(kind=kind), rng=0)
    ids = rng.integers(0, 11, (3, 9))
    logits = m(ids[:, :-1])
    assert logits.shape == (3, 8, 11) and logits.dtype == np.float32
    total, ce = m.loss(ids[:, :-1], ids[:, 1:])
    assert ce.item() == pytest.approx(math.log(11), abs=0.2)  # small init: near uniform
    if kind == "dense":
        assert total.item() == ce.item()
    else:
        extra = sum(l.aux_loss.item() + l.z_loss.item() for l in m.moe_layers)
        assert total.item() == pytest.approx(ce.item() + extra, rel=1e-5)
        # near-uniform router at init: aux ≈ 1 and z ≈ (ln E)² per layer
        assert extra == pytest.approx(2 * (0.01 * 1.0 + 0.001 * math.log(4) ** 2), rel=0.15)
    total.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and np.isfinite(p.grad).all(), name
    assert m.tok.weight.grad is not None  # tied: the head's gradient lands in the embedding


def test_switch_initialisation_scale():
    m = build_model(TINY.replace(d_model=64, n_heads=4, d_ff=64), rng=0)
    w = m.blocks[0].attn.qkv.weight.numpy()
    std = math.sqrt(0.1 / 64)
    assert np.abs(w).max() <= 2 * std + 1e-7
    assert abs(w.std() / std - 0.88) < 0.05
    e = m.moe_layers[0].experts.W2.numpy()
    assert np.abs(e).max() <= 2 * math.sqrt(0.1 / 64) + 1e-7


@lesson04
def test_a_dropped_token_leaves_the_switch_block_through_the_residual():
    rng = np.random.default_rng(1)
    cfg = TINY.replace(capacity_factor=0.25)
    block = Block(cfg, moe=True, rng=np.random.default_rng(0)).eval()
    block.ffn.gate.router.W_r.data *= 50  # confident, unbalanced routing
    x = tm.tensor(rng.standard_normal((2, 8, 16)).astype(np.float32))
    out = block(x).numpy().reshape(16, 16)
    h = (x + block.attn(block.ln1(x))).numpy().reshape(16, 16)  # after the attention half
    dropped = block.ffn.last_routing.dropped_tokens
    assert dropped.sum() >= 8
    np.testing.assert_array_equal(out[dropped], h[dropped])
    assert not np.allclose(out[~dropped], h[~dropped])


@lesson04
def test_a_few_steps_reduce_the_loss():
    rng = np.random.default_rng(2)
    m = build_model(TINY, rng=0)
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
    assert SwitchLMConfig.from_dict(d) == TINY
    with pytest.raises(ValueError, match="unknown fields"):
        SwitchLMConfig.from_dict({**d, "n_experts": 3})
    with pytest.raises(ValueError, match="divisible"):
        TINY.replace(d_model=15)
    with pytest.raises(ValueError, match="kind"):
        TINY.replace(kind="soft")
    with pytest.raises(ValueError, match="capacity_factor"):
        TINY.replace(capacity_factor=0.0)
    with pytest.raises(ValueError, match="num_experts"):
        TINY.replace(num_experts=0)
    with pytest.raises(ValueError, match="router_dtype"):
        TINY.replace(router_dtype="int8")
    m = build_model(TINY, rng=0)
    with pytest.raises(ValueError, match="block_size=8"):
        m(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(ValueError, match="out of range"):
        m(np.full((1, 3), 11))
    assert isinstance(m.moe_layers[0], CapacityMoELayer)
