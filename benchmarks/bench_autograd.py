"""Autograd core speed: per-op overhead and an MLP training step.

    python benchmarks/bench_autograd.py [--quick]     # writes benchmarks/results/autograd.json

1. Per-op overhead: a chain of small ops (8x8 float32: mul, add, tanh) run forward and
   backward; microseconds per op for tinymoe, hand-written NumPy (forward plus a hand-coded
   backward, no graph at all) and PyTorch eager (when installed).
2. An MLP training step: float32, batch 4096, 256 -> 1024 -> 256 with ReLU, MSE loss,
   forward + backward + SGD update; milliseconds per step for the same three.

Medians over repeats, timed in alternating rounds in one process, each timed call after untimed ones
(benchmarks/_worker.py). PyTorch is timed with ``torch.set_num_threads(1)`` and ``(2)`` in
the same rounds; the faster is reported. Issue targets: per-op overhead within 1.5x of
PyTorch, MLP step within 1.2x.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (interleaved_medians, load_average, machine_line, table,  # noqa: E402
                     try_torch, write_result)
from _worker import warmed  # noqa: E402

import tinymoe as tm  # noqa: E402


# --- 1. per-op overhead --------------------------------------------------------------------
def chain_tinymoe(n_links: int, x0: np.ndarray, a: np.ndarray, b: np.ndarray):
    def run():
        x = tm.tensor(x0, requires_grad=True)
        at, bt = tm.Tensor(a), tm.Tensor(b)
        y = x
        for _ in range(n_links):
            y = (y * at + bt).tanh()
        y.sum().backward()
        return x.grad
    return run


def chain_numpy(n_links: int, x0: np.ndarray, a: np.ndarray, b: np.ndarray):
    def run():
        y, saved = x0, []
        for _ in range(n_links):
            y = np.tanh(y * a + b)
            saved.append(y)
        g = np.ones_like(x0)
        for y in reversed(saved):
            g = g * (1 - y * y)   # tanh backward
            g = g * a             # mul backward (add passes through)
        return g
    return run


def chain_torch(torch, n_links: int, x0: np.ndarray, a: np.ndarray, b: np.ndarray):
    at, bt = torch.from_numpy(a), torch.from_numpy(b)

    def run():
        x = torch.tensor(x0, requires_grad=True)
        y = x
        for _ in range(n_links):
            y = (y * at + bt).tanh()
        y.sum().backward()
        return x.grad
    return run


# --- 2. MLP training step --------------------------------------------------------------------
def mlp_numpy(X, Y, W1, b1, W2, b2, lr):
    W1, b1, W2, b2 = (p.copy() for p in (W1, b1, W2, b2))

    def step():
        h_pre = X @ W1 + b1                       # (B, 1024)
        h = np.maximum(h_pre, 0)
        out = h @ W2 + b2                         # (B, 256)
        d = out - Y
        loss = np.mean(d * d)
        g_out = (2.0 / d.size) * d                # dL/dout
        gW2, gb2 = h.T @ g_out, g_out.sum(0)
        g_h = (g_out @ W2.T) * (h_pre > 0)
        gW1, gb1 = X.T @ g_h, g_h.sum(0)
        for p, g in ((W1, gW1), (b1, gb1), (W2, gW2), (b2, gb2)):
            p -= lr * g
        return loss
    return step


def mlp_tinymoe(X, Y, W1, b1, W2, b2, lr):
    params = [tm.nn.Parameter(p.copy()) for p in (W1, b1, W2, b2)]
    opt = tm.optim.SGD(params, lr=lr)
    x, y = tm.Tensor(X), tm.Tensor(Y)

    def step():
        w1, c1, w2, c2 = params
        out = (x @ w1 + c1).relu() @ w2 + c2
        loss = tm.functional.mse(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss
    return step


def mlp_torch(torch, X, Y, W1, b1, W2, b2, lr):
    params = [torch.tensor(p.copy(), requires_grad=True) for p in (W1, b1, W2, b2)]
    opt = torch.optim.SGD(params, lr=lr)
    x, y = torch.from_numpy(X), torch.from_numpy(Y)

    def step():
        w1, c1, w2, c2 = params
        out = torch.relu(x @ w1 + c1) @ w2 + c2
        loss = torch.nn.functional.mse_loss(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss
    return step


def check_agreement(torch=None, rtol: float = 1e-4) -> list[str]:
    """Every implementation computes the same numbers before anything is timed: the chain's
    gradient wrt its input, and the losses of two MLP steps (the second after one update)."""
    rng = np.random.default_rng(1)
    x0, a, b = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3))
    chains = {"tinymoe": chain_tinymoe(20, x0, a, b), "NumPy by hand": chain_numpy(20, x0, a, b)}
    B, d, h = 64, 16, 32
    X, Y = (rng.standard_normal((B, d)).astype(np.float32) for _ in range(2))
    W1 = (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32)
    W2 = (rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32)
    b1, b2 = 0.1 * np.ones(h, np.float32), 0.1 * np.ones(d, np.float32)
    mlps = {"tinymoe": mlp_tinymoe(X, Y, W1, b1, W2, b2, 0.5),
            "NumPy by hand": mlp_numpy(X, Y, W1, b1, W2, b2, 0.5)}
    if torch is not None:
        chains["PyTorch eager"] = chain_torch(torch, 20, x0, a, b)
        mlps["PyTorch eager"] = mlp_torch(torch, X, Y, W1, b1, W2, b2, 0.5)

    def arr(v):
        v = v.detach() if hasattr(v, "detach") else v  # a PyTorch loss
        return np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float64)

    want_g = arr(chains["tinymoe"]())
    want_l = [arr(mlps["tinymoe"]()) for _ in range(2)]
    for name in chains:
        got_g = arr(chains[name]())
        got_l = [arr(mlps[name]()) for _ in range(2)] if name != "tinymoe" else want_l
        for what, got, want in (("chain gradient", got_g, want_g),
                                ("MLP losses", np.array(got_l), np.array(want_l))):
            err = float(np.max(np.abs(got - want)))
            if err > rtol * (float(np.max(np.abs(want))) or 1.0):
                raise AssertionError(f"bench_autograd: {name} disagrees with tinymoe on "
                                     f"{what}: max |diff| {err:.3g}")
    return list(chains)


def timed(fns: dict, torch, reps: int) -> dict:
    """Interleaved medians (seconds); the PyTorch entry at 1 and 2 threads."""
    prepare = {}
    if "PyTorch eager" in fns:
        fn = fns.pop("PyTorch eager")
        for n in (1, 2):
            fns[f"PyTorch eager/{n}t"] = fn
            prepare[f"PyTorch eager/{n}t"] = lambda n=n: torch.set_num_threads(n)
    prepare = {name: warmed(fn, prepare.get(name)) for name, fn in fns.items()}  # _worker.py
    t = interleaved_medians(fns, reps, prepare=prepare)
    if torch is not None:
        torch.set_num_threads(2)
    return t


def best_torch(t: dict) -> tuple[str | None, float | None]:
    variants = {k.partition("/")[2]: v for k, v in t.items() if k.startswith("PyTorch")}
    if not variants:
        return None, None
    best = min(variants, key=variants.get)
    return best, variants[best]


def render(result: dict) -> str:
    """The autograd section of docs/benchmarks.md from a result file (see README.md)."""
    r = result["results"]
    out = [f"Command: `{result['command']}`, {result['date']}, load average "
           f"{result['load_average']['start']} at the start and "
           f"{result['load_average']['end']} at the end. Machine: "
           f"{machine_line(result['machine'])}."
           + (f" Checked first: {', '.join(r['agreement'])} compute the same chain gradient "
              f"and MLP losses." if r.get("agreement") else ""), ""]
    for key, unit, title in (("per_op", "µs per op", r["per_op_title"]),
                             ("mlp", "ms per step", r["mlp_title"])):
        part = r[key]
        ref = part["tinymoe"]
        rows = []
        for name, v in part["times"].items():
            label = name
            if name.startswith("PyTorch"):
                label = f"{name} ({'faster' if name == part['torch_best'] else 'slower'})"
            rows.append([label, f"{v:.2f}" if key == "per_op" else f"{v:.1f}",
                         f"{v / ref:.2f}", f"{ref / v:.2f}"])
        out += [title, "", table(["implementation", unit, "vs tinymoe", "tinymoe / this"],
                                 rows), ""]
    if r["mlp"].get("ratio") is not None:
        po, ml = r["per_op"]["ratio"], r["mlp"]["ratio"]
        out += [f"Targets, against PyTorch's faster thread count: per-op overhead tinymoe / "
                f"PyTorch = {po:.2f} (target <= 1.5: {'met' if po <= 1.5 else 'not met'}); "
                f"MLP step tinymoe / PyTorch = {ml:.2f} (target <= 1.2: "
                f"{'met' if ml <= 1.2 else 'not met'})."]
    return "\n".join(out)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller sizes")
    ap.add_argument("--no-write", action="store_true",
                    help="do not write benchmarks/results/autograd.json")
    args = ap.parse_args(argv)
    load_start = load_average()
    torch = try_torch()
    agree = check_agreement(torch)
    print(f"agreement check: {', '.join(agree)} agree")
    rng = np.random.default_rng(0)
    reps = 3 if args.quick else 9

    n_links = 200
    x0, a, b = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3))
    n_ops = 3 * n_links + 1  # mul, add, tanh per link, plus the final sum
    runs = {"tinymoe": chain_tinymoe(n_links, x0, a, b),
            "NumPy by hand": chain_numpy(n_links, x0, a, b)}
    if torch:
        runs["PyTorch eager"] = chain_torch(torch, n_links, x0, a, b)
    per_op = {k: v / n_ops * 1e6 for k, v in timed(runs, torch, reps).items()}
    best, best_t = best_torch(per_op)
    per_op_res = {"times": per_op, "tinymoe": per_op["tinymoe"],
                  "torch_best": f"PyTorch eager/{best}" if best else None,
                  "ratio": per_op["tinymoe"] / best_t if best else None}

    B, d, h = (1024, 256, 1024) if args.quick else (4096, 256, 1024)
    X = rng.standard_normal((B, d)).astype(np.float32)
    Y = rng.standard_normal((B, d)).astype(np.float32)
    W1 = (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32)
    W2 = (rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32)
    b1, b2 = np.zeros(h, np.float32), np.zeros(d, np.float32)
    steps = {"tinymoe": mlp_tinymoe(X, Y, W1, b1, W2, b2, 1e-3),
             "NumPy by hand": mlp_numpy(X, Y, W1, b1, W2, b2, 1e-3)}
    if torch:
        steps["PyTorch eager"] = mlp_torch(torch, X, Y, W1, b1, W2, b2, 1e-3)
    ms = {k: v * 1e3 for k, v in timed(steps, torch, reps).items()}
    best, best_t = best_torch(ms)
    mlp_res = {"times": ms, "tinymoe": ms["tinymoe"],
               "torch_best": f"PyTorch eager/{best}" if best else None,
               "ratio": ms["tinymoe"] / best_t if best else None}
    results = {
        "per_op_title": f"Per-op overhead: chain of {n_links} x (mul, add, tanh) on 8x8 "
                        f"float32, forward + backward ({n_ops} ops)",
        "mlp_title": f"MLP training step: float32, batch {B}, {d}-{h}-{d}, ReLU, MSE, SGD "
                     f"(forward + backward + update)",
        "per_op": per_op_res, "mlp": mlp_res, "agreement": agree}
    settings = {"repeats": reps, "n_links": n_links, "batch": B, "d": d, "hidden": h}
    record = {"command": "python benchmarks/bench_autograd.py"
              + (" --quick" if args.quick else ""), "date": "(not written)",
              "load_average": {"start": load_start, "end": load_average()},
              "machine": {}, "results": results}
    if not args.no_write:
        path = write_result("autograd", argv, settings, results, load_start)
        record = json.loads(path.read_text())
        print(f"wrote {path.relative_to(path.parents[2])}\n")
    else:
        from _common import machine_info
        record["machine"] = machine_info()
    text = render(record)
    print(text)
    return text


if __name__ == "__main__":
    main()
