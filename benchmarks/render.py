"""Render docs/benchmarks.md from the benchmark results: every figure on it comes from a run.

    python -m benchmarks.render            # write docs/benchmarks.md (also: tinymoe bench render)
    python -m benchmarks.render --check    # exit 1 if the page differs from its rendering

The page's template is ``docs/_templates/benchmarks.md.in``: markdown with placeholders
``{{ EXPR | SPEC }}`` (the syntax of :mod:`tinymoe.app.render`, which ``tinymoe repro render``
uses for the reproductions page). ``EXPR`` is evaluated over:

* every result file ``benchmarks/results/NAME.json`` under its ``NAME`` (keys read as
  attributes: ``{{ switch_layer.results.sizes[0].ratio_vs_fastest_torch | .2f }}``);
* ``section("NAME")``: the markdown that ``render(result)`` in ``benchmarks/bench_NAME.py``
  makes from ``benchmarks/results/NAME.json`` (tables, ratios, targets met or not).

**Adding a benchmark section** (the contract):

1. ``benchmarks/bench_NAME.py`` writes its result with ``_common.write_result("NAME", argv,
   settings, results, load_start)``: ``benchmarks/results/NAME.json`` holds ``name``,
   ``command``, ``date``, ``machine`` (CPU, cores, Python, NumPy, BLAS, Numba, PyTorch,
   transformers versions, thread variables), ``load_average`` (start, end), ``settings``
   and ``results`` (every figure the page shows; nothing is recomputed from timings here).
2. The same module defines ``render(result: dict) -> str``, the section's markdown from that
   dict alone (no imports of heavy libraries at render time beyond the module's own).
3. ``docs/_templates/benchmarks.md.in`` gets the section's prose and ``{{ section("NAME") }}``.
4. ``python -m benchmarks.render`` rewrites the page; ``tests/test_benchmarks.py`` checks that
   the committed page equals the rendering (no timing is ever asserted).

Sections whose scripts do not write results yet stay literal text in the template, marked
with an HTML comment saying so.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
TEMPLATE = ROOT / "docs" / "_templates" / "benchmarks.md.in"
PAGE = ROOT / "docs" / "benchmarks.md"


def load_module(name: str):
    """``benchmarks/bench_NAME.py`` as a module (it is a script, not a package member)."""
    path = BENCH / f"bench_{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"benchmarks.render: no {path.relative_to(ROOT)} for section "
                                f"{name!r}")
    mod_name = f"bench_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def load_results(folder: Path = RESULTS) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text(encoding="utf-8"))
            for p in sorted(folder.glob("*.json"))}


def section_renderer(results: dict[str, dict],
                     modules: Callable[[str], Any] = load_module) -> Callable[[str], str]:
    def section(name: str) -> str:
        if name not in results:
            raise KeyError(f"no benchmarks/results/{name}.json: run `python "
                           f"benchmarks/bench_{name}.py` first")
        module = modules(name)
        if not hasattr(module, "render"):
            raise AttributeError(f"benchmarks/bench_{name}.py defines no render(result)")
        return module.render(results[name]).rstrip("\n")
    return section


def render(template: str | None = None, results: dict[str, dict] | None = None,
           modules: Callable[[str], Any] = load_module) -> str:
    """The page's text: the template with every placeholder filled from the results."""
    from tinymoe.app.render import Rec, render_text

    template = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    results = load_results() if results is None else results
    ns: dict[str, Any] = {name: Rec(r) for name, r in results.items()}
    ns["section"] = section_renderer(results, modules)
    return render_text(template, ns, where=str(TEMPLATE.relative_to(ROOT)))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.render",
                                 description="Render docs/benchmarks.md from "
                                             "benchmarks/results/*.json.")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the page differs from its rendering")
    args = ap.parse_args(argv)
    from tinymoe.app.render import write_or_check

    if not write_or_check(PAGE, render(), args.check):
        print("out of date (run `python -m benchmarks.render`): docs/benchmarks.md")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
