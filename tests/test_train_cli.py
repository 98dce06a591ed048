"""``tinymoe train`` / ``tinymoe sample``: resuming reproduces an uninterrupted run bit for bit,
an interrupted save leaves the last good checkpoint loadable, sampling prints text."""
import os

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.app.train import (
    TrainConfig,
    checkpoint_path,
    generate,
    load_data,
    load_model,
    main_sample,
    main_train,
    train,
)
from tinymoe.models.transformer import TransformerConfig
from tinymoe.nn import serialization

pytestmark = [pytest.mark.task4_1, pytest.mark.task4_2, pytest.mark.task4_3]

MODEL = TransformerConfig(block_size=16, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                          num_experts=4, capacity_factor=1.0, dropout=0.1,
                          expert_dropout=0.2)
TRAIN = TrainConfig(steps=6, batch_size=4, warmup=2, eval_every=2, eval_batches=1,
                    log_every=1, ckpt_every=2)


@pytest.fixture(scope="module")
def data():
    return load_data()


def params(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def assert_same_run(a, b):
    pa, pb = params(a.model), params(b.model)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    ha, hb = a.history.to_dict(), b.history.to_dict()
    for key in ha:
        if key != "step_time":
            assert ha[key] == hb[key], key
    assert a.final_val_loss == b.final_val_loss


class Stop(Exception):
    pass


def stop_at(n, exc):
    def on_step(step, model):
        if step == n:
            raise exc
    return on_step


@pytest.mark.parametrize("kind", ["switch", "top2"])
def test_resume_after_ctrl_c_equals_an_uninterrupted_run(tmp_path, data, kind):
    cfg = MODEL.replace(kind=kind)
    straight = train(cfg, TRAIN, out=tmp_path / "a", progress=False, data=data)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after step 3: step 3 is saved
        train(cfg, TRAIN, out=tmp_path / "b", progress=False, data=data,
              on_step=stop_at(3, KeyboardInterrupt()))
    _, meta = tm.nn.load(checkpoint_path(tmp_path / "b"))
    assert meta["step"] == 3
    resumed = train(out=tmp_path / "b", resume=True, progress=False, data=data)
    assert resumed.train_config == TRAIN and resumed.model_config.kind == kind
    assert_same_run(straight, resumed)


def test_resume_after_a_crash_restarts_from_the_last_periodic_checkpoint(tmp_path, data):
    straight = train(MODEL, TRAIN, out=tmp_path / "a", progress=False, data=data)
    with pytest.raises(Stop):  # a crash at step 5: steps 4 is the last checkpoint
        train(MODEL, TRAIN, out=tmp_path / "b", progress=False, data=data,
              on_step=stop_at(5, Stop()))
    _, meta = tm.nn.load(checkpoint_path(tmp_path / "b"))
    assert meta["step"] == 4 and meta["history"]["steps"][-1] == 4
    resumed = train(out=tmp_path / "b", resume=True, progress=False, data=data)
    assert_same_run(straight, resumed)


def test_an_interrupted_save_leaves_the_last_good_checkpoint(tmp_path, data, monkeypatch):
    path = checkpoint_path(tmp_path)
    write = serialization._write_npz
    calls = []

    def crash_on_second_save(f, arrays):
        calls.append(1)
        if len(calls) == 2:  # half an archive on disk, then the "power cut"
            f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError("simulated crash during save")
        write(f, arrays)

    monkeypatch.setattr(serialization, "_write_npz", crash_on_second_save)
    with pytest.raises(OSError, match="simulated crash"):
        train(MODEL, TRAIN, out=tmp_path, progress=False, data=data)
    monkeypatch.setattr(serialization, "_write_npz", write)
    _, meta = tm.nn.load(path)  # still the step-2 checkpoint, complete
    assert meta["step"] == 2
    assert sorted(os.listdir(tmp_path)) == [  # no temporary file or lock left
        "checkpoint-00000002.npz", "checkpoint-best.npz", "checkpoint.npz"]
    model, tok, _ = load_model(tmp_path)
    assert model.cfg == MODEL.replace(vocab_size=tok.vocab_size)
    res = train(out=tmp_path, resume=True, progress=False, data=data)
    assert res.history.steps[-1] == 6


@pytest.mark.parametrize("kind", ["switch", "top2"])
def test_a_checkpoint_with_the_names_of_the_old_moe_layer_resumes(tmp_path, data, kind):
    """Checkpoints written before every MoE layer was one MoELayer named the router weight
    ``ffn.gate.router.W_r`` and the expert dropout ``ffn.expert_dropout``: they still load
    and resume exactly."""
    cfg = MODEL.replace(kind=kind)
    straight = train(cfg, TRAIN, out=tmp_path / "a", progress=False, data=data)
    with pytest.raises(Stop):
        train(cfg, TRAIN, out=tmp_path / "b", progress=False, data=data,
              on_step=stop_at(5, Stop()))
    path = checkpoint_path(tmp_path / "b")
    state, meta = tm.nn.load(path)
    new_weight = "W_r" if kind == "switch" else "W_g"
    old = {k.replace(f".ffn.router.{new_weight}", ".ffn.gate.router.W_r"): v
           for k, v in state.items()}
    assert "model.blocks.1.ffn.gate.router.W_r" in old
    gens = meta["rng"]["model"]
    meta["rng"]["model"] = {k.replace(".ffn.router.rng", ".ffn.gate.router.rng")
                            .replace(".ffn.experts.dropout.rng", ".ffn.expert_dropout.rng"): v
                            for k, v in gens.items()}
    assert "blocks.1.ffn.expert_dropout.rng" in meta["rng"]["model"]
    tm.nn.save(old, path, metadata=meta)
    model, _, _ = load_model(tmp_path / "b")
    np.testing.assert_array_equal(model.moe_layers[0].router.state_dict()[new_weight],
                                  state[f"model.blocks.1.ffn.router.{new_weight}"])
    resumed = train(out=tmp_path / "b", resume=True, progress=False, data=data)
    assert_same_run(straight, resumed)


def test_cli_train_resume_and_sample(tmp_path, capsys):
    out = str(tmp_path / "run")
    small = ["--block-size", "16", "--d-model", "16", "--n-layers", "2", "--n-heads", "2",
             "--d-ff", "32", "--num-experts", "4", "--batch-size", "4", "--eval-every", "2",
             "--eval-batches", "1", "--ckpt-every", "2", "--log-every", "1", "--no-progress"]
    assert main_train(["--out", out, "--steps", "3"] + small) == 0
    text = capsys.readouterr().out
    assert "validation loss" in text and "checkpoint:" in text and "active" in text
    assert main_train(["--out", out, "--steps", "4", "--resume", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "resuming from" in text and "at step 3" in text
    _, meta = tm.nn.load(checkpoint_path(out))
    assert meta["step"] == 4 and meta["train_config"]["batch_size"] == 4

    assert main_sample(["--checkpoint", out, "--prompt", "ROMEO:", "-n", "40",
                        "--temperature", "0.8", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.rstrip("\n")) >= len("ROMEO:") + 30
    main_sample(["--checkpoint", out, "--prompt", "ROMEO:", "-n", "40", "--seed", "1",
                 "--temperature", "0.8"])
    assert capsys.readouterr().out == first  # the same seed, the same text
    assert main_sample(["--checkpoint", out, "-n", "20", "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    main_sample(["--checkpoint", out, "-n", "20", "--temperature", "0", "--seed", "9"])
    assert capsys.readouterr().out == greedy  # temperature 0 ignores the seed


def test_generate_length_and_context(data):
    tok = data[0]
    res = train(MODEL, TRAIN.__class__(steps=2, batch_size=2, eval_every=1, eval_batches=1,
                                       log_every=1, ckpt_every=5), progress=False, data=data)
    text = generate(res.model, tok, "A" * 40, length=25, temperature=1.0, seed=0)
    assert len(text) == 25 and set(text) <= set(tok.chars)  # prompt longer than the context
    assert generate(res.model, tok, "A", length=0) == ""
    with pytest.raises(ValueError, match="temperature"):
        generate(res.model, tok, "A", temperature=-1)


def test_cli_errors(tmp_path, capsys):
    assert main_train(["--out", str(tmp_path / "none"), "--resume", "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().out
    assert main_train(["--out", str(tmp_path / "x"), "--capacity-factor", "0",
                       "--fast", "--no-progress"]) == 2
    assert "capacity_factor" in capsys.readouterr().out
    assert main_sample(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no checkpoint file" in capsys.readouterr().out
    out = str(tmp_path / "run")
    assert main_train(["--out", out, "--fast", "--steps", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main_sample(["--checkpoint", out, "--prompt", "é"]) == 2
    assert "not in the vocabulary" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main_train(["--kind", "soft"])
