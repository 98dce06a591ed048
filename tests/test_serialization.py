"""tm.nn.save / load / load_into: round trips, refusals that leave the module unchanged,
corrupt files, and atomic saves that survive a crash."""
import json
import os
import zipfile

import numpy as np
import pytest

import tinymoe as tm
from tinymoe.nn import FeedForward, Linear, serialization


def snapshot(module):
    return {k: v.copy() for k, v in module.state_dict().items()}


def assert_params_equal(module, snap):
    now = module.state_dict()
    assert list(now) == list(snap)
    for k in snap:
        assert now[k].dtype == snap[k].dtype, k
        np.testing.assert_array_equal(now[k], snap[k])


def leftovers(directory, keep):
    return sorted(set(os.listdir(directory)) - set(keep))


# ------------------------------------------------------------------------ round trips

def test_module_round_trip_with_metadata(tmp_path):
    a = FeedForward(4, 8, rng=0)
    path = tmp_path / "ckpt.npz"
    meta = {"step": 1200, "config": {"d_model": 4, "activation": "gelu"}, "loss": 1.25}
    tm.nn.save(a, path, metadata=meta)
    b = FeedForward(4, 8, rng=1)
    assert tm.nn.load_into(b, path) == meta
    assert_params_equal(b, snapshot(a))
    assert leftovers(tmp_path, ["ckpt.npz"]) == []


def test_state_dict_round_trip_keeps_dtypes_and_is_plain_npz(tmp_path):
    sd = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3),
          "step": np.array(7), "ids": np.arange(4, dtype=np.int32),
          "file": np.zeros(1), "allow_pickle": np.zeros(2)}  # names np.savez would choke on
    path = str(tmp_path / "sd.npz")
    tm.nn.save(sd, path)
    loaded, meta = tm.nn.load(path)
    assert meta == {} and list(loaded) == list(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        np.testing.assert_array_equal(loaded[k], v)
    with np.load(path, allow_pickle=False) as z:  # any NumPy reads it
        np.testing.assert_array_equal(z["w"], sd["w"])
        meta_entry = json.loads(str(z[serialization.META_KEY]))
    assert meta_entry["format"] == "tinymoe" and meta_entry["format_version"] == 2
    assert set(meta_entry["sha256"]) == set(sd)


def test_save_overwrites_and_accepts_tensors(tmp_path):
    path = tmp_path / "x.npz"
    tm.nn.save({"a": np.zeros(2)}, path)
    tm.nn.save({"a": tm.tensor(np.ones(2))}, path)
    np.testing.assert_array_equal(tm.nn.load(path)[0]["a"], [1.0, 1.0])
    assert leftovers(tmp_path, ["x.npz"]) == []


def test_plain_np_savez_file_is_refused_unless_verify_false(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, **Linear(2, 3, rng=0).state_dict())
    lin = Linear(2, 3, rng=1)
    with pytest.raises(ValueError, match=r"no tinymoe metadata.*verify=False"):
        tm.nn.load_into(lin, path)
    assert_params_equal(lin, Linear(2, 3, rng=1).state_dict())
    assert tm.nn.load_into(lin, path, verify=False) == {}
    assert_params_equal(lin, Linear(2, 3, rng=0).state_dict())


def write_format1(path, state, metadata):
    """A checkpoint as tinymoe wrote it before checksums (format 1)."""
    meta = json.dumps({"format": "tinymoe", "format_version": 1, "metadata": metadata})
    with zipfile.ZipFile(path, "w") as zf:
        for name, arr in {**state, serialization.META_KEY: np.array(meta)}.items():
            with zf.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)


def test_format1_checkpoint_loads_with_a_warning_and_converts(tmp_path):
    path = tmp_path / "old.npz"
    sd = Linear(2, 3, rng=0).state_dict()
    write_format1(path, sd, {"step": 5})
    with pytest.warns(UserWarning, match=r"format 1.*Re-save it once"):
        state, meta = tm.nn.load(path)
    assert meta == {"step": 5}
    for k in sd:
        np.testing.assert_array_equal(state[k], sd[k])
    tm.nn.save(state, path, metadata=meta)  # the conversion the message names
    state2, meta2 = tm.nn.load(path)
    assert meta2 == {"step": 5} and list(state2) == list(sd)
    for k in sd:
        np.testing.assert_array_equal(state2[k], sd[k])


# ------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("change,match", [
    (lambda sd: sd.pop("fc2.bias"), "missing key: fc2.bias"),
    (lambda sd: sd.update(extra=np.zeros(1, np.float32)), "unexpected key: extra"),
    (lambda sd: sd.update({"fc1.weight": np.zeros((4, 9), np.float32)}),
     r"fc1.weight: \(4, 9\) float32 in the state dict, \(4, 8\) float32 in the module"),
    (lambda sd: sd.update({"fc1.bias": np.zeros(8, np.float64)}), "fc1.bias: .* float64"),
])
def test_load_into_refuses_wrong_keys_shapes_dtypes(tmp_path, change, match):
    sd = FeedForward(4, 8, rng=1).state_dict()
    change(sd)
    path = tmp_path / "bad.npz"
    tm.nn.save(sd, path)
    m = FeedForward(4, 8, rng=0)
    snap = snapshot(m)
    with pytest.raises(ValueError, match=match) as e:
        tm.nn.load_into(m, path)
    assert str(path) in str(e.value) and "nothing was loaded" in str(e.value)
    assert_params_equal(m, snap)


def corrupt_files(directory, good):
    data = good.read_bytes()
    mid = len(data) // 2
    flipped = bytearray(data)
    flipped[mid:mid + 16] = bytes(b ^ 0xFF for b in flipped[mid:mid + 16])
    files = {"truncated": data[:mid], "flipped": bytes(flipped), "empty": b"",
             "text": b"this is not a checkpoint\n", "no_end": data[:-30]}
    out = {}
    for name, content in files.items():
        p = directory / f"{name}.npz"
        p.write_bytes(content)
        out[name] = p
    npy = directory / "array.npz"
    with open(npy, "wb") as f:
        np.save(f, np.zeros(3))  # a .npy, not an archive
    out["npy"] = npy
    bad_member = directory / "bad_member.npz"
    with zipfile.ZipFile(bad_member, "w") as zf:
        zf.writestr("fc1.weight.npy", b"\x93NUMPY garbage")
    out["bad_member"] = bad_member
    return out


def test_corrupt_files_raise_a_clear_error_and_leave_the_module_unchanged(tmp_path):
    good = tmp_path / "good.npz"
    tm.nn.save(FeedForward(4, 8, rng=1), good)
    m = FeedForward(4, 8, rng=0)
    snap = snapshot(m)
    for name, path in corrupt_files(tmp_path, good).items():
        with pytest.raises(ValueError) as e:
            tm.nn.load_into(m, path)
        msg = str(e.value)
        assert str(path) in msg, name
        assert "truncated" in msg and "corrupt" in msg or "not a zip" in msg, (name, msg)
        assert_params_equal(m, snap)
        with pytest.raises(ValueError):
            tm.nn.load(path)


def test_missing_file_and_newer_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        tm.nn.load(tmp_path / "nope.npz")
    path = tmp_path / "future.npz"
    np.savez(path, **{serialization.META_KEY: np.array(json.dumps({"format_version": 99}))})
    with pytest.raises(ValueError, match="format version 99.*upgrade tinymoe"):
        tm.nn.load(path)


def test_save_refuses_bad_inputs_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        tm.nn.save(Linear(2, 2), tmp_path / "a.npz", metadata={"rng": np.random.default_rng()})
    with pytest.raises(ValueError, match="dtype object"):
        tm.nn.save({"x": np.array([{}, 1], dtype=object)}, tmp_path / "b.npz")
    with pytest.raises(ValueError, match="invalid key"):
        tm.nn.save({serialization.META_KEY: np.zeros(1)}, tmp_path / "c.npz")
    with pytest.raises(TypeError, match="expected a Module, an Optimizer or a state dict"):
        tm.nn.save([np.zeros(1)], tmp_path / "d.npz")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------ atomic saves

@pytest.fixture
def old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    old = FeedForward(4, 8, rng=0)
    tm.nn.save(old, path, metadata={"step": 1})
    return path, snapshot(old)


def assert_old_intact(path, snap):
    state, meta = tm.nn.load(path)
    assert meta == {"step": 1}
    for k in snap:
        np.testing.assert_array_equal(state[k], snap[k])
    assert leftovers(path.parent, [path.name]) == []  # no temp file lingers


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_crash_while_writing_keeps_the_old_checkpoint(old_checkpoint, monkeypatch, exc):
    path, snap = old_checkpoint
    real = serialization._write_npz

    def crash_halfway(f, arrays):
        real(f, dict(list(arrays.items())[:2]))  # some bytes reach the temp file...
        raise exc  # ...then the process dies

    monkeypatch.setattr(serialization, "_write_npz", crash_halfway)
    with pytest.raises(type(exc)):
        tm.nn.save(FeedForward(4, 8, rng=5), path, metadata={"step": 2})
    assert_old_intact(path, snap)


def test_crash_at_rename_keeps_the_old_checkpoint(old_checkpoint, monkeypatch):
    path, snap = old_checkpoint

    def failing_replace(src, dst):
        assert os.path.dirname(os.path.abspath(src)) == os.path.dirname(os.path.abspath(dst))
        raise OSError("rename failed")

    monkeypatch.setattr(serialization.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        tm.nn.save(FeedForward(4, 8, rng=5), path, metadata={"step": 2})
    monkeypatch.undo()
    assert_old_intact(path, snap)


def test_save_fsyncs_the_data_before_renaming(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(serialization.os, "fsync",
                        lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(serialization.os, "replace",
                        lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    tm.nn.save(Linear(2, 2), tmp_path / "x.npz")
    assert events[:2] == ["fsync", "replace"]
