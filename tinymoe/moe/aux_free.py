"""DeepSeek-V3's auxiliary-loss-free load balancing (Wang et al. 2024; DeepSeek-V3 §2.1.2).

Sigmoid affinities, a bias that only chooses, gates from the unbiased affinities::

    s_{i,t} = sigmoid(u_t · e_i)                      affinity of token t for expert i, (T, E)
    K_t = TopK({s_{j,t} + b_j}, k)                    the bias b (E,) shifts the *selection*
    g'_{i,t} = s_{i,t} if i ∈ K_t, else 0             ... but the gate is the plain s
    g_{i,t} = route_scale · g'_{i,t} / Σ_j g'_{j,t}   normalised over the k chosen

"The bias term is only used for routing": the gate values never see b, so b gets no
gradient and changes the output only through *which* experts are chosen. Instead of a
balancing loss, b is moved by a fixed step after every training batch, against the load::

    b_i <- b_i + γ · sign(mean(load) - load_i)        γ = bias_update_speed

where ``load_i`` counts the batch's (token, choice) pairs sent to expert i: an overloaded
expert (above the mean) loses γ, an underloaded one gains γ. The paper states the rule as
"decrease by γ if overloaded, increase if underloaded"; writing it with ``sign`` is the
implementations' convention, under which an expert exactly at the mean is left unchanged.
DeepSeek-V3 used γ = 1e-3 for the first 14.3T tokens and γ = 0 for the last 500B.

A small complementary **sequence-wise** balance loss guards against extreme imbalance
within one sequence (α = 1e-4 in V3), for the T tokens of a sequence::

    s'_{i,t} = s_{i,t} / Σ_j s_{j,t}                  affinities normalised per token
    f_i = E / (k·T) · Σ_t 1{i ∈ K_t}                  1 for every expert under uniform routing
    P_i = (1/T) Σ_t s'_{i,t}
    L_Bal = α · Σ_i f_i · P_i                         1·α under uniform routing

``f_i`` counts the experts actually chosen (with the bias), as the implementations do; the
paper's formula writes the top-k of s alone. Routing is dropless (V3 drops no tokens). Not
modelled here: V3's group-limited (node-limited) selection, which first keeps the top 4 of
8 expert groups.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops, validate
from tinymoe.dispatch.routing import Routing, route
from tinymoe.moe.precision import RoundBFloat16
from tinymoe.moe.precision import router_dtype as check_router_dtype
from tinymoe.moe.router_weight import (INIT_SCALE, check_finite_logits, out_dtype,
                                       router_logits, router_weight)
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.module import Module, Parameter
from tinymoe.tensor import Tensor, as_tensor

BIAS_UPDATE_SPEED = 1e-3
SEQ_AUX_LOSS_COEF = 1e-4
NORMALIZE_EPS = 1e-20  # HF DeepseekV3's guard on the sum of the k gates


def check_speed(speed: Any, where: str) -> float:
    """The bias update speed γ: a finite number >= 0."""
    return validate.coef(speed, "bias_update_speed", where,
                         "DeepSeek-V3 uses 1e-3; 0 turns the bias updates off")


def bias_update(bias: Any, load: Any, speed: float) -> np.ndarray:
    """The new bias ``b + γ · sign(mean(load) - load)``, (E,), in the dtype of ``bias``.

    ``bias`` (E,) the current selection bias, ``load`` (E,) the (token, choice) pairs each
    expert received in the batch, ``speed`` γ >= 0. Overloaded experts (load above the
    mean) go down by γ, underloaded ones up by γ, an expert exactly at the mean stays (the
    ``sign`` convention of the implementations). Pure: ``bias`` is not modified.
    """
    b = np.asarray(bias.data if isinstance(bias, Tensor) else bias)
    load = np.asarray(load.data if isinstance(load, Tensor) else load)
    if b.ndim != 1 or load.shape != b.shape:
        raise ValueError(f"bias_update: bias and load must both be (E,), got shapes {b.shape} "
                         f"and {load.shape}; pass the per-expert counts, e.g. "
                         f"Routing.counts")
    if not np.issubdtype(b.dtype, np.floating):
        raise TypeError(f"bias_update: bias must be floating, got dtype {b.dtype}")
    speed = check_speed(speed, "bias_update")
    load = load.astype(np.float64)
    ### BEGIN SOLUTION task6_3
    error = load.mean() - load              # (E,) > 0 underloaded, < 0 overloaded
    new_bias = b + speed * np.sign(error)   # (E,) ±γ, unchanged exactly at the mean
    ### END SOLUTION
    return np.asarray(new_bias, dtype=b.dtype)


def sequence_balance_loss(scores: Any, expert_index: Any,
                          sequence_length: int | None = None) -> Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, without α: a scalar Tensor.

    ``scores`` (T, E) the sigmoid affinities s; ``expert_index`` (T, k) the chosen experts.
    Per sequence of ``sequence_length`` L consecutive tokens (None: the whole batch is one
    sequence): ``Σ_i f_i P_i`` with ``f_i = E/(k L) Σ_t 1{i chosen by t}`` (no gradient)
    and ``P_i`` the mean over the sequence of ``s'_i = s_i / Σ_j s_j``; the mean over the
    sequences. 1 under uniform routing. T must be a multiple of L.
    """
    s = as_tensor(scores)
    if s.ndim != 2:
        raise ValueError(f"sequence_balance_loss: scores must be (T, E), got shape {s.shape}")
    T, E = s.shape
    e = np.asarray(expert_index.data if isinstance(expert_index, Tensor) else expert_index)
    if e.ndim != 2 or e.shape[0] != T or not np.issubdtype(e.dtype, np.integer):
        raise ValueError(f"sequence_balance_loss: expert_index must be (T, k) = ({T}, k) "
                         f"integers, got shape {e.shape} dtype {e.dtype}")
    if e.size and (e.min() < 0 or e.max() >= E):
        raise ValueError(f"sequence_balance_loss: expert_index must lie in [0, {E}), got min "
                         f"{e.min()} max {e.max()}")
    L = T if sequence_length is None else sequence_length
    if sequence_length is not None and (isinstance(L, bool) or not isinstance(
            L, (int, np.integer)) or L < 1 or T % L):
        raise ValueError(f"sequence_balance_loss: {T} tokens do not split into sequences of "
                         f"sequence_length={sequence_length}; pass a positive divisor of T "
                         f"(or None: the batch is one sequence)")
    if T == 0:
        return Tensor(np.zeros((), dtype=s.dtype))  # no tokens, nothing to balance
    L = int(L)
    n, k = T // L, e.shape[1]
    seq = np.repeat(np.arange(n), L * k)  # (n·L·k,) the sequence of every (token, choice)
    counts = np.zeros((n, E))
    np.add.at(counts, (seq, e.reshape(-1)), 1.0)  # (n, E)
    f = (counts * (E / (k * L))).astype(s.dtype)  # (n, E) 1 at uniform, no gradient
    s_norm = s / s.sum(axis=1, keepdims=True)  # (T, E) s' per token
    P = s_norm.reshape(n, L, E).mean(axis=1)  # (n, E)
    return (P * f).sum(axis=1).mean()


def aux_free_gates(scores: Tensor, bias: np.ndarray, k: int, route_scale: float = 1.0
                   ) -> tuple[np.ndarray, Tensor]:
    """``(expert_index (T, k), weight (T, k))``: top-k of ``s + b``, gates from ``s``.

    The selection uses ``scores.data + bias`` (ties to the lowest index); the weights are
    the chosen unbiased affinities normalised to sum 1, times ``route_scale``. ``bias``
    enters as plain numbers, so it can never receive a gradient.
    """
    biased = Tensor(scores.data + np.asarray(bias, dtype=scores.dtype))  # (T, E) a constant
    _, expert_index = ops.topk(biased, k, axis=-1)  # (T, k) by s + b
    g = ops.take_along_axis(scores, expert_index, axis=1)  # (T, k) g' = s, not s + b
    weight = g / (g.sum(axis=1, keepdims=True) + NORMALIZE_EPS)  # (T, k) sums to 1
    if route_scale != 1.0:
        weight = weight * route_scale
    return expert_index, weight


class AuxFreeRouter(Module):
    """DeepSeek-V3's router: sigmoid affinities, a selection bias, sign-rule bias updates.

    ``W_g`` (d_model, E) Parameter (float32; float64 with ``router_dtype="float64"``), and
    ``bias`` (E,) the selection bias b, starting at 0. ``bias`` is a Parameter so that
    ``state_dict`` and checkpoints keep it, but it is **never** given a gradient (it enters
    the selection as plain numbers): its ``.grad`` stays None, so optimizers (and their
    weight decay) skip it. It changes only through :meth:`update_bias`.

    ``forward(x)`` for ``x`` (T, d_model) returns a
    :class:`~tinymoe.dispatch.routing.Routing` (dropless, ``logits`` (T, E), ``probs`` the
    sigmoid affinities s (T, E), ``aux_losses["sequence_balance"]`` = ``seq_aux_loss_coef ·``
    :func:`sequence_balance_loss` when the coefficient is > 0) and sets ``last_load`` (E,),
    the batch's (token, choice) pairs per expert. In **training** mode
    with ``bias_update_speed > 0`` it then calls ``update_bias(last_load)``: the update
    comes *after* this batch was routed, so it takes effect from the next batch (one
    forward = one training step; with gradient accumulation or several forwards per step,
    set the speed to 0 and call :meth:`update_bias` yourself with the summed load). Eval
    mode never updates. ``sequence_length``: tokens per sequence for the balance loss (None:
    the batch is one sequence); ``route_scale`` multiplies the gates (V3: 2.5).
    """

    def __init__(self, d_model: int, num_experts: int, k: int, *,
                 bias_update_speed: float = BIAS_UPDATE_SPEED,
                 seq_aux_loss_coef: float = SEQ_AUX_LOSS_COEF, route_scale: float = 1.0,
                 sequence_length: int | None = None, router_dtype: Any = "float32",
                 init_scale: float = INIT_SCALE, rng: RNGLike = None) -> None:
        super().__init__()
        self.d_model = validate.positive_int(d_model, "d_model", "AuxFreeRouter")
        self.num_experts = validate.num_experts(num_experts, "AuxFreeRouter")
        self.k = validate.top_k(k, self.num_experts, "AuxFreeRouter")
        self.bias_update_speed = check_speed(bias_update_speed, "AuxFreeRouter")
        self.seq_aux_loss_coef = validate.coef(seq_aux_loss_coef, "seq_aux_loss_coef",
                                               "AuxFreeRouter")
        scale = validate.coef(route_scale, "route_scale", "AuxFreeRouter")
        if scale == 0:
            raise ValueError("AuxFreeRouter: route_scale=0 would zero every gate; pass a "
                             "positive scale (1.0, or DeepSeek-V3's 2.5)")
        self.route_scale = scale
        if sequence_length is not None:
            validate.positive_int(sequence_length, "sequence_length", "AuxFreeRouter")
        self.sequence_length = sequence_length
        self.router_dtype = check_router_dtype(router_dtype, "AuxFreeRouter")
        self.rng = as_rng(rng)
        self.W_g = router_weight(self.rng, self.d_model, self.num_experts, self.router_dtype,
                                 validate.coef(init_scale, "init_scale", "AuxFreeRouter"))  # (d, E)
        self.bias = Parameter(np.zeros(self.num_experts, dtype=self.W_g.dtype))  # (E,) no grad
        self.last_load: np.ndarray | None = None

    def update_bias(self, load: Any) -> None:
        """``b <- b + γ · sign(mean(load) - load)`` in place, with γ = bias_update_speed."""
        self.bias.data[...] = bias_update(self.bias.data, load, self.bias_update_speed)

    def forward(self, x: Any) -> Routing:
        x = as_tensor(x)
        validate.tokens(x, self.d_model, "AuxFreeRouter")
        logits = router_logits(x, self.W_g, self.router_dtype)  # (T, E) selective precision
        check_finite_logits(logits, "AuxFreeRouter")
        scores = ops.sigmoid(logits)  # (T, E) s, affinities in (0, 1)
        if self.router_dtype == "bfloat16":
            scores = RoundBFloat16.apply(scores)
        expert_index, weight = aux_free_gates(scores, self.bias.data, self.k,
                                              self.route_scale)  # (T, k) each
        if weight.dtype != out_dtype(x):
            weight = weight.astype(out_dtype(x))
        aux = {}
        if self.seq_aux_loss_coef:
            if self.sequence_length is not None and x.shape[0] % self.sequence_length:
                raise ValueError(f"AuxFreeRouter: {x.shape[0]} tokens are not a whole number "
                                 f"of sequences of sequence_length={self.sequence_length}; "
                                 f"pass whole sequences or set sequence_length=None")
            aux["sequence_balance"] = sequence_balance_loss(
                scores, expert_index, self.sequence_length) * self.seq_aux_loss_coef
        self.last_load = np.bincount(expert_index.reshape(-1),
                                     minlength=self.num_experts).astype(np.int64)  # (E,)
        if self.training and self.bias_update_speed > 0:
            self.update_bias(self.last_load)  # after routing: applies from the next batch
        return route(expert_index, weight, self.num_experts, probs=scores, logits=logits,
                     aux_losses=aux)  # dropless: capacity None

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
                f"bias_update_speed={self.bias_update_speed:g}, "
                f"seq_aux_loss_coef={self.seq_aux_loss_coef:g}, "
                f"route_scale={self.route_scale:g}, router_dtype={self.router_dtype!r}")
