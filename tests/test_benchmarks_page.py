"""docs/benchmarks.md is the rendering of its template and the benchmark result files
(benchmarks/render.py); no timing is asserted, only that the page shows what the results say."""
import importlib
import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def render():
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module("benchmarks.render")
    finally:
        sys.path.remove(str(ROOT))


def test_benchmarks_page_is_its_rendering(render):
    text = render.render()
    assert (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8") == text, \
        "docs/benchmarks.md differs from its rendering; run `python -m benchmarks.render`"


def test_every_result_names_its_command_and_machine(render):
    for name, result in render.load_results().items():
        assert result["name"] == name
        assert result["command"].startswith(f"python benchmarks/bench_{name}.py")
        assert {"cpu", "cores", "python", "numpy"} <= set(result["machine"])
        assert "results" in result and "settings" in result


def test_a_section_is_a_result_and_a_render_function(render):
    results = {"toy": {"name": "toy", "results": {"ms": 12.5}}}
    module = types.SimpleNamespace(render=lambda r: f"toy took {r['results']['ms']} ms\n")
    template = 'A\n\n{{ section("toy") }}\n\n{{ toy.results.ms | .0f }} ms\n'
    text = render.render(template, results, modules=lambda name: module)
    assert text == "A\n\ntoy took 12.5 ms\n\n12 ms\n"
    with pytest.raises(ValueError, match=r"no benchmarks/results/busy.json: run `python "
                                         r"benchmarks/bench_busy.py` first"):
        render.render('{{ section("busy") }}', results, modules=lambda name: module)


def test_result_files_are_json_with_figures(render):
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        json.loads(path.read_text(encoding="utf-8"))


def test_switch_layer_targets_are_judged_on_the_median_of_its_runs(render):
    import statistics

    result = render.load_results()["switch_layer"]
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    sizes = [e for e in result["results"]["sizes"] if "runs" in e]
    assert sizes, "the recorded Switch-layer result has no repeated runs"
    for e in sizes:
        ratios = e["runs"]["ratio_vs_fastest_torch"]
        assert len(ratios) == result["settings"]["runs"] and ratios[0] == e[
            "ratio_vs_fastest_torch"]
        median = statistics.median(ratios)
        line = next(x for x in page.splitlines() if x.startswith(f"- T = {e['T']:,}: time"))
        assert line.startswith(f"- T = {e['T']:,}: time {median:.2f}x")
        assert ("limit <= 1.0: **met**" in line) == (median <= 1.0)
