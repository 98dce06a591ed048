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
  is deterministic (DeepSpeed's ``top2gating`` samples in eval too). ``"none"`` never
  uses the second expert;
* **normalise before or after dropping** (``normalize``): ``"before"`` (default, GShard's
  Algorithm 1 and Mesh TF) divides by ``g1 + g2`` first, so a token whose second expert is
  dropped keeps ``g1 < 1``; ``"after"`` (fairseq, DeepSpeed) renormalises over the choices
  that survived, so a lone survivor gets weight 1 (denominator clamped at 1e-9). The random
  test always uses the normalised ``g2 / (g1 + g2)``;
* **auxiliary loss**: ``ℓ_aux · E²`` with ``c_e`` the first choices before dropping, so it
  is 1 under uniform routing (:func:`~tinymoe.moe.aux_losses.gshard_aux_loss`), one value
  per group, averaged;
* the gates are computed in ``router_dtype`` (float32 by default, as Mesh TF) from a
  weight ``W_g`` initialised like every learned router here
  (:mod:`tinymoe.moe.router_weight`); input jitter is off by default (GShard used none).

The losses, with their coefficients applied, are the router's ``aux_losses``:
``"balance"`` (the auxiliary loss above) and ``"z"`` (the router z-loss of ST-MoE, Zoph et
al. 2022, off by default here since GShard had none).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops, validate
from tinymoe.dispatch.routing import Routing
from tinymoe.moe.aux_losses import gshard_aux_loss, router_z_loss
from tinymoe.moe.capacity import capacity_positions, expert_capacity, num_groups
from tinymoe.moe.experts import StackedExperts
from tinymoe.moe.layer import MoELayer
from tinymoe.moe.precision import router_dtype as check_router_dtype
from tinymoe.moe.router_weight import (INIT_SCALE, check_finite_logits, multiplicative_jitter,
                                       out_dtype, router_probabilities, router_weight)
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor, as_tensor

AUX_LOSS_COEF = 1e-2
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
               out_dtype: Any = np.float32, aux_loss_coef: float = AUX_LOSS_COEF,
               z_loss_coef: float = 0.0) -> Routing:
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
    balance = gshard_aux_loss(probs.reshape(G, S, E), e1.reshape(G, S))
    z = router_z_loss(logits)
    demand = np.bincount(expert[active], minlength=E).astype(np.int64)  # (E,)
    stats = dict(group_capacity=C, num_groups=G, demand=demand, active=active,
                 balance_loss=balance, z_loss=z)
    aux = {"balance": balance * aux_loss_coef, "z": z * z_loss_coef}
    return Routing(expert.astype(np.int64), weight, position, counts, E, G * C, probs=probs,
                   logits=logits, aux_losses=aux, stats=stats)


class Top2Gate(Module):
    """GShard's gate as a Module: ``W_g`` (d_model, E), top-2, capacity, random routing.

    ``gate(x)`` for ``x`` (T, d_model) returns a :class:`~tinymoe.dispatch.routing.Routing`
    with capacity buffers. The random routing draws from ``self.rng`` unless ``uniform``
    (T,) is passed to ``forward``; so does the input jitter, when ``jitter > 0``.
    """

    k = 2

    def __init__(self, d_model: int, num_experts: int, *, capacity_factor: float = 1.0,
                 eval_capacity_factor: float | None = None, group_size: int | None = None,
                 second_policy_train: str = "random", second_policy_eval: str = "all",
                 normalize: str = "before", router_dtype: Any = "float32",
                 jitter: float = 0.0, init_scale: float = INIT_SCALE,
                 aux_loss_coef: float = AUX_LOSS_COEF, z_loss_coef: float = 0.0,
                 rng: RNGLike = None) -> None:
        super().__init__()
        self.d_model = validate.positive_int(d_model, "d_model", "Top2Gate")
        E = validate.num_experts(num_experts, "Top2Gate")
        if E < 2:
            raise ValueError(f"Top2Gate: top-2 gating needs num_experts >= 2, got {E}")
        self.num_experts = E
        self.capacity_factor = validate.capacity_factor(capacity_factor, "Top2Gate")
        self.eval_capacity_factor = self.capacity_factor if eval_capacity_factor is None \
            else validate.capacity_factor(eval_capacity_factor, "Top2Gate (eval)")
        if group_size is not None:
            validate.positive_int(group_size, "group_size", "Top2Gate")
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
        self.router_dtype = check_router_dtype(router_dtype, "Top2Gate")
        if not 0.0 <= float(jitter) < 1.0:
            raise ValueError(f"Top2Gate: jitter={jitter!r} must be in [0, 1) (0 turns it off)")
        self.jitter = float(jitter)
        self.aux_loss_coef = validate.coef(aux_loss_coef, "aux_loss_coef", "Top2Gate")
        self.z_loss_coef = validate.coef(z_loss_coef, "z_loss_coef", "Top2Gate")
        self.rng = as_rng(rng)
        self.W_g = router_weight(self.rng, self.d_model, E, self.router_dtype,
                                 init_scale)  # (d, E)

    @property
    def second_policy(self) -> str:
        return self.second_policy_train if self.training else self.second_policy_eval

    @property
    def current_capacity_factor(self) -> float:
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def forward(self, x: Any, uniform: np.ndarray | None = None,
                jitter_noise: np.ndarray | None = None) -> Routing:
        x = as_tensor(x)
        validate.tokens(x, self.d_model, "Top2Gate")
        jitter_noise = multiplicative_jitter(self, x.shape, jitter_noise)  # (T, d) or None
        logits, probs = router_probabilities(x, self.W_g, self.router_dtype,
                                             jitter_noise)  # (T, E) each
        check_finite_logits(logits, "Top2Gate")
        policy = self.second_policy
        if policy == "random" and uniform is None:
            uniform = self.rng.random(x.shape[0])  # (T,)
        return top2_route(logits, probs, self.current_capacity_factor,
                          group_size=self.group_size, second_policy=policy,
                          normalize=self.normalize, uniform=uniform, out_dtype=out_dtype(x),
                          aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, "
                f"capacity_factor={self.capacity_factor:g}, group_size={self.group_size}, "
                f"normalize={self.normalize!r}, "
                f"second_policy={self.second_policy_train!r}/{self.second_policy_eval!r}")


def gshard_layer(d_model: int, num_experts: int, d_ff: int, *, capacity_factor: float = 1.0,
                 eval_capacity_factor: float | None = None, group_size: int | None = None,
                 second_policy_train: str = "random", second_policy_eval: str = "all",
                 normalize: str = "before", router_dtype: Any = "float32", jitter: float = 0.0,
                 aux_loss_coef: float = AUX_LOSS_COEF, z_loss_coef: float = 0.0,
                 activation: str = "relu", expert_dropout: float = 0.0, residual: bool = False,
                 init_scale: float = INIT_SCALE, dtype: Any = np.float32,
                 rng: RNGLike = None) -> MoELayer:
    """A GShard layer: a :class:`Top2Gate` and E FFN experts (initialised like Switch's, the
    truncated normal of :func:`~tinymoe.nn.init.switch_init`) as an
    :class:`~tinymoe.moe.layer.MoELayer`. The routing arguments go to the gate."""
    gen = as_rng(rng)
    gate = Top2Gate(d_model, num_experts, capacity_factor=capacity_factor,
                    eval_capacity_factor=eval_capacity_factor, group_size=group_size,
                    second_policy_train=second_policy_train,
                    second_policy_eval=second_policy_eval, normalize=normalize,
                    router_dtype=router_dtype, jitter=jitter, init_scale=init_scale,
                    aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, rng=gen)
    experts = StackedExperts(num_experts, d_model, d_ff, activation, dtype=dtype, rng=gen,
                             dropout=expert_dropout).switch_init_(gen, init_scale)
    return MoELayer(gate, experts, residual=residual)
