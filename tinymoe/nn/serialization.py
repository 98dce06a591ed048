"""Checkpoints: a state dict (plus a little JSON metadata) in one ``.npz`` file.

The format is NumPy's ``.npz``: an uncompressed zip archive holding one ``<name>.npy`` per
array, so any NumPy can read it with ``np.load(path)``. One extra entry, ``__tinymoe_meta__``,
holds a JSON string ``{"format": "tinymoe", "format_version": 2, "metadata": {...},
"sha256": {name: digest}}``: the user's ``metadata`` (training step, config, ...) comes back
from :func:`load`, and ``sha256`` is the SHA-256 of every array's ``.npy`` bytes. A last
entry, ``__tinymoe_meta_sha256__``, is the SHA-256 of the metadata entry itself. Nothing
is pickled.

:func:`load` verifies everything before it returns anything: every member is stored (not
compressed) and no larger than the file, the metadata's digest matches, every array listed
is present with its digest, and no array is there that the metadata does not list. A
truncated, bit-flipped, spliced or crafted file is refused with a ValueError naming the
file and the member.

Older files: a checkpoint tinymoe wrote before checksums (format 1) still loads, with a
warning (only the zip's CRC-32 guards it); a plain ``np.savez`` file has no tinymoe
metadata at all and is refused unless you pass ``verify=False`` (a damaged checkpoint whose
directory lost its last entries looks just like one). Re-save either to add checksums::

    state, meta = tm.nn.load("old.npz", verify=False)   # only for a file you trust
    tm.nn.save(state, "old.npz", metadata=meta)          # now format 2, verified on load

Saving is atomic. The archive is written to a temporary file in the target directory,
flushed to disk (``fsync``), then renamed over ``path`` with ``os.replace``, which either
happens completely or not at all. A crash mid-save (power cut, Ctrl-C, full disk) therefore
leaves the previous checkpoint intact, never a half-written one. Rotation, a "best"
checkpoint and the run lock are in :mod:`tinymoe.nn.checkpoint`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from typing import IO, Any

import numpy as np

from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor

FORMAT_VERSION = 2
META_KEY = "__tinymoe_meta__"
META_SHA_KEY = "__tinymoe_meta_sha256__"
RESERVED = (META_KEY, META_SHA_KEY)
TMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random>.tmp" beside the target


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: unreadable, corrupt, crafted or unverifiable."""


def _arrays(obj: Module | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The named arrays to write, checked: string keys, no object (pickled) arrays."""
    state = obj.state_dict() if hasattr(obj, "state_dict") else obj  # a Module, Optimizer
    if not isinstance(state, Mapping):
        raise TypeError(f"save: expected a Module, an Optimizer or a state dict (a mapping "
                        f"of names to arrays), got {type(obj).__name__}")
    out = {}
    for k, v in state.items():
        if not isinstance(k, str) or not k or k in RESERVED:
            raise ValueError(f"save: invalid key {k!r} (keys are non-empty strings other "
                             f"than {RESERVED})")
        arr = np.asarray(v.data if isinstance(v, Tensor) else v)
        if arr.dtype == object:
            raise ValueError(f"save: {k!r} is not a numeric array (dtype object); only "
                             f"arrays, numbers and strings can be saved")
        out[k] = arr
    return out


def first_nonfinite(arrays: Mapping[str, np.ndarray]) -> str | None:
    """The name of the first floating array holding NaN or inf, else None."""
    for name, a in arrays.items():
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all():
            return name
    return None


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_npz(f: IO[bytes], members: Mapping[str, bytes]) -> None:
    """What ``np.savez`` does: one ``.npy`` member per array in an uncompressed zip."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, data in members.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                member.write(data)


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
         metadata: Mapping[str, Any] | None = None, *, require_finite: bool = False) -> None:
    """Write ``obj``'s state dict (a Module or an Optimizer), or a state dict itself, to
    ``path`` atomically, with a SHA-256 of every array and of the metadata.

    ``metadata`` is a JSON-serialisable dict kept alongside the arrays (e.g.
    ``{"step": 1200, "config": {...}}``) and returned by :func:`load`.
    ``require_finite=True`` refuses (FloatingPointError, nothing written) a state holding
    NaN or inf, naming the first such array.
    """
    arrays = _arrays(obj)
    if require_finite and (bad := first_nonfinite(arrays)) is not None:
        raise FloatingPointError(f"save: {bad!r} holds NaN or inf; refusing to write "
                                 f"{os.fspath(path)!r} (the previous checkpoint is kept)")
    members = {name: _npy_bytes(a) for name, a in arrays.items()}
    try:
        meta = json.dumps({"format": "tinymoe", "format_version": FORMAT_VERSION,
                           "metadata": dict(metadata or {}),
                           "sha256": {name: _sha256(b) for name, b in members.items()}},
                          allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save: metadata must be JSON-serialisable (numbers, strings, "
                         f"lists, dicts; no NaN or inf): {e}") from None
    members[META_KEY] = _npy_bytes(np.array(meta))
    members[META_SHA_KEY] = _npy_bytes(np.array(_sha256(members[META_KEY])))

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX,
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_npz(f, members)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename
        os.chmod(tmp, 0o644)  # mkstemp makes 0o600 files
        os.replace(tmp, path)  # atomic: `path` is the old file or the new one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _read_members(path: str, hint: str) -> dict[str, bytes]:
    """Every member's bytes, each checked: stored, not larger than the file, CRC intact."""
    size = os.path.getsize(path)
    members: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            for info in infos:  # check every header before reading any data
                where = f"{hint}: member {info.filename!r}"
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{where} is compressed; tinymoe writes stored "
                                          f"members only (a compressed one could expand to "
                                          f"any size): re-save the arrays with tm.nn.save")
                if info.file_size > size or info.compress_size > size:
                    raise CheckpointError(f"{where} claims {info.file_size} bytes, more than "
                                          f"the whole file ({size}); the file is corrupt or "
                                          f"crafted")
                if not info.filename.endswith(".npy"):
                    raise CheckpointError(f"{where} is not a .npy array; the file is not a "
                                          f"checkpoint or was altered")
            for info in infos:
                name = info.filename[:-len(".npy")]
                if name in members:
                    raise CheckpointError(f"{hint}: member {info.filename!r} appears twice; "
                                          f"the file was altered")
                members[name] = zf.read(info)  # checks the CRC-32
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{hint}: {type(e).__name__}: {e}; the file is probably "
                              f"corrupt or truncated; restore it from a backup or an "
                              f"earlier checkpoint") from e
    return members


def _array(data: bytes, name: str, hint: str) -> np.ndarray:
    try:
        buf = io.BytesIO(data)
        arr = np.lib.format.read_array(buf, allow_pickle=False)
        if buf.read(1):
            raise ValueError("trailing bytes after the array")
    except Exception as e:
        raise CheckpointError(f"{hint}: member {name!r}: {type(e).__name__}: {e}; the file is "
                              f"probably corrupt or truncated") from e
    return arr


def _envelope(members: dict[str, bytes], hint: str, verify: bool) -> dict[str, Any]:
    """The parsed metadata entry, its own digest checked (format 2)."""
    if META_KEY not in members:
        if verify:
            raise CheckpointError(f"{hint}: it has no tinymoe metadata, so nothing can be "
                                  f"verified (a plain np.savez file, or a "
                                  f"checkpoint that is corrupt or truncated); if you trust "
                                  f"it, load it with tm.nn.load(path, verify=False) and "
                                  f"re-save it with tm.nn.save")
        return {"format_version": 0, "metadata": {}}
    raw = members.pop(META_KEY)
    digest = members.pop(META_SHA_KEY, None)
    text = _array(raw, META_KEY, hint)
    if text.shape != () or text.dtype.kind != "U":
        raise CheckpointError(f"{hint}: member {META_KEY!r} is not a JSON string "
                              f"(dtype {text.dtype}, shape {text.shape}); the file was altered")
    try:
        env = json.loads(str(text[()]))
    except ValueError as e:
        raise CheckpointError(f"{hint}: member {META_KEY!r} is not valid JSON ({e})") from None
    if not isinstance(env, dict):
        raise CheckpointError(f"{hint}: member {META_KEY!r} holds a JSON "
                              f"{type(env).__name__}, not an object; the file was altered")
    version = env.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{hint}: format_version={version!r} in {META_KEY!r} is not a "
                              f"positive integer; the file was altered")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{hint}: it has format version {version}, newer than this "
                              f"tinymoe understands ({FORMAT_VERSION}); upgrade tinymoe")
    if version >= 2:
        if digest is None:
            raise CheckpointError(f"{hint}: member {META_SHA_KEY!r} is missing; the file is "
                                  f"damaged")
        want = _array(digest, META_SHA_KEY, hint)
        if want.shape != () or want.dtype.kind != "U" or str(want[()]) != _sha256(raw):
            raise CheckpointError(f"{hint}: member {META_KEY!r} does not match its SHA-256; "
                                  f"the file is corrupt or was altered")
        sums = env.get("sha256")
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            raise CheckpointError(f"{hint}: member {META_KEY!r} has no valid 'sha256' table; "
                                  f"the file was altered")
    else:
        if verify:
            warnings.warn(f"{hint.replace('cannot read', 'reading')}: it was written before "
                          f"checkpoints had checksums (format {version}); only the zip's "
                          f"CRC-32 checks it. Re-save it once to add checksums: state, meta "
                          f"= tm.nn.load(path); tm.nn.save(state, path, metadata=meta)",
                          UserWarning, stacklevel=4)
        if digest is not None:
            members[META_SHA_KEY] = digest  # an ordinary array in a format-1 file
    if not isinstance(env.get("metadata", {}), dict):
        raise CheckpointError(f"{hint}: the 'metadata' in {META_KEY!r} is a "
                              f"{type(env['metadata']).__name__}, not an object; the file "
                              f"was altered")
    env["format_version"] = version
    return env


def load(path: str | os.PathLike, *, verify: bool = True
         ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint: ``(state_dict, metadata)``, every checksum verified.

    Raises FileNotFoundError when nothing is at ``path`` and :class:`CheckpointError` (a
    ValueError) naming the file and the member when it is not a checkpoint this tinymoe can
    trust: truncated, corrupt, altered, compressed, newer, or without tinymoe metadata.
    A format-1 file (before checksums) loads with a UserWarning. ``verify=False`` also reads
    plain ``np.savez`` files (no checksums: only the zip's CRC-32 guards them) and skips
    the warning; re-save such a file to add checksums.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load: no checkpoint file at {path!r}")
    hint = f"load: cannot read {path!r} as a tinymoe checkpoint (.npz)"
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{hint}: it is not a zip/.npz archive; the file may be "
                              f"truncated (an interrupted copy or download), corrupt, or "
                              f"some other kind of file")
    members = _read_members(path, hint)
    env = _envelope(members, hint, verify)
    if env["format_version"] >= 2:
        sums = env["sha256"]
        for name in sorted(set(sums) - set(members)):
            raise CheckpointError(f"{hint}: member {name + '.npy'!r} is missing; the file is "
                                  f"truncated or damaged")
        for name in sorted(set(members) - set(sums)):
            raise CheckpointError(f"{hint}: member {name + '.npy'!r} is not in the "
                                  f"checkpoint's checksum table; the file was altered")
        for name, data in members.items():
            if _sha256(data) != sums[name]:
                raise CheckpointError(f"{hint}: member {name + '.npy'!r} does not match its "
                                      f"SHA-256; the file is corrupt or was altered; restore "
                                      f"it from a backup or an earlier checkpoint")
        order = list(sums)  # the order the arrays were saved in
    else:
        order = list(members)
    state = {name: _array(members[name], name + ".npy", hint) for name in order}
    return state, dict(env.get("metadata", {}))


def load_into(module: Module, path: str | os.PathLike, strict: bool = True, *,
              verify: bool = True) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``module`` and return its metadata.

    On any problem (unreadable file, missing or unexpected keys, wrong shapes or dtypes) a
    ValueError names the file and the module is left unchanged. ``module`` may also be an
    Optimizer (``strict`` does not apply: its state must fit exactly).
    """
    state, metadata = load(path, verify=verify)
    try:
        if isinstance(module, Module):
            module.load_state_dict(state, strict=strict)
        else:
            module.load_state_dict(state)
    except ValueError as e:
        raise ValueError(f"load_into: {os.fspath(path)!r}: {e}") from None
    return metadata
