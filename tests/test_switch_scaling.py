"""The expert-count sweep (Switch Fig. 1), its statistics, the capacity analysis and the
simulated bfloat16 model."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import stats

from tinymoe.app.experiments import switch_scaling as ss
from tinymoe.models.transformer import Transformer, TransformerConfig
from tinymoe.moe.precision import round_bfloat16_array, rounded_weights

TINY = replace(ss.FAST, steps=4, eval_every=2, experts=(1, 2), seeds=(0, 1))
# the recorded learning-rate sweeps: 16 x 64 characters per step (alpha 0.01, every E at
# one rate afterwards), and 64 x 64 (the full sweep's protocol; its rates come from these)
LR_B16 = ("switch_scaling_lr", "switch_scaling_lr_high")
LR_B64 = ("switch_scaling_lr_b64", "switch_scaling_lr_b64_more", "switch_scaling_lr_b64_mid",
          "switch_scaling_lr_b64_seed1")


def test_t_interval_is_students_t():
    v = [0.1, -0.3, 0.2, 0.05, -0.1]
    m, lo, hi = ss.t_interval(v)
    se = np.std(v, ddof=1) / np.sqrt(5)
    assert m == pytest.approx(np.mean(v))
    assert hi - m == pytest.approx(stats.t.ppf(0.975, 4) * se)
    assert m - lo == pytest.approx(hi - m)
    with pytest.raises(ValueError, match="at least 2"):
        ss.t_interval([1.0])


def test_steps_to_reach_interpolates_between_evaluations():
    assert ss.steps_to_reach([100, 200, 300], [3.0, 2.0, 1.0], 1.5) == pytest.approx(250)
    assert ss.steps_to_reach([100, 200], [1.0, 0.5], 2.0) == 100
    assert ss.steps_to_reach([100, 200], [3.0, 2.5], 2.0) is None


def test_validation_windows_cover_the_split_with_shifted_targets():
    ids = np.arange(23)
    x, y = ss.validation_windows(ids, 5)
    assert x.shape == y.shape == (4, 5)
    np.testing.assert_array_equal(x.ravel(), np.arange(20))
    np.testing.assert_array_equal(y.ravel(), np.arange(1, 21))


@pytest.mark.task4_1  # routes through the capacity of task 4_1
def test_drop_rate_counts_tokens_over_capacity_per_group():
    balanced = np.tile(np.arange(4), 16)  # 64 tokens, every group of 8 has 2 per expert
    assert ss.drop_rate(balanced, 4, 8, 1.0) == 0.0
    one = np.zeros(64, dtype=np.int64)  # all to expert 0: C = 2 of every group of 8 kept
    assert ss.drop_rate(one, 4, 8, 1.0) == pytest.approx(6 / 8)
    assert ss.drop_rate(one, 4, 8, 2.0) == pytest.approx(4 / 8)
    # the same skew in one large group keeps C = 16 of 64
    assert ss.drop_rate(one, 4, 64, 1.0) == pytest.approx(48 / 64)


@pytest.mark.task4_1  # routes through the capacity of task 4_1
def test_a_tiny_sweep_pairs_seeds_and_summarises():
    result = ss.run(TINY, workers=1, progress=False)
    runs = result["runs"]
    assert sorted((r["E"], r["seed"]) for r in runs) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    row = result["summary"]["2"]
    losses = {(r["E"], r["seed"]): r["val_loss"] for r in runs}
    assert row["diff"] == pytest.approx([losses[(2, s)] - losses[(1, s)] for s in (0, 1)])
    assert row["diff_low"] <= row["diff_mean"] <= row["diff_high"]
    assert all(np.isfinite(r["val_loss"]) for r in runs)
    assert runs[0]["curve_steps"] == [2, 4]
    assert "| 2 |" in ss.format_table(result)


@pytest.mark.task4_1  # the cf 1.25 run routes through the capacity of task 4_1
def test_dropless_training_drops_no_token_and_keeps_the_flops():
    cfg = replace(TINY, experts=(1, 4), seeds=(0,), dropless=True)
    assert ss._model_config(cfg, 4, 65).capacity_factor == 4.0  # C = S: cf = E
    assert ss._model_config(cfg, 1, 65).kind == "dense"
    run = ss.train_one(cfg, 4, 0)
    assert run.train_dropped == 0.0 and np.isfinite(run.val_loss)
    dropping = ss.train_one(replace(cfg, dropless=False), 4, 0)
    assert dropping.train_dropped > 0.0  # the same tiny run at cf 1.25 drops tokens


@pytest.mark.task4_1  # routes through the capacity of task 4_1
def test_dropless_evaluation_drops_nothing_and_the_analysis_counts_drops():
    cfg = replace(TINY, experts=(1, 4), seeds=(0,), analysis=True)
    run = ss.train_one(cfg, 4, 0)
    cap = run.capacity
    assert set(cap["drop"]) == {str(S) for S in ss.GROUP_SIZES}
    for S, row in cap["drop"].items():  # more capacity never drops more
        assert row["2.0"] <= row["1.25"] <= row["1.0"]
    # dropless: the loss with no drops equals the run's dropless loss on the same windows
    assert np.isfinite(cap["loss_dropless"])


def test_rounded_weights_round_inside_and_restore_after():
    m = Transformer(TransformerConfig(vocab_size=11, block_size=8, d_model=8, n_layers=2,
                                      n_heads=2, d_ff=16, num_experts=2), rng=0)
    keep = [layer.router.W_r for layer in m.moe_layers]
    before = {id(p): p.data.copy() for p in m.parameters()}
    with rounded_weights(m.parameters(), keep=keep):
        for p in m.parameters():
            if any(p is k for k in keep):
                np.testing.assert_array_equal(p.data, before[id(p)])
            else:
                np.testing.assert_array_equal(p.data, round_bfloat16_array(before[id(p)]))
    for p in m.parameters():
        np.testing.assert_array_equal(p.data, before[id(p)])


@pytest.mark.task4_1  # routes through the capacity of task 4_1
def test_bf16_activations_round_the_logits_and_still_train():
    cfg = TransformerConfig(vocab_size=11, block_size=8, d_model=8, n_layers=2, n_heads=2,
                            d_ff=16, num_experts=2, bf16_activations=True)
    m = Transformer(cfg, rng=0)
    ids = np.random.default_rng(0).integers(0, 11, (2, 8))
    logits = m(ids).numpy()
    np.testing.assert_array_equal(logits, round_bfloat16_array(logits))
    plain = Transformer(cfg.replace(bf16_activations=False), rng=0)
    assert not np.array_equal(plain(ids).numpy(), logits)  # the rounding changed something
    loss, _ = m.loss(ids, ids)
    loss.backward()
    assert all(p.grad is not None and np.isfinite(p.grad).all() for p in m.parameters())
    with pytest.raises(ValueError, match="bf16_activations"):
        cfg.replace(dtype="float64")


@pytest.mark.task4_1  # routes through the capacity of task 4_1
def test_precision_sweep_reports_every_precision_and_lr():
    cfg = replace(TINY, steps=2, eval_every=2, seeds=(0,))
    result = ss.precision_run(cfg, E=2, lrs=(1e-3,), workers=1, progress=False)
    assert set(result["summary"]) == set(ss.PRECISIONS)
    assert "bfloat16, float32 router" in ss.format_precision(result)


def test_a_balanced_router_drops_less_in_larger_groups():
    drops = ss.balanced_drops(8, group_sizes=(64, 4096), factors=(1.0, 2.0), tokens=1 << 14)
    assert drops["64"]["1.0"] > drops["4096"]["1.0"] > drops["4096"]["2.0"] >= 0.0
    assert drops["4096"]["2.0"] == 0.0  # 2x the mean is > 20 spreads above it at S/E = 512


def test_the_reproductions_page_shows_the_recorded_tables():
    """Every number of the expert-count, capacity and precision tables on the page is the
    recorded one (or, for the balanced router, the deterministic function's)."""
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "reproductions.md").read_text(
        encoding="utf-8")
    assert ss.format_table(ss.load_recorded("switch_scaling", fast=True)) in page
    from tinymoe.app import render
    from tinymoe.app.records import load

    for names in (LR_B16, LR_B64):
        table = render.TABLES["lr_sweeps_table"](*(render.Rec(load(n)) for n in names))
        assert table in page
        losses: dict = {}  # (lr, E) -> {seed: loss}: every recorded run is in the table
        for n in names:
            for r in load(n)["results"]["runs"]:
                losses.setdefault((r["lr"], r["E"]), {})[r["seed"]] = r["val_loss"]
        for (lr, E), by_seed in losses.items():
            v = list(by_seed.values())
            assert f"{np.mean(v):.4f} ({len(v)})" in table, (lr, E)
    assert ss.format_capacity(ss.load_recorded("switch_scaling_every_block")) in page
    full = ss.load_recorded("switch_scaling")
    assert ss.format_table(full) in page and ss.format_capacity(full) in page
    assert ss.format_precision(ss.load_recorded("switch_precision", fast=True)) in page
    assert ss.format_balanced() in page


def _lr_record(runs, seeds):
    return {"settings": {"seeds": seeds}, "results": {"runs": [
        {"E": E, "seed": seed, "lr": lr, "val_loss": v} for E, seed, lr, v in runs]}}


def test_best_rate_is_chosen_among_the_rates_run_on_the_most_seeds():
    from tinymoe.app import render

    a = _lr_record([(1, 0, 0.01, 2.0), (1, 1, 0.01, 2.2), (1, 0, 0.02, 1.9), (1, 1, 0.02, 2.4),
                    (8, 0, 0.04, 1.0)], [0, 1])
    b = _lr_record([(1, 0, 0.005, 1.5), (8, 0, 0.01, 1.8), (1, 0, 0.01, 2.0)], [0])
    cells = render.lr_cells([a, b])
    assert cells["0.01"]["1"] == [2.0, 2.2]  # the run both records hold counts once
    # dense: 0.005 was run on one seed only (1.5 < every mean), so 0.01 (mean 2.1) beats
    # 0.02 (2.15); E = 8: one seed each, the lower loss
    assert render._best_lr(1, a, b) == pytest.approx((0.01, 2.1))
    assert render._best_lr(8, a, b) == (0.04, 1.0)
    table = render._lr_sweeps_table(a, b)
    assert "| 0.01 | **2.1000 (2)** | 1.8000 (1) |" in table
    assert "| 0.005 | 1.5000 (1) | — |" in table
    assert render._best_lrs_text(a, b) == "dense 0.01 (2.1000), E = 8 0.04 (1.0000)"
    assert render._lr_mean(0.02, 1, a, b) == pytest.approx(2.15)
    assert render._lr_diffs_text(0.01, a, b) == ""  # E = 8 ran on one seed, dense on two
    c = _lr_record([(8, 1, 0.01, 2.0)], [1])
    assert render._lr_diffs_text(0.01, a, b, c) == "E = 8 -0.2000"


def test_learning_rate_sweeps_agree_where_they_overlap():
    """A run recorded by two sweeps (the same E, seed and rate, the same protocol) has the
    same final loss in both: the runs are deterministic, and merging them is sound."""
    from tinymoe.app.records import load

    for names in (LR_B16, LR_B64):
        recs = [load(n) for n in names]
        keep = ("model", "steps", "batch_size", "warmup", "min_lr_ratio", "clip")
        assert all({k: r["settings"][k] for k in keep}
                   == {k: recs[0]["settings"][k] for k in keep} for r in recs), names
        seen: dict = {}
        overlaps = 0
        for rec in recs:
            for r in rec["results"]["runs"]:
                key = (r["E"], r["seed"], r["lr"])
                if key in seen:
                    overlaps += 1
                    assert r["val_loss"] == pytest.approx(seen[key], abs=1e-9), key
                seen[key] = r["val_loss"]
        if names == LR_B64:
            assert overlaps >= 2  # dense, seed 0, at 1e-2 and 2e-2: recorded twice


def test_the_full_sweep_trains_each_model_at_its_tuned_rate():
    """``FULL.lr_by_experts`` is each E's best rate in the recorded 64 x 64 sweeps, and the
    recorded full sweep ran with those rates and the full protocol."""
    from tinymoe.app import render
    from tinymoe.app.records import load

    recs = [load(n) for n in LR_B64]
    tuned = {E: render._best_lr(E, *recs)[0] for E in ss.FULL.experts}
    assert dict(ss.FULL.lr_by_experts) == tuned
    rec = load("switch_scaling")
    assert rec["settings"] == ss.FULL.to_dict()
    for r in rec["results"]["runs"]:
        assert r["lr"] == tuned[r["E"]]


def test_the_pages_longer_training_verdicts_hold_on_its_record():
    """The four-times-longer run: E = 8 behind dense on both seeds, E = 32 within its
    interval of it, its curve ahead at step 500 and its training-cf loss ahead on both
    seeds; the page quotes that record."""
    from tinymoe.app.records import load

    rec = load("switch_scaling_long")
    st, res = rec["settings"], rec["results"]
    assert st["steps"] == 4 * ss.FULL.steps and st["batch_size"] == ss.FULL.batch_size
    assert [tuple(p) for p in st["lr_by_experts"]] == list(ss.FULL.lr_by_experts)
    summary = res["summary"]
    assert all(d > 0 for d in summary["8"]["diff"])
    assert summary["32"]["diff_low"] <= 0 <= summary["32"]["diff_high"]
    runs = {(r["E"], r["seed"]): r for r in res["runs"]}
    for seed in (0, 1):
        e32, dense = runs[(32, seed)], runs[(1, seed)]
        assert e32["curve_steps"][9] == 500 and e32["curve"][9] < dense["curve"][9]
        assert e32["val_loss_train_cf"] < dense["val_loss"] < e32["val_loss"] + 0.01
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "reproductions.md").read_text(
        encoding="utf-8")
    assert ss.format_table(ss.load_recorded("switch_scaling_long")) in page


def test_the_pages_scaling_verdicts_hold_on_the_records():
    """The prose of the expert-count section: at tuned rates no E beats dense beyond its
    interval and the loss does not keep falling with E; at one shared rate of 1e-2 every
    sparse model is ahead of dense (E = 32 the furthest), at 2e-2 every one is behind, and
    dense gains the most from the larger step."""
    from tinymoe.app import render
    from tinymoe.app.records import load

    summary = load("switch_scaling")["results"]["summary"]
    sparse = [E for E in summary if E != "1"]
    assert sorted(int(E) for E in summary) == [1, 2, 4, 8, 16, 32]
    assert all(summary[E]["diff_high"] >= 0 for E in sparse)
    means = [summary[E]["diff_mean"] for E in sorted(sparse, key=int)]
    assert means != sorted(means, reverse=True)  # not falling all the way as E grows
    recs = [load(n) for n in LR_B64]
    at_1e2 = {E: render._lr_mean(0.01, E, *recs) - render._lr_mean(0.01, 1, *recs)
              for E in (2, 4, 8, 16, 32)}
    assert all(d < 0 for d in at_1e2.values()) and min(at_1e2, key=at_1e2.get) == 32
    assert all(render._lr_mean(0.02, E, *recs) > render._lr_mean(0.02, 1, *recs)
               for E in (2, 4, 8, 16, 32))
    gain = {E: render._lr_mean(0.01, E, *recs) - render._lr_mean(0.02, E, *recs)
            for E in (1, 2, 4, 8, 16, 32)}
    assert max(gain, key=gain.get) == 1


def test_the_pages_wider_model_and_training_split_verdicts_hold_on_the_records():
    """Twice as wide: dense's best rate is bracketed by worse ones, E = 32 at its best is
    behind dense at its best. Where the experts' parameters go: the training-split gap grows
    from 400 to 1,600 steps, and at 1,600 steps E = 32 is further ahead of dense on the
    training split than on the validation split. The records rerun the sweep's own models
    (the same validation losses, bit for bit) and the page shows their table."""
    from pathlib import Path

    from tinymoe.app import render
    from tinymoe.app.records import load

    wide = [load("switch_scaling_d128_lr"), load("switch_scaling_d128_lr_low")]
    for rec in wide:
        assert rec["settings"]["model"]["d_model"] == 2 * ss.FULL.model.d_model
        assert rec["settings"]["model"]["d_ff"] == 2 * ss.FULL.model.d_ff
        assert rec["settings"]["steps"] == ss.FULL.steps
    cells = render.lr_cells(wide)
    rates = sorted(cells, key=float)
    best1 = render._best_lr(1, *wide)
    assert rates[0] != f"{best1[0]:g}" != rates[-1]  # bracketed by worse rates
    assert render._best_lr(32, *wide)[1] > best1[1]
    low = cells[f"{wide[1]['settings']['lrs'][0]:g}"]  # the lowest rate: E = 32 ahead there
    assert low is cells[rates[0]] and low["32"][0] < low["1"][0]

    gap, long = load("switch_scaling_gap"), load("switch_scaling_long_gap")
    assert gap["settings"]["steps"] == ss.FULL.steps
    assert long["settings"]["steps"] == 4 * ss.FULL.steps
    sweep = {(r["E"], r["seed"]): r["val_loss"] for r in load("switch_scaling")["results"]["runs"]}
    longer = {(r["E"], r["seed"]): r["val_loss"]
              for r in load("switch_scaling_long")["results"]["runs"]}
    for r in gap["results"]["runs"]:
        assert r["val_loss"] == sweep[(r["E"], r["seed"])]
    for r in long["results"]["runs"]:
        assert r["val_loss"] == longer[(r["E"], r["seed"])]
    dense_gap = [r["val_loss"] - r["train_loss"] for r in gap["results"]["runs"] if r["E"] == 1]
    (dense_long,) = [r for r in long["results"]["runs"] if r["E"] == 1]
    (e32_long,) = [r for r in long["results"]["runs"] if r["E"] == 32]
    assert dense_long["val_loss"] - dense_long["train_loss"] > max(dense_gap) > 0
    ahead_train = dense_long["train_loss"] - e32_long["train_loss"]
    ahead_val = dense_long["val_loss"] - e32_long["val_loss"]
    assert ahead_train > 0 and ahead_train > 5 * abs(ahead_val)
    runs400 = gap["results"]["runs"]
    for split in ("train_loss", "val_loss"):  # after 400 steps: not ahead on either split
        e32 = np.mean([r[split] for r in runs400 if r["E"] == 32])
        assert e32 > np.mean([r[split] for r in runs400 if r["E"] == 1])

    page = (Path(__file__).resolve().parents[1] / "docs" / "reproductions.md").read_text(
        encoding="utf-8")
    assert render._fit_table(gap, long, *wide) in page
    assert render._lr_sweeps_table(*wide) in page
