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


def test_table_and_ratios_from_rows():
    rows = []
    for name, speed, mem in [("moe", 90.0, 40.0), ("dense-active", 100.0, 10.0),
                             ("dense-total", 30.0, 41.0)]:
        rows.append({"model": name, "batch": 2, "context": 5, "params_total": 1,
                     "params_active": 1, "flops_per_token": 1e6, "weights_mb": 1.0,
                     "kv_cache_mb": 0.1, "decode_tokens_per_s": speed, "rss_model_mb": mem,
                     "rss_peak_extra_mb": mem + 1})
    res = inf.InferenceResult(TINY, True, rows, 1.0)
    (q,) = inf.ratios(res)
    assert q["speed_vs_active"] == pytest.approx(0.9) and q["speed_vs_total"] == pytest.approx(3)
    assert q["memory_vs_total"] == pytest.approx(40 / 41)
    table = inf.format_table(res)
    assert "| moe | 2 | 5 |" in table and "| 2 | 5 | 0.90 | 3.00 |" in table
    assert np.isfinite(q["peak_vs_active"])
