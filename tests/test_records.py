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
