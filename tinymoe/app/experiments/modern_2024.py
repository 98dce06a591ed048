"""Modern routers side by side: who balances the experts, and at what price.

Claims, at scale:

1. **Mixtral** (Jiang et al. 2024, §2.1) routes each token to the top 2 of 8 experts with a
   softmax renormalised over the two, dropping nothing. The paper describes no balancing
   loss; the one in common use is Hugging Face's ``load_balancing_loss_func`` (coefficient
   0.001 on a loss whose uniform value is k, off by default: ``output_router_logits=False``).
   We test whether top-k routing keeps its experts in use without such a loss.
2. **Expert choice** (Zhou et al. 2022): experts pick their top-C tokens, so every expert is
   exactly full by construction, no balancing loss; ">2x faster convergence" than Switch and
   GShard top-2. Caveat: a token's routing depends on the other tokens of the batch (in a
   language model, on future tokens too), so it does not suit autoregressive decoding.
3. **DeepSeekMoE** (Dai et al. 2024): fine-grained experts (each of N experts split into m
   smaller ones, mK of them active) plus K_s shared experts every token uses.
4. **Auxiliary-loss-free balancing** (Wang et al. 2024; DeepSeek-V3): a per-expert bias
   added to the affinities for the top-k selection only, nudged by γ after every batch
   towards the mean load; balance "without the interference gradients" of an auxiliary loss.

Ours: the character-level Shakespeare LM of the 2017 stage (a
:class:`~tinymoe.models.Transformer` with one attention block whose feed-forward is a
:class:`~tinymoe.moe.layer.MoELayer` with the run's router), trained from the same weights
on the same batches with each router; every run has the same active FFN width per token (2
experts of ``d_ff``, or 4 half-width ones) and the same expert weight matrices in total (16
half-width experts have 8 more output biases and the router 7 more columns: 1-2 % more
parameters).
Measured on fixed held-out batches: validation cross-entropy (nats per character),
**max/mean load** (the busiest expert's (token, choice) count over the mean; 1 is perfect
balance; Wang et al.'s MaxVio is this minus 1) and, for expert choice, the share of tokens
no expert took.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from tinymoe.autograd import no_grad
from tinymoe.data import CharTokenizer, shakespeare
from tinymoe.app import records
from tinymoe.app.experiments.char_lm_runs import (char_lm_config, held_out_batches, is_fast,
                                                  repro_parser, shakespeare_data,
                                                  train_char_lm)
from tinymoe.models.transformer import Transformer, TransformerConfig
from tinymoe.moe.aux_free import SEQ_AUX_LOSS_COEF, AuxFreeRouter
from tinymoe.moe.balance import max_over_mean
from tinymoe.moe.expert_choice import ExpertChoiceRouter
from tinymoe.moe.layer import MoELayer, moe_layer
from tinymoe.moe.topk_router import TopKRouter

# name -> how the run's MoE differs from "top-2 + loss"
RUNS: dict[str, dict[str, Any]] = {
    "top-2, no loss": {"router": "topk", "aux_loss_coef": 0.0},
    "top-2 + loss": {"router": "topk", "aux_loss_coef": 1e-2},
    "top-2, bias (loss-free)": {"router": "aux_free"},  # DeepSeek-V3: γ 1e-3 + α 1e-4 loss
    # the matched pair: the same sigmoid gate, balanced by a loss alone or by the bias alone
    "sigmoid top-2 + loss": {"router": "aux_free", "bias_update_speed": 0.0,
                             "seq_aux_loss_coef": 1e-2},
    "sigmoid top-2, bias only": {"router": "aux_free", "seq_aux_loss_coef": 0.0},
    "expert choice": {"router": "expert_choice"},
    "shared + fine-grained": {"router": "topk", "aux_loss_coef": 1e-2, "num_shared": 1,
                              "segments": 2, "normalize": False},  # DeepSeekMoE: raw gates
}
TOUR_RUNS = ("top-2, no loss", "top-2 + loss", "top-2, bias (loss-free)", "expert choice")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on besides its router."""

    steps: int = 1000
    batch_size: int = 16
    block_size: int = 64
    d_model: int = 64
    n_heads: int = 4
    num_experts: int = 8
    k: int = 2
    d_ff: int = 64
    bias_update_speed: float = 1e-3   # γ of the loss-free bias (DeepSeek-V3: 0.001)
    ec_capacity_factor: float = 2.0   # expert choice: experts per token on average
    lr: float = 3e-3
    warmup: int = 50
    clip: float = 1.0
    seed: int = 0
    eval_batches: int = 8
    log_every: int = 25


FAST = TrainConfig(steps=40, batch_size=8, block_size=32, d_model=32, d_ff=32, warmup=10,
                   eval_batches=2, log_every=10)
# The tour trains few steps, so the bias moves faster than DeepSeek-V3's 0.001 per step.
TOUR = TrainConfig(steps=200, batch_size=16, block_size=32, d_model=32, d_ff=32, warmup=20,
                   bias_update_speed=1e-2, eval_batches=4, log_every=10)


@dataclass
class RunResult:
    name: str
    val_loss: float
    max_over_mean: float           # busiest expert / mean, held-out batches (routed experts)
    unrouted: float                # share of held-out tokens that reached no routed expert
    final_fraction: list[float]    # (E,) share of the (token, choice) pairs per expert
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    load_history: list[list[int]] = field(default_factory=list)  # (logged steps, E)
    seconds: float = 0.0


@dataclass
class ModernResult:
    config: TrainConfig
    fast: bool
    runs: list[RunResult]
    seconds: float

    def run(self, name: str) -> RunResult:
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(f"ModernResult: no run {name!r}; have {[r.name for r in self.runs]}")

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "fast": self.fast, "seconds": self.seconds,
                "runs": [asdict(r) for r in self.runs]}


def make_moe(name: str, cfg: TrainConfig):
    """A ``make_moe(lm_cfg, rng)`` for the :class:`~tinymoe.models.Transformer` that builds
    run ``name``'s MoE layer."""
    spec = RUNS[name]

    def build(lm: TransformerConfig, rng: np.random.Generator) -> MoELayer:
        m = spec.get("segments", 1)  # DeepSeekMoE's fine-grained segmentation
        E, d_ff = cfg.num_experts * m - spec.get("num_shared", 0), cfg.d_ff // m
        k = cfg.k * m - spec.get("num_shared", 0)
        if spec["router"] == "topk":
            router = TopKRouter(lm.d_model, E, k, normalize=spec.get("normalize", True),
                                aux_loss_coef=spec["aux_loss_coef"], rng=rng)
        elif spec["router"] == "aux_free":
            router = AuxFreeRouter(
                lm.d_model, E, k, rng=rng,
                bias_update_speed=spec.get("bias_update_speed", cfg.bias_update_speed),
                seq_aux_loss_coef=spec.get("seq_aux_loss_coef", SEQ_AUX_LOSS_COEF))
        else:
            router = ExpertChoiceRouter(lm.d_model, E, capacity_factor=cfg.ec_capacity_factor,
                                        rng=rng)
        return moe_layer(router, d_ff, num_shared=spec.get("num_shared", 0), rng=rng)

    return build


def build_model(name: str, cfg: TrainConfig, vocab_size: int) -> Transformer:
    """The char LM with run ``name``'s MoE layer; the same ``cfg.seed``, the same weights."""
    return Transformer(char_lm_config(vocab_size, cfg, kind="custom"), rng=cfg.seed,
                       make_moe=make_moe(name, cfg))


def routed_stats(model: Transformer, batches: Sequence[tuple[np.ndarray, np.ndarray]]
                 ) -> dict[str, Any]:
    """Validation loss, max/mean load and unrouted share on ``batches`` (eval mode)."""
    model.eval()
    losses, ratios, unrouted, counts = [], [], [], 0
    with no_grad():
        for x, y in batches:
            losses.append(model.loss(x, y)[1].item())
            r = model.moe_layers[0].last_routing
            load = r.counts  # (E,) (token, choice) pairs per expert
            ratios.append(max_over_mean(load))
            unrouted.append(r.dropped_fraction)  # tokens that reached no routed expert
            counts = counts + load
    model.train()
    frac = np.asarray(counts, dtype=float) / max(float(np.sum(counts)), 1.0)
    return {"val_loss": float(np.mean(losses)), "max_over_mean": float(np.mean(ratios)),
            "unrouted": float(np.mean(unrouted)), "final_fraction": frac.tolist()}


def train_run(name: str, cfg: TrainConfig, data: tuple, progress: bool = False) -> RunResult:
    """Train one named run of :data:`RUNS` and measure it."""
    tok, train_ids, val_ids = data
    model = build_model(name, cfg, tok.vocab_size)
    res = RunResult(name, 0.0, 0.0, 0.0, [])
    start = time.perf_counter()

    def log(step: int, ce: float) -> None:
        res.steps.append(step)
        res.train_loss.append(ce)
        res.load_history.append(model.moe_layers[0].last_routing.counts.tolist())

    train_char_lm(model, cfg, train_ids, desc=name, progress=progress, on_log=log)
    for key, value in routed_stats(model, held_out_batches(val_ids, cfg)).items():
        setattr(res, key, value)
    res.seconds = time.perf_counter() - start
    return res


def run(fast: bool = False, steps: int | None = None, progress: bool = True,
        runs: Sequence[str] = tuple(RUNS), config: TrainConfig | None = None,
        seed: int | None = None) -> ModernResult:
    """Train every run from the same start on the same batches."""
    cfg = config or (FAST if fast else TrainConfig())
    if steps is not None:
        if steps < 1:
            raise ValueError(f"modern_2024.run: steps={steps} must be >= 1")
        cfg = TrainConfig(**{**asdict(cfg), "steps": int(steps)})
    if seed is not None:
        cfg = TrainConfig(**{**asdict(cfg), "seed": int(seed)})
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise ValueError(f"modern_2024.run: unknown runs {unknown}; choose from {list(RUNS)}")
    data = shakespeare_data()
    start = time.perf_counter()
    results = [train_run(name, cfg, data, progress) for name in runs]
    return ModernResult(cfg, fast, results, time.perf_counter() - start)


def format_table(result: ModernResult) -> str:
    c = result.config
    lines = [f"Modern routers — char-level Shakespeare LM, {c.num_experts} experts of d_ff "
             f"{c.d_ff}, top-{c.k} (or the same active width), {c.steps} steps of "
             f"{c.batch_size}x{c.block_size} characters, seed {c.seed}"
             f"{' (fast)' if result.fast else ''}; {result.seconds:.0f} s", "",
             "| run | val loss (nats/char) | max/mean load | tokens with no expert | s |",
             "|---|---|---|---|---|"]
    for r in result.runs:
        lines.append(f"| {r.name} | {r.val_loss:.3f} | {r.max_over_mean:.2f} | "
                     f"{100 * r.unrouted:.1f} % | {r.seconds:.0f} |")
    return "\n".join(lines)


def format_summary(results: Sequence[ModernResult]) -> str:
    """Mean and 95 % interval over the seeds, and the matched loss-vs-bias difference."""
    s = summarize(results)
    lines = [f"Over seeds {[res.config.seed for res in results]}: mean ± 95 % t-interval",
             "", "| run | val loss | max/mean load |", "|---|---|---|"]
    for name, row in s["runs"].items():
        lines.append(f"| {name} | {row['val_loss']['mean']:.3f} ± {row['val_loss']['ci95']:.3f}"
                     f" | {row['max_over_mean']['mean']:.2f} ± "
                     f"{row['max_over_mean']['ci95']:.2f} |")
    if "matched_bias_minus_loss" in s:
        m = s["matched_bias_minus_loss"]
        lines += ["", f"matched (same sigmoid gate), bias only minus loss only: val loss "
                      f"{m['val_loss']['mean']:+.3f} ± {m['val_loss']['ci95']:.3f}, max/mean "
                      f"load {m['max_over_mean']['mean']:+.2f} ± "
                      f"{m['max_over_mean']['ci95']:.2f}"]
    return "\n".join(lines)


def figure_load(result: ModernResult) -> Any:
    """Share of the (token, choice) pairs per expert over training, one panel per run."""
    import matplotlib.pyplot as plt

    from tinymoe import viz

    shown = [r for r in result.runs if r.name in TOUR_RUNS[:3]] or result.runs[:3]
    fig, axes = plt.subplots(1, len(shown), figsize=(5 * len(shown), 3.6), sharey=True)
    plt.close(fig)
    for ax, r in zip(np.atleast_1d(axes), shown):
        viz.expert_load(np.asarray(r.load_history), steps=r.steps, kind="stack", ax=ax,
                        title=r.name)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    return fig


def tour_line(fast: bool = True, progress: bool = False) -> dict[str, Any]:
    """One line for ``tinymoe tour``: four routers on the small LM (``tinymoe repro modern``
    runs all five, longer)."""
    cfg = TOUR if fast else TrainConfig(steps=300)
    result = run(config=cfg, fast=fast, progress=progress, runs=TOUR_RUNS)
    model = build_model("top-2 + loss", cfg, CharTokenizer(shakespeare()).vocab_size)
    params = model.num_parameters()
    expert_params = sum(p.size for n, p in model.named_parameters() if ".experts." in n)
    active = params - expert_params + expert_params * cfg.k // cfg.num_experts
    r = {x.name: x for x in result.runs}
    mm = ", ".join(f"{n} {r[n].max_over_mean:.2f}" for n in TOUR_RUNS)
    vl = " / ".join(f"{r[n].val_loss:.2f}" for n in TOUR_RUNS)
    return {
        "stage": "6 · modern routers",
        "paper": "Mixtral 2024, Zhou et al. 2022, DeepSeek 2024",
        "trained": f"char LM, {cfg.num_experts} FFN experts, top-{cfg.k} softmax with and "
                   f"without a balancing loss, loss-free bias, expert choice; {cfg.steps} steps",
        "params": f"{params:,} / {active:,}",
        "metric": f"max/mean load: {mm}; val loss {vl} nats/char; expert choice left "
                  f"{100 * r['expert choice'].unrouted:.0f} % of tokens without an expert",
        "paper_claim": "a bias alone balances as well as a loss (Wang et al. 2024); expert "
                       "choice is balanced by construction and converges >2x faster",
        "figures": {"modern_2024_load": lambda: figure_load(result)},
    }


MATCHED = ("sigmoid top-2 + loss", "sigmoid top-2, bias only")  # (loss, bias), same gate


def summarize(results: Sequence[ModernResult]) -> dict[str, Any]:
    """Per run over the seeds: mean, sample sd, 95 % t-interval half-width, min and max of
    the validation loss and of max/mean load; and the matched bias-minus-loss differences
    per seed (paired: the same seed gives both runs the same weights and batches)."""
    from tinymoe.app.render import ci95

    out: dict[str, Any] = {"runs": {}}
    for name in [r.name for r in results[0].runs]:
        row = {}
        for key in ("val_loss", "max_over_mean", "unrouted"):
            xs = [res.run(name).__dict__[key] for res in results]
            row[key] = {"mean": float(np.mean(xs)), "min": float(min(xs)),
                        "max": float(max(xs)),
                        "ci95": ci95(xs) if len(xs) > 1 else "n/a (one seed)"}
        out["runs"][name] = row
    names = [r.name for r in results[0].runs]
    if all(n in names for n in MATCHED):
        loss, bias = MATCHED
        d = {key: [res.run(bias).__dict__[key] - res.run(loss).__dict__[key]
                   for res in results] for key in ("val_loss", "max_over_mean")}
        out["matched_bias_minus_loss"] = {
            key: {"per_seed": xs, "mean": float(np.mean(xs)),
                  "ci95": ci95(xs) if len(xs) > 1 else "n/a (one seed)"}
            for key, xs in d.items()}
    return out


def record_result(results: Sequence[ModernResult], argv: list[str],
                  name: str = "modern") -> Any:
    """Write every seed's figures (every run by name, no curves) and the summary over the
    seeds to the records."""
    first = results[0]
    return records.record(
        name, argv=argv, seeds=[res.config.seed for res in results],
        settings={"config": {k: v for k, v in asdict(first.config).items() if k != "seed"},
                  "runs": [r.name for r in first.runs], "matched": list(MATCHED)},
        results={"seconds": sum(res.seconds for res in results),
                 "per_seed": {str(res.config.seed): {
                     r.name: records.compact({k: v for k, v in asdict(r).items()
                                              if k != "name"}) for r in res.runs}
                     for res in results},
                 **records.compact(summarize(results))},
        fast=first.fast)


def main_modern(argv: Sequence[str] | None = None) -> int:
    """``tinymoe repro modern [--seed S ...] [--steps N] [--fast] [--json PATH] [--record]``."""
    ap = repro_parser("tinymoe repro modern", "Modern routers side by side on a char LM: "
                      "balance and loss of top-k with and without a balancing loss, a "
                      "loss-free bias, expert choice and shared + fine-grained experts.",
                      TrainConfig.steps, FAST.steps, what="run")
    ap.add_argument("--seed", type=int, nargs="+", default=None,
                    help="initial weights and batches, one or more seeds (default 0; fast: "
                         "0 1)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS),
                    metavar="RUN", help=f"which runs (default all: {', '.join(RUNS)})")
    ap.add_argument("--small", action="store_true",
                    help="the tour's smaller model (d 32, context 32, 200 steps, γ 1e-2)")
    records.add_record_argument(ap)
    ap.add_argument("--record-as", default="modern",
                    help="record name (default modern; e.g. modern-matched)")
    args = ap.parse_args(argv)
    seeds = args.seed or ([0, 1] if is_fast(args) else [0])
    config = TOUR if args.small and not is_fast(args) else None
    results = []
    for seed in seeds:
        result = run(fast=is_fast(args), steps=args.steps, progress=not args.no_progress,
                     seed=seed, runs=args.runs, config=config)
        print(format_table(result), end="\n\n")
        results.append(result)
    if len(results) > 1:
        print(format_summary(results))
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([res.to_dict() for res in results], f, indent=1)
    if args.record:
        print("recorded", record_result(results, ["modern", *(argv or [])], args.record_as))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_modern())
