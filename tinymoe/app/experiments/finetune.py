"""Fine-tuning, measured: sparse models overfit small data, and what helps.

Claims:

1. Sparse models fine-tune worse than their pre-training quality suggests and **overfit**
   small downstream sets (Fedus et al. 2021, §4 and §2.4; Zoph et al. 2022, §4).
2. **Expert dropout** (Fedus et al. 2021, §2.4): dropout 0.1 outside the experts and a
   higher 0.4 inside them (on the experts' hidden units) fine-tunes better than one rate.
3. **Which parameters to update** (Zoph et al. 2022, §4.1): updating only the non-MoE
   parameters does about as well as updating all; updating only the MoE parameters
   (experts and routers) does much worse.
4. **Batch size and learning rate** (Zoph et al. 2022, §4.2): sparse models prefer smaller
   batches and higher learning rates when fine-tuning; dense ones the reverse.

Ours: a character LM with a Switch layer (top-1, E experts of width ``d_ff``, capacity
factor 1.25 in training and 2.0 in evaluation as ST-MoE's fine-tuning) in every block, and
its FLOP-matched dense twin (one FFN of width ``d_ff``), both pre-trained on the shipped
Shakespeare, then fine-tuned on Bierce's *The Devil's Dictionary*
(:func:`tinymoe.data.devils_dictionary`; 10 % held out for validation, and of the rest only
the first ``finetune_chars`` characters, 10 KB, are trained on: small data, seen about
70 times over the fine-tuning steps, long enough for the validation loss to turn up). For
each seed both models are pre-trained once and every fine-tuning variant starts from those
weights, on the same batches. Measured on fixed batches, in evaluation mode, every
``eval_every`` steps: the fine-tuning train and validation cross-entropy (nats/char). Reported:
the best validation loss and its step (what early stopping would keep), the validation loss
at the end, its rise above the best (the overfitting), the final train/validation gap, and
for every remedy its difference from plain fine-tuning of the same model, paired by seed (same
pre-trained weights, same batches). Several seeds; mean ± half-width of the 95 % t-interval.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

import tinymoe as tm
from tinymoe.autograd import no_grad
from tinymoe.data import CharTokenizer, devils_dictionary, get_batch, shakespeare, train_val_split
from tinymoe.models.transformer import Transformer, TransformerConfig


@dataclass(frozen=True)
class FinetuneConfig:
    d_model: int = 48
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 96
    num_experts: int = 8
    block_size: int = 48
    pretrain_steps: int = 500
    pretrain_lr: float = 3e-3
    finetune_steps: int = 600
    finetune_chars: int = 10_000  # the fine-tuning train set: the first 10 KB of the split
    batch_size: int = 24
    lr: float = 1e-3
    small_batch: int = 6       # the "smaller batch, higher learning rate" variants
    high_lr: float = 3e-3
    eval_every: int = 50
    eval_batches: int = 4
    seeds: tuple[int, ...] = (0, 1, 2)


FAST = FinetuneConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, num_experts=4, block_size=16,
                      pretrain_steps=20, finetune_steps=20, batch_size=8, small_batch=2,
                      eval_every=10, eval_batches=1, seeds=(0,))

# name -> (model, how it differs from plain fine-tuning of every parameter)
VARIANTS: dict[str, dict[str, Any]] = {
    "dense: all params": {"model": "dense"},
    "dense: dropout 0.1": {"model": "dense", "dropout": 0.1},
    "dense: batch/4, lr x3": {"model": "dense", "small": True},
    "switch: all params": {"model": "switch"},
    "switch: dropout 0.1": {"model": "switch", "dropout": 0.1},
    "switch: dropout 0.1, expert dropout 0.4": {"model": "switch", "dropout": 0.1,
                                                "expert_dropout": 0.4},
    "switch: non-MoE params only": {"model": "switch", "update": "non_moe"},
    "switch: MoE params only": {"model": "switch", "update": "moe"},
    "switch: batch/4, lr x3": {"model": "switch", "small": True},
}


def model_config(kind: str, cfg: FinetuneConfig, vocab_size: int, **changes: Any
                 ) -> TransformerConfig:
    """The Switch LM (``kind="switch"``) or its FLOP-matched dense twin."""
    return TransformerConfig(vocab_size=vocab_size, block_size=cfg.block_size,
                             d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                             d_ff=cfg.d_ff, kind=kind, num_experts=cfg.num_experts,
                             moe_every=1, capacity_factor=1.25, eval_capacity_factor=2.0,
                             activation="relu", tie_embeddings=False, **changes)


def moe_parameter_ids(model: Transformer) -> set[int]:
    """``id`` of every parameter of the MoE layers (routers and experts)."""
    return {id(p) for layer in model.moe_layers for p in layer.parameters()}


def trainable(model: Transformer, update: str) -> list[Any]:
    """The parameters a variant updates: ``"all"``, ``"non_moe"`` or ``"moe"``."""
    moe = moe_parameter_ids(model)
    params = list(model.parameters())
    if update == "all":
        return params
    if update == "non_moe":
        return [p for p in params if id(p) not in moe]
    if update == "moe":
        return [p for p in params if id(p) in moe]
    raise ValueError(f"finetune: update={update!r}; choose 'all', 'non_moe' or 'moe'")


def fixed_batches(ids: np.ndarray, cfg: FinetuneConfig, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    return [get_batch(ids, cfg.batch_size, cfg.block_size, rng) for _ in range(cfg.eval_batches)]


def evaluate(model: Transformer, batches: Sequence[tuple]) -> float:
    """Mean cross-entropy over ``batches`` in evaluation mode (no dropout)."""
    model.eval()
    with no_grad():
        ce = float(np.mean([model.loss(x, y)[1].item() for x, y in batches]))
    model.train()
    return ce


def train_steps(model: Transformer, params: list[Any], ids: np.ndarray, steps: int,
                batch_size: int, block_size: int, lr: float, seed: int, *, warmup: int = 0,
                on_eval: Any = None, eval_every: int = 0) -> None:
    """Adam (constant ``lr`` after a linear warm-up), gradients clipped at 1."""
    opt = tm.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    model.train()
    for step in range(steps):
        x, y = get_batch(ids, batch_size, block_size, rng)
        loss, _ = model.loss(x, y)
        for p in model.parameters():
            p.grad = None
        loss.backward()
        tm.optim.clip_grad_norm_(params, 1.0)
        opt.lr = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        opt.step()
        if on_eval is not None and ((step + 1) % eval_every == 0 or step == steps - 1):
            on_eval(step + 1)


@dataclass
class Curve:
    variant: str
    seed: int
    steps: list[int] = field(default_factory=list)
    train: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)
    pretrain_val: float = 0.0  # Shakespeare validation loss before fine-tuning

    def summary(self) -> dict[str, float]:
        best = int(np.argmin(self.val))
        return {"train": self.train[-1], "val": self.val[-1],
                "gap": self.val[-1] - self.train[-1], "best_val": self.val[best],
                "best_step": self.steps[best], "rise": self.val[-1] - self.val[best],
                "start_val": self.val[0]}


def pretrain(kind: str, cfg: FinetuneConfig, seed: int, data: dict, progress: bool
             ) -> tuple[dict, float]:
    """Pre-train on Shakespeare: ``(state_dict, Shakespeare validation loss)``."""
    model = Transformer(model_config(kind, cfg, data["vocab"]), rng=seed)
    t0 = time.perf_counter()
    train_steps(model, list(model.parameters()), data["shakespeare_train"], cfg.pretrain_steps,
                cfg.batch_size, cfg.block_size, cfg.pretrain_lr, seed + 100, warmup=50)
    val = evaluate(model, data["shakespeare_val"])
    if progress:
        print(f"  pre-trained {kind} seed {seed}: Shakespeare val {val:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return model.state_dict(), val


def finetune(variant: str, cfg: FinetuneConfig, seed: int, state: dict, data: dict) -> Curve:
    """Fine-tune a copy of the pre-trained ``state`` on the Devil's Dictionary."""
    v = VARIANTS[variant]
    changes = {k: v[k] for k in ("dropout", "expert_dropout") if k in v}
    model = Transformer(model_config(v["model"], cfg, data["vocab"], **changes), rng=seed)
    model.load_state_dict(state)
    curve = Curve(variant, seed)
    batch = cfg.small_batch if v.get("small") else cfg.batch_size
    lr = cfg.high_lr if v.get("small") else cfg.lr

    def log(step: int) -> None:
        curve.steps.append(step)
        curve.train.append(evaluate(model, data["ft_train_eval"]))
        curve.val.append(evaluate(model, data["ft_val"]))

    log(0)
    train_steps(model, trainable(model, v.get("update", "all")), data["ft_train"],
                cfg.finetune_steps, batch, cfg.block_size, lr, seed + 200, on_eval=log,
                eval_every=cfg.eval_every)
    return curve


BASELINE = {"dense": "dense: all params", "switch": "switch: all params"}
MEASURES = ("train", "val", "gap", "best_val", "best_step", "rise", "start_val")


def interval(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, half-width of the 95 % t-interval)``; half-width 0 for one value."""
    from tinymoe.app.render import ci95

    a = [float(v) for v in values]
    return float(np.mean(a)), (ci95(a) if len(a) > 1 else 0.0)


@dataclass
class FinetuneResult:
    config: FinetuneConfig
    fast: bool
    curves: list[Curve]
    pretrain_val: dict[str, list[float]]
    seconds: float

    def table(self) -> dict[str, dict[str, list[float]]]:
        """variant -> measure -> one value per seed (in seed order)."""
        out: dict[str, dict[str, list[float]]] = {}
        for c in self.curves:
            for k, val in c.summary().items():
                out.setdefault(c.variant, {}).setdefault(k, []).append(val)
        return out

    def paired(self) -> dict[str, dict[str, list[float]]]:
        """variant -> ``best_val``/``val`` minus the same model's plain fine-tuning, per seed
        (negative: the remedy ends lower, i.e. helped)."""
        t = self.table()
        out = {}
        for name, m in t.items():
            base = BASELINE[VARIANTS[name]["model"]]
            if name == base or base not in t:
                continue
            out[name] = {k: [a - b for a, b in zip(m[k], t[base][k])]
                         for k in ("best_val", "val", "rise")}
        return out

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """variant -> measure -> ``{"mean", "ci95"}``, and ``minus_baseline`` likewise."""
        out: dict[str, dict[str, Any]] = {}
        for name, m in self.table().items():
            out[name] = {k: dict(zip(("mean", "ci95"), interval(v))) for k, v in m.items()}
        for name, d in self.paired().items():
            out[name]["minus_baseline"] = {k: dict(zip(("mean", "ci95"), interval(v)))
                                           for k, v in d.items()}
        return out

    def mean_curves(self) -> dict[str, dict[str, list[float]]]:
        """variant -> ``steps`` and the train and validation losses averaged over seeds."""
        out = {}
        for name in dict.fromkeys(c.variant for c in self.curves):
            cs = [c for c in self.curves if c.variant == name]
            out[name] = {"at": cs[0].steps, "train": np.mean([c.train for c in cs], 0).tolist(),
                         "val": np.mean([c.val for c in cs], 0).tolist()}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "fast": self.fast,
                "pretrain_val": self.pretrain_val, "table": self.table(),
                "paired": self.paired(), "summary": self.summary(),
                "curves": [asdict(c) for c in self.curves], "seconds": self.seconds}


def load_data(cfg: FinetuneConfig) -> dict[str, Any]:
    text = shakespeare()
    tok = CharTokenizer(text)
    sh_train, sh_val = train_val_split(tok.encode(text), 0.1)
    ft_train, ft_val = train_val_split(tok.encode(devils_dictionary()), 0.1)
    return {"vocab": tok.vocab_size, "shakespeare_train": sh_train,
            "shakespeare_val": fixed_batches(sh_val, cfg, 12345),
            "ft_train": ft_train[: cfg.finetune_chars],
            "ft_train_eval": fixed_batches(ft_train[: cfg.finetune_chars], cfg, 23456),
            "ft_val": fixed_batches(ft_val, cfg, 34567)}


def run(fast: bool = False, config: FinetuneConfig | None = None,
        variants: Sequence[str] = tuple(VARIANTS), progress: bool = True) -> FinetuneResult:
    cfg = config or (FAST if fast else FinetuneConfig())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"finetune: unknown variants {unknown}; choose from {list(VARIANTS)}")
    data = load_data(cfg)
    start = time.perf_counter()
    curves, pre = [], {"dense": [], "switch": []}
    for seed in cfg.seeds:
        states = {}
        for kind in ("dense", "switch"):
            if any(VARIANTS[v]["model"] == kind for v in variants):
                states[kind], val = pretrain(kind, cfg, seed, data, progress)
                pre[kind].append(val)
        for v in variants:
            t0 = time.perf_counter()
            curves.append(finetune(v, cfg, seed, states[VARIANTS[v]["model"]], data))
            if progress:
                s = curves[-1].summary()
                print(f"  {v:<42} seed {seed}: train {s['train']:.3f} val {s['val']:.3f} "
                      f"best {s['best_val']:.3f} ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr)
    return FinetuneResult(cfg, fast, curves, pre, time.perf_counter() - start)


def _ci(d: dict[str, float], fmt: str = ".3f", sign: bool = False) -> str:
    f = ("+" if sign else "") + fmt
    return f"{d['mean']:{f}}" + (f" ± {d['ci95']:{fmt}}" if d["ci95"] else "")


def format_table(result: FinetuneResult | dict) -> str:
    """The table of a run, or of a record (``records.load("finetune")``)."""
    if isinstance(result, FinetuneResult):
        c, summ, pretrain_val = asdict(result.config), result.summary(), result.pretrain_val
        fast, seconds = result.fast, result.seconds
    else:
        c, r = result["settings"], result["results"]
        summ, pretrain_val, seconds = r["summary"], r["pretrain_val"], r["seconds"]
        fast = "--fast" in result["command"].split()
    pre = ", ".join(f"{k} {_ci(dict(zip(('mean', 'ci95'), interval(v))))}"
                    for k, v in pretrain_val.items() if v)
    lines = [f"Fine-tuning — char LMs ({c['n_layers']} blocks, d {c['d_model']}; Switch: "
             f"{c['num_experts']} experts of d_ff {c['d_ff']} in every block; dense: d_ff "
             f"{c['d_ff']}), {c['pretrain_steps']} pre-training steps on Shakespeare (val: "
             f"{pre}), {c['finetune_steps']} fine-tuning steps on {c['finetune_chars']:,} "
             f"characters of the Devil's Dictionary (batch {c['batch_size']}, lr {c['lr']:g}; "
             f"'batch/4, lr x3': batch {c['small_batch']}, lr {c['high_lr']:g}); seeds "
             f"{list(c['seeds'])}, mean ± 95 % t-interval{' (fast)' if fast else ''}; "
             f"{seconds:.0f} s", "",
             "| variant | best val (step) | val at the end | rise end - best | gap val - train "
             "| best val - plain | end val - plain |", "|---|---|---|---|---|---|---|"]
    for name, m in summ.items():
        d = m.get("minus_baseline")
        lines.append(f"| {name} | {_ci(m['best_val'])} ({m['best_step']['mean']:.0f}) | "
                     f"{_ci(m['val'])} | {_ci(m['rise'])} | {_ci(m['gap'])} | "
                     + (f"{_ci(d['best_val'], sign=True)} | {_ci(d['val'], sign=True)} |"
                        if d else "(plain) | (plain) |"))
    return "\n".join(lines)


def figure(curves: Any, title: str = "") -> Any:
    """Train (dotted) and validation (solid) loss during fine-tuning, mean over seeds, one
    line per variant; ``curves`` is a :class:`FinetuneResult` or its ``mean_curves()`` (as
    recorded: ``records.load("finetune")["results"]["curves"]``)."""
    import matplotlib.pyplot as plt

    means = curves.mean_curves() if isinstance(curves, FinetuneResult) else curves
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, ("dense", "switch")):
        for name, m in means.items():
            if VARIANTS[name]["model"] != kind:
                continue
            line, = ax.plot(m["at"], m["val"], label=name.split(": ", 1)[1])
            ax.plot(m["at"], m["train"], ":", color=line.get_color(), lw=1)
        ax.set_title(f"{kind}: validation (solid) and train (dotted)")
        ax.set_xlabel("fine-tuning step")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("cross-entropy (nats/char)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def record_result(result: FinetuneResult, argv: list[str]) -> Any:
    """Write the table's figures (per seed, the means with intervals, the paired
    differences) and the mean curves of the figure to the records."""
    from tinymoe.app import records

    return records.record(
        "finetune", argv=argv, seeds=list(result.config.seeds),
        settings={**asdict(result.config), "variants": list(dict.fromkeys(
            c.variant for c in result.curves))},
        results={"seconds": result.seconds, "pretrain_val": result.pretrain_val,
                 "per_seed": result.table(), "paired": result.paired(),
                 "summary": result.summary(), "curves": result.mean_curves()},
        fast=result.fast)


def main_finetune(argv: Sequence[str] | None = None) -> int:
    import argparse

    from tinymoe.app import records

    ap = argparse.ArgumentParser(prog="tinymoe repro finetune",
                                 description="Pre-train Switch and dense char LMs on "
                                             "Shakespeare, fine-tune on the Devil's "
                                             "Dictionary: the overfitting gap and remedies")
    ap.add_argument("--fast", action="store_true", help="tiny models, one seed")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    ap.add_argument("--json", default=None, help="also write the full result as JSON here")
    ap.add_argument("--figure", default=None, help="save the figure here")
    records.add_record_argument(ap)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    fast = args.fast or os.environ.get("TINYMOE_FAST") == "1"
    cfg = FAST if fast else FinetuneConfig()
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit("tinymoe repro finetune: --seeds must be >= 1")
        cfg = replace(cfg, seeds=tuple(range(args.seeds)))
    res = run(fast=fast, config=cfg, progress=not args.no_progress)
    print(format_table(res))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res.to_dict(), f, indent=1)
    if args.figure:
        figure(res).savefig(args.figure, dpi=120)
    if args.record:
        print("recorded", record_result(res, ["finetune", *(argv or [])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_finetune())
