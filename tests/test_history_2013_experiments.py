"""The 2013-2015 reproductions (deep_moe_2013, conditional_2015) on tiny settings."""
import numpy as np
import pytest

from tinymoe.app.cli import REPRO
from tinymoe.app.experiments import conditional_2015, deep_moe_2013


def test_deep_moe_run_reports_every_figure_per_layer():
    result = deep_moe_2013.run(cfg={"epochs": 1, "copies": 1, "seeds": 2}, progress=False,
                               models=("dmoe", "single", "dense"))
    runs = result.runs["dmoe"]
    assert [r.seed for r in runs] == [0, 1]
    for r in runs:
        assert set(r.mi) == {"layer1_where", "layer1_what", "layer2_where", "layer2_what"}
        assert all(0 <= v <= np.log(4) + 1e-12 for v in r.mi.values())
        assert all(1 <= v <= 4 + 1e-9 for v in r.effective.values())
        assert 0.0 <= r.accuracy <= 1.0
    dense = result.runs["dense"][0]
    assert dense.accuracy > 0.13  # above chance (0.1) after one epoch
    assert abs(dense.params - runs[0].params) / runs[0].params < 0.02  # same size
    assert not dense.mi
    rows = result.results()
    assert rows["dmoe"]["mi_layer2_what"] == [r.mi["layer2_what"] for r in runs]
    table = deep_moe_2013.format_table(result)
    assert "| dmoe |" in table and "| dense |" in table and "±" in table
    single = result.runs["single"][0]
    assert set(single.mi) == {"layer1_where", "layer1_what"}
    assert abs(single.params - runs[0].params) / runs[0].params < 0.02
    assert "| single |" in table


def test_translation_cells_cover_the_canvas():
    offs = np.array([[r, c] for r in range(7) for c in range(7)])
    cells = deep_moe_2013.translation_cell(offs)
    assert cells.min() == 0 and cells.max() == 8 and len(set(cells)) == 9


@pytest.mark.task2b_1
@pytest.mark.task2b_2
@pytest.mark.task2b_3
def test_conditional_run_reports_estimators_and_the_tradeoff():
    result = conditional_2015.run(cfg={"problems": 3, "epochs": 1, "seeds": 1},
                                  progress=False, taus=(0.25,))
    assert set(result.rows()) == {"dense", "learned tau=0.25", "random tau=0.25"}
    assert result.rows()["dense"][0].fraction == 1.0
    assert abs(result.rows()["random tau=0.25"][0].fraction - 0.25) < 0.05
    med = result.results()["estimators_median"]
    assert med["reinforce"]["bias"] < 1e-10 and med["straight-through"]["bias"] > 1e-3
    table = conditional_2015.format_table(result)
    assert "Shazeer et al. 2017" in table and "| learned tau=0.25 |" in table


def test_both_reproductions_are_registered():
    assert REPRO["deep_moe"][:2] == ("tinymoe.app.experiments.deep_moe_2013", "main_deep_moe")
    assert REPRO["conditional"][:2] == ("tinymoe.app.experiments.conditional_2015",
                                        "main_conditional")
