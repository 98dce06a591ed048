"""Reproduce the spirit of Table 6 of Shazeer et al. (2017): what the balancing losses do.

The paper trains an MoE-256 language model on the 1B-word benchmark for 10 epochs with
``(w_importance, w_load)`` in a grid and reports test perplexity, CV(Importance), CV(Load)
and max/mean load. Without any loss the gate collapses onto a few experts (CV ≈ 3, the
busiest expert 17.8x the mean); any loss fixes it, and ``w_load`` keeps the busiest expert
closest to the mean (1.14 at 0.1/0.1, 1.07 at 1/1).

Ours: a character-level LM on the shipped Shakespeare (a :class:`~tinymoe.models.Transformer`
with one pre-norm attention block whose feed-forward is a noisy top-k MoE layer), trained from
the same initial weights and the same batches for every setting; only the two weights change.

How we measure (choices the paper leaves open):

- **validation loss**: cross-entropy in nats per character on fixed held-out batches, eval
  mode (no gate noise), instead of perplexity on a word-level test set;
- **CV(Importance), CV(Load)**: on the same held-out batches with the gate in training mode
  (noise on; ``Load`` is the smooth estimator, eq. 10), one value per batch and MoE layer,
  averaged. ``CV = sqrt(cv_squared)``, population variance (ddof = 0);
- **max/mean load**: the busiest expert's hard token count over the mean count, same
  batches, averaged.

Smaller scale, so the numbers are not the paper's: E = 32 experts with k = 2, a few thousand
batches instead of 10 epochs of 1B words. The CV of the importance can approach
``sqrt(E - 1)`` = 5.6 (every token puts almost all of its gate value on the same expert: the
k gates of a token can be (1 - δ, δ)); ``sqrt(E/k - 1)`` = 3.9 is the ceiling only for hard
counts, every token sending its k choices to the same k experts.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from tinymoe.app import records
from tinymoe.autograd import no_grad
from tinymoe.data import CharTokenizer, shakespeare
from tinymoe.app.experiments.char_lm_runs import (char_lm_config, held_out_batches, is_fast,
                                                  repro_parser, report, shakespeare_data,
                                                  train_char_lm)
from tinymoe.models.transformer import Transformer
from tinymoe.moe.balance import cv, max_over_mean

SETTINGS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.1, 0.0), (0.0, 0.1), (0.1, 0.1),
                                             (1.0, 1.0))

# Table 6 (MoE-256, 10 epochs): test perplexity, CV(Importance), CV(Load), max/mean load
PAPER: dict[tuple[float, float], tuple[float, float, float, float]] = {
    (0.0, 0.0): (39.8, 3.04, 3.01, 17.80),
    (0.2, 0.0): (35.6, 0.06, 0.17, 1.47),
    (0.0, 0.2): (35.7, 0.22, 0.04, 1.15),
    (0.1, 0.1): (35.6, 0.06, 0.05, 1.14),
    (0.01, 0.01): (35.7, 0.48, 0.11, 1.37),
    (1.0, 1.0): (35.7, 0.03, 0.02, 1.07),
}
# our settings without a row of their own in the paper -> the paper's nearest row
PAPER_NEAREST = {(0.1, 0.0): (0.2, 0.0), (0.0, 0.1): (0.0, 0.2)}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on besides the two weights."""

    steps: int = 2000
    batch_size: int = 32
    block_size: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 1
    num_experts: int = 32
    k: int = 2
    d_ff: int = 64
    lr: float = 3e-3
    warmup: int = 100
    clip: float = 1.0
    seed: int = 0
    eval_batches: int = 8
    log_every: int = 25


FAST = TrainConfig(steps=60, batch_size=8, block_size=32, d_model=32, num_experts=8, k=2,
                   d_ff=32, warmup=10, eval_batches=2, log_every=10)
TOUR = TrainConfig(steps=200, batch_size=16, block_size=32, d_model=32, num_experts=16, k=2,
                   d_ff=32, warmup=20, eval_batches=4, log_every=10)


@dataclass
class SettingResult:
    w_importance: float
    w_load: float
    val_loss: float
    cv_importance: float
    cv_load: float
    max_over_mean: float
    final_fraction: list[float]  # (E,) share of the tokens per expert, held-out batches
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # cross-entropy at logged steps
    load_history: list[list[int]] = field(default_factory=list)  # (logged steps, E) counts
    seconds: float = 0.0


@dataclass
class Table6Result:
    config: TrainConfig
    fast: bool
    settings: list[SettingResult]
    seconds: float

    def setting(self, w_importance: float, w_load: float) -> SettingResult:
        for s in self.settings:
            if (s.w_importance, s.w_load) == (w_importance, w_load):
                return s
        raise KeyError(f"Table6Result: no setting ({w_importance}, {w_load}); have "
                       f"{[(s.w_importance, s.w_load) for s in self.settings]}")

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "fast": self.fast, "seconds": self.seconds,
                "settings": [asdict(s) for s in self.settings]}


def build_model(cfg: TrainConfig, vocab_size: int, w_importance: float,
                w_load: float) -> Transformer:
    """The LM of a setting; the same ``cfg.seed`` gives the same initial weights."""
    lm = char_lm_config(vocab_size, cfg, kind="noisy_topk", w_importance=w_importance,
                        w_load=w_load)
    return Transformer(lm, rng=cfg.seed)


def balance_stats(model: Transformer, batches: Sequence[tuple[np.ndarray, np.ndarray]]
                  ) -> dict[str, Any]:
    """Validation loss (eval mode) and CV/max-load statistics (training-mode gates)."""
    with no_grad():
        model.eval()
        val = float(np.mean([model.loss(x, y)[1].item() for x, y in batches]))
        model.train()
        cv_i, cv_l, mm, counts = [], [], [], 0
        for x, _ in batches:
            model(x)
            for layer in model.moe_layers:
                r = layer.last_routing
                cv_i.append(cv(r.stats["importance"]))  # eq. (6)
                cv_l.append(cv(r.stats["load"]))  # eq. (10), the smooth estimator
                mm.append(max_over_mean(r.counts))  # hard (token, choice) counts
                counts = counts + r.counts
    frac = np.asarray(counts, dtype=float) / max(float(np.sum(counts)), 1.0)
    return {"val_loss": val, "cv_importance": float(np.mean(cv_i)),
            "cv_load": float(np.mean(cv_l)), "max_over_mean": float(np.mean(mm)),
            "final_fraction": frac.tolist()}


def train_setting(w_importance: float, w_load: float, cfg: TrainConfig,
                  data: tuple | None = None, progress: bool = False) -> SettingResult:
    """Train one (w_importance, w_load) setting and measure it."""
    tok, train_ids, val_ids = data if data is not None else shakespeare_data()
    model = build_model(cfg, tok.vocab_size, w_importance, w_load)
    res = SettingResult(w_importance, w_load, 0.0, 0.0, 0.0, 0.0, [])
    start = time.perf_counter()

    def log(step: int, ce: float) -> None:
        res.steps.append(step)
        res.train_loss.append(ce)
        res.load_history.append(model.moe_layers[0].last_routing.counts.tolist())

    train_char_lm(model, cfg, train_ids, desc=f"w_imp={w_importance:g} w_load={w_load:g}",
                  progress=progress, on_log=log)
    for key, value in balance_stats(model, held_out_batches(val_ids, cfg)).items():
        setattr(res, key, value)
    res.seconds = time.perf_counter() - start
    return res


def run(fast: bool = False, steps: int | None = None, progress: bool = True,
        settings: Sequence[tuple[float, float]] = SETTINGS,
        config: TrainConfig | None = None) -> Table6Result:
    """Train every setting from the same start; ``fast`` uses a tiny model and few steps."""
    cfg = config or (FAST if fast else TrainConfig())
    if steps is not None:
        if steps < 1:
            raise ValueError(f"table6_2017.run: steps={steps} must be >= 1")
        cfg = TrainConfig(**{**asdict(cfg), "steps": int(steps)})
    data = shakespeare_data()
    start = time.perf_counter()
    results = [train_setting(wi, wl, cfg, data, progress) for wi, wl in settings]
    return Table6Result(cfg, fast, results, time.perf_counter() - start)


def _paper_row(w: tuple[float, float]) -> tuple[str, tuple[float, ...] | None]:
    if w in PAPER:
        return f"{w[0]:g}, {w[1]:g}", PAPER[w]
    if w in PAPER_NEAREST:
        near = PAPER_NEAREST[w]
        return f"{near[0]:g}, {near[1]:g}", PAPER[near]
    return "—", None


def format_table(result: Table6Result) -> str:
    """The measured table next to the paper's Table 6."""
    c = result.config
    lines = [f"Shazeer et al. (2017) Table 6 — char-level Shakespeare LM, MoE with "
             f"E={c.num_experts}, k={c.k}, {c.steps} steps of {c.batch_size}x{c.block_size} "
             f"characters{' (fast)' if result.fast else ''}; {result.seconds:.0f} s",
             "",
             "| w_importance | w_load | val loss (nats/char) | CV(Importance) | CV(Load) | "
             "max/mean load | paper row | paper test ppl | paper CV(Imp) | paper CV(Load) | "
             "paper max/mean |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result.settings:
        label, p = _paper_row((s.w_importance, s.w_load))
        paper = "| — | — | — | — |" if p is None else \
            f"| {p[0]:.1f} | {p[1]:.2f} | {p[2]:.2f} | {p[3]:.2f} |"
        lines.append(f"| {s.w_importance:g} | {s.w_load:g} | {s.val_loss:.3f} | "
                     f"{s.cv_importance:.2f} | {s.cv_load:.2f} | {s.max_over_mean:.2f} | "
                     f"{label} {paper}")
    lines += ["", f"Ceilings of the CV here: CV(Importance) -> sqrt(E - 1) = "
              f"{np.sqrt(c.num_experts - 1):.2f} when every token's gate value sits on one "
              f"expert; sqrt(E/k - 1) = {np.sqrt(c.num_experts / c.k - 1):.2f} for hard counts "
              f"(every token's k choices on the same k experts). Paper, E=256, k=4: 16.0 and 7.9."]
    return "\n".join(lines)


def figure_load(result: Table6Result) -> Any:
    """Share of tokens per expert over training, without and with the balancing losses."""
    import matplotlib.pyplot as plt

    from tinymoe import viz

    shown = [s for s in result.settings if (s.w_importance, s.w_load) in
             ((0.0, 0.0), (0.1, 0.1))] or result.settings[:2]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 3.6), sharey=True)
    plt.close(fig)
    for ax, s in zip(np.atleast_1d(axes), shown):
        viz.expert_load(np.asarray(s.load_history), steps=s.steps, kind="stack", ax=ax,
                        title=f"w_importance={s.w_importance:g}, w_load={s.w_load:g}")
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    return fig


def tour_line(fast: bool = True, progress: bool = False) -> dict[str, Any]:
    """One line for ``tinymoe tour``: no balancing loss vs (0.1, 0.1), small LM (about 10 s
    on one core with ``fast``; ``fast=False`` trains the full-size model for 200 steps, so
    the whole tour stays under about 3 minutes; ``tinymoe repro table6`` runs the full table)."""
    cfg = TOUR if fast else TrainConfig(steps=200)
    result = run(config=cfg, fast=fast, progress=progress,
                 settings=((0.0, 0.0), (0.1, 0.1)))
    off, on = result.settings
    model = build_model(cfg, CharTokenizer(shakespeare()).vocab_size, 0.1, 0.1)
    params = model.num_parameters()
    expert_params = sum(p.size for n, p in model.named_parameters() if ".experts." in n)
    active = params - expert_params + expert_params * cfg.k // cfg.num_experts  # k of E run
    return {
        "stage": "3 · sparsely-gated MoE",
        "paper": "Shazeer et al. 2017",
        "trained": f"char LM, noisy top-{cfg.k} of {cfg.num_experts} FFN experts, "
                   f"{cfg.steps} steps, without and with w_importance = w_load = 0.1",
        "params": f"{params:,} / {active:,}",
        "metric": f"CV(Load) {off.cv_load:.2f} -> {on.cv_load:.2f}, max/mean load "
                  f"{off.max_over_mean:.2f} -> {on.max_over_mean:.2f}, val loss "
                  f"{off.val_loss:.2f} / {on.val_loss:.2f} nats/char",
        "paper_claim": "CV(Load) 3.01 -> 0.05, max/mean load 17.80 -> 1.14 (Table 6)",
        "figures": {"table6_2017_load": lambda: figure_load(result)},
    }


def record_result(result: Table6Result, argv: list[str]) -> Any:
    """Write ``result``'s figures to the records, each setting keyed ``"w_importance,w_load"``
    (e.g. ``"0.1,0.1"``), no curves."""
    return records.record(
        "table6", argv=argv, seeds=[result.config.seed],
        settings={"config": asdict(result.config),
                  "weights": [[s.w_importance, s.w_load] for s in result.settings]},
        results={"seconds": result.seconds,
                 "settings": {f"{s.w_importance:g},{s.w_load:g}": records.compact(asdict(s))
                              for s in result.settings}},
        fast=result.fast)


def main_table6(argv: Sequence[str] | None = None) -> int:
    """``tinymoe repro table6 [--steps N] [--fast] [--json PATH] [--no-progress]``."""
    ap = repro_parser("tinymoe repro table6", "Reproduce Table 6 of Shazeer et al. (2017): "
                      "the effect of the balancing losses.", TrainConfig.steps, FAST.steps)
    records.add_record_argument(ap)
    args = ap.parse_args(argv)
    result = run(fast=is_fast(args), steps=args.steps, progress=not args.no_progress)
    report(result, format_table(result), args.json)
    if args.record:
        print("recorded", record_result(result, ["table6", *(argv or [])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_table6())
