"""Expert choice routing (Zhou et al., NeurIPS 2022): the experts pick the tokens.

Token choice (Switch, GShard, Mixtral) lets every token pick its top-k experts, so an
expert's load depends on the batch and needs a balancing loss and a capacity that drops
the overflow. Expert choice turns the table: every expert takes its top-C tokens of the
batch, so every expert processes exactly C tokens by construction, and a token gets a
*variable* number of experts, from 0 to E. For n tokens X (n, d) and e experts (§3.2)::

    S = Softmax(X · W_g)            token-to-expert affinities, (n, e), rows sum to 1
    G, I = TopK(Sᵀ, k)              expert i's k best tokens I[i, :] and their scores G[i, :]
    P = Onehot(I)                   (e, k, n): slot j of expert i holds token I[i, j]
    k = n · c / e                   c, the capacity factor, = average experts per token
    y_t = Σ_i Σ_j G[i, j] · [I[i, j] = t] · FFN_i(x_t)

"EC-CF2" is c = 2, the compute of top-2 token choice. The paper reports more than 2x faster
training convergence than Switch's top-1 and GShard's top-2 gating (abstract). No
auxiliary balancing loss is needed, every expert being exactly full: the routing's
``aux_losses`` is empty.

tinymoe's conventions:

* **capacity** C = ceil(n · c / e), clamped to [1, n] (:func:`expert_choice_capacity`; the
  same rounding as :func:`~tinymoe.moe.capacity.expert_capacity` with k = 1):
  an expert cannot take a token twice, and takes at least one;
* **ties** go to the lower token index (a stable sort; ``torch.topk`` leaves the order of
  ties unspecified, and on CPU returns ``[6, 5]`` for ``topk(zeros(8), 2)``);
* **gates** are the raw affinities S[t, i] of the chosen pairs, not renormalised (a token's
  gates sum to at most 1, and to 0 when no expert took it);
* **slots in descending score**: slot 0 of expert i holds its best token, slot C - 1 its
  C-th best (the order of ``TopK``, flaxformer's ``expert_index``).

In the routing (:class:`~tinymoe.dispatch.routing.Routing`) every token has k = E columns,
one per expert: ``expert_index[t, i] = i``, ``position[t, i]`` = the slot of token t in
expert i's bucket or -1, ``combine_weight[t, i] = S[t, i]`` if chosen else 0, ``counts = C``
for every expert, ``capacity = C``. The existing dispatch and combine (NumPy or Numba) then
fill the (E, C, d) buffer with no empty slot, and a token chosen by no expert gets y_t = 0:
it leaves the layer through the residual unchanged.

**Expert choice breaks causality.** Whether token t is chosen depends on the scores of all
the other tokens of the batch, the future ones included, so in a decoder the model can learn
to cheat with future tokens, and at generation time (one token at a time) the routing of
training cannot be reproduced. flaxformer's ``ExpertsChooseMaskedRouter``: it "should not be
used in decoder blocks because it breaks the autoregressive behavior" (its docstring).
Use it in encoders, or with the whole sequence known in advance.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tinymoe import validate
from tinymoe.dispatch.routing import Routing
from tinymoe.moe.precision import router_dtype as check_router_dtype
from tinymoe.moe.router_weight import (INIT_SCALE, check_finite_logits, router_probabilities,
                                       router_weight)
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.module import Module
from tinymoe.tensor import as_tensor


def expert_choice_capacity(num_tokens: int, num_experts: int,
                           capacity_factor: float = 2.0) -> int:
    """Tokens per expert, ``C = ceil(T · c / E)`` clamped to ``[1, T]`` (paper: k = n·c/e).

    ``c`` is the average number of experts per token (E·C pairs over T tokens). As in
    :func:`~tinymoe.moe.capacity.expert_capacity`, ``T·c/E`` is rounded to 9 decimals before
    the ceiling, so that 10 · 1.1 / 1 gives 11, not 12.

    >>> expert_choice_capacity(16, 4), expert_choice_capacity(10, 4, 1.0)
    (8, 3)
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) \
            or num_tokens < 1:
        raise ValueError(f"expert_choice_capacity: num_tokens={num_tokens!r} must be an "
                         f"integer >= 1 (each expert picks its tokens among the batch)")
    E = validate.num_experts(num_experts, "expert_choice_capacity")
    c = validate.capacity_factor(capacity_factor, "expert_choice_capacity")
    T = int(num_tokens)
    C = math.ceil(round(T * c / E, 9))  # k = n · c / e, rounded up
    return int(min(max(C, 1), T))       # 1 <= C <= T


def expert_choice_positions(scores: np.ndarray, capacity: int) -> np.ndarray:
    """Each expert's top-``capacity`` tokens, as slots: ``position`` (T, E) int64.

    ``scores`` (T, E) are the affinities S. Expert e takes the C tokens with the largest
    ``S[:, e]`` (ties: the lower token index first); ``position[t, e]`` is the slot of token
    t in expert e's bucket, in descending score (slot 0 = the best token), or -1 when
    expert e did not choose t. Every column holds each of 0 .. C-1 exactly once.
    """
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"expert_choice_positions: scores must be (T, E), got shape {s.shape}")
    T, E = s.shape
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) \
            or not 1 <= capacity <= T:
        raise ValueError(f"expert_choice_positions: capacity={capacity!r} must be an integer "
                         f"in [1, T] = [1, {T}] (an expert takes a token at most once); use "
                         f"expert_choice_capacity(T, E, capacity_factor)")
    C = int(capacity)
    ### BEGIN SOLUTION task6_2
    chosen = np.argsort(-s, axis=0, kind="stable")[:C]  # (C, E) expert e's tokens, best first
    position = np.full((T, E), -1, dtype=np.int64)       # (T, E) -1: not chosen by expert e
    position[chosen, np.arange(E)] = np.arange(C)[:, None]  # (C, E) token chosen[c, e] -> slot c
    ### END SOLUTION
    return position


def experts_per_token(routing: Routing) -> np.ndarray:
    """(T,) how many experts took each token (0 .. E); sums to E · C under expert choice."""
    return (np.asarray(routing.position) >= 0).sum(axis=1).astype(np.int64)


def unrouted_fraction(routing: Routing) -> float:
    """Share of the T tokens that no expert took (their layer output is 0: residual only)."""
    n = experts_per_token(routing)
    return float((n == 0).mean()) if n.size else 0.0


def expert_buckets(routing: Routing) -> np.ndarray:
    """(E, C) the token in each slot of each expert's bucket (the paper's I), -1 if empty.

    Only for capacity routings with one column per expert (``expert_index[t, j] = j``), as
    :class:`ExpertChoiceRouter` makes them.
    """
    p = np.asarray(routing.position)
    E, C = routing.num_experts, routing.capacity
    if C is None or p.shape[1] != E or not np.array_equal(
            routing.expert_index, np.broadcast_to(np.arange(E), p.shape)):
        raise ValueError("expert_buckets: needs a capacity routing with one column per "
                         "expert (expert_index[t, j] = j), as ExpertChoiceRouter returns")
    buckets = np.full((E, C), -1, dtype=np.int64)  # (E, C)
    t, e = np.nonzero(p >= 0)                       # (n,), (n,) the chosen pairs
    buckets[e, p[t, e]] = t
    return buckets


class ExpertChoiceRouter(Module):
    """Every expert takes its top-C tokens of the batch by affinity S = softmax(x W_g).

    ``capacity_factor`` c: average experts per token (2.0 is the paper's EC-CF2), so
    C = ceil(T · c / E) clamped to [1, T] (:func:`expert_choice_capacity`). ``router_dtype``:
    the router's compute precision as in :class:`~tinymoe.moe.switch.SwitchRouter` (float32
    by default; float64 for gradient checks). ``W_g`` (d_model, E) starts as Switch's
    truncated normal with standard deviation sqrt(init_scale / d_model) (flaxformer's routers
    use a normal of std 0.02 instead).

    ``forward(x)`` for ``x`` (T, d_model) returns a
    :class:`~tinymoe.dispatch.routing.Routing` with E columns per token (module docstring),
    ``probs`` = S, and no aux losses. After each call ``capacity`` holds the last C.
    """

    def __init__(self, d_model: int, num_experts: int, *, capacity_factor: float = 2.0,
                 router_dtype: Any = "float32", init_scale: float = INIT_SCALE,
                 rng: RNGLike = None) -> None:
        super().__init__()
        self.d_model = validate.positive_int(d_model, "d_model", "ExpertChoiceRouter")
        self.num_experts = validate.num_experts(num_experts, "ExpertChoiceRouter")
        self.capacity_factor = validate.capacity_factor(capacity_factor, "ExpertChoiceRouter")
        self.router_dtype = check_router_dtype(router_dtype, "ExpertChoiceRouter")
        if not (isinstance(init_scale, (int, float, np.floating)) and init_scale > 0
                and math.isfinite(init_scale)):
            raise ValueError(f"ExpertChoiceRouter: init_scale={init_scale!r} must be a finite "
                             f"number > 0 (Switch's 0.1 is the default)")
        self.W_g = router_weight(as_rng(rng), self.d_model, self.num_experts,
                                 self.router_dtype, float(init_scale))  # (d, E)
        self.capacity: int | None = None

    @property
    def k(self) -> int:
        """E columns per token: one per expert (a token is taken by 0 to E of them)."""
        return self.num_experts

    def forward(self, x: Any) -> Routing:
        x = as_tensor(x)
        validate.tokens(x, self.d_model, "ExpertChoiceRouter")
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"ExpertChoiceRouter: x has dtype {x.dtype}; the router needs "
                            f"floating inputs (token ids go through an Embedding first)")
        T, E = x.shape[0], self.num_experts
        logits, scores = router_probabilities(x, self.W_g, self.router_dtype)  # (T, E) each
        check_finite_logits(logits, "ExpertChoiceRouter")
        if T == 0:  # an empty batch: every expert picks nothing (one empty slot each)
            C, position = 1, np.zeros((0, E), dtype=np.int64)  # (0, E)
        else:
            C = expert_choice_capacity(T, E, self.capacity_factor)
            position = expert_choice_positions(scores.data, C)  # (T, E) slot or -1
        mask = (position >= 0).astype(scores.dtype)        # (T, E) constant 0/1, no gradient
        weight = scores * mask                             # (T, E) S[t, e] where chosen
        if weight.dtype != x.dtype:
            weight = weight.astype(x.dtype)  # back to the model's precision
        expert_index = np.ascontiguousarray(np.broadcast_to(np.arange(E, dtype=np.int64),
                                                            (T, E)))  # (T, E) column j = j
        counts = np.full(E, C if T else 0, dtype=np.int64)  # (E,) every expert C tokens
        self.capacity = C
        return Routing(expert_index, weight, position, counts, E, C, probs=scores,
                       logits=logits)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, "
                f"capacity_factor={self.capacity_factor:g}, "
                f"router_dtype={self.router_dtype!r}")
