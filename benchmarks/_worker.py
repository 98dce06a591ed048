"""Fair interleaving: tinymoe's steps in a process without PyTorch, and rested thread pools.

Two things made one implementation's time depend on its neighbours in the alternating
rounds of a benchmark (measured on 2 cores, docs/benchmarks.md):

- **A shared OpenMP runtime.** PyTorch ships its own ``libgomp.so.1`` and loads it when it
  is imported; Numba's OpenMP layer then binds to that already-initialised runtime instead
  of starting one that reads the ``OMP_WAIT_POLICY=PASSIVE`` tinymoe sets, and tinymoe's
  parallel kernels ran 2-5x slower than in a process of their own. A user runs one library
  or the other, so tinymoe's steps run in a child process that never imports PyTorch
  (:class:`StepWorker`), driven over a pipe in the same rounds.
- **Pools still spinning.** After a matrix product OpenBLAS's threads yield in a loop for
  about 0.1 s, and OpenMP threads spin, before they sleep; the next implementation in the
  round found its cores taken. :func:`warmed` runs each implementation untimed for a moment
  before its timed call.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

WARM = 0.15  # seconds of untimed calls of the same function before each timed call


def warmed(fn: Callable[[], Any], before: Callable[[], Any] | None = None,
           seconds: float = WARM) -> Callable[[], None]:
    """A ``prepare`` hook for ``interleaved_medians``: run ``before``, then call ``fn``
    untimed until ``seconds`` have passed. The timed call then runs as in the middle of a
    loop of its own: its thread pools awake, and the pools the previous implementation
    woke asleep again (OpenBLAS's threads yield for about 0.1 s after a product). Resting
    instead does not work: after a quarter-second sleep one (2,048, 128) @ (128, 512)
    product ran at 70 GFLOP/s instead of 123, waking its threads."""
    def run() -> None:
        if before is not None:
            before()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            fn()
    return run


class StepWorker:
    """Named steps of ``script`` run in a child process (``script --no-torch --step-worker
    ARGS``, whose main calls :func:`serve`), one call per line over a pipe."""

    def __init__(self, script: str, *args: Any) -> None:
        env = dict(os.environ)
        env.pop("NUMBA_DISABLE_JIT", None)
        self.proc = subprocess.Popen(
            [sys.executable, script, "--no-torch", "--step-worker", *map(str, args)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self._ask(None) != "ready":
            raise RuntimeError(f"{script}: the step worker did not start")

    def _ask(self, command: str | None) -> str:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def step(self, name: str) -> Callable[[], float]:
        """A function that runs step ``name`` in the child (returns the child's seconds)."""
        return lambda: float(self._ask(name))

    def query(self, name: str) -> Any:
        """The JSON answer of the child's command ``name`` (e.g. a profile)."""
        return json.loads(self._ask(name))

    def close(self) -> None:
        self._ask("quit")
        self.proc.wait(timeout=60)

    def __enter__(self) -> StepWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(steps: dict[str, Callable[[], Any]],
          queries: dict[str, Callable[[], Any]] | None = None) -> None:
    """The child's side of :class:`StepWorker`: say "ready", then answer each line: a step
    name with its time in seconds, a query name with its JSON, anything else ends."""
    queries = queries or {}
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name in steps:
            start = time.perf_counter()
            steps[name]()
            print(time.perf_counter() - start, flush=True)
        elif name in queries:
            print(json.dumps(queries[name]()), flush=True)
        else:
            print("bye", flush=True)
            return
