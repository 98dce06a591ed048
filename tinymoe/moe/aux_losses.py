"""Auxiliary router losses of the capacity era: load balancing (GShard, Switch) and z-loss.

Switch Transformer (Fedus et al. 2021), eqs. (4)-(6), for T tokens and N experts:

    f_i  = (1/T) Σ_x 1{argmax p(x) = i}         fraction of tokens dispatched to i   eq. (5)
    P_i  = (1/T) Σ_x p_i(x)                     fraction of router probability       eq. (6)
    loss = α · N · Σ_i f_i · P_i                                                      eq. (4)

``f_i`` is a count (no gradient), ``P_i`` its differentiable stand-in. Under uniform routing
``Σ f_i P_i = 1/N``, so the factor N makes the loss exactly **1** whatever N; the paper uses
α = 1e-2. :func:`load_balancing_loss` returns ``N · Σ f_i P_i`` (the part without α): the
router multiplies it by its coefficient.

GShard (Lepikhin et al. 2020, §2.2) writes ``ℓ_aux = (1/E) Σ_e (c_e/S) · m_e`` with ``c_e``
the number of **first** choices of expert e (counted before dropping) and ``m_e`` the mean
gate: the same product, but ``1/E²`` at uniform. Like Mesh TF, fairseq and DeepSpeed we
multiply it by E², which makes it identical to the Switch loss computed on the first choices
(:func:`gshard_aux_loss`). Conventions (implementations differ: fairseq and MegaBlocks
average the layers' losses, HF transformers concatenates the layers' router outputs and
computes one loss): ``f_i`` counts choices
*before* capacity dropping; one value per group, averaged over groups; per layer (the model
sums the layers, as the Switch paper adds the loss "for each Switch layer").

Router z-loss, ST-MoE (Zoph et al. 2022), eq. (5), for B tokens with router logits x:

    L_z = (1/B) Σ_i ( log Σ_j exp(x_j^(i)) )²

keeps the logits small so that exp() stays accurate in low precision. It is not zero at
uniform routing: all-zero logits give ``(ln N)²``. Coefficient c_z = 1e-3.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops
from tinymoe.tensor import Tensor, as_tensor


def _grouped(router_probs: Tensor, expert_index: Any, op: str) -> tuple[Tensor, np.ndarray]:
    """``probs`` as (G, S, N) and ``expert_index`` (the first choice) as (G, S)."""
    p = as_tensor(router_probs)
    e = np.asarray(expert_index.data if isinstance(expert_index, Tensor) else expert_index)
    if p.ndim not in (2, 3):
        raise ValueError(f"{op}: router_probs must be (T, N) or (G, S, N) (groups of S "
                         f"tokens), got shape {p.shape}")
    if e.ndim == p.ndim and e.shape[:-1] == p.shape[:-1]:
        e = e[..., 0]  # (..., T, k) -> the first choices (..., T)
    if e.shape != p.shape[:-1]:
        raise ValueError(f"{op}: expert_index of shape {e.shape} does not match router_probs "
                         f"of shape {p.shape}; pass the chosen expert of every token, "
                         f"shape {p.shape[:-1]} (or (..., T, k): column 0 is used)")
    if not np.issubdtype(e.dtype, np.integer):
        raise TypeError(f"{op}: expert_index must hold integers, got dtype {e.dtype}")
    N = p.shape[-1]
    if e.size and (e.min() < 0 or e.max() >= N):
        raise ValueError(f"{op}: expert_index must lie in [0, {N}) for N = {N} experts, got "
                         f"min {e.min()} max {e.max()}")
    if p.ndim == 2:
        p, e = p.reshape(1, *p.shape), e[None]  # (1, T, N), (1, T)
    return p, e


def dispatch_fraction(expert_index: Any, num_experts: int) -> np.ndarray:
    """Eq. (5): ``f_i``, the fraction of tokens whose (first) choice is expert i.

    ``expert_index`` (T,) or (G, S): returns (N,) or (G, N). No gradient (it is a count).
    """
    e = np.asarray(expert_index)
    flat = e.reshape(-1, e.shape[-1]) if e.ndim > 1 else e[None]  # (G, S)
    S = flat.shape[1]
    f = np.stack([np.bincount(row, minlength=num_experts) for row in flat]) / max(S, 1)
    return f if e.ndim > 1 else f[0]  # (G, N) or (N,)


def load_balancing_loss(router_probs: Tensor, expert_index: Any) -> Tensor:
    """Eq. (4) without α: ``N · Σ_i f_i · P_i`` (1 under uniform routing), a scalar Tensor.

    ``router_probs`` (T, N) softmax outputs p(x) (or (G, S, N) for G groups: the loss of
    each group, averaged); ``expert_index`` (T,) the argmax of each token ((T, k): column
    0), before any capacity dropping. The gradient flows through ``P_i`` only.
    """
    p, e = _grouped(router_probs, expert_index, "load_balancing_loss")  # (G, S, N), (G, S)
    N = p.shape[-1]
    if p.shape[1] == 0:
        return Tensor(np.zeros((), dtype=p.dtype))  # no tokens, nothing to balance
    ### BEGIN SOLUTION task4_2
    f = dispatch_fraction(e, N).astype(p.dtype)  # (G, N) eq. (5), a constant
    P = p.mean(axis=1)                           # (G, N) eq. (6)
    loss = (P * f).sum(axis=1) * float(N)        # (G,)   eq. (4) / α
    ### END SOLUTION
    return loss.mean()


def gshard_aux_loss(gates: Tensor, first_choice: Any) -> Tensor:
    """GShard's ``ℓ_aux = (1/E) Σ_e (c_e/S)·m_e`` (§2.2) times E², so it is 1 at uniform.

    ``gates`` (S, E) (or (G, S, E)) the softmax gates, ``first_choice`` (S,) the top-1
    expert of every token (``c_e`` counts first choices only, fitting or not). Identical to
    :func:`load_balancing_loss`: m_e is P_i and c_e/S is f_i.
    """
    return load_balancing_loss(gates, first_choice)


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE eq. (5): the mean over tokens of ``logsumexp(logits)²``, a scalar Tensor.

    ``router_logits`` (T, N) or (..., T, N). All-zero logits give ``(ln N)²``. The gradient
    wrt the logits is ``2 · lse · softmax(logits) / T`` (d lse/dx = softmax(x)).
    """
    z = as_tensor(router_logits)
    if z.ndim < 2:
        raise ValueError(f"router_z_loss: router_logits must be (T, N) (tokens, experts), "
                         f"got shape {z.shape}")
    if z.shape[-2] == 0:
        return Tensor(np.zeros((), dtype=z.dtype))  # no tokens
    ### BEGIN SOLUTION task4_3
    lse = ops.logsumexp(z, axis=-1)  # (..., T) log Σ_j exp(x_j)
    return (lse * lse).mean()        # mean over tokens of lse²
    ### END SOLUTION
