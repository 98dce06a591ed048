"""Benchmark the tiny Switch LM end to end: one training step, and generation, vs PyTorch eager.

    python benchmarks/bench_lm_step.py            # batch 16 x 128 tokens, 9 repeats
    python benchmarks/bench_lm_step.py --quick    # batch 4, 3 repeats: a smoke run

The model is :mod:`tinymoe.models.transformer`'s default ``tinymoe-switch-lm`` (vocabulary
65, context 128, d 128, 4 blocks of 4 heads, d_ff 512, 8 Switch experts in every other
block with capacity factor 1.0, the balancing loss α = 1e-2 and the z-loss c_z = 1e-3,
exact GELU, tied embeddings; Fedus et al. 2021, §2.2 and §2.4) with jitter and dropout off,
so the two implementations compute the same numbers. One training step: the forward pass,
cross-entropy + the routers' losses, the backward pass, and an AdamW step (Loshchilov &
Hutter 2019; lr 3e-3, weight decay 0.01 on every parameter).

* **tinymoe**: :class:`tinymoe.models.transformer.Transformer` and
  :class:`tinymoe.optim.AdamW`, default (Numba) dispatch, default threads.
* **PyTorch eager**, nanoGPT style, the same shapes and the same weights (copied from the
  tinymoe model): ``nn.Linear`` layers, ``F.scaled_dot_product_attention`` with
  ``is_causal``, the Switch FFN written as fast as we could (one-hot cumsum positions,
  ``index_copy`` into the (E·C, d) buffer, two ``baddbmm``, ``index_select`` back; see
  benchmarks/bench_switch_layer.py), ``F.cross_entropy``, ``torch.optim.AdamW(fused=True)``.
  Timed with ``torch.set_num_threads`` 1 and 2 (two model copies, interleaved); the faster
  is the baseline.

Agreement first (``check_agreement``): the first-step loss, every gradient and every
parameter after one AdamW step agree to float32 rounding.

Generation: greedy decoding with a KV cache (:func:`tinymoe.models.generate.generate` vs
the same cache written in PyTorch): a prompt of 16 tokens, then ``--new`` tokens one at a
time, at batch 1 and 16, in eval mode (capacity applies per forward call in both). The two
produce the same tokens (checked). Tokens per second = batch · new tokens / seconds.

Time: medians over ``--repeats`` rounds, the implementations alternating
(benchmarks/_common.py: interleaved_medians), each timed call after untimed ones and tinymoe's in a
process of its own without PyTorch (benchmarks/_worker.py says why). Memory: each
implementation in a fresh process, as in bench_switch_layer.py: the resident-set high-water
mark of one training step above the warmed-up baseline (Linux only). Results:
benchmarks/results/lm_step.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import interleaved_medians, machine, table, try_torch  # noqa: E402

from _common import write_result  # noqa: E402
from _worker import StepWorker, serve, warmed  # noqa: E402

# PyTorch first, as in bench_switch_layer.py: its OpenMP keeps its own defaults.
TORCH = None if "--no-torch" in sys.argv else try_torch()

import tinymoe as tm  # noqa: E402
from tinymoe.models.generate import generate  # noqa: E402
from tinymoe.models.transformer import Transformer, TransformerConfig  # noqa: E402

LR, WEIGHT_DECAY = 3e-3, 0.01
GEN_BATCHES, PROMPT_LEN = (1, 16), 16
RESULTS = ROOT / "benchmarks" / "results" / "lm_step.json"


def make_config() -> TransformerConfig:
    """The default Switch LM, jitter off (dropout is 0 by default)."""
    return TransformerConfig(jitter=0.0)


def make_batch(cfg: TransformerConfig, batch: int, seed: int = 1
               ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, cfg.block_size + 1))
    return ids[:, :-1].copy(), ids[:, 1:].copy()  # (B, L) inputs, (B, L) next-token targets


# --- tinymoe ------------------------------------------------------------------------------
def tinymoe_model(cfg: TransformerConfig, seed: int = 0):
    model = Transformer(cfg, rng=seed)
    return model, tm.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def tinymoe_step(model, opt, ids, targets, grads: bool = False):
    opt.zero_grad()
    loss, _ = model.loss(ids, targets)
    loss.backward()
    out = {"loss": float(loss.item())}
    if grads:
        out["grads"] = {n: p.grad.copy() for n, p in model.named_parameters()}
    opt.step()
    return out


# --- PyTorch eager, nanoGPT style ---------------------------------------------------------
def torch_classes(torch):
    """The PyTorch model's classes (defined here so that the module imports without torch)."""
    nn, F = torch.nn, torch.nn.functional

    class Attention(nn.Module):
        def __init__(self, d, H):
            super().__init__()
            self.H = H
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

        def forward(self, x, cache=None, start=0):
            B, T, d = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, self.H, d // self.H).permute(2, 0, 3, 1, 4)
            if cache is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d_h)
            else:
                K, V = cache  # (B, H, S_max, d_h)
                K[:, :, start:start + T] = k
                V[:, :, start:start + T] = v
                end = start + T
                mask = None if T == 1 else torch.ones(T, end, dtype=torch.bool).tril(start)
                y = F.scaled_dot_product_attention(q, K[:, :, :end], V[:, :, :end],
                                                   attn_mask=mask)
            return self.proj(y.transpose(1, 2).reshape(B, T, d))

    class MLP(nn.Module):
        def __init__(self, d, f):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x))), None

    class SwitchFFN(nn.Module):
        """Top-1 routing with capacity; experts as two baddbmm on the (E, C, d) buffer."""

        def __init__(self, d, f, E, cf, aux_coef, z_coef):
            super().__init__()
            self.E, self.cf, self.aux_coef, self.z_coef = E, cf, aux_coef, z_coef
            self.W_r = nn.Parameter(torch.empty(d, E))
            self.W1 = nn.Parameter(torch.empty(E, d, f))
            self.b1 = nn.Parameter(torch.empty(E, f))
            self.W2 = nn.Parameter(torch.empty(E, f, d))
            self.b2 = nn.Parameter(torch.empty(E, d))

        def forward(self, x):
            lead, d = x.shape[:-1], x.shape[-1]
            x = x.reshape(-1, d)  # (T, d)
            T, E = x.shape[0], self.E
            C = min(T, max(1, math.ceil(round(T * self.cf / E, 9))))
            logits = x @ self.W_r  # (T, E)
            probs = torch.softmax(logits, dim=-1)
            gate, idx = probs.max(dim=-1)  # (T,)
            onehot = F.one_hot(idx, E)  # (T, E)
            pos = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # (T,)
            kept = torch.nonzero(pos < C).squeeze(1)  # (n,)
            slot = idx[kept] * C + pos[kept]  # (n,)
            buf = x.new_zeros(E * C, d).index_copy(0, slot, x.index_select(0, kept))
            h = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), buf.view(E, C, d), self.W1))
            out = torch.baddbmm(self.b2.unsqueeze(1), h, self.W2).view(E * C, d)
            y = x.new_zeros(T, d).index_copy(0, kept, gate[kept].unsqueeze(1)
                                             * out.index_select(0, slot))  # (T, d)
            f = onehot.sum(dim=0).to(probs.dtype) / T
            aux = self.aux_coef * E * (f * probs.mean(dim=0)).sum()
            z = self.z_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
            return y.view(*lead, d), aux + z

    class Block(nn.Module):
        def __init__(self, cfg, moe):
            super().__init__()
            d = cfg.d_model
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = Attention(d, cfg.n_heads)
            self.ffn = SwitchFFN(d, cfg.d_ff, cfg.num_experts, cfg.capacity_factor,
                                 cfg.aux_loss_coef, cfg.z_loss_coef) if moe \
                else MLP(d, cfg.d_ff)

        def forward(self, x, cache=None, start=0):
            x = x + self.attn(self.ln1(x), cache, start)
            h, aux = self.ffn(self.ln2(x))
            return x + h, aux

    class LM(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg
            self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos = nn.Embedding(cfg.block_size, cfg.d_model)
            moe = set(cfg.moe_layer_ids)
            self.blocks = nn.ModuleList([Block(cfg, i in moe) for i in range(cfg.n_layers)])
            self.ln_f = nn.LayerNorm(cfg.d_model)

        def forward(self, ids, caches=None, start=0):
            T = ids.shape[1]
            x = self.tok(ids) + self.pos(torch.arange(start, start + T))
            aux = []
            for i, b in enumerate(self.blocks):
                x, a = b(x, None if caches is None else caches[i], start)
                if a is not None:
                    aux.append(a)
            return self.ln_f(x) @ self.tok.weight.T, aux  # (B, L, V) tied embeddings

        def loss(self, ids, targets):
            logits, aux = self(ids)
            ce = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
            return ce + torch.stack(aux).sum()

    return LM


def torch_name(name: str) -> tuple[str, bool]:
    """tinymoe parameter name -> (PyTorch name, transpose?): nn.Linear stores (out, in)."""
    for part in ("router.", "experts."):
        name = name.replace("ffn." + part, "ffn.")
    linear = name.endswith(".weight") and (".qkv." in name or ".proj." in name
                                           or ".fc1." in name or ".fc2." in name)
    return name, linear


def torch_model(torch, model: Transformer):
    """The PyTorch LM with ``model``'s weights, and its fused AdamW."""
    lm = torch_classes(torch)(model.cfg)
    params = dict(lm.named_parameters())
    names = set(params)
    with torch.no_grad():
        for name, p in model.named_parameters():
            tname, transpose = torch_name(name)
            value = torch.from_numpy(np.ascontiguousarray(p.data.T if transpose else p.data))
            params[tname].copy_(value)
            names.discard(tname)
    if names:
        raise AssertionError(f"bench_lm_step: PyTorch parameters without a tinymoe weight: "
                             f"{sorted(names)}")
    opt = torch.optim.AdamW(lm.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    return lm, opt


def torch_step(torch, lm, opt, ids, targets, grads: bool = False):
    opt.zero_grad(set_to_none=True)
    loss = lm.loss(ids, targets)
    loss.backward()
    out = {"loss": float(loss.detach())}
    if grads:
        out["grads"] = {n: p.grad.numpy().copy() for n, p in lm.named_parameters()}
    opt.step()
    return out


# --- generation ---------------------------------------------------------------------------
def torch_generate(torch, lm, ids: np.ndarray, new: int) -> np.ndarray:
    """Greedy decoding with a KV cache of (B, H, L + new, d_h) per layer."""
    cfg = lm.cfg
    B, L = ids.shape
    H, d_h = cfg.n_heads, cfg.d_model // cfg.n_heads
    caches = [(torch.zeros(B, H, L + new, d_h), torch.zeros(B, H, L + new, d_h))
              for _ in range(cfg.n_layers)]
    out = torch.from_numpy(ids)
    step, start = out, 0
    with torch.inference_mode():
        for _ in range(new):
            logits, _ = lm(step, caches, start)  # (B, T_new, V)
            start += step.shape[1]
            step = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            out = torch.cat([out, step], dim=1)
    return out.numpy()


# --- correctness first --------------------------------------------------------------------
def check_agreement(torch, batch: int = 2, new: int = 32, rtol: float = 2e-4) -> dict:
    """Loss, gradients and updated weights of one step, and greedy tokens, must agree."""
    cfg = make_config()
    model, opt = tinymoe_model(cfg)
    lm, topt = torch_model(torch, model)
    ids, targets = make_batch(cfg, batch)
    a = tinymoe_step(model, opt, ids, targets, grads=True)
    b = torch_step(torch, lm, topt, torch.from_numpy(ids), torch.from_numpy(targets), True)
    if abs(a["loss"] - b["loss"]) > rtol * abs(a["loss"]):
        raise AssertionError(f"bench_lm_step: first-step loss tinymoe {a['loss']:.7g} vs "
                             f"PyTorch {b['loss']:.7g}")
    tparams = dict(lm.named_parameters())
    worst = {"grad": 0.0, "param": 0.0}
    for name, p in model.named_parameters():
        tname, transpose = torch_name(name)
        for kind, mine, theirs in (("grad", a["grads"][name], b["grads"][tname]),
                                   ("param", p.data, tparams[tname].detach().numpy())):
            theirs = theirs.T if transpose else theirs
            scale = float(np.max(np.abs(mine))) or 1.0
            err = float(np.max(np.abs(mine - theirs))) / scale
            worst[kind] = max(worst[kind], err)
            # a gradient near 0 makes Adam's first step lr·sign(g): compare updates loosely
            tol = rtol if kind == "grad" else 5e-2 * LR / scale + rtol
            if err > tol:
                raise AssertionError(f"bench_lm_step: {kind} of {name} differs: max |diff| / "
                                     f"max |x| = {err:.3g} > {tol:.3g}")
    model.eval()
    lm.eval()
    prompt = make_batch(cfg, 2, seed=5)[0][:, :16]
    mine = generate(model, prompt, new, temperature=0)
    theirs = torch_generate(torch, lm, prompt, new)
    same = float(np.mean(mine == theirs))
    if same < 1.0:
        raise AssertionError(f"bench_lm_step: greedy tokens agree at {same:.0%} of positions")
    return {"loss_tinymoe": a["loss"], "loss_torch": b["loss"],
            "max_rel_grad_diff": worst["grad"], "max_rel_param_diff": worst["param"]}


# --- memory, in a fresh process per implementation ---------------------------------------
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(impl: str, batch: int) -> dict:
    """Peak resident memory of one training step above the warmed-up baseline, MiB."""
    cfg = make_config()
    model, opt = tinymoe_model(cfg)
    ids, targets = make_batch(cfg, batch)
    if impl == "tinymoe":
        step = lambda: tinymoe_step(model, opt, ids, targets)  # noqa: E731
    else:
        import torch
        torch.set_num_threads(2)
        lm, topt = torch_model(torch, model)
        del model, opt
        ti, tt = torch.from_numpy(ids), torch.from_numpy(targets)
        step = lambda: torch_step(torch, lm, topt, ti, tt)  # noqa: E731
    for _ in range(2):
        step()
    gc.collect()
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    peak = _rss_kib("VmHWM")
    return {"impl": impl, "baseline_mib": base / 1024, "peak_mib": (peak - base) / 1024}


def measure_memory(impl: str, batch: int) -> dict | None:
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    env.pop("NUMBA_DISABLE_JIT", None)
    out = subprocess.run([sys.executable, __file__, "--memory-worker", impl, str(batch)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- the run ------------------------------------------------------------------------------
def with_threads(torch, n: int, fn):
    def run():
        torch.set_num_threads(n)
        return fn()
    return run


def matmul_flops(cfg: TransformerConfig, batch: int) -> int:
    """Floating-point operations of the matrix products in one training step, from the
    model's shapes (2 per multiply-add; backward = twice forward: one product for each
    operand's gradient). Per layer, T = batch x context tokens: Q, K, V and the output
    projection 8 T d^2; scores and their weighting of V 4 T L d (all L x L, the causal mask
    applied after); the FFN 4 T d d_ff (top-1: one expert per token, every token counted;
    tokens dropped at capacity skip it); the router 2 T d E; then the tied output layer
    2 T d V."""
    T, d, L = batch * cfg.block_size, cfg.d_model, cfg.block_size
    moe_layers = sum(1 for i in range(cfg.n_layers) if cfg.kind != "dense"
                     and i % cfg.moe_every == cfg.moe_every - 1)
    forward = (cfg.n_layers * (8 * T * d * d + 4 * T * L * d + 4 * T * d * cfg.d_ff)
               + moe_layers * 2 * T * d * cfg.num_experts + 2 * T * d * cfg.vocab_size)
    return 3 * forward


def sgemm_yardstick(torch, cfg: TransformerConfig, batch: int) -> dict:
    """One (T, d) @ (d, d_ff) float32 product, the step's largest shape: NumPy (OpenBLAS,
    its default threads) and PyTorch at one and two threads."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((batch * cfg.block_size, cfg.d_model)).astype(np.float32)
    b = rng.standard_normal((cfg.d_model, cfg.d_ff)).astype(np.float32)
    fns = {"sgemm-numpy": lambda: a @ b}
    if torch is not None:
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        for n in (1, 2):
            fns[f"sgemm-torch-{n}t"] = with_threads(torch, n, lambda: ta @ tb)
    return fns


def tinymoe_steps(batch: int, prompt_len: int, new: int) -> dict:
    """tinymoe's timed calls (run in the step worker, a process without PyTorch): a
    training step at ``batch``, greedy generation at batch 1 and 16."""
    cfg = make_config()
    model, opt = tinymoe_model(cfg)
    ids, targets = make_batch(cfg, batch)
    gen_model, _ = tinymoe_model(cfg)
    gen_model.eval()
    steps = {"train": lambda: tinymoe_step(model, opt, ids, targets)}
    for b in GEN_BATCHES:
        prompt = make_batch(cfg, b, seed=7)[0][:, :prompt_len]
        steps[f"generate-{b}"] = lambda p=prompt: generate(gen_model, p, new, temperature=0)
    return steps


def time_training(torch, batch: int, repeats: int, worker: StepWorker) -> dict:
    cfg = make_config()
    fns = {"tinymoe": worker.step("train")}
    ids, targets = make_batch(cfg, batch)
    if torch is not None:
        ti, tt = torch.from_numpy(ids), torch.from_numpy(targets)
        for n in (1, 2):
            lm, topt = torch_model(torch, tinymoe_model(cfg)[0])
            fns[f"torch-{n}t"] = with_threads(
                torch, n, lambda lm=lm, topt=topt: torch_step(torch, lm, topt, ti, tt))
    fns.update(sgemm_yardstick(torch, cfg, batch))  # in the same rounds as the steps
    t = interleaved_medians(fns, repeats=repeats, warmup=2,
                            prepare={name: warmed(fn) for name, fn in fns.items()})
    sgemm_flops = 2 * batch * cfg.block_size * cfg.d_model * cfg.d_ff
    sgemm = {n.removeprefix("sgemm-"): sgemm_flops / t.pop(n) / 1e9 for n in list(t)
             if n.startswith("sgemm-")}
    tokens = batch * cfg.block_size
    return {"batch": batch, "tokens_per_step": tokens,
            "seconds": t, "tokens_per_s": {n: tokens / s for n, s in t.items()},
            "matmul_flops": matmul_flops(cfg, batch), "sgemm_gflops": sgemm}


def matmul_floor(tr: dict) -> dict:
    """The step's matrix products at the best sgemm rate of the run: a floor for any step
    that multiplies with that BLAS, and what it leaves for the rest of the step."""
    peak = max(tr["sgemm_gflops"].values())
    floor = tr["matmul_flops"] / (peak * 1e9)
    out = {"peak_gflops": peak, "floor_s": floor,
           "gflops": {n: tr["matmul_flops"] / s / 1e9 for n, s in tr["seconds"].items()}}
    if "fastest_torch" in tr:
        out["room_s"] = tr["seconds"][tr["fastest_torch"]] - floor
        out["rest_s"] = tr["seconds"]["tinymoe"] - floor
    return out


def time_generation(torch, batch: int, prompt_len: int, new: int, repeats: int,
                    worker: StepWorker) -> dict:
    cfg = make_config()
    model, _ = tinymoe_model(cfg)
    model.eval()
    prompt = make_batch(cfg, batch, seed=7)[0][:, :prompt_len]
    fns = {"tinymoe": worker.step(f"generate-{batch}")}
    if torch is not None:
        lm, _ = torch_model(torch, model)
        lm.eval()
        for n in (1, 2):
            fns[f"torch-{n}t"] = with_threads(torch, n,
                                              lambda: torch_generate(torch, lm, prompt, new))
    t = interleaved_medians(fns, repeats=repeats, warmup=1,
                            prepare={name: warmed(fn) for name, fn in fns.items()})
    return {"batch": batch, "prompt": prompt_len, "new_tokens": new, "seconds": t,
            "tokens_per_s": {n: batch * new / s for n, s in t.items()}}


PROFILE_GROUPS = (  # (label, substrings of the profiled function's file or name)
    ("matrix products (BLAS)", ("ops/linalg.py", "/moe/experts.py")),
    ("GELU (erf, exp)", ("ops/special.py", "ops/activations.py", "ufunc/dufunc.py")),
    ("softmax, log-softmax", ("ops/softmax.py",)),
    ("other element-wise ops", ("ops/elementwise.py", "ops/shape.py", "ops/indexing.py")),
    ("reductions (sum, mean, max)", ("ops/reductions.py", "'reduce'", "_methods.py")),
    ("routing and dispatch", ("/dispatch/", "/moe/")),
    ("AdamW", ("optim.py",)),
    ("autograd bookkeeping", ("autograd.py", "tensor.py", "nn/module.py")),
)


def profile_training(batch: int, steps: int = 3) -> list[dict]:
    """CPU seconds per step (all threads) of tinymoe's training step by kind of work
    (cProfile's own time per function, grouped by file), largest first."""
    import cProfile
    import pstats

    cfg = make_config()
    model, opt = tinymoe_model(cfg)
    ids, targets = make_batch(cfg, batch)
    for _ in range(2):
        tinymoe_step(model, opt, ids, targets)
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    for _ in range(steps):
        tinymoe_step(model, opt, ids, targets)
    prof.disable()
    groups: dict[str, float] = {}
    for (file, line, name), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
        where = f"{file}:{line}({name})".replace("\\", "/")
        label = next((lab for lab, keys in PROFILE_GROUPS if any(k in where for k in keys)),
                     "everything else")
        groups[label] = groups.get(label, 0.0) + tottime / steps
    total = sum(groups.values())
    return [{"what": k, "ms": v * 1e3, "share": v / total}
            for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]


def summarise(times: dict) -> dict:
    """The faster PyTorch thread count, and tinymoe's time relative to it."""
    torch_times = {n: s for n, s in times.items() if n.startswith("torch")}
    if not torch_times:
        return {}
    best = min(torch_times, key=torch_times.get)
    return {"fastest_torch": best, "ratio_vs_fastest_torch": times["tinymoe"] / torch_times[best]}


def machine_text(m) -> str:
    if isinstance(m, str):
        return m
    return ", ".join(f"{k} {v}" for k, v in m.items() if v and not isinstance(v, dict))


def render(record: dict) -> str:
    """The Markdown section of docs/benchmarks.md for benchmarks/results/lm_step.json."""
    result, settings = record["results"], record["settings"]
    tr = result["training"]
    load = record.get("load_average", {}).get("start")
    lines = [f"One training step of the tiny Switch LM (batch {tr['batch']} x "
             f"{tr['tokens_per_step'] // tr['batch']} tokens), tinymoe vs the same model in "
             f"PyTorch eager (nanoGPT style, fused AdamW), medians of {settings['repeats']} "
             f"interleaved rounds; `{record['command']}` on {machine_text(record['machine'])}"
             f" ({record.get('date', '')}; load average {load} at start).", ""]
    rows = []
    for n, s in tr["seconds"].items():
        rows.append([n, f"{s * 1e3:.1f}", f"{tr['tokens_per_s'][n]:,.0f}",
                     f"{s / tr['seconds'][tr['fastest_torch']]:.2f}"
                     if "fastest_torch" in tr else "-"])
    lines.append(table(["implementation", "ms per step", "tokens/s", "vs fastest torch"],
                       rows))
    if "ratio_vs_fastest_torch" in tr:
        r = tr["ratio_vs_fastest_torch"]
        lines += ["", f"tinymoe / fastest PyTorch ({tr['fastest_torch']}) = {r:.2f}: target "
                      f"<= 1.0 {'met' if r <= 1.0 else 'NOT met'}."]
    if "sgemm_gflops" in tr:
        fl = matmul_floor(tr)
        lines += ["", f"Matrix products in one step, counted from the model's shapes: "
                      f"{tr['matmul_flops'] / 1e9:.2f} GFLOP ("
                      + ", ".join(f"{n} {g:.0f}" for n, g in fl["gflops"].items())
                      + " GFLOP/s over the whole step). One (T, d) @ (d, d_ff) sgemm in the "
                      "same rounds: " + ", ".join(f"{n} {g:.0f}" for n, g in
                                                  tr["sgemm_gflops"].items())
                      + f" GFLOP/s; at the best, {fl['peak_gflops']:.0f}, the step's "
                      f"products alone take {fl['floor_s'] * 1e3:.1f} ms."]
        if "room_s" in fl:
            lines[-1] += (f" That leaves {fl['room_s'] * 1e3:.1f} ms of the fastest "
                          f"PyTorch step for everything else; tinymoe's step exceeds the "
                          f"floor by {fl['rest_s'] * 1e3:.1f} ms.")
    mem = result.get("memory") or {}
    if mem:
        lines += ["", "Peak memory of one step above the warmed-up baseline (fresh process "
                      "each): " + ", ".join(f"{n} {m['peak_mib']:.0f} MiB"
                                            for n, m in mem.items()) + "."]
    grow = [[g["batch"], g["prompt"], g["new_tokens"], n, f"{tps:,.0f}",
             f"{g['seconds'][n] / g['seconds'][g['fastest_torch']]:.2f}"
             if "fastest_torch" in g else "-"]
            for g in result["generation"] for n, tps in g["tokens_per_s"].items()]
    lines += ["", "Greedy generation with a KV cache (tokens/s = batch x new tokens / s):", "",
              table(["batch", "prompt", "new", "implementation", "tokens/s",
                     "time vs fastest torch"], grow)]
    prof = result.get("profile")
    if prof:
        lines += ["", "Where tinymoe's step goes (cProfile's own time per function, CPU ms "
                      "per step over all threads; the profiler inflates the Python-heavy "
                      "rows):", "",
                  table(["work", "ms", "share"], [[p["what"], f"{p['ms']:.1f}",
                                                   f"{p['share']:.0%}"] for p in prof])]
    ag = result.get("agreement")
    if ag:
        lines += ["", f"Agreement (checked before timing): first-step loss {ag['loss_tinymoe']:.6f}"
                      f" vs {ag['loss_torch']:.6f}; largest gradient difference "
                      f"{ag['max_rel_grad_diff']:.1e} of the gradient's scale; greedy tokens "
                      f"identical."]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 4, 3 repeats, no memory")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9)")
    ap.add_argument("--new", type=int, default=64, help="generated tokens (default 64)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=str(RESULTS), help="JSON results ('' : none)")
    ap.add_argument("--memory-worker", nargs=2, metavar=("IMPL", "BATCH"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--step-worker", nargs=3, type=int, metavar=("BATCH", "PROMPT", "NEW"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step_worker:
        steps = tinymoe_steps(*args.step_worker)
        for step in steps.values():  # warm up (and compile) before the first timed call
            step()
        serve(steps)
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker[0], int(args.memory_worker[1]))))
        return
    torch = None if args.no_torch else TORCH
    batch = 4 if args.quick else args.batch
    repeats = args.repeats or (3 if args.quick else 9)
    new = 16 if args.quick else args.new
    settings = {"config": make_config().to_dict(), "lr": LR, "weight_decay": WEIGHT_DECAY,
                "batch": batch, "repeats": repeats, "new_tokens": new,
                "tinymoe_threads": tm.threads.describe()["mode"]}
    load_start = os.getloadavg()[0]
    result: dict = {}
    print(f"machine: {machine()}; load average {load_start:.2f}")
    if torch is not None:
        result["agreement"] = check_agreement(torch)
        print(f"agreement: {result['agreement']}")
    t0 = time.perf_counter()
    worker = StepWorker(__file__, batch, PROMPT_LEN, new)
    tr = time_training(torch, batch, repeats, worker)
    tr.update(summarise(tr["seconds"]))
    result["training"] = tr
    print("training step: " + ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in
                                       tr["seconds"].items())
          + (f"; tinymoe / {tr['fastest_torch']} = {tr['ratio_vs_fastest_torch']:.2f}"
             if "fastest_torch" in tr else ""), flush=True)
    if not (args.quick or args.no_memory):
        impls = ["tinymoe"] + (["torch"] if torch is not None else [])
        result["memory"] = {n: measure_memory(n, batch) for n in impls}
        print("memory: " + ", ".join(f"{n} {m['peak_mib']:.0f} MiB" for n, m in
                                     result["memory"].items() if m), flush=True)
    if not args.quick:
        result["profile"] = profile_training(batch)
        print("profile (CPU ms per step): " + ", ".join(
            f"{p['what']} {p['ms']:.0f}" for p in result["profile"]), flush=True)
    result["generation"] = []
    for b in GEN_BATCHES:
        g = time_generation(torch, b, PROMPT_LEN, new, max(3, repeats // 2), worker)
        g.update(summarise(g["seconds"]))
        result["generation"].append(g)
        print(f"generation batch {b}: " + ", ".join(f"{n} {v:,.0f} tok/s" for n, v in
                                                    g["tokens_per_s"].items()), flush=True)
    worker.close()
    result["seconds_total"] = time.perf_counter() - t0
    argv_used = sys.argv[1:] if argv is None else list(argv)
    if args.out:
        out = Path(args.out)
        path = write_result(out.stem, argv_used, settings, result, load_start=load_start,
                            folder=out.parent)
        record = json.loads(path.read_text())
        print(f"\nwrote {path}")
    else:
        record = {"command": "python benchmarks/bench_lm_step.py " + " ".join(argv_used),
                  "machine": machine(), "settings": settings, "results": result,
                  "load_average": {"start": load_start}}
    print()
    print(render(record))


if __name__ == "__main__":
    main()
