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

Each model runs in a **fresh subprocess** (so one model's arrays cannot inflate another's
peak memory) that builds it, feeds a batch of prompts of ``context`` tokens (the prefill),
then generates ``new`` tokens one at a time with a KV cache
(:func:`~tinymoe.models.generate.generate`). Measured: decode tokens per second
(``B · new / seconds``); the process's resident memory after building the model minus
before (the weights as the OS holds them), and its peak resident memory (``ru_maxrss``)
minus the same base (adding the KV cache, the prefill's activations and temporaries).
Beside them: the weights' bytes (float32), the KV cache's bytes and the forward FLOPs per
token of :mod:`tinymoe.params`.

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
from dataclasses import asdict, dataclass
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
    repeats: int = 2
    seed: int = 0


FAST = InferenceConfig(d_model=192, n_layers=2, d_ff=384, new_tokens=16, batches=(1, 8),
                       contexts=(32,), repeats=1)
MIN_MB = 1e-3  # a denominator floor: a tiny model's pages may all come from freed memory


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


def measure(name: str, cfg: InferenceConfig, batch: int, context: int) -> dict[str, Any]:
    """Build model ``name``, prefill ``batch`` prompts of ``context`` tokens, decode
    ``cfg.new_tokens`` tokens with a KV cache. Run it in a fresh process (:func:`measure_in_child`)
    for a meaningful peak memory."""
    from tinymoe.models.generate import KVCache, forward_cached, sample_next
    from tinymoe.models.transformer import Transformer
    from tinymoe.params import count_params, flops_per_token

    small = InferenceConfig(**{**asdict(cfg), "d_model": 16, "n_heads": 2, "d_ff": 8,
                               "n_layers": 1})
    warm = Transformer(model_config(name, small), rng=0).eval()  # imports, Numba kernels
    forward_cached(warm, np.zeros((1, 2), np.int64), KVCache(warm, 1, 2))
    del warm
    base, base_now = _rss_mb(), _current_rss_mb()  # interpreter, NumPy, tinymoe, kernels
    model = Transformer(model_config(name, cfg), rng=cfg.seed).eval()
    built = _current_rss_mb()
    rng = np.random.default_rng(cfg.seed + 1)
    decode, prefill = [], []
    for _ in range(cfg.repeats):
        ids = rng.integers(0, cfg.vocab_size, (batch, context))
        cache = KVCache(model, batch, context + cfg.new_tokens)
        t0 = time.perf_counter()
        logits = forward_cached(model, ids, cache)[:, -1].data  # (B, V) the prefill
        t1 = time.perf_counter()
        for _ in range(cfg.new_tokens):
            nxt = sample_next(logits, 0.0, rng)[:, None]  # (B, 1) greedy
            logits = forward_cached(model, nxt, cache)[:, -1].data
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        decode.append(t2 - t1)
    pc = model.params_config()
    counts = count_params(pc)
    return {"model": name, "batch": batch, "context": context,
            "params_total": model.num_parameters(), "params_active": model.active_parameters(),
            "params_model_total": counts.total, "params_model_active": counts.active,
            "flops_per_token": flops_per_token(pc, context + cfg.new_tokens),
            "weights_mb": sum(p.data.nbytes for p in model.parameters()) / 2 ** 20,
            "kv_cache_mb": cache.nbytes / 2 ** 20,
            "decode_tokens_per_s": batch * cfg.new_tokens / min(decode),
            "prefill_tokens_per_s": batch * context / min(prefill),
            "rss_base_mb": base, "rss_peak_mb": _rss_mb(),
            "rss_model_mb": built - base_now,  # resident after the build: the weights
            "rss_peak_extra_mb": _rss_mb() - base}  # + prefill activations, cache, temporaries


def measure_in_child(name: str, cfg: InferenceConfig, batch: int, context: int
                     ) -> dict[str, Any]:
    """:func:`measure` in a fresh ``python`` process, one thread, its dict back as JSON."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    spec = json.dumps({"name": name, "cfg": asdict(cfg), "batch": batch, "context": context})
    out = subprocess.run([sys.executable, "-m", "tinymoe.app.experiments.inference", "--child",
                          spec], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
        if last.startswith("NotImplementedError: "):  # an unsolved exercise: say which
            raise NotImplementedError(last.removeprefix("NotImplementedError: "))
        raise RuntimeError(f"inference: the child measuring {name} (batch {batch}, context "
                           f"{context}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass
class InferenceResult:
    config: InferenceConfig
    fast: bool
    rows: list[dict[str, Any]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "fast": self.fast, "rows": self.rows,
                "seconds": self.seconds}


def run(fast: bool = False, config: InferenceConfig | None = None, progress: bool = True
        ) -> InferenceResult:
    cfg = config or (FAST if fast else InferenceConfig())
    start = time.perf_counter()
    rows = []
    for context in cfg.contexts:
        for batch in cfg.batches:
            for name in MODELS:
                rows.append(measure_in_child(name, cfg, batch, context))
                if progress:
                    r = rows[-1]
                    print(f"  {name:<13} B={batch:<3} ctx={context:<4} "
                          f"{r['decode_tokens_per_s']:9.0f} tok/s  "
                          f"{r['rss_model_mb']:7.1f} MB", file=sys.stderr)
    return InferenceResult(cfg, fast, rows, time.perf_counter() - start)


def format_table(result: InferenceResult) -> str:
    c = result.config
    lines = [f"Inference — {c.n_layers} blocks, d {c.d_model}, MoE: {c.num_experts} SwiGLU "
             f"experts of d_ff {c.d_ff}, top-{c.k}; dense same-active: d_ff {c.k * c.d_ff}; "
             f"dense same-total: d_ff {c.num_experts * c.d_ff}; {c.new_tokens} new tokens "
             f"with a KV cache, best of {c.repeats}, one thread"
             f"{' (fast)' if result.fast else ''}; {result.seconds:.0f} s", "",
             "| model | batch | context | params total / active | FLOPs/token | weights MB "
             "| KV cache MB | decode tok/s | resident after build, MB | peak, MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | "
                     f"{r['params_total']:,} / {r['params_active']:,} | "
                     f"{r['flops_per_token'] / 1e6:.2f} M | {r['weights_mb']:.1f} | "
                     f"{r['kv_cache_mb']:.2f} | {r['decode_tokens_per_s']:,.0f} | "
                     f"{r['rss_model_mb']:.1f} | {r['rss_peak_extra_mb']:.1f} |")
    lines += ["", ratios_text(result)]
    return "\n".join(lines)


def ratios(result: InferenceResult) -> list[dict[str, Any]]:
    """Per (batch, context): the MoE's speed and memory over each dense model's."""
    def over(a: float, b: float) -> float:
        return a / max(b, MIN_MB)

    out = []
    by = {(r["model"], r["batch"], r["context"]): r for r in result.rows}
    for (name, b, ctx), moe in by.items():
        if name != "moe":
            continue
        act, tot = by[("dense-active", b, ctx)], by[("dense-total", b, ctx)]
        out.append({"batch": b, "context": ctx,
                    "speed_vs_active": over(moe["decode_tokens_per_s"], act["decode_tokens_per_s"]),
                    "speed_vs_total": over(moe["decode_tokens_per_s"], tot["decode_tokens_per_s"]),
                    "memory_vs_active": over(moe["rss_model_mb"], act["rss_model_mb"]),
                    "memory_vs_total": over(moe["rss_model_mb"], tot["rss_model_mb"]),
                    "peak_vs_active": over(moe["rss_peak_extra_mb"], act["rss_peak_extra_mb"]),
                    "peak_vs_total": over(moe["rss_peak_extra_mb"], tot["rss_peak_extra_mb"])})
    return out


def ratios_text(result: InferenceResult) -> str:
    lines = ["MoE / dense: decode speed (tokens/s), resident memory after the build, peak memory",
             "| batch | context | speed / same-active | speed / same-total | resident / "
             "same-active | resident / same-total | peak / same-active | peak / same-total |",
             "|---|---|---|---|---|---|---|---|"]
    for q in ratios(result):
        lines.append(f"| {q['batch']} | {q['context']} | {q['speed_vs_active']:.2f} | "
                     f"{q['speed_vs_total']:.2f} | {q['memory_vs_active']:.2f} | "
                     f"{q['memory_vs_total']:.2f} | {q['peak_vs_active']:.2f} | "
                     f"{q['peak_vs_total']:.2f} |")
    return "\n".join(lines)


def figure(result: InferenceResult) -> Any:
    """Decode speed against peak memory, one point per model and batch size."""
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
    ax.set_ylabel("decode tokens / s")
    ax.set_yscale("log")
    ax.set_title(f"context {ctx}: MoE speed vs dense models")
    ax.legend()
    fig.tight_layout()
    return fig


def tour_line(fast: bool = True, progress: bool = False) -> dict[str, Any]:
    res = run(fast=True, progress=progress)
    q = [x for x in ratios(res) if x["batch"] == max(res.config.batches)][0]
    moe = res.rows[[r["model"] for r in res.rows].index("moe")]
    return {"stage": "8 · MoEs in practice: inference", "paper": "Jiang et al. 2024 (Mixtral)",
            "trained": "none: MoE vs dense (same active / same total), KV-cache decoding",
            "params": f"{moe['params_total']:,} / {moe['params_active']:,}",
            "metric": (f"B={q['batch']}: speed {q['speed_vs_active']:.2f}x same-active, "
                       f"{q['speed_vs_total']:.2f}x same-total; memory "
                       f"{q['memory_vs_active']:.2f}x / {q['memory_vs_total']:.2f}x"),
            "paper_claim": "speed of a 13B model, memory of a 47B one",
            "seconds": res.seconds, "figures": {"inference": lambda: figure(res)}}


def main_inference(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="tinymoe repro inference",
                                 description="MoE vs dense models at inference: decode speed "
                                             "with a KV cache and peak memory")
    ap.add_argument("--fast", action="store_true", help="small models, two batch sizes")
    ap.add_argument("--json", default=None, help="also write the full result as JSON here")
    ap.add_argument("--figure", default=None, help="save the speed/memory figure here")
    ap.add_argument("--record", action="store_true",
                    help="write the run to tinymoe/data/records/ (tinymoe.app.records)")
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
        save_record("inference", ["inference", *(["--fast"] if fast else [])], [res.config.seed],
                    asdict(res.config), {"rows": res.rows, "ratios": ratios(res)}, fast)
    return 0


def save_record(name: str, argv: list[str], seeds: list[int], settings: dict,
                results: dict, fast: bool) -> None:
    """``tinymoe.app.records.record(...)`` when that module is installed."""
    try:
        from tinymoe.app.records import record
    except ImportError:
        print(f"--record: tinymoe.app.records is not on this branch; the results are in "
              f"--json instead ({name})", file=sys.stderr)
        return
    path = record(name, argv=argv, seeds=seeds, settings=settings, results=results, fast=fast)
    print(f"recorded: {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        c = spec["cfg"]
        c["batches"], c["contexts"] = tuple(c["batches"]), tuple(c["contexts"])
        print(json.dumps(measure(spec["name"], InferenceConfig(**c), spec["batch"],
                                 spec["context"])))
    else:
        raise SystemExit(main_inference())
