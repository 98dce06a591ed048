"""Parameter and FLOP accounting for decoder-only Mixture-of-Experts transformers.

Why is Mixtral "8x7B" 46.7B parameters and not 56B? Why does a token use 12.9B, not 14B?
This module answers by counting every matrix of a config, the way a checkpoint would.

The model counted (pre-norm, decoder-only, no attention biases)::

    x = embed[token] (+ pos[t])                          V·d (+ n_positions·d)
    for each of L layers:
        x = x + Attn(Norm(x))     q, o: d·(H·h)   k, v: d·(H_kv·h)   each
        x = x + FFN(Norm(x))      dense FFN, or an MoE layer: router d·E (+E)
                                  + E routed experts + S shared experts
    logits = Norm(x) @ W_head                            d·V (0 extra when tied)

One FFN ("expert") has m matrices of d·d_ff: m = 3 for SwiGLU (gate, up, down),
m = 2 for ReLU/GELU (up, down); with ``ffn_bias`` it adds d_ff (per input matrix) + d.
A norm has d parameters (RMSNorm: scale) or 2d (LayerNorm: scale and bias).

Layer ``i`` (0-based) has an MoE FFN when ``(i + 1) % moe_every == 0`` (every n-th layer,
counting from 1, as in Switch's "experts every other layer"); the others have a dense FFN
of the same size. So ``n_moe_layers = n_layers // moe_every``.

Active parameters are the ones one token touches: everything except the routed experts
it did not pick, ``active = total - n_moe_layers·(E - k)·expert``. The embedding row
lookup is counted as active (this is how Mistral's "12.9B per token" is computed);
``active_excluding_embedding`` removes the embedding tables.

Memory: :func:`weight_bytes` (all the weights at fp32/bf16/int8/int4) and
:func:`kv_cache_bytes` (keys and values of a context, per batch).

The arithmetic only; :mod:`tinymoe.app.params_cli` prints it (``tinymoe params``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

FFN_MATRICES: dict[str, int] = {"swiglu": 3, "geglu": 3, "relu": 2, "gelu": 2}
NORM_PARAMS_PER_FEATURE: dict[str, int] = {"rmsnorm": 1, "layernorm": 2}


def _fail(field: str, value: object, why: str, fix: str) -> None:
    raise ValueError(f"MoEConfig.{field}={value!r}: {why}; {fix}")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Shape of a decoder-only MoE transformer (all fields keyword-only).

    ``n_kv_heads=None`` means ``n_heads`` (multi-head attention); fewer KV heads is
    grouped-query attention. ``head_dim=None`` means ``d_model // n_heads``.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int
    n_experts: int
    top_k: int
    n_shared_experts: int = 0
    moe_every: int = 1
    ffn_kind: str = "swiglu"
    tie_embeddings: bool = False
    norm_kind: str = "rmsnorm"
    router_bias: bool = False
    ffn_bias: bool = False
    n_positions: int = 0  # learned absolute position table; 0 = none (e.g. rotary)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "n_experts",
                    "top_k", "moe_every")
        for name in positive + ("n_kv_heads", "head_dim", "n_shared_experts", "n_positions"):
            value = getattr(self, name)
            if value is None and name in ("n_kv_heads", "head_dim"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                _fail(name, value, "must be an integer", f"pass an int, e.g. {name}=8")
            lowest = 1 if name in positive + ("n_kv_heads", "head_dim") else 0
            if value < lowest:
                _fail(name, value, f"must be >= {lowest}", f"pass a size >= {lowest}")
        for name in ("tie_embeddings", "router_bias", "ffn_bias"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be a bool", "pass True or False")
        if self.ffn_kind not in FFN_MATRICES:
            _fail("ffn_kind", self.ffn_kind, "unknown FFN kind",
                  f"use one of {sorted(FFN_MATRICES)}")
        if self.norm_kind not in NORM_PARAMS_PER_FEATURE:
            _fail("norm_kind", self.norm_kind, "unknown norm kind",
                  f"use one of {sorted(NORM_PARAMS_PER_FEATURE)}")
        if self.top_k > self.n_experts:
            _fail("top_k", self.top_k, f"a token cannot pick more than n_experts="
                  f"{self.n_experts} experts", f"use top_k <= {self.n_experts}")
        if self.n_heads % self.kv_heads:
            _fail("n_kv_heads", self.n_kv_heads, f"does not divide n_heads={self.n_heads} "
                  "(each KV head serves n_heads/n_kv_heads query heads)",
                  "use a divisor of n_heads, e.g. n_kv_heads=" + str(_divisor(self.n_heads)))
        if self.head_dim is None and self.d_model % self.n_heads:
            _fail("n_heads", self.n_heads, f"does not divide d_model={self.d_model}",
                  "choose n_heads dividing d_model, or give head_dim explicitly")
        if self.moe_every > self.n_layers:
            _fail("moe_every", self.moe_every, f"leaves no MoE layer among n_layers="
                  f"{self.n_layers}", f"use moe_every <= {self.n_layers}")

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_heads`` when ``n_kv_heads`` is None)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        """Per-head dimension h (``d_model // n_heads`` when ``head_dim`` is None)."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers // self.moe_every

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (0-based) is MoE when (i + 1) % moe_every == 0."""
        return (i + 1) % self.moe_every == 0


def _divisor(n: int) -> int:
    """Largest proper divisor of n that is at most n // 2 (1 for primes)."""
    return max(d for d in range(1, max(n // 2, 1) + 1) if n % d == 0)


@dataclass(frozen=True)
class ParamCount:
    """Breakdown of a config's parameters. Per-layer fields are for ONE layer."""

    embedding: int           # token table V·d
    position_embedding: int  # n_positions·d (0 with rotary/none)
    lm_head: int             # d·V, 0 when tied to the embedding
    attention: int           # per layer: d·(H·h)·2 + d·(H_kv·h)·2
    norms: int               # per layer: 2 norms
    router: int              # per MoE layer: d·E (+E)
    expert: int              # one FFN: m·d·d_ff (+ biases)
    experts: int             # per MoE layer: E·expert (routed)
    shared_experts: int      # per MoE layer: S·expert
    dense_ffn: int           # per dense layer: one FFN
    final_norm: int
    n_moe_layers: int
    n_dense_layers: int
    total: int
    active: int
    active_excluding_embedding: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _ffn_params(cfg: MoEConfig) -> int:
    """One FFN: m·d·d_ff weights, plus (m - 1)·d_ff + d biases if ffn_bias."""
    m = FFN_MATRICES[cfg.ffn_kind]
    bias = (m - 1) * cfg.d_ff + cfg.d_model if cfg.ffn_bias else 0
    return m * cfg.d_model * cfg.d_ff + bias


def count_params(cfg: MoEConfig) -> ParamCount:
    """Count every parameter of ``cfg``; see the module docstring for the model.

    total  = V·d + n_pos·d + [d·V] + L·(attn + norms) + L_moe·(router + (E + S)·expert)
             + L_dense·expert + final_norm
    active = total - L_moe·(E - k)·expert
    """
    d, h = cfg.d_model, cfg.head_size
    embedding = cfg.vocab_size * d
    position = cfg.n_positions * d
    lm_head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    attention = 2 * d * cfg.n_heads * h + 2 * d * cfg.kv_heads * h  # q, o + k, v
    norm = NORM_PARAMS_PER_FEATURE[cfg.norm_kind] * d
    router = d * cfg.n_experts + (cfg.n_experts if cfg.router_bias else 0)
    expert = _ffn_params(cfg)
    n_moe = cfg.n_moe_layers
    n_dense = cfg.n_layers - n_moe
    total = (embedding + position + lm_head + cfg.n_layers * (attention + 2 * norm)
             + n_moe * (router + (cfg.n_experts + cfg.n_shared_experts) * expert)
             + n_dense * expert + norm)
    active = total - n_moe * (cfg.n_experts - cfg.top_k) * expert
    return ParamCount(
        embedding=embedding, position_embedding=position, lm_head=lm_head,
        attention=attention, norms=2 * norm, router=router, expert=expert,
        experts=cfg.n_experts * expert, shared_experts=cfg.n_shared_experts * expert,
        dense_ffn=expert, final_norm=norm, n_moe_layers=n_moe, n_dense_layers=n_dense,
        total=total, active=active,
        active_excluding_embedding=active - embedding - position,
    )


def flop_terms(cfg: MoEConfig, seq_len: int) -> tuple[int, int]:
    """(N_matmul, attention FLOPs per token): the two terms of :func:`flops_per_token`.

    N_matmul = the weights one token is multiplied by; attention = 4·L·seq_len·H·h,
    the QKᵀ and A·V FLOPs over a full context.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
        raise ValueError(f"flops_per_token: seq_len={seq_len!r} must be an int >= 1; "
                         "pass the context length, e.g. seq_len=2048")
    m = FFN_MATRICES[cfg.ffn_kind]
    d, h, n_moe = cfg.d_model, cfg.head_size, cfg.n_moe_layers
    ffn_w = m * d * cfg.d_ff  # weights only: bias adds are not matmul FLOPs
    attn_w = 2 * d * cfg.n_heads * h + 2 * d * cfg.kv_heads * h
    matmul = (cfg.n_layers * attn_w
              + n_moe * (d * cfg.n_experts + (cfg.top_k + cfg.n_shared_experts) * ffn_w)
              + (cfg.n_layers - n_moe) * ffn_w
              + d * cfg.vocab_size)  # LM head, a matmul even when tied
    attention = 4 * cfg.n_layers * seq_len * cfg.n_heads * h  # QK^T and A·V, 2 FLOPs/MAC
    return matmul, attention


def flops_per_token(cfg: MoEConfig, seq_len: int) -> int:
    """Forward FLOPs per token, the Kaplan/Chinchilla convention (1 multiply-add = 2 FLOPs).

    flops = 2·N_matmul + 4·L·seq_len·H·h

    N_matmul = the active weights a token is multiplied by: attention q,k,v,o, router,
    the k routed + S shared experts (or the dense FFN), and the LM head (counted even
    when tied). Embedding lookups, norms, biases, softmax and activations are ignored
    (lower order). The attention term is QKᵀ plus A·V over a full context of
    ``seq_len`` keys (no causal discount; causal masking averages about half of it).
    Training costs about 3× this (forward + 2× backward).
    """
    matmul, attention = flop_terms(cfg, seq_len)
    return 2 * matmul + attention


# --- memory ---------------------------------------------------------------------------

BYTES_PER_PARAM: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}


def _bytes_per(dtype: str, where: str) -> float:
    if dtype not in BYTES_PER_PARAM:
        raise ValueError(f"{where}: dtype={dtype!r}; choose one of {list(BYTES_PER_PARAM)}")
    return BYTES_PER_PARAM[dtype]


def weight_bytes(cfg: MoEConfig, dtype: str = "bf16") -> int:
    """Bytes to hold **all** the weights (``count_params(cfg).total``) at ``dtype``:
    fp32 4, bf16 2, int8 1, int4 0.5 bytes per parameter (rounded up; quantisation scales
    not counted). Every expert must be resident although a token uses k of them: Mixtral
    8x7B in bf16 is 46.7B × 2 ≈ 93.4 GB, the memory of a 47B dense model."""
    return math.ceil(count_params(cfg).total * _bytes_per(dtype, "weight_bytes"))


def kv_cache_bytes(cfg: MoEConfig, seq_len: int, batch: int = 1, dtype: str = "bf16") -> int:
    """Bytes of the KV cache for ``batch`` sequences of ``seq_len`` positions:

        2 (K and V) · n_layers · batch · seq_len · H_kv · h · bytes

    The same for an MoE and its dense twin: attention is not replicated. Grouped-query
    attention (H_kv < H) shrinks it by H / H_kv."""
    for name, v in (("seq_len", seq_len), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"kv_cache_bytes: {name}={v!r} must be an int >= 1")
    per_token = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_size
    return math.ceil(per_token * batch * seq_len * _bytes_per(dtype, "kv_cache_bytes"))


# --- presets ------------------------------------------------------------------------

PRESETS: dict[str, MoEConfig] = {
    "mixtral-8x7b": MoEConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        head_dim=128, d_ff=14336, n_experts=8, top_k=2, ffn_kind="swiglu",
        tie_embeddings=False, norm_kind="rmsnorm"),
    "mixtral-8x22b": MoEConfig(
        vocab_size=32000, d_model=6144, n_layers=56, n_heads=48, n_kv_heads=8,
        head_dim=128, d_ff=16384, n_experts=8, top_k=2, ffn_kind="swiglu",
        tie_embeddings=False, norm_kind="rmsnorm"),
    "switch-base-8-like": MoEConfig(
        vocab_size=32128, d_model=768, n_layers=12, n_heads=12, head_dim=64, d_ff=3072,
        n_experts=8, top_k=1, moe_every=2, ffn_kind="relu", tie_embeddings=True,
        norm_kind="rmsnorm"),
    "tinymoe-switch-lm": MoEConfig(
        vocab_size=65, d_model=128, n_layers=4, n_heads=4, d_ff=512, n_experts=8,
        top_k=1, moe_every=2, ffn_kind="gelu", tie_embeddings=True,
        norm_kind="layernorm", n_positions=128),
}

PRESET_NOTES: dict[str, str] = {
    "mixtral-8x7b": "Mixtral 8x7B, HF MixtralConfig defaults (vocab 32000, d 4096, FFN 14336, "
                    "32 layers, 32/8 heads); Mistral quotes 46.7B total, 12.9B active",
    "mixtral-8x22b": "Mixtral 8x22B v0.1 (HF config.json: d 6144, FFN 16384, 56 layers, "
                     "48/8 heads, vocab 32000); Mistral quotes 141B total, 39B active",
    "switch-base-8-like": "a decoder-only stack with google/switch-base-8's layer sizes "
                          "(the real checkpoint is encoder-decoder, so it is larger)",
    "tinymoe-switch-lm": "the small Switch LM trained in the lessons (character vocab, "
                         "experts every other layer, top-1)",
}


def get_preset(name: str) -> MoEConfig:
    """The preset config called ``name``; ValueError listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"get_preset: unknown preset {name!r}; valid presets: "
                         f"{', '.join(PRESETS)}")
    return PRESETS[name]
