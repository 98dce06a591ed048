"""How many threads tinymoe's matrix products (OpenBLAS) and Numba kernels use.

A parallel BLAS call or Numba ``prange`` splits its work into equal parts, one per thread,
and returns when the last part is done. On a free machine two threads on two cores halve
the time. When other processes keep the cores busy, each of our threads gets a time slice
only now and then: the call waits for its slowest part, and the threads that finished
early spin (OpenBLAS yields in a loop) instead of computing. Measured on 2 cores with other
jobs keeping the load average near 6: one Switch-layer step (T = 4,096) took 885-1,064 ms
with two OpenBLAS threads and 327-472 ms with one (benchmarks/bench_busy.py measures it).

By default tinymoe leaves both pools at their usual size (all cores), so that a seeded run
gives the same bits every time on a machine. With ``TINYMOE_NUM_THREADS=auto`` in the
environment (or ``tinymoe.set_num_threads("auto")``) it instead picks the thread count from
the cores that are actually free:

    others = (CPU time all processes used - CPU time this process used) / elapsed time
    threads = max(1, min(cores, round(cores - others)))

measured over the last ``INTERVAL`` seconds (from ``/proc/stat``; on systems without it,
all cores). Numba's kernels run on ``min(threads, Numba's own setting)`` threads; the
OpenBLAS that NumPy loaded is set to ``threads`` whenever the choice changes (this is
process-wide, so NumPy code of your own follows it too).

In either mode you keep your own choice when:

- any of ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``MKL_NUM_THREADS``,
  ``NUMBA_NUM_THREADS`` or ``TINYMOE_NUM_THREADS`` is set when tinymoe is imported;
- you call :func:`set_num_threads` (``tinymoe.set_num_threads(n)``): both pools get ``n``;
- you change OpenBLAS's count yourself (e.g. with threadpoolctl): tinymoe notices that
  the count is no longer the one it set, and stops adapting.

``tinymoe tour`` is the exception: it adapts unless you chose (``tinymoe tour --threads all``
or any of the variables above), because a learner's laptop is often busy and the tour's
numbers are a demonstration; the documented figures come from ``tinymoe repro``, which
keeps the fixed default (see :func:`adapt_unless_chosen`).

Why adapting is not the default: OpenBLAS's float32 products differ in the last bits between
one and two threads (measured: a Switch-layer step's gradients by up to 4e-6, three training
steps of the tiny LM's weights by up to 1e-4), so under ``auto`` a run's last digits depend
on the load, and a few hundred training steps turn that into differences in the third
digit of a loss — enough to break the comparison of a rerun with its recorded result.
Numba's kernels give the same bits on any number of threads.
"""
from __future__ import annotations

import ctypes
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

USER_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMBA_NUM_THREADS", "TINYMOE_NUM_THREADS")
INTERVAL = 0.2  # seconds between two looks at /proc/stat
_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads", "openblas_set_num_threads")


class _Policy:
    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        auto = os.environ.get("TINYMOE_NUM_THREADS", "").strip().lower() == "auto"
        self.user_vars = sorted(v for v in USER_VARS if os.environ.get(v)
                                and not (v == "TINYMOE_NUM_THREADS" and auto))
        self.fixed: int | None = None  # set_num_threads(n)
        self.adaptive = auto and not self.user_vars and self.cores > 1
        self.current = self.cores
        self._last_sample: tuple[float, float, float] | None = None
        self._next = 0.0
        self._blas: tuple[Callable[[int], None], Callable[[], int]] | None | bool = False
        self._blas_set: int | None = None  # what we last gave OpenBLAS


_POLICY = _Policy()


def _cpu_busy_seconds() -> float | None:
    """Seconds of CPU time all processes have used (first line of /proc/stat), or None."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _openblas():
    """(set, get) of the OpenBLAS that NumPy loaded, or None."""
    if _POLICY._blas is False:
        _POLICY._blas = None
        try:
            with open("/proc/self/maps") as f:
                paths = sorted({line.split()[-1] for line in f
                                if "openblas" in line.lower() and ".so" in line})
        except OSError:
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for name in _SETTERS:
                getter = name.replace("set_", "get_")
                if hasattr(lib, name) and hasattr(lib, getter):
                    setter, get = getattr(lib, name), getattr(lib, getter)
                    setter.argtypes, setter.restype = [ctypes.c_int], None
                    get.argtypes, get.restype = [], ctypes.c_int
                    _POLICY._blas = (setter, get)
                    break
            if _POLICY._blas:
                break
    return _POLICY._blas


def _set_blas(n: int) -> None:
    blas = _openblas()
    if blas is None:
        return
    setter, get = blas
    if _POLICY._blas_set is not None and get() != _POLICY._blas_set and _POLICY.fixed is None:
        _POLICY.adaptive = False  # someone else changed OpenBLAS's count: theirs to keep
        return
    if get() != n:
        setter(n)
    _POLICY._blas_set = n


def choose(cores: int, others: float) -> int:
    """Threads for a machine of ``cores`` cores on which other processes keep ``others``
    cores busy: ``max(1, min(cores, round(cores - others)))``."""
    return max(1, min(cores, int(round(cores - others))))


def num_threads() -> int:
    """The thread count tinymoe uses now (re-measured at most every ``INTERVAL`` s)."""
    p = _POLICY
    if p.fixed is not None:
        return p.fixed
    if not p.adaptive:
        return p.cores
    now = time.monotonic()
    if now < p._next:
        return p.current
    p._next = now + INTERVAL
    busy = _cpu_busy_seconds()
    if busy is None:
        p.adaptive = False
        return p.cores
    sample = (now, busy, _own_seconds())
    last, p._last_sample = p._last_sample, sample
    if last is not None and now > last[0]:
        others = ((busy - last[1]) - (sample[2] - last[2])) / (now - last[0])
        n = choose(p.cores, others)
        _set_blas(n)  # (a ctypes call or two; also notices a count set by someone else)
        p.current = n if p.adaptive else p.cores
    return p.current


def set_num_threads(n: int | str) -> None:
    """Use ``n`` threads for OpenBLAS and Numba from now on; ``"auto"``: adapt to the cores
    other processes leave free (see the module docstring for the price)."""
    if n == "auto":
        _POLICY.fixed, _POLICY._blas_set = None, None
        _POLICY.adaptive = _POLICY.cores > 1
        _POLICY._next = 0.0
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_num_threads: n must be an integer >= 1 or 'auto', got {n!r}")
    _POLICY.fixed = n
    _POLICY.adaptive = False
    blas = _openblas()
    if blas is not None:
        blas[0](n)
        _POLICY._blas_set = n
    import numba
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def adapt_unless_chosen() -> bool:
    """Switch to the adaptive policy (as ``set_num_threads("auto")``) unless the user chose a
    count (a variable of ``USER_VARS`` or :func:`set_num_threads`). Child processes started
    afterwards adapt too (``TINYMOE_NUM_THREADS=auto`` is put in the environment). Returns
    whether tinymoe now adapts."""
    if _POLICY.user_vars or _POLICY.fixed is not None:
        return False
    os.environ["TINYMOE_NUM_THREADS"] = "auto"
    set_num_threads("auto")
    return _POLICY.adaptive


@contextmanager
def restored() -> Iterator[None]:
    """Inside the ``with`` block change the policy as you like (:func:`set_num_threads`,
    :func:`adapt_unless_chosen`); afterwards the policy, ``TINYMOE_NUM_THREADS`` and the
    OpenBLAS and Numba thread counts are what they were."""
    import numba

    saved, blas = dict(vars(_POLICY)), _openblas()
    env = os.environ.get("TINYMOE_NUM_THREADS")
    blas_before, numba_before = (blas[1]() if blas else None), numba.get_num_threads()
    try:
        yield
    finally:
        vars(_POLICY).update(saved)
        if env is None:
            os.environ.pop("TINYMOE_NUM_THREADS", None)
        else:
            os.environ["TINYMOE_NUM_THREADS"] = env
        if blas and blas_before is not None:
            blas[0](blas_before)
        numba.set_num_threads(numba_before)


def describe() -> dict:
    """The policy in force: ``{"mode", "threads", "user_vars"}``."""
    p = _POLICY
    mode = "fixed" if p.fixed is not None else "adaptive" if p.adaptive else \
        ("environment" if p.user_vars else "all cores")
    return {"mode": mode, "threads": num_threads(), "cores": p.cores,
            "user_vars": p.user_vars}
