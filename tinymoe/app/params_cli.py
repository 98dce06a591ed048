"""``tinymoe params``: the printed explanation of :mod:`tinymoe.params`' counts.

:func:`explain` turns ``count_params`` (and ``flop_terms``) into a table, one row per kind
of matrix, and the two paragraphs on why an MoE's total is not E × the dense model and its
active count not k × the dense model. :func:`main_params` is the command line: a preset
and/or any config field as a flag.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields, replace

from tinymoe.params import (
    BYTES_PER_PARAM,
    PRESET_NOTES,
    PRESETS,
    MoEConfig,
    ParamCount,
    count_params,
    flop_terms,
    get_preset,
    kv_cache_bytes,
    weight_bytes,
)


# --- the explanation ------------------------------------------------------------------

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


def explain(cfg: MoEConfig, name: str | None = None, seq_len: int | None = None,
            batch: int | None = None) -> str:
    """A readable breakdown of ``count_params(cfg)`` and why total and active differ.

    For an MoE (n_experts > 1) it explains why the total is not E × (dense model):
    only the FFNs are replicated; and why k experts per token cost less than k dense
    models: attention, embeddings and norms run once per token. With ``seq_len`` it
    adds ``flops_per_token``; with ``batch`` the memory (:func:`memory_lines`).
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
        matmul, attn = flop_terms(cfg, seq_len)
        lines.append(f"{f'forward FLOPs/token (seq_len {seq_len:,})':<49}"
                     f"{2 * matmul + attn:>18,}   (2 x {_human(matmul)} matmul weights"
                     f" + {_human(attn)} attention)")
    if E > 1:
        lines += [""] + _why_not_product(cfg, c)
    if batch is not None:
        lines += [""] + memory_lines(cfg, seq_len or cfg.n_positions or 4096, batch)
    return "\n".join(lines)


def _bytes(n: float) -> str:
    """93405585408 -> '93.4 GB' (decimal units, as GPU memory is quoted)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def memory_lines(cfg: MoEConfig, seq_len: int, batch: int) -> list[str]:
    """Weights at every dtype (all resident, not only the active ones) and the KV cache."""
    c = count_params(cfg)
    lines = [f"memory: weights (all {_human(c.total)} parameters must be resident; a token "
             f"reads {_human(c.active)})",
             f"{'dtype':<8}{'bytes/param':>12}{'weights':>14}{'active weights':>16}"]
    for dt, b in BYTES_PER_PARAM.items():
        lines.append(f"{dt:<8}{b:>12g}{_bytes(weight_bytes(cfg, dt)):>14}"
                     f"{_bytes(c.active * b):>16}")
    for dt in ("fp32", "bf16"):
        kv = kv_cache_bytes(cfg, seq_len, batch, dt)
        lines.append(f"KV cache {dt}, batch {batch} x {seq_len:,} positions: {_bytes(kv)} "
                     f"({_bytes(kv / (batch * seq_len))} per token)")
    return lines


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
    p.add_argument("--batch", type=int, default=1,
                   help="sequences in the KV cache of the memory table (default 1)")
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
        if args.batch < 1:
            raise ValueError(f"--batch {args.batch}: give at least 1 sequence")
        print(explain(cfg, name=args.preset, seq_len=seq_len, batch=args.batch))
    except ValueError as err:
        print(f"tinymoe params: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_params())
