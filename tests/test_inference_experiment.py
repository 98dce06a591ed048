"""`tinymoe repro inference`: the three models it compares and what it measures (no timing
is asserted: speeds depend on the machine)."""
import numpy as np
import pytest

from tinymoe.app.experiments import inference as inf
from tinymoe.models.transformer import Transformer

TINY = inf.InferenceConfig(d_model=32, n_layers=1, n_heads=2, d_ff=16, num_experts=4,
                           new_tokens=3, batches=(2,), contexts=(5,), repeats=1)


def test_the_dense_models_match_the_moe_active_and_total_sizes():
    sizes = {}
    for name in inf.MODELS:
        m = Transformer(inf.model_config(name, TINY), rng=0)
        sizes[name] = (m.num_parameters(), m.active_parameters())
    moe, act, tot = sizes["moe"], sizes["dense-active"], sizes["dense-total"]
    router = TINY.d_model * TINY.num_experts * TINY.n_layers
    assert moe[1] - act[0] == router  # same active parameters, up to the routers
    assert moe[0] - tot[0] == router  # same total parameters, up to the routers
    with pytest.raises(ValueError, match="unknown model 'sparse'"):
        inf.model_config("sparse", TINY)


@pytest.mark.task8_1
@pytest.mark.task8_3
@pytest.mark.task6_1
def test_measure_reports_speed_memory_and_flops_in_a_fresh_process():
    row = inf.measure_in_child("moe", TINY, 2, 5)
    assert row["model"] == "moe" and row["batch"] == 2 and row["context"] == 5
    assert row["decode_tokens_per_s"] > 0 and row["rss_peak_mb"] >= row["rss_base_mb"]
    assert row["kv_cache_mb"] == pytest.approx(2 * 1 * 2 * 8 * 32 * 4 / 2 ** 20)
    assert row["weights_mb"] == pytest.approx(row["params_total"] * 4 / 2 ** 20)
    m = Transformer(inf.model_config("moe", TINY), rng=0)
    assert row["params_active"] == m.active_parameters()
    assert row["flops_per_token"] > 0


@pytest.mark.task8_1
@pytest.mark.task8_3
@pytest.mark.task6_1
def test_speed_interleaves_the_three_models_round_by_round():
    rows = inf.speed(TINY)
    assert [(r["model"], r["batch"], r["context"]) for r in rows] == [
        (m, 2, 5) for m in inf.MODELS]
    for r in rows:
        assert len(r["decode_s"]) == len(r["prefill_s"]) == TINY.repeats
        assert min(r["decode_s"]) > 0
    assert rows[0]["kv_cache_mb"] == pytest.approx(2 * 1 * 2 * 8 * 32 * 4 / 2 ** 20)


def _result(decode_s):
    """An InferenceResult from made-up rounds: decode seconds per model, one batch/context."""
    models = {name: {**inf.counts(name, TINY), "rss_model_mb": mem, "rss_peak_extra_mb": mem + 1,
                     "peak_at": {"batch": 2, "context": 5}}
              for name, mem in zip(inf.MODELS, (40.0, 10.0, 41.0))}
    rows = [{"model": name, "batch": 2, "context": 5, "kv_cache_mb": 0.1,
             "decode_s": decode_s[name], "prefill_s": [1.0] * len(decode_s[name])}
            for name in inf.MODELS]
    return inf.InferenceResult(TINY, True, models, rows, 1.0)


def test_ratios_are_medians_of_each_rounds_ratio():
    # round 2 was slowed down for every model alike: the per-round ratios ignore it
    res = _result({"moe": [1.0, 10.0, 1.1], "dense-active": [0.9, 9.0, 0.99],
                   "dense-total": [3.0, 30.0, 3.3]})
    (q,) = inf.ratios(res)
    assert q["speed_vs_active"] == pytest.approx(0.9) and q["speed_vs_total"] == pytest.approx(3)
    assert q["speed_vs_active_min"] == pytest.approx(0.9)
    assert q["memory_vs_total"] == pytest.approx(40 / 41)
    flops = {name: m["flops_per_token"]["5"] for name, m in res.models.items()}
    assert q["flops_vs_active"] == pytest.approx(flops["moe"] / flops["dense-active"])
    row = res.rows[0]
    assert row["decode_tokens_per_s"] == pytest.approx(2 * TINY.new_tokens / 1.1)
    table = inf.format_table(res)
    assert "| moe | 2 | 5 |" in table and "| 2 | 5 | 0.90 [0.90, 0.90] | 3.00" in table
    assert np.isfinite(q["memory_vs_active"])


def test_record_keeps_counts_apart_from_measurements(tmp_path, monkeypatch):
    from tinymoe.app import records

    monkeypatch.setattr(records, "RECORDS", tmp_path)
    res = _result({n: [1.0, 1.0, 1.0] for n in inf.MODELS})
    rec = records.load(inf.record_result(res, ["inference", "--fast", "--record"]).stem
                       .removesuffix("-fast"), fast=True)
    assert set(rec["results"]) == {"seconds", "counts", "kv_cache_mb", "measured"}
    assert "measured" in records.TIMINGS  # load- and machine-dependent: never compared
    assert rec["results"]["counts"]["moe"]["params_total"] == res.models["moe"]["params_total"]
