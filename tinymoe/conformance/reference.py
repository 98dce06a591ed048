"""What a conforming implementation must return: plain NumPy, float64, written from the papers.

Independent of the rest of tinymoe on purpose (tinymoe's own code is *tested* against these
functions, like anyone else's). Every function takes the conventions dict
(:mod:`tinymoe.conformance.conventions`) where its answer depends on one.
"""
from __future__ import annotations

import math

import numpy as np


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16's 8 significant bits (ties to even)."""
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def softmax(logits: np.ndarray, conv: dict, dtype: str = "float64") -> np.ndarray:
    """Row softmax. With ``router_precision='input'`` and half-precision logits it is
    computed in that precision (``dtype`` names it: float16 or bfloat16), else in float64."""
    if conv["router_precision"] == "input" and dtype in ("float16", "bfloat16"):
        rnd = (lambda a: a.astype(np.float16)) if dtype == "float16" else _bf16
        z = rnd(np.asarray(logits, dtype=np.float32))
        e = rnd(np.exp(rnd(z - z.max(axis=-1, keepdims=True))))
        return rnd(e / rnd(e.sum(axis=-1, keepdims=True))).astype(np.float64)
    z = np.asarray(logits, dtype=np.float64)
    if z.shape[-1] == 0 or z.size == 0:
        return z.copy()
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(T, k) indices of the k largest scores per row, largest first, ties to the lowest
    index (a stable sort of the negated scores)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=-1, kind="stable")[..., :k]


def top1_router(logits: np.ndarray, conv: dict, dtype: str = "float64"):
    """Switch (Fedus et al. 2021, eqs. 1-2): ``(expert (T,), gate (T,))``, gate = raw p."""
    p = softmax(logits, conv, dtype)
    e = top_k(p, 1)[:, 0] if p.shape[0] else np.zeros(0, dtype=np.int64)
    return e, p[np.arange(len(e)), e]


def topk_router(logits: np.ndarray, k: int, conv: dict, dtype: str = "float64"):
    """Mixtral (Jiang et al. 2024, §2.1): ``(expert (T, k), weight (T, k))``, the top-k
    probabilities renormalised to sum to 1, most probable first."""
    p = softmax(logits, conv, dtype)
    e = top_k(p, k) if p.shape[0] else np.zeros((0, k), dtype=np.int64)
    w = np.take_along_axis(p, e, axis=1)
    return e, w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)


def kth_excluding(H: np.ndarray, k: int) -> np.ndarray:
    """(T, E): entry (t, i) is the k-th largest of ``H[t]`` without ``H[t, i]`` (Shazeer et
    al. 2017, eq. 9)."""
    T, E = H.shape
    out = np.empty((T, E))
    for i in range(E):
        others = np.delete(H, i, axis=1)
        out[:, i] = -np.sort(-others, axis=1)[:, k - 1]
    return out


def noisy_topk_router(clean: np.ndarray, noise_stddev: np.ndarray, noise: np.ndarray, k: int):
    """Shazeer et al. 2017, eqs. 3-5 and 8-10: ``(gates (T, E), load (E,))``.

    ``H = clean + noise · σ``; the gates are a softmax over the k largest H, zero elsewhere;
    ``load_i = Σ_t Φ((clean_i − kth_excluding(H, k, i)) / σ_i)``, the smooth estimator of
    the number of tokens expert i receives. With k = E nothing is excluded, so the load is
    the hard count (T for every expert).
    """
    clean, sigma, noise = (np.asarray(a, dtype=np.float64) for a in (clean, noise_stddev, noise))
    T, E = clean.shape
    H = clean + noise * sigma
    idx = top_k(H, k) if T else np.zeros((0, k), dtype=np.int64)
    kept = np.take_along_axis(H, idx, axis=1)
    w = np.exp(kept - kept.max(axis=1, keepdims=True)) if T else kept
    w = w / w.sum(axis=1, keepdims=True) if T else w
    gates = np.zeros((T, E))
    np.put_along_axis(gates, idx, w, axis=1)
    if k >= E:
        return gates, np.bincount(idx.reshape(-1), minlength=E).astype(np.float64)
    z = (clean - kth_excluding(H, k)) / sigma
    Phi = 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0))) if T else z
    return gates, Phi.sum(axis=0) if T else np.zeros(E)


def expert_choice(scores: np.ndarray, capacity: int):
    """Zhou et al. 2022, §3.2: expert e takes the ``capacity`` tokens with the largest
    ``scores[:, e]`` (ties: lowest token index). ``(token (E, C), gate (E, C))``, best first."""
    s = np.asarray(scores, dtype=np.float64)
    tok = np.argsort(-s, axis=0, kind="stable")[:capacity].T  # (E, C)
    return tok, s[tok, np.arange(s.shape[1])[:, None]]


def bias_update(bias: np.ndarray, load: np.ndarray, speed: float) -> np.ndarray:
    """DeepSeek-V3 §2.1.2: ``b + γ · sign(mean(load) − load)``."""
    load = np.asarray(load, dtype=np.float64)
    return np.asarray(bias, dtype=np.float64) + speed * np.sign(load.mean() - load)


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, k: int,
                    conv: dict) -> int:
    """Slots per expert for a group of S tokens under the conventions (Switch eq. 3)."""
    n = (k if conv["capacity_counts_k"] else 1) * num_tokens * capacity_factor / num_experts
    n = round(n, 9)  # 1·100·1.1/2 is 55.000000000000007 in floating point: 55
    C = math.ceil(n) if conv["capacity_rounding"] == "ceil" else math.floor(n)
    if conv["capacity_at_most_tokens"]:
        C = min(C, num_tokens)
    return int(max(C, conv["min_capacity"]))


def capacity_positions(expert_index: np.ndarray, num_experts: int, capacity: int,
                       conv: dict) -> np.ndarray:
    """(T, k) slot of every choice in its expert's buffer, -1 when the expert is full.
    ``priority='choice_major'``: every first choice (in token order) before every second
    choice; ``'token_major'``: token by token."""
    e = np.asarray(expert_index)
    T, k = e.shape
    order = [(t, j) for j in range(k) for t in range(T)] if conv["priority"] == "choice_major" \
        else [(t, j) for t in range(T) for j in range(k)]
    fill = np.zeros(num_experts, dtype=np.int64)
    pos = np.full((T, k), -1, dtype=np.int64)
    for t, j in order:
        if fill[e[t, j]] < capacity:
            pos[t, j] = fill[e[t, j]]
        fill[e[t, j]] += 1
    return pos


def dispatch(x: np.ndarray, expert_index: np.ndarray, position: np.ndarray, num_experts: int,
             capacity: int) -> np.ndarray:
    """(E, C, d): slot ``position[t, j]`` of expert ``expert_index[t, j]`` holds ``x[t]``."""
    x = np.asarray(x, dtype=np.float64)
    buf = np.zeros((num_experts, capacity, x.shape[1]))
    for (t, j), p in np.ndenumerate(position):
        if p >= 0:
            buf[expert_index[t, j], p] = x[t]
    return buf


def combine(expert_out: np.ndarray, expert_index: np.ndarray, position: np.ndarray,
            weight: np.ndarray) -> np.ndarray:
    """(T, d): ``y_t = Σ_j w_tj · expert_out[e_tj, p_tj]`` over the kept choices."""
    out = np.asarray(expert_out, dtype=np.float64)
    y = np.zeros((position.shape[0], out.shape[2]))
    for (t, j), p in np.ndenumerate(position):
        if p >= 0:
            y[t] += weight[t, j] * out[expert_index[t, j], p]
    return y


def _pool(per_layer: list[float], conv: dict) -> float:
    if conv["aux_pooling"] == "per_layer_mean":
        return float(np.mean(per_layer))
    return float(np.sum(per_layer))


def switch_aux_loss(layer_probs: list, layer_index: list, conv: dict) -> float:
    """Switch eq. (4) without α, ``N · Σ_i f_i P_i`` per layer (1 at uniform routing), the
    layers combined by ``aux_pooling`` ('pooled': one loss over all the layers' tokens)."""
    probs = [np.asarray(p, dtype=np.float64) for p in layer_probs]
    idx = [np.asarray(e).reshape(-1) for e in layer_index]
    if conv["aux_pooling"] == "pooled":
        probs, idx = [np.concatenate(probs)], [np.concatenate(idx)]
    losses = []
    for p, e in zip(probs, idx):
        T, N = p.shape
        f = np.bincount(e, minlength=N) / T if T else np.zeros(N)
        losses.append(float(N * np.sum(f * (p.mean(axis=0) if T else 0.0))))
    return _pool(losses, conv)


def mixtral_aux_loss(layer_logits: list, k: int, conv: dict) -> float:
    """The top-k balance loss ``E · Σ_i f_i P_i`` (p = softmax of the logits, the choices
    its top k), ``f_i`` the share of the T·k choices (``mixtral_k_factor``: of T, so the
    uniform value is k), layers combined by ``aux_pooling``."""
    stats = []
    for z in layer_logits:
        p = softmax(z, {"router_precision": "float32"})
        T, E = p.shape
        e = top_k(p, k) if T else np.zeros((0, k), dtype=np.int64)
        stats.append((np.bincount(e.reshape(-1), minlength=E).astype(np.float64),
                      p.sum(axis=0), T))
    if conv["aux_pooling"] == "pooled":
        stats = [(sum(s[0] for s in stats), sum(s[1] for s in stats),
                  sum(s[2] for s in stats))]
    losses = []
    for counts, psum, T in stats:
        E = counts.shape[0]
        if T == 0:
            losses.append(0.0)
            continue
        f = counts / (T if conv["mixtral_k_factor"] else T * k)
        losses.append(float(E * np.sum(f * psum / T)))
    return _pool(losses, conv)


def z_loss(logits: np.ndarray) -> float:
    """ST-MoE (Zoph et al. 2022) eq. (5): the mean over tokens of logsumexp(logits)²."""
    z = np.asarray(logits, dtype=np.float64)
    if z.shape[0] == 0:
        return 0.0
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse ** 2))


def switch_layer(x, router_weight, w_in, w_out, capacity: int, conv: dict) -> np.ndarray:
    """A Switch FFN layer without residual: top-1 routing of ``x @ router_weight``, expert
    ``relu(x W_in[e]) W_out[e]`` scaled by the raw p, the first ``capacity`` tokens of each
    expert in sequence order kept; a dropped token's output by ``dropped_tokens``."""
    x = np.asarray(x, dtype=np.float64)
    e, p = top1_router(x @ np.asarray(router_weight, dtype=np.float64), conv)
    pos = capacity_positions(e[:, None], np.shape(router_weight)[1], capacity, conv)[:, 0]
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        if pos[t] >= 0:
            h = np.maximum(x[t] @ w_in[e[t]], 0.0)
            y[t] = p[t] * (h @ w_out[e[t]])
        elif conv["dropped_tokens"] == "passthrough":
            y[t] = x[t]
        elif conv["dropped_tokens"] == "scaled_passthrough":
            y[t] = p[t] * x[t]
    return y


def mixtral_layer(x, router_weight, w_gate, w_up, w_down, k: int, conv: dict) -> np.ndarray:
    """Mixtral's sparse MoE block: top-k renormalised gates, SwiGLU experts
    ``(silu(x W_gate) ⊙ x W_up) W_down``, dropless."""
    x = np.asarray(x, dtype=np.float64)
    e, w = topk_router(x @ np.asarray(router_weight, dtype=np.float64), k, conv)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(k):
            g = x[t] @ w_gate[e[t, j]]
            h = g / (1.0 + np.exp(-g)) * (x[t] @ w_up[e[t, j]])
            y[t] += w[t, j] * (h @ w_down[e[t, j]])
    return y
