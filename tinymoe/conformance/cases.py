"""The catalogue: for every component, the inputs that break implementations.

A case is a name and a function ``make(rng) -> dict`` of the component's inputs (NumPy
arrays and numbers, in the order of the adapter method's arguments), plus ``dtype``, the
precision the router logits stand for ("float64", "float16" or "bfloat16": NumPy has no
bfloat16, so those logits come as float32 arrays holding bfloat16 values). Sizes are tiny:
the whole catalogue runs in about a second.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from tinymoe.conformance import reference as ref
from tinymoe.conformance.reference import _bf16, softmax

Case = Callable[[np.random.Generator], dict]


class BF16(np.ndarray):
    """The ``bfloat16`` case's logits: a float32 array whose values are exactly bfloat16
    (NumPy has no bfloat16). An adapter converts it, e.g. ``torch.from_numpy(np.asarray(a))
    .to(torch.bfloat16)`` when :func:`is_bfloat16` says so."""


def is_bfloat16(a: object) -> bool:
    """True for the float32 arrays that stand for bfloat16 logits (the ``bfloat16`` case)."""
    return isinstance(a, BF16)

F32 = {"router_precision": "float32"}
TIES = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 2.0, 1.0],
                 [3.0, 1.0, 3.0, 3.0], [-1.0, 5.0, 5.0, 5.0]])  # (5, 4) exact ties


def _logits(case: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Router logits (T, E) for the router cases, and the precision they stand for."""
    if case == "random":
        return 2.0 * rng.standard_normal((8, 4)), "float64"
    if case == "exact_ties":
        return TIES.copy(), "float64"
    if case == "all_to_one":
        z = rng.standard_normal((6, 4))
        z[:, 2] += 20.0  # every token's first choice is expert 2
        return z, "float64"
    if case == "no_tokens":
        return np.zeros((0, 4)), "float64"
    if case == "one_expert":
        return rng.standard_normal((5, 1)), "float64"
    if case == "k_equals_E":
        return rng.standard_normal((5, 3)), "float64"
    if case == "large_logits":  # exp() overflows unless the row maximum is subtracted
        ranks = np.stack([rng.permutation(4) for _ in range(6)])  # (6, 4) no ties
        z = 1.5 * ranks + np.round(32.0 * rng.uniform(size=(6, 4))) / 64.0  # exact in float32
        return 1e4 + z, "float64"
    if case == "float16":
        return (4.0 * rng.standard_normal((8, 4))).astype(np.float16), "float16"
    if case == "bfloat16":
        return _bf16(4.0 * rng.standard_normal((8, 4))).view(BF16), "bfloat16"
    raise KeyError(case)


ROUTER_CASES = ("random", "exact_ties", "all_to_one", "no_tokens", "one_expert",
                "large_logits", "float16", "bfloat16")


def top1_router(case: str, rng: np.random.Generator) -> dict:
    z, dtype = _logits(case, rng)
    return dict(args=(z,), dtype=dtype)


def topk_router(case: str, rng: np.random.Generator) -> dict:
    z, dtype = _logits(case, rng)
    k = z.shape[1] if case == "k_equals_E" else min(2, z.shape[1])
    return dict(args=(z, k), dtype=dtype)


def noisy_topk_router(case: str, rng: np.random.Generator) -> dict:
    T, E, k = {"k_equals_E": (5, 3, 3), "one_expert": (5, 1, 1), "no_tokens": (0, 5, 2)
               }.get(case, (8, 5, 2))
    clean = rng.standard_normal((T, E))
    sigma = np.log1p(np.exp(rng.standard_normal((T, E)))) + 1e-2  # softplus(.) + ε > 0
    noise = rng.standard_normal((T, E))
    if case == "exact_ties":
        clean = np.tile([1.0, 1.0, 0.5, 0.5, 0.0], (T, 1))
        noise = np.zeros((T, E))  # H = clean: ties among the top k and at the threshold
    if case == "all_to_one":
        clean[:, 3] += 20.0
    return dict(args=(clean, sigma, noise, k), dtype="float64")


def expert_choice(case: str, rng: np.random.Generator) -> dict:
    T, E = (6, 1) if case == "one_expert" else (8, 4)
    scores = softmax(2.0 * rng.standard_normal((T, E)), F32)
    if case == "exact_ties":
        scores = np.full((T, E), 1.0 / E)
    C = {"capacity_1": 1, "capacity_ge_T": T}.get(case, T // 2)
    return dict(args=(scores, C), dtype="float64")


def bias_update(case: str, rng: np.random.Generator) -> dict:
    load = {"random": rng.integers(0, 10, 6).astype(np.float64),
            "exact_ties": np.array([1.0, 3.0, 2.0, 2.0]),  # two experts exactly at the mean
            "all_to_one": np.array([8.0, 0.0, 0.0, 0.0]),
            "one_expert": np.array([5.0])}[case]
    bias = rng.standard_normal(load.shape) * 1e-2
    return dict(args=(bias, load, 1e-3), dtype="float64")


CAPACITY = {  # (num_tokens, num_experts, capacity_factor, k)
    "random": (64, 8, 1.25, 1),
    "not_divisible": (10, 4, 1.0, 1),    # 2.5 slots: ceil 3, floor 2
    "float_rounding": (100, 2, 1.1, 1),  # 55.000000000000007 in floating point
    "top2": (64, 8, 1.0, 2),             # GShard's 2S/E
    "capacity_1": (3, 8, 1.0, 1),        # fewer tokens than experts: 0.375 slots
    "capacity_ge_T": (5, 1, 2.0, 1),     # 10 slots for 5 tokens
    "no_tokens": (0, 4, 1.0, 1),
    "one_expert": (7, 1, 1.0, 1),
    "k_equals_E": (6, 2, 1.0, 2),
}


def expert_capacity(case: str, rng: np.random.Generator) -> dict:
    return dict(args=CAPACITY[case], dtype="float64")


def _choices(case: str, rng: np.random.Generator) -> tuple[np.ndarray, int, int]:
    """(expert_index (T, k), E, C) for the capacity and dispatch cases."""
    T, E, k, C = {"one_expert": (5, 1, 1, 3), "k_equals_E": (6, 3, 3, 4),
                  "no_tokens": (0, 3, 2, 1), "capacity_1": (8, 3, 2, 1),
                  "capacity_ge_T": (8, 3, 2, 8)}.get(case, (8, 3, 2, 3))
    idx = np.stack([rng.permutation(E)[:k] for _ in range(T)]) if T else \
        np.zeros((0, k), dtype=np.int64)
    if case == "all_to_one":
        idx[:, 0] = 0
        idx[:, 1] = rng.integers(1, E, T)
    return idx.astype(np.int64), E, C


def capacity_positions(case: str, rng: np.random.Generator) -> dict:
    idx, E, C = _choices(case, rng)
    return dict(args=(idx, E, C), dtype="float64")


def dispatch(case: str, rng: np.random.Generator) -> dict:
    idx, E, C = _choices(case, rng)
    pos = capacity_positions_ref(idx, E, C)
    x = rng.standard_normal((idx.shape[0], 3))
    return dict(args=(x, idx, pos, E, C), dtype="float64")


def combine(case: str, rng: np.random.Generator) -> dict:
    idx, E, C = _choices(case, rng)
    pos = capacity_positions_ref(idx, E, C)
    out = rng.standard_normal((E, C, 3))
    w = rng.uniform(0.1, 1.0, idx.shape)
    return dict(args=(out, idx, pos, w), dtype="float64")


def capacity_positions_ref(idx: np.ndarray, E: int, C: int) -> np.ndarray:
    return ref.capacity_positions(idx, E, C, {"priority": "choice_major"})


def _layer_logits(case: str, rng: np.random.Generator) -> list[np.ndarray]:
    if case == "two_layers":
        return [rng.standard_normal((6, 4)), 3.0 * rng.standard_normal((10, 4))]
    if case == "uniform":
        return [np.zeros((8, 4))]
    z, _ = _logits(case, rng)
    return [z]


def switch_aux_loss(case: str, rng: np.random.Generator) -> dict:
    probs = [softmax(z, F32) for z in _layer_logits(case, rng)]
    idx = [np.argmax(p, axis=1) if p.shape[0] else np.zeros(0, dtype=np.int64)
           for p in probs]
    if case == "uniform":
        idx = [np.arange(8) % 4]  # balanced counts with uniform probabilities: loss 1
    return dict(args=(probs, idx), dtype="float64")


def gshard_aux_loss(case: str, rng: np.random.Generator) -> dict:
    (p,), (e,) = switch_aux_loss(case, rng)["args"]
    return dict(args=(p, e), dtype="float64")


def mixtral_aux_loss(case: str, rng: np.random.Generator) -> dict:
    zs = _layer_logits(case, rng)
    k = zs[0].shape[1] if case == "k_equals_E" else min(2, zs[0].shape[1])
    return dict(args=(zs, k), dtype="float64")


def z_loss(case: str, rng: np.random.Generator) -> dict:
    z, dtype = _logits(case, rng)
    return dict(args=(z,), dtype=dtype)


def switch_layer(case: str, rng: np.random.Generator) -> dict:
    T, d, f, E = {"no_tokens": (0, 4, 6, 3), "one_expert": (6, 4, 6, 1)}.get(case, (8, 4, 6, 3))
    x = rng.standard_normal((T, d))
    W = rng.standard_normal((d, E))
    if case == "all_to_one":
        x, W[:, 1] = np.abs(x) + 0.5, 5.0  # every token to expert 1
    C = {"capacity_1": 1, "capacity_ge_T": max(T, 1), "all_to_one": 3}.get(case, 3)
    w_in = rng.standard_normal((E, d, f)) / 2
    w_out = rng.standard_normal((E, f, d)) / 2
    return dict(args=(x, W, w_in, w_out, C), dtype="float64")


def mixtral_layer(case: str, rng: np.random.Generator) -> dict:
    T, d, f, E = {"no_tokens": (0, 4, 6, 4), "one_expert": (6, 4, 6, 1),
                  "k_equals_E": (6, 4, 6, 3)}.get(case, (8, 4, 6, 4))
    k = E if case in ("k_equals_E", "one_expert") else 2
    x = rng.standard_normal((T, d))
    W = rng.standard_normal((d, E))
    w_gate, w_up = (rng.standard_normal((E, d, f)) / 2 for _ in range(2))
    w_down = rng.standard_normal((E, f, d)) / 2
    return dict(args=(x, W, w_gate, w_up, w_down, k), dtype="float64")


CATALOGUE: dict[str, tuple[Callable[[str, np.random.Generator], dict], tuple[str, ...]]] = {
    "top1_router": (top1_router, ROUTER_CASES),
    "topk_router": (topk_router, ROUTER_CASES + ("k_equals_E",)),
    "noisy_topk_router": (noisy_topk_router, ("random", "exact_ties", "all_to_one",
                                              "no_tokens", "one_expert", "k_equals_E")),
    "expert_choice": (expert_choice, ("random", "exact_ties", "capacity_1", "capacity_ge_T",
                                      "one_expert")),
    "bias_update": (bias_update, ("random", "exact_ties", "all_to_one", "one_expert")),
    "expert_capacity": (expert_capacity, tuple(CAPACITY)),
    "capacity_positions": (capacity_positions, ("random", "all_to_one", "capacity_1",
                                                "capacity_ge_T", "no_tokens", "one_expert",
                                                "k_equals_E")),
    "dispatch": (dispatch, ("random", "capacity_1", "no_tokens", "one_expert", "k_equals_E")),
    "combine": (combine, ("random", "capacity_1", "no_tokens", "one_expert", "k_equals_E")),
    "switch_aux_loss": (switch_aux_loss, ("random", "uniform", "all_to_one", "no_tokens",
                                          "one_expert", "two_layers")),
    "gshard_aux_loss": (gshard_aux_loss, ("random", "uniform", "all_to_one", "no_tokens",
                                          "one_expert")),
    "mixtral_aux_loss": (mixtral_aux_loss, ("random", "uniform", "no_tokens", "one_expert",
                                            "k_equals_E", "two_layers")),
    "z_loss": (z_loss, ("random", "no_tokens", "one_expert", "large_logits", "float16")),
    "switch_layer": (switch_layer, ("random", "all_to_one", "capacity_1", "capacity_ge_T",
                                    "no_tokens", "one_expert")),
    "mixtral_layer": (mixtral_layer, ("random", "no_tokens", "one_expert", "k_equals_E")),
}
