"""A checkpoint directory that cannot lose a good state: rotation, a best file, one writer.

    with CheckpointWriter("runs/switch", keep_last=3) as ckpt:   # takes runs/switch/.lock
        ckpt.save(state, metadata, step=200, val_loss=1.83)

The directory then holds::

    checkpoint.npz            the latest save (what ``--resume`` and ``tinymoe sample`` read)
    checkpoint-00000200.npz   the last ``keep_last`` saves, by step
    checkpoint-best.npz       the save with the lowest validation loss so far
    .lock                     JSON {pid, host, started} of the process writing here

(``stem="run"`` names them ``run.npz``, ``run-00000200.npz``, ``run-best.npz``.)

Every file is written by :func:`tinymoe.nn.save` (temporary file, fsync, ``os.replace``;
a SHA-256 of every array and of the metadata), so a reader sees the old file or the new one,
never a mix. On top of that the writer

* refuses a state holding NaN or inf (FloatingPointError naming the array): a diverged
  step never replaces a good checkpoint;
* replaces the best file only by a save with a lower, finite validation loss;
* defers Ctrl-C (SIGINT) while it writes: the save finishes, then KeyboardInterrupt is
  raised, so an interrupt at any moment leaves either the new checkpoint or the old one;
* removes the temporary files a killed writer left behind (``.checkpoint.npz.*.tmp``) when
  it starts, once it holds the lock (so never another live writer's);
* holds a lock file: a second writer is refused with :class:`LockError`, which says who
  owns the directory and how to take over. A lock left by a process that is gone on this
  host is taken over by itself; a lock from another host needs ``force_unlock=True``
  (``tinymoe train --force-unlock``) or deleting ``.lock``.

It knows nothing of training loops: any program (a training run, rank 0 of a parallel job)
passes it a flat dict of arrays and JSON metadata.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tinymoe.nn import serialization

LOCK = ".lock"


class LockError(RuntimeError):
    """The directory is locked by another writer."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return True
    return True


class RunLock:
    """``<directory>/.lock``, created with O_EXCL, holding the owner's pid, host and start."""

    def __init__(self, directory: str | os.PathLike, *, force: bool = False) -> None:
        self.path = Path(directory) / LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.taken_over: dict[str, Any] | None = None
        self.me = {"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):  # a lost race against another taker retries
            if self._create():
                return
            owner = self._owner()
            if force or self._stale(owner):
                self.taken_over = owner
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            raise LockError(self._message(owner))
        raise LockError(self._message(self._owner()))

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _owner(self) -> dict[str, Any]:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, ValueError):
            return {}  # unreadable or half-written: treated as foreign, never as stale

    def _stale(self, owner: dict[str, Any]) -> bool:
        """Owned by a process of this host that no longer exists."""
        pid = owner.get("pid")
        return (owner.get("host") == self.me["host"] and isinstance(pid, int)
                and pid > 0 and pid != os.getpid() and not _pid_alive(pid))

    def _message(self, owner: dict[str, Any]) -> str:
        who = (f"process {owner.get('pid')} on host {owner.get('host')!r} (started "
               f"{owner.get('started')})" if owner else "an unknown process")
        return (f"{self.path.parent} is in use by {who}: two runs writing one directory "
                f"would overwrite each other's checkpoints. Wait for it to finish or use "
                f"another --out; if that process is gone (crashed, or on a machine that was "
                f"rebooted), take over with --force-unlock (or delete {self.path})")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        owner = self._owner()
        if owner.get("pid") == self.me["pid"] and owner.get("host") == self.me["host"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


@contextlib.contextmanager
def defer_sigint() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then raise KeyboardInterrupt (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class CheckpointWriter:
    """Writes verified checkpoints into one directory it holds the lock of (see module doc).

    ``keep_last`` (N >= 1): how many step files to keep besides the best one.
    ``lock``: True takes the directory's lock (``force_unlock`` takes it over), a
    :class:`RunLock` already held is used as it is, False skips locking (the caller
    guarantees a single writer).
    """

    def __init__(self, directory: str | os.PathLike, *, stem: str = "checkpoint",
                 keep_last: int = 3, lock: bool | RunLock = True,
                 force_unlock: bool = False) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, (int, np.integer)) \
                or keep_last < 1:
            raise ValueError(f"CheckpointWriter: keep_last={keep_last!r} must be an integer "
                             f">= 1 (how many recent checkpoints to keep)")
        self.directory = Path(directory)
        self.stem = stem
        self.keep_last = int(keep_last)
        self._step_file = re.compile(rf"^{re.escape(stem)}-(\d+)\.npz$")
        if isinstance(lock, RunLock):
            self.lock: RunLock | None = lock
        else:
            self.lock = RunLock(self.directory, force=force_unlock) if lock else None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.removed_temp_files = self._remove_stale_temp_files()
        self.best_val_loss = self._best_on_disk()

    # -- paths ------------------------------------------------------------------------------
    @property
    def latest(self) -> Path:
        return self.directory / f"{self.stem}.npz"

    @property
    def best(self) -> Path:
        return self.directory / f"{self.stem}-best.npz"

    def step_path(self, step: int) -> Path:
        return self.directory / f"{self.stem}-{int(step):08d}.npz"

    def step_files(self) -> list[Path]:
        """The kept step files, oldest first."""
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := self._step_file.match(p.name))]
        return [p for _, p in sorted(found)]

    # -- start up ---------------------------------------------------------------------------
    def files(self) -> list[Path]:
        """Every checkpoint of this stem in the directory: latest, step files, best."""
        named = [self.latest, self.best]
        return [p for p in named if p.is_file()] + self.step_files()

    def clear(self) -> list[str]:
        """Delete every checkpoint of this stem (a new run replacing an old one)."""
        removed = []
        for p in self.files():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p.name)
        self.best_val_loss = float("inf")
        return sorted(removed)

    def _remove_stale_temp_files(self) -> list[str]:
        """Temporary files of an interrupted save (``.<name>.npz.<random>.tmp``)."""
        removed = []
        for p in self.directory.iterdir():
            name = p.name
            if name.startswith(".") and ".npz." in name \
                    and name.endswith(serialization.TMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p.name)
        return sorted(removed)

    def _best_on_disk(self) -> float:
        """The validation loss recorded in an existing best file (inf if none/unreadable)."""
        if not self.best.is_file():
            return float("inf")
        try:
            _, meta = serialization.load(self.best)
        except (ValueError, OSError):
            return float("inf")
        v = meta.get("val_loss")
        return float(v) if isinstance(v, (int, float)) and np.isfinite(v) else float("inf")

    # -- saving -----------------------------------------------------------------------------
    def save(self, state: Mapping[str, Any], metadata: Mapping[str, Any] | None = None, *,
             step: int, val_loss: float | None = None) -> Path:
        """Write ``state`` as step ``step``: the step file, the latest file and, when
        ``val_loss`` beats the best so far, the best file. Returns the step file's path.

        A state with NaN/inf is refused (FloatingPointError, nothing written). Ctrl-C during
        the save is held until the save is complete.
        """
        meta = dict(metadata or {})
        meta["step"] = int(step)
        if val_loss is not None:  # JSON has no NaN: a non-finite loss is recorded as null
            meta["val_loss"] = float(val_loss) if np.isfinite(val_loss) else None
        better = val_loss is not None and np.isfinite(val_loss) and \
            float(val_loss) < self.best_val_loss
        with defer_sigint():
            target = self.step_path(step)
            serialization.save(state, target, metadata=meta, require_finite=True)
            self._link(target, self.latest)
            if better:
                self._link(target, self.best)
                self.best_val_loss = float(val_loss)
            self._prune()
        return target

    def _link(self, src: Path, dst: Path) -> None:
        """``dst`` becomes the same bytes as ``src``, atomically (a hard link, or a copy)."""
        tmp = dst.with_name(f".{dst.name}.link{serialization.TMP_SUFFIX}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK) \
                    and not isinstance(e, PermissionError):
                raise
            with open(src, "rb") as fi, open(tmp, "wb") as fo:  # no hard links here: copy
                fo.write(fi.read())
                fo.flush()
                os.fsync(fo.fileno())
        os.replace(tmp, dst)
        serialization._fsync_dir(str(self.directory))

    def _prune(self) -> None:
        for p in self.step_files()[:-self.keep_last]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # -- the end ----------------------------------------------------------------------------
    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
