"""``tinymoe repro modern``: every router trains on the char LM, and the table reports it.

The experiment runs all three regions of lesson 06 (top-k, expert choice, the bias update)."""
import numpy as np
import pytest

from tinymoe.app.experiments import modern_2024 as m


@pytest.mark.task6_1
@pytest.mark.task6_2
@pytest.mark.task6_3
def test_modern_experiment_runs_end_to_end(capsys):
    res = m.run(fast=True, steps=3, progress=False)
    assert [r.name for r in res.runs] == list(m.RUNS)
    for r in res.runs:
        assert np.isfinite([r.val_loss, r.max_over_mean]).all() and r.max_over_mean >= 1.0
        assert len(r.load_history) == len(r.steps) >= 2
    ec = res.run("expert choice")
    assert ec.max_over_mean == pytest.approx(1.0)  # every expert takes exactly C tokens
    assert np.asarray(ec.load_history).shape[1] == m.FAST.num_experts
    fine = res.run("shared + fine-grained")  # 2 x 8 - 1 shared = 15 routed experts
    assert np.asarray(fine.load_history).shape[1] == 2 * m.FAST.num_experts - 1
    for r in res.runs:
        if r.name != "expert choice":
            assert r.unrouted == 0.0  # dropless top-k: every token reaches k experts
    table = m.format_table(res)
    assert all(f"| {name} |" in table for name in m.RUNS)
    m.figure_load(res)
    assert m.main_modern(["--fast", "--steps", "2", "--no-progress"]) == 0
    assert "Modern routers" in capsys.readouterr().out


def test_runs_have_the_same_active_width_and_expert_parameters():
    # The weight matrices match (8 experts hold as many weights as 16 of half the width);
    # the biases do not: 16 small experts have 8 more output biases.
    sizes = {}
    for name in m.RUNS:
        model = m.build_model(name, m.FAST, vocab_size=20)
        layer = model.moe_layers[0]
        sizes[name] = sum(p.size for n, p in layer.named_parameters()
                          if n.startswith(("experts.", "shared.")) and
                          n.rsplit(".", 1)[1] in ("W1", "W2", "weight"))
    assert len(set(sizes.values())) == 1, sizes


def test_unknown_run_is_refused():
    with pytest.raises(ValueError, match="unknown runs"):
        m.run(fast=True, steps=1, runs=["top-3 of nothing"])
