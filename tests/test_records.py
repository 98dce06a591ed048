"""tinymoe.app.records: the recorded-run files the docs quote."""
import json

import numpy as np
import pytest

from tinymoe.app import records


@pytest.fixture
def tmp_records(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "RECORDS", tmp_path / "records")
    return tmp_path / "records"


def test_record_then_load_round_trips(tmp_records):
    results = {"dense": {"final": np.float64(2.0761), "curve": np.array([3.1, 2.5])},
               "reached": "not reached", "n": np.int64(3), "ok": np.bool_(True)}
    path = records.record("switch", argv=["switch", "--fast", "--seeds", "2"], seeds=[0, 1],
                          settings={"steps": 40}, results=results, fast=True)
    assert path == tmp_records / "switch-fast.json"
    got = records.load("switch", fast=True)
    assert set(got) == {"name", "command", "code_version", "date", "machine", "seeds",
                        "settings", "results"}
    assert got["name"] == "switch"
    assert got["command"] == "tinymoe repro switch --fast --seeds 2"
    assert got["seeds"] == [0, 1] and got["settings"] == {"steps": 40}
    assert got["results"] == {"dense": {"final": 2.0761, "curve": [3.1, 2.5]},
                              "reached": "not reached", "n": 3, "ok": True}
    assert {"platform", "cpu_count", "numpy", "numba"} <= set(got["machine"])
    assert got["code_version"]
    # plain JSON on disk, readable without tinymoe
    assert json.loads(path.read_text())["results"]["dense"]["final"] == 2.0761
    # the full run is a different file
    with pytest.raises(FileNotFoundError, match="tinymoe repro switch --record"):
        records.load("switch")


def test_record_refuses_nan_and_odd_types_and_names(tmp_records):
    with pytest.raises(ValueError, match=r"results\.loss"):
        records.record("x", argv=["x"], seeds=[0], settings={}, results={"loss": float("nan")})
    with pytest.raises(TypeError, match="object"):
        records.record("x", argv=["x"], seeds=[0], settings={}, results={"a": object()})
    with pytest.raises(ValueError, match="name"):
        records.record("../evil", argv=["x"], seeds=[0], settings={}, results={})
    assert not (tmp_records / "x.json").exists()


def test_shipped_records_are_complete():
    for stem in records.available():
        fast = stem.endswith("-fast")
        rec = records.load(stem.removesuffix("-fast"), fast=fast)
        assert rec["command"].startswith("tinymoe repro ")
        assert ("--fast" in rec["command"].split()) == fast, stem
        assert rec["results"], stem


# --- the pages and the fast reruns -----------------------------------------------------------
# Every repro is seeded, so a rerun of the same command on the same machine gives the same
# figures bit for bit. Across machines the order of BLAS sums may differ (float32 models:
# ~1e-7 relative per operation, grown over tens of training steps), so continuous figures are
# compared to within RTOL; a larger difference means the code computes something else.
RTOL, ATOL = 1e-3, 1e-6


def test_differences_tolerance_and_structure():
    rec = {"a": 1.0, "b": [1, 2], "seconds": 3.0, "s": "x"}
    assert records.differences(rec, {"a": 1.0005, "b": [1, 2], "seconds": 9.0, "s": "x"},
                               rtol=RTOL, atol=ATOL) == []
    diffs = records.differences(rec, {"a": 1.01, "b": [1, 3], "s": "y", "new": 1},
                                rtol=RTOL, atol=ATOL)
    assert len(diffs) == 4 and any("results.a" in d for d in diffs)


def test_render_placeholders(tmp_path):
    from tinymoe.app import render

    ns = {"r": render.Rec({"results": {"runs": {"cf 1.25": {"loss": 2.0761, "drop": 0.073}},
                                       "xs": [1.0, 2.0, 3.0]}}),
          **{k: getattr(render, k) for k in ("mean", "sd", "ci95")}}
    text = ("{{ r.results.runs['cf 1.25'].loss | .3f }} / {{ r.results.runs['cf 1.25'].drop "
            "| %.1f }}% / {{ mean(r.results.xs) | .1f }} ± {{ ci95(r.results.xs) | .2f }} / "
            "{{ 0 - r.results.runs['cf 1.25'].loss | .2f }}")
    assert render.render_text(text, ns) == "2.076 / 7.3% / 2.0 ± 2.48 / −2.08"
    with pytest.raises(ValueError, match=r"template:1: .*no key 'cf 2'"):
        render.render_text("{{ r.results.runs['cf 2'].loss }}", ns)


def test_reproductions_page_is_the_rendering_of_the_records():
    """docs/reproductions.md is generated: every number on it is a recorded one."""
    from tinymoe.app import render

    for template, page in render.PAGES.items():
        expected = render.render_page(template)
        actual = (render.ROOT / page).read_text(encoding="utf-8")
        assert actual == expected, f"{page} differs from its template; run `tinymoe repro render`"


FAST_RECORDS = [s.removesuffix("-fast") for s in records.available() if s.endswith("-fast")]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAST_RECORDS)
def test_fast_rerun_matches_its_record(name, tmp_path):
    """CI re-runs the fast setting of every reproduction, in the pinned numeric environment
    it was recorded in (:data:`tinymoe.app.records.PINNED_ENV`), and compares."""
    import shlex

    shipped = records.load(name, fast=True)
    argv = shlex.split(shipped["command"])[2:]
    assert "--fast" in argv and "--record" in argv, shipped["command"]
    assert shipped["machine"].get("pinned"), f"{name}: record it with {shipped['command']!r}"
    assert records.run_pinned(argv, records_dir=tmp_path) == 0  # as it was recorded
    fresh = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert fresh["machine"]["pinned"]
    assert fresh["settings"] == shipped["settings"]
    assert fresh["seeds"] == shipped["seeds"]
    diffs = records.differences(shipped["results"], fresh["results"], rtol=RTOL, atol=ATOL)
    assert not diffs, "\n".join(diffs[:20])
