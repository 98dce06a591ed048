"""Benchmark one Switch layer, forward + backward: tinymoe vs PyTorch eager vs plain NumPy.

    python benchmarks/bench_switch_layer.py            # T = 4,096 and 16,384
    python benchmarks/bench_switch_layer.py --quick    # T = 1,024, 3 repeats: a smoke run

The layer (Fedus et al. 2021): a float32 router ``x W_r``, softmax, top-1 with capacity
C = ceil(1.25 T / E) (tokens in sequence order, overflow dropped), dispatch into (E, C, d),
E ReLU FFN experts d_model 256 -> d_ff 1,024 -> 256 as batched matmuls, combine with the
raw gate probability, plus the load-balancing loss (alpha 1e-2) and the router z-loss (1e-3).
One step is the forward pass, the loss ``sum(y * g) + router losses`` for a fixed upstream
gradient g, and the backward pass to x and all five weights. No jitter, no dropout, so the
three implementations compute the same numbers (``check_agreement`` asserts it first).

* **tinymoe**: ``tm.moe.switch_layer``, the one :class:`tinymoe.moe.MoELayer` with a
  :class:`tinymoe.moe.SwitchRouter` and stacked experts, with the default (Numba) dispatch.
* **PyTorch eager**: the same layer written the way one would in PyTorch: one-hot cumsum
  positions, ``index_copy`` into the buffer, ``baddbmm`` experts, ``index_select`` back;
  backward by autograd.
* **NumPy by hand**: forward and backward written out with fancy indexing and ``matmul``,
  no graph: the floor for any NumPy implementation without custom kernels.

Time: median of ``--repeats`` steps after two warm-up steps, the implementations timed in
alternating rounds in one process. Memory: each implementation runs in its own fresh process
(glibc's mmap threshold fixed, so every freed large array goes back to the system); after
two warm-up steps it records its resident set size, resets the kernel's high-water mark
(``/proc/self/clear_refs``) and runs one step: the peak is the high-water mark minus that
baseline, i.e. what one training step needs on top of weights and inputs (Linux only).
Results: docs/benchmarks.md ("Switch layer").
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import interleaved_medians, machine, table, try_torch  # noqa: E402

# PyTorch first: importing tinymoe's kernels sets OMP_WAIT_POLICY=PASSIVE (unless already
# set) for Numba's OpenMP threads, and PyTorch's own OpenMP should keep its default.
TORCH = None if "--no-torch" in sys.argv else try_torch()

import tinymoe as tm  # noqa: E402
from tinymoe.moe import MoELayer, switch_layer  # noqa: E402

D_MODEL, D_FF, EXPERTS, CAPACITY_FACTOR = 256, 1024, 8, 1.25
AUX_COEF, Z_COEF = 1e-2, 1e-3
IMPLS = ("tinymoe", "torch", "numpy")


def make_problem(T: int, d: int = D_MODEL, d_ff: int = D_FF, E: int = EXPERTS,
                 seed: int = 0) -> tuple[MoELayer, np.ndarray, np.ndarray]:
    """A float32 Switch layer (jitter off) and an input x and upstream gradient g (T, d)."""
    layer = switch_layer(d, E, d_ff, capacity_factor=CAPACITY_FACTOR, jitter=0.0,
                         aux_loss_coef=AUX_COEF, z_loss_coef=Z_COEF, rng=seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((T, d)).astype(np.float32)
    g = rng.standard_normal((T, d)).astype(np.float32)
    return layer, x, g


def weights(layer: MoELayer) -> dict[str, np.ndarray]:
    ex = layer.experts
    return {"W_r": layer.router.W_r.data, "W1": ex.W1.data, "b1": ex.b1.data,
            "W2": ex.W2.data, "b2": ex.b2.data}


# --- tinymoe ------------------------------------------------------------------------------
def tinymoe_step(layer: MoELayer, x: np.ndarray, g: np.ndarray) -> dict:
    """One forward + backward; returns y, the loss and the gradients (arrays)."""
    for p in layer.parameters():
        p.grad = None
    xt = tm.Tensor(x, requires_grad=True)
    y, aux = layer(xt)                                   # (T, d), {"balance", "z"}
    loss = (y * g).sum() + tm.moe.sum_losses(aux.values())
    loss.backward()
    ex = layer.experts
    return {"y": y.data, "loss": float(loss.item()), "x": xt.grad,
            "W_r": layer.router.W_r.grad, "W1": ex.W1.grad, "b1": ex.b1.grad,
            "W2": ex.W2.grad, "b2": ex.b2.grad}


# --- NumPy by hand ------------------------------------------------------------------------
def numpy_step(w: dict[str, np.ndarray], x: np.ndarray, g: np.ndarray) -> dict:
    """The same layer's forward and backward written out in NumPy (no autograd)."""
    Wr, W1, b1, W2, b2 = w["W_r"], w["W1"], w["b1"], w["W2"], w["b2"]
    T, d = x.shape
    E = Wr.shape[1]
    C = math.ceil(round(T * CAPACITY_FACTOR / E, 9))
    # router, eq. (1)
    logits = x @ Wr                                      # (T, E)
    m = logits.max(axis=1, keepdims=True)
    ex = np.exp(logits - m)
    s = ex.sum(axis=1, keepdims=True)
    probs = ex / s                                       # (T, E)
    idx = probs.argmax(axis=1)                           # (T,) i*
    tok = np.arange(T)
    gate = probs[tok, idx]                               # (T,) p_{i*}
    # capacity: position of each token in its expert's queue, in sequence order
    onehot = np.zeros((T, E), dtype=np.int64)
    onehot[tok, idx] = 1                                 # (T, E)
    pos = np.cumsum(onehot, axis=0)[tok, idx] - 1        # (T,)
    kept = np.flatnonzero(pos < C)                       # (n,) tokens with a slot
    slot = idx[kept] * C + pos[kept]                     # (n,) row of the (E*C, d) buffer
    buf = np.zeros((E * C, d), dtype=x.dtype)
    buf[slot] = x[kept]
    buf = buf.reshape(E, C, d)                           # (E, C, d)
    pre = buf @ W1 + b1[:, None]                         # (E, C, d_ff)
    h = np.maximum(pre, 0)
    out = (h @ W2 + b2[:, None]).reshape(E * C, d)       # (E*C, d)
    y = np.zeros((T, d), dtype=x.dtype)
    y[kept] = gate[kept, None] * out[slot]               # (T, d)
    # losses: eqs. (4)-(6) and the z-loss
    f = np.bincount(idx, minlength=E) / T                # (E,)
    P = probs.mean(axis=0)                               # (E,)
    lse = (m + np.log(s))[:, 0]                          # (T,)
    loss = float((y * g).sum() + AUX_COEF * E * (f * P).sum() + Z_COEF * (lse ** 2).mean())
    # backward
    g_kept = g[kept]                                     # (n, d)
    g_gate = np.zeros(T, dtype=x.dtype)
    g_gate[kept] = np.einsum("nd,nd->n", g_kept, out[slot])
    g_out = np.zeros((E * C, d), dtype=x.dtype)
    g_out[slot] = gate[kept, None] * g_kept
    g_out = g_out.reshape(E, C, d)                       # (E, C, d)
    g_b2 = g_out.sum(axis=1)
    g_W2 = h.transpose(0, 2, 1) @ g_out                  # (E, d_ff, d)
    g_pre = (g_out @ W2.transpose(0, 2, 1)) * (pre > 0)  # (E, C, d_ff)
    g_b1 = g_pre.sum(axis=1)
    g_W1 = buf.transpose(0, 2, 1) @ g_pre                # (E, d, d_ff)
    g_buf = (g_pre @ W1.transpose(0, 2, 1)).reshape(E * C, d)
    g_x = np.zeros((T, d), dtype=x.dtype)
    g_x[kept] = g_buf[slot]
    g_probs = np.empty((T, E), dtype=x.dtype)
    g_probs[:] = AUX_COEF * E * f / T                    # d aux / d p_i(x) = alpha E f_i / T
    g_probs[tok, idx] += g_gate
    g_logits = probs * (g_probs - (g_probs * probs).sum(axis=1, keepdims=True))
    g_logits += (Z_COEF * 2 / T) * lse[:, None] * probs  # d z / d logits
    g_x += g_logits @ Wr.T
    return {"y": y, "loss": loss, "x": g_x, "W_r": x.T @ g_logits, "W1": g_W1, "b1": g_b1,
            "W2": g_W2, "b2": g_b2}


# --- PyTorch eager ------------------------------------------------------------------------
def torch_params(torch, w: dict[str, np.ndarray]) -> dict:
    return {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}


def torch_step(torch, p: dict, x: np.ndarray, g: np.ndarray) -> dict:
    """The same layer in PyTorch eager; gradients by autograd."""
    F = torch.nn.functional
    for t in p.values():
        t.grad = None
    xt = torch.from_numpy(x).requires_grad_()
    gt = torch.from_numpy(g)
    T, d = xt.shape
    E = p["W_r"].shape[1]
    C = math.ceil(round(T * CAPACITY_FACTOR / E, 9))
    logits = xt @ p["W_r"]                               # (T, E)
    probs = torch.softmax(logits, dim=-1)
    gate, idx = probs.max(dim=-1)                        # (T,)
    onehot = F.one_hot(idx, E)                           # (T, E)
    pos = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # (T,)
    kept = torch.nonzero(pos < C).squeeze(1)             # (n,)
    slot = idx[kept] * C + pos[kept]                     # (n,)
    buf = xt.new_zeros(E * C, d).index_copy(0, slot, xt.index_select(0, kept)).view(E, C, d)
    h = torch.relu(torch.baddbmm(p["b1"].unsqueeze(1), buf, p["W1"]))   # (E, C, d_ff)
    out = torch.baddbmm(p["b2"].unsqueeze(1), h, p["W2"]).view(E * C, d)
    y = xt.new_zeros(T, d).index_copy(0, kept, gate[kept].unsqueeze(1)
                                      * out.index_select(0, slot))     # (T, d)
    f = onehot.sum(dim=0).to(probs.dtype) / T
    aux = E * (f * probs.mean(dim=0)).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    loss = (y * gt).sum() + AUX_COEF * aux + Z_COEF * z
    loss.backward()
    return {"y": y.detach().numpy(), "loss": float(loss.detach()), "x": xt.grad.numpy(),
            **{k: t.grad.numpy() for k, t in p.items()}}


# --- correctness first --------------------------------------------------------------------
def check_agreement(T: int = 512, d: int = 32, d_ff: int = 64, E: int = 8, torch=None,
                    rtol: float = 2e-4) -> list[str]:
    """Run all implementations on one small problem; raise if any result differs."""
    layer, x, g = make_problem(T, d, d_ff, E)
    results = {"tinymoe": tinymoe_step(layer, x, g), "numpy": numpy_step(weights(layer), x, g)}
    if torch is not None:
        results["torch"] = torch_step(torch, torch_params(torch, weights(layer)), x, g)
    ref = results["tinymoe"]
    for name, res in results.items():
        for key, want in ref.items():
            got = res[key]
            scale = float(np.max(np.abs(want))) or 1.0
            err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
            if err > rtol * scale:
                raise AssertionError(f"bench_switch_layer: {name} disagrees with tinymoe on "
                                     f"{key}: max |diff| {err:.3g} > {rtol} x {scale:.3g}")
    return list(results)


# --- memory, in a fresh process per implementation ---------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(impl: str, T: int) -> dict:
    """Peak resident memory of one step above the warmed-up baseline, in MiB."""
    layer, x, g = make_problem(T)
    if impl == "tinymoe":
        step = lambda: tinymoe_step(layer, x, g)  # noqa: E731
    elif impl == "numpy":
        w = weights(layer)
        step = lambda: numpy_step(w, x, g)  # noqa: E731
    else:
        import torch
        torch.set_num_threads(2)
        p = torch_params(torch, weights(layer))
        step = lambda: torch_step(torch, p, x, g)  # noqa: E731
    for _ in range(2):
        step()
    gc.collect()
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    result = step()
    peak = _rss_kib("VmHWM")
    del result
    return {"impl": impl, "T": T, "baseline_mib": base / 1024, "peak_mib": (peak - base) / 1024}


def measure_memory(impl: str, T: int) -> dict | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    env.pop("NUMBA_DISABLE_JIT", None)
    out = subprocess.run([sys.executable, __file__, "--memory-worker", impl, str(T)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- the run ------------------------------------------------------------------------------

def run_size(T: int, impls: list[str], repeats: int, torch, memory: bool
             ) -> tuple[list[list[str]], list[list[str]]]:
    """Time (and measure the memory of) every implementation at T tokens: table rows."""
    layer, x, g = make_problem(T)
    w = weights(layer)
    fns = {"tinymoe": lambda: tinymoe_step(layer, x, g), "numpy": lambda: numpy_step(w, x, g)}
    if torch is not None:
        p = torch_params(torch, w)
        fns["torch"] = lambda: torch_step(torch, p, x, g)
    t = interleaved_medians({n: fns[n] for n in impls}, repeats=repeats, warmup=2)
    C = math.ceil(round(T * CAPACITY_FACTOR / EXPERTS, 9))
    flops = 3 * 2 * 2 * EXPERTS * C * D_MODEL * D_FF  # expert matmuls, forward + backward
    rows = []
    for n in impls:
        ratio = t[n] / t["torch"] if torch is not None else math.nan
        rows.append([f"{T:,}", n, f"{t[n] * 1e3:.1f}", f"{flops / t[n] / 1e9:.1f}",
                     f"{ratio:.2f}"])
    print(f"T = {T:,} (C = {C:,}): " + ", ".join(f"{n} {t[n] * 1e3:.1f} ms" for n in impls)
          + (f"; tinymoe / torch = {t['tinymoe'] / t['torch']:.2f} (target <= 1.0: "
             f"{'met' if t['tinymoe'] <= t['torch'] else 'NOT met'})" if torch is not None
             else ""))
    mem_rows = []
    mem = {n: measure_memory(n, T) for n in impls} if memory else {}
    if mem and all(mem.values()):
        for n in impls:
            rel = mem[n]["peak_mib"] / mem["torch"]["peak_mib"] if torch else math.nan
            mem_rows.append([f"{T:,}", n, f"{mem[n]['peak_mib']:.0f}",
                             f"{mem[n]['baseline_mib']:.0f}", f"{rel:.2f}"])
        print("  peak memory of one step (MiB above baseline): " + ", ".join(
            f"{n} {mem[n]['peak_mib']:.0f}" for n in impls)
            + (f"; tinymoe / torch = {mem['tinymoe']['peak_mib'] / mem['torch']['peak_mib']:.2f}"
               f" (target <= 1.5)" if torch is not None else ""))
    return rows, mem_rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 1,024 and 3 repeats")
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="T values (default 4,096 and 16,384)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (default 7)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--memory-worker", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker[0], int(args.memory_worker[1]))))
        return
    sizes = args.tokens or ([1024] if args.quick else [4096, 16384])
    repeats = args.repeats or (3 if args.quick else 7)
    torch = None if args.no_torch else TORCH
    if torch is not None:
        torch.set_num_threads(2)
    elif not args.no_torch:
        print("PyTorch not installed: skipping its column")
    print(f"machine: {machine()}; dispatch backend {tm.dispatch.get_backend()}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(f"agreement check (T = 512): {', '.join(check_agreement(torch=torch))} agree\n")
    impls = [n for n in IMPLS if n != "torch" or torch is not None]

    rows, mem_rows = [], []
    for T in sizes:
        r, m = run_size(T, impls, repeats, torch, memory=not args.no_memory)
        rows += r
        mem_rows += m

    print(f"\nforward + backward of one Switch layer, float32, d_model {D_MODEL}, d_ff {D_FF}, "
          f"E = {EXPERTS}, capacity factor {CAPACITY_FACTOR}, median of {repeats} "
          f"(GFLOP/s counts the expert matmuls only)\n")
    print(table(["T", "implementation", "ms per step", "GFLOP/s", "vs torch"], rows))
    if mem_rows:
        print("\npeak memory of one step above the warmed-up baseline (fresh process each)\n")
        print(table(["T", "implementation", "peak MiB", "baseline MiB", "vs torch"],
                    mem_rows))
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
