"""Reproduce the spirit of the Switch Transformer's claims on a tiny character LM.

Fedus, Zoph & Shazeer (2021) claim, at scale (T5-Base sizes, C4, 128 experts):

1. **Switch beats dense at equal FLOPs per token**: Switch-Base reaches T5-Base's quality
   7.5x sooner in steps (§3.1), and at every step it is ahead (Figure 4).
2. **Low capacity factors work** (Table 1): Switch-Base at cf 1.0 has the best time to a
   quality threshold and the highest throughput; cf 1.25 and 2.0 help quality a little per
   step but cost speed. Fewer than 1% of tokens are usually dropped.
3. **Selective precision** (Table 2): a bfloat16 router diverged (-3.780 neg. log perplexity),
   a float32 router (the rest of the model in bfloat16) matched float32 quality.

Ours: a :class:`~tinymoe.models.transformer.Transformer` with Switch FFNs in every other
block against the same model with ``kind="dense"`` (one FFN of the same size as one expert
in every block: the same active FLOPs per token up to the router's d·E), on the shipped
Shakespeare, the same batches and the same number of steps for every run. Measured:

- **validation loss**: cross-entropy in nats per character on fixed held-out batches, eval
  mode (no jitter), with the run's own capacity factor (so drops count at evaluation too);
- **dropped %**: tokens that reached no expert, mean over the logged training steps and all
  Switch layers, and the same on the held-out batches;
- **step time**: median seconds per training step (NumPy on one core: capacity-mode experts
  compute their empty slots too, so a larger capacity factor costs time, as on TPUs);
- **router precision**: the same Switch run with its router in float16 and in (emulated)
  bfloat16 instead of float32; a run that produces a NaN/inf router logit is reported as
  diverged at that step.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from tinymoe.autograd import no_grad
from tinymoe.models.transformer import Transformer, TransformerConfig, describe
from tinymoe.app import records
from tinymoe.app.train import TrainConfig, load_data, train, val_batches

# name -> settings that differ from the Switch baseline (cf 1.0, float32 router)
RUNS: dict[str, dict[str, Any]] = {
    "dense": {"kind": "dense"},
    "switch": {},
    "switch cf 1.25": {"capacity_factor": 1.25},
    "switch cf 2.0": {"capacity_factor": 2.0},
    "switch fp16 router": {"router_dtype": "float16"},
    "switch bf16 router": {"router_dtype": "bfloat16"},
}
TOUR_RUNS = ("dense", "switch")

PAPER_TABLE1 = {  # Switch-Base, 128 experts: neg. log perplexity @100k steps, ex/s
    1.0: (-1.561, 1000), 1.25: (-1.553, 910), 2.0: (-1.554, 860)}
PAPER_TABLE2 = {"float32": (-1.718, 1160), "bfloat16": (-3.780, 1390),
                "selective (float32 router)": (-1.716, 1390)}


@dataclass(frozen=True)
class ExperimentConfig:
    """Model sizes and training settings shared by every run."""

    model: TransformerConfig
    train: TrainConfig


FULL = ExperimentConfig(
    TransformerConfig(block_size=64, d_model=64, n_layers=4, n_heads=4, d_ff=256, num_experts=8),
    TrainConfig(steps=800, batch_size=16, lr=3e-3, warmup=50, eval_every=100, eval_batches=8,
                log_every=10, ckpt_every=10_000))
FAST = ExperimentConfig(
    TransformerConfig(block_size=32, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                      num_experts=4),
    TrainConfig(steps=60, batch_size=8, lr=3e-3, warmup=10, eval_every=30, eval_batches=2,
                log_every=5, ckpt_every=10_000))
TOUR = ExperimentConfig(
    TransformerConfig(block_size=32, d_model=32, n_layers=2, n_heads=2, d_ff=128,
                      num_experts=8),
    TrainConfig(steps=500, batch_size=16, lr=3e-3, warmup=20, eval_every=50, eval_batches=4,
                log_every=10, ckpt_every=10_000))
# ``tinymoe tour`` without --fast: the full-size models, trained long enough to show the
# effect but short enough that the whole tour stays under about 3 minutes on 2 cores
# (``tinymoe repro switch`` runs FULL).
TOUR_FULL = ExperimentConfig(FULL.model, replace(FULL.train, steps=300, eval_every=50))


@dataclass
class RunResult:
    name: str
    model_config: dict[str, Any]
    params: str                   # "total / active"
    flops_per_token: int
    val_loss: float               # nan when diverged
    train_dropped: float          # fraction, mean over logged steps and layers
    val_dropped: float            # fraction on the held-out batches
    step_time: float              # median seconds per step
    diverged_at: int | None
    seconds: float
    history: dict[str, Any] = field(default_factory=dict)
    max_abs_logit: float = 0.0    # largest |router logit| on the held-out batches


@dataclass
class SwitchResult:
    config: ExperimentConfig
    fast: bool
    runs: list[RunResult]
    seconds: float

    def run(self, name: str) -> RunResult:
        for r in self.runs:
            if r.name == name:
                return r
        raise KeyError(f"SwitchResult: no run {name!r}; have {[r.name for r in self.runs]}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": asdict(self.config.model), "train": asdict(self.config.train),
                "fast": self.fast, "seconds": self.seconds,
                "runs": [asdict(r) for r in self.runs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SwitchResult:
        """The inverse of :meth:`to_dict` (e.g. a ``--json`` file, to redraw the figures)."""
        cfg = ExperimentConfig(TransformerConfig.from_dict(d["model"]),
                               TrainConfig.from_dict(d["train"]))
        return cls(cfg, d["fast"], [RunResult(**r) for r in d["runs"]], d["seconds"])


def held_out_stats(model: Transformer, batches: Sequence[tuple[np.ndarray, np.ndarray]]
                   ) -> tuple[float, float]:
    """(fraction of tokens dropped, largest |router logit|) on ``batches``, eval mode."""
    layers = model.moe_layers
    if not layers:
        return 0.0, 0.0
    model.eval()
    dropped, biggest = [], 0.0
    with no_grad():
        for x, _ in batches:
            model(x)
            for m in layers:
                dropped.append(m.last_routing.dropped_fraction)
                biggest = max(biggest, float(np.abs(m.last_routing.logits.data).max()))
    model.train()
    return float(np.mean(dropped)), biggest


def train_run(name: str, cfg: ExperimentConfig, data: tuple, progress: bool = False
              ) -> RunResult:
    """Train one named run of :data:`RUNS` and measure it (divergence is caught)."""
    model_cfg = cfg.model.replace(vocab_size=data[0].vocab_size, **RUNS[name])
    start = time.perf_counter()
    done = [0]
    try:
        res = train(model_cfg, cfg.train, data=data, progress=progress, desc=name,
                    on_step=lambda step, model: done.__setitem__(0, step))
    except FloatingPointError:  # NaN/inf router logits or LM scores: the run diverged
        return RunResult(name, model_cfg.to_dict(), "", 0, float("nan"), float("nan"),
                         float("nan"), float("nan"), done[0] + 1, time.perf_counter() - start)
    h = res.history
    batches = val_batches(data[2], cfg.train, model_cfg.block_size)
    val_dropped, max_logit = held_out_stats(res.model, batches)
    dropped = [d for row in h.dropped for d in row]
    times = h.step_time[1:] or h.step_time  # the first log includes warm-up compilation
    return RunResult(
        name=name, model_config=model_cfg.to_dict(), params=describe(res.model),
        flops_per_token=res.model.flops_per_token(), val_loss=res.final_val_loss,
        train_dropped=float(np.mean(dropped)) if dropped else 0.0, val_dropped=val_dropped,
        step_time=float(np.median(times)) if times else float("nan"), diverged_at=None,
        seconds=time.perf_counter() - start, history=h.to_dict(), max_abs_logit=max_logit)


def run(fast: bool = False, steps: int | None = None, progress: bool = True,
        runs: Sequence[str] = tuple(RUNS), config: ExperimentConfig | None = None,
        seed: int | None = None) -> SwitchResult:
    """Train every run in ``runs`` from the same seed on the same batches."""
    cfg = config or (FAST if fast else FULL)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"switch_2021.run: steps={steps} must be >= 1")
        cfg = ExperimentConfig(cfg.model, TrainConfig(**{**asdict(cfg.train),
                                                         "steps": int(steps)}))
    if seed is not None:
        cfg = ExperimentConfig(cfg.model, TrainConfig(**{**asdict(cfg.train),
                                                         "seed": int(seed)}))
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise ValueError(f"switch_2021.run: unknown runs {unknown}; choose from {list(RUNS)}")
    data = load_data(cfg.train.val_fraction)
    start = time.perf_counter()
    results = [train_run(name, cfg, data, progress) for name in runs]
    return SwitchResult(cfg, fast, results, time.perf_counter() - start)


def _loss(r: RunResult) -> str:
    if r.diverged_at is not None or not np.isfinite(r.val_loss):
        return "diverged" + (f" at step {r.diverged_at}" if r.diverged_at else "")
    return f"{r.val_loss:.3f}"


def format_table(result: SwitchResult) -> str:
    """Three markdown tables: Switch vs dense, capacity factors, router precision."""
    c, t = result.config.model, result.config.train
    names = [r.name for r in result.runs]
    lines = [(f"Tiny Switch Transformer on Shakespeare characters: d_model {c.d_model}, "
              f"{c.n_layers} layers, Switch FFN every {c.moe_every} blocks with "
              f"{c.num_experts} experts of d_ff {c.d_ff}; {t.steps} steps of "
              f"{t.batch_size}x{c.block_size} characters, AdamW lr {t.lr:g}"
              f"{' (fast)' if result.fast else ''}; {result.seconds:.0f} s in all."), ""]
    if "dense" in names and "switch" in names:
        lines += [("| model | params (total / active) | FLOPs/token | val loss (nats/char) | "
                   "s/step |"), "|---|---|---|---|---|"]
        for n in ("dense", "switch"):
            r = result.run(n)
            lines.append(f"| {n} | {r.params} | {r.flops_per_token:,} | {_loss(r)} | "
                         f"{r.step_time:.3f} |")
        lines.append("")
    cf_runs = [r for r in result.runs if r.name in ("switch", "switch cf 1.25",
                                                     "switch cf 2.0")]
    if cf_runs:
        lines += [("| capacity factor | dropped % (train) | dropped % (held-out) | val loss | "
                   "s/step | paper Switch-Base: neg. log ppl @100k, ex/s |"),
                  "|---|---|---|---|---|---|"]
        for r in cf_runs:
            cf = r.model_config["capacity_factor"]
            p = PAPER_TABLE1.get(cf)
            paper = "—" if p is None else f"{p[0]:.3f}, {p[1]}"
            lines.append(f"| {cf:g} | {100 * r.train_dropped:.2f} | {100 * r.val_dropped:.2f} | "
                         f"{_loss(r)} | {r.step_time:.3f} | {paper} |")
        lines.append("")
    prec = [r for r in result.runs if r.name in ("switch", "switch fp16 router",
                                                  "switch bf16 router")]
    if len(prec) > 1:
        lines += ["| router precision | val loss | max abs router logit | s/step |",
                  "|---|---|---|---|"]
        for r in prec:
            lines.append(f"| {r.model_config['router_dtype']} | {_loss(r)} | "
                         f"{r.max_abs_logit:.2f} | {r.step_time:.3f} |")
        lines += ["", ("Paper, Table 2 (32 experts): float32 -1.718, bfloat16 -3.780 "
                       "(diverged), selective precision (float32 router) -1.716 neg. log "
                       "perplexity.")]
    return "\n".join(lines)


# --- figures -------------------------------------------------------------------------------
def figure_loss(result: SwitchResult) -> Any:
    """Training loss (smoothed) and validation loss of the dense and Switch runs."""
    import matplotlib.pyplot as plt

    from tinymoe import viz

    runs = [r for r in result.runs if r.name in ("dense", "switch") and r.history]
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    plt.close(fig)
    viz.loss_curves({f"{r.name} train": (np.asarray(r.history["steps"]),
                                         np.asarray(r.history["train_loss"])) for r in runs},
                    ax=ax, smooth=0.6)
    val = {f"{r.name} val": (np.asarray(r.history["val_steps"]),
                             np.asarray(r.history["val_loss"]))
           for r in runs if r.history["val_steps"]}
    if val:
        viz.loss_curves(val, ax=ax, ylabel="cross-entropy (nats/char)",
                        title="Switch vs dense at equal FLOPs per token")
        for line in ax.get_lines()[-len(val):]:
            line.set_linestyle("--")
            line.set_marker("o")
        ax.legend(fontsize="small")
    return fig


def figure_load(result: SwitchResult, name: str = "switch") -> Any:
    """Share of tokens per expert in the first Switch layer over training: the tokens that
    chose each expert (demand, before dropping) and those it kept (at most C)."""
    import matplotlib.pyplot as plt

    from tinymoe import viz

    h = result.run(name).history
    panels = [("kept", h["load"])] + ([("demand", h["demand"])] if h.get("demand") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), sharey=True)
    plt.close(fig)
    for ax, (what, rows) in zip(np.atleast_1d(axes), panels[::-1]):
        viz.expert_load(np.asarray([row[0] for row in rows]), steps=h["steps"], kind="stack",
                        ax=ax, title=f"{name}: expert {what}, first Switch layer")
    legends = [ax.get_legend() for ax in np.atleast_1d(axes)[:-1]]
    for legend in legends:
        if legend is not None:
            legend.remove()
    return fig


def figure_dropped(result: SwitchResult) -> Any:
    """Dropped tokens over training for each capacity factor (mean over Switch layers)."""
    from tinymoe import viz

    runs = [r for r in result.runs if r.name in ("switch", "switch cf 1.25", "switch cf 2.0")
            and r.history]
    n = min(len(r.history["steps"]) for r in runs)
    hist = np.stack([np.mean(np.asarray(r.history["dropped"][:n]), axis=1) for r in runs], 1)
    return viz.dropped_fraction(hist, steps=runs[0].history["steps"][:n],
                                labels=[f"cf {r.model_config['capacity_factor']:g}"
                                        for r in runs],
                                title="tokens dropped (over capacity) during training")


def tour_line(fast: bool = True, progress: bool = False) -> dict[str, Any]:
    """One line for ``tinymoe tour``: Switch vs dense on a tiny LM (about 15 s with
    ``fast``; ``fast=False`` runs the full-size pair, about 4 minutes)."""
    cfg = TOUR if fast else TOUR_FULL
    result = run(config=cfg, fast=fast, progress=progress, runs=TOUR_RUNS)
    dense, switch = result.run("dense"), result.run("switch")
    E = cfg.model.num_experts
    return {
        "stage": "5 · Switch Transformer",
        "paper": "Fedus, Zoph & Shazeer 2021",
        "trained": f"char LM, top-1 of {E} experts every other block vs dense, "
                   f"{cfg.train.steps} steps each, cf 1.0",
        "params": f"{switch.params} (dense {dense.params.split(' / ')[0]})",
        "metric": f"val loss Switch {_loss(switch)} vs dense {_loss(dense)} nats/char; "
                  f"{100 * switch.train_dropped:.1f}% tokens dropped",
        "paper_claim": "Switch-Base beats FLOP-matched T5-Base at every step (7.5x fewer "
                       "steps to its quality); <1% tokens dropped",
        "figures": {"switch_2021_loss": lambda: figure_loss(result),
                    "switch_2021_load": lambda: figure_load(result)},
    }


def _curve_summary(history: dict[str, Any], last: int = 100) -> dict[str, Any]:
    """The parts of a run's curves that the page quotes: the validation losses at each
    evaluation, and the dropped fraction over the last ``last`` steps."""
    if not history:  # a diverged run
        return {"val_curve": [], "train_dropped_last": "nan"}
    steps = history["steps"]
    end = steps[-1] if steps else 0
    tail = [np.mean(row) for s, row in zip(steps, history["dropped"]) if s > end - last and row]
    return {"val_curve": [float(v) for v in history["val_loss"]],
            "train_dropped_last": float(np.mean(tail)) if tail else 0.0}


def record_result(results: Sequence[SwitchResult], argv: list[str]) -> Any:
    """Write the figures of one result per seed (every run by name, no curves) to the
    records: ``results.by_seed[seed].runs[name]``."""
    first = results[0].to_dict()
    by_seed = {}
    for result in results:
        d = result.to_dict()
        by_seed[str(result.config.train.seed)] = {
            "seconds": result.seconds,
            "runs": {r["name"]: {**records.compact({k: v for k, v in r.items()
                                                     if k not in ("name", "model_config")}),
                                 **_curve_summary(r["history"])}
                     for r in d["runs"]}}
    return records.record(
        "switch", argv=argv, seeds=[r.config.train.seed for r in results],
        settings={"model": first["model"], "train": {k: v for k, v in first["train"].items()
                                                     if k != "seed"},
                  "runs": [r.name for r in results[0].runs]},
        results={"seconds": sum(r.seconds for r in results), "by_seed": by_seed},
        fast=results[0].fast)


def main_switch(argv: Sequence[str] | None = None) -> int:
    """``tinymoe repro switch [--fast] [--steps N] [--seeds S ...] [--runs ...] [--json PATH]``."""
    ap = argparse.ArgumentParser(prog="tinymoe repro switch",
                                 description="Switch vs dense, capacity factors and router "
                                             "precision on a tiny character LM.")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"training steps per run (default {FULL.train.steps})")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="initial weights and batches, one full set of runs per seed "
                         "(default: the training config's seed)")
    ap.add_argument("--fast", action="store_true", help="tiny model, few steps")
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--json", default=None, help="also write the full result as JSON here")
    ap.add_argument("--no-progress", action="store_true")
    records.add_record_argument(ap)
    args = ap.parse_args(argv)
    fast = args.fast or os.environ.get("TINYMOE_FAST") == "1"
    seeds = args.seeds or [None]
    results = [run(fast=fast, steps=args.steps, progress=not args.no_progress, runs=args.runs,
                   seed=seed) for seed in seeds]
    for result in results:
        print(f"seed {result.config.train.seed}:")
        print(format_table(result))
    if args.record:
        print("recorded", record_result(results, ["switch", *(argv or [])]))
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([r.to_dict() for r in results] if len(results) > 1
                      else results[0].to_dict(), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_switch())
