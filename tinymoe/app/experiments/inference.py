"""Inference, measured: an MoE runs at the speed of its active size and needs the memory of
its total size.

Claims (Jiang et al. 2024, §1-2; Fedus et al. 2021, §1): Mixtral 8x7B has 46.7B parameters
but a token uses 12.9B, so it decodes about as fast as a 13B dense model while its weights
take the memory of a 47B one (93.4 GB in bf16; ``tinymoe params --preset mixtral-8x7b``).

Ours: three tiny LMs of one architecture (RMSNorm, SwiGLU, learned positions, untied head;
:func:`~tinymoe.models.transformer.mixtral_config`), with random weights (speed and memory
do not depend on training):

(a) **MoE**: E experts of width ``d_ff`` in every block, top-2 (:func:`mixtral_config`);
(b) **dense, same active**: one SwiGLU FFN of width 2·d_ff per block (a token's FFN work
    in (a));
(c) **dense, same total**: one SwiGLU FFN of width E·d_ff per block (all of (a)'s experts).

Two measurements, each where it is meaningful:

* **Memory**, per model, in a **fresh subprocess** (so one model's arrays cannot inflate
  another's): the process's resident memory after building the model minus before (the
  weights as the OS holds them), and its peak resident memory (``ru_maxrss``) minus the same
  base after a prefill of the largest batch and context and ``new`` decoding steps (adding
  the KV cache, the prefill's activations and temporaries). Not load-sensitive.
* **Speed**, all three models in **one** subprocess (one thread), **interleaved**: for every
  (batch, context) each model prefills a batch of prompts once, then, round after round,
  decodes ``new`` tokens one at a time with a KV cache (:mod:`tinymoe.models.generate`) from
  that prefill, in an order that rotates from round to round. Background load then falls on
  all three alike; we report the median decode tokens per second over the rounds and, for
  the ratios, the median over rounds of the **same round's** ratio (with its smallest and
  largest value).

Beside them: the weights' bytes (float32), the KV cache's bytes and the forward FLOPs per
token of :mod:`tinymoe.params` (at the full context, prompt plus new tokens).

Honest caveats: this is NumPy on a CPU, one thread. An MoE step also sorts tokens by
expert and runs one small matmul per expert (Python loops), overheads that a dense step
does not have and that weigh most at batch 1; and a peak-RSS difference includes NumPy's
temporaries, not only weights and cache.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

MODELS = ("moe", "dense-active", "dense-total")


@dataclass(frozen=True)
class InferenceConfig:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    num_experts: int = 8
    k: int = 2
    d_ff: int = 512
    vocab_size: int = 65
    new_tokens: int = 32
    batches: tuple[int, ...] = (1, 8, 32)
    contexts: tuple[int, ...] = (32, 224)
    repeats: int = 7  # interleaved rounds per (batch, context); medians over them
    seed: int = 0


FAST = InferenceConfig(d_model=192, n_layers=2, d_ff=384, new_tokens=8, batches=(1, 8),
                       contexts=(32,), repeats=3)
MIN_MB = 1e-3  # a denominator floor: a tiny model's pages may all come from freed memory
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1"}


def model_config(name: str, cfg: InferenceConfig) -> Any:
    """The :class:`TransformerConfig` of model ``name`` (one of :data:`MODELS`)."""
    from tinymoe.models.transformer import mixtral_config

    common = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers,
                  n_heads=cfg.n_heads, num_experts=cfg.num_experts,
                  block_size=max(cfg.contexts) + cfg.new_tokens)
    if name == "moe":
        return mixtral_config(d_ff=cfg.d_ff, k=cfg.k, **common)
    width = {"dense-active": cfg.k * cfg.d_ff, "dense-total": cfg.num_experts * cfg.d_ff}
    if name not in width:
        raise ValueError(f"inference: unknown model {name!r}; choose one of {MODELS}")
    return mixtral_config(kind="dense", d_ff=width[name], **common)


def _rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports ru_maxrss in KB)."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20


def _current_rss_mb() -> float:
    """Resident memory now, MB (``/proc/self/statm`` on Linux; the peak elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, AttributeError):
        return _rss_mb()


def _warm_up(name: str, cfg: InferenceConfig) -> None:
    """Import everything and compile the Numba kernels on a tiny model of the same kind."""
    from tinymoe.models.generate import KVCache, forward_cached
    from tinymoe.models.transformer import Transformer

    small = InferenceConfig(**{**asdict(cfg), "d_model": 16, "n_heads": 2, "d_ff": 8,
                               "n_layers": 1})
    warm = Transformer(model_config(name, small), rng=0).eval()
    forward_cached(warm, np.zeros((1, 2), np.int64), KVCache(warm, 1, 2))


def prefill(model: Any, cfg: InferenceConfig, batch: int, context: int,
            rng: np.random.Generator) -> tuple[float, Any, np.ndarray]:
    """Feed ``batch`` random prompts of ``context`` tokens through ``model`` into a fresh KV
    cache: ``(seconds, cache, last logits (B, V))``."""
    from tinymoe.models.generate import KVCache, forward_cached

    ids = rng.integers(0, cfg.vocab_size, (batch, context))  # (B, L)
    cache = KVCache(model, batch, context + cfg.new_tokens)
    t0 = time.perf_counter()
    logits = forward_cached(model, ids, cache)[:, -1].data  # (B, V)
    return time.perf_counter() - t0, cache, logits


def decode(model: Any, cfg: InferenceConfig, cache: Any, logits: np.ndarray, context: int,
           rng: np.random.Generator) -> float:
    """Seconds to decode ``cfg.new_tokens`` tokens greedily, one step at a time, after a
    prefill of ``context`` tokens held in ``cache`` (rewound there first, so that every call
    decodes the same positions; the prefill's keys and values do not change)."""
    from tinymoe.models.generate import forward_cached, sample_next

    cache.length = context
    t0 = time.perf_counter()
    for _ in range(cfg.new_tokens):
        nxt = sample_next(logits, 0.0, rng)[:, None]  # (B, 1) greedy
        logits = forward_cached(model, nxt, cache)[:, -1].data
    return time.perf_counter() - t0


def counts(name: str, cfg: InferenceConfig, model: Any = None) -> dict[str, Any]:
    """What :mod:`tinymoe.params` says of model ``name``: parameters, weight bytes, FLOPs
    per token at the full context (one per context of ``cfg``)."""
    from tinymoe.models.transformer import Transformer
    from tinymoe.params import count_params, flops_per_token

    model = Transformer(model_config(name, cfg), rng=cfg.seed) if model is None else model
    pc = model.params_config()
    c = count_params(pc)
    return {"params_total": model.num_parameters(), "params_active": model.active_parameters(),
            "params_model_total": c.total, "params_model_active": c.active,
            "weights_mb": sum(p.data.nbytes for p in model.parameters()) / 2 ** 20,
            "flops_per_token": {str(ctx): flops_per_token(pc, ctx + cfg.new_tokens)
                                for ctx in cfg.contexts}}


def measure(name: str, cfg: InferenceConfig, batch: int, context: int) -> dict[str, Any]:
    """Build model ``name``, prefill ``batch`` prompts of ``context`` tokens, decode
    ``cfg.new_tokens`` tokens with a KV cache: its parameters, FLOPs, resident and peak
    memory and one timing. Run it in a fresh process (:func:`measure_in_child`) for a
    meaningful memory."""
    from tinymoe.models.transformer import Transformer

    _warm_up(name, cfg)
    base, base_now = _rss_mb(), _current_rss_mb()  # interpreter, NumPy, tinymoe, kernels
    model = Transformer(model_config(name, cfg), rng=cfg.seed).eval()
    built = _current_rss_mb()
    rng = np.random.default_rng(cfg.seed + 1)
    pre, cache, logits = prefill(model, cfg, batch, context, rng)
    dec = decode(model, cfg, cache, logits, context, rng)
    c = counts(name, cfg, model)
    c["flops_per_token"] = c["flops_per_token"].get(str(context)) or counts(
        name, replace(cfg, contexts=(context,)), model)["flops_per_token"][str(context)]
    return {"model": name, "batch": batch, "context": context, **c,
            "kv_cache_mb": cache.nbytes / 2 ** 20,
            "decode_tokens_per_s": batch * cfg.new_tokens / dec,
            "prefill_tokens_per_s": batch * context / pre,
            "rss_base_mb": base, "rss_peak_mb": _rss_mb(),
            "rss_model_mb": built - base_now,  # resident after the build: the weights
            "rss_peak_extra_mb": _rss_mb() - base}  # + prefill activations, cache, temporaries


def speed(cfg: InferenceConfig) -> list[dict[str, Any]]:
    """Decode times of the three models, interleaved round by round in this process: one
    row per (batch, context, model) with every round's seconds (``decode_s``) and the one
    prefill's (``prefill_s``; each model prefills once, every round decodes from there)."""
    from tinymoe.models.transformer import Transformer

    for name in MODELS:
        _warm_up(name, cfg)
    models = {name: Transformer(model_config(name, cfg), rng=cfg.seed).eval()
              for name in MODELS}
    rng = np.random.default_rng(cfg.seed + 1)
    rows = []
    for context in cfg.contexts:
        for batch in cfg.batches:
            state, times = {}, {}
            for name in MODELS:
                pre, cache, logits = prefill(models[name], cfg, batch, context, rng)
                state[name] = (cache, logits)
                times[name] = {"prefill_s": [pre], "decode_s": []}
                decode(models[name], cfg, cache, logits, context, rng)  # untimed warm-up
            for r in range(cfg.repeats):
                for i in range(len(MODELS)):
                    name = MODELS[(r + i) % len(MODELS)]  # the order rotates every round
                    times[name]["decode_s"].append(
                        decode(models[name], cfg, *state[name], context, rng))
            for name in MODELS:
                rows.append({"model": name, "batch": batch, "context": context,
                             "kv_cache_mb": state[name][0].nbytes / 2 ** 20, **times[name]})
            del state
    return rows


def in_child(task: str, cfg: InferenceConfig, **kwargs: Any) -> Any:
    """Run ``measure`` (``task="measure"``) or ``speed`` in a fresh ``python`` process with
    one thread; its result back as JSON."""
    spec = json.dumps({"task": task, "cfg": asdict(cfg), **kwargs})
    out = subprocess.run([sys.executable, "-m", "tinymoe.app.experiments.inference", "--child",
                          spec], capture_output=True, text=True,
                         env=dict(os.environ, **ONE_THREAD), check=False)
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
        if last.startswith("NotImplementedError: "):  # an unsolved exercise: say which
            raise NotImplementedError(last.removeprefix("NotImplementedError: "))
        raise RuntimeError(f"inference: the child process ({task} {kwargs}) failed:\n"
                           f"{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_in_child(name: str, cfg: InferenceConfig, batch: int, context: int
                     ) -> dict[str, Any]:
    """:func:`measure` in a fresh process, one thread."""
    return in_child("measure", cfg, name=name, batch=batch, context=context)


def _child_main(spec: dict[str, Any]) -> Any:
    c = spec.pop("cfg")
    cfg = InferenceConfig(**{**c, "batches": tuple(c["batches"]),
                             "contexts": tuple(c["contexts"])})
    task = spec.pop("task")
    if task == "measure":
        return measure(spec["name"], cfg, spec["batch"], spec["context"])
    if task == "speed":
        return speed(cfg)
    raise ValueError(f"inference: unknown child task {task!r}; 'measure' or 'speed'")


@dataclass
class InferenceResult:
    config: InferenceConfig
    fast: bool
    models: dict[str, dict[str, Any]]  # name -> counts and memory (one fresh process each)
    speed_rows: list[dict[str, Any]]   # (batch, context, model) -> seconds of every round
    seconds: float

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per (model, batch, context): medians of the rounds beside the counts."""
        out = []
        for r in self.speed_rows:
            m = self.models[r["model"]]
            n = self.config.new_tokens
            out.append({**{k: v for k, v in r.items() if not k.endswith("_s")},
                        "params_total": m["params_total"], "params_active": m["params_active"],
                        "flops_per_token": m["flops_per_token"][str(r["context"])],
                        "weights_mb": m["weights_mb"], "rss_model_mb": m["rss_model_mb"],
                        "rss_peak_extra_mb": m["rss_peak_extra_mb"],
                        "decode_tokens_per_s": r["batch"] * n / float(np.median(r["decode_s"])),
                        "prefill_tokens_per_s": r["batch"] * r["context"]
                        / float(np.median(r["prefill_s"]))})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "fast": self.fast, "models": self.models,
                "speed_rows": self.speed_rows, "rows": self.rows, "ratios": ratios(self),
                "seconds": self.seconds}


def from_record(rec: dict[str, Any]) -> InferenceResult:
    """The :class:`InferenceResult` a record (``records.load("inference")``) holds."""
    st = rec["settings"]
    cfg = InferenceConfig(**{**st, "batches": tuple(st["batches"]),
                             "contexts": tuple(st["contexts"])})
    r = rec["results"]
    models = {name: {**r["counts"][name], **r["measured"]["models"][name]}
              for name in r["counts"]}
    return InferenceResult(cfg, "--fast" in rec["command"].split(), models,
                           r["measured"]["rounds"], r["seconds"])


def run(fast: bool = False, config: InferenceConfig | None = None, progress: bool = True
        ) -> InferenceResult:
    """Memory: one fresh process per model, at the largest batch and context. Speed: the
    three models interleaved in one more process."""
    cfg = config or (FAST if fast else InferenceConfig())
    start = time.perf_counter()
    models = {}
    for name in MODELS:
        m = measure_in_child(name, cfg, max(cfg.batches), max(cfg.contexts))
        models[name] = {**counts(name, cfg),
                        **{k: m[k] for k in ("rss_model_mb", "rss_peak_extra_mb")},
                        "peak_at": {"batch": m["batch"], "context": m["context"]}}
        if progress:
            print(f"  memory {name:<13} {m['rss_model_mb']:7.1f} MB after the build, peak "
                  f"+{m['rss_peak_extra_mb']:.1f} MB", file=sys.stderr)
    if progress:
        print(f"  speed: {len(cfg.batches) * len(cfg.contexts)} settings x {cfg.repeats} "
              f"interleaved rounds ...", file=sys.stderr)
    rows = in_child("speed", cfg)
    res = InferenceResult(cfg, fast, models, rows, time.perf_counter() - start)
    if progress:
        for r in res.rows:
            print(f"  {r['model']:<13} B={r['batch']:<3} ctx={r['context']:<4} "
                  f"{r['decode_tokens_per_s']:9.0f} tok/s (median)", file=sys.stderr)
    return res


def _over(a: float, b: float) -> float:
    return a / max(b, MIN_MB)


def ratios(result: InferenceResult) -> list[dict[str, Any]]:
    """Per (batch, context): the MoE's decode speed over each dense model's (the median,
    smallest and largest over rounds of the same round's ratio), its FLOPs per token over
    theirs, and its resident memory after the build over theirs. (No ratio of peaks: the
    peak is a high-water mark that a small model may never raise above the warm-up's.)"""
    out = []
    by = {(r["model"], r["batch"], r["context"]): r for r in result.speed_rows}
    mem = result.models
    for (name, b, ctx), moe in by.items():
        if name != "moe":
            continue
        q: dict[str, Any] = {"batch": b, "context": ctx}
        for other, short in (("dense-active", "active"), ("dense-total", "total")):
            per_round = np.asarray(by[(other, b, ctx)]["decode_s"]) / np.asarray(moe["decode_s"])
            q[f"speed_vs_{short}"] = float(np.median(per_round))
            q[f"speed_vs_{short}_min"] = float(per_round.min())
            q[f"speed_vs_{short}_max"] = float(per_round.max())
            q[f"flops_vs_{short}"] = (mem["moe"]["flops_per_token"][str(ctx)]
                                      / mem[other]["flops_per_token"][str(ctx)])
            q[f"memory_vs_{short}"] = _over(mem["moe"]["rss_model_mb"],
                                            mem[other]["rss_model_mb"])
        out.append(q)
    return out


def format_table(result: InferenceResult) -> str:
    c = result.config
    lines = [f"Inference — {c.n_layers} blocks, d {c.d_model}, MoE: {c.num_experts} SwiGLU "
             f"experts of d_ff {c.d_ff}, top-{c.k}; dense same-active: d_ff {c.k * c.d_ff}; "
             f"dense same-total: d_ff {c.num_experts * c.d_ff}; {c.new_tokens} new tokens "
             f"with a KV cache, median of {c.repeats} interleaved rounds, one thread"
             f"{' (fast)' if result.fast else ''}; {result.seconds:.0f} s", "",
             "| model | params total / active | weights MB | resident after build, MB | "
             "peak (B, context) MB |", "|---|---|---|---|---|"]
    for name, m in result.models.items():
        lines.append(f"| {name} | {m['params_total']:,} / {m['params_active']:,} | "
                     f"{m['weights_mb']:.1f} | {m['rss_model_mb']:.1f} | "
                     f"{m['rss_peak_extra_mb']:.1f} ({m['peak_at']['batch']}, "
                     f"{m['peak_at']['context']}) |")
    lines += ["", "| model | batch | context | FLOPs/token | KV cache MB | decode tok/s | "
              "prefill tok/s |", "|---|---|---|---|---|---|---|"]
    for r in result.rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | "
                     f"{r['flops_per_token'] / 1e6:.2f} M | {r['kv_cache_mb']:.2f} | "
                     f"{r['decode_tokens_per_s']:,.0f} | {r['prefill_tokens_per_s']:,.0f} |")
    lines += ["", ratios_text(result)]
    return "\n".join(lines)


def ratios_text(result: InferenceResult) -> str:
    lines = ["MoE / dense: decode speed (median over rounds of the round's ratio, [min, max]), "
             "FLOPs per token, resident memory after the build",
             "| batch | context | speed / same-active | speed / same-total | FLOPs / "
             "same-active | FLOPs / same-total | memory / same-active | memory / same-total |",
             "|---|---|---|---|---|---|---|---|"]
    for q in ratios(result):
        lines.append(f"| {q['batch']} | {q['context']} | {q['speed_vs_active']:.2f} "
                     f"[{q['speed_vs_active_min']:.2f}, {q['speed_vs_active_max']:.2f}] | "
                     f"{q['speed_vs_total']:.2f} [{q['speed_vs_total_min']:.2f}, "
                     f"{q['speed_vs_total_max']:.2f}] | {q['flops_vs_active']:.2f} | "
                     f"{q['flops_vs_total']:.2f} | {q['memory_vs_active']:.2f} | "
                     f"{q['memory_vs_total']:.2f} |")
    return "\n".join(lines)


def figure(result: InferenceResult) -> Any:
    """Decode speed against resident memory, one point per model and batch size."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ctx = max(r["context"] for r in result.rows)

    for name, marker in zip(MODELS, "os^"):
        rows = [r for r in result.rows if r["model"] == name and r["context"] == ctx]
        ax.plot([r["rss_model_mb"] for r in rows], [r["decode_tokens_per_s"] for r in rows],
                marker, label=name, ms=8)
        for r in rows:
            ax.annotate(f"B={r['batch']}", (r["rss_model_mb"], r["decode_tokens_per_s"]),
                        fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("resident memory after the build - base (MB)")
    ax.set_ylabel("decode tokens / s (median)")
    ax.set_yscale("log")
    ax.set_title(f"context {ctx}: MoE speed vs dense models")
    ax.legend()
    fig.tight_layout()
    return fig


def tour_line(fast: bool = True, progress: bool = False) -> dict[str, Any]:
    res = run(fast=True, progress=progress)
    q = [x for x in ratios(res) if x["batch"] == max(res.config.batches)][0]
    moe = res.models["moe"]
    return {"stage": "8 · MoEs in practice: inference", "paper": "Jiang et al. 2024 (Mixtral)",
            "trained": "none: MoE vs dense (same active / same total), KV-cache decoding",
            "params": f"{moe['params_total']:,} / {moe['params_active']:,}",
            "metric": (f"B={q['batch']}: speed {q['speed_vs_active']:.2f}x same-active, "
                       f"{q['speed_vs_total']:.2f}x same-total; memory "
                       f"{q['memory_vs_active']:.2f}x / {q['memory_vs_total']:.2f}x"),
            "paper_claim": "speed of a 13B model, memory of a 47B one",
            "seconds": res.seconds, "figures": {"inference": lambda: figure(res)}}


def record_result(result: InferenceResult, argv: list[str]) -> Any:
    """Write the run to the records: the counts (compared when CI reruns the fast setting)
    and, under ``measured``, the timings and memory (machine- and load-dependent, recorded
    but never compared)."""
    from tinymoe.app import records

    counted = {name: {k: m[k] for k in ("params_total", "params_active", "params_model_total",
                                        "params_model_active", "weights_mb", "flops_per_token")}
               for name, m in result.models.items()}
    kv = {f"{r['batch']},{r['context']}": r["kv_cache_mb"] for r in result.speed_rows
          if r["model"] == "moe"}
    measured = {"models": {name: {k: m[k] for k in ("rss_model_mb", "rss_peak_extra_mb",
                                                    "peak_at")}
                           for name, m in result.models.items()},
                "rows": [{k: r[k] for k in ("model", "batch", "context", "decode_tokens_per_s",
                                            "prefill_tokens_per_s")} for r in result.rows],
                "rounds": result.speed_rows, "ratios": ratios(result)}
    return records.record("inference", argv=argv, seeds=[result.config.seed],
                          settings=asdict(result.config),
                          results={"seconds": result.seconds, "counts": counted,
                                   "kv_cache_mb": kv, "measured": measured},
                          fast=result.fast)


def main_inference(argv: Sequence[str] | None = None) -> int:
    import argparse

    from tinymoe.app import records

    ap = argparse.ArgumentParser(prog="tinymoe repro inference",
                                 description="MoE vs dense models at inference: decode speed "
                                             "with a KV cache (interleaved rounds, medians) "
                                             "and resident memory")
    ap.add_argument("--fast", action="store_true", help="small models, two batch sizes")
    ap.add_argument("--json", default=None, help="also write the full result as JSON here")
    ap.add_argument("--figure", default=None, help="save the speed/memory figure here")
    records.add_record_argument(ap)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    fast = args.fast or os.environ.get("TINYMOE_FAST") == "1"
    res = run(fast=fast, progress=not args.no_progress)
    print(format_table(res))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res.to_dict(), f, indent=1)
    if args.figure:
        figure(res).savefig(args.figure, dpi=120)
    if args.record:
        print("recorded", record_result(res, ["inference", *(argv or [])]))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(_child_main(json.loads(sys.argv[2]))))
    else:
        raise SystemExit(main_inference())
