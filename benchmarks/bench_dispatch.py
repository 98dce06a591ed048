"""Benchmark token dispatch: NumPy reference vs Numba kernels vs PyTorch (CPU).

    python benchmarks/bench_dispatch.py            # T = 65,536, d = 256, E = 8, k = 1 and 2
    python benchmarks/bench_dispatch.py --quick    # T = 8,192, 3 repeats: a smoke run

For each k it times the four steps of an MoE layer's data movement, forward and backward:
dispatch (x -> buffer (E, C, d)), combine (buffer_out, w -> y), and their backward passes,
with the capacity C = ceil(capacity_factor * T * k / E). Each figure is the median of
``--repeats`` timed calls after one warm-up call, the implementations timed in alternating
rounds. Every call allocates its outputs, as the library does; the column "numba, outputs
reused" runs the same kernels into outputs allocated once, to show what fresh memory costs.
Bandwidth counts the bytes an ideal implementation must move (s = bytes per element,
n = kept (token, choice) pairs, S = E*C slots; index arrays are left out, < 2%):

    dispatch          read n*d*s (token rows)        + write S*d*s (buffer, zeros included)
    dispatch backward read n*d*s (slot rows)         + write T*d*s (grad x)
    combine           read n*d*s (slot rows)         + write T*d*s (y)
    combine backward  read T*d*s + n*d*s (g, rows)   + write S*d*s (grad buffer)

next to the bandwidth of a plain copy of the (T, d) input (2*T*d*s bytes), timed in the same
rounds: into an existing array (``np.copyto``, no page faults: the yardstick of the targets)
and into a new one (``x.copy()``, which pays for fresh pages as every step's output does).
PyTorch runs its idiomatic version (index_select / index_copy / index_add, backward by
autograd) and is skipped when not installed.

Also measured: ``import tinymoe`` and the first dispatch + combine in a fresh process with a
warm Numba cache (Numba is imported on that first call), with where the time goes.
Results: docs/benchmarks.md ("Dispatch").
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import try_torch  # noqa: E402

# PyTorch first: importing tinymoe's kernels sets OMP_WAIT_POLICY=PASSIVE (unless already
# set) for Numba's OpenMP threads, and PyTorch's own OpenMP should keep its default.
TORCH = None if "--no-torch" in sys.argv else try_torch()

from tinymoe.dispatch import kernels, reference  # noqa: E402
from tinymoe.dispatch.backend import ENV_VAR as ENV_BACKEND  # noqa: E402

STEPS = ("dispatch", "dispatch backward", "combine", "combine backward")


def interleaved_medians(impls: dict, repeats: int, yardsticks: dict) -> tuple[dict, dict]:
    """Median seconds per (implementation, step), and per yardstick, in alternating rounds.

    One warm-up call each (JIT compile or cache load), then ``repeats`` rounds that time
    every step of every implementation once, and every yardstick (a plain memory copy) once,
    so background load and the state of the shared caches fall on all alike.
    """
    for steps in impls.values():
        for fn in steps.values():
            fn()
    for fn in yardsticks.values():
        fn()
    samples = {nm: {st: [] for st in steps} for nm, steps in impls.items()}
    yard = {nm: [] for nm in yardsticks}
    for _ in range(repeats):
        for st in STEPS:
            for nm, steps in impls.items():
                t0 = time.perf_counter()
                steps[st]()
                samples[nm][st].append(time.perf_counter() - t0)
        for nm, fn in yardsticks.items():
            t0 = time.perf_counter()
            fn()
            yard[nm].append(time.perf_counter() - t0)
    med = statistics.median
    return ({nm: {st: med(v) for st, v in by_step.items()} for nm, by_step in samples.items()},
            {nm: med(v) for nm, v in yard.items()})


def step_bytes(T: int, d: int, s: int, n: int, S: int) -> dict[str, int]:
    return {"dispatch": (n + S) * d * s, "dispatch backward": (n + T) * d * s,
            "combine": (n + T) * d * s, "combine backward": (T + n + S) * d * s}


def numpy_like_steps(m, x, e, p, E, C, w, buf_out, g_buf, g_y):
    """The four steps of a backend module with the contract's signatures."""
    return {
        "dispatch": lambda: m.dispatch(x, e, p, E, C),
        "dispatch backward": lambda: m.dispatch_backward(g_buf, e, p, E, C),
        "combine": lambda: m.combine(buf_out, e, p, w),
        "combine backward": lambda: m.combine_backward(g_y, buf_out, e, p, w),
    }


def reused_output_steps(x, e, p, E, C, w, buf_out, g_buf, g_y):
    """Diagnostic: the same Numba kernels writing into outputs allocated (and touched) once.

    Calls the private kernels of tinymoe.dispatch.kernels directly, index work included, to
    separate the kernels' own speed from the cost of fresh memory (page faults).
    """
    K = kernels
    T, d = x.shape
    k = e.shape[1]
    touched = lambda shape, dt: np.ones(shape, dtype=dt)  # noqa: E731
    buf, gx = touched((E * C, d), x.dtype), touched((T, d), x.dtype)
    y, g_out = touched((T, d), x.dtype), touched((E * C, d), x.dtype)
    dots = touched((T, k), x.dtype)
    out2, gbuf2 = buf_out.reshape(E * C, d), g_buf.reshape(E * C, d)

    def dispatch():
        src = K._invert_rows(K._slot_rows(e, p, C), E * C)
        K._gather_rows(x, src, k, buf)
        buf[src < 0] = 0  # a reused buffer's empty slots must be zeroed again

    def combine_backward():
        row = K._slot_rows(e, p, C)
        K._scatter_and_dot(out2, row, g_y, w, x.dtype.type(0), g_out, dots)
        g_out[K._invert_rows(row, E * C) < 0] = 0

    return {
        "dispatch": dispatch,
        "dispatch backward": lambda: K._gather_sum(gbuf2, K._slot_rows(e, p, C), gx),
        "combine": lambda: K._gather_weighted_sum(out2, K._slot_rows(e, p, C), w, y),
        "combine backward": combine_backward,
    }


def torch_steps(torch, x, e, p, E, C, w, buf_out, g_buf, g_y):
    """Idiomatic PyTorch: gather/scatter with index_select, index_copy, index_add; autograd."""
    T, d = x.shape
    k = e.shape[1]
    t, j = np.nonzero(p >= 0)
    tok = torch.from_numpy(t)                          # (n,) token of each kept pair
    slot = torch.from_numpy(e[t, j] * C + p[t, j])     # (n,) its row of the (E*C, d) buffer
    pair = torch.from_numpy(t * k + j)                 # (n,) its index into w.view(-1)
    xt = torch.from_numpy(x).requires_grad_()
    bt = torch.from_numpy(buf_out).requires_grad_()
    wt = torch.from_numpy(w).requires_grad_()
    gb, gy = torch.from_numpy(g_buf), torch.from_numpy(g_y)

    def dispatch(x):
        rows = x.index_select(0, tok)                                    # (n, d)
        return x.new_zeros(E * C, d).index_copy(0, slot, rows).view(E, C, d)

    def combine(buf, w):
        rows = buf.reshape(E * C, d).index_select(0, slot)               # (n, d)
        rows = rows * w.reshape(-1).index_select(0, pair)[:, None]       # (n, d)
        return rows.new_zeros(T, d).index_add(0, tok, rows)              # (T, d)

    buf_graph, y_graph = dispatch(xt), combine(bt, wt)  # graphs for the backward steps
    return {
        "dispatch": lambda: _no_grad(torch, dispatch, xt),
        "dispatch backward": lambda: torch.autograd.grad(buf_graph, xt, gb, retain_graph=True),
        "combine": lambda: _no_grad(torch, combine, bt, wt),
        "combine backward": lambda: torch.autograd.grad(y_graph, (bt, wt), gy,
                                                        retain_graph=True),
    }


def _no_grad(torch, fn, *args):
    with torch.no_grad():
        return fn(*args)


def copy_yardsticks(x: np.ndarray) -> dict:
    """Plain copies of x (T, d), timed with the steps: into a new array (``x.copy()``: what
    every step does, since each step writes a newly allocated output) and into an existing
    one (``np.copyto``: no page faults; faster, and faster still while the array fits in the
    shared L3 cache). Each moves 2·T·d·s bytes. The copy into an existing array is the
    targets' yardstick."""
    dst = np.ones_like(x)  # touched once, as a steady-state copy would find it
    return {"copy into a new array": lambda: x.copy(),
            "copy into an existing array": lambda: np.copyto(dst, x)}


def startup_figures(runs: int = 7) -> dict[str, float]:
    """Fresh processes, medians of ``runs``: ``import tinymoe``; the first dispatch with a warm
    Numba cache, as a user meets it (``route`` + ``dispatch`` + ``combine`` right after
    ``import tinymoe``, so Numba is imported inside); and where that time goes."""
    import_code = ("import time; t0 = time.perf_counter(); import tinymoe; "
                   "print(time.perf_counter() - t0)")
    first_code = (
        "import time\n"
        "import numpy as np, tinymoe as tm\n"
        "e = np.array([[0, 1], [1, 0], [0, 1]]); x = tm.tensor(np.ones((3, 4), np.float32))\n"
        "w = np.ones((3, 2), np.float32)\n"
        "t0 = time.perf_counter()\n"
        "r = tm.dispatch.route(e, w, num_experts=2, capacity=2)\n"
        "y = tm.dispatch.combine(tm.dispatch.dispatch(x, r), r)\n"
        "print(time.perf_counter() - t0)\n")
    parts_code = (  # the same first calls, split: Numba's import, its set-up, our kernels
        "import time\n"
        "import numpy as np, tinymoe as tm\n"
        "e = np.array([[0, 1], [1, 0], [0, 1]]); x = np.ones((3, 4), np.float32)\n"
        "t0 = time.perf_counter()\n"
        "import numba\n"
        "t1 = time.perf_counter()\n"
        "from numba.core.registry import cpu_target\n"
        "cpu_target.target_context.refresh()  # what loading the first cached kernel starts with\n"
        "t2 = time.perf_counter()\n"
        "from tinymoe.dispatch import kernels as K\n"
        "p, _ = K.assign_positions(e, 2, 2)\n"
        "y = K.combine(K.dispatch(x, e, p, 2, 2), e, p, np.ones((3, 2), np.float32))\n"
        "t3 = time.perf_counter()\n"
        "print(t1 - t0, t2 - t1, t3 - t2)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_DISABLE_JIT", ENV_BACKEND)}
    run = lambda code: subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,  # noqa: E731
                                      capture_output=True, text=True, check=True).stdout
    run(first_code)  # make sure the cache is warm
    imports = [float(run(import_code)) for _ in range(runs)]
    firsts = [float(run(first_code)) for _ in range(runs)]
    parts = [tuple(map(float, run(parts_code).split())) for _ in range(runs)]
    med = statistics.median
    return {"import tinymoe": med(imports),
            "first route + dispatch + combine (Numba imported inside)": med(firsts),
            "  of which: import numba": med(p[0] for p in parts),
            "  of which: Numba's registry set-up (first cached kernel)": med(p[1] for p in parts),
            "  of which: tinymoe's kernels (cache loads + calls)": med(p[2] for p in parts)}


def scipy_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("scipy") is not None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"NumPy {np.__version__}, Numba {numba.__version__} "
            f"({numba.get_num_threads()} threads)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 8,192 and 3 repeats")
    ap.add_argument("--tokens", type=int, default=None, help="T (default 65,536)")
    ap.add_argument("--dim", type=int, default=256, help="d")
    ap.add_argument("--experts", type=int, default=8, help="E")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2], help="choices per token")
    ap.add_argument("--capacity-factor", type=float, default=1.25)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 7)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-startup", action="store_true", help="skip the subprocess timings")
    args = ap.parse_args(argv)
    T = args.tokens or (8192 if args.quick else 65536)
    repeats = args.repeats or (3 if args.quick else 7)
    d, E, dtype = args.dim, args.experts, np.dtype(args.dtype)
    s = dtype.itemsize
    torch = None if args.no_torch else TORCH
    if torch is None and not args.no_torch:
        print("PyTorch not installed: skipping its column")

    print(f"machine: {machine()}" + (f", torch {torch.__version__} ({torch.get_num_threads()} "
                                      f"threads)" if torch else ""))
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(f"T = {T:,}, d = {d}, E = {E}, {dtype}, capacity factor {args.capacity_factor}, "
          f"median of {repeats}\n")

    rng = np.random.default_rng(0)
    markdown: list[str] = []
    for k in args.ks:
        C = math.ceil(args.capacity_factor * T * k / E)
        logits = rng.standard_normal((T, E))
        e = np.argsort(-logits, axis=1, kind="stable")[:, :k]          # (T, k) top-k
        p, counts = kernels.assign_positions(e, E, C)
        n = int(counts.sum())
        x = rng.standard_normal((T, d)).astype(dtype)
        w = rng.random((T, k)).astype(dtype)
        buf_out = rng.standard_normal((E, C, d)).astype(dtype)
        g_buf = rng.standard_normal((E, C, d)).astype(dtype)
        g_y = rng.standard_normal((T, d)).astype(dtype)
        nbytes = step_bytes(T, d, s, n, E * C)
        impls = {"numpy": numpy_like_steps(reference, x, e, p, E, C, w, buf_out, g_buf, g_y),
                 "numba": numpy_like_steps(kernels, x, e, p, E, C, w, buf_out, g_buf, g_y)}
        if torch is not None:
            impls["torch"] = torch_steps(torch, x, e, p, E, C, w, buf_out, g_buf, g_y)
        impls["numba, outputs reused"] = reused_output_steps(x, e, p, E, C, w, buf_out, g_buf,
                                                             g_y)
        times, yard = interleaved_medians(impls, repeats, copy_yardsticks(x))
        copy_bw = 2 * x.nbytes / yard["copy into an existing array"]  # the targets' yardstick
        print(f"k = {k}: C = {C:,}, kept pairs n = {n:,} of {T * k:,}; copy bandwidth (read + "
              f"write, timed in the same rounds): " + ", ".join(
                  f"{nm} {2 * x.nbytes / sec / 1e9:.2f} GB/s" for nm, sec in yard.items()))
        head = f"  {'step':<18}" + "".join(f"{name:>24}" for name in impls) + "   numba/numpy"
        print(head + "\n  " + "-" * (len(head) - 2))
        rows_md = []
        tot = {nm: sum(times[nm].values()) for nm in impls}
        for st, b, t in [*((st, nbytes[st], {nm: times[nm][st] for nm in impls}) for st in STEPS),
                         ("all four", sum(nbytes.values()), tot)]:
            cells = "".join(f"{t[nm] * 1e3:10.2f} ms {b / t[nm] / 1e9:6.2f} GB/s" for nm in impls)
            ratio = t["numpy"] / t["numba"]
            print(f"  {st:<18}{cells}   {ratio:6.2f}x")
            rows_md.append(f"| {k} | {st} | " + " | ".join(
                f"{t[nm] * 1e3:.1f} ms ({b / t[nm] / 1e9:.1f} GB/s)" for nm in impls)
                + f" | {ratio:.1f}x | {100 * b / t['numba'] / copy_bw:.0f}% |")
        frac = sum(nbytes.values()) / tot["numba"] / copy_bw
        fresh = sum(nbytes.values()) / tot["numba"] / (2 * x.nbytes
                                                        / yard["copy into a new array"])
        speedup = tot["numpy"] / tot["numba"]
        print(f"  targets: numba >= 4x numpy: {speedup:.2f}x "
              f"({'met' if speedup >= 4 else 'NOT met'}); numba >= 60% of the bandwidth of a "
              f"copy into an existing array: {100 * frac:.0f}% "
              f"({'met' if frac >= 0.6 else 'NOT met'}) (of a copy into a new array: "
              f"{100 * fresh:.0f}%)\n")
        markdown += rows_md
        markdown.append(f"| {k} | copy into a new array / an existing array | "
                        + " | ".join(f"{2 * x.nbytes / sec / 1e9:.1f} GB/s"
                                     for sec in yard.values()) + " |")

    print("markdown rows (k | step | " + " | ".join(impls) + " | numba/numpy | numba/copy into "
          "an existing array):")
    print("\n".join(markdown) + "\n")
    if not args.no_startup:
        print(f"start-up, fresh processes, warm Numba cache (SciPy installed: "
              f"{'yes' if scipy_installed() else 'no'}; Numba's set-up imports scipy.linalg "
              f"when it is):")
        for name, sec in startup_figures().items():
            print(f"  {name:<60} {sec * 1e3:8.1f} ms")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
