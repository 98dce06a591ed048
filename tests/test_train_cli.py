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

# Tests that train run the Switch layer's capacity, balancing loss and z-loss (tasks 4_1-4_3);
# the argument checks stop before any training, so they carry no task.
TRAINS = [pytest.mark.task4_1, pytest.mark.task4_2, pytest.mark.task4_3]


def trains(test):
    for mark in TRAINS:
        test = mark(test)
    return test

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


@trains
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


@trains
def test_resume_after_a_crash_restarts_from_the_last_periodic_checkpoint(tmp_path, data):
    straight = train(MODEL, TRAIN, out=tmp_path / "a", progress=False, data=data)
    with pytest.raises(Stop):  # a crash at step 5: steps 4 is the last checkpoint
        train(MODEL, TRAIN, out=tmp_path / "b", progress=False, data=data,
              on_step=stop_at(5, Stop()))
    _, meta = tm.nn.load(checkpoint_path(tmp_path / "b"))
    assert meta["step"] == 4 and meta["history"]["steps"][-1] == 4
    resumed = train(out=tmp_path / "b", resume=True, progress=False, data=data)
    assert_same_run(straight, resumed)


@trains
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


@trains
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


@trains
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


@trains
def test_generate_length_and_context(data):
    tok = data[0]
    res = train(MODEL, TRAIN.__class__(steps=2, batch_size=2, eval_every=1, eval_batches=1,
                                       log_every=1, ckpt_every=5), progress=False, data=data)
    text = generate(res.model, tok, "A" * 40, length=25, temperature=1.0, seed=0)
    assert len(text) == 25 and set(text) <= set(tok.chars)  # prompt longer than the context
    assert generate(res.model, tok, "A", length=0) == ""
    with pytest.raises(ValueError, match="temperature"):
        generate(res.model, tok, "A", temperature=-1)


@trains
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


# ------------------------------------------------------------------ reliability (issue 18)

SMALL = ["--block-size", "16", "--d-model", "16", "--n-layers", "2", "--n-heads", "2",
         "--d-ff", "32", "--num-experts", "4", "--batch-size", "4", "--eval-every", "2",
         "--eval-batches", "1", "--log-every", "1", "--no-progress"]

BAD_ARGS = [
    (["--steps", "0"], "steps=0 must be a positive integer"),
    (["--steps", "x"], "argument --steps: 'x' is not an integer"),
    (["--steps", "1.5"], "argument --steps: '1.5' is not an integer"),
    (["--batch-size", "-3"], "batch_size=-3"),
    (["--lr", "0"], "lr=0.0 must be a finite number > 0"),
    (["--lr", "nan"], "argument --lr: 'nan': give a finite number"),
    (["--lr", "inf"], "argument --lr: 'inf': give a finite number"),
    (["--warmup", "-1"], "warmup=-1 must be an integer >= 0"),
    (["--weight-decay", "-1"], "weight_decay=-1.0"),
    (["--clip", "nan"], "argument --clip: 'nan': give a finite number"),
    (["--clip", "-1"], "clip=-1.0 must be a finite number >= 0"),
    (["--clip", "inf"], "argument --clip: 'inf': give a finite number"),
    (["--eval-every", "0"], "eval_every=0"),
    (["--ckpt-every", "0"], "ckpt_every=0"),
    (["--seed", "-1"], "seed=-1 must be an integer >= 0"),
    (["--keep-last", "0"], "keep_last=0 must be a positive integer"),
    (["--divergence-factor", "1"], "divergence_factor=1.0 must be > 1"),
    (["--divergence-factor", "nan"], "'nan': give a finite number"),
    (["--d-model", "0"], "d_model must be a positive integer"),
    (["--n-heads", "3"], "not divisible by n_heads=3"),
    (["--block-size", "0"], "block_size must be a positive integer"),
    (["--capacity-factor", "nan"], "'nan': give a finite number"),
    (["--capacity-factor", "0"], "capacity_factor=0.0 must be a finite number > 0"),
    (["--group-size", "0"], "group_size"),
    (["--expert-dropout", "1.5"], "expert_dropout=1.5 must be in [0, 1)"),
    (["--kind", "soft"], "argument --kind: invalid choice: 'soft'"),
    (["--router-dtype", "int8"], "argument --router-dtype: invalid choice: 'int8'"),
    (["--resume"], "--resume: no checkpoint at"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


def run_cli(argv, capsys):
    """(exit status, everything printed) of ``tinymoe train argv``."""
    try:
        rc = main_train(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, (out.out + out.err).strip()


@pytest.mark.parametrize("argv,match", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_every_bad_argument_is_one_line_and_trains_nothing(tmp_path, capsys, argv, match):
    out = tmp_path / "run"
    rc, text = run_cli(["--out", str(out), "--fast", "--no-progress"] + argv, capsys)
    assert rc == 2 and len(text.splitlines()) == 1, text
    assert "tinymoe train: error:" in text and match in text, text
    assert not out.exists() or not list(out.glob("*.npz"))


def test_bad_out_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    rc, text = run_cli(["--out", str(blocker / "run"), "--fast", "--no-progress"], capsys)
    assert rc == 2 and len(text.splitlines()) == 1 and "--out" in text, text


def test_the_real_command_prints_no_traceback(tmp_path):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "tinymoe", "train", "--out", str(tmp_path),
                        "--clip", "nan"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == 2 and "Traceback" not in p.stderr + p.stdout
    assert p.stderr.strip().splitlines() == [
        "tinymoe train: error: argument --clip: 'nan': give a finite number (see tinymoe "
        "train --help)"]


def test_train_config_refuses_non_finite_clip():
    for clip in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="clip"):
            TrainConfig(clip=clip)


def good_run(tmp_path, data, steps=4):
    out = tmp_path / "run"
    train(MODEL, TRAIN.__class__(**{**TRAIN.__dict__, "steps": steps, "ckpt_every": 1,
                                    "keep_last": 2}), out=out, progress=False, data=data)
    snap = {p.name: p.read_bytes() for p in out.glob("*.npz")}
    return out, snap


@trains
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("lr,clip", [(1e3, 1.0), (1e12, 0.0)])
def test_a_diverging_run_stops_and_never_replaces_a_good_checkpoint(tmp_path, data, lr, clip):
    out, snap = good_run(tmp_path, data)
    cfg = TrainConfig.from_dict({**TRAIN.__dict__, "steps": 40, "lr": lr, "clip": clip,
                                 "ckpt_every": 1, "warmup": 0, "keep_last": 2})
    with pytest.raises(FloatingPointError, match=r"training diverged at step 5: ") as e:
        train(train_cfg=cfg, out=out, resume=True, progress=False, data=data)
    assert "--lr" in str(e.value) and str(out) in str(e.value)
    assert {p.name: p.read_bytes() for p in out.glob("*.npz")} == snap  # nothing replaced
    state, meta = tm.nn.load(checkpoint_path(out))
    assert meta["step"] == 4 and all(np.isfinite(v).all() for v in state.values()
                                     if v.dtype.kind == "f")
    res = train(train_cfg=TrainConfig.from_dict({**cfg.__dict__, "lr": 3e-3, "steps": 6}),
                out=out, resume=True, progress=False, data=data)  # the good state resumes
    assert res.history.steps[-1] == 6 and np.isfinite(res.final_val_loss)


@trains
def test_divergence_names_the_step_and_the_first_non_finite_tensor(tmp_path, data):
    def poison(step, model):
        if step == 3:
            model.blocks[1].ffn.router.W_r.data[0, 0] = np.nan

    cfg = TrainConfig.from_dict({**TRAIN.__dict__, "ckpt_every": 1})
    with pytest.raises(FloatingPointError,
                       match=r"step 4: .*first non-finite tensor is "
                             r"model\.blocks\.1\.ffn\.router\.W_r"):
        train(MODEL, cfg, out=tmp_path, progress=False, data=data, on_step=poison)
    assert tm.nn.load(checkpoint_path(tmp_path))[1]["step"] == 3


@trains
def test_the_cli_exits_non_zero_on_divergence(tmp_path, data, capsys):
    out, snap = good_run(tmp_path, data)
    with np.errstate(all="ignore"):
        rc, text = run_cli(["--out", str(out), "--resume", "--steps", "20", "--lr", "1e3",
                            "--warmup", "0", "--no-progress"], capsys)
    assert rc == 1 and "training diverged at step" in text, text
    assert {p.name: p.read_bytes() for p in out.glob("*.npz")} == snap


@trains
def test_keep_last_and_best(tmp_path, data):
    out, _ = good_run(tmp_path, data, steps=6)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint-00000005.npz", "checkpoint-00000006.npz",
                     "checkpoint-best.npz", "checkpoint.npz"]
    best = tm.nn.load(out / "checkpoint-best.npz")[1]
    vals = [tm.nn.load(out / n)[1]["val_loss"] for n in names if n[-5].isdigit()]
    assert best["val_loss"] <= min(vals)


@trains
def test_a_second_training_in_one_folder_is_refused(tmp_path, capsys):
    from tinymoe.nn.checkpoint import RunLock
    out = tmp_path / "run"
    lock = RunLock(out)  # a run (this process) is writing there
    rc, text = run_cli(["--out", str(out), "--fast", "--steps", "1"] + SMALL, capsys)
    assert rc == 1 and "is in use by process" in text and "--force-unlock" in text
    assert not list(out.glob("*.npz"))
    rc, text = run_cli(["--out", str(out), "--fast", "--steps", "1", "--force-unlock"] + SMALL,
                       capsys)
    assert rc == 0, text
    lock.release()
    assert not (out / ".lock").exists()  # the run released the lock it took over


@trains
def test_a_new_run_never_silently_replaces_an_old_one(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_cli(["--out", out, "--steps", "2"] + SMALL, capsys)[0] == 0
    rc, text = run_cli(["--out", out, "--steps", "2"] + SMALL, capsys)
    assert rc == 2 and "--resume" in text and "--overwrite" in text, text
    rc, text = run_cli(["--out", out, "--steps", "2", "--overwrite"] + SMALL, capsys)
    assert rc == 0 and "deleting" in text


@trains
def test_resume_refuses_corrupt_and_crafted_checkpoints_clearly(tmp_path, data, capsys):
    out, _ = good_run(tmp_path, data)
    path = checkpoint_path(out)
    state, meta = tm.nn.load(path)
    tm.nn.save(state, path, metadata={**meta, "step": "four"})  # valid checksums, bad field
    rc, text = run_cli(["--out", str(out), "--resume", "--no-progress"], capsys)
    assert rc == 2 and "no valid 'step'" in text and len(text.splitlines()) == 1, text
    tm.nn.save(state, path, metadata={**meta, "model_config": {"d_model": "x"}})
    rc, text = run_cli(["--out", str(out), "--resume", "--no-progress"], capsys)
    assert rc == 2 and "TransformerConfig" in text and len(text.splitlines()) == 1, text
    path.write_bytes(path.read_bytes()[:1000])  # truncated: the message names the others
    rc, text = run_cli(["--out", str(out), "--resume", "--no-progress"], capsys)
    assert rc == 2 and "checkpoint-00000004.npz" in text and "copy one over" in text, text


@trains
def test_stale_temporary_files_are_removed_when_a_run_starts(tmp_path, data):
    out, _ = good_run(tmp_path, data)
    (out / ".checkpoint.npz.k1ll3d.tmp").write_bytes(b"PK half a save")
    train(out=out, resume=True, progress=False, data=data)
    assert not list(out.glob(".*.tmp"))


@trains
def test_sample_refuses_crafted_metadata_in_one_line(tmp_path, data, capsys):
    out, _ = good_run(tmp_path, data)
    path = checkpoint_path(out)
    state, meta = tm.nn.load(path)
    for bad in ({"model_config": [1, 2]}, {"model_config": {"n_heads": "two"}},
                {"chars": 5}):
        tm.nn.save(state, path, metadata={**meta, **bad})
        assert main_sample(["--checkpoint", str(out), "-n", "5"]) == 2
        text = capsys.readouterr().out.strip()
        assert len(text.splitlines()) == 1 and str(path) in text, text
