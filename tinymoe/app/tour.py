"""``tinymoe tour``: run every stage end to end on the shipped data and report.

Each stage lives in ``tinymoe.app.experiments`` and offers ``tour_line(fast=..., progress=...)``,
returning a dict with ``stage``, ``paper``, ``trained``, ``params`` (total / active),
``metric`` (what we measured), ``paper_claim`` and optionally ``figures`` (name -> a
function that draws a matplotlib Figure). The tour prints a summary table and writes the
figures plus ``report.md`` and ``report.html`` to an output folder.
"""
from __future__ import annotations

import html
import importlib
import inspect
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

# In historical order; each entry names the module that runs the stage.
STAGES: list[str] = [
    "tinymoe.app.experiments.autograd_00",
    "tinymoe.app.experiments.vowels_1991",
    "tinymoe.app.experiments.hme_1994",
    "tinymoe.app.experiments.deep_moe_2013",
    "tinymoe.app.experiments.conditional_2015",
    "tinymoe.app.experiments.table6_2017",
    "tinymoe.app.experiments.gshard_2020",
    "tinymoe.app.experiments.switch_2021",
    "tinymoe.app.experiments.switch_scaling",
    "tinymoe.app.experiments.modern_2024",
    "tinymoe.app.experiments.inference",
]

COLUMNS = ["stage", "paper", "trained", "params", "metric", "paper_claim", "seconds"]
HEADERS = ["stage", "paper", "what was trained", "params (total / active)", "measured",
           "paper's claim", "s"]


def run_stage(module_name: str, fast: bool, progress: bool) -> dict[str, Any]:
    module = importlib.import_module(module_name)
    fn: Callable[..., dict[str, Any]] = module.tour_line
    kwargs: dict[str, Any] = {"fast": fast}
    if "progress" in inspect.signature(fn).parameters:
        kwargs["progress"] = progress
    start = time.perf_counter()
    line = fn(**kwargs)
    line["seconds"] = f"{time.perf_counter() - start:.1f}"
    return line


def markdown_table(lines: list[dict[str, Any]]) -> str:
    rows = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for line in lines:
        cells = [str(line.get(c, "")).replace("|", "/") for c in COLUMNS]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def text_table(lines: list[dict[str, Any]]) -> str:
    """A plain table for the terminal: one block per stage (the cells are long)."""
    out = []
    for line in lines:
        out.append(f"{line['stage']}  —  {line['paper']}  ({line['seconds']} s)")
        out.append(f"    trained : {line['trained']}")
        out.append(f"    params  : {line['params']} (total / active)")
        out.append(f"    measured: {line['metric']}")
        out.append(f"    paper   : {line['paper_claim']}")
    return "\n".join(out)


THREAD_MODES = {"adaptive": "threads adapted to the free cores (--threads all: every core, "
                            "bit-for-bit repeatable)",
                "all cores": "every core, bit-for-bit repeatable",
                "environment": "thread counts from your environment variables",
                "fixed": "a fixed thread count (--threads N)"}


def write_report(lines: list[dict[str, Any]], out: Path, figures: list[Path],
                 fast: bool, seconds: float, threads: str = "") -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    mode = "fast" if fast else "full"
    md = [f"# tinymoe tour ({mode} mode, {seconds:.0f} s)", ""]
    md += [f"Threads: {threads}.", ""] if threads else []
    md += [markdown_table(lines), ""]
    md += [f"![{p.stem}]({p.name})" for p in figures]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")

    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(line.get(c, '')))}</td>"
                                    for c in COLUMNS) + "</tr>" for line in lines)
    imgs = "".join(f'<figure><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}">'
                   f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in figures)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tinymoe tour</title>"
            f"<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}"
            f"table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;"
            f"vertical-align:top}}img{{max-width:480px}}figure{{display:inline-block}}"
            f"</style></head><body><h1>tinymoe tour ({mode} mode, {seconds:.0f} s)</h1>"
            + (f"<p>Threads: {html.escape(threads)}.</p>" if threads else "") +
            f"<table><tr>{head}</tr>{body}</table>{imgs}</body></html>")
    html_path = out / "report.html"
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path


@contextmanager
def use_threads(choice: str) -> Iterator[str]:
    """``tinymoe tour --threads``, for the duration of the ``with`` block: ``auto`` adapts to
    the free cores unless the user set a thread variable
    (:func:`tinymoe.threads.adapt_unless_chosen`), ``all`` keeps every core (tinymoe's
    repeatable default), ``N`` fixes N threads. Yields the policy's mode; afterwards the
    caller's threads are as they were (:func:`tinymoe.threads.restored`)."""
    from tinymoe import threads

    n = int(choice) if choice.isdigit() else 0
    if choice not in ("auto", "all") and n < 1:
        raise ValueError(f"--threads must be auto, all or a count >= 1, got {choice!r}")
    with threads.restored():
        if choice == "auto":
            threads.adapt_unless_chosen()
        elif choice != "all":
            threads.set_num_threads(n)
        yield threads.describe()["mode"]


def run_tour(fast: bool = False, out: str | Path = "tinymoe-out", progress: bool = True,
             stages: list[str] | None = None, echo: Callable[[str], None] = print) -> list[dict]:
    """Run the stages, print the summary, write figures and reports to ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # the tour only writes files; never opens windows
    from tqdm.auto import tqdm

    from tinymoe import viz

    out = Path(out)
    start = time.perf_counter()
    lines, figures = [], []
    names = stages or STAGES
    bar = tqdm(names, desc="tinymoe tour", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name.rsplit(".", 1)[-1])
        line = run_stage(name, fast, progress)
        for fig_name, draw in (line.pop("figures", None) or {}).items():
            figures.append(viz.save(draw(), out / f"{fig_name}.png"))
        lines.append(line)
    seconds = time.perf_counter() - start
    from tinymoe import threads as _threads

    policy = THREAD_MODES.get(_threads.describe()["mode"], "")
    md, page = write_report(lines, out, figures, fast, seconds, policy)
    echo("")
    echo(text_table(lines))
    echo(f"\n{len(lines)} stages in {seconds:.0f} s. Report: {md} and {page}; "
         f"{len(figures)} figures in {out}/")
    echo(f"Threads: {policy}.")
    return lines
