"""What experts learn: which characters and contexts each expert of a char LM receives.

Claims: experts of language models specialise on shallow features of the token they see
rather than on topics: Zoph et al. (2022, §7, Table 9) find encoder experts for
punctuation, for verbs, for proper names, for numbers; Jiang et al. (2024, §5) see
Mixtral's routing follow syntax more than domain, with consecutive tokens often sent to
the same expert; Shazeer et al. (2017, Table 9) list experts by the words that reach them.

Ours: the Switch char LM of :mod:`~tinymoe.app.experiments.finetune` (top-1, E experts in
every block) trained on Shakespeare twice from the same start, with the balancing loss
(α = 1e-2) and without it (α = 0). On held-out text, per MoE layer, we count the
characters each expert receives (the character at the token's position) and classes of
them: **space**, **newline**, **punctuation**, **upper-case**, **vowel**, **consonant**,
and the context **word start** (a letter after a space or newline). Reported: each
expert's share of the tokens, its most frequent characters, the class it is most enriched
in (``P(expert | class) / P(expert)``), and per layer how much the current character alone
decides the expert: the mutual information ``I(char; expert)`` over ``H(expert)`` (1: the
character decides it; 0: independent), and the busiest expert's load over the mean. Seeds:
mean ± half-width of the 95 % t-interval; the balancing loss's effect also paired by seed (same
initial weights, same batches).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tinymoe.app.experiments.finetune import FinetuneConfig, evaluate, model_config, train_steps
from tinymoe.autograd import no_grad
from tinymoe.data import CharTokenizer, get_batch, shakespeare, train_val_split
from tinymoe.models.transformer import Transformer

RUNS = {"with balance loss": 1e-2, "no balance loss": 0.0}
PUNCT = set(".,;:!?'-&")


@dataclass(frozen=True)
class ExpertsConfig:
    model: FinetuneConfig = FinetuneConfig()
    steps: int = 400
    eval_batches: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    passage: int = 192  # characters of the coloured passage


FAST = ExpertsConfig(model=FinetuneConfig(d_model=16, n_heads=2, d_ff=32, num_experts=4,
                                          block_size=16, batch_size=8),
                     steps=40, eval_batches=2, seeds=(0,), passage=64)


def char_classes(prev: str, ch: str) -> list[str]:
    """The classes of character ``ch`` preceded by ``prev``."""
    out = []
    if ch == " ":
        out.append("space")
    elif ch == "\n":
        out.append("newline")
    elif ch in PUNCT:
        out.append("punctuation")
    elif ch.isalpha():
        out.append("upper-case" if ch.isupper() else "lower-case")
        out.append("vowel" if ch.lower() in "aeiou" else "consonant")
        if prev in " \n":
            out.append("word start")
    return out


CLASSES = ("space", "newline", "punctuation", "upper-case", "lower-case", "vowel",
           "consonant", "word start")


def routed(model: Transformer, batches: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (N,), experts (n_layers_moe, N))``: every held-out position and the expert
    each MoE layer sent it to (-1: dropped), in evaluation mode."""
    ids, experts = [], []
    model.eval()
    with no_grad():
        for x, _ in batches:
            model(x)
            ids.append(x.reshape(-1))
            per_layer = []
            for layer in model.moe_layers:
                r = layer.last_routing
                e = r.expert_index[:, 0].copy()  # (T,) top-1 choice
                e[~r.kept[:, 0]] = -1
                per_layer.append(e)
            experts.append(np.stack(per_layer))
    model.train()
    return np.concatenate(ids), np.concatenate(experts, axis=1)


def mutual_information(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(I(a; b), H(b))`` in nats from paired integer labels."""
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    p = joint / joint.sum()
    pa, pb = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pa @ pb)[nz])).sum())
    hb = float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return mi, hb


def specialisation(text_ids: np.ndarray, experts: np.ndarray, tok: CharTokenizer,
                   E: int, block_size: int) -> list[dict[str, Any]]:
    """Per MoE layer: each expert's share, top characters, most enriched class; and
    ``I(char; expert) / H(expert)`` over the kept tokens."""
    chars = tok.decode(text_ids)
    prev = [" "] + list(chars[:-1])
    for i in range(0, len(chars), block_size):
        prev[i] = "\n"  # a block starts a new context
    classes = [char_classes(p, c) for p, c in zip(prev, chars)]
    layers = []
    for e in experts:  # (N,) one MoE layer
        kept = e >= 0
        mi, h = mutual_information(text_ids[kept], e[kept])
        rows = []
        for x in range(E):
            mine = e == x
            share = float(mine.mean())
            counts = np.bincount(text_ids[mine], minlength=tok.vocab_size)
            top = [tok.decode([int(i)]) for i in np.argsort(-counts, kind="stable")[:5]
                   if counts[i] > 0]
            enrich = {}
            for cl in CLASSES:
                in_cl = np.array([cl in c for c in classes])
                if in_cl.sum() and share > 0:
                    enrich[cl] = float(mine[in_cl].mean() / share)
            best = max(enrich, key=enrich.get) if enrich else ""
            rows.append({"expert": x, "share": share, "top_chars": top, "class": best,
                         "enrichment": enrich.get(best, 0.0)})
        layers.append({"mi_over_h": mi / h if h > 0 else 0.0, "experts": rows,
                       "max_over_mean": float(max(r["share"] for r in rows) * E)})
    return layers


@dataclass
class ExpertsResult:
    config: ExpertsConfig
    fast: bool
    runs: dict[str, list[dict[str, Any]]]  # run -> one entry per seed
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "fast": self.fast, "runs": self.runs,
                "seconds": self.seconds}


def from_record(rec: dict[str, Any]) -> ExpertsResult:
    """The :class:`ExpertsResult` a record (``records.load("experts")``) holds."""
    st = dict(rec["settings"])
    m = st.pop("model")
    model = FinetuneConfig(**{**m, "seeds": tuple(m["seeds"])})
    cfg = ExpertsConfig(model=model, **{**st, "seeds": tuple(st["seeds"])})
    return ExpertsResult(cfg, "--fast" in rec["command"].split(), rec["results"]["runs"],
                         rec["results"]["seconds"])


def run(fast: bool = False, config: ExpertsConfig | None = None, progress: bool = True
        ) -> ExpertsResult:
    cfg = config or (FAST if fast else ExpertsConfig())
    m = cfg.model
    text = shakespeare()
    tok = CharTokenizer(text)
    train_ids, val_ids = train_val_split(tok.encode(text), 0.1)
    rng = np.random.default_rng(12345)
    batches = [get_batch(val_ids, m.batch_size, m.block_size, rng)
               for _ in range(cfg.eval_batches)]
    passage_ids = val_ids[: cfg.passage]
    start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, alpha in RUNS.items():
        for seed in cfg.seeds:
            t0 = time.perf_counter()
            model = Transformer(model_config("switch", m, tok.vocab_size,
                                             aux_loss_coef=alpha), rng=seed)
            train_steps(model, list(model.parameters()), train_ids, cfg.steps, m.batch_size,
                        m.block_size, m.pretrain_lr, seed + 100, warmup=50)
            ids, experts = routed(model, batches)
            layers = specialisation(ids, experts, tok, m.num_experts, m.block_size)
            p_ids, p_exp = routed(model, [(passage_ids[None, i:i + m.block_size], None)
                                          for i in range(0, len(passage_ids), m.block_size)])
            runs.setdefault(name, []).append({
                "seed": seed, "val_loss": evaluate(model, [(x, y) for x, y in batches]),
                "layers": layers, "passage": tok.decode(p_ids),
                "passage_experts": p_exp.tolist()})
            if progress:
                print(f"  {name:<18} seed {seed}: I(char; expert)/H(expert) per layer "
                      f"{[round(lay['mi_over_h'], 3) for lay in layers]} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return ExpertsResult(cfg, fast, runs, time.perf_counter() - start)


def _ms(values: Sequence[float], fmt: str = ".3f") -> str:
    from tinymoe.app.experiments.finetune import interval

    m, h = interval(values)
    return f"{m:{fmt}}" + (f" ± {h:{fmt[1:] if fmt.startswith('+') else fmt}}" if h else "")


def summary(result: ExpertsResult) -> dict[str, Any]:
    """Per run and layer: ``val_loss``, ``mi_over_h``, ``max_over_mean`` as ``{"mean", "ci95",
    "per_seed"}``; and ``balance_effect``: with the loss minus without, paired by seed."""
    from tinymoe.app.experiments.finetune import interval

    def stat(xs: Sequence[float]) -> dict[str, Any]:
        m, h = interval(xs)
        return {"mean": m, "ci95": h, "per_seed": [float(x) for x in xs]}

    def per_layer(seeds: list[dict[str, Any]], key: str) -> list[list[float]]:
        return [[s["layers"][li][key] for s in seeds] for li in range(len(seeds[0]["layers"]))]

    out: dict[str, Any] = {}
    for name, seeds in result.runs.items():
        out[name] = {"val_loss": stat([s["val_loss"] for s in seeds]),
                     **{k: [stat(v) for v in per_layer(seeds, k)]
                        for k in ("mi_over_h", "max_over_mean")}}
    on, off = (result.runs.get(n) for n in RUNS)
    if on and off:
        out["balance_effect"] = {
            "val_loss": stat([a["val_loss"] - b["val_loss"] for a, b in zip(on, off)]),
            **{k: [stat([x - y for x, y in zip(a, b)])
                   for a, b in zip(per_layer(on, k), per_layer(off, k))]
               for k in ("mi_over_h", "max_over_mean")}}
    return out


def format_table(result: ExpertsResult) -> str:
    c, m = result.config, result.config.model
    lines = [f"What experts learn — Switch char LM ({m.n_layers} blocks, {m.num_experts} "
             f"experts each), {c.steps} steps on Shakespeare, seeds {list(c.seeds)}"
             f"{' (fast)' if result.fast else ''}; {result.seconds:.0f} s", "",
             "| run | val loss | layer | I(char; expert) / H(expert) | max/mean load |",
             "|---|---|---|---|---|"]
    for name, seeds in result.runs.items():
        for li in range(len(seeds[0]["layers"])):
            lines.append(f"| {name} | {_ms([s['val_loss'] for s in seeds])} | {li} | "
                         f"{_ms([s['layers'][li]['mi_over_h'] for s in seeds])} | "
                         f"{_ms([s['layers'][li]['max_over_mean'] for s in seeds])} |")
    eff = summary(result).get("balance_effect")
    if eff:
        lines += ["", "With the balancing loss minus without, paired by seed: val loss "
                  f"{_ms(eff['val_loss']['per_seed'], '+.3f')}; per layer I/H "
                  + ", ".join(_ms(x["per_seed"], "+.3f") for x in eff["mi_over_h"])
                  + "; max/mean load "
                  + ", ".join(_ms(x["per_seed"], "+.2f") for x in eff["max_over_mean"])]
    for name, seeds in result.runs.items():
        s = seeds[0]
        lines += ["", f"{name}, seed {s['seed']}: each expert's share, top characters "
                  f"(⏎ newline, ␣ space) and the class it is most enriched in",
                  "| layer | expert | share | top characters | class (enrichment) |",
                  "|---|---|---|---|---|"]
        for li, layer in enumerate(s["layers"]):
            for r in layer["experts"]:
                top = " ".join(ch.replace("\n", "⏎").replace(" ", "␣")
                               for ch in r["top_chars"])
                lines.append(f"| {li} | {r['expert']} | {100 * r['share']:.1f} % | {top} | "
                             f"{r['class']} ({r['enrichment']:.1f}x) |")
    return "\n".join(lines)


def figure(result: ExpertsResult | dict, layer: int = -1) -> Any:
    """The held-out passage coloured by expert, with and without the balancing loss;
    ``result`` is an :class:`ExpertsResult` or a record (``records.load("experts")``)."""
    import matplotlib.pyplot as plt

    from tinymoe import viz

    if isinstance(result, ExpertsResult):
        runs, E = result.runs, result.config.model.num_experts
    else:
        runs, E = result["results"]["runs"], result["settings"]["model"]["num_experts"]
    names = list(runs)
    fig, axes = plt.subplots(len(names), 1, figsize=(12, 3.2 * len(names)))
    for ax, name in zip(np.atleast_1d(axes), names):
        s = runs[name][0]
        ex = np.asarray(s["passage_experts"])[layer]
        viz.text_by_expert(s["passage"], ex, E, ax=ax,
                           width=64, title=f"{name}: last MoE layer, seed {s['seed']}")
    fig.tight_layout()
    return fig


def main_experts(argv: Sequence[str] | None = None) -> int:
    import argparse

    from tinymoe.app import records

    ap = argparse.ArgumentParser(prog="tinymoe repro experts",
                                 description="Which characters each expert of a Switch "
                                             "char LM receives, with and without the "
                                             "balancing loss")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--figure", default=None)
    records.add_record_argument(ap)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    fast = args.fast or os.environ.get("TINYMOE_FAST") == "1"
    res = run(fast=fast, progress=not args.no_progress)
    print(format_table(res))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res.to_dict(), f, indent=1, ensure_ascii=False)
    if args.figure:
        figure(res).savefig(args.figure, dpi=120, bbox_inches="tight")
    if args.record:
        print("recorded", record_result(res, ["experts", *(argv or [])]))
    return 0


def record_result(result: ExpertsResult, argv: list[str]) -> Any:
    """Write every seed's tables and passage, and the summary over seeds, to the records."""
    from tinymoe.app import records

    return records.record("experts", argv=argv, seeds=list(result.config.seeds),
                          settings=asdict(result.config),
                          results={"seconds": result.seconds, "runs": result.runs,
                                   "summary": summary(result)},
                          fast=result.fast)


if __name__ == "__main__":
    raise SystemExit(main_experts())
