"""Eigen, Ranzato & Sutskever (2013): a deep mixture of experts factors "where" and "what".

The paper trains a two-layer DMoE on jittered MNIST and finds (§4.1, Fig. 2) that the first
layer's gate picks experts by the digit's **position** and the second layer's by its
**class**. MNIST is not shipped; we use the UCI 8 x 8 digits (1,797 images) placed at
random offsets in a 14 x 14 canvas (``tinymoe.data.jittered_digits``), a stated stand-in.

Models, each trained by Adam on the cross-entropy from the same seeds:

- ``dmoe``: two mixture layers of 4 ReLU experts x 32 units, each with its own gating
  network (one hidden layer of 16 units), then a linear classifier; the paper's
  assignment constraint (margin ``MARGIN``) during the first quarter of the epochs;
- ``dmoe_no_remedy``: the same without the constraint;
- ``single``: one mixture layer of 4 experts, its width chosen for the same parameter count;
- ``dense``: a ReLU network 196 -> h -> h -> 10 with the same parameter count.

Measured on the held-out jittered test digits: accuracy; for each mixture layer the mutual
information (nats) between the gate and the translation cell (the offset binned 3 x 3) and
between the gate and the class, and the gate heat maps behind them (:func:`figure_gates`);
the effective number of experts ``exp(H(mean gate))`` of each layer (4 = all used equally,
1 = collapsed). Several seeds; we print the mean and a 95 % t-interval.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import tinymoe as tm
from tinymoe.autograd import no_grad
from tinymoe.data import jittered_digits
from tinymoe.losses import cross_entropy
from tinymoe.moe.deep_moe import AssignmentConstraint, DeepMoE, gate_mutual_information, \
    gate_table
from tinymoe.nn import Linear, Module, ModuleList, as_rng

CANVAS = 14
N_EXPERTS, HIDDEN, GATE_HIDDEN = 4, 32, 16
MARGIN = 10.0  # the constraint's margin, in whole assignments
LR, BATCH = 3e-3, 64
FULL = {"epochs": 20, "copies": 3, "seeds": 3}
FAST = {"epochs": 8, "copies": 2, "seeds": 2}
TOUR = {"epochs": 16, "copies": 2, "seeds": 1}
MODELS = ("dmoe", "dmoe_no_remedy", "single", "dense")
T_95 = {1: float("nan"), 2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 8: 2.365,
        10: 2.262}


def translation_cell(offset: np.ndarray) -> np.ndarray:
    """The digit's offset (n, 2), 0..6 each way, binned into 3 x 3 cells: (n,) in 0..8."""
    b = np.digitize(offset, [2, 5])  # (n, 2): 0-1 -> 0, 2-4 -> 1, 5-6 -> 2
    return 3 * b[:, 0] + b[:, 1]


class DenseNet(Module):
    """The dense baseline: ``in -> h -> ... -> h -> classes`` with ReLU between."""

    def __init__(self, sizes: Sequence[int], rng: Any = None) -> None:
        super().__init__()
        rng = as_rng(rng)
        self.layers = ModuleList([Linear(a, b, rng=rng) for a, b in zip(sizes[:-1], sizes[1:])])

    def forward(self, x: Any) -> Any:
        for layer in self.layers[:-1]:
            x = tm.ops.relu(layer(x))
        return self.layers[-1](x)


def n_params(model: Module) -> int:
    return int(sum(p.data.size for p in model.parameters()))


def build(name: str, seed: int, target: int | None = None) -> Module:
    """A fresh model; ``single`` and ``dense`` get the width whose parameter count is
    closest to ``target`` (the DMoE's)."""
    rng = np.random.default_rng(seed)
    d = CANVAS * CANVAS
    if name in ("dmoe", "dmoe_no_remedy"):
        return DeepMoE(d, 10, (N_EXPERTS, N_EXPERTS), (HIDDEN, HIDDEN), GATE_HIDDEN, rng=rng)
    if name == "single":
        count = [n_params(DeepMoE(d, 10, (N_EXPERTS,), (h,), GATE_HIDDEN, rng=0))
                 for h in range(8, 129)]
        h = 8 + int(np.argmin(np.abs(np.array(count) - target)))
        return DeepMoE(d, 10, (N_EXPERTS,), (h,), GATE_HIDDEN, rng=rng)
    if name == "dense":
        count = [d * h + h + h * h + h + 10 * h + 10 for h in range(8, 257)]
        h = 8 + int(np.argmin(np.abs(np.array(count) - target)))
        return DenseNet([d, h, h, 10], rng=rng)
    raise ValueError(f"deep_moe_2013: unknown model {name!r}; choose one of {MODELS}")


def effective_experts(g: np.ndarray) -> float:
    """``exp(H(mean_t g_t))``: E when the experts share the inputs equally, 1 if collapsed."""
    m = g.mean(axis=0)
    m = m[m > 0]
    return float(np.exp(-(m * np.log(m)).sum()))


@dataclass
class RunResult:
    """One model, one seed."""

    name: str
    seed: int
    params: int
    accuracy: float
    mi: dict[str, float] = field(default_factory=dict)  # "layer1_where", "layer2_what", ...
    effective: dict[str, float] = field(default_factory=dict)  # "layer1", "layer2"
    gates: list[np.ndarray] = field(default_factory=list, repr=False)  # test-set gates


def train_one(name: str, seed: int, epochs: int, copies: int, target: int | None = None,
              data: tuple | None = None) -> RunResult:
    train, test = data or load(copies, seed)
    model = build(name, seed, target)
    rng = np.random.default_rng(seed + 1000)
    opt = tm.optim.Adam(model.parameters(), lr=LR)
    is_moe = isinstance(model, DeepMoE)
    rules = [AssignmentConstraint(N_EXPERTS, MARGIN) for _ in range(2)] \
        if name == "dmoe" else None
    constrained_epochs = max(1, epochs // 4)
    for epoch in range(epochs):
        order = rng.permutation(len(train))
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]  # (B,)
            if is_moe:
                logits = model(train.X[idx], rules if epoch < constrained_epochs else None).logits
            else:
                logits = model(train.X[idx])
            loss = cross_entropy(logits, train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with no_grad():
        out = model(test.X)
    logits = out.logits if is_moe else out
    res = RunResult(name, seed, n_params(model),
                    float((logits.data.argmax(1) == test.y).mean()))
    if is_moe:
        cell = translation_cell(test.offset)
        for i, g in enumerate(out.gates, start=1):
            res.gates.append(g.data)
            res.mi[f"layer{i}_where"] = gate_mutual_information(g.data, cell)
            res.mi[f"layer{i}_what"] = gate_mutual_information(g.data, test.y)
            res.effective[f"layer{i}"] = effective_experts(g.data)
    return res


def load(copies: int, seed: int) -> tuple[Any, Any]:
    return (jittered_digits("train", CANVAS, copies=copies, seed=seed),
            jittered_digits("test", CANVAS, copies=1, seed=10_000 + seed))


def interval(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the half-width of a 95 % t-interval (NaN for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    t = T_95.get(len(v), 2.0)
    return float(v.mean()), float(t * v.std(ddof=1) / np.sqrt(len(v)))


def fmt(values: Sequence[float], digits: int = 3) -> str:
    m, h = interval(values)
    return f"{m:.{digits}f}" if np.isnan(h) else f"{m:.{digits}f} ± {h:.{digits}f}"


@dataclass
class DeepMoEResult:
    settings: dict[str, Any]
    runs: dict[str, list[RunResult]]
    test_offset: np.ndarray = field(repr=False, default=None)
    test_y: np.ndarray = field(repr=False, default=None)

    def results(self) -> dict[str, Any]:
        """Every reported figure as plain JSON numbers (for ``records.record``)."""
        out: dict[str, Any] = {}
        for name, runs in self.runs.items():
            row: dict[str, Any] = {"params": runs[0].params,
                                   "accuracy": [r.accuracy for r in runs]}
            for key in runs[0].mi:
                row[f"mi_{key}"] = [r.mi[key] for r in runs]
            for key in runs[0].effective:
                row[f"effective_experts_{key}"] = [r.effective[key] for r in runs]
            out[name] = row
        return out


def run(fast: bool = False, seeds: int | None = None, epochs: int | None = None,
        copies: int | None = None, progress: bool = True, models: Sequence[str] = MODELS,
        cfg: dict[str, int] | None = None) -> DeepMoEResult:
    cfg = dict(cfg or (FAST if fast else FULL))
    cfg.update({k: v for k, v in (("seeds", seeds), ("epochs", epochs), ("copies", copies))
                if v is not None})
    from tqdm.auto import tqdm

    target = n_params(build("dmoe", 0))
    runs: dict[str, list[RunResult]] = {m: [] for m in models}
    jobs = [(m, s) for s in range(cfg["seeds"]) for m in models]
    data: dict[int, tuple] = {}
    test = None
    for name, seed in tqdm(jobs, desc="deep_moe", disable=not progress):
        if seed not in data:
            data = {seed: load(cfg["copies"], seed)}
        test = data[seed][1]
        runs[name].append(train_one(name, seed, cfg["epochs"], cfg["copies"], target,
                                    data[seed]))
    settings = {**cfg, "canvas": CANVAS, "experts": N_EXPERTS, "hidden": HIDDEN,
                "gate_hidden": GATE_HIDDEN, "margin": MARGIN, "lr": LR, "batch": BATCH,
                "constrained_epochs": max(1, cfg["epochs"] // 4)}
    return DeepMoEResult(settings, runs, test.offset, test.y)


PAPER_CLAIM = ("jittered MNIST: layer-1 experts split by where the digit is, layer-2 experts "
               "by which digit it is (Fig. 2); all expert combinations in use")


def format_table(result: DeepMoEResult) -> str:
    n = result.settings["seeds"]
    lines = [f"Deep mixture of experts on jittered 8x8 digits ({n} seed(s), "
             f"{result.settings['epochs']} epochs; mean ± 95% t-interval)", "",
             "| model | params | test acc. | I(g1; where) | I(g1; what) | I(g2; where) | "
             "I(g2; what) | eff. experts L1 / L2 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in result.runs.items():
        if not runs:
            continue
        mi = [fmt([r.mi[k] for r in runs]) if k in runs[0].mi else "-"
              for k in ("layer1_where", "layer1_what", "layer2_where", "layer2_what")]
        eff = " / ".join(fmt([r.effective[k] for r in runs], 2) for k in runs[0].effective) \
            or "-"
        lines.append(f"| {name} | {runs[0].params} | {fmt([r.accuracy for r in runs])} | "
                     + " | ".join(mi) + f" | {eff} |")
    lines += ["", "Paper: " + PAPER_CLAIM + ".",
              "I(g; where): mutual information (nats) between the gate and the digit's "
              "3x3 translation cell; I(g; what): with its class (max log 4 = 1.386)."]
    return "\n".join(lines)


# --- figures -----------------------------------------------------------------------------------
def figure_gates(result: DeepMoEResult, name: str = "dmoe") -> Any:
    """The paper's Fig. 2 analysis for the first seed: the mean gate output of each expert
    per translation cell and per class, for each layer (four heat maps)."""
    import matplotlib.pyplot as plt

    run0 = result.runs[name][0]
    cell = translation_cell(result.test_offset)
    fig, axes = plt.subplots(2, 2, figsize=(8, 7.5), gridspec_kw={"hspace": 0.55})
    for i, g in enumerate(run0.gates):
        for j, (labels, what, n) in enumerate([(cell, "translation cell", 9),
                                               (result.test_y, "class", 10)]):
            ax = axes[i, j]
            table = gate_table(g, labels, n)  # (n, E)
            im = ax.imshow(table, aspect="auto", cmap="viridis", vmin=0, vmax=1)
            key = f"layer{i + 1}_{'where' if j == 0 else 'what'}"
            ax.set_title(f"layer {i + 1} gate vs {what}\nI = {run0.mi[key]:.2f} nats",
                         fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel(what)
            ax.set_xticks(range(g.shape[1]))
            ax.set_yticks(range(n))
    fig.colorbar(im, ax=axes, shrink=0.6, label="mean gate output")
    fig.suptitle(f"DMoE ({name}) on jittered digits: where vs what", fontsize=10)
    return fig


# --- tour and CLI ------------------------------------------------------------------------------
def tour_line(fast: bool = True, progress: bool = False) -> dict[str, Any]:
    """One line for ``tinymoe tour``: the DMoE with and without the remedy, and the dense
    baseline, one seed (fast) or the full settings."""
    result = run(cfg=TOUR if fast else FULL, progress=progress,
                 models=("dmoe", "dmoe_no_remedy", "dense"))
    d, nr, dense = (result.runs[m] for m in ("dmoe", "dmoe_no_remedy", "dense"))
    return {
        "stage": "2b · deep mixture of experts",
        "paper": "Eigen, Ranzato & Sutskever 2013",
        "trained": f"2-layer DMoE (4+4 ReLU experts, a gate per layer) on jittered 8x8 digits "
                   f"in a 14x14 canvas, {result.settings['epochs']} epochs; dense net of equal "
                   f"size",
        "params": f"{d[0].params} / {d[0].params}",
        "metric": f"I(gate; where) layer 1 {fmt([r.mi['layer1_where'] for r in d], 2)} vs "
                  f"layer 2 {fmt([r.mi['layer2_where'] for r in d], 2)}; I(gate; what) layer 1 "
                  f"{fmt([r.mi['layer1_what'] for r in d], 2)} vs layer 2 "
                  f"{fmt([r.mi['layer2_what'] for r in d], 2)} nats; acc. DMoE "
                  f"{fmt([r.accuracy for r in d], 2)}, no remedy "
                  f"{fmt([r.accuracy for r in nr], 2)}, "
                  f"dense {fmt([r.accuracy for r in dense], 2)}",
        "paper_claim": PAPER_CLAIM,
        "figures": {"deep_moe_2013_gates": lambda: figure_gates(result)},
    }


def main_deep_moe(argv: Sequence[str] | None = None) -> int:
    """``tinymoe repro deep_moe [--seeds N] [--epochs N] [--fast] [--out DIR] [--record]``."""
    return repro_main("deep_moe", "deep_moe_2013",
                      "Eigen, Ranzato & Sutskever 2013: a two-layer deep mixture of experts "
                      "on jittered digits.", run, format_table,
                      {"deep_moe_2013_gates.png": figure_gates}, argv)


def repro_main(name: str, stem: str, description: str, run_fn: Callable[..., Any],
               table: Callable[[Any], str], figures: dict[str, Callable[[Any], Any]],
               argv: Sequence[str] | None) -> int:
    """The command line shared by the 2013-15 reproductions: run, print the table, and with
    ``--out`` write it (markdown and JSON) with the figures; with ``--record`` record it."""
    ap = argparse.ArgumentParser(prog=f"tinymoe repro {name}", description=description)
    ap.add_argument("--seeds", type=int, default=None, help="default: the full setting's")
    ap.add_argument("--epochs", type=int, default=None, help="default: the full setting's")
    ap.add_argument("--fast", action="store_true", help="the fast setting (also TINYMOE_FAST=1)")
    ap.add_argument("--out", default=None, help="folder for the table and the figures")
    ap.add_argument("--record", action="store_true",
                    help="write the figures to tinymoe/data/records (tinymoe.app.records)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    fast = args.fast or os.environ.get("TINYMOE_FAST") == "1"
    result = run_fn(fast=fast, seeds=args.seeds, epochs=args.epochs,
                    progress=not args.no_progress)
    print(table(result))
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(table(result) + "\n", encoding="utf-8")
        (out / f"{stem}.json").write_text(
            json.dumps({"settings": result.settings, "results": result.results()}, indent=1),
            encoding="utf-8")
        for filename, figure in figures.items():
            figure(result).savefig(out / filename, dpi=120)
    if args.record:
        from tinymoe.app.records import record

        options = list(sys.argv[1:] if argv is None else argv)
        path = record(name, argv=[name, *options], seeds=list(range(result.settings["seeds"])),
                      settings=result.settings, results=result.results(), fast=fast)
        print(f"recorded {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_deep_moe())
