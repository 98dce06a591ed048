"""Checkpoints: a state dict (plus a little JSON metadata) in one ``.npz`` file.

The format is NumPy's ``.npz``: a zip archive holding one ``<name>.npy`` per array, so any
NumPy can read it with ``np.load(path)``. One extra entry, ``__tinymoe_meta__``, holds a
JSON string ``{"format": "tinymoe", "format_version": 1, "metadata": {...}}``; the user's
``metadata`` (training step, config, ...) comes back from :func:`load`. Nothing is pickled.

Saving is atomic. The archive is written to a temporary file in the target directory,
flushed to disk (``fsync``), then renamed over ``path`` with ``os.replace``, which either
happens completely or not at all. A crash mid-save (power cut, Ctrl-C, full disk) therefore
leaves the previous checkpoint intact, never a half-written one.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor

FORMAT_VERSION = 1
META_KEY = "__tinymoe_meta__"


def _arrays(obj: Module | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The named arrays to write, checked: string keys, no object (pickled) arrays."""
    state = obj.state_dict() if hasattr(obj, "state_dict") else obj  # a Module, Optimizer
    if not isinstance(state, Mapping):
        raise TypeError(f"save: expected a Module, an Optimizer or a state dict (a mapping "
                        f"of names to arrays), got {type(obj).__name__}")
    out = {}
    for k, v in state.items():
        if not isinstance(k, str) or not k or k == META_KEY:
            raise ValueError(f"save: invalid key {k!r} (keys are non-empty strings other "
                             f"than {META_KEY!r})")
        arr = np.asarray(v.data if isinstance(v, Tensor) else v)
        if arr.dtype == object:
            raise ValueError(f"save: {k!r} is not a numeric array (dtype object); only "
                             f"arrays, numbers and strings can be saved")
        out[k] = arr
    return out


def _write_npz(f: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    """What ``np.savez`` does: one ``.npy`` member per array in an uncompressed zip."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, arr, allow_pickle=False)


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(obj: Module | Mapping[str, Any], path: str | os.PathLike,
         metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``obj``'s state dict (a Module or an Optimizer), or a state dict itself, to
    ``path`` atomically.

    ``metadata`` is a JSON-serialisable dict kept alongside the arrays (e.g.
    ``{"step": 1200, "config": {...}}``) and returned by :func:`load`.
    """
    arrays = _arrays(obj)
    try:
        meta = json.dumps({"format": "tinymoe", "format_version": FORMAT_VERSION,
                           "metadata": dict(metadata or {})})
    except (TypeError, ValueError) as e:
        raise ValueError(f"save: metadata must be JSON-serialisable (numbers, strings, "
                         f"lists, dicts): {e}") from None
    arrays[META_KEY] = np.array(meta)

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename
        os.chmod(tmp, 0o644)  # mkstemp makes 0o600 files
        os.replace(tmp, path)  # atomic: `path` is the old file or the new one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint: ``(state_dict, metadata)``.

    Raises FileNotFoundError when nothing is at ``path`` and ValueError, naming the file,
    when it is not a readable ``.npz`` (truncated, corrupt, or another kind of file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load: no checkpoint file at {path!r}")
    hint = (f"load: cannot read {path!r} as a tinymoe checkpoint (.npz)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{hint}: it is not a zip/.npz archive; the file may be truncated "
                         f"(an interrupted copy or download) or be some other kind of file")
    try:
        with np.load(path, allow_pickle=False) as z:
            state = {name: z[name] for name in z.files}  # reads (and CRC-checks) every array
        envelope = json.loads(str(state.pop(META_KEY, np.array("{}"))[()]))
    except Exception as e:
        raise ValueError(f"{hint}: {type(e).__name__}: {e}; the file is probably corrupt or "
                         f"truncated; restore it from a backup or an earlier "
                         f"checkpoint") from e
    version = envelope.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(f"{hint}: it has format version {version}, newer than this tinymoe "
                         f"understands ({FORMAT_VERSION}); upgrade tinymoe")
    return state, dict(envelope.get("metadata", {}))


def load_into(module: Module, path: str | os.PathLike, strict: bool = True) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``module`` and return its metadata.

    On any problem (unreadable file, missing or unexpected keys, wrong shapes or dtypes) a
    ValueError names the file and the module is left unchanged. ``module`` may also be an
    Optimizer (``strict`` does not apply: its state must fit exactly).
    """
    state, metadata = load(path)
    try:
        if isinstance(module, Module):
            module.load_state_dict(state, strict=strict)
        else:
            module.load_state_dict(state)
    except ValueError as e:
        raise ValueError(f"load_into: {os.fspath(path)!r}: {e}") from None
    return metadata
