"""GShard's top-2 gate with expert capacity (Lepikhin et al. 2020, §2.2 and Algorithm 1).

    g_s = softmax(x_s · W_g)                               (S, E), one group of S tokens
    e1 = argmax g_s,  e2 = argmax of g_s without e1        first and second choice
    g1, g2 <- g1 / (g1 + g2), g2 / (g1 + g2)               normalised over the two
    y_s = g1 · FFN_e1(x_s) + g2 · FFN_e2(x_s)              over the choices that got a slot

Conventions, each a named parameter and tested:

* **capacity per group**: the T tokens form G groups of ``group_size`` S tokens, each with
  ``C = expert_capacity(S, E, capacity_factor, k=2) = ceil(2S/E · capacity_factor)`` slots
  per expert (GShard's ``2S/E`` at factor 1), clamped to [1, S];
* **priority**: all first choices of a group (in sequence order) take slots before any
  second choice (Algorithm 1's two passes; fairseq's ``locations2 += sum(mask1)``);
* **random routing** (``second_policy_train="random"``): the second expert is used only
  if ``2 · g2 > u``, u ~ U(0, 1), with g2 the *normalised* gate, so with probability
  ``2·g2 <= 1`` (Algorithm 1). A second choice that loses takes no slot. In eval mode the
  default ``second_policy_eval="all"`` keeps every second choice that fits, so evaluation
  is deterministic (DeepSpeed kept sampling in eval, reference §7.12). ``"none"`` never
  uses the second expert;
* **normalise before or after dropping** (``normalize``): ``"before"`` (default, GShard's
  Algorithm 1 and Mesh TF) divides by ``g1 + g2`` first, so a token whose second expert is
  dropped keeps ``g1 < 1``; ``"after"`` (fairseq, DeepSpeed) renormalises over the choices
  that survived, so a lone survivor gets weight 1 (denominator clamped at 1e-9). The random
  test always uses the normalised ``g2 / (g1 + g2)``;
* **auxiliary loss**: ``ℓ_aux · E²`` with ``c_e`` the first choices before dropping, so it
  is 1 under uniform routing (:func:`~tinymoe.moe.aux_losses.gshard_aux_loss`), one value
  per group, averaged;
* the gates are computed in ``router_dtype`` (float32 by default, as Mesh TF), with the
  Switch router's machinery (:class:`~tinymoe.moe.switch.SwitchRouter`, jitter off by
  default: GShard used none).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops
from tinymoe.dispatch.functions import Routing
from tinymoe.moe.aux_losses import gshard_aux_loss, router_z_loss
from tinymoe.moe.capacity import (
    CapacityRouting,
    capacity_positions,
    check_capacity_factor,
    check_num_experts,
    expert_capacity,
    num_groups,
)
from tinymoe.moe.switch import INIT_SCALE, SwitchRouter, check_finite_logits
from tinymoe.nn.init import RNGLike, check_positive_int
from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor, as_tensor

SECOND_POLICIES = ("random", "all", "none")
NORMALIZE = ("before", "after")
NORMALIZE_EPS = 1e-9


def top2(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and second choice (T,) each: the two largest gates, ties to the lower index."""
    order = np.argsort(-probs, axis=1, kind="stable")  # (T, E)
    return order[:, 0], order[:, 1]


def top2_route(logits: Tensor, probs: Tensor, capacity_factor: float, *,
               group_size: int | None = None, second_policy: str = "random",
               normalize: str = "before", uniform: np.ndarray | None = None,
               out_dtype: Any = np.float32) -> CapacityRouting:
    """Algorithm 1 for the gates ``probs`` (T, E): top-2, random routing, capacity.

    ``uniform`` (T,) are the U(0, 1) draws of the random routing (needed when
    ``second_policy="random"``). Returns the routing with ``expert_index`` (T, 2) =
    ``[e1, e2]``, ``position`` (T, 2) and the combine weights of the module docstring.
    """
    T, E = probs.shape
    if E < 2:
        raise ValueError(f"top2_route: top-2 gating needs at least 2 experts, got E = {E}")
    if second_policy not in SECOND_POLICIES:
        raise ValueError(f"top2_route: second_policy={second_policy!r}; choose one of "
                         f"{SECOND_POLICIES}")
    if normalize not in NORMALIZE:
        raise ValueError(f"top2_route: normalize={normalize!r}; choose 'before' (GShard, "
                         f"Mesh TF) or 'after' (fairseq, DeepSpeed) dropping")
    G, S = num_groups(T, group_size, "top2_route")
    e1, e2 = top2(probs.data)  # (T,), (T,)
    expert = np.stack([e1, e2], axis=1)  # (T, 2)
    g = ops.take_along_axis(probs, expert, axis=1)  # (T, 2) raw gates [g1, g2]
    g_norm = g / g.sum(axis=1, keepdims=True)  # (T, 2) g / (g1 + g2)

    active = np.ones((T, 2), dtype=bool)  # (T, 2)
    if second_policy == "random":
        if uniform is None or np.shape(uniform) != (T,):
            raise ValueError(f"top2_route: random routing needs uniform draws of shape "
                             f"({T},), got {None if uniform is None else np.shape(uniform)}")
        active[:, 1] = 2.0 * g_norm.data[:, 1] > np.asarray(uniform)  # Algorithm 1
    elif second_policy == "none":
        active[:, 1] = False
    C = expert_capacity(S, E, capacity_factor, k=2)
    position, counts = capacity_positions(expert, E, C, active=active,
                                          group_size=group_size)  # (T, 2), (E,)
    if normalize == "before":
        weight = g_norm  # (T, 2): a dropped second choice leaves g1 < 1
    else:
        kept = (position >= 0).astype(g.dtype)  # (T, 2)
        surviving = g * kept  # (T, 2)
        denom = ops.maximum(surviving.sum(axis=1, keepdims=True), NORMALIZE_EPS)  # (T, 1)
        weight = surviving / denom  # (T, 2): a lone survivor gets 1
    if weight.dtype != np.dtype(out_dtype):
        weight = weight.astype(out_dtype)
    routing = Routing(expert.astype(np.int64), weight, position, counts, E, G * C)
    aux = gshard_aux_loss(probs.reshape(G, S, E), e1.reshape(G, S))
    demand = np.bincount(expert[active], minlength=E).astype(np.int64)  # (E,)
    return CapacityRouting(routing, logits, probs, C, G, aux, router_z_loss(logits), demand,
                           active)


class Top2Gate(Module):
    """GShard's gate as a Module: ``W_g`` (in ``self.router.W_r``), top-2, capacity.

    ``gate(x)`` for ``x`` (T, d_model) returns a
    :class:`~tinymoe.moe.capacity.CapacityRouting`. The random routing draws from
    ``self.rng`` unless ``uniform`` (T,) is passed to ``forward``.
    """

    k = 2

    def __init__(self, d_model: int, num_experts: int, *, capacity_factor: float = 1.0,
                 eval_capacity_factor: float | None = None, group_size: int | None = None,
                 second_policy_train: str = "random", second_policy_eval: str = "all",
                 normalize: str = "before", router_dtype: Any = "float32",
                 jitter: float = 0.0, init_scale: float = INIT_SCALE,
                 rng: RNGLike = None) -> None:
        super().__init__()
        E = check_num_experts(num_experts, "Top2Gate")
        if E < 2:
            raise ValueError(f"Top2Gate: top-2 gating needs num_experts >= 2, got {E}")
        self.num_experts = E
        self.capacity_factor = check_capacity_factor(capacity_factor, "Top2Gate")
        self.eval_capacity_factor = self.capacity_factor if eval_capacity_factor is None \
            else check_capacity_factor(eval_capacity_factor, "Top2Gate (eval)")
        if group_size is not None:
            check_positive_int(group_size, "group_size", "Top2Gate")
        for name, policy in (("second_policy_train", second_policy_train),
                             ("second_policy_eval", second_policy_eval)):
            if policy not in SECOND_POLICIES:
                raise ValueError(f"Top2Gate: {name}={policy!r}; choose one of "
                                 f"{SECOND_POLICIES}")
        if normalize not in NORMALIZE:
            raise ValueError(f"Top2Gate: normalize={normalize!r}; choose 'before' or 'after'")
        self.group_size = group_size
        self.second_policy_train, self.second_policy_eval = second_policy_train, \
            second_policy_eval
        self.normalize = normalize
        self.router = SwitchRouter(d_model, E, router_dtype=router_dtype, jitter=jitter,
                                   init_scale=init_scale, rng=rng)

    @property
    def rng(self) -> np.random.Generator:
        return self.router.rng

    @property
    def d_model(self) -> int:
        return self.router.d_model

    @property
    def second_policy(self) -> str:
        return self.second_policy_train if self.training else self.second_policy_eval

    @property
    def current_capacity_factor(self) -> float:
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def forward(self, x: Any, uniform: np.ndarray | None = None,
                jitter_noise: np.ndarray | None = None) -> CapacityRouting:
        x = as_tensor(x)
        logits, probs = self.router(x, jitter_noise=jitter_noise)  # (T, E) each
        check_finite_logits(logits, "Top2Gate")
        policy = self.second_policy
        if policy == "random" and uniform is None:
            uniform = self.rng.random(x.shape[0])  # (T,)
        out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
        return top2_route(logits, probs, self.current_capacity_factor,
                          group_size=self.group_size, second_policy=policy,
                          normalize=self.normalize, uniform=uniform, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, capacity_factor={self.capacity_factor:g}, "
                f"group_size={self.group_size}, normalize={self.normalize!r}, "
                f"second_policy={self.second_policy_train!r}/{self.second_policy_eval!r}")
