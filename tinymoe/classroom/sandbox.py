"""Run the grader's child with limits: time, memory, its own session, an unprivileged user,
bubblewrap when installed.

Levels (docs/teaching.md, "Threat model", says what each protects and what it does not):

1. **Time and memory**: ``RLIMIT_AS`` (address space) and ``RLIMIT_CORE = 0`` are set in the
   child before it starts; after ``timeout`` seconds the child's whole process group is
   killed (``start_new_session=True`` + ``os.killpg``), and once it ended any process still
   carrying the run's token in its environment (a grandchild that left the group) is killed
   too, found by a scan of ``/proc``.
2. **An unprivileged user** when the grader runs as root: the child becomes ``nobody``
   (``setgroups([])``, ``setresgid``, ``setresuid``) before it imports any code of the
   submission, so it cannot read files that are not world-readable (keep the solutions
   directory ``chmod 700``) and cannot write outside its work directory. It drops them
   itself, after importing the interpreter's modules, because the interpreter may live where
   ``nobody`` cannot read (a Python under ``/root``).
3. **bubblewrap** (``bwrap``) when it is on ``PATH``: read-only system directories, no
   network, its own PID namespace, only the work directory writable, ``--die-with-parent``.
"""
from __future__ import annotations

import os
import pwd
import resource
import secrets
import shutil
import sys
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tinymoe.process_tags import kill_tagged

DEFAULT_TIMEOUT = 60.0  # seconds per task
DEFAULT_MEMORY = 4 << 30  # bytes of address space (NumPy + BLAS reserve a lot of it)
OUTPUT_CHARS = 4000  # of stdout and stderr kept
TOKEN_VAR = "TINYMOE_GRADE_TOKEN"


@dataclass
class ChildRun:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    user: str
    bwrap: bool


def unprivileged_user() -> pwd.struct_passwd | None:
    """``nobody`` when we are root (the child then runs as it), else None (run as we are)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


def give_to(path: Path, user: pwd.struct_passwd | None) -> None:
    """Make ``path`` (a directory tree) owned by the child's user, closed to others."""
    if user is None:
        return
    for p in [path, *path.rglob("*")]:
        os.chown(p, user.pw_uid, user.pw_gid, follow_symlinks=False)


def _limits(memory: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def bwrap_command(argv: list[str], work: Path, hide: list[Path]) -> list[str]:
    """``argv`` under bubblewrap: the system read-only, ``work`` writable, ``hide`` covered by
    empty directories, no network, its own PID namespace, dies with the grader."""
    # As root, no user namespace: inside one, setgroups() is denied and the child could not
    # drop to ``nobody`` (level 2); root needs none to make the others. Anyone else needs one.
    ns = ["--unshare-all"] if os.geteuid() != 0 else [
        "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    cmd = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
           "--tmpfs", "/tmp", *ns, "--die-with-parent", "--new-session"]
    for h in hide:
        if h.exists():
            cmd += ["--tmpfs", str(h)]
    # The interpreter and its packages stay visible (read-only) even when they live inside a
    # hidden tree, as CI's virtual environment lives inside the checkout.
    for keep in sorted({Path(sys.prefix), Path(sys.base_prefix)}):
        if any(Path(h) == keep or Path(h) in keep.parents for h in hide):
            cmd += ["--ro-bind", str(keep), str(keep)]
    work = Path(work)
    for parent in reversed(work.parents):  # made afresh in the tmpfs: enterable, not listable
        if Path("/tmp") in parent.parents:
            cmd += ["--perms", "0711", "--dir", str(parent)]
    return cmd + ["--bind", str(work), str(work), "--chdir", str(work), *argv]


def kill_leftovers(token: str) -> list[int]:
    """SIGKILL every process still carrying the token; returns their pids."""
    return kill_tagged(TOKEN_VAR, token)


def _text(data: bytes | None) -> str:
    text = (data or b"").decode("utf-8", errors="replace")
    return text if len(text) <= OUTPUT_CHARS else text[:OUTPUT_CHARS] + "\n[… truncated]"


def run_child(argv: list[str], work: Path, env: dict[str, str], *,
              timeout: float = DEFAULT_TIMEOUT, memory: int = DEFAULT_MEMORY,
              hide: list[Path] = (), use_bwrap: bool | None = None) -> ChildRun:
    """Run ``argv`` in ``work`` with the limits above; never raises for the child's faults."""
    user = unprivileged_user()  # the child drops to it itself (see child.py)
    use_bwrap = shutil.which("bwrap") is not None if use_bwrap is None else use_bwrap
    token = secrets.token_hex(8)
    env = dict(env, **{TOKEN_VAR: token})
    cmd = bwrap_command(argv, work, list(hide)) if use_bwrap else argv
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # files, not pipes: a grandchild holding them open cannot keep us waiting
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True,
                                preexec_fn=_limits(memory))
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and whatever stayed in its group
        except OSError:
            pass
        kill_leftovers(token)  # and whatever left the group
        proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(OUTPUT_CHARS * 4), err.read(OUTPUT_CHARS * 4)
    return ChildRun(proc.returncode, _text(stdout), _text(stderr), timed_out,
                    time.perf_counter() - start, user.pw_name if user else "(grader's user)",
                    use_bwrap)
