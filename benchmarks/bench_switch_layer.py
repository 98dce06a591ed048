"""Benchmark one Switch layer, forward + backward: tinymoe against the fastest PyTorch version.

    python benchmarks/bench_switch_layer.py            # T = 4,096 and 16,384; writes
                                                       # benchmarks/results/switch_layer.json
    python benchmarks/bench_switch_layer.py --quick    # T = 1,024, 3 repeats: a smoke run

The layer (Fedus et al. 2021): a float32 router ``x W_r``, softmax, top-1 with capacity
C = ceil(1.25 T / E) (tokens in sequence order, overflow dropped, dropped tokens output 0),
E ReLU FFN experts d_model 256 -> d_ff 1,024 -> 256, combine with the raw gate probability,
plus the load-balancing loss (alpha 1e-2) and the router z-loss (1e-3). One step is the
forward pass, the loss ``sum(y * g) + router losses`` for a fixed upstream gradient g, and
the backward pass to x and all the weights. No jitter, no dropout, so every implementation
computes the same numbers (``check_agreement`` asserts it first, outputs and gradients).

* **tinymoe**: ``tm.moe.switch_layer`` (the one :class:`tinymoe.moe.MoELayer` with a
  :class:`tinymoe.moe.SwitchRouter` and stacked experts), the default (Numba) dispatch.
* **NumPy by hand**: forward and backward written out with fancy indexing and ``matmul``.
* **torch-buffer**: PyTorch eager with capacity buffers: softmax router, one-hot cumsum
  positions, ``index_copy`` into the (E*C, d) buffer, two ``baddbmm``, ``index_copy`` back.
* **torch-sorted**: PyTorch eager, grouped by sorting: ``argsort`` by expert (stable, so
  sequence order within an expert), the first C of each expert kept, one ``addmm`` pair per
  expert slice, ``index_copy`` back. It multiplies only the kept tokens.
* **hf**: Hugging Face's ``SwitchTransformersSparseMLP`` (when transformers is installed)
  with its own ``load_balancing_loss_func`` and ``router_z_loss_func``. Its conventions:
  capacity per sequence (we give it one sequence of T tokens, so C is the same), and in
  transformers 5.x a dropped token's output is 0, as ours (4.x returned the token itself
  times its gate probability). Its experts have no biases (T5 style): ours start at zero,
  so the outputs agree, and its step computes no bias gradients.

Every PyTorch version is timed with ``torch.set_num_threads(1)`` and ``(2)``; the faster is
reported, and tinymoe is compared with the fastest PyTorch version found.

Time: median of ``--repeats`` steps after two warm-up steps, all implementations timed in
alternating rounds, together with a yardstick: the machine's sgemm speed on
one big matrix product of an expert matmul's total size ((E*C, d) @ (d, d_ff), NumPy and
PyTorch), whose best is the "peak". GFLOP/s count the arithmetic a step needs: the six
expert matmuls (two forward, four backward) over the **kept** tokens; the capacity-buffer
versions also multiply the empty slots. A per-op profile of the tinymoe step follows.
tinymoe runs in a child process that never imports PyTorch, driven step by step over a pipe
in the same rounds, and every timed call follows untimed calls of its own
(benchmarks/_worker.py says why); the same step in this process, beside PyTorch, is
recorded too.
Memory: each implementation runs in its own fresh process (glibc's mmap threshold fixed, so
every freed large array goes back to the system); after two warm-up steps it records its
resident set size, resets the kernel's high-water mark (``/proc/self/clear_refs``) and runs
one step: the peak is the high-water mark minus that baseline (Linux only).
Results: benchmarks/results/switch_layer.json, rendered into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import (interleaved_medians, load_average, machine_line, table,  # noqa: E402
                     try_torch, write_result)
from _worker import StepWorker, serve, warmed  # noqa: E402

# PyTorch first: importing tinymoe's kernels sets OMP_WAIT_POLICY=PASSIVE (unless already
# set) for Numba's OpenMP threads, and PyTorch's own OpenMP should keep its default.
TORCH = None if "--no-torch" in sys.argv else try_torch()

import tinymoe as tm  # noqa: E402
from tinymoe.moe import MoELayer, switch_layer  # noqa: E402

D_MODEL, D_FF, EXPERTS, CAPACITY_FACTOR = 256, 1024, 8, 1.25
AUX_COEF, Z_COEF = 1e-2, 1e-3
IMPLS = ("tinymoe", "numpy", "torch-buffer", "torch-sorted", "hf")
TORCH_IMPLS = ("torch-buffer", "torch-sorted", "hf")
IN_PROCESS = "tinymoe, in the benchmark's process"
LABELS = {"tinymoe": "tinymoe", "numpy": "NumPy by hand", "torch-buffer":
          "PyTorch, capacity buffer", "torch-sorted": "PyTorch, sorted by expert",
          "hf": "HF SwitchTransformersSparseMLP"}


def make_problem(T: int, d: int = D_MODEL, d_ff: int = D_FF, E: int = EXPERTS,
                 seed: int = 0) -> tuple[MoELayer, np.ndarray, np.ndarray]:
    """A float32 Switch layer (jitter off) and an input x and upstream gradient g (T, d)."""
    layer = switch_layer(d, E, d_ff, capacity_factor=CAPACITY_FACTOR, jitter=0.0,
                         aux_loss_coef=AUX_COEF, z_loss_coef=Z_COEF, rng=seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((T, d)).astype(np.float32)
    g = rng.standard_normal((T, d)).astype(np.float32)
    return layer, x, g


def capacity(T: int, E: int = EXPERTS) -> int:
    return math.ceil(round(T * CAPACITY_FACTOR / E, 9))


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
    C = capacity(T, E)
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


# --- PyTorch eager: capacity buffers ------------------------------------------------------
def torch_params(torch, w: dict[str, np.ndarray]) -> dict:
    return {k: torch.tensor(v, requires_grad=True) for k, v in w.items()}


def _torch_losses(torch, logits, probs, idx, E: int):
    T = logits.shape[0]
    f = torch.bincount(idx, minlength=E).to(probs.dtype) / T  # (E,) share of tokens
    aux = E * (f * probs.mean(dim=0)).sum()                   # eq. (4)
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()         # ST-MoE z-loss
    return AUX_COEF * aux + Z_COEF * z


def _torch_result(y, loss, xt, p: dict) -> dict:
    return {"y": y.detach().numpy(), "loss": float(loss.detach()), "x": xt.grad.numpy(),
            **{k: t.grad.numpy() for k, t in p.items() if t.grad is not None}}


def _torch_route(torch, p: dict, x: np.ndarray, g: np.ndarray) -> tuple:
    """The router part shared by the PyTorch versions: fresh leaves, softmax, top-1.
    Returns ``(x, g, logits (T, E), probs (T, E), gate (T,), idx (T,))``."""
    for t in p.values():
        t.grad = None
    xt = torch.from_numpy(x).requires_grad_()
    logits = xt @ p["W_r"]                               # (T, E)
    probs = torch.softmax(logits, dim=-1)
    gate, idx = probs.max(dim=-1)                        # (T,)
    return xt, torch.from_numpy(g), logits, probs, gate, idx


def torch_buffer_step(torch, p: dict, x: np.ndarray, g: np.ndarray) -> dict:
    """Capacity buffers: one-hot cumsum positions, index_copy in, baddbmm, index_copy back."""
    F = torch.nn.functional
    xt, gt, logits, probs, gate, idx = _torch_route(torch, p, x, g)
    T, d = xt.shape
    E = p["W_r"].shape[1]
    C = capacity(T, E)
    onehot = F.one_hot(idx, E)                           # (T, E)
    pos = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # (T,)
    kept = torch.nonzero(pos < C).squeeze(1)             # (n,)
    slot = idx[kept] * C + pos[kept]                     # (n,)
    buf = xt.new_zeros(E * C, d).index_copy(0, slot, xt.index_select(0, kept)).view(E, C, d)
    h = torch.relu(torch.baddbmm(p["b1"].unsqueeze(1), buf, p["W1"]))   # (E, C, d_ff)
    out = torch.baddbmm(p["b2"].unsqueeze(1), h, p["W2"]).view(E * C, d)
    y = xt.new_zeros(T, d).index_copy(0, kept, gate[kept].unsqueeze(1)
                                      * out.index_select(0, slot))     # (T, d)
    loss = (y * gt).sum() + _torch_losses(torch, logits, probs, idx, E)
    loss.backward()
    return _torch_result(y, loss, xt, p)


# --- PyTorch eager: sorted by expert --------------------------------------------------------
def torch_sorted_step(torch, p: dict, x: np.ndarray, g: np.ndarray) -> dict:
    """Grouped by sorting: argsort by expert, the first C of each kept, one addmm per slice."""
    xt, gt, logits, probs, gate, idx = _torch_route(torch, p, x, g)
    T, d = xt.shape
    E = p["W_r"].shape[1]
    C = capacity(T, E)
    order = torch.argsort(idx, stable=True)              # (T,) by expert, sequence order within
    counts = torch.bincount(idx, minlength=E)            # (E,)
    starts = torch.cumsum(counts, 0) - counts            # (E,) first row of each expert
    pos = torch.arange(T) - starts[idx[order]]           # (T,) place in its expert's queue
    kept = order[pos < C]                                # (n,) kept tokens, grouped by expert
    sizes = counts.clamp(max=C).tolist()                 # rows per expert
    rows = xt.index_select(0, kept)                      # (n, d)
    outs = []
    for e, block in enumerate(rows.split(sizes)):        # (n_e, d) each
        h = torch.relu(torch.addmm(p["b1"][e], block, p["W1"][e]))     # (n_e, d_ff)
        outs.append(torch.addmm(p["b2"][e], h, p["W2"][e]))           # (n_e, d)
    out = torch.cat(outs) * gate.index_select(0, kept).unsqueeze(1)   # (n, d)
    y = xt.new_zeros(T, d).index_copy(0, kept, out)      # (T, d)
    loss = (y * gt).sum() + _torch_losses(torch, logits, probs, idx, E)
    loss.backward()
    return _torch_result(y, loss, xt, p)


# --- Hugging Face transformers ----------------------------------------------------------------
def try_hf():
    try:
        from transformers.models.switch_transformers import modeling_switch_transformers
    except ImportError:
        return None
    return modeling_switch_transformers


def hf_layer(torch, hf, w: dict[str, np.ndarray], T: int):
    """``SwitchTransformersSparseMLP`` with our weights (no biases: ours are zero)."""
    E, d, d_ff = w["W1"].shape
    if np.any(w["b1"]) or np.any(w["b2"]):
        raise ValueError("hf_layer: HF's experts have no biases; the benchmark's are zero")
    cfg = hf.SwitchTransformersConfig(
        d_model=d, d_ff=d_ff, num_experts=E, expert_capacity=capacity(T, E),
        router_bias=False, router_jitter_noise=0.0, dropout_rate=0.0, dense_act_fn="relu",
        router_dtype="float32", router_ignore_padding_tokens=False)
    mlp = hf.SwitchTransformersSparseMLP(cfg).float().train()
    with torch.no_grad():
        mlp.router.classifier.weight.copy_(torch.from_numpy(w["W_r"].T))  # (E, d)
        for e in range(E):
            ex = mlp.experts[f"expert_{e}"]
            ex.wi.weight.copy_(torch.from_numpy(w["W1"][e].T))  # (d_ff, d)
            ex.wo.weight.copy_(torch.from_numpy(w["W2"][e].T))  # (d, d_ff)
    captured = {}
    mlp.router.register_forward_hook(lambda m, i, out: captured.__setitem__("logits", out[2]))
    return mlp, captured


def hf_step(torch, hf, model, x: np.ndarray, g: np.ndarray) -> dict:
    """One step of HF's layer; the losses by HF's own functions on its router logits."""
    mlp, captured = model
    mlp.zero_grad(set_to_none=True)
    xt = torch.from_numpy(x).requires_grad_()
    y = mlp(xt.unsqueeze(0))[0]                          # one sequence of T tokens: (T, d)
    logits = captured.pop("logits")                      # (1, T, E)
    probs = torch.softmax(logits, dim=-1)
    balance = hf.load_balancing_loss_func(probs, torch.argmax(probs, dim=-1))
    z = hf.router_z_loss_func(logits)
    loss = (y * torch.from_numpy(g)).sum() + AUX_COEF * balance + Z_COEF * z
    loss.backward()
    E = len(mlp.experts)
    res = {"y": y.detach().numpy(), "loss": float(loss.detach()), "x": xt.grad.numpy(),
           "W_r": mlp.router.classifier.weight.grad.numpy().T}
    for name, key in (("W1", "wi"), ("W2", "wo")):
        grads = [getattr(mlp.experts[f"expert_{e}"], key).weight.grad for e in range(E)]
        res[name] = np.stack([np.zeros(getattr(mlp.experts[f"expert_{e}"], key).weight.shape[
            ::-1], np.float32) if gr is None else gr.numpy().T for e, gr in enumerate(grads)])
    return res


def make_steps(T: int, layer: MoELayer, x: np.ndarray, g: np.ndarray, torch, hf) -> dict:
    """name -> one step (a function of nothing) for every implementation available."""
    w = weights(layer)
    steps = {"tinymoe": lambda: tinymoe_step(layer, x, g),
             "numpy": lambda: numpy_step(w, x, g)}
    if torch is not None:
        pb, ps = torch_params(torch, w), torch_params(torch, w)
        steps["torch-buffer"] = lambda: torch_buffer_step(torch, pb, x, g)
        steps["torch-sorted"] = lambda: torch_sorted_step(torch, ps, x, g)
        if hf is not None:
            model = hf_layer(torch, hf, w, T)
            steps["hf"] = lambda: hf_step(torch, hf, model, x, g)
    return steps


# --- correctness first --------------------------------------------------------------------
def check_agreement(T: int = 512, d: int = 32, d_ff: int = 64, E: int = 8, torch=None,
                    hf=None, rtol: float = 2e-4) -> list[str]:
    """Run all implementations on one small problem; raise if any result differs.

    Every output and gradient is compared with tinymoe's (HF's layer has no bias gradients
    to compare)."""
    layer, x, g = make_problem(T, d, d_ff, E)
    results = {name: step() for name, step in make_steps(T, layer, x, g, torch, hf).items()}
    ref = results["tinymoe"]
    for name, res in results.items():
        for key, want in ref.items():
            if key not in res and name == "hf" and key in ("b1", "b2"):
                continue
            got = res[key]
            scale = float(np.max(np.abs(want))) or 1.0
            err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
            if err > rtol * scale:
                raise AssertionError(f"bench_switch_layer: {name} disagrees with tinymoe on "
                                     f"{key}: max |diff| {err:.3g} > {rtol} x {scale:.3g}")
    return list(results)


# --- the yardstick: sgemm on one big matrix product -----------------------------------------
def gemm_yardsticks(T: int, torch) -> tuple[dict, dict, float]:
    """One (E*C, d) @ (d, d_ff) float32 product, NumPy and PyTorch at 1 and 2 threads:
    (functions, prepare hooks, FLOPs per call)."""
    rng = np.random.default_rng(2)
    a = rng.standard_normal((EXPERTS * capacity(T), D_MODEL)).astype(np.float32)
    b = rng.standard_normal((D_MODEL, D_FF)).astype(np.float32)
    fns = {"sgemm numpy": lambda: a @ b}
    prepare = {}
    if torch is not None:
        at, bt = torch.from_numpy(a), torch.from_numpy(b)
        for n in (1, 2):
            fns[f"sgemm torch/{n}t"] = lambda: at @ bt
            prepare[f"sgemm torch/{n}t"] = lambda n=n: torch.set_num_threads(n)
    return fns, prepare, 2.0 * a.shape[0] * D_MODEL * D_FF


# --- where the tinymoe step goes ----------------------------------------------------------
def _functions() -> list[type]:
    out, todo = [], [tm.autograd.Function]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            out.append(sub)
            todo.append(sub)
    return out


def op_profile(step, repeats: int = 3) -> dict:
    """Seconds per step inside each op's forward and backward (every autograd Function
    timed by wrapping its two methods for the duration), the capacity positions, and the
    whole step; the rest is routing bookkeeping, graph walk and Python."""
    import tinymoe.moe.switch as switch_mod

    totals: dict[str, float] = defaultdict(float)
    restore = []

    def timed(fn, key):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - start
        return run

    for cls in _functions():
        for kind in ("forward", "backward"):
            if kind in cls.__dict__:
                orig = cls.__dict__[kind]
                restore.append((cls, kind, orig))
                setattr(cls, kind, staticmethod(timed(orig.__func__, (cls.__name__, kind))))
    orig_pos = switch_mod.capacity_positions
    switch_mod.capacity_positions = timed(orig_pos, ("capacity_positions", "forward"))
    try:
        step()
        totals.clear()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        whole = (time.perf_counter() - start) / repeats
    finally:
        for cls, kind, orig in restore:
            setattr(cls, kind, orig)
        switch_mod.capacity_positions = orig_pos
    ops = defaultdict(lambda: {"forward_ms": 0.0, "backward_ms": 0.0})
    for (name, kind), sec in totals.items():
        ops[name][f"{kind}_ms"] = sec / repeats * 1e3
    return {"step_ms": whole * 1e3, "ops": dict(ops)}


# --- memory, in a fresh process per implementation ---------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(impl: str, T: int, threads: int) -> dict:
    """Peak resident memory of one step above the warmed-up baseline, in MiB."""
    layer, x, g = make_problem(T)
    torch = None
    if impl in TORCH_IMPLS:
        import torch
        torch.set_num_threads(threads)
    step = make_steps(T, layer, x, g, torch, try_hf() if impl == "hf" else None)[impl]
    for _ in range(2):
        step()
    gc.collect()
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    result = step()
    peak = _rss_kib("VmHWM")
    del result
    return {"impl": impl, "T": T, "baseline_mib": base / 1024, "peak_mib": (peak - base) / 1024}


def measure_memory(impl: str, T: int, threads: int = 2) -> dict | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    env.pop("NUMBA_DISABLE_JIT", None)
    out = subprocess.run([sys.executable, __file__, "--memory-worker", impl, str(T),
                          str(threads)], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- tinymoe in its own process (benchmarks/_worker.py says why) ---------------------------
def step_worker(T: int) -> None:
    """The child's side of the :class:`StepWorker`: tinymoe's step and its op profile."""
    layer, x, g = make_problem(T)
    step = lambda: tinymoe_step(layer, x, g)  # noqa: E731
    for _ in range(2):
        step()
    serve({"step": step}, {"profile": lambda: op_profile(step)})


# --- the run ------------------------------------------------------------------------------
def run_size(T: int, repeats: int, torch, hf, memory: bool, profile: bool) -> dict:
    """Time every implementation (PyTorch ones at 1 and 2 threads), the sgemm yardsticks,
    the profile and the memory at T tokens: one entry of the result file."""
    layer, x, g = make_problem(T)
    steps = make_steps(T, layer, x, g, torch, hf)
    steps["tinymoe"]()  # the routing, for the FLOP count below (the worker's is the same)
    worker = StepWorker(__file__, T)
    fns, prepare = {}, {}
    for name, step in steps.items():
        if name in TORCH_IMPLS:
            for n in (1, 2):
                fns[f"{name}/{n}t"] = step
                prepare[f"{name}/{n}t"] = lambda n=n: torch.set_num_threads(n)
        elif name == "tinymoe":
            fns[name] = worker.step("step")
            if torch is not None:  # the same step in this process, beside PyTorch
                fns[IN_PROCESS] = step
        else:
            fns[name] = step
    gemm_fns, gemm_prep, gemm_flops = gemm_yardsticks(T, torch)
    fns.update(gemm_fns)
    prepare.update(gemm_prep)
    prepare = {name: warmed(fn, prepare.get(name)) for name, fn in fns.items()}
    try:
        t = interleaved_medians(fns, repeats=repeats, warmup=2, prepare=prepare)
        prof = worker.query("profile") if profile else None
    finally:
        worker.close()
    in_process = t.pop(IN_PROCESS, None)
    if torch is not None:
        torch.set_num_threads(2)
    C = capacity(T)
    routing = layer.last_routing
    kept = int(routing.counts.sum())
    flops = 3 * 2 * 2 * kept * D_MODEL * D_FF  # six expert matmuls over the kept tokens
    padded = 3 * 2 * 2 * EXPERTS * C * D_MODEL * D_FF
    impls = {}
    for name in steps:
        variants = {k.partition("/")[2]: v for k, v in t.items()
                    if "/" in k and k.partition("/")[0] == name}
        best = min(variants, key=variants.get) if name in TORCH_IMPLS else None
        sec = variants[best] if best else t[name]
        impls[name] = {"ms": sec * 1e3, "threads": best,
                       "ms_by_threads": {k: v * 1e3 for k, v in variants.items()}
                       if best else None, "gflops": flops / sec / 1e9}
    torch_names = [n for n in impls if n in TORCH_IMPLS]
    fastest = min(torch_names, key=lambda n: impls[n]["ms"]) if torch_names else None
    gemm = {k: {"ms": v * 1e3, "gflops": gemm_flops / v / 1e9} for k, v in t.items()
            if k.startswith("sgemm")}
    peak = max(v["gflops"] for v in gemm.values())
    entry = {"T": T, "C": C, "kept_tokens": kept, "filled_slots": kept / (EXPERTS * C),
             "expert_gflop": flops / 1e9, "expert_gflop_padded": padded / 1e9,
             "impls": impls, "fastest_torch": fastest, "sgemm": gemm,
             "sgemm_peak_gflops": peak}
    if fastest:
        entry["ratio_vs_fastest_torch"] = impls["tinymoe"]["ms"] / impls[fastest]["ms"]
    if in_process is not None:
        entry["tinymoe_in_process_ms"] = in_process * 1e3
    if profile:
        ffn_ms = sum(v["forward_ms"] + v["backward_ms"] for k, v in prof["ops"].items()
                     if k in ("BufferFFN", "BufferLinear"))
        prof["expert_ffn_ms"] = ffn_ms
        prof["expert_ffn_gflops"] = flops / (ffn_ms / 1e3) / 1e9 if ffn_ms else None
        entry["profile"] = prof
    entry["step_gflops_of_peak"] = impls["tinymoe"]["gflops"] / peak
    if profile and entry["profile"]["expert_ffn_gflops"]:
        entry["expert_ffn_of_peak"] = entry["profile"]["expert_ffn_gflops"] / peak
    if memory:
        mem = {}
        for name in impls:
            threads = int(impls[name]["threads"][0]) if impls[name]["threads"] else 2
            m = measure_memory(name, T, threads)
            if m is None:
                break
            mem[name] = m
        if mem:
            entry["memory"] = mem
            if fastest:
                entry["memory_ratio_vs_fastest_torch"] = (
                    mem["tinymoe"]["peak_mib"] / mem[fastest]["peak_mib"])
                entry["memory_ratio_vs_min_torch"] = mem["tinymoe"]["peak_mib"] / min(
                    mem[n]["peak_mib"] for n in torch_names)
    return entry


def summary(entry: dict) -> str:
    T, imp = entry["T"], entry["impls"]
    line = f"T = {T:,} (C = {entry['C']:,}): " + ", ".join(
        f"{n}{'/' + imp[n]['threads'] if imp[n]['threads'] else ''} {imp[n]['ms']:.1f} ms"
        for n in imp)
    if entry.get("fastest_torch"):
        line += (f"; tinymoe / fastest PyTorch ({entry['fastest_torch']}) = "
                 f"{entry['ratio_vs_fastest_torch']:.2f}")
    line += (f"; sgemm peak {entry['sgemm_peak_gflops']:.0f} GFLOP/s, step "
             f"{entry['step_gflops_of_peak']:.0%} of it")
    if "expert_ffn_of_peak" in entry:
        line += f", expert FFN ops {entry['expert_ffn_of_peak']:.0%}"
    if "memory" in entry:
        line += "; peak MiB " + ", ".join(f"{n} {m['peak_mib']:.0f}"
                                         for n, m in entry["memory"].items())
    return line


# --- the page -------------------------------------------------------------------------------
TARGET_TIME, LIMIT_TIME, TARGET_PEAK, TARGET_MEMORY = 0.8, 1.0, 0.7, 1.0
PHASES = {"BufferFFN": "expert FFNs: matmuls, bias, ReLU",
          "BufferLinear": "expert layers: matmul, bias", "Dispatch": "dispatch",
          "Combine": "combine", "MatMul": "router logits x W_r",
          "Softmax": "router softmax", "LogSumExp": "z-loss (logsumexp)",
          "TakeAlongAxis": "gate p_i*", "capacity_positions": "capacity positions",
          "Mean": "balancing loss (means)", "Mul": "products (losses, y * g)",
          "Sum": "sums (losses, y * g)"}


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def render(result: dict) -> str:
    """The Switch-layer section of docs/benchmarks.md from a result file (see README.md)."""
    sizes = result["results"]["sizes"]
    out = [f"Command: `{result['command']}`, {result['date']}, load average "
           f"{result['load_average']['start']} at the start and "
           f"{result['load_average']['end']} at the end. Machine: "
           f"{machine_line(result['machine'])}. Checked first (T = 512): "
           f"{', '.join(LABELS[n] for n in result['results']['agreement'])} agree.", ""]
    rows = []
    for e in sizes:
        fastest = e.get("fastest_torch")
        for n, v in e["impls"].items():
            ratio = v["ms"] / e["impls"][fastest]["ms"] if fastest else math.nan
            mem = e.get("memory", {}).get(n)
            mem_ratio = (mem["peak_mib"] / e["memory"][fastest]["peak_mib"]
                         if mem and fastest in e.get("memory", {}) else math.nan)
            by = v["ms_by_threads"]
            threads = (" / ".join(f"{by[k]:.1f}" for k in sorted(by)) + f" ({v['threads']})"
                       if by else "")
            name = LABELS[n] + (" (fastest PyTorch)" if n == fastest else "")
            rows.append([f"{e['T']:,}", name, f"{v['ms']:.1f}", threads,
                         f"{v['gflops']:.0f}", f"{ratio:.2f}",
                         f"{mem['peak_mib']:.0f}" if mem else "–",
                         f"{mem_ratio:.2f}" if mem else "–"])
    out += [table(["T", "implementation", "ms per step", "PyTorch 1t / 2t ms (faster)",
                   "GFLOP/s", "vs fastest PyTorch", "peak MiB", "vs fastest PyTorch"],
                  rows), ""]
    inproc = [e for e in sizes if "tinymoe_in_process_ms" in e and e.get("fastest_torch")]
    if inproc:
        out += ["tinymoe is timed in a process of its own that never imports PyTorch (the "
                "same rounds, over a pipe). The same step timed in the benchmark's process, "
                "where Numba's OpenMP runs on the runtime PyTorch loaded: " + "; ".join(
                    f"T = {e['T']:,}: {e['tinymoe_in_process_ms']:.1f} ms "
                    f"({e['tinymoe_in_process_ms'] / e['impls'][e['fastest_torch']]['ms']:.2f}x"
                    f" the fastest PyTorch)" for e in inproc) + ".", ""]
    rows = []
    for e in sizes:
        g = e["sgemm"]
        rows.append([f"{e['T']:,}", f"{e['C']:,}", f"{e['kept_tokens']:,} "
                     f"({e['filled_slots']:.0%} of E·C)",
                     ", ".join(f"{k.split(' ', 1)[1]} {v['gflops']:.0f}" for k, v in g.items()),
                     f"{e['sgemm_peak_gflops']:.0f}",
                     f"{e['impls']['tinymoe']['gflops']:.0f} ({e['step_gflops_of_peak']:.0%})",
                     (f"{e['profile']['expert_ffn_gflops']:.0f} "
                      f"({e['expert_ffn_of_peak']:.0%})") if "expert_ffn_of_peak" in e
                     else "–"])
    out += ["Throughput against the machine's sgemm on one (E·C, d) @ (d, d_ff) product "
            "(GFLOP/s, timed in the same rounds):", "",
            table(["T", "C", "kept tokens", "sgemm GFLOP/s", "peak", "tinymoe step",
                   "tinymoe expert FFN ops"], rows), ""]
    for e in sizes:
        if "profile" not in e:
            continue
        prof = e["profile"]
        step = prof["step_ms"]
        rows = []
        ops = sorted(prof["ops"].items(),
                     key=lambda kv: -(kv[1]["forward_ms"] + kv[1]["backward_ms"]))
        inside = 0.0
        for name, v in ops:
            tot = v["forward_ms"] + v["backward_ms"]
            inside += tot
            if tot < 0.05 * step / 100:
                continue
            label = f"{PHASES[name]} ({name})" if name in PHASES else name
            rows.append([label, f"{v['forward_ms']:.1f}", f"{v['backward_ms']:.1f}",
                         f"{tot / step:.1%}"])
        rows.append(["outside the ops (routing bookkeeping, graph walk, Python)", "", "",
                     f"{max(step - inside, 0.0) / step:.1%}"])
        out += [f"Where the tinymoe step goes at T = {e['T']:,} ({step:.1f} ms per step "
                f"while profiled; each op's forward and backward timed):", "",
                table(["phase (op)", "forward ms", "backward ms", "share of the step"], rows),
                ""]
    targets = []
    for e in sizes:
        if not e.get("fastest_torch"):
            continue
        r, which = e["ratio_vs_fastest_torch"], f" ({LABELS[e['fastest_torch']]})"
        runs = e.get("runs", {})
        if runs:  # judged on the median of the runs
            ratios = runs["ratio_vs_fastest_torch"]
            r = statistics.median(ratios)
            which = (f", the median of {len(ratios)} runs of the whole benchmark ("
                     + ", ".join(f"{x:.2f}" for x in ratios) + "; fastest: "
                     + " / ".join(sorted({LABELS[n] for n in runs["fastest_torch"]})) + ")")
        targets.append(f"- T = {e['T']:,}: time {r:.2f}x the fastest PyTorch version{which}: "
                       f"target <= {TARGET_TIME}: {_met(r <= TARGET_TIME)}; limit <= "
                       f"{LIMIT_TIME}: {_met(r <= LIMIT_TIME)}.")
        frac = e.get("expert_ffn_of_peak")
        targets.append(f"  Expert matmuls: the whole step runs at "
                       f"{e['step_gflops_of_peak']:.0%} of the sgemm peak"
                       + (f", the expert FFN ops alone at {frac:.0%}" if frac else "")
                       + f": target >= {TARGET_PEAK:.0%}: "
                       + (f"{_met(frac >= TARGET_PEAK)} for the ops alone, "
                          if frac else "")
                       + f"{_met(e['step_gflops_of_peak'] >= TARGET_PEAK)} for the step.")
        if "memory_ratio_vs_fastest_torch" in e:
            mr, mm = e["memory_ratio_vs_fastest_torch"], e["memory_ratio_vs_min_torch"]
            targets.append(f"  Peak memory {mr:.2f}x the fastest PyTorch version's "
                           f"({mm:.2f}x the smallest PyTorch peak): target <= "
                           f"{TARGET_MEMORY}: {_met(mr <= TARGET_MEMORY)}.")
    out += ["Issue targets, from this run:", "", *targets]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T = 1,024 and 3 repeats")
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="T values (default 4,096 and 16,384)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps (default 7)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--runs", type=int, default=3,
                    help="time everything this many times (default 3; the first run's "
                         "tables, the targets on the median ratio)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--no-profile", action="store_true", help="skip the tinymoe op profile")
    ap.add_argument("--no-write", action="store_true",
                    help="do not write benchmarks/results/switch_layer.json")
    ap.add_argument("--memory-worker", nargs=3, metavar=("IMPL", "T", "THREADS"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--step-worker", type=int, metavar="T", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step_worker:
        step_worker(args.step_worker)
        return
    if args.memory_worker:
        impl, T, threads = args.memory_worker
        print(json.dumps(memory_worker(impl, int(T), int(threads))))
        return
    load_start = load_average()
    sizes = args.tokens or ([1024] if args.quick else [4096, 16384])
    repeats = args.repeats or (3 if args.quick else 7)
    torch = None if args.no_torch else TORCH
    hf = try_hf() if torch is not None else None
    if torch is None and not args.no_torch:
        print("PyTorch not installed: skipping its columns")
    print(f"dispatch backend {tm.dispatch.get_backend()}; load average at start: {load_start}")
    agree = check_agreement(torch=torch, hf=hf)
    print(f"agreement check (T = 512): {', '.join(agree)} agree")
    entries = []
    for T in sizes:
        entries.append(run_size(T, repeats, torch, hf, memory=not args.no_memory,
                                profile=not args.no_profile))
        print(summary(entries[-1]))
    for _ in range(args.runs - 1):  # the whole timing again: the spread between runs
        for e in entries:
            again = run_size(e["T"], repeats, torch, hf, memory=False, profile=False)
            print("again: " + summary(again))
            for key in ("ratio_vs_fastest_torch", "fastest_torch"):
                if key in again:
                    e.setdefault("runs", {}).setdefault(key, [e[key]]).append(again[key])
    settings = {"d_model": D_MODEL, "d_ff": D_FF, "experts": EXPERTS,
                "capacity_factor": CAPACITY_FACTOR, "aux_coef": AUX_COEF, "z_coef": Z_COEF,
                "tokens": sizes, "repeats": repeats, "warmup": 2, "runs": args.runs,
                "dispatch_backend": tm.dispatch.get_backend()}
    result = {"agreement": agree, "sizes": entries}
    if not args.no_write:
        path = write_result("switch_layer", argv, settings, result, load_start)
        print(f"wrote {path.relative_to(ROOT)}")
        print()
        print(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
