"""Reproduce Table 1 of Jacobs, Jordan, Nowlan & Hinton (1991): mixtures vs backprop on vowels.

The task: classify heed/hid/hod/hud from (F1, F2)/1000 of Peterson & Barney's speakers,
training on speakers 1-50 and testing on the rest (``tm.data.vowels``). Four systems, each
trained by full-batch gradient descent with a fixed step size (one update per epoch, no
momentum) until the average squared error on the training set is at most 0.08:

=========  ====================================================================  ======
system     model                                                                 params
=========  ====================================================================  ======
``ME4``    softmax gate + 4 linear softmax experts, trained on eq. (3)               60
``ME8``    softmax gate + 8 linear softmax experts, trained on eq. (3)              120
``BP6``    2-6-4 net, logistic hidden and output units, trained on squared error     46
``BP12``   2-12-4 net, same                                                          88
=========  ====================================================================  ======

Choices the paper leaves open, and ours (see ``docs/reproductions.md`` for the evidence):

- **Expert form.** Each expert is one linear layer with a softmax over the 4 classes: it
  outputs a class distribution (the paper mixes "each expert's class distribution" with the
  gate's proportions to classify), and each of its decision surfaces is linear (classes k
  and l each get 0.5 of their pair on a line). We also tried one logistic unit per class
  (each unit 0.5 on a line); trained on eq. (3) that mixture usually collapses onto one
  expert whose error stays above the criterion (``expert="sigmoid"`` reruns it).
- **The criterion.** "Average squared error" is the mean over cases *and* output units of
  (target - output)^2 against the one-hot target, i.e. ``tm.losses.mse(output, onehot)``,
  measured the same way for every system: the mixture's output is ``sum_i p_i o_i``. (Summed
  over the 4 outputs instead, no system reaches 0.08 on this data; their floor is ~0.1.)
- **Losses.** Mixtures minimise eq. (3) (the paper's simulations do); backprop nets minimise
  the criterion's own mean squared error (the backprop of 1991).
- **Initial conditions.** LeCun-normal weights (``tm.nn.Linear``), zero biases, the gate's
  weights at zero (equal proportions, as the paper's gate starts). Seed ``s`` gives the same
  initial weights to every step size tried.
- **Step sizes** were picked per system by a limited exploration (``explore``: a grid of
  step sizes from the same initial conditions, seeds 1000-1002, disjoint from the measured
  seeds 0-24), taking the step size with the fewest mean epochs among those that reached
  the criterion from every start. The chosen values are ``STEP_SIZES``.

What we measured (25 seeds, ``docs/reproductions.md``): at each system's own step size the
backprop nets need 1.36 times the mixtures' epochs (paper: 2.1); at one shared step size
(1.0) 3.5 times, with the mixtures' epoch counts close to the paper's. A control, ``ME1``
(one expert, a trivial gate), is nearly as fast as ``ME4``: most of the speed-up comes from
the softmax experts and eq. (3), not from dividing the task.

``run()`` returns a :class:`VowelResult`; ``format_table`` prints it next to the paper.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import tinymoe as tm
from tinymoe.app import records
from tinymoe.data import vowels
from tinymoe.moe.mixture import AdaptiveMixture, blend, mixture_nll
from tinymoe.nn import Linear, Module

SYSTEMS = ("ME4", "ME8", "BP6", "BP12")
CRITERION = 0.08  # average squared error on the training set (paper §3)
MAX_EPOCHS = 20_000
FAST_SEEDS = 3
EXPLORE_SEEDS = (1000, 1001, 1002)
EXPLORE_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)

# The fixed step size of each system, from ``explore`` over EXPLORE_GRID (see module doc):
# the fastest mean epochs to criterion from seeds 1000-1002 among the step sizes that every
# start converged with. The exploration is recorded (``tinymoe repro vowels --explore
# --record``: tinymoe/data/records/vowels-explore.json; docs/reproductions.md shows it).
STEP_SIZES = {"ME4": 8.0, "ME8": 16.0, "BP6": 64.0, "BP12": 32.0,
              "ME1": 8.0}  # the one-expert control at ME4's step size (not explored)
BOOTSTRAP = 2000  # resamples for the interval of the BP/ME ratio (seeded: repeatable)

# Table 1 of the paper: train %, test %, mean epochs to criterion, s.d. (25 runs each).
PAPER = {"ME4": (88, 90, 1124, 23), "ME8": (88, 90, 1083, 12),
         "BP6": (88, 90, 2209, 83), "BP12": (88, 90, 2435, 124)}
PAPER_NAMES = {"ME4": "4 Experts", "ME8": "8 Experts", "BP6": "BP 6 Hid", "BP12": "BP 12 Hid"}


# --- the systems -----------------------------------------------------------------------------
class BackpropNet(Module):
    """A 2-H-4 net with logistic hidden and output units, the 1991 baseline."""

    def __init__(self, hidden: int, *, rng: Any = None, dtype: Any = np.float64) -> None:
        super().__init__()
        rng = tm.nn.as_rng(rng)
        self.hidden = Linear(2, hidden, dtype=dtype, rng=rng)
        self.out = Linear(hidden, 4, dtype=dtype, rng=rng)

    def forward(self, x: Any) -> tm.Tensor:
        return self.out(self.hidden(x).sigmoid()).sigmoid()  # (n, 4)


def build(system: str, seed: int, expert: str = "softmax") -> Module:
    """The untrained model of ``system`` (one of SYSTEMS) for initial-condition ``seed``."""
    if system[:2] not in ("ME", "BP") or not system[2:].isdigit() or int(system[2:]) < 1:
        raise ValueError(f"vowels_1991: unknown system {system!r}; choose one of {SYSTEMS} "
                         f"(or ME<k> / BP<k> for k experts / hidden units)")
    rng = np.random.default_rng(seed)
    if system.startswith("ME"):
        return AdaptiveMixture(2, 4, int(system[2:]), activation=expert, rng=rng)
    return BackpropNet(int(system[2:]), rng=rng)


def _forward(model: Module, x: tm.Tensor, target: np.ndarray) -> tuple[tm.Tensor, np.ndarray,
                                                                      np.ndarray | None]:
    """(training loss, output (n, 4), gate proportions (n, E) or None) for either system."""
    if isinstance(model, AdaptiveMixture):
        parts = model(x)
        loss = mixture_nll(parts.gate_logits, parts.expert_outputs, target)  # eq. (3)
        with tm.no_grad():
            routing = parts.routing  # every case to every expert, weighted by p
            output = blend(parts.expert_outputs, routing).data  # (n, 4) sum_i p_i o_i
        return loss, output, routing.probs.data  # p: (n, E)
    y = model(x)  # (n, 4)
    return tm.losses.mse(y, target), y.data, None


def average_squared_error(output: np.ndarray, target: np.ndarray) -> float:
    """The criterion: mean over cases and output units of (target - output)^2."""
    return float(np.mean((target - output) ** 2))


def predict(model: Module, X: np.ndarray) -> np.ndarray:
    """The class distribution (mixture: ``sum_i p_i o_i``) or output units (n, 4)."""
    with tm.no_grad():
        if isinstance(model, AdaptiveMixture):
            return model.predict(X)
        return model(tm.tensor(X)).data


@dataclass
class Run:
    """One training run: epochs to criterion (None if not reached) and what it learned."""

    system: str
    seed: int
    step_size: float
    epochs: int | None
    train_acc: float
    test_acc: float
    final_mse: float
    mse_curve: list[float] = field(repr=False, default_factory=list)
    load_curve: list[list[float]] = field(repr=False, default_factory=list)  # (epochs, E)
    used_experts: int | None = None


def _check_data(X: np.ndarray, y: np.ndarray) -> None:
    if X.ndim != 2 or X.shape[1] != 2:
        raise ValueError(f"vowels_1991: expected features (n, 2) = (F1, F2)/1000, got "
                         f"{X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("vowels_1991: features contain NaN or inf")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 3:
        bad = y[(y < 0) | (y > 3)] if np.issubdtype(y.dtype, np.integer) else y[:1]
        raise ValueError(f"vowels_1991: unknown vowel label {bad[0].item()!r}; classes are 0..3 "
                         f"(heed, hid, hod, hud)")


def train(system: str, seed: int, step_size: float | None = None, *,
          max_epochs: int = MAX_EPOCHS, criterion: float = CRITERION,
          extra_epochs: int = 0, expert: str = "softmax", data: tuple | None = None,
          record_curves: bool = True) -> tuple[Run, Module]:
    """Train one system from ``seed`` by batch gradient descent until the criterion.

    ``extra_epochs`` keeps training after the criterion (to watch the gate settle). Returns
    the :class:`Run` and the trained model.
    """
    tr, te = data if data is not None else (vowels("train"), vowels("test"))
    _check_data(tr.X, tr.y)
    step_size = STEP_SIZES[system] if step_size is None else float(step_size)
    model = build(system, seed, expert)
    opt = tm.optim.SGD(model.parameters(), lr=step_size)  # plain GD: momentum 0
    x = tm.tensor(tr.X)
    target = np.eye(4)[tr.y]  # (n, 4) one-hot
    mse_curve: list[float] = []
    load_curve: list[list[float]] = []
    epochs = None
    stop = max_epochs
    def quiet() -> Any:  # divergence is caught below, not warned about
        return np.errstate(over="ignore", invalid="ignore")

    for epoch in range(max_epochs + 1):
        with quiet():
            loss, output, p = _forward(model, x, target)
        mse = average_squared_error(output, target)
        if not math.isfinite(mse) or not math.isfinite(loss.item()):
            break  # diverged: never reaches the criterion
        if record_curves:
            mse_curve.append(mse)
            if p is not None:
                load_curve.append(p.mean(axis=0).tolist())
        if epochs is None and mse <= criterion:
            epochs = epoch  # weight updates made before the criterion was met
            stop = epoch + extra_epochs
        if epoch >= stop:
            break
        model.zero_grad()
        with quiet():
            loss.backward()
        opt.step()
    with quiet():
        out_tr, out_te = predict(model, tr.X), predict(model, te.X)
    used = None
    if isinstance(model, AdaptiveMixture):
        p = model.gate_probs(tr.X)  # (n, E)
        used = int((p.max(axis=0) > 0.05).sum())  # the rest are ~0 for every case
    run = Run(system, seed, step_size, epochs, float((out_tr.argmax(1) == tr.y).mean()),
              float((out_te.argmax(1) == te.y).mean()),
              average_squared_error(out_tr, target), mse_curve, load_curve, used)
    return run, model


# --- the reproduction ---------------------------------------------------------------------------
def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def t975(df: int) -> float:
    """97.5 % quantile of Student's t (:func:`tinymoe.app.render.t975`, from scipy)."""
    from tinymoe.app.render import t975 as table

    return table(df)


def pooled_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, int]:
    """Student's t with pooled variance (the paper's test), and its degrees of freedom."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return float("nan"), max(na + nb - 2, 0)
    sp2 = ((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2)
    se = math.sqrt(sp2 * (1 / na + 1 / nb))
    return (float((a.mean() - b.mean()) / se) if se > 0 else float("inf")), na + nb - 2


@dataclass
class SystemSummary:
    system: str
    step_size: float
    n_runs: int
    n_reached: int
    epochs_mean: float
    epochs_sd: float
    epochs_ci95: float            # half-width of the 95 % t-interval of the mean
    train_acc: float
    test_acc: float
    used_experts: float | None
    params: int


@dataclass
class VowelResult:
    seeds: int
    fast: bool
    criterion: float
    summaries: dict[str, SystemSummary]
    runs: list[Run]
    t_tests: dict[str, tuple[float, int]]
    seconds: float

    @property
    def speedup(self) -> float:
        """Mean BP epochs / mean mixture epochs (the paper's "about half": ~2.1)."""
        me = np.mean([self.summaries[s].epochs_mean for s in ("ME4", "ME8")
                      if s in self.summaries])
        bp = np.mean([self.summaries[s].epochs_mean for s in ("BP6", "BP12")
                      if s in self.summaries])
        return float(bp / me)

    def epochs(self, system: str) -> list[int]:
        return [r.epochs for r in self.runs if r.system == system and r.epochs is not None]

    def ratio_interval(self, top: Sequence[str], bottom: Sequence[str],
                       seed: int = 0) -> tuple[float, float, float]:
        """mean epochs of ``top`` systems / of ``bottom`` ones (each the mean of its systems'
        means, as :attr:`speedup`) and a 95 % percentile-bootstrap interval: the seeds of
        every system resampled with replacement, :data:`BOOTSTRAP` times."""
        rng = np.random.default_rng(seed)
        eps = {s: np.asarray(self.epochs(s), float) for s in (*top, *bottom)}
        if any(len(v) == 0 for v in eps.values()):
            return float("nan"), float("nan"), float("nan")

        def ratio(sample: dict[str, np.ndarray]) -> float:
            return float(np.mean([sample[s].mean() for s in top]) /
                         np.mean([sample[s].mean() for s in bottom]))

        boots = [ratio({s: rng.choice(v, len(v)) for s, v in eps.items()})
                 for _ in range(BOOTSTRAP)]
        lo, hi = np.percentile(boots, [2.5, 97.5])
        return ratio(eps), float(lo), float(hi)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["speedup"] = self.speedup
        return d


def _train_quietly(job: tuple) -> Run:
    """One (system, seed, step size, criterion, max epochs) run, for a worker process."""
    system, seed, eps, criterion, max_epochs = job
    return train(system, seed, eps, criterion=criterion, max_epochs=max_epochs,
                 record_curves=False)[0]


def run(seeds: int = 25, fast: bool = False, out: str | Path | None = None,
        progress: bool = True, systems: Sequence[str] = SYSTEMS,
        step_sizes: dict[str, float] | None = None,
        criterion: float = CRITERION, workers: int = 1) -> VowelResult:
    """Train every system from seeds ``0..seeds-1`` (``fast``: at most 3 seeds and a 5,000
    epoch cap) and summarise as in Table 1. ``step_sizes`` overrides ``STEP_SIZES`` per
    system; ``criterion`` the average squared error to reach. With ``out``, write
    ``vowels_1991.md`` and the figures there."""
    from tqdm.auto import tqdm

    if seeds < 1:
        raise ValueError(f"vowels_1991.run: seeds={seeds} must be >= 1")
    if fast:
        seeds = min(seeds, FAST_SEEDS)
    step_sizes = {**STEP_SIZES, **(step_sizes or {})}
    missing = [s for s in systems if s not in step_sizes]
    if missing:
        raise ValueError(f"vowels_1991.run: no step size for {missing}; pass "
                         f"step_sizes={{{missing[0]!r}: ...}}")
    data = (vowels("train"), vowels("test"))
    start = time.perf_counter()
    runs: list[Run] = []
    bar = tqdm(total=len(systems) * seeds, desc="1991 vowels", disable=not progress)
    if workers > 1:  # every run is seeded on its own: the same results in any order
        from concurrent.futures import ProcessPoolExecutor

        jobs = [(system, seed, step_sizes[system], criterion,
                 5_000 if fast else MAX_EPOCHS) for system in systems for seed in range(seeds)]
        with ProcessPoolExecutor(workers) as pool:
            for r in pool.map(_train_quietly, jobs):
                runs.append(r)
                bar.update()
    for system in systems if workers <= 1 else ():
        for seed in range(seeds):
            bar.set_postfix_str(f"{system} seed {seed}")
            r, _ = train(system, seed, step_sizes[system], data=data, criterion=criterion,
                         max_epochs=5_000 if fast else MAX_EPOCHS, record_curves=False)
            runs.append(r)
            bar.update()
    bar.close()
    summaries = {}
    for system in systems:
        rs = [r for r in runs if r.system == system]
        reached = [r.epochs for r in rs if r.epochs is not None]
        m, sd = _mean_sd(reached)
        half = t975(len(reached) - 1) * sd / math.sqrt(len(reached)) if len(reached) > 1 \
            else float("nan")
        used = [r.used_experts for r in rs if r.used_experts is not None]
        summaries[system] = SystemSummary(
            system, step_sizes[system], len(rs), len(reached), m, sd, half,
            float(np.mean([r.train_acc for r in rs])), float(np.mean([r.test_acc for r in rs])),
            float(np.mean(used)) if used else None, build(system, 0).num_parameters())
    t_tests = {}
    epochs = {s: [r.epochs for r in runs if r.system == s and r.epochs is not None]
              for s in systems}
    for a, b in (("ME4", "BP6"), ("ME8", "BP12"), ("ME4", "ME8"), ("BP6", "BP12"),
                 ("ME1", "ME4"), ("ME1", "ME8"), ("ME1", "BP6")):
        if a in epochs and b in epochs:
            t_tests[f"{a} vs {b}"] = pooled_t(epochs[a], epochs[b])
    result = VowelResult(seeds, fast, criterion, summaries, runs, t_tests,
                         time.perf_counter() - start)
    if out is not None:
        write_outputs(result, Path(out), data)
    return result


RATIOS = {"BP/ME": (("BP6", "BP12"), ("ME4", "ME8")), "ME1/ME": (("ME1",), ("ME4", "ME8")),
          "BP/ME1": (("BP6", "BP12"), ("ME1",))}


def format_table(result: VowelResult) -> str:
    """Table 1, measured next to the paper's."""
    head = (f"Jacobs et al. (1991) Table 1 — vowels, batch GD to average squared error "
            f"{result.criterion} ({result.seeds} seed{'s' if result.seeds > 1 else ''}"
            f"{', fast' if result.fast else ''})")
    columns = ("| system | ε | params | reached | epochs mean (sd) ± 95 % | paper epochs (sd) | "
               "train % | test % | paper train/test % | experts used |")
    lines = [head, "", columns, "|---|---|---|---|---|---|---|---|---|---|"]
    for s, sm in result.summaries.items():
        paper_epochs, paper_acc = "—", "—"
        if s in PAPER:
            ptr, pte, pep, psd = PAPER[s]
            paper_epochs, paper_acc = f"{pep} ({psd})", f"{ptr} / {pte}"
        name = PAPER_NAMES.get(s, f"{s[2:]} Expert{'s' if s[2:] != '1' else ''}"
                               if s.startswith("ME") else f"BP {s[2:]} Hid")
        used = "—" if sm.used_experts is None else f"{sm.used_experts:.1f} of {s[2:]}"
        lines.append(f"| {name} | {sm.step_size:g} | {sm.params} | "
                     f"{sm.n_reached}/{sm.n_runs} | {sm.epochs_mean:.0f} ({sm.epochs_sd:.0f}) "
                     f"± {sm.epochs_ci95:.0f} | "
                     f"{paper_epochs} | {100 * sm.train_acc:.1f} | {100 * sm.test_acc:.1f} | "
                     f"{paper_acc} | {used} |")
    lines.append("")
    if any(s in result.summaries for s in ("ME4", "ME8")) and \
            any(s in result.summaries for s in ("BP6", "BP12")):
        r, lo, hi = result.ratio_interval(*RATIOS["BP/ME"])
        lines.append(f"BP epochs / mixture epochs: {result.speedup:.2f} (95 % bootstrap "
                     f"interval {lo:.2f}–{hi:.2f}; paper: "
                     f"{(2209 + 2435) / (1124 + 1083):.2f}, \"about half as many epochs\")")
    if "ME1" in result.summaries and "ME4" in result.summaries:
        r, lo, hi = result.ratio_interval(*RATIOS["ME1/ME"])
        lines.append(f"one expert / mixture epochs: {r:.2f} ({lo:.2f}–{hi:.2f})")
    for name, (t, df) in result.t_tests.items():
        lines.append(f"t ({name}, pooled variance, {df} df): {t:.1f}")
    return "\n".join(lines)


# --- figures -------------------------------------------------------------------------------------
def expert_lines(model: AdaptiveMixture, X: np.ndarray, min_share: float = 0.05,
                 min_fraction: float = 0.2) -> list:
    """The decision lines of every expert the gate uses (max proportion > ``min_share``),
    as ``(w, b, expert)``: for each pair of classes that are the expert's top two on at
    least ``min_fraction`` of the cases it wins, the line where those two classes tie."""
    p = model.gate_probs(X)  # (n, E)
    winner = p.argmax(axis=1)  # (n,)
    lines = []
    for i, expert in enumerate(model.experts):
        own = winner == i  # (n,)
        if p[:, i].max() <= min_share or not own.any():
            continue
        with tm.no_grad():
            o = expert(tm.tensor(X[own])).data  # (m, 4)
        top2 = np.sort(np.argsort(-o, axis=1)[:, :2], axis=1)  # (m, 2)
        pairs, counts = np.unique(top2, axis=0, return_counts=True)
        for (k, k2), count in zip(pairs, counts):
            w, b = expert.decision_line(int(k), int(k2))
            if count >= min_fraction * own.sum() and np.any(w):
                lines.append((w, b, i))
    return lines


def figure_regions(model: AdaptiveMixture, data: Any | None = None, ax: Any = None) -> Any:
    """The paper's Fig. 3: the F1-F2 plane, the data, each used expert's decision line and
    the gate's regions (the expert with the largest proportion)."""
    from tinymoe import viz

    tr = data if data is not None else vowels("train")
    return viz.gate_regions_2d(model.gate_probs, tr.X, tr.y, expert_lines(model, tr.X),
                               ax=ax, xlabel="F1 (kHz)", ylabel="F2 (kHz)",
                               title=f"{model.n_experts} experts: gate regions and "
                                     f"decision lines",
                               class_names=["heed [i]", "hid [I]", "hod [a]", "hud [Λ]"])


def figure_load(run_: Run, ax: Any = None) -> Any:
    """Mean mixing proportion of each expert over training (paper: all but 2-3 go to 0)."""
    from tinymoe import viz

    fig = viz.expert_load(np.asarray(run_.load_curve), ax=ax,
                          title=f"{run_.system}: mean mixing proportion per expert")
    axis = fig.axes[0] if ax is None else ax
    axis.set_xlabel("epoch")
    axis.set_ylabel("mean mixing proportion p_i")
    if run_.epochs is not None:
        axis.axvline(run_.epochs, color="0.5", linestyle=":", linewidth=1.0)
    return fig


def write_outputs(result: VowelResult, out: Path, data: tuple | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vowels_1991.md").write_text(format_table(result) + "\n", encoding="utf-8")
    for system in ("ME4", "ME8"):
        if system not in result.summaries:
            continue
        r, model = train(system, 0, result.summaries[system].step_size, data=data,
                         criterion=result.criterion, extra_epochs=2000)
        figure_regions(model, data[0] if data else None).savefig(
            out / f"vowels_1991_{system}_regions.png", dpi=120)
        figure_load(r).savefig(out / f"vowels_1991_{system}_load.png", dpi=120)


# --- step-size exploration ----------------------------------------------------------------------
def explore(system: str, grid: Sequence[float] = EXPLORE_GRID,
            seeds: Sequence[int] = EXPLORE_SEEDS, max_epochs: int = 10_000,
            progress: bool = True) -> dict[float, list[int | None]]:
    """Epochs to criterion for every step size of ``grid`` from the same starts ``seeds``.

    The paper chose each system's fixed step size "by a limited exploration" from the same
    initial conditions; ``best_step_size`` then takes the fastest that always converged.
    """
    from tqdm.auto import tqdm

    data = (vowels("train"), vowels("test"))
    table: dict[float, list[int | None]] = {}
    for eps in tqdm(list(grid), desc=f"explore {system}", disable=not progress):
        table[eps] = [train(system, s, eps, data=data, max_epochs=max_epochs,
                            record_curves=False)[0].epochs for s in seeds]
    return table


def best_step_size(table: dict[float, list[int | None]]) -> float:
    ok = {eps: float(np.mean(v)) for eps, v in table.items() if all(e is not None for e in v)}
    if not ok:
        raise RuntimeError("vowels_1991: no step size reached the criterion from every start")
    return min(ok, key=ok.get)


def record_exploration(tables: dict[str, dict[float, list[int | None]]], argv: list[str]
                       ) -> Any:
    """Write the step-size exploration (``--explore --record``) as ``vowels-explore``: per
    system and step size the epochs to criterion from each start (None: never reached),
    their mean when every start reached it, and the chosen step size."""
    results = {system: {"epochs": {f"{eps:g}": v for eps, v in table.items()},
                        "mean": {f"{eps:g}": (float(np.mean(v)) if all(e is not None for e in v)
                                               else None) for eps, v in table.items()},
                        "best": best_step_size(table)}
               for system, table in tables.items()}
    return records.record("vowels-explore", argv=argv, seeds=list(EXPLORE_SEEDS),
                          settings={"grid": sorted({eps for t in tables.values() for eps in t}),
                                    "seeds": list(EXPLORE_SEEDS),
                                    "criterion": CRITERION, "max_epochs": 10_000},
                          results=results)


# --- tour and CLI --------------------------------------------------------------------------------
def tour_line(fast: bool = True, progress: bool = False) -> dict[str, Any]:
    """One line for ``tinymoe tour``: ME4 vs BP6, 2 seeds (fast) or 5."""
    seeds = 2 if fast else 5
    res = run(seeds=seeds, fast=fast, progress=progress, systems=("ME4", "BP6"))
    me, bp = res.summaries["ME4"], res.summaries["BP6"]
    same = run(seeds=1, fast=True, progress=progress, systems=("ME4", "BP6"),
               step_sizes={"ME4": 4.0, "BP6": 4.0}).summaries
    data = (vowels("train"), vowels("test"))
    r, model = train("ME4", 0, data=data, extra_epochs=500)
    return {
        "stage": "1 · adaptive mixture",
        "paper": "Jacobs, Jordan, Nowlan & Hinton 1991",
        "trained": f"4 linear experts + softmax gate (eq. 3) vs 2-6-4 backprop net, batch GD "
                   f"to avg sq. error {CRITERION} on vowels, {seeds} seeds",
        "params": f"{me.params} / {me.params} (BP6: {bp.params})",
        "metric": f"epochs ME4 {me.epochs_mean:.0f} vs BP6 {bp.epochs_mean:.0f} at each "
                  f"one's tuned step size (BP/ME {bp.epochs_mean / me.epochs_mean:.2f}); "
                  f"{same['ME4'].epochs_mean:.0f} vs {same['BP6'].epochs_mean:.0f} at equal "
                  f"step size 4; test acc {100 * me.test_acc:.0f}% / {100 * bp.test_acc:.0f}%",
        "paper_claim": "1124 vs 2209 epochs (about half); 90% test for both",
        "figures": {"vowels_1991_regions": lambda: figure_regions(model, data[0]),
                    "vowels_1991_load": lambda: figure_load(r)},
    }


def record_result(result: VowelResult, argv: list[str], name: str = "vowels") -> Any:
    """Write the table's figures (per system, the t-tests, the ratio, per-seed epochs) to
    the records."""
    per_seed = {s: [r.epochs if r.epochs is not None else "not reached"
                    for r in result.runs if r.system == s] for s in result.summaries}
    has_both = any(s in result.summaries for s in ("ME4", "ME8")) and \
        any(s in result.summaries for s in ("BP6", "BP12"))
    return records.record(
        name, argv=argv, seeds=list(range(result.seeds)),
        settings={"criterion": result.criterion, "max_epochs": 5_000 if result.fast
                  else MAX_EPOCHS,
                  "step_sizes": {s: sm.step_size for s, sm in result.summaries.items()}},
        results={"seconds": result.seconds,
                 "systems": {s: records.compact(asdict(sm))
                             for s, sm in result.summaries.items()},
                 "speedup": result.speedup if has_both else "n/a",
                 "ratios": {name: dict(zip(("ratio", "lo95", "hi95"),
                                           records.compact(result.ratio_interval(*pair))))
                            for name, pair in RATIOS.items()
                            if all(s in result.summaries for s in (*pair[0], *pair[1]))},
                 "t_tests": {k: {"t": records.compact(t), "df": df}
                             for k, (t, df) in result.t_tests.items()},
                 "epochs_per_seed": per_seed},
        fast=result.fast)


def main_vowels(argv: Sequence[str] | None = None) -> int:
    """``tinymoe repro vowels [--seeds N] [--fast] [--out DIR] [--explore]``."""
    ap = argparse.ArgumentParser(prog="tinymoe repro vowels",
                                 description="Reproduce Table 1 of Jacobs et al. (1991).")
    ap.add_argument("--seeds", type=int, default=25, help="runs per system (default 25)")
    ap.add_argument("--fast", action="store_true",
                    help=f"at most {FAST_SEEDS} seeds (also TINYMOE_FAST=1)")
    ap.add_argument("--out", default=None, help="folder for the table and figures")
    ap.add_argument("--step-size", type=float, default=None,
                    help="one fixed step size for every system instead of STEP_SIZES")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated, e.g. ME1,ME4,BP6 (ME<k>: k experts; BP<k>: k "
                         "hidden units)")
    ap.add_argument("--criterion", type=float, default=CRITERION,
                    help=f"average squared error to reach (default {CRITERION})")
    ap.add_argument("--explore", action="store_true",
                    help="redo the step-size exploration instead (prints a table per system)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--workers", type=int, default=1,
                    help="processes training runs in parallel (same results; default 1)")
    records.add_record_argument(ap)
    ap.add_argument("--record-as", default="vowels",
                    help="record name (default vowels; e.g. vowels-shared-step for a variant)")
    args = ap.parse_args(argv)
    fast = args.fast or os.environ.get("TINYMOE_FAST") == "1"
    if args.explore:
        tables = {}
        for system in SYSTEMS:
            table = explore(system, progress=not args.no_progress)
            tables[system] = table
            print(system, {k: v for k, v in table.items()}, "->", best_step_size(table))
        if args.record:
            print("recorded", record_exploration(tables, ["vowels", *(argv or [])]))
        return 0
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    for s in systems:
        build(s, 0)  # a clear error for an unknown system, before any training
    steps = {s: STEP_SIZES.get(s, 1.0) for s in systems} if args.step_size is None \
        else {s: args.step_size for s in systems}
    result = run(seeds=args.seeds, fast=fast, out=args.out, progress=not args.no_progress,
                 systems=systems, step_sizes=steps, criterion=args.criterion,
                 workers=args.workers)
    print(format_table(result))
    if args.record:
        print("recorded", record_result(result, ["vowels", *(argv or [])], args.record_as))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_vowels())
