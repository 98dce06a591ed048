"""The top-k softmax router of Mixtral (Jiang et al. 2024) and DeepSeekMoE (Dai et al. 2024).

    l = x · W_g                              router logits, (T, E), no bias
    p = softmax(l)                           over all E experts
    T_x = TopK(p, k)                         the k most probable experts (ties: lowest index)
    w_i = p_i / Σ_{j ∈ T_x} p_j              normalize=True: Mixtral, the k gates sum to 1
    w_i = p_i                                normalize=False: DeepSeekMoE, they sum to < 1
    y = Σ_{i ∈ T_x} w_i · FFN_i(x)

Mixtral's paper (§2.1) writes the gate as ``Softmax(TopK(x · W_g))``: the logits outside the
top k are set to -inf and a softmax is taken over the k that remain. That is the same number
as the renormalised probabilities above, because the softmax's denominator cancels::

    e^{l_i} / Σ_{j∈T_x} e^{l_j} = (e^{l_i}/Z) / (Σ_{j∈T_x} e^{l_j}/Z) = p_i / Σ_{j∈T_x} p_j

HF's ``MixtralSparseMoeBlock`` computes it the second way (softmax in float32, top-k, divide
by the sum), and so do we. DeepSeekMoE (§3.2, with shared experts, and its 16B model's
``norm_topk_prob=False``) keeps the raw ``p_i``: the routed gates then sum to less than 1 and
the shared experts (:func:`~tinymoe.moe.layer.moe_layer`, ``num_shared``) carry the rest.
With k = 1 and ``normalize=True`` every gate is exactly 1 and the router gets no gradient
from the task loss, only from the auxiliary loss: use ``normalize=False`` (Switch's raw p)
for top-1.

Routing is **dropless** (no capacity, as Mixtral's implementations with MegaBlocks): every
expert processes all the tokens that chose it, as sorted rows and one grouped matmul.

Load balancing, for T tokens each with k choices (:func:`topk_balance_loss`)::

    f_i = (1 / (T·k)) Σ_t Σ_{j=1..k} 1{e_tj = i}     share of the T·k (token, choice) pairs
    P_i = (1 / T) Σ_t p_i(x_t)                        mean router probability
    loss = E · Σ_i f_i · P_i                          1 under uniform routing, for any k

The router keeps the stability measures of the Switch Transformer (Fedus et al. 2021, §2.4):
selective precision (``router_dtype``, float32 by default) and the truncated-normal
initialisation with ``init_scale`` 0.1 (HF's Mixtral instead draws every Linear, the router
included, from N(0, 0.02²), its ``initializer_range``); the optional z-loss is ST-MoE's.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops, validate
from tinymoe.dispatch.routing import Routing, route
from tinymoe.moe.aux_losses import router_z_loss
from tinymoe.moe.layer import MoELayer
from tinymoe.moe.precision import router_dtype as check_router_dtype
from tinymoe.moe.router_weight import (INIT_SCALE, check_finite_logits, out_dtype,
                                       router_probabilities, router_weight)
from tinymoe.moe.swiglu import SwiGLUExperts
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor, as_tensor


def _choices(expert_index: Any, T: int, E: int, op: str) -> np.ndarray:
    """``expert_index`` as a (T, k) integer array in [0, E) ((T,) counts as k = 1)."""
    e = np.asarray(expert_index.data if isinstance(expert_index, Tensor) else expert_index)
    if e.ndim == 1:
        e = e[:, None]  # (T, 1)
    if e.ndim != 2 or e.shape[0] != T or e.shape[1] < 1:
        raise ValueError(f"{op}: expert_index has shape {e.shape}, expected (T, k) = ({T}, k) "
                         f"with k >= 1: the chosen experts of the {T} tokens of router_probs")
    if not np.issubdtype(e.dtype, np.integer):
        raise TypeError(f"{op}: expert_index must hold integers, got dtype {e.dtype}")
    if e.size and (e.min() < 0 or e.max() >= E):
        raise ValueError(f"{op}: expert_index must lie in [0, {E}) for E = {E} experts, got "
                         f"min {e.min()} max {e.max()}")
    return e


def topk_balance_loss(router_probs: Any, expert_index: Any) -> Tensor:
    """``E · Σ_i f_i · P_i`` for top-k routing (no coefficient): a scalar Tensor.

    ``router_probs`` (T, E) the softmax probabilities p(x_t); ``expert_index`` (T, k) the
    chosen experts (counted as chosen, before anything else could drop them). ``f_i`` is the
    share of the T·k (token, choice) pairs that go to expert i (a count: no gradient),
    ``P_i`` the mean of ``p_i`` over the tokens (the gradient flows through it). Under
    uniform routing ``f_i = P_i = 1/E``, so the loss is **1 for any k** (and any E); it grows
    as the routing concentrates, up to E when every pair goes to one expert that has all
    the probability.

    Conventions: HF transformers' Mixtral ``load_balancing_loss_func``
    keeps one ``f`` per choice slot (``tokens_per_expert`` of shape (k, E)) and sums over
    the k slots, so its uniform value is k: k times ours. DeepSeekMoE's expert-level loss
    ``Σ_i f_i P_i`` with ``f_i = N'/(K'T) Σ_t 1(token t selects i)`` scales f so that
    ``f_i = 1`` at uniform: ``N'/(K'T)·count_i = E · count_i/(T·k)``, the same number as
    ours (with N' = E routed experts and K' = k).
    """
    p = as_tensor(router_probs)
    if p.ndim != 2:
        raise ValueError(f"topk_balance_loss: router_probs must be (T, E) (tokens, experts), "
                         f"got shape {p.shape}; flatten the leading axes first")
    T, E = p.shape
    e = _choices(expert_index, T, E, "topk_balance_loss")  # (T, k)
    if T == 0:
        return Tensor(np.zeros((), dtype=p.dtype))  # no tokens, nothing to balance
    ### BEGIN SOLUTION task6_1
    f = np.bincount(e.reshape(-1), minlength=E) / e.size  # (E,) share of the T·k pairs
    P = p.mean(axis=0)                                     # (E,) mean probability
    loss = (P * f.astype(p.dtype)).sum() * float(E)        # E · Σ_i f_i P_i
    ### END SOLUTION
    return loss


def topk_gates(probs: Tensor, k: int, normalize: bool = True) -> tuple[np.ndarray, Tensor]:
    """Top-k selection and the combine weights: ``(expert_index (T, k), weight (T, k))``.

    ``expert_index`` holds the k most probable experts of each token, most probable first
    (ties go to the lowest index, as ``ops.topk``); ``weight`` their probabilities,
    divided by their sum when ``normalize`` (Mixtral: equal to a softmax over the k kept
    logits) or raw otherwise (DeepSeekMoE). The selection gets no gradient; the weights do,
    through the kept probabilities (and, renormalised, through their sum).
    """
    ### BEGIN SOLUTION task6_1
    weight, expert_index = ops.topk(probs, k, axis=-1)        # (T, k) each, largest first
    if normalize:
        weight = weight / weight.sum(axis=-1, keepdims=True)  # (T, k) rows sum to 1
    ### END SOLUTION
    return expert_index, weight


class TopKRouter(Module):
    """Mixtral's router (``normalize=True``) or DeepSeekMoE's (``normalize=False``).

    ``W_g`` (d_model, E) Parameter, no bias, stored in float32 (float64 when
    ``router_dtype="float64"``, for gradchecks). ``forward(x)`` for ``x`` (T, d_model)
    computes the logits and the softmax in ``router_dtype`` (selective precision), picks
    the top k experts of each token, and returns a
    :class:`~tinymoe.dispatch.routing.Routing`, dropless (``capacity`` None), with
    ``logits`` (T, E), ``probs`` p (T, E), and the ``aux_losses``

        "balance": aux_loss_coef · topk_balance_loss(p, e),  "z": z_loss_coef · router_z_loss(l)

    (each only when its coefficient is > 0). HF Mixtral's coefficient is 1e-3 on a loss whose
    uniform value is k (= 2): ``aux_loss_coef = 2e-3`` here gives the same gradient.
    The combine weights are cast to the dtype of ``x`` (when it is floating).
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2, *, normalize: bool = True,
                 aux_loss_coef: float = 1e-2, z_loss_coef: float = 0.0,
                 router_dtype: Any = "float32", init_scale: float = INIT_SCALE,
                 rng: RNGLike = None) -> None:
        super().__init__()
        self.d_model = validate.positive_int(d_model, "d_model", "TopKRouter")
        self.num_experts = validate.num_experts(num_experts, "TopKRouter")
        self.k = validate.top_k(k, self.num_experts, "TopKRouter")
        self.normalize = bool(normalize)
        self.aux_loss_coef = validate.coef(aux_loss_coef, "aux_loss_coef", "TopKRouter")
        self.z_loss_coef = validate.coef(z_loss_coef, "z_loss_coef", "TopKRouter")
        self.router_dtype = check_router_dtype(router_dtype, "TopKRouter")
        scale = validate.coef(init_scale, "init_scale", "TopKRouter",
                              "0 starts W_g at zero: every token ties")
        self.rng = as_rng(rng)
        self.W_g = router_weight(self.rng, self.d_model, self.num_experts, self.router_dtype,
                                 scale)  # (d, E)

    def forward(self, x: Any) -> Routing:
        x = as_tensor(x)
        validate.tokens(x, self.d_model, "TopKRouter")
        logits, probs = router_probabilities(x, self.W_g, self.router_dtype)  # (T, E) each
        check_finite_logits(logits, "TopKRouter")
        expert_index, weight = topk_gates(probs, self.k, self.normalize)  # (T, k) each
        if weight.dtype != out_dtype(x):
            weight = weight.astype(out_dtype(x))
        aux = {}
        if self.aux_loss_coef:
            aux["balance"] = topk_balance_loss(probs, expert_index) * self.aux_loss_coef
        if self.z_loss_coef:
            aux["z"] = router_z_loss(logits) * self.z_loss_coef
        return route(expert_index, weight, self.num_experts, probs=probs, logits=logits,
                     aux_losses=aux)  # dropless: capacity None

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
                f"normalize={self.normalize}, aux_loss_coef={self.aux_loss_coef:g}, "
                f"z_loss_coef={self.z_loss_coef:g}, router_dtype={self.router_dtype!r}")


def mixtral_layer(d_model: int, num_experts: int = 8, d_ff: int | None = None, k: int = 2, *,
                  aux_loss_coef: float = 2e-3, z_loss_coef: float = 0.0,
                  router_dtype: Any = "float32", expert_dropout: float = 0.0,
                  init_scale: float = INIT_SCALE, dtype: Any = np.float32,
                  rng: RNGLike = None) -> MoELayer:
    """Mixtral's sparse MoE block (Jiang et al. 2024, §2.1): a :class:`TopKRouter` with
    renormalised top-k gates (``normalize=True``), dropless, over E
    :class:`~tinymoe.moe.swiglu.SwiGLUExperts` of hidden width ``d_ff`` (default 3.5·d,
    Mixtral's 14336 / 4096)::

        y = Σ_{i ∈ TopK(p, k)} (p_i / Σ_{j ∈ TopK} p_j) · SwiGLU_i(x)

    Top-k ties go to the lowest expert index (:func:`tinymoe.ops.topk`'s stable order);
    ``torch.topk`` leaves the order of ties unspecified (on CPU ``topk(zeros(8), 2)``
    returns [6, 5]), so tinymoe and HF agree only on inputs without exact ties.
    ``aux_loss_coef`` 2e-3 is HF's 1e-3 on our loss scale (see :class:`TopKRouter`).
    """
    gen = as_rng(rng)
    d = validate.positive_int(d_model, "d_model", "mixtral_layer")
    f = int(3.5 * d) if d_ff is None else validate.positive_int(d_ff, "d_ff", "mixtral_layer")
    router = TopKRouter(d, num_experts, k, normalize=True, aux_loss_coef=aux_loss_coef,
                        z_loss_coef=z_loss_coef, router_dtype=router_dtype,
                        init_scale=init_scale, rng=gen)
    experts = SwiGLUExperts(num_experts, d, f, dtype=dtype, rng=gen, dropout=expert_dropout)
    return MoELayer(router, experts)
