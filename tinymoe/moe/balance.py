"""Load-balancing losses.

Shazeer et al. (2017), §4 and Appendices A-B:

    Importance(X)_i = Σ_{x∈X} G(x)_i                                   eq. (6)
    L_importance    = w_importance · CV(Importance(X))²                eq. (7)
    Load(X)_i       = Σ_{x∈X} P(x, i)                                   eq. (10)
    L_load          = w_load · CV(Load(X))²                            eq. (11)

    Importance_H(X)_{i,j} = Σ_x G_primary(x)_i · G_i(x)_j               eq. (13)
    Load_H(X)_{i,j}       = Load_primary(X)_i · Load_i(X^(i))_j / |X^(i)|   eq. (14)

``CV = std / mean``. :func:`cv_squared` follows tensor2tensor: the population variance
(ddof = 0) over ``var / (mean² + 1e-10)``, so it is 0 (with a zero gradient, never NaN) at
perfect balance and for an all-zero vector, and ``cv_squared([4, 0, 0, 0]) = 3 = E - 1``.
(torch's ``.var()`` in the davidmrau port uses ddof = 1: 4 for that vector.)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from tinymoe import ops
from tinymoe.tensor import Tensor, as_tensor

CV_EPS = 1e-10


def cv_squared(x: Tensor | np.ndarray) -> Tensor:
    """The squared coefficient of variation ``var(x) / (mean(x)² + 1e-10)``, ddof = 0.

    ``x`` is a vector of per-expert values. Written with ``var/mean²`` rather than ``std``:
    the gradient of ``std`` at zero variance is 0/0 (google-research/vmoe PR #218). An empty
    or one-element vector gives 0.
    """
    x = as_tensor(x)
    if x.ndim != 1:
        raise ValueError(f"cv_squared: expected a vector of per-expert values, got shape "
                         f"{x.shape}; flatten it first (x.reshape(-1))")
    n = x.shape[0]
    if n <= 1:
        return ops.sum(x * 0.0)  # 0, still connected to the graph
    mean = x.sum() / float(n)
    d = x - mean  # (E,)
    var = (d * d).sum() / float(n)  # ddof = 0
    return var / (mean * mean + CV_EPS)


def cv(x: Tensor | np.ndarray) -> float:
    """CV = std/mean as a plain number (for reports): ``sqrt(cv_squared(x))``."""
    return float(np.sqrt(cv_squared(as_tensor(x)).item()))


def importance(gates: Tensor) -> Tensor:
    """Eq. (6): ``Σ_x G(x)``, the batchwise sum of the (T, E) gate values -> (E,)."""
    return as_tensor(gates).sum(axis=0)  # (E,)


def load(prob_in_top_k: Tensor) -> Tensor:
    """Eq. (10): ``Σ_x P(x, i)``, the smooth number of tokens per expert -> (E,)."""
    return as_tensor(prob_in_top_k).sum(axis=0)  # (E,)


def importance_loss(importance_: Tensor, w_importance: float) -> Tensor:
    """Eq. (7): ``w_importance · CV(Importance)²``."""
    return cv_squared(importance_) * float(w_importance)


def load_loss(load_: Tensor, w_load: float) -> Tensor:
    """Eq. (11): ``w_load · CV(Load)²``."""
    return cv_squared(load_) * float(w_load)


def balance_loss(importance_: Tensor, load_: Tensor, w_importance: float,
                 w_load: float) -> Tensor:
    """``w_importance·CV(Importance)² + w_load·CV(Load)²`` (eqs. 7 + 11).

    Importance and load may be (E,) or, for a hierarchical MoE, (a, b): the CV is then taken
    over all a·b experts (Appendix B).
    """
    importance_, load_ = as_tensor(importance_), as_tensor(load_)
    return (importance_loss(importance_.reshape(-1), w_importance)
            + load_loss(load_.reshape(-1), w_load))


def max_over_mean(load_: Tensor | np.ndarray) -> float:
    """Table 6's last column: the load of the busiest expert over the mean load."""
    v = np.asarray(load_.data if isinstance(load_, Tensor) else load_, dtype=np.float64)
    mean = v.mean() if v.size else 0.0
    return float(v.max() / mean) if mean > 0 else float("nan")


def hierarchical_importance(primary_weight: Sequence[Tensor],
                            secondary_gates: Sequence[Tensor]) -> Tensor:
    """Eq. (13): ``Importance_H[i, j] = Σ_{x∈X^(i)} G_primary(x)_i · G_i(x)_j`` -> (a, b).

    ``primary_weight[i]`` (n_i,) holds the primary gate value of each token sent to group
    ``i`` and ``secondary_gates[i]`` (n_i, b) that group's gates on the same tokens (tokens
    outside ``X^(i)`` have ``G_primary(x)_i = 0`` and add nothing).
    """
    if len(primary_weight) != len(secondary_gates) or not len(primary_weight):
        raise ValueError(f"hierarchical_importance: need one primary weight vector per group "
                         f"and as many secondary gate matrices; got {len(primary_weight)} "
                         f"and {len(secondary_gates)}")
    rows = []
    for i, (w, g) in enumerate(zip(primary_weight, secondary_gates)):
        w, g = as_tensor(w), as_tensor(g)
        if g.ndim != 2 or w.shape != (g.shape[0],):
            raise ValueError(f"hierarchical_importance: group {i}: weights {w.shape} do not "
                             f"match gates {g.shape}; expected (n_i,) and (n_i, b)")
        rows.append((ops.unsqueeze(w, 1) * g).sum(axis=0))  # (b,)
    return ops.stack(rows, axis=0)  # (a, b)


def hierarchical_load(primary_load: Tensor, secondary_loads: Sequence[Tensor],
                      counts: Sequence[int] | np.ndarray) -> Tensor:
    """Eq. (14): ``Load_H[i, j] = Load_primary(X)_i · Load_i(X^(i))_j / |X^(i)|`` -> (a, b).

    ``counts[i] = |X^(i)|`` is the number of tokens the primary gate sent to group ``i``; an
    empty group gets a zero row. Using ``Load_i(X^(i))_j`` alone would give the primary gate
    no gradient; the product passes it one through ``Load_primary``.
    """
    primary_load = as_tensor(primary_load)
    counts = np.asarray(counts, dtype=np.float64)
    a = primary_load.shape[0]
    if len(secondary_loads) != a or counts.shape != (a,):
        raise ValueError(f"hierarchical_load: primary load {primary_load.shape} needs {a} "
                         f"secondary loads and {a} counts; got {len(secondary_loads)} and "
                         f"{counts.shape}")
    rows = []
    for i, sec in enumerate(secondary_loads):
        sec = as_tensor(sec)
        scale = 1.0 / counts[i] if counts[i] > 0 else 0.0
        rows.append(primary_load[i] * sec * scale)  # (b,)
    return ops.stack(rows, axis=0)  # (a, b)
