"""Processes tagged through their environment: find them and kill them.

A child started with ``VAR=value`` in its environment passes the variable on to everything
it starts, including processes that leave its process group or session (``setsid``,
daemonising, an MPI launcher's ranks). Killing the group misses those; scanning
``/proc/PID/environ`` for the tag finds them all. Used by the classroom sandbox (a student's
code must not outlive its grading) and the MPI launcher (no rank outlives a timed-out job).
On systems without ``/proc`` nothing is found.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path


def tagged_pids(var: str, value: str) -> list[int]:
    """PIDs of this user's processes (not this one) whose environment has ``var=value``."""
    needle = f"{var}={value}".encode()
    proc = Path("/proc")
    pids = []
    for entry in proc.iterdir() if proc.is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # exited meanwhile, or another user's
            continue
    return pids


def kill_tagged(var: str, value: str) -> list[int]:
    """SIGKILL every process still carrying ``var=value``; returns their pids."""
    pids = tagged_pids(var, value)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return pids
