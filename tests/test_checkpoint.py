"""Checkpoints that cannot lose a good state: verified loads (checksums, refused compressed,
oversized and crafted members, a fuzz of truncations, byte flips and member swaps), the
CheckpointWriter (keep last N, best by validation, no NaN, stale temporary files, Ctrl-C
during a save), the run lock, and a loop that kills a writer mid-save."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tinymoe as tm
from tinymoe.nn import FeedForward, serialization
from tinymoe.nn.checkpoint import CheckpointWriter, LockError, RunLock

STATE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.linspace(-1, 1, 5),
         "step": np.array(7), "ids": np.arange(3, dtype=np.int32)}
META = {"step": 7, "config": {"d": 4}, "name": "run"}


def assert_same(state, expected):
    assert list(state) == list(expected)
    for k in expected:
        assert state[k].dtype == expected[k].dtype and state[k].shape == expected[k].shape
        np.testing.assert_array_equal(state[k], expected[k])


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.npz"
    tm.nn.save(STATE, path, metadata=META)
    return path


def members(path):
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def rewrite(path, content, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in content.items():
            zf.writestr(name, data)


def npy(arr):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def forge(path, meta_obj, content=None):
    """A file whose metadata is ``meta_obj`` with a *valid* digest (a deliberate forgery)."""
    content = dict(content or members(path))
    raw = npy(np.array(json.dumps(meta_obj)))
    content[serialization.META_KEY + ".npy"] = raw
    content[serialization.META_SHA_KEY + ".npy"] = npy(np.array(serialization._sha256(raw)))
    rewrite(path, content)


# ------------------------------------------------------------------------ verified loads

def test_round_trip_is_exact_and_names_every_digest(good):
    state, meta = tm.nn.load(good)
    assert_same(state, STATE) and meta == META
    with np.load(good) as z:  # still a plain .npz for any NumPy
        env = json.loads(str(z[serialization.META_KEY]))
    assert set(env["sha256"]) == set(STATE) and env["format_version"] == 2


def test_compressed_member_is_refused_before_reading(good):
    rewrite(good, members(good), compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(ValueError, match=r"good.npz.*member 'w.npy' is compressed"):
        tm.nn.load(good)


def test_a_member_claiming_more_bytes_than_the_file_is_refused(good):
    data = bytearray(good.read_bytes())
    cd = data.rfind(b"PK\x01\x02")  # the last central-directory entry: its sizes
    data[cd + 20:cd + 28] = (10 ** 9).to_bytes(4, "little") * 2  # 1 GB, in a tiny file
    good.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="more than the whole file|corrupt"):
        tm.nn.load(good)


@pytest.mark.parametrize("meta_obj,match", [
    ([1, 2], "JSON list, not an object"),
    ({"format_version": "2", "metadata": {}}, "format_version='2'"),
    ({"format_version": 2, "metadata": [], "sha256": {}}, "'metadata' .* list"),
    ({"format_version": 2, "metadata": {}}, "no valid 'sha256' table"),
    ({"format_version": 2, "metadata": {}, "sha256": {"w": 5}}, "no valid 'sha256' table"),
    ({"format_version": 2, "metadata": {}, "sha256": {"w": "0" * 64}},
     "'b.npy' is not in the checkpoint's checksum table"),
    ({"format_version": 99, "metadata": {}}, "format version 99.*upgrade tinymoe"),
])
def test_crafted_metadata_is_refused_clearly(good, meta_obj, match):
    forge(good, meta_obj)
    with pytest.raises(ValueError, match=match) as e:
        tm.nn.load(good)
    assert str(good) in str(e.value)


def test_metadata_that_is_not_json_or_not_a_string(good):
    content = members(good)
    raw = npy(np.arange(3))  # an int array where the JSON string belongs
    content[serialization.META_KEY + ".npy"] = raw
    content[serialization.META_SHA_KEY + ".npy"] = npy(np.array(serialization._sha256(raw)))
    rewrite(good, content)
    with pytest.raises(ValueError, match="is not a JSON string"):
        tm.nn.load(good)


def test_pickled_member_is_refused(good):
    content = members(good)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    content["w.npy"] = buf.getvalue()
    rewrite(good, content)
    with pytest.raises(ValueError, match="member 'w.npy'"):
        tm.nn.load(good)


def test_swapped_extra_and_missing_members_are_refused(good):
    content = members(good)
    swapped = dict(content)
    swapped["w.npy"], swapped["b.npy"] = content["b.npy"], content["w.npy"]
    rewrite(good, swapped)
    with pytest.raises(ValueError, match=r"member '(w|b).npy' does not match its SHA-256"):
        tm.nn.load(good)
    rewrite(good, {**content, "extra.npy": npy(np.zeros(2))})
    with pytest.raises(ValueError, match="'extra.npy' is not in the checkpoint's checksum"):
        tm.nn.load(good)
    rewrite(good, {k: v for k, v in content.items() if k != "b.npy"})
    with pytest.raises(ValueError, match="'b.npy' is missing"):
        tm.nn.load(good)
    rewrite(good, {k: v for k, v in content.items() if k != serialization.META_SHA_KEY + ".npy"})
    with pytest.raises(ValueError, match="meta_sha256__' is missing"):
        tm.nn.load(good)


def test_save_refuses_nan_only_when_asked(tmp_path):
    bad = {"a": np.ones(2), "b": np.array([1.0, np.nan])}
    with pytest.raises(FloatingPointError, match="'b' holds NaN or inf"):
        tm.nn.save(bad, tmp_path / "x.npz", require_finite=True)
    assert os.listdir(tmp_path) == []
    tm.nn.save(bad, tmp_path / "x.npz")  # a plain save keeps what it is given
    assert np.isnan(tm.nn.load(tmp_path / "x.npz")[0]["b"][1])


# ------------------------------------------------------------------------ the fuzz

def mutate(data: bytes, kind: str, at: float, value: int, content: dict) -> bytes:
    if kind == "truncate":
        return data[:int(at * len(data))]
    if kind == "flip":
        i = min(int(at * len(data)), len(data) - 1)
        out = bytearray(data)
        out[i] ^= value or 1
        return bytes(out)
    names = sorted(content)  # swap two members' contents (names and order unchanged)
    a, b = names[int(at * len(names)) % len(names)], names[value % len(names)]
    if a == b:
        b = names[(names.index(a) + 1) % len(names)]
    swapped = dict(content)
    swapped[a], swapped[b] = content[b], content[a]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in content:
            zf.writestr(name, swapped[name])
    return buf.getvalue()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    model = FeedForward(3, 5, rng=0)
    opt = tm.optim.AdamW(model.parameters(), lr=1e-2)
    x = tm.tensor(np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32))
    model(x).sum().backward()
    opt.step()
    state = {**{f"model.{k}": v for k, v in model.state_dict().items()},
             **{f"optim.{k}": v for k, v in opt.state_dict().items()}}
    path = d / "good.npz"
    tm.nn.save(state, path, metadata={"step": 1})
    return d, path.read_bytes(), state, members(path)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["truncate", "flip", "swap"]),
       at=st.floats(0, 1, allow_nan=False), value=st.integers(0, 255))
def test_fuzz_every_load_is_exact_or_refused_and_leaves_the_model_untouched(
        fuzz_dir, kind, at, value):
    d, data, saved, content = fuzz_dir
    path = d / "mutated.npz"
    path.write_bytes(mutate(data, kind, at, value, content))
    model = FeedForward(3, 5, rng=1)
    opt = tm.optim.AdamW(model.parameters(), lr=1e-2)
    before = ({k: v.copy() for k, v in model.state_dict().items()},
              {k: v.copy() for k, v in opt.state_dict().items()})
    try:
        state, meta = tm.nn.load(path)
    except ValueError as e:  # refused: clearly, naming the file; nothing was touched
        assert str(path) in str(e)
        assert_same(model.state_dict(), before[0])
        assert_same(opt.state_dict(), before[1])
        return
    assert meta == {"step": 1}  # loaded: exactly what was saved
    assert_same(state, saved)


# ------------------------------------------------------------------------ the writer

def test_writer_keeps_last_n_and_the_best_and_never_a_worse_best(tmp_path):
    with CheckpointWriter(tmp_path, keep_last=2) as w:
        for step, val in [(1, 3.0), (2, 2.0), (3, 2.5), (4, None), (5, float("nan"))]:
            w.save({"a": np.full(2, float(step))}, {"note": step}, step=step, val_loss=val)
        names = sorted(os.listdir(tmp_path))
        assert names == [".lock", "checkpoint-00000004.npz", "checkpoint-00000005.npz",
                         "checkpoint-best.npz", "checkpoint.npz"]
        best, meta = tm.nn.load(w.best)
        assert meta["step"] == 2 and meta["val_loss"] == 2.0 and best["a"][0] == 2.0
        assert tm.nn.load(w.latest)[1]["step"] == 5
    assert not (tmp_path / ".lock").exists()
    with CheckpointWriter(tmp_path, keep_last=2) as w:  # a restart remembers the best
        assert w.best_val_loss == 2.0
        w.save({"a": np.zeros(2)}, step=6, val_loss=2.1)
        assert tm.nn.load(w.best)[1]["step"] == 2


def test_writer_refuses_non_finite_state_and_keeps_everything(tmp_path):
    with CheckpointWriter(tmp_path) as w:
        w.save({"a": np.ones(2)}, step=1, val_loss=1.0)
        before = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path) if p != ".lock"}
        with pytest.raises(FloatingPointError, match="'optim.m' holds NaN"):
            w.save({"a": np.ones(2), "optim.m": np.array([np.inf])}, step=2, val_loss=0.5)
        after = {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path) if p != ".lock"}
        assert after == before


def test_writer_removes_stale_temporary_files_on_start(tmp_path):
    stale = [".checkpoint.npz.abc123.tmp", ".checkpoint-00000002.npz.x.tmp",
             ".checkpoint.npz.link.tmp"]
    for name in stale + ["notes.txt", "data.tmp"]:
        (tmp_path / name).write_bytes(b"half")
    w = CheckpointWriter(tmp_path)
    assert w.removed_temp_files == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == [".lock", "data.tmp", "notes.txt"]
    w.close()


def test_writer_checks_keep_last():
    with pytest.raises(ValueError, match="keep_last=0 must be an integer >= 1"):
        CheckpointWriter("unused", keep_last=0, lock=False)


def test_sigint_during_a_save_lets_it_finish_then_interrupts(tmp_path, monkeypatch):
    # a job started in the background of a non-interactive shell inherits SIGINT ignored;
    # Ctrl-C's Python handler is what this test is about, so install it for the test
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _sigint_during_a_save(tmp_path, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, before)


def _sigint_during_a_save(tmp_path, monkeypatch):
    real = serialization._write_npz

    def write_then_ctrl_c(f, content):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives in the middle of the save
        real(f, content)

    with CheckpointWriter(tmp_path) as w:
        w.save({"a": np.zeros(2)}, step=1)
        monkeypatch.setattr(serialization, "_write_npz", write_then_ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            w.save({"a": np.ones(2)}, step=2)
        monkeypatch.undo()
        state, meta = tm.nn.load(w.latest)  # the save that was interrupted is complete
        assert meta["step"] == 2 and state["a"][0] == 1.0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------------ the lock

def test_a_second_writer_is_refused_with_how_to_take_over(tmp_path):
    first = CheckpointWriter(tmp_path)
    with pytest.raises(LockError) as e:
        CheckpointWriter(tmp_path)
    msg = str(e.value)
    assert f"process {os.getpid()}" in msg and socket.gethostname() in msg
    assert "--force-unlock" in msg and ".lock" in msg
    first.close()
    CheckpointWriter(tmp_path).close()  # free again


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_stale_lock_on_this_host_is_taken_over(tmp_path):
    owner = {"pid": dead_pid(), "host": socket.gethostname(), "started": "earlier"}
    (tmp_path / ".lock").write_text(json.dumps(owner))
    lock = RunLock(tmp_path)
    assert lock.taken_over == owner
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_a_lock_from_another_host_needs_force(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(LockError, match="host 'elsewhere'"):
        RunLock(tmp_path)
    (tmp_path / ".lock").write_text("{garbage")  # unreadable: never assumed stale
    with pytest.raises(LockError, match="an unknown process"):
        RunLock(tmp_path)
    RunLock(tmp_path, force=True).release()


def test_release_never_removes_someone_elses_lock(tmp_path):
    lock = RunLock(tmp_path)
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    lock.release()
    assert (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------ kill during save

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from tinymoe.nn.checkpoint import CheckpointWriter
    w = CheckpointWriter(sys.argv[1], keep_last=2, force_unlock=True)
    big = np.zeros(1_500_000)  # 12 MB per save: a kill lands mid-write
    step = int(sys.argv[2])
    while True:
        step += 1
        big[:] = step
        w.save({"big": big, "step": np.array(step)}, step=step, val_loss=1.0 / step)
        print("saved", step, flush=True)
""")


def test_killing_the_writer_mid_save_never_loses_the_last_good_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    last = 0
    for kill in range(4):
        p = subprocess.Popen([sys.executable, str(script), str(run), str(last)],
                             stdout=subprocess.PIPE, env=env)
        assert p.stdout.readline().startswith(b"saved")  # a save of this process is done
        time.sleep(0.05 + 0.13 * kill)  # more saves, then SIGKILL at some moment
        p.kill()
        p.wait()
        state, meta = tm.nn.load(run / "checkpoint.npz")  # always a complete checkpoint
        step = meta["step"]
        assert step >= last and int(state["step"]) == step and (state["big"] == step).all()
        best, bmeta = tm.nn.load(run / "checkpoint-best.npz")
        assert (best["big"] == bmeta["step"]).all()
        last = step
    assert last > 0
    # the next writer cleans whatever the kill left behind
    CheckpointWriter(run, force_unlock=True).close()
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]

