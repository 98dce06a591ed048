"""Causal multi-head self-attention (Vaswani et al. 2017, eq. 1; GPT's causal mask).

For each head h with width d_h = d_model / n_heads:

    Q, K, V = x W_q, x W_k, x W_v                        (one fused Linear: d -> 3d)
    A = softmax( Q K^T / sqrt(d_h) + M )                  M[t, s] = -inf where s > t
    head_h = A V

and the heads, concatenated back to width d, go through an output projection. The mask
makes position t attend only to positions s <= t, so a language model cannot peek ahead.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tinymoe import ops, validate
from tinymoe.nn.dropout import Dropout
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.linear import Linear
from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor, as_tensor


class CausalSelfAttention(Module):
    """``x (B, T, d_model) -> (B, T, d_model)``, each position attending to itself and
    the positions before it."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *,
                 bias: bool = True, dtype: Any = np.float32, rng: RNGLike = None,
                 init_scale: float = 1.0) -> None:
        super().__init__()
        validate.positive_int(d_model, "d_model", "CausalSelfAttention")
        validate.positive_int(n_heads, "n_heads", "CausalSelfAttention")
        if d_model % n_heads:
            raise ValueError(f"CausalSelfAttention: d_model={d_model} is not divisible by "
                             f"n_heads={n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        gen = as_rng(rng)
        self.qkv = Linear(d_model, 3 * d_model, bias, dtype=dtype, rng=gen,
                          init_scale=init_scale)
        self.proj = Linear(d_model, d_model, bias, dtype=dtype, rng=gen, init_scale=init_scale)
        self.attn_drop = Dropout(dropout, rng=gen)
        self.resid_drop = Dropout(dropout, rng=gen)

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        validate.last_dim(x, self.d_model, f"{type(self).__name__}({self.extra_repr()})")
        if x.ndim != 3:
            raise ValueError(f"CausalSelfAttention({self.extra_repr()}): input must be "
                             f"(B, T, d), got shape {x.shape}")
        B, T, d = x.shape
        H, d_h = self.n_heads, d // self.n_heads
        qkv = self.qkv(x).reshape(B, T, 3, H, d_h)  # (B, T, 3, H, d_h)
        qkv = qkv.transpose(2, 0, 3, 1, 4)  # (3, B, H, T, d_h)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, T, d_h) each
        scores = (q @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(d_h))  # (B, H, T, T)
        causal = np.tril(np.ones((T, T), dtype=bool))  # (T, T): s <= t
        scores = ops.where(causal, scores, -np.inf)  # (B, H, T, T)
        att = self.attn_drop(scores.softmax(axis=-1))  # (B, H, T, T), rows sum to 1
        y = att @ v  # (B, H, T, d_h)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, d)  # (B, T, d): heads side by side
        return self.resid_drop(self.proj(y))  # (B, T, d)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}"
