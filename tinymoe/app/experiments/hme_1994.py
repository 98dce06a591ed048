"""Jordan & Jacobs (1994): EM vs gradient ascent on a hierarchical mixture of experts.

The paper's robot-dynamics benchmark (12 inputs, 15,000 cases, a 16-expert tree) is not
shipped; its claim is about *how fast* EM converges compared with gradient methods on a
problem with piecewise structure: HME by EM (Algorithm 1) reached relative error 0.10 in 35
epochs, backprop 0.09 in 5,500 (Table 1). We test the same claim on a small task with the
structure a 2 x 2 tree can represent:

    x ~ U[-1, 1]^2,  y = f_q(x) + N(0, 0.1^2),  f_q linear on each quadrant q (and
    discontinuous across the axes)

The same tree (2 branches x 2 Gaussian linear experts, learned variances), from the same
initial weights, is trained (a) by full-batch gradient ascent on the mean log-likelihood
with a fixed step size and (b) by EM. We report

- the gradient method's final mean log-likelihood after ``GRAD_EPOCHS`` epochs (the median
  of its last 10% of epochs: with a fixed step size the curve has spikes once the learned
  variances shrink), and the epoch at which it first got within 1% of its total gain up to
  that level (its "epochs to converge");
- the EM iterations needed to reach that same level (one EM iteration = one epoch, as the
  paper counts; each also runs a few IRLS Newton steps per gate, reported separately);
- their ratio, next to the paper's 5,500 / 35 = 157;
- the relative test error ``sum (y - yhat)^2 / sum (y - mean y)^2`` of a linear fit, the
  gradient-trained tree and the EM-trained tree (paper: 0.31 / 0.09 backprop / 0.10 EM).

``GRAD_LR`` was chosen by a limited exploration (``explore``) from the same initial
conditions: the step size with the highest final level among those that train *stably*,
i.e. whose mean log-likelihood never falls by more than 0.05 per case from one epoch to the
next. Larger step sizes climb faster at first, but once the experts' variances shrink the
curvature grows like 1/sigma^2 and a fixed step starts to bounce (hundreds of drops of
0.05-5 nats per case): not a method anyone would call converged.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinymoe.app import records
from tinymoe.moe.hme import HME, FitHistory, fit_em, fit_gradient

N_TRAIN, N_TEST, NOISE = 1000, 1000, 0.1
GRAD_EPOCHS = 5000  # the gradient method's budget
EM_ITERS = 100
# From explore() (seed 1000, 5,000 epochs): final level of the mean log-likelihood, and the
# number of epochs on which it fell by more than 0.05 (unstable when > 0)
#   lr      0.01    0.03    0.1     0.3     1.0
#   level  -0.440  -0.190  -0.222  +0.082  -1.427
#   drops      0       0     304    1284    many
GRAD_LR = 0.03
MAX_DROP = 0.05
EXPLORE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
FAST = {"n_train": 500, "grad_epochs": 1500, "em_iters": 40, "seeds": 1}

PAPER = {"linear": (0.31, 1), "backprop": (0.09, 5500), "hme_em": (0.10, 35),
         "hme_lsq": (0.12, 39)}


# --- the task --------------------------------------------------------------------------------
PIECES = np.array([  # (w1, w2, b) of f_q for the quadrants (x1<0,x2<0), (x1<0,x2>=0), ...
    [2.0, 0.0, 1.0],
    [0.0, 1.0, -1.0],
    [0.0, -3.0, 2.0],
    [0.5, 0.0, 0.0],
])


def piecewise_target(X: np.ndarray) -> np.ndarray:
    """The noiseless ``f(x)``: a different plane on each quadrant."""
    q = 2 * (X[:, 0] >= 0) + (X[:, 1] >= 0)  # (n,) quadrant index 0..3
    W = PIECES[q]  # (n, 3)
    return W[:, 0] * X[:, 0] + W[:, 1] * X[:, 1] + W[:, 2]


def piecewise_data(n: int, seed: int = 0, noise: float = NOISE) -> tuple[np.ndarray, np.ndarray]:
    """``n`` cases ``(X (n, 2), y (n, 1))`` of the piecewise-linear regression task."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1.0, 1.0, (n, 2))
    y = piecewise_target(X) + noise * rng.standard_normal(n)
    return X, y[:, None]


def relative_error(y: np.ndarray, yhat: np.ndarray) -> float:
    """``sum (y - yhat)^2 / sum (y - mean y)^2`` (1 = predicting the mean)."""
    return float(np.sum((y - yhat) ** 2) / np.sum((y - y.mean(axis=0)) ** 2))


def linear_fit(X: np.ndarray, y: np.ndarray, Xt: np.ndarray) -> np.ndarray:
    """Least-squares plane, the paper's "Linear" row; returns predictions on ``Xt``."""
    A = np.c_[X, np.ones(len(X))]
    beta, *_ = np.linalg.lstsq(A, y, rcond=None)
    return np.c_[Xt, np.ones(len(Xt))] @ beta


def make_tree(seed: int, y: np.ndarray) -> HME:
    """The 2 x 2 tree of Gaussian linear experts, variances starting at var(y)."""
    return HME(2, 1, 2, 2, expert="gaussian", variance=float(np.var(y)), rng=seed)


# --- one comparison --------------------------------------------------------------------------
def final_level(curve: Sequence[float]) -> float:
    """The median of the last 10% of a training curve: its final value, robust to spikes."""
    c = np.asarray(curve, dtype=float)
    return float(np.median(c[-max(1, len(c) // 10):]))


def first_reaching(curve: Sequence[float], level: float) -> int | None:
    """The first epoch whose value is >= ``level`` (None if never)."""
    hit = np.flatnonzero(np.asarray(curve) >= level)
    return int(hit[0]) if len(hit) else None


@dataclass
class Comparison:
    seed: int
    grad_final_ll: float
    em_final_ll: float
    grad_epochs: int  # epochs for the gradient method to get within 1% of its final gain
    em_epochs: int | None  # EM iterations to reach the same level
    em_epochs_to_grad_final: int | None  # EM iterations to pass the gradient's final value
    em_irls_steps: int  # Newton steps inside the M-steps, up to em_epochs
    rel_err_linear: float
    rel_err_grad: float
    rel_err_em: float
    ms_per_grad_epoch: float = 0.0
    ms_per_em_epoch: float = 0.0
    grad_curve: list[float] = field(repr=False, default_factory=list)
    em_curve: list[float] = field(repr=False, default_factory=list)

    @property
    def ratio(self) -> float | None:
        return None if not self.em_epochs else self.grad_epochs / self.em_epochs


def compare(seed: int, *, n_train: int = N_TRAIN, grad_epochs: int = GRAD_EPOCHS,
            em_iters: int = EM_ITERS, lr: float = GRAD_LR, progress: bool = False,
            data_seed: int = 0) -> tuple[Comparison, HME, HME]:
    """Train the same tree from ``seed`` by gradient and by EM; returns (comparison,
    gradient-trained tree, EM-trained tree). The data set is fixed by ``data_seed``."""
    X, y = piecewise_data(n_train, data_seed)
    Xt, yt = piecewise_data(N_TEST, data_seed + 10_000)
    tree_g = make_tree(seed, y)
    tree_e = copy.deepcopy(tree_g)  # the same initial conditions
    g: FitHistory = fit_gradient(tree_g, X, y, grad_epochs, lr, progress=progress)
    e: FitHistory = fit_em(tree_e, X, y, em_iters, progress=progress)
    ll0, final = g.log_likelihood[0], final_level(g.log_likelihood)
    level = final - 0.01 * (final - ll0)
    grad_epochs_needed = first_reaching(g.log_likelihood, level)
    em_epochs = first_reaching(e.log_likelihood, level)
    comp = Comparison(
        seed, final, e.log_likelihood[-1], int(grad_epochs_needed), em_epochs,
        first_reaching(e.log_likelihood, final),
        int(sum(e.irls_steps[:em_epochs])) if em_epochs else int(sum(e.irls_steps)),
        relative_error(yt, linear_fit(X, y, Xt)), relative_error(yt, tree_g.predict(Xt)),
        relative_error(yt, tree_e.predict(Xt)), 1e3 * g.seconds / max(grad_epochs, 1),
        1e3 * e.seconds / max(len(e.log_likelihood) - 1, 1), g.log_likelihood,
        e.log_likelihood)
    return comp, tree_g, tree_e


# --- the reproduction ------------------------------------------------------------------------
@dataclass
class HMEResult:
    seeds: int
    fast: bool
    n_train: int
    grad_epochs: int
    em_iters: int
    lr: float
    comparisons: list[Comparison]
    seconds: float

    def _mean(self, name: str) -> float:
        vals = [getattr(c, name) for c in self.comparisons if getattr(c, name) is not None]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def ratio(self) -> float:
        """Mean gradient epochs / mean EM epochs to the gradient method's final level."""
        return self._mean("grad_epochs") / self._mean("em_epochs")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def run(seeds: int = 10, fast: bool = False, out: str | Path | None = None,
        progress: bool = True) -> HMEResult:
    """Compare EM and gradient ascent from ``seeds`` initial conditions (fast: 1 seed, 500
    cases, 1,500 gradient epochs). With ``out``, write ``hme_1994.md`` and figures."""
    from tqdm.auto import tqdm

    if seeds < 1:
        raise ValueError(f"hme_1994.run: seeds={seeds} must be >= 1")
    cfg = {"n_train": N_TRAIN, "grad_epochs": GRAD_EPOCHS, "em_iters": EM_ITERS}
    if fast:
        cfg = {k: FAST[k] for k in cfg}
        seeds = min(seeds, FAST["seeds"])
    start = time.perf_counter()
    comps = []
    for seed in tqdm(range(seeds), desc="1994 HME: gradient vs EM", disable=not progress):
        comps.append(compare(seed, **cfg)[0])
    result = HMEResult(seeds, fast, cfg["n_train"], cfg["grad_epochs"], cfg["em_iters"],
                       GRAD_LR, comps, time.perf_counter() - start)
    if out is not None:
        write_outputs(result, Path(out))
    return result


def format_table(result: HMEResult) -> str:
    """The measured comparison next to the paper's Table 1."""
    r = result
    m = r._mean
    head = (f"Jordan & Jacobs (1994) — HME 2x2 on piecewise-linear regression "
            f"({r.n_train} cases, {r.seeds} seed{'s' if r.seeds > 1 else ''}"
            f"{', fast' if r.fast else ''}); gradient: lr {r.lr:g}, {r.grad_epochs} epochs")
    grad_row = (f"| HME by gradient ascent | {m('rel_err_grad'):.3f} | {m('grad_epochs'):.0f} | "
                f"0.09 (backprop) | 5,500 (backprop) |")
    em_row = (f"| HME by EM (Algorithm 1) | {m('rel_err_em'):.3f} | {m('em_epochs'):.1f} | "
              f"0.10 | 35 |")
    columns = ("| method | rel. test error | epochs to converge | paper: rel. error "
               "| paper: epochs |")
    lines = [head, "", columns,
             "|---|---|---|---|---|",
             f"| linear (least squares) | {m('rel_err_linear'):.3f} | 1 | 0.31 | 1 |",
             grad_row, em_row, ""]
    lines.append("epochs to converge: the gradient method's first epoch within 1% of its "
                 "total gain in log-likelihood (up to its final level, the median of its last "
                 "10% of epochs); EM's first iteration reaching that same level.")
    lines.append(f"ratio gradient / EM epochs: {r.ratio:.0f} (paper: 5500 / 35 = 157)")
    lines.append(f"mean log-likelihood per case: gradient final {m('grad_final_ll'):.3f}, EM "
                 f"final {m('em_final_ll'):.3f} after {r.em_iters} iterations; EM passes the "
                 f"gradient's final level after {m('em_epochs_to_grad_final'):.1f} iterations")
    lines.append(f"IRLS Newton steps inside EM's M-steps up to that point: "
                 f"{m('em_irls_steps'):.0f} (all gates together); time per epoch: gradient "
                 f"{m('ms_per_grad_epoch'):.1f} ms, EM {m('ms_per_em_epoch'):.1f} ms")
    per_start = ", ".join(f"{c.grad_epochs}/{c.em_epochs}" for c in r.comparisons)
    lines.append(f"per start, gradient/EM epochs: {per_start}")
    reached = sum(c.em_epochs is not None for c in r.comparisons)
    if reached < len(r.comparisons):
        lines.append(f"EM did not reach the gradient's level from "
                     f"{len(r.comparisons) - reached} of {len(r.comparisons)} starts")
    return "\n".join(lines)


# --- figures ---------------------------------------------------------------------------------
def figure_curves(comp: Comparison, ax: Any = None) -> Any:
    """Mean log-likelihood per epoch: gradient vs EM (log-scaled epochs)."""
    from tinymoe import viz

    fig = viz.loss_curves({"gradient ascent": comp.grad_curve, "EM (Algorithm 1)":
                           comp.em_curve}, ax=ax, xlabel="epoch",
                          ylabel="mean log-likelihood", title="HME 2x2: EM vs gradient")
    fig.axes[0].set_xscale("symlog", linthresh=10)
    return fig


def figure_regions(tree: HME, ax: Any = None) -> Any:
    """The input plane coloured by the expert with the largest prior weight g_i g_{j|i}."""
    from tinymoe import viz

    X, _ = piecewise_data(400, 0)
    q = 2 * (X[:, 0] >= 0) + (X[:, 1] >= 0)
    return viz.gate_regions_2d(tree.gate_probs, X, q, ax=ax, xlabel="x1", ylabel="x2",
                               title="HME: which expert the gates pick",
                               class_names=["quadrant -,-", "quadrant -,+", "quadrant +,-",
                                            "quadrant +,+"])


def write_outputs(result: HMEResult, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hme_1994.md").write_text(format_table(result) + "\n", encoding="utf-8")
    comp = result.comparisons[0]
    figure_curves(comp).savefig(out / "hme_1994_curves.png", dpi=120)


# --- step-size exploration ----------------------------------------------------------
def explore(grid: Sequence[float] = EXPLORE_GRID, seed: int = 1000, epochs: int = GRAD_EPOCHS,
            progress: bool = True) -> dict[float, tuple[float, int]]:
    """``lr -> (final level, drops)`` of gradient ascent from one start: the final level
    (:func:`final_level`) of the mean log-likelihood and the number of epochs on which it
    fell by more than ``MAX_DROP`` (a diverged run: ``(-inf, epochs)``)."""
    from tqdm.auto import tqdm

    X, y = piecewise_data(N_TRAIN, 0)
    table = {}
    for lr in tqdm(list(grid), desc="explore lr", disable=not progress):
        tree = make_tree(seed, y)
        try:
            curve = fit_gradient(tree, X, y, epochs, lr).log_likelihood
            table[lr] = (final_level(curve), int(np.sum(np.diff(curve) < -MAX_DROP)))
        except FloatingPointError:
            table[lr] = (float("-inf"), epochs)
    return table


def best_lr(table: dict[float, tuple[float, int]]) -> float:
    """The stable step size (no drop) with the highest final level."""
    stable = {lr: level for lr, (level, drops) in table.items() if drops == 0}
    if not stable:
        raise RuntimeError("hme_1994: no step size trained stably; try smaller ones")
    return max(stable, key=stable.get)


# --- tour and CLI ----------------------------------------------------------------------------
def tour_line(fast: bool = True, progress: bool = False) -> dict[str, Any]:
    """One line for ``tinymoe tour``: one start, gradient vs EM."""
    cfg = {k: FAST[k] for k in ("n_train", "grad_epochs", "em_iters")} if fast else {}
    comp, _, tree_e = compare(0, progress=progress, **cfg)
    params = tree_e.num_parameters()
    ratio = "n/a" if comp.ratio is None else f"{comp.ratio:.0f}x"
    return {
        "stage": "2 · hierarchical mixture + EM",
        "paper": "Jordan & Jacobs 1994",
        "trained": f"2x2 HME of Gaussian linear experts on piecewise-linear regression, by "
                   f"batch gradient ({cfg.get('grad_epochs', GRAD_EPOCHS)} epochs) and by EM",
        "params": f"{params} / {params}",
        "metric": f"epochs to the gradient's final likelihood: gradient {comp.grad_epochs}, "
                  f"EM {comp.em_epochs} ({ratio}); rel. test error EM {comp.rel_err_em:.3f}, "
                  f"gradient {comp.rel_err_grad:.3f}, linear {comp.rel_err_linear:.3f}",
        "paper_claim": "EM 35 epochs vs backprop 5,500 (157x); rel. error 0.10 vs linear 0.31",
        "figures": {"hme_1994_curves": lambda: figure_curves(comp),
                    "hme_1994_regions": lambda: figure_regions(tree_e)},
    }


def record_result(result: HMEResult, argv: list[str]) -> Any:
    """Write every figure of :func:`format_table` (means and per-start values) to the
    records."""
    keys = ("rel_err_linear", "rel_err_grad", "rel_err_em", "grad_epochs", "em_epochs",
            "grad_final_ll", "em_final_ll", "em_epochs_to_grad_final", "em_irls_steps",
            "ms_per_grad_epoch", "ms_per_em_epoch")
    return records.record(
        "hme", argv=argv, seeds=[c.seed for c in result.comparisons],
        settings={"n_train": result.n_train, "grad_epochs": result.grad_epochs,
                  "em_iters": result.em_iters, "lr": result.lr},
        results={"seconds": result.seconds, "ratio": result.ratio,
                 "em_reached": sum(c.em_epochs is not None for c in result.comparisons),
                 "mean": {k: result._mean(k) for k in keys},
                 "per_seed": [records.compact(asdict(c)) for c in result.comparisons]},
        fast=result.fast)


def main_hme(argv: Sequence[str] | None = None) -> int:
    """``tinymoe repro hme [--seeds N] [--fast] [--out DIR] [--explore]``."""
    ap = argparse.ArgumentParser(prog="tinymoe repro hme",
                                 description="EM vs gradient on a hierarchical mixture of "
                                             "experts (Jordan & Jacobs 1994).")
    ap.add_argument("--seeds", type=int, default=10, help="initial conditions (default 10)")
    ap.add_argument("--fast", action="store_true", help="1 seed, 500 cases (also "
                                                        "TINYMOE_FAST=1)")
    ap.add_argument("--out", default=None, help="folder for the table and figures")
    ap.add_argument("--explore", action="store_true", help="redo the step-size exploration")
    ap.add_argument("--no-progress", action="store_true")
    records.add_record_argument(ap)
    args = ap.parse_args(argv)
    fast = args.fast or os.environ.get("TINYMOE_FAST") == "1"
    if args.explore:
        table = explore(progress=not args.no_progress)
        print(table, "->", best_lr(table))
        if args.record:
            print("recorded", records.record(
                "hme-explore", argv=["hme", *(argv or [])], seeds=[1000],
                settings={"grid": list(table), "epochs": GRAD_EPOCHS, "n_train": N_TRAIN},
                results={"best_lr": best_lr(table),
                         "lr": {f"{lr:g}": {"final_level": records.compact(level),
                                            "drops": drops}
                                for lr, (level, drops) in table.items()}}))
        return 0
    result = run(seeds=args.seeds, fast=fast, out=args.out, progress=not args.no_progress)
    print(format_table(result))
    if args.record:
        print("recorded", record_result(result, ["hme", *(argv or [])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_hme())
