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
"""
from __future__ import annotations

import argparse
import numbers
import sys
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields, replace

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


def _flop_terms(cfg: MoEConfig, seq_len: int) -> tuple[int, int]:
    """(matmul weights one token multiplies by, attention score+value FLOPs per token)."""
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
    matmul, attention = _flop_terms(cfg, seq_len)
    return 2 * matmul + attention


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
    "mixtral-8x7b": "Mixtral 8x7B, HF MixtralConfig defaults (reference §6.2): "
                    "46.7B total, 12.9B active",
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


# --- explanation ----------------------------------------------------------------------

def _human(n: float) -> str:
    """46702792704 -> '46.7B' (3 significant figures)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _rounded_product(e: int, n: float) -> str:
    """The name-style product: (8, 7.24e9) -> '8 x 7B = 56B'; exact below a billion."""
    if n >= 1e9:
        r = round(n / 1e9)
        return f"{e} x {r}B = {e * r}B"
    return f"{e} x {_human(n)} = {_human(e * n)}"


def _ordinal(n: int) -> str:
    """2 -> '2nd', 4 -> '4th'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _row(name: str, per_layer: int | None, layers: int | None, total: int,
         active: int) -> str:
    per = "-" if per_layer is None else f"{per_layer:,}"
    lay = "-" if layers is None else str(layers)
    return f"{name:<26}{per:>16}{lay:>7}{total:>18,}{active:>18,}"


def explain(cfg: MoEConfig, name: str | None = None, seq_len: int | None = None) -> str:
    """A readable breakdown of ``count_params(cfg)`` and why total and active differ.

    For an MoE (n_experts > 1) it explains why the total is not E × (dense model):
    only the FFNs are replicated; and why k experts per token cost less than k dense
    models: attention, embeddings and norms run once per token. With ``seq_len`` it
    adds ``flops_per_token``.
    """
    c = count_params(cfg)
    L, E, k, S = cfg.n_layers, cfg.n_experts, cfg.top_k, cfg.n_shared_experts
    n_moe, n_dense = c.n_moe_layers, c.n_dense_layers
    kv = f"{cfg.n_heads} heads" + (f" / {cfg.kv_heads} KV heads" if cfg.kv_heads != cfg.n_heads
                                   else "")
    head = f"config {name}" if name else "config"
    moe_layers = ("all MoE" if cfg.moe_every == 1
                  else f"{n_moe} MoE: every {_ordinal(cfg.moe_every)}")
    lines = [
        f"{head}: vocab {cfg.vocab_size:,}, d_model {cfg.d_model:,}, {L} layers "
        f"({moe_layers}), {kv} x {cfg.head_size}, "
        f"FFN {cfg.ffn_kind} d_ff {cfg.d_ff:,}, {E} experts top-{k}"
        + (f" + {S} shared" if S else "")
        + f", {'tied' if cfg.tie_embeddings else 'untied'} embeddings, {cfg.norm_kind}",
        "",
        f"{'component':<26}{'per layer':>16}{'layers':>7}{'total':>18}{'active':>18}",
        _row("token embedding", None, None, c.embedding, c.embedding),
    ]
    if c.position_embedding:
        lines.append(_row("position embedding", None, None, c.position_embedding,
                          c.position_embedding))
    lines.append(_row("lm_head" + (" (tied: 0)" if cfg.tie_embeddings else ""), None, None,
                      c.lm_head, c.lm_head))
    lines.append(_row("attention q,k,v,o", c.attention, L, L * c.attention, L * c.attention))
    lines.append(_row("norms (2 per layer)", c.norms, L, L * c.norms, L * c.norms))
    lines.append(_row("router", c.router, n_moe, n_moe * c.router, n_moe * c.router))
    lines.append(_row(f"routed experts ({E})", c.experts, n_moe, n_moe * c.experts,
                      n_moe * k * c.expert))
    lines.append(_row(f"  one expert ({cfg.ffn_kind})", c.expert, None, c.expert, c.expert))
    if S:
        lines.append(_row(f"shared experts ({S})", c.shared_experts, n_moe,
                          n_moe * c.shared_experts, n_moe * c.shared_experts))
    if n_dense:
        lines.append(_row("dense FFN", c.dense_ffn, n_dense, n_dense * c.dense_ffn,
                          n_dense * c.dense_ffn))
    lines.append(_row("final norm", None, None, c.final_norm, c.final_norm))
    lines += [
        "-" * 85,
        f"{'total':<49}{c.total:>18,}   ({_human(c.total)})",
        f"{f'active per token (top-{k} of {E})':<49}{c.active:>18,}   ({_human(c.active)})",
        (f"{'active excluding embedding':<49}{c.active_excluding_embedding:>18,}"
         f"   ({_human(c.active_excluding_embedding)})"),
    ]
    if seq_len is not None:
        matmul, attn = _flop_terms(cfg, seq_len)
        lines.append(f"{f'forward FLOPs/token (seq_len {seq_len:,})':<49}"
                     f"{2 * matmul + attn:>18,}   (2 x {_human(matmul)} matmul weights"
                     f" + {_human(attn)} attention)")
    if E > 1:
        lines += [""] + _why_not_product(cfg, c)
    return "\n".join(lines)


def _why_not_product(cfg: MoEConfig, c: ParamCount) -> list[str]:
    """The two paragraphs: total vs E × dense, and active vs k × dense."""
    E, k, n_moe = cfg.n_experts, cfg.top_k, c.n_moe_layers
    stack = n_moe * c.expert                      # one expert's FFNs over all MoE layers
    shared = c.total - n_moe * c.experts          # everything that is not a routed expert
    dense = shared - n_moe * c.router + stack     # same model, one FFN per layer, no router
    attention = cfg.n_layers * c.attention
    embeddings = c.embedding + c.position_embedding + c.lm_head
    norms = cfg.n_layers * c.norms + c.final_norm
    idle = n_moe * (E - k) * c.expert
    extras = "routers" + (", shared experts" if c.shared_experts else "") \
        + (", dense FFNs" if c.n_dense_layers else "")
    where = " of the MoE layers" if c.n_dense_layers else ""
    return [
        f"Why is it not {E} x the dense model ({_rounded_product(E, dense)})?",
        (f"  The same network with one FFN per layer and no router has {_human(dense)} "
         f"parameters; {E} copies would be {_human(E * dense)}."),
        (f"  But only the FFN blocks{where} are replicated. Attention ({_human(attention)}), "
         f"embeddings and LM head ({_human(embeddings)}) and norms ({_human(norms)}) exist "
         "once, shared by all experts."),
        (f"  total = shared {_human(shared)} + {E} x {_human(stack)} (one expert's FFNs over "
         f"{n_moe} layers) = {_human(c.total)}; the shared part is "
         f"{_human(attention + embeddings + norms)} of attention/embeddings/norms plus "
         f"{extras}."),
        "",
    ] + (_why_active_top1 if k == 1 else _why_active)(c, E, k, shared, stack, dense, idle)


def _why_active(c: ParamCount, E: int, k: int, shared: int, stack: int, dense: int,
                idle: int) -> list[str]:
    """k > 1: the active count is below k × dense because the shared part runs once."""
    return [
        (f"Why do {k} experts per token cost {_human(c.active)}, not {k} x the dense model "
         f"({_rounded_product(k, dense)}; exactly {k} x {_human(dense)} = "
         f"{_human(k * dense)})?"),
        (f"  A token runs the shared part once ({_human(shared)}) and {k} of {E} expert FFNs "
         f"in each MoE layer ({k} x {_human(stack)} = {_human(k * stack)})."),
        (f"  {k} x the dense model would count attention and embeddings {k} times. The other "
         f"{E - k} experts per layer ({_human(idle)}) are stored but idle for that token."),
    ]


def _why_active_top1(c: ParamCount, E: int, k: int, shared: int, stack: int, dense: int,
                     idle: int) -> list[str]:
    """k = 1: a token costs about one dense model while E FFNs are stored."""
    return [
        f"Why does a token cost {_human(c.active)} when the model stores {_human(c.total)}?",
        (f"  With top-1 a token runs the shared part ({_human(shared)}) and one expert FFN "
         f"per MoE layer ({_human(stack)}): about the dense model ({_human(dense)}) plus "
         "routers."),
        f"  The other {E - 1} experts per layer ({_human(idle)}) add capacity, not compute.",
    ]


# --- command line ---------------------------------------------------------------------

def _field_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinymoe params",
        description="Count the parameters and FLOPs of an MoE transformer config.")
    p.add_argument("--preset", help="start from a preset (see --list)")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--seq-len", type=int, default=None,
                   help="context length for FLOPs (default: n_positions, else 4096)")
    for f in fields(MoEConfig):
        flag = "--" + f.name.replace("_", "-")
        if "bool" in str(f.type):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif "str" in str(f.type):
            p.add_argument(flag, default=None)
        else:
            p.add_argument(flag, type=int, default=None)
    return p


def main_params(argv: Sequence[str] | None = None) -> int:
    """``tinymoe params``: print ``explain`` for a preset and/or individual fields.

    Returns 0 on success, 2 on a bad config (the message names field, value and fix).
    """
    args = _field_parser().parse_args(argv)
    if args.list:
        width = max(map(len, PRESETS))
        for name in PRESETS:
            print(f"{name:<{width}}  {PRESET_NOTES.get(name, '')}")
        return 0
    overrides = {f.name: getattr(args, f.name) for f in fields(MoEConfig)
                 if getattr(args, f.name) is not None}
    try:
        if args.preset is not None:
            cfg = replace(get_preset(args.preset), **overrides)
        else:
            required = [f.name for f in fields(MoEConfig)
                        if f.default is MISSING and f.name not in overrides]
            if required:
                raise ValueError("give --preset NAME (see --list) or all of "
                                 + ", ".join("--" + r.replace("_", "-") for r in required))
            cfg = MoEConfig(**overrides)
        seq_len = args.seq_len or cfg.n_positions or 4096
        print(explain(cfg, name=args.preset, seq_len=seq_len))
    except ValueError as err:
        print(f"tinymoe params: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_params())
