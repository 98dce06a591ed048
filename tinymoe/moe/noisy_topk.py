"""Noisy top-k gating (Shazeer et al. 2017, §2.1 and Appendix A), faithful to tensor2tensor.

The gate of the sparsely-gated MoE layer, eqs. (3)-(5)::

    H(x)_i = (x·W_g)_i + ε_i · (Softplus((x·W_noise)_i) + noise_epsilon)     ε_i ~ N(0, 1)
    G(x)   = Softmax(KeepTopK(H(x), k))          KeepTopK sets all but the k largest to -inf

so only k experts get a nonzero gate and the k kept gates sum to 1. ``noise_epsilon = 1e-2``
is tensor2tensor's (not in the paper's equation): it keeps the noise scale σ > 0.

The smooth load estimator, eqs. (8)-(10): ``P(x, i)`` is the probability that expert ``i``
stays in the top k when only its own noise is drawn again::

    P(x, i) = Φ( ((x·W_g)_i − kth_excluding(H(x), k, i)) / σ_i )
    Load(X)_i = Σ_x P(x, i)

``kth_excluding(v, k, i)`` is the k-th largest entry of ``v`` once ``v_i`` is removed. The
top-(k+1) trick computes it for every ``i`` at once: if ``i`` is in the top k, removing it
moves the (k+1)-th largest up to k-th place; otherwise the k-th largest is unchanged.

Conventions (those of tensor2tensor's ``noisy_top_k_gating``, the paper's own code):

- ties in the top-k go to the lower expert index (``tm.functional.topk``); with the zero
  initialisation and no noise every token therefore goes to experts ``0 .. k-1``;
- "in the top k" for the estimator uses the strict ``H_i > (k+1)-th value`` of t2t;
- the thresholds are gathered values of ``H``, so the load loss back-propagates into the
  logits of the threshold experts too (as in t2t);
- noise is on only in training (``gate.training``) with ``noisy_gating=True``; in eval ``H`` is
  the clean logits and ``load`` is the hard count of tokens per expert (t2t's
  ``_gates_to_load``), which is also used when ``k == E`` (no (k+1)-th value exists).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tinymoe import ops, validate
from tinymoe.dispatch.routing import Routing, route
from tinymoe.moe.balance import balance_loss
from tinymoe.moe.experts import StackedExperts
from tinymoe.moe.layer import MoELayer
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.module import Module, Parameter
from tinymoe.tensor import Tensor, as_tensor

NOISE_EPSILON = 1e-2


def expert_counts(expert_index: np.ndarray, num_experts: int) -> np.ndarray:
    """(E,) how many (token, choice) pairs went to each expert."""
    return np.bincount(np.asarray(expert_index).reshape(-1),
                       minlength=num_experts).astype(np.int64)  # (E,)


def kth_excluding(v: np.ndarray | Tensor, k: int, i: int | None = None) -> np.ndarray:
    """The definition in the paper (eq. 9): the k-th largest entry of ``v`` excluding ``v_i``.

    ``v`` is ``(..., E)``. With ``i`` given the result is ``(...)``; with ``i=None`` it is
    ``(..., E)``, entry ``i`` being ``kth_excluding(v, k, i)``. Costs O(E² log E) per row:
    this is the clear reference that :func:`kth_excluding_top` (the trick) is tested against.
    Needs ``1 <= k <= E - 1`` (after removing one entry only E - 1 remain).
    """
    v = np.asarray(v.data if isinstance(v, Tensor) else v)
    E = v.shape[-1]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= E - 1:
        raise ValueError(f"kth_excluding: k={k!r} must be in [1, E-1] = [1, {E - 1}] for a "
                         f"vector of {E} entries (excluding one leaves {E - 1})")
    if i is not None:
        others = np.delete(v, i, axis=-1)  # (..., E-1)
        return -np.sort(-others, axis=-1)[..., k - 1]  # (...)
    eye = np.eye(E, dtype=bool)  # (E, E): row i masks entry i
    excluded = np.where(eye, -np.inf, v[..., None, :])  # (..., E, E)
    return -np.sort(-excluded, axis=-1)[..., k - 1]  # (..., E)


def kth_excluding_top(H: Tensor, top_values: Tensor, k: int) -> Tensor:
    """``kth_excluding(H, k, i)`` for every ``i`` at once, from the top k+1 values of ``H``.

    ``top_values`` is ``(T, m)``, ``m >= k + 1``, sorted largest first (from ``topk``). If
    ``H_i`` is in the top k, the k-th largest of the others is the (k+1)-th largest overall
    (``top_values[:, k]``); otherwise it is the k-th largest overall (``top_values[:, k-1]``).
    Equal to :func:`kth_excluding` even with ties (tied values are equal values).
    The result is differentiable: gradients go to the logits the thresholds came from.
    """
    ### BEGIN SOLUTION task3_2
    threshold_if_in = top_values[:, k:k + 1]  # (T, 1) the (k+1)-th largest
    threshold_if_out = top_values[:, k - 1:k]  # (T, 1) the k-th largest
    is_in = H.data > threshold_if_in.data  # (T, E) strict, as t2t: a tie counts as out
    return ops.where(is_in, threshold_if_in, threshold_if_out)  # (T, E)
    ### END SOLUTION


def prob_in_top_k(clean_logits: Tensor, H: Tensor, noise_stddev: Tensor, top_values: Tensor,
                  k: int) -> Tensor:
    """The smooth load estimator, eq. (9):
    ``P(x, i) = Φ((clean_i − kth_excluding(H, k, i)) / σ_i)``.

    ``clean_logits``, ``H`` and ``noise_stddev`` are ``(T, E)``; ``top_values`` the top
    ``k+1`` entries of ``H`` per row, largest first. The clean logit is compared with a
    threshold made of *noisy* values, exactly as in eq. (9). Returns ``(T, E)``.
    """
    ### BEGIN SOLUTION task3_3
    threshold = kth_excluding_top(H, top_values, k)  # (T, E)
    return ops.normal_cdf((clean_logits - threshold) / noise_stddev)  # (T, E)
    ### END SOLUTION


def noisy_logits(x: Tensor, W_g: Tensor, W_noise: Tensor, noise: np.ndarray | None,
                 noise_epsilon: float = NOISE_EPSILON) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(clean, H, σ)`` for inputs ``x`` (T, d), eq. (4) with t2t's epsilon.

    ``clean = x·W_g``; with ``noise`` (a (T, E) standard-normal sample) ``σ =
    Softplus(x·W_noise) + noise_epsilon`` and ``H = clean + noise·σ``; without noise ``H =
    clean`` and ``σ`` is None.
    """
    clean = x @ W_g  # (T, E)
    if noise is None:
        return clean, clean, None
    ### BEGIN SOLUTION task3_1
    sigma = ops.softplus(x @ W_noise) + noise_epsilon  # (T, E)
    H = clean + noise * sigma  # (T, E) eq. (4)
    ### END SOLUTION
    return clean, H, sigma


def keep_top_k_softmax(H: Tensor, k: int) -> tuple[np.ndarray, Tensor, Tensor]:
    """Eqs. (3) and (5): ``Softmax(KeepTopK(H, k))`` computed on the kept values only.

    Returns ``(expert_index (T, k), combine_weight (T, k), top_values (T, m))`` with
    ``m = min(k + 1, E)``: the (k+1)-th value is what the load estimator needs. The softmax
    over the k kept logits equals a softmax over all E with the others at -inf.
    """
    E = H.shape[1]
    top_values, top_index = ops.topk(H, min(k + 1, E), axis=1)  # (T, m) each
    ### BEGIN SOLUTION task3_1
    combine_weight = ops.softmax(top_values[:, :k], axis=1)  # (T, k) eq. (3)
    ### END SOLUTION
    return top_index[:, :k], combine_weight, top_values


def dense_gates(expert_index: np.ndarray, combine_weight: Tensor, num_experts: int) -> Tensor:
    """The (T, E) gate matrix G(x): ``combine_weight[t, j]`` at ``[t, expert_index[t, j]]``."""
    onehot = ops.one_hot(expert_index, num_experts, dtype=combine_weight.dtype)  # (T, k, E)
    return (ops.unsqueeze(combine_weight, -1) * onehot).sum(axis=1)  # (T, E)


def _check_inputs(x: Tensor, W_g: Tensor, noise: np.ndarray | None) -> None:
    if x.ndim != 2:
        raise ValueError(f"noisy_top_k_gating: x must be (T, d), got shape {x.shape}; "
                         f"flatten the leading axes first, e.g. x.reshape(-1, d)")
    if x.shape[1] != W_g.shape[0]:
        raise ValueError(f"noisy_top_k_gating: x of shape {x.shape} does not fit W_g of "
                         f"shape {W_g.shape}: input width {x.shape[1]} != d_model "
                         f"{W_g.shape[0]}; feed tokens of width {W_g.shape[0]}")
    if noise is not None and np.shape(noise) != (x.shape[0], W_g.shape[1]):
        raise ValueError(f"noisy_top_k_gating: noise has shape {np.shape(noise)} but the "
                         f"logits are (T, E) = {(x.shape[0], W_g.shape[1])}; draw one "
                         f"standard-normal value per token and expert")


def _check_finite(name: str, a: Tensor, rows: str = "token", cols: str = "expert") -> None:
    """NaN or inf in the router's input, weights or logits: a readable error, not a bad route."""
    validate.finite(a, name, "noisy_top_k_gating", rows, cols)


def noisy_top_k_gating(x: Tensor, W_g: Tensor, W_noise: Tensor, k: int, *,
                       noise: np.ndarray | None = None, noise_epsilon: float = NOISE_EPSILON,
                       w_importance: float = 0.0, w_load: float = 0.0) -> Routing:
    """Noisy top-k gating as a pure function (eqs. 3-11). Deterministic given ``noise``.

    ``x`` (T, d), ``W_g`` and ``W_noise`` (d, E). ``noise=None`` means no noise (eval, or
    ``noisy_gating=False``); otherwise a (T, E) standard-normal sample. Returns a dropless
    :class:`~tinymoe.dispatch.routing.Routing`: ``probs`` the gates G(x) (T, E), zero
    outside the top k; ``logits`` H(x); ``aux_losses["balance"]`` = ``w_importance ·
    CV(Importance)² + w_load · CV(Load)²`` (eqs. 7 and 11); ``stats``: ``clean_logits``
    x·W_g, ``noise_stddev`` σ and ``prob_in_top_k`` P(x, i) (None without noise),
    ``importance`` (E,) eq. (6) and ``load`` (E,) eq. (10), or the hard counts.
    """
    x, W_g, W_noise = as_tensor(x), as_tensor(W_g), as_tensor(W_noise)
    _check_inputs(x, W_g, noise)
    E = W_g.shape[1]
    validate.top_k(k, E, "noisy_top_k_gating")
    if noise is not None:
        noise = np.asarray(noise, dtype=x.dtype)
    _check_finite("the router input x", x, "token", "feature")
    _check_finite("W_g", W_g, "row", "expert")
    if noise is not None:
        _check_finite("W_noise", W_noise, "row", "expert")
    clean, H, sigma = noisy_logits(x, W_g, W_noise, noise, noise_epsilon)  # (T, E) each
    _check_finite("router logits x·W_g", clean)
    _check_finite("noisy logits H(x)", H)
    expert_index, combine_weight, top_values = keep_top_k_softmax(H, k)  # (T, k), (T, k)
    gates = dense_gates(expert_index, combine_weight, E)  # (T, E)
    importance = gates.sum(axis=0)  # (E,) eq. (6)
    P = None
    if sigma is not None and k < E:
        P = prob_in_top_k(clean, H, sigma, top_values, k)  # (T, E)
        load = P.sum(axis=0)  # (E,) eq. (10)
    else:
        load = Tensor(expert_counts(expert_index, E).astype(x.dtype))  # (E,) hard counts
    stats = dict(clean_logits=clean, noise_stddev=sigma, prob_in_top_k=P,
                 importance=importance, load=load)
    aux = {"balance": balance_loss(importance, load, w_importance, w_load)}  # eqs. (7), (11)
    return route(expert_index, combine_weight, E, probs=gates, logits=H, aux_losses=aux,
                 stats=stats)


class NoisyTopKGate(Module):
    """The 2017 gate as a Module: ``W_g`` and ``W_noise`` (d_model, E), zero-initialised.

    Zero weights give "no signal and some noise" (Appendix A): all logits are 0 and the
    noise picks the experts, so the initial load is about even. In training mode (and with
    ``noisy_gating``) the noise is drawn from ``rng`` (a seed or a Generator) unless passed
    explicitly to ``forward``; in eval mode there is no noise, so routing is deterministic.
    ``w_importance``/``w_load`` weight the balancing losses (eqs. 7 and 11), returned as the
    routing's ``aux_losses["balance"]``; the paper's LM used 0.1/0.1 (App. C.1), t2t's
    default is 0.01/0.01.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2, *,
                 noisy_gating: bool = True, noise_epsilon: float = NOISE_EPSILON,
                 w_importance: float = 0.0, w_load: float = 0.0,
                 rng: np.random.Generator | int | None = None, dtype=np.float32) -> None:
        super().__init__()
        validate.positive_int(d_model, "d_model", "NoisyTopKGate")
        validate.num_experts(num_experts, "NoisyTopKGate")
        validate.top_k(k, num_experts, "NoisyTopKGate")
        self.d_model, self.num_experts, self.k = int(d_model), int(num_experts), int(k)
        self.noisy_gating = bool(noisy_gating)
        self.noise_epsilon = validate.coef(noise_epsilon, "noise_epsilon", "NoisyTopKGate",
                                           "tensor2tensor uses 1e-2")
        self.w_importance = validate.coef(w_importance, "w_importance", "NoisyTopKGate")
        self.w_load = validate.coef(w_load, "w_load", "NoisyTopKGate")
        self.rng = np.random.default_rng(rng)
        self.W_g = Parameter(np.zeros((d_model, num_experts), dtype=dtype))
        self.W_noise = Parameter(np.zeros((d_model, num_experts), dtype=dtype))

    @property
    def uses_noise(self) -> bool:
        return self.training and self.noisy_gating

    def forward(self, x: Tensor, noise: np.ndarray | None = None) -> Routing:
        """Route ``x`` (T, d). ``noise`` (T, E) replaces the generator's draw in training;
        it is ignored in eval mode and with ``noisy_gating=False`` (no noise there)."""
        x = as_tensor(x)
        if not self.uses_noise:
            noise = None
        elif noise is None:
            T = x.shape[0] if x.ndim == 2 else 0
            noise = self.rng.standard_normal((T, self.num_experts)).astype(self.W_g.dtype)
        return noisy_top_k_gating(x, self.W_g, self.W_noise, self.k, noise=noise,
                                  noise_epsilon=self.noise_epsilon,
                                  w_importance=self.w_importance, w_load=self.w_load)

    def __repr__(self) -> str:
        return (f"NoisyTopKGate(d_model={self.d_model}, num_experts={self.num_experts}, "
                f"k={self.k}, noisy_gating={self.noisy_gating}, "
                f"w_importance={self.w_importance}, w_load={self.w_load})")


def sparse_moe_layer(d_model: int, num_experts: int, k: int = 2, *, d_ff: int | None = None,
                     experts: Sequence[Module] | None = None, activation: str = "relu",
                     w_importance: float = 0.0, w_load: float = 0.0, noisy_gating: bool = True,
                     noise_epsilon: float = NOISE_EPSILON, rng: RNGLike = None,
                     dtype: Any = np.float32) -> MoELayer:
    """The 2017 sparsely-gated layer: a :class:`NoisyTopKGate` and E experts, dropless, as an
    :class:`~tinymoe.moe.layer.MoELayer`. The experts are E FFNs of hidden width ``d_ff``
    with stacked weights (one grouped matmul), or the Modules given in ``experts``."""
    gen = as_rng(rng)
    gate = NoisyTopKGate(d_model, num_experts, k, noisy_gating=noisy_gating,
                         noise_epsilon=noise_epsilon, w_importance=w_importance,
                         w_load=w_load, rng=gen, dtype=dtype)
    if experts is None:
        if d_ff is None:
            raise ValueError("sparse_moe_layer: give d_ff (the hidden width of the default FFN "
                             "experts) or a list of expert Modules in experts=")
        experts = StackedExperts(num_experts, d_model, d_ff, activation, dtype=dtype, rng=gen)
    return MoELayer(gate, experts)
