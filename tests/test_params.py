"""Parameter and FLOP accounting: Mixtral's published numbers and an independent recount."""
import re
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tinymoe.app.params_cli import explain, main_params
from tinymoe.params import (
    PRESETS,
    MoEConfig,
    count_params,
    flops_per_token,
    get_preset,
)

MIXTRAL = PRESETS["mixtral-8x7b"]


# --- Mixtral 8x7B: Mistral's "46.7B total, 12.9B per token", HF MixtralConfig defaults ---

def test_mixtral_total_and_active_exact():
    c = count_params(MIXTRAL)
    assert c.total == 46_702_792_704
    assert c.active == 12_879_925_248
    assert c.active_excluding_embedding == 12_748_853_248  # "12.75B without the lookup"


def test_mixtral_components():
    c = count_params(MIXTRAL)
    assert c.expert == 3 * 4096 * 14336 == 176_160_768
    assert c.attention == 41_943_040
    assert c.router == 32_768
    assert c.norms == 8_192
    assert c.embedding == c.lm_head == 131_072_000
    assert c.final_norm == 4_096
    assert (c.n_moe_layers, c.n_dense_layers) == (32, 0)
    assert c.as_dict()["total"] == c.total


def test_mixtral_8x22b_matches_announced_sizes():
    c = count_params(PRESETS["mixtral-8x22b"])
    assert round(c.total / 1e9) == 141  # Mistral: "141B parameters"
    assert round(c.active / 1e9) == 39  # "39B active"


def test_dense_equivalent_of_mixtral_is_mistral_7b_sized():
    dense = count_params(replace(MIXTRAL, n_experts=1, top_k=1))
    router = 4096  # d·1, the only extra of the one-expert model
    assert dense.total - 32 * router == 7_241_732_096  # 7.24B


def test_flops_mixtral_convention():
    # 2 × matmul weights (active minus embedding lookup and norms) + 4·L·s·H·h
    c = count_params(MIXTRAL)
    matmul = c.active_excluding_embedding - 32 * c.norms - c.final_norm
    s = 4096
    expected = 2 * matmul + 4 * 32 * s * 32 * 128
    assert flops_per_token(MIXTRAL, s) == expected == 27_644_657_664


def test_flops_counts_tied_head_and_grows_with_seq_len():
    cfg = PRESETS["tinymoe-switch-lm"]
    f1, f2 = flops_per_token(cfg, 64), flops_per_token(cfg, 128)
    assert f2 - f1 == 4 * cfg.n_layers * 64 * cfg.n_heads * cfg.head_size
    assert f1 > 2 * cfg.d_model * cfg.vocab_size  # the tied head is still a matmul
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(cfg, 0)


# --- explain ----------------------------------------------------------------------------

def test_explain_mixtral_gives_the_56b_reasoning():
    text = explain(MIXTRAL, name="mixtral-8x7b", seq_len=4096)
    assert "46,702,792,704" in text and "12,879,925,248" in text
    assert "8 x 7B = 56B" in text
    assert "only the FFN blocks are replicated" in text
    assert "shared" in text and "Attention" in text and "embeddings" in text
    assert "2 x 7B = 14B" in text and "12.9B" in text
    assert "FLOPs" in text


def test_explain_top1_and_dense_layers():
    text = explain(PRESETS["tinymoe-switch-lm"])
    assert "dense FFN" in text and "every 2nd" in text
    assert "top-1" in text and "capacity, not compute" in text


def test_explain_single_expert_has_no_moe_paragraph():
    text = explain(replace(MIXTRAL, n_experts=1, top_k=1))
    assert "Why" not in text


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("change, pattern", [
    ({"top_k": 9}, r"top_k=9.*n_experts=8.*top_k <= 8"),
    ({"n_kv_heads": 5}, r"n_kv_heads=5.*n_heads=32"),
    ({"head_dim": None, "n_heads": 3, "n_kv_heads": None}, r"n_heads=3.*d_model=4096"),
    ({"d_ff": 0}, r"d_ff=0.*>= 1"),
    ({"d_model": -4}, r"d_model=-4"),
    ({"n_shared_experts": -1}, r"n_shared_experts=-1.*>= 0"),
    ({"n_layers": 4.0}, r"n_layers=4.0.*integer"),
    ({"ffn_kind": "swish"}, r"ffn_kind='swish'.*relu"),
    ({"norm_kind": "batchnorm"}, r"norm_kind='batchnorm'.*layernorm"),
    ({"moe_every": 33}, r"moe_every=33.*n_layers=32"),
    ({"tie_embeddings": "yes"}, r"tie_embeddings='yes'.*bool"),
])
def test_bad_config_names_field_value_and_fix(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        replace(MIXTRAL, **change)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'mixtral'.*mixtral-8x7b.*tinymoe"):
        get_preset("mixtral")


def test_config_is_frozen():
    with pytest.raises(FrozenInstanceError):
        MIXTRAL.top_k = 1


# --- CLI -------------------------------------------------------------------------------

def test_main_params_preset_and_override(capsys):
    assert main_params(["--preset", "mixtral-8x7b"]) == 0
    assert "46,702,792,704" in capsys.readouterr().out
    assert main_params(["--preset", "mixtral-8x7b", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    one = count_params(replace(MIXTRAL, top_k=1)).active
    assert f"{one:,}" in out


def test_main_params_list_and_fields_only(capsys):
    assert main_params(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)
    argv = ["--vocab-size", "10", "--d-model", "8", "--n-layers", "2", "--n-heads", "2",
            "--d-ff", "16", "--n-experts", "4", "--top-k", "2", "--no-tie-embeddings"]
    assert main_params(argv) == 0
    total = count_params(MoEConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=2, d_ff=16,
                                   n_experts=4, top_k=2)).total
    assert f"{total:,}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, pattern", [
    (["--preset", "nope"], "unknown preset 'nope'.*mixtral-8x7b"),
    (["--preset", "mixtral-8x7b", "--top-k", "9"], "top_k=9"),
    (["--d-model", "8"], "give --preset NAME"),
])
def test_main_params_errors(capsys, argv, pattern):
    assert main_params(argv) == 2
    assert re.search(pattern, capsys.readouterr().err)


# --- an independent recount: enumerate every weight tensor like a state_dict -----------

def _state_dict_shapes(cfg: MoEConfig) -> tuple[list[tuple], list[tuple]]:
    """(all shapes, shapes one token uses). Written from the architecture, not the formula."""
    d, V, h = cfg.d_model, cfg.vocab_size, cfg.head_size
    everything, used = [], []

    def add(shape, active=True):
        everything.append(shape)
        if active:
            used.append(shape)

    def norm():
        add((d,))
        if cfg.norm_kind == "layernorm":
            add((d,))

    def ffn(active):
        names = ["w_gate", "w_up"] if cfg.ffn_kind in ("swiglu", "geglu") else ["w_up"]
        for _ in names:
            add((d, cfg.d_ff), active)
            if cfg.ffn_bias:
                add((cfg.d_ff,), active)
        add((cfg.d_ff, d), active)
        if cfg.ffn_bias:
            add((d,), active)

    add((V, d))
    if cfg.n_positions:
        add((cfg.n_positions, d))
    for i in range(cfg.n_layers):
        norm()
        add((d, cfg.n_heads * h))
        add((d, cfg.kv_heads * h))
        add((d, cfg.kv_heads * h))
        add((cfg.n_heads * h, d))
        norm()
        if (i + 1) % cfg.moe_every:
            ffn(True)
            continue
        add((d, cfg.n_experts))
        if cfg.router_bias:
            add((cfg.n_experts,))
        for e in range(cfg.n_experts):
            ffn(e < cfg.top_k)  # which k experts does not matter for the count
        for _ in range(cfg.n_shared_experts):
            ffn(True)
    norm()
    if not cfg.tie_embeddings:
        add((d, V))
    return everything, used


def _size(shapes):
    return sum(int(np.prod(s)) for s in shapes)


def test_hand_counted_small_config():
    # 3 layers, MoE in layer 1 only; LayerNorm, SwiGLU with biases, GQA, explicit head_dim
    cfg = MoEConfig(vocab_size=11, d_model=6, n_layers=3, n_heads=2, n_kv_heads=1,
                    head_dim=4, d_ff=5, n_experts=4, top_k=2, n_shared_experts=1,
                    moe_every=2, ffn_kind="swiglu", norm_kind="layernorm",
                    router_bias=True, ffn_bias=True, n_positions=7)
    # by hand: ffn = 3·6·5 + 2·5 + 6 = 106; attn = 6·8 + 6·4 + 6·4 + 8·6 = 144
    # layer norms 2·12 = 24; router 6·4 + 4 = 28
    # total = 66 + 42 + 66 + 3·(144 + 24) + 2·106 + (28 + 5·106) + 12 = 1460
    c = count_params(cfg)
    assert c.expert == 106 and c.attention == 144 and c.router == 28
    assert c.total == 1460
    assert c.active == 1460 - 2 * 106  # 2 of the 4 routed experts idle
    assert c.active_excluding_embedding == 1460 - 212 - 66 - 42
    everything, used = _state_dict_shapes(cfg)
    assert (_size(everything), _size(used)) == (c.total, c.active)


@given(
    d=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]), kv_div=st.sampled_from([1, 2, 4]),
    layers=st.integers(1, 5), every=st.integers(1, 3), E=st.integers(1, 5),
    data=st.data(),
)
def test_formula_matches_enumeration(d, heads, kv_div, layers, every, E, data):
    kv = max(heads // kv_div, 1)
    cfg = MoEConfig(
        vocab_size=data.draw(st.integers(1, 20)), d_model=d * heads, n_layers=layers,
        n_heads=heads, n_kv_heads=kv, d_ff=data.draw(st.integers(1, 9)), n_experts=E,
        top_k=data.draw(st.integers(1, E)), n_shared_experts=data.draw(st.integers(0, 2)),
        moe_every=min(every, layers), ffn_kind=data.draw(st.sampled_from(["swiglu", "gelu"])),
        tie_embeddings=data.draw(st.booleans()),
        norm_kind=data.draw(st.sampled_from(["rmsnorm", "layernorm"])),
        router_bias=data.draw(st.booleans()), ffn_bias=data.draw(st.booleans()),
        n_positions=data.draw(st.integers(0, 4)),
    )
    everything, used = _state_dict_shapes(cfg)
    c = count_params(cfg)
    assert (c.total, c.active) == (_size(everything), _size(used))


# --- memory ------------------------------------------------------------------------------

def test_mixtral_weight_memory_at_every_dtype():
    from tinymoe.params import weight_bytes
    total = 46_702_792_704
    assert weight_bytes(MIXTRAL, "bf16") == 2 * total  # 93.4 GB: a 47B model's memory
    assert round(weight_bytes(MIXTRAL, "bf16") / 1e9, 1) == 93.4
    assert weight_bytes(MIXTRAL, "fp32") == 4 * total
    assert weight_bytes(MIXTRAL, "int8") == total
    assert weight_bytes(MIXTRAL, "int4") == total // 2
    with pytest.raises(ValueError, match="dtype='fp8'"):
        weight_bytes(MIXTRAL, "fp8")


def test_kv_cache_bytes_counts_kv_heads_layers_batch_and_context():
    from tinymoe.params import kv_cache_bytes
    # Mixtral: 32 layers x 8 KV heads x 128 = 32,768 numbers for K, as many for V, per token
    assert kv_cache_bytes(MIXTRAL, 1, 1, "bf16") == 2 * 32 * 8 * 128 * 2 == 131_072
    assert kv_cache_bytes(MIXTRAL, 4096, 8, "bf16") == 131_072 * 4096 * 8
    mha = replace(MIXTRAL, n_kv_heads=None)  # 32 KV heads: 4x the cache
    assert kv_cache_bytes(mha, 10, 1) == 4 * kv_cache_bytes(MIXTRAL, 10, 1)
    dense = replace(MIXTRAL, n_experts=1, top_k=1)  # attention is not replicated
    assert kv_cache_bytes(dense, 10, 3) == kv_cache_bytes(MIXTRAL, 10, 3)
    with pytest.raises(ValueError, match="batch=0"):
        kv_cache_bytes(MIXTRAL, 10, 0)


def test_main_params_prints_the_memory_table(capsys):
    assert main_params(["--preset", "mixtral-8x7b", "--seq-len", "32768", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"bf16\s+2\s+93\.4 GB\s+25\.8 GB", out)
    assert re.search(r"int4\s+0\.5\s+23\.4 GB", out)
    assert "KV cache bf16, batch 2 x 32,768 positions: 8.59 GB (131 KB per token)" in out
    assert main_params(["--preset", "mixtral-8x7b", "--batch", "0"]) == 2
