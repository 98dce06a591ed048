"""Render a docs page from recorded runs: every number on it comes from a record file.

A template is markdown with placeholders ``{{ EXPR | SPEC }}``. ``EXPR`` is a Python
expression over the records, each under its file name with ``-`` written ``_``
(``switch_fast`` is ``switch-fast.json``), keys read as attributes or by subscript::

    {{ switch.results.by_seed['0'].runs.dense.val_loss | .3f }}     -> 2.076
    {{ switch.results.by_seed['0'].runs['switch cf 1.25'].val_dropped | %.1f }}  -> 7.3 (× 100)
    {{ hme.results.ratio | .0f }}
    {{ table6.results.settings['0,0'].val_loss - hme.results.mean.rel_err_em | .3f }}

``SPEC`` is a format spec (``.3f``, ``,``, ``d``); a leading ``%`` multiplies by 100 first
(a fraction shown as a percentage). Without ``| SPEC`` the value is shown as ``str``. The
expression may call ``mean``, ``sd`` (sample), ``ci95`` (half-width of the 95 % t-interval
of a mean), ``abs``, ``min``, ``max``, ``len``, ``sum``, ``round``. ``{{{{`` and ``}}}}``
write literal braces.

``tinymoe repro render`` writes ``docs/reproductions.md`` from
``docs/_templates/reproductions.md.in``; ``--check`` says whether the page is up to date
(the test suite runs the same check).
"""
from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinymoe.app import records

ROOT = Path(__file__).resolve().parents[2]
PAGES = {  # template -> page, relative to the checkout
    "docs/_templates/reproductions.md.in": "docs/reproductions.md",
}
PLACEHOLDER = re.compile(r"\{\{(?!\{)(.+?)\}\}(?!\})", re.S)

def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (scipy.stats.t)."""
    from scipy import stats

    if df < 1:
        raise ValueError(f"t975: df={df} must be >= 1 (a 95 % interval needs 2 values)")
    return float(stats.t.ppf(0.975, df))


def mean(xs: Sequence[float]) -> float:
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("mean: no values")
    return sum(xs) / len(xs)


def sd(xs: Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1)."""
    xs = [float(x) for x in xs]
    if len(xs) < 2:
        raise ValueError(f"sd: needs at least 2 values, got {len(xs)}")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ci95(xs: Sequence[float]) -> float:
    """Half-width of the 95 % t-interval of the mean of ``xs``."""
    return t975(len(xs) - 1) * sd(xs) / math.sqrt(len(xs))


class Rec(dict):
    """A record (or part of one) whose keys read as attributes too."""

    def __getattr__(self, key: str) -> Any:
        try:
            return wrap(self[key])
        except KeyError:
            raise AttributeError(f"no key {key!r} here; have {sorted(self)}") from None

    def __getitem__(self, key: Any) -> Any:
        try:
            return wrap(dict.__getitem__(self, key))
        except KeyError:
            raise KeyError(f"no key {key!r} here; have {sorted(self)}") from None

    def values(self) -> list:  # type: ignore[override]
        return [wrap(v) for v in dict.values(self)]

    def items(self) -> list:  # type: ignore[override]
        return [(k, wrap(v)) for k, v in dict.items(self)]


def wrap(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, Rec):
        return Rec(value)
    if isinstance(value, list):
        return [wrap(v) for v in value]
    return value


def namespace(folder: Path | None = None) -> dict[str, Any]:
    """Every record file of ``folder`` (default: the shipped records) by name."""
    folder = records.RECORDS if folder is None else folder
    ns: dict[str, Any] = {p.stem.replace("-", "_"): Rec(json.loads(
        p.read_text(encoding="utf-8"))) for p in sorted(folder.glob("*.json"))}
    ns.update(mean=mean, sd=sd, ci95=ci95, **TABLES)
    return ns


def _sweep(rec: dict) -> dict:
    """A recorded expert-count sweep as the dict its formatters take."""
    return {"settings": rec["settings"], **rec["results"]}


def _scaling(name: str) -> Any:
    def table(rec: dict) -> str:
        from tinymoe.app.experiments import switch_scaling

        return getattr(switch_scaling, name)(_sweep(rec))
    return table


def lr_cells(recs: Sequence[dict]) -> dict[str, dict[str, list[float]]]:
    """lr -> E -> the final validation losses (one per seed, by seed) of several
    learning-rate sweeps of the same models. A run that two sweeps both recorded (the same
    E, seed and rate) counts once; tests check that the two records agree."""
    runs: dict[tuple[float, int, int], float] = {}
    for rec in recs:
        for r in rec["results"]["runs"]:
            runs.setdefault((float(r["lr"]), int(r["E"]), int(r["seed"])), r["val_loss"])
    cells: dict[str, dict[str, list[float]]] = {}
    for (lr, E, _seed), loss in sorted(runs.items()):
        cells.setdefault(f"{lr:g}", {}).setdefault(str(E), []).append(loss)
    return cells


def _best_by_lr(cells: dict[str, dict[str, list[float]]]) -> dict[str, str]:
    """E -> the rate with the lowest mean loss among the rates run on the most seeds."""
    best = {}
    for E in sorted({E for row in cells.values() for E in row}, key=int):
        tried = {lr: row[E] for lr, row in cells.items() if E in row}
        most = max(len(v) for v in tried.values())
        best[E] = min((lr for lr, v in tried.items() if len(v) == most),
                      key=lambda lr: mean(tried[lr]))
    return best


def _lr_sweeps_table(*recs: dict) -> str:
    """Markdown: the mean final validation loss per rate (rows) and model (columns) over
    several learning-rate sweeps, with the number of seeds behind each cell; each model's
    best rate among those run on the most seeds in bold."""
    cells = lr_cells(recs)
    best = _best_by_lr(cells)
    Es = list(best)
    lines = ["| lr | " + " | ".join("dense" if E == "1" else f"E = {E}" for E in Es) + " |",
             "|---" * (1 + len(Es)) + "|"]
    for lr in sorted(cells, key=float):
        row = []
        for E in Es:
            v = cells[lr].get(E)
            text = "—" if not v else f"{mean(v):.4f} ({len(v)})"
            row.append(f"**{text}**" if best[E] == lr else text)
        lines.append(f"| {lr} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _best_lr(E: int, *recs: dict) -> tuple[float, float]:
    """``(lr, mean validation loss)`` of E experts' best learning rate over the sweeps
    ``recs`` (among the rates run on the most seeds)."""
    cells = lr_cells(recs)
    lr = _best_by_lr(cells)[str(E)]
    return float(lr), mean(cells[lr][str(E)])


def _best_lrs_text(*recs: dict) -> str:
    """``dense 0.02 (1.9409), E = 2 0.01 (…), …``: each model's best rate over the sweeps
    ``recs`` (as :func:`_best_lr`) with its mean final validation loss."""
    cells = lr_cells(recs)
    parts = []
    for E, lr in _best_by_lr(cells).items():
        name = "dense" if E == "1" else f"E = {E}"
        parts.append(f"{name} {float(lr):g} ({mean(cells[lr][E]):.4f})")
    return ", ".join(parts)


def _lr_mean(lr: float, E: int, *recs: dict) -> float:
    """Mean final validation loss of E experts at rate ``lr`` over the sweeps' seeds."""
    return mean(lr_cells(recs)[f"{float(lr):g}"][str(E)])


def _lr_diffs_text(lr: float, *recs: dict) -> str:
    """``E = 2 -0.0014, E = 4 ...``: each sparse model's mean loss minus dense's at ``lr``
    (models run on the same seeds as dense there)."""
    row = lr_cells(recs)[f"{float(lr):g}"]
    m = {E: mean(v) for E, v in row.items()}
    return ", ".join(f"E = {E} {m[E] - m['1']:+.4f}" for E in sorted(m, key=int)
                     if E != "1" and len(row[E]) == len(row["1"]))


def _fit_table(*recs: dict) -> str:
    """Markdown: per record (its steps and width) and model, the mean final loss on the
    training split and on the validation split over the seeds, and their gap. Several
    records of one learning-rate sweep (same steps and width) are read as one, each model
    at its best rate there."""
    lines = ["| steps | d | model | seeds | training split | validation | gap |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[int, int], list[dict]] = {}
    for rec in recs:
        st = rec["settings"]
        groups.setdefault((st["steps"], st["model"]["d_model"]), []).append(rec)
    for (steps, d), group in groups.items():
        runs = [r for rec in group for r in rec["results"]["runs"]]
        best = _best_by_lr(lr_cells(group))  # a record of one rate per model: that rate
        for E in sorted({r["E"] for r in runs}):
            rs = [r for r in runs if r["E"] == E and f"{r['lr']:g}" == best[str(E)]]
            tr, va = mean([r["train_loss"] for r in rs]), mean([r["val_loss"] for r in rs])
            name = "dense" if E == 1 else f"E = {E}"
            lines.append(f"| {steps:,} | {d} | {name} at lr {rs[0]['lr']:g} | {len(rs)} | "
                         f"{tr:.4f} | {va:.4f} | {va - tr:.4f} |")
    return "\n".join(lines)


def explore_table(rec: Any) -> str:
    """Markdown: mean epochs to criterion per system and step size of a ``vowels-explore``
    record (— : some start never reached it), the chosen step size in bold."""
    results, grid = rec["results"], [f"{eps:g}" for eps in rec["settings"]["grid"]]
    lines = ["| ε | " + " | ".join(grid) + " |", "|---" * (1 + len(grid)) + "|"]
    for system, row in results.items():
        best = f"{row['best']:g}"
        cells = []
        for eps in grid:
            m = row["mean"].get(eps)
            text = "—" if m is None else f"{m:.0f}"
            cells.append(f"**{text}**" if eps == best else text)
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _train_chars() -> int:
    """Characters in the training split of the shipped corpus (what the LM runs train on)."""
    from tinymoe.app.train import load_data

    return len(load_data()[1])


# Tables that an experiment formats itself, rendered from its record:
# ``{{ scaling_table(switch_scaling) }}``
TABLES = {"scaling_table": _scaling("format_table"),
          "capacity_table": _scaling("format_capacity"),
          "precision_table": _scaling("format_precision"),
          "balanced_table": lambda: _balanced("format_balanced")(),
          "balanced_drops": lambda E: _balanced("balanced_drops")(E),
          "explore_table": explore_table,
          "fit_table": _fit_table,
          "best_lr": _best_lr,
          "best_lrs_text": _best_lrs_text,
          "lr_mean": _lr_mean,
          "lr_diffs_text": _lr_diffs_text,
          "lr_sweeps_table": _lr_sweeps_table,
          "train_chars": _train_chars}


def _balanced(name: str) -> Any:
    """The drop rates of a perfectly balanced router: computed (seeded, exact), not run."""
    from tinymoe.app.experiments import switch_scaling

    return getattr(switch_scaling, name)


SAFE_BUILTINS = {"abs": abs, "min": min, "max": max, "len": len, "sum": sum, "round": round,
                 "sorted": sorted, "float": float, "int": int, "str": str, "zip": zip}


def _format(value: Any, spec: str | None) -> str:
    if spec is None or isinstance(value, str):
        return str(value)
    spec = spec.strip()
    if spec.startswith("%"):
        value, spec = 100 * value, spec[1:]
    text = format(value, spec)
    return text.replace("-", "−") if isinstance(value, (int, float)) and value < 0 else text


def render_text(template: str, ns: dict[str, Any] | None = None, where: str = "template") -> str:
    """``template`` with every ``{{ EXPR | SPEC }}`` replaced by its recorded value."""
    ns = namespace() if ns is None else ns

    def one(match: re.Match) -> str:
        body = match.group(1)
        expr, _, spec = body.rpartition("|") if "|" in body else (body, "", None)
        line = template.count("\n", 0, match.start()) + 1
        try:
            value = eval(expr.strip(), {"__builtins__": SAFE_BUILTINS, **ns})  # noqa: S307
        except Exception as e:  # name the placeholder, its line and what went wrong
            raise ValueError(f"render: {where}:{line}: {{{{{body}}}}} failed: "
                             f"{type(e).__name__}: {e}") from None
        try:
            return _format(value, spec)
        except (TypeError, ValueError) as e:
            raise ValueError(f"render: {where}:{line}: cannot format {value!r} with "
                             f"{spec!r}: {e}") from None

    out = PLACEHOLDER.sub(one, template)
    return out.replace("{{{{", "{{").replace("}}}}", "}}")


def render_page(template: str | Path, ns: dict[str, Any] | None = None) -> str:
    path = ROOT / template
    return render_text(path.read_text(encoding="utf-8"), ns, where=str(template))


def main_render(argv: Sequence[str] | None = None) -> int:
    """``tinymoe repro render [--check]``: write (or check) the pages rendered from records."""
    ap = argparse.ArgumentParser(prog="tinymoe repro render",
                                 description="Render docs/reproductions.md from the recorded "
                                             "runs in tinymoe/data/records/.")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if a page differs from its rendering")
    args = ap.parse_args(argv)
    stale = [page for template, page in PAGES.items()
             if not write_or_check(ROOT / page, render_page(template), args.check)]
    if stale:
        print("out of date (run `tinymoe repro render`): " + ", ".join(stale))
        return 1
    return 0


def write_or_check(target: Path, text: str, check: bool) -> bool:
    """Write ``text`` to ``target`` (saying so), or with ``check`` only compare; returns
    whether the page is (now) its rendering."""
    if check:
        return target.exists() and target.read_text(encoding="utf-8") == text
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target.relative_to(ROOT)}")
    return True


if __name__ == "__main__":
    raise SystemExit(main_render())
