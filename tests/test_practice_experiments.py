"""`tinymoe repro finetune` and `tinymoe repro experts`: their pieces on tiny settings (the
recorded runs are long; these check what they compute, not what they find)."""
import matplotlib
import numpy as np
import pytest

from tinymoe import viz
from tinymoe.app.experiments import experts_learn as ex
from tinymoe.app.experiments import finetune as ft
from tinymoe.data import CharTokenizer
from tinymoe.models.transformer import Transformer

matplotlib.use("Agg")
TINY = ft.FinetuneConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, num_experts=4,
                         block_size=16, pretrain_steps=3, finetune_steps=4, batch_size=4,
                         small_batch=2, eval_every=2, eval_batches=1, seeds=(0,))
z_loss = pytest.mark.task4_3  # the Switch LM's z-loss runs router_z_loss
switch_loss = pytest.mark.task4_2
capacity = pytest.mark.task4_1


def test_the_parameter_groups_split_the_model():
    model = Transformer(ft.model_config("switch", TINY, 65), rng=0)
    every = {id(p) for p in model.parameters()}
    moe = {id(p) for p in ft.trainable(model, "moe")}
    rest = {id(p) for p in ft.trainable(model, "non_moe")}
    assert moe and rest and not moe & rest and moe | rest == every
    assert moe == {id(p) for layer in model.moe_layers for p in layer.parameters()}
    with pytest.raises(ValueError, match="update='experts'"):
        ft.trainable(model, "experts")


@z_loss
@switch_loss
@capacity
def test_finetuning_only_the_moe_parameters_leaves_the_rest_unchanged():
    data = ft.load_data(TINY)
    state, _ = ft.pretrain("switch", TINY, 0, data, progress=False)
    model = Transformer(ft.model_config("switch", TINY, data["vocab"]), rng=0)
    model.load_state_dict(state)
    before = model.state_dict()
    ft.train_steps(model, ft.trainable(model, "moe"), data["ft_train"], 2, 4, 16, 1e-2, 0)
    after = model.state_dict()
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(".ffn." in k for k in changed)


@z_loss
@switch_loss
@capacity
def test_run_reports_train_val_gap_per_variant_and_seed():
    res = ft.run(config=TINY, variants=["dense: all params", "switch: MoE params only",
                                        "switch: dropout 0.1, expert dropout 0.4"],
                 progress=False)
    table = res.table()
    assert set(table) == {"dense: all params", "switch: MoE params only",
                          "switch: dropout 0.1, expert dropout 0.4"}
    for c in res.curves:
        s = c.summary()
        assert c.steps == [0, 2, 4] and s["gap"] == pytest.approx(s["val"] - s["train"])
        assert s["best_val"] == min(c.val)
    assert "| switch: MoE params only |" in ft.format_table(res)
    assert ft.figure(res).axes
    with pytest.raises(ValueError, match="unknown variants"):
        ft.run(config=TINY, variants=["switch: everything"], progress=False)


def test_char_classes_and_mutual_information():
    assert ex.char_classes(" ", "T") == ["upper-case", "consonant", "word start"]
    assert ex.char_classes("a", "e") == ["lower-case", "vowel"]
    assert ex.char_classes("a", ",") == ["punctuation"]
    a = np.array([0, 1, 2, 0, 1, 2])
    mi, h = ex.mutual_information(a, a)
    assert mi == pytest.approx(h) == pytest.approx(np.log(3))
    mi, _ = ex.mutual_information(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))
    assert mi == pytest.approx(0.0, abs=1e-12)


def test_specialisation_finds_an_expert_for_spaces():
    tok = CharTokenizer("ab ,")
    text = "ab ab, ba ab " * 4
    ids = np.array(tok.encode(text))
    experts = np.where(ids == tok.encode(" ")[0], 1, 0)[None]  # layer 0: spaces -> expert 1
    (layer,) = ex.specialisation(ids, experts, tok, 2, block_size=len(text))
    assert layer["mi_over_h"] == pytest.approx(1.0)
    e1 = layer["experts"][1]
    assert e1["top_chars"] == [" "] and e1["class"] == "space"
    assert e1["share"] == pytest.approx(text.count(" ") / len(text))


def test_text_by_expert_draws_one_cell_per_character_and_checks_shapes():
    fig = viz.text_by_expert("ab\ncd", [0, 1, -1, 2, 0], 3, width=4)
    assert len(fig.axes[0].patches) == 4  # the dropped newline has no colour
    with pytest.raises(ValueError, match="one per character"):
        viz.text_by_expert("abc", [0, 1])
    with pytest.raises(ValueError, match=r"lie in \[-1, 2\)"):
        viz.text_by_expert("ab", [0, 2], 2)
