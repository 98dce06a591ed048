"""The probes of the trusted grader: for each task, instructor-chosen inputs and the call.

A probe has two halves that never meet in one process:

* ``cases(rng)`` runs in the **parent** (the grader): it draws the inputs of a few cases
  (typical ones and edge cases: ties, no tokens, far-away targets) from a seed chosen at
  grading time. Inputs are plain arrays.
* ``run(inputs, ns)`` runs in the **child** (:mod:`.child`), inside a tree where only the
  task's regions hold the student's code: it calls the function(s) the task's regions
  implement and returns plain arrays. Gradient tasks run ``backward`` with a fixed cotangent
  (part of the inputs) and return the gradients too.

The parent runs the same probe on the instructor's tree and compares every output with
``np.allclose(student, instructor, rtol, atol)`` (and equal shapes and dtype kinds).

Notebook tasks (regions in ``lessons/*.ipynb``) name their lesson and a mode: ``"cell"``
executes the exercise cell up to its ``### END SOLUTION`` line after ``setup`` defined the
variables the earlier cells of the lesson define; ``"defs"`` executes only the imports,
functions and classes the exercise cell defines. Either way the lesson's first code cell
(its imports) runs first and no other cell of the notebook runs. (A marker alone on a line of
this docstring would be a real one, so they are only named here.)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Probe:
    cases: Callable[[np.random.Generator], list[Arrays]]
    run: Callable[[Arrays, dict], Arrays]
    rtol: float = 1e-6
    atol: float = 1e-9
    notebook: str | None = None  # lessons/NN_name.ipynb for notebook exercises
    mode: str | None = None  # "cell" or "defs" for notebook exercises
    setup: Callable[[Arrays, dict], None] | None = None  # "cell" mode: the earlier cells
    preload: tuple[str, ...] = ()  # third-party modules the child imports before dropping


# --- helpers (child side) ---------------------------------------------------------------------
def _t(a, grad=True):
    import tinymoe as tm
    return tm.tensor(np.array(a), requires_grad=grad)


def _np(x) -> np.ndarray:
    return np.array(getattr(x, "data", x))


def _backward(out, cot, **leaves) -> Arrays:
    """``out`` and the gradients of ``leaves`` after ``out.backward(cot)``."""
    res = {"out": _np(out)}
    out.backward(np.asarray(cot, dtype=out.dtype).reshape(out.shape) if out.ndim else None)
    for name, leaf in leaves.items():
        g = leaf.grad
        res[f"grad_{name}"] = np.zeros(leaf.shape) if g is None else _np(g)
    return res


def _scalar_cot(rng):
    return np.array(1.0)


# --- lesson 00 (notebook) -----------------------------------------------------------------------
def _cases_0_1(rng):
    out = []
    for shape in [(3,), (2, 4), (1,)]:
        out.append({"a": rng.standard_normal(shape), "b": rng.standard_normal(shape),
                    "c": rng.standard_normal(shape)})
    out.append({"a": np.zeros(3), "b": np.zeros(3), "c": np.array([0.0, 20.0, -20.0])})
    return out


def _setup_0_1(inp, ns):
    a, b, c = _t(inp["a"]), _t(inp["b"]), _t(inp["c"])
    f = (a * b + c).tanh().sum()
    f.backward()
    ns.update(a=a, b=b, c=c, f=f)


def _run_0_1(inp, ns):
    return {k: np.asarray(ns[k], dtype=float) for k in ("grad_a", "grad_b", "grad_c")}


def _cases_0_2(rng):
    return [{"x": x, "cot": rng.standard_normal(x.shape)}
            for x in (rng.standard_normal(7), rng.standard_normal((3, 2)) * 4,
                      np.array([-30.0, 0.0, 30.0]))]


def _run_0_2(inp, ns):
    x = _t(inp["x"])
    return _backward(ns["Swish"].apply(x), inp["cot"], x=x)


def _cases_0_3(rng):
    return [{"x": rng.standard_normal((3, 2)), "c": rng.standard_normal((3, 2))},
            {"x": rng.standard_normal(4), "c": rng.standard_normal(4)}]


def _run_0_3(inp, ns):
    c = inp["c"]

    def L(w):
        return float(np.sum(np.sin(w) * c) + 0.1 * np.sum(w ** 3))

    x = inp["x"].copy()
    return {"grad": np.asarray(ns["numerical_gradient"](L, x), dtype=float), "x_after": x}


# --- lesson 01 ------------------------------------------------------------------------------------
def _mixture_cases(rng):
    out = []
    for n, E, D, scale in [(5, 3, 2, 1.0), (4, 2, 1, 1.0), (3, 3, 2, 40.0)]:
        out.append({"gate_logits": rng.standard_normal((n, E)),
                    "expert_outputs": rng.standard_normal((n, E, D)) * scale,
                    "target": rng.standard_normal((n, D)), "cot": rng.standard_normal(n)})
    return out


def _run_1_1(inp, ns):
    from tinymoe.moe.mixture import mixture_nll
    res = {}
    for red in ("mean", "none"):
        g, o = _t(inp["gate_logits"]), _t(inp["expert_outputs"])
        out = mixture_nll(g, o, inp["target"], reduction=red)
        cot = 1.0 if red == "mean" else inp["cot"]
        res.update({f"{red}_{k}": v for k, v in
                    _backward(out, cot, gate_logits=g, expert_outputs=o).items()})
    return res


def _cases_1_2(rng):
    out = _mixture_cases(rng)
    for c in out:
        c["cot"] = rng.standard_normal(c["gate_logits"].shape)
    n, E, C = 4, 3, 5
    out.append({"gate_logits": rng.standard_normal((n, E)),
                "expert_outputs": rng.standard_normal((n, E, C)),
                "target": rng.integers(0, C, n), "cot": rng.standard_normal((n, E))})
    return out


def _run_1_2(inp, ns):
    from tinymoe.moe.mixture import posterior_responsibilities
    g, o = _t(inp["gate_logits"]), _t(inp["expert_outputs"])
    like = "categorical" if inp["target"].dtype.kind == "i" else "gaussian"
    h = posterior_responsibilities(g, o, inp["target"], likelihood=like)
    return _backward(h, inp["cot"], gate_logits=g, expert_outputs=o)


def _setup_1_3(inp, ns):
    ns.update(gate_logits=_t(inp["gate_logits"]), outputs=_t(inp["expert_outputs"]),
              target=inp["target"])


def _run_1_3(inp, ns):
    return {"grad_by_hand": np.asarray(ns["grad_by_hand"], dtype=float)}


# --- lesson 02 ------------------------------------------------------------------------------------
def _hme_cases(rng):
    out = []
    for n in (20, 7):
        X = rng.uniform(-1, 1, (n, 2))
        Y = np.sin(3 * X[:, :1]) + X[:, 1:] + 0.1 * rng.standard_normal((n, 1))
        out.append({"X": X, "Y": Y, "seed": np.array(int(rng.integers(1 << 30)))})
    X = rng.uniform(-1, 1, (5, 2))
    out.append({"X": X, "Y": np.full((5, 1), 30.0), "seed": np.array(3)})  # far targets
    return out


def _tree(inp):
    from tinymoe.moe.hme import HME
    return HME(2, 1, 2, 2, expert="gaussian", variance=float(np.var(inp["Y"]) + 0.5),
               rng=int(inp["seed"]), gate_scale=1.0)


def _run_2_1(inp, ns):
    post = _tree(inp).posteriors(inp["X"], inp["Y"])
    return {"h_top": post.h_top, "h_low": post.h_low, "h": post.h}


def _cases_2_2(rng):
    out = []
    for n, d, D, ridge in [(12, 3, 2, 0.0), (6, 3, 1, 0.5)]:
        w = rng.uniform(0, 1, n)
        w[0] = 0.0
        out.append({"X": rng.standard_normal((n, d)), "Y": rng.standard_normal((n, D)),
                    "w": w, "ridge": np.array(ridge)})
    return out


def _run_2_2(inp, ns):
    from tinymoe.moe.hme import weighted_least_squares
    return {"B": weighted_least_squares(inp["X"], inp["Y"], inp["w"], float(inp["ridge"]))}


def _cases_2_3(rng):
    out = []
    for n, d, K, ridge in [(15, 3, 2, 1e-4), (10, 2, 3, 0.1)]:
        T = rng.dirichlet(np.ones(K), n)
        out.append({"X": rng.standard_normal((n, d)), "T": T, "w": rng.uniform(0.1, 1, n),
                    "V": 0.3 * rng.standard_normal((d, K)), "ridge": np.array(ridge)})
    return out


def _run_2_3(inp, ns):
    from tinymoe.moe.hme import irls_softmax_step
    return {"V_new": irls_softmax_step(inp["X"], inp["T"], inp["w"], inp["V"],
                                       float(inp["ridge"]))}


def _run_2_4(inp, ns):
    from tinymoe.moe.hme import em_step
    tree = _tree(inp)
    res = {}
    for it in range(2):
        res[f"iter{it}_newton_steps"] = np.array(em_step(tree, inp["X"], inp["Y"]))
        for name, p in tree.named_parameters():
            res[f"iter{it}_{name}"] = _np(p).copy()
    return res


# --- lesson 03 ------------------------------------------------------------------------------------
def _cases_3_1(rng):
    out = []
    for T, d, E, k in [(6, 4, 5, 2), (4, 3, 4, 1), (3, 2, 3, 3)]:
        out.append({"x": rng.standard_normal((T, d)), "W_g": rng.standard_normal((d, E)),
                    "W_noise": rng.standard_normal((d, E)), "noise": rng.standard_normal((T, E)),
                    "k": np.array(k), "cot_H": rng.standard_normal((T, E)),
                    "cot_sigma": rng.standard_normal((T, E)),
                    "cot_w": rng.standard_normal((T, k))})
    return out


def _run_3_1(inp, ns):
    from tinymoe.moe.noisy_topk import keep_top_k_softmax, noisy_logits
    x, Wg, Wn = _t(inp["x"]), _t(inp["W_g"]), _t(inp["W_noise"])
    clean, H, sigma = noisy_logits(x, Wg, Wn, inp["noise"])
    loss = (H * _t(inp["cot_H"], False)).sum() + (sigma * _t(inp["cot_sigma"], False)).sum()
    res = _backward(loss, 1.0, x=x, W_g=Wg, W_noise=Wn)
    res.update(H=_np(H), sigma=_np(sigma))
    Hk = _t(inp["noise"])
    idx, w, top = keep_top_k_softmax(Hk, int(inp["k"]))
    res.update({f"topk_{k}": v for k, v in _backward(
        (w * _t(inp["cot_w"], False)).sum(), 1.0, H=Hk).items()})
    res.update(topk_index=np.asarray(idx), topk_weight=_np(w), topk_values=_np(top))
    return res


def _threshold_cases(rng):
    out = []
    for T, E, k in [(6, 5, 2), (4, 4, 1), (5, 4, 3)]:
        out.append({"H": rng.standard_normal((T, E)), "clean": rng.standard_normal((T, E)),
                    "sigma": rng.uniform(0.1, 2, (T, E)), "k": np.array(k),
                    "cot": rng.standard_normal((T, E))})
    ties = np.array([[1.0, 1.0, 1.0, 0.0], [2.0, 0.5, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    out.append({"H": ties, "clean": ties + 0.25, "sigma": np.ones_like(ties), "k": np.array(2),
                "cot": rng.standard_normal(ties.shape)})
    return out


def _run_3_2(inp, ns):
    import tinymoe.ops as ops
    from tinymoe.moe.noisy_topk import kth_excluding_top
    k = int(inp["k"])
    H = _t(inp["H"])
    top, _ = ops.topk(H, k + 1, axis=1)
    return _backward(kth_excluding_top(H, top, k), inp["cot"], H=H)


def _run_3_3(inp, ns):
    import tinymoe.ops as ops
    from tinymoe.moe.noisy_topk import prob_in_top_k
    k = int(inp["k"])
    H, clean, sigma = _t(inp["H"]), _t(inp["clean"]), _t(inp["sigma"])
    top, _ = ops.topk(H, k + 1, axis=1)
    return _backward(prob_in_top_k(clean, H, sigma, top, k), inp["cot"], H=H, clean=clean,
                     sigma=sigma)


# --- lesson 04 ------------------------------------------------------------------------------------
def _cases_4_1(rng):
    out = []
    for T, E, k, C, S in [(12, 4, 2, 3, None), (12, 3, 1, 2, 4), (8, 4, 2, 8, 8),
                          (0, 3, 2, 1, None)]:
        out.append({"expert_index": rng.integers(0, E, (T, k)), "E": np.array(E),
                    "C": np.array(C), "S": np.array(-1 if S is None else S),
                    "active": rng.uniform(size=(T, k)) < 0.8})
    out.append({"expert_index": np.zeros((6, 2), dtype=np.int64), "E": np.array(2),
                "C": np.array(4), "S": np.array(-1), "active": np.ones((6, 2), bool)})
    return out


def _run_4_1(inp, ns):
    from tinymoe.moe.capacity import capacity_positions, expert_capacity
    grid = [(T, E, cf, k) for T in (0, 1, 10, 64) for E in (1, 4, 8) for cf in (0.5, 1.0, 1.25)
            for k in (1, 2) if k <= E]
    S = int(inp["S"])
    res = {"capacity": np.array([expert_capacity(*g[:3], k=g[3]) for g in grid])}
    for act in (None, inp["active"]):
        pos, counts = capacity_positions(inp["expert_index"], int(inp["E"]), int(inp["C"]),
                                         active=act, group_size=None if S < 0 else S)
        tag = "all" if act is None else "active"
        res[f"{tag}_position"], res[f"{tag}_counts"] = pos, counts
    return res


def _cases_4_2(rng):
    out = []
    for shape in [(8, 4), (2, 6, 3)]:
        p = rng.dirichlet(np.ones(shape[-1]), shape[:-1])
        out.append({"probs": p, "expert_index": p.argmax(-1)})
    p = np.full((5, 4), 0.25)
    out.append({"probs": p, "expert_index": np.zeros(5, dtype=np.int64)})
    return out


def _run_4_2(inp, ns):
    from tinymoe.moe.aux_losses import load_balancing_loss
    p = _t(inp["probs"])
    return _backward(load_balancing_loss(p, inp["expert_index"]), None, probs=p)


def _cases_4_3(rng):
    return [{"logits": rng.standard_normal((6, 4))},
            {"logits": rng.standard_normal((2, 3, 5)) * 3},
            {"logits": np.array([[800.0, 799.0, -5.0], [0.0, 0.0, 0.0]])}]


def _run_4_3(inp, ns):
    from tinymoe.moe.aux_losses import router_z_loss
    z = _t(inp["logits"])
    return _backward(router_z_loss(z), None, logits=z)


# --- lesson 05 ------------------------------------------------------------------------------------
def _cases_5(rng):
    out = []
    for T, E, k, B, C in [(10, 4, 2, 3, -1), (10, 4, 2, 8, 3), (7, 3, 1, 1, 1),
                          (0, 3, 2, 4, 2), (6, 3, 2, 30, -1)]:
        out.append({"expert_index": rng.integers(0, E, (T, k)), "E": np.array(E),
                    "B": np.array(B), "C": np.array(C)})
    out.append({"expert_index": np.zeros((5, 2), dtype=np.int64), "E": np.array(2),
                "B": np.array(2), "C": np.array(-1)})
    return out


def _run_5_1(inp, ns):
    from tinymoe.dispatch import kernels, reference
    e, E, B = inp["expert_index"], int(inp["E"]), int(inp["B"])
    return {"numpy_counts": reference.block_counts(e, E, B),
            "numba_counts": kernels.block_counts(e, E, B)}


def _run_5_2(inp, ns):
    from tinymoe.dispatch import kernels, reference
    e, E, B, C = inp["expert_index"], int(inp["E"]), int(inp["B"]), int(inp["C"])
    counts = reference.block_counts(e, E, B)
    pos, total = kernels.assign_positions_parallel(e, E, None if C < 0 else C, B)
    return {"numpy_starts": reference.block_starts(counts),
            "numba_starts": kernels.block_starts(counts), "position": pos, "counts": total}


# --- lesson 06 ------------------------------------------------------------------------------------
def _cases_6_1(rng):
    out = []
    for T, E, k in [(8, 4, 2), (5, 6, 3), (4, 3, 1)]:
        p = rng.dirichlet(np.ones(E), T)
        out.append({"probs": p, "expert_index": np.argsort(-p, axis=1)[:, :k],
                    "k": np.array(k), "cot": rng.standard_normal((T, k))})
    p = np.array([[0.25, 0.25, 0.25, 0.25], [0.4, 0.2, 0.2, 0.2]])
    out.append({"probs": p, "expert_index": np.array([[0, 1], [0, 1]]), "k": np.array(2),
                "cot": rng.standard_normal((2, 2))})
    return out


def _run_6_1(inp, ns):
    from tinymoe.moe.topk_router import topk_balance_loss, topk_gates
    p = _t(inp["probs"])
    res = {f"loss_{k}": v for k, v in
           _backward(topk_balance_loss(p, inp["expert_index"]), None, probs=p).items()}
    for norm in (True, False):
        p = _t(inp["probs"])
        idx, w = topk_gates(p, int(inp["k"]), normalize=norm)
        res[f"gates{int(norm)}_index"] = np.asarray(idx)
        res.update({f"gates{int(norm)}_{k}": v
                    for k, v in _backward(w, inp["cot"], probs=p).items()})
    return res


def _cases_6_2(rng):
    out = [{"scores": rng.standard_normal((8, 3)), "C": np.array(3)},
           {"scores": rng.standard_normal((5, 4)), "C": np.array(5)},
           {"scores": rng.standard_normal((6, 2)), "C": np.array(1)}]
    out.append({"scores": np.array([[1.0, 0.5], [1.0, 0.5], [0.0, 0.5], [1.0, 0.2]]),
                "C": np.array(2)})
    return out


def _run_6_2(inp, ns):
    from tinymoe.moe.expert_choice import expert_choice_positions
    return {"position": expert_choice_positions(inp["scores"], int(inp["C"]))}


def _cases_6_3(rng):
    return [{"bias": rng.standard_normal(5), "load": rng.integers(0, 10, 5).astype(float),
             "speed": np.array(0.01)},
            {"bias": rng.standard_normal(4).astype(np.float32),
             "load": np.array([2.0, 4.0, 6.0, 4.0]), "speed": np.array(0.5)},
            {"bias": np.zeros(3), "load": np.array([3.0, 3.0, 3.0]), "speed": np.array(1.0)}]


def _run_6_3(inp, ns):
    from tinymoe.moe.aux_free import bias_update
    bias = inp["bias"].copy()
    new = bias_update(bias, inp["load"], float(inp["speed"]))
    return {"new_bias": np.asarray(new), "bias_after": bias}


# --- lesson 07 ------------------------------------------------------------------------------------
def _cases_7_1(rng):
    return [{"chunks": rng.standard_normal((D, D) + chunk),
             "cot": rng.standard_normal((D, D) + chunk)}
            for D, chunk in [(3, (2, 4)), (1, (3,)), (4, (1, 2))]]


def _run_7_1(inp, ns):
    import tinymoe.ops as ops
    from tinymoe.parallel.expert_parallel import all_to_all
    chunks = [_t(c) for c in inp["chunks"]]
    received = all_to_all(chunks)
    res = _backward(ops.stack(list(received)), inp["cot"])
    res.update({f"grad_chunk{i}": _np(c.grad) if c.grad is not None else np.zeros(c.shape)
                for i, c in enumerate(chunks)})
    return res


def _cases_7_2(rng):
    """Counts (D, E/D, k) on one rank: random, with empty experts and whole ranks of zeros,
    one rank and one expert, nothing at all, and top-2 with a skewed second choice."""
    out = []
    for D, El, k in [(3, 2, 2), (4, 1, 1), (1, 3, 2), (2, 2, 1)]:
        send, recv = (rng.integers(0, 5, (D, El, k)) for _ in range(2))
        recv[rng.integers(0, D), :, :] = 0  # a rank sends this rank nothing
        send[:, rng.integers(0, El), :] = 0  # an empty expert on every rank
        out.append({"send": send, "recv": recv})
    out.append({"send": np.zeros((2, 2, 2), np.int64), "recv": np.zeros((2, 2, 2), np.int64)})
    out.append({"send": np.array([[[3, 0]], [[0, 0]]]), "recv": np.array([[[1, 2]], [[0, 4]]])})
    return out


def _run_7_2(inp, ns):
    from tinymoe.parallel.alltoallv import alltoallv_plan
    return dict(alltoallv_plan(inp["send"], inp["recv"])._asdict())


# --- lesson 02b -----------------------------------------------------------------------------------
def _cases_2b_1(rng):
    out = []
    for shape in [(4, 5), (7,), (2, 3)]:
        a = rng.standard_normal(shape) * 2
        out.append({"logits": a, "u": rng.random(shape), "cot": rng.standard_normal(shape)})
    # saturated gates: always on (u = 0) and far off (a = -30)
    out.append({"logits": np.array([30.0, -30.0, 0.0]), "u": np.array([0.0, 0.5, 0.9]),
                "cot": np.ones(3)})
    return out


def _run_2b_1(inp, ns):
    from tinymoe.moe.conditional import stochastic_times_smooth
    a = _t(inp["logits"])
    return _backward(stochastic_times_smooth(a, inp["u"]), inp["cot"], logits=a)


def _cases_2b_2(rng):
    out = []
    for n, K in [(5, 3), (1, 4), (8, 1)]:
        out.append({"logits": rng.standard_normal((n, K)) * 2,
                    "b": (rng.random((n, K)) < 0.5).astype(float),
                    "cost": rng.random(n) * 3, "baseline": np.array(rng.random())})
    out.append({"logits": np.array([[40.0, -40.0]]), "b": np.array([[0.0, 1.0]]),
                "cost": np.array([2.0]), "baseline": np.array([0.5])})
    return out


def _run_2b_2(inp, ns):
    from tinymoe.moe.conditional import reinforce_surrogate
    a = _t(inp["logits"])
    return _backward(reinforce_surrogate(a, inp["b"], inp["cost"], inp["baseline"]), None,
                     logits=a)


def _cases_2b_3(rng):
    return [{"sigma": rng.uniform(0.02, 0.98, (6, 4)), "tau": np.array(0.3)},
            {"sigma": rng.uniform(0.02, 0.98, (1, 5)), "tau": np.array(1.0)},
            {"sigma": rng.uniform(0.02, 0.98, (9, 1)), "tau": np.array(0.125)}]


def _run_2b_3(inp, ns):
    from tinymoe.moe.conditional import sparsity_regularisers
    res = {}
    for name in ("L_b", "L_e", "L_v"):
        s = _t(inp["sigma"])
        out = sparsity_regularisers(s, float(inp["tau"]))[name]
        res.update({f"{name}_{k}": v for k, v in _backward(out, None, sigma=s).items()})
    return res
# --- lesson 08 ------------------------------------------------------------------------------------
def _cases_8_1(rng):
    return [{"x": rng.standard_normal((4, 6)) * 3, "w": 1 + 0.3 * rng.standard_normal(6),
             "eps": np.array(1e-6), "cot": rng.standard_normal((4, 6))},
            {"x": rng.standard_normal((2, 3, 5)), "w": rng.standard_normal(5),
             "eps": np.array(1e-2), "cot": rng.standard_normal((2, 3, 5))},
            {"x": np.zeros((2, 4)), "w": np.ones(4), "eps": np.array(1e-5),
             "cot": rng.standard_normal((2, 4))}]


def _run_8_1(inp, ns):
    from tinymoe.nn.rmsnorm import rms_norm
    x, w = _t(inp["x"]), _t(inp["w"])
    return _backward(rms_norm(x, w, float(inp["eps"])), inp["cot"], x=x, w=w)


def _cases_8_2(rng):
    out = []
    for lead, d, f in [((5,), 3, 4), ((3, 2), 4, 6), ((1,), 2, 1)]:
        E = lead[:-1]  # a leading expert axis in the second case
        out.append({"x": rng.standard_normal((*lead, d)) * 2,
                    "Wg": rng.standard_normal((*E, d, f)), "Wu": rng.standard_normal((*E, d, f)),
                    "Wd": rng.standard_normal((*E, f, d)),
                    "cot": rng.standard_normal((*lead, d))})
    return out


def _run_8_2(inp, ns):
    from tinymoe.nn.swiglu import swiglu
    x, Wg, Wu, Wd = (_t(inp[n]) for n in ("x", "Wg", "Wu", "Wd"))
    return _backward(swiglu(x, Wg, Wu, Wd), inp["cot"], x=x, Wg=Wg, Wu=Wu, Wd=Wd)


def _cases_8_3(rng):
    out = []
    for B, S, splits in [(2, 6, (0, 4, 5)), (1, 5, (0, 1, 2, 3)), (3, 4, (0,))]:
        out.append({"x": rng.standard_normal((B, S, 8)), "W": rng.standard_normal((8, 24)),
                    "b": rng.standard_normal(24), "P": rng.standard_normal((8, 8)),
                    "splits": np.array(splits)})
    return out


def _run_8_3(inp, ns):
    from tinymoe.models.generate import cached_attention
    from tinymoe.nn.attention import CausalSelfAttention
    attn = CausalSelfAttention(8, 2, dtype=np.float64, rng=0)
    attn.qkv.weight.data, attn.qkv.bias.data = inp["W"], inp["b"]
    attn.proj.weight.data = inp["P"]
    x = inp["x"]
    B, S, _ = x.shape
    keys, values = np.zeros((B, 2, S, 4)), np.zeros((B, 2, S, 4))
    bounds = [*inp["splits"].tolist(), S]
    ys = [_np(cached_attention(attn, x[:, a:b], keys, values, a))
          for a, b in zip(bounds[:-1], bounds[1:])]
    return {"y": np.concatenate(ys, axis=1), "keys": keys, "values": values}


NB00, NB01 = "lessons/00_autograd.ipynb", "lessons/01_adaptive_mixtures_1991.ipynb"
PROBES: dict[str, Probe] = {
    "task0_1": Probe(_cases_0_1, _run_0_1, rtol=1e-9, notebook=NB00, mode="cell",
                     setup=_setup_0_1),
    "task0_2": Probe(_cases_0_2, _run_0_2, rtol=1e-9, notebook=NB00, mode="defs"),
    "task0_3": Probe(_cases_0_3, _run_0_3, rtol=1e-5, atol=1e-6, notebook=NB00, mode="defs"),
    "task1_1": Probe(_mixture_cases, _run_1_1),
    "task1_2": Probe(_cases_1_2, _run_1_2),
    "task1_3": Probe(_mixture_cases, _run_1_3, notebook=NB01, mode="cell", setup=_setup_1_3),
    "task2_1": Probe(_hme_cases, _run_2_1),
    "task2_2": Probe(_cases_2_2, _run_2_2),
    "task2_3": Probe(_cases_2_3, _run_2_3),
    "task2_4": Probe(_hme_cases, _run_2_4, rtol=1e-5, atol=1e-7),
    "task2b_1": Probe(_cases_2b_1, _run_2b_1),
    "task2b_2": Probe(_cases_2b_2, _run_2b_2),
    "task2b_3": Probe(_cases_2b_3, _run_2b_3),
    "task3_1": Probe(_cases_3_1, _run_3_1),
    "task3_2": Probe(_threshold_cases, _run_3_2),
    "task3_3": Probe(_threshold_cases, _run_3_3, preload=("numba",)),
    "task4_1": Probe(_cases_4_1, _run_4_1, rtol=0, atol=0),
    "task4_2": Probe(_cases_4_2, _run_4_2),
    "task4_3": Probe(_cases_4_3, _run_4_3),
    "task5_1": Probe(_cases_5, _run_5_1, rtol=0, atol=0, preload=("numba",)),
    "task5_2": Probe(_cases_5, _run_5_2, rtol=0, atol=0, preload=("numba",)),
    "task6_1": Probe(_cases_6_1, _run_6_1),
    "task6_2": Probe(_cases_6_2, _run_6_2, rtol=0, atol=0),
    "task6_3": Probe(_cases_6_3, _run_6_3),
    "task7_1": Probe(_cases_7_1, _run_7_1),
    "task7_2": Probe(_cases_7_2, _run_7_2, rtol=0, atol=0),
    "task8_1": Probe(_cases_8_1, _run_8_1),
    "task8_2": Probe(_cases_8_2, _run_8_2),
    "task8_3": Probe(_cases_8_3, _run_8_3),
}
