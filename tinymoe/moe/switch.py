"""The Switch Transformer router (Fedus, Zoph & Shazeer 2021): one expert per token.

    h(x) = x · W_r                    router logits, (T, N)
    p_i(x) = softmax(h(x))_i          over all N experts                      eq. (1)
    y = p_{i*}(x) · E_{i*}(x),        i* = argmax_i p_i(x)                     eq. (2)

The combine weight is the **raw** ``p_{i*}`` (below 1), not renormalised: renormalised over a
single expert it would be the constant 1 and the router would get no gradient from the task
loss. Ties in the argmax go to the lowest expert index.

Stability measures of §2.4, each a parameter here:

* **selective precision** (``router_dtype``, default float32, :mod:`tinymoe.moe.precision`):
  the router's input is cast to float32 and the router body (matmul, softmax) runs in
  float32 whatever the model's dtype; the combine weights are cast back afterwards;
* **input jitter** (``jitter``, ε = 1e-2, training only): the router's input is multiplied by
  noise from U(1 - ε, 1 + ε) (Mesh TensorFlow's ``multiplicative_jitter``; the paper's
  Figure 15 describes the noise as added to the logits, where a shift common to a row
  would change nothing after the softmax);
* **smaller initialisation** (``init_scale``, s = 0.1, :mod:`tinymoe.moe.router_weight`):
  ``W_r`` from a normal with standard deviation ``sqrt(s / fan_in)`` truncated at two
  standard deviations.

The router's losses, with their coefficients applied, are its ``aux_losses``: ``"balance"``
= α · N Σ f_i P_i (eq. 4, α = 1e-2) and ``"z"`` = c_z · L_z (ST-MoE's z-loss, c_z = 1e-3).

Capacity (eq. 3, :func:`~tinymoe.moe.capacity.expert_capacity`): C = ceil(T/N ·
capacity_factor) per group, clamped to [1, T]; the first C tokens of each expert in sequence
order are kept, the others dropped (they leave the layer through the residual unchanged).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops, validate
from tinymoe.dispatch.routing import Routing
from tinymoe.moe.aux_losses import load_balancing_loss, router_z_loss
from tinymoe.moe.capacity import capacity_positions, expert_capacity, num_groups
from tinymoe.moe.experts import StackedExperts
from tinymoe.moe.layer import MoELayer
from tinymoe.moe.precision import router_dtype as check_router_dtype
from tinymoe.moe.router_weight import (INIT_SCALE, check_finite_logits, multiplicative_jitter,
                                       out_dtype, router_probabilities, router_weight)
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor, as_tensor

JITTER_EPS = 1e-2
AUX_LOSS_COEF = 1e-2
Z_LOSS_COEF = 1e-3


def switch_route(logits: Tensor, probs: Tensor, capacity_factor: float, *,
                 group_size: int | None = None, out_dtype: Any = np.float32,
                 aux_loss_coef: float = AUX_LOSS_COEF, z_loss_coef: float = Z_LOSS_COEF
                 ) -> Routing:
    """Top-1 routing with capacity from the router's ``logits`` and ``probs`` (T, N).

    The chosen expert is ``argmax p`` (ties: lowest index); its combine weight is the raw
    ``p_{i*}`` (eq. 2) cast to ``out_dtype``; C = ``expert_capacity(S, N,
    capacity_factor)`` per group of S tokens; the load-balancing loss (eqs. 4-6) and the
    z-loss are computed on the pre-drop choices. ``stats``: ``group_capacity`` C per group
    (the routing's ``capacity`` is G·C), ``num_groups`` G, ``demand`` (E,) choices per expert
    before dropping, ``active`` (T, 1), and the losses before their coefficients,
    ``balance_loss`` (1 at uniform) and ``z_loss``.
    """
    T, N = probs.shape
    G, S = num_groups(T, group_size, "switch_route")
    expert = np.argmax(probs.data, axis=1)[:, None]  # (T, 1) i*, lowest index on ties
    p_top = ops.take_along_axis(probs, expert, axis=1)  # (T, 1) p_{i*}, eq. (2)
    C = expert_capacity(S, N, capacity_factor)
    position, counts = capacity_positions(expert, N, C, group_size=group_size)  # (T, 1), (E,)
    weight = p_top if p_top.dtype == np.dtype(out_dtype) else p_top.astype(out_dtype)
    balance = load_balancing_loss(probs.reshape(G, S, N), expert[:, 0].reshape(G, S))
    z = router_z_loss(logits)
    demand = np.bincount(expert[:, 0], minlength=N).astype(np.int64)  # (E,)
    stats = dict(group_capacity=C, num_groups=G, demand=demand,
                 active=np.ones((T, 1), dtype=bool),
                 balance_loss=balance, z_loss=z)
    aux = {"balance": balance * aux_loss_coef, "z": z * z_loss_coef}  # α · eq. (4), c_z · L_z
    return Routing(expert.astype(np.int64), weight, position, counts, N, G * C, probs=probs,
                   logits=logits, aux_losses=aux, stats=stats)


class SwitchRouter(Module):
    """The Switch layer's router: ``W_r`` (d_model, N), top-1, capacity, balancing losses.

    ``router(x)`` for ``x`` (T, d_model) returns a :class:`~tinymoe.dispatch.routing.Routing`
    with capacity buffers. ``capacity_factor`` applies in training, ``eval_capacity_factor``
    (default: the same) in eval mode. ``group_size``: tokens per group (each group has its
    own C slots per expert; None: the whole batch is one group, the paper's per-core
    capacity on one core). In training mode with ``jitter > 0`` the input is multiplied by
    U(1 - jitter, 1 + jitter) noise from ``self.rng`` (or the ``jitter_noise`` passed to
    ``forward``); in eval mode there is no jitter.
    """

    k = 1

    def __init__(self, d_model: int, num_experts: int, *, capacity_factor: float = 1.0,
                 eval_capacity_factor: float | None = None, group_size: int | None = None,
                 router_dtype: Any = "float32", jitter: float = JITTER_EPS,
                 init_scale: float = INIT_SCALE, aux_loss_coef: float = AUX_LOSS_COEF,
                 z_loss_coef: float = Z_LOSS_COEF, rng: RNGLike = None) -> None:
        super().__init__()
        self.d_model = validate.positive_int(d_model, "d_model", "SwitchRouter")
        self.num_experts = validate.num_experts(num_experts, "SwitchRouter")
        self.capacity_factor = validate.capacity_factor(capacity_factor, "SwitchRouter")
        self.eval_capacity_factor = self.capacity_factor if eval_capacity_factor is None \
            else validate.capacity_factor(eval_capacity_factor, "SwitchRouter (eval)")
        if group_size is not None:
            validate.positive_int(group_size, "group_size", "SwitchRouter")
        self.group_size = group_size
        self.router_dtype = check_router_dtype(router_dtype, "SwitchRouter")
        if not 0.0 <= float(jitter) < 1.0:
            raise ValueError(f"SwitchRouter: jitter={jitter!r} must be in [0, 1) (the paper "
                             f"uses 1e-2; 0 turns it off)")
        self.jitter = float(jitter)
        self.aux_loss_coef = validate.coef(aux_loss_coef, "aux_loss_coef", "SwitchRouter")
        self.z_loss_coef = validate.coef(z_loss_coef, "z_loss_coef", "SwitchRouter")
        self.rng = as_rng(rng)
        self.W_r = router_weight(self.rng, self.d_model, self.num_experts, self.router_dtype,
                                 init_scale)  # (d, N)

    @property
    def current_capacity_factor(self) -> float:
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def forward(self, x: Any, jitter_noise: np.ndarray | None = None) -> Routing:
        x = as_tensor(x)
        validate.tokens(x, self.d_model, "SwitchRouter")
        jitter_noise = multiplicative_jitter(self, x.shape, jitter_noise)  # (T, d) or None
        logits, probs = router_probabilities(x, self.W_r, self.router_dtype,
                                             jitter_noise)  # (T, N) each
        check_finite_logits(logits, "SwitchRouter")
        return switch_route(logits, probs, self.current_capacity_factor,
                            group_size=self.group_size, out_dtype=out_dtype(x),
                            aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, "
                f"capacity_factor={self.capacity_factor:g}, "
                f"eval_capacity_factor={self.eval_capacity_factor:g}, "
                f"group_size={self.group_size}, router_dtype={self.router_dtype!r}, "
                f"jitter={self.jitter:g}")


def switch_layer(d_model: int, num_experts: int, d_ff: int, *, capacity_factor: float = 1.0,
                 eval_capacity_factor: float | None = None, group_size: int | None = None,
                 router_dtype: Any = "float32", jitter: float = JITTER_EPS,
                 aux_loss_coef: float = AUX_LOSS_COEF, z_loss_coef: float = Z_LOSS_COEF,
                 activation: str = "relu", expert_dropout: float = 0.0, residual: bool = False,
                 init_scale: float = INIT_SCALE, dtype: Any = np.float32,
                 rng: RNGLike = None) -> MoELayer:
    """A Switch layer: a :class:`SwitchRouter` and N FFN experts (Switch-initialised, hidden
    width ``d_ff``, expert dropout on their hidden units) as an
    :class:`~tinymoe.moe.layer.MoELayer`. The routing arguments go to the router."""
    gen = as_rng(rng)
    router = SwitchRouter(d_model, num_experts, capacity_factor=capacity_factor,
                          eval_capacity_factor=eval_capacity_factor, group_size=group_size,
                          router_dtype=router_dtype, jitter=jitter, init_scale=init_scale,
                          aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, rng=gen)
    experts = StackedExperts(num_experts, d_model, d_ff, activation, dtype=dtype, rng=gen,
                             dropout=expert_dropout).switch_init_(gen, init_scale)
    return MoELayer(router, experts, residual=residual)
