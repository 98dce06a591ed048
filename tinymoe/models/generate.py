"""Generation with a key-value cache: each new token costs one position, not the whole prefix.

Without a cache, sampling token t runs the model on all t previous tokens again. But a
causal layer's keys and values at position s never change once s is computed, so we keep
them: per layer, ``K, V`` (B, H, S_max, d_h). A step feeds only the new tokens x_new
(B, T_new, d) (the prompt at once, then one token at a time)::

    q, k, v = x_new W_q, x_new W_k, x_new W_v        (B, H, T_new, d_h) each
    K[:, :, s:s+T_new] = k;  V[:, :, s:s+T_new] = v  append at the filled length s
    A = softmax(q K[:s+T_new]ᵀ / sqrt(d_h) + M)       M: new token i sees positions <= s+i
    y = A V[:s+T_new]

Everything else of a block (norms, FFN or MoE layer) works per position, so it runs on the
new tokens only. The logits are those of the full forward (tested), at O(s) per step for the
attention instead of O(s²) for the whole recomputation. The price is memory:
``2 · n_layers · B · S · d`` numbers, the KV cache that :func:`tinymoe.params.kv_cache_bytes`
counts. Learned absolute positions limit the cache to ``block_size`` positions.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tinymoe import ops
from tinymoe.autograd import no_grad
from tinymoe.models.transformer import Transformer
from tinymoe.nn.attention import CausalSelfAttention
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.tensor import Tensor, as_tensor


class KVCache:
    """Keys and values of every layer, ``keys[i]``, ``values[i]`` (B, H, S_max, d_h), and
    ``length``, the positions filled so far."""

    def __init__(self, model: Transformer, batch: int, max_len: int | None = None) -> None:
        cfg = model.cfg
        self.max_len = cfg.block_size if max_len is None else int(max_len)
        if not 1 <= self.max_len <= cfg.block_size:
            raise ValueError(f"KVCache: max_len={max_len} must be in [1, block_size="
                             f"{cfg.block_size}] (learned positions end there)")
        H, d_h = cfg.n_heads, cfg.d_model // cfg.n_heads
        shape = (int(batch), H, self.max_len, d_h)  # (B, H, S_max, d_h)
        self.keys = [np.zeros(shape, cfg.dtype) for _ in range(cfg.n_layers)]
        self.values = [np.zeros(shape, cfg.dtype) for _ in range(cfg.n_layers)]
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache arrays (allocated for ``max_len`` positions)."""
        return sum(a.nbytes for a in self.keys + self.values)


def cached_attention(attn: CausalSelfAttention, x: Any, keys: np.ndarray, values: np.ndarray,
                     start: int) -> Tensor:
    """``attn`` on the new tokens ``x`` (B, T_new, d) at positions ``start, ...``: writes
    their keys and values into ``keys``/``values`` (B, H, S_max, d_h) and attends over
    positions ``0 .. start + T_new - 1``. No dropout (inference)."""
    x = as_tensor(x)
    B, T, d = x.shape
    H = attn.n_heads
    d_h = d // H
    qkv = attn.qkv(x).reshape(B, T, 3, H, d_h).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, d_h)
    ### BEGIN SOLUTION task8_3
    end = start + T
    keys[:, :, start:end] = qkv.data[1]    # (B, H, T, d_h) appended to the cache
    values[:, :, start:end] = qkv.data[2]
    q = qkv[0]                                                       # (B, H, T, d_h)
    scores = q @ np.swapaxes(keys[:, :, :end], -1, -2) / math.sqrt(d_h)  # (B, H, T, end)
    visible = np.arange(end)[None, :] <= start + np.arange(T)[:, None]  # (T, end) causal
    att = ops.where(visible, scores, -np.inf).softmax(axis=-1)      # (B, H, T, end)
    y = att @ values[:, :, :end]                                     # (B, H, T, d_h)
    ### END SOLUTION
    return attn.proj(y.transpose(0, 2, 1, 3).reshape(B, T, d))  # (B, T, d)


def forward_cached(model: Transformer, ids: Any, cache: KVCache) -> Tensor:
    """Logits (B, T_new, V) of the new tokens ``ids`` (B, T_new), continuing ``cache``
    (which then holds ``T_new`` more positions). Inference only: no gradient is recorded."""
    ids = np.asarray(ids)
    B, T = ids.shape
    s = cache.length
    if B != cache.keys[0].shape[0] or s + T > cache.max_len:
        raise ValueError(f"forward_cached: ids {ids.shape} do not fit the cache (batch "
                         f"{cache.keys[0].shape[0]}, {s} of {cache.max_len} positions used); "
                         f"start a new KVCache or feed at most {cache.max_len - s} tokens")
    with no_grad():
        x = model.tok(ids) + model.pos(np.arange(s, s + T))  # (B, T, d)
        for i, block in enumerate(model.blocks):
            x = x + cached_attention(block.attn, block.ln1(x), cache.keys[i],
                                     cache.values[i], s)  # (B, T, d)
            h = block.ffn(block.ln2(x))
            x = x + (h[0] if block.is_moe else h)  # (B, T, d)
        x = model.ln_f(x)
        logits = x @ model.tok.weight.T if model.cfg.tie_embeddings else model.head(x)
    cache.length = s + T
    return logits  # (B, T, V)


def generate(model: Transformer, ids: Any, max_new_tokens: int, *, temperature: float = 1.0,
             rng: RNGLike = None, use_cache: bool = True) -> np.ndarray:
    """``ids`` (B, L) followed by ``max_new_tokens`` sampled tokens: (B, L + n).

    ``temperature`` 0 takes the most likely token (greedy). With ``use_cache`` the prompt
    goes through once and each step feeds one token (``L + n <= block_size``); without,
    every step reruns the model on the last ``block_size`` tokens.
    """
    ids = np.array(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"generate: ids must be (B, L) with L >= 1, got shape {ids.shape}")
    n = int(max_new_tokens)
    if use_cache and ids.shape[1] + n > model.cfg.block_size:
        raise ValueError(f"generate: {ids.shape[1]} prompt + {n} new tokens exceed "
                         f"block_size={model.cfg.block_size}; shorten them or pass "
                         f"use_cache=False (a sliding window)")
    gen = as_rng(rng)
    was_training = model.training
    model.eval()
    cache = KVCache(model, ids.shape[0], ids.shape[1] + n) if use_cache else None
    new = ids
    try:
        for _ in range(n):
            if use_cache:
                logits = forward_cached(model, new, cache)[:, -1].data  # (B, V)
            else:
                with no_grad():
                    logits = model(ids[:, -model.cfg.block_size:])[:, -1].data  # (B, V)
            new = sample_next(logits, temperature, gen)[:, None]  # (B, 1)
            ids = np.concatenate([ids, new], axis=1)
    finally:
        model.train(was_training)
    return ids


def sample_next(logits: np.ndarray, temperature: float, rng: np.random.Generator
                ) -> np.ndarray:
    """One token per row of ``logits`` (B, V): argmax at temperature 0, else a draw from
    ``softmax(logits / temperature)``."""
    if temperature < 0:
        raise ValueError(f"sample_next: temperature={temperature} must be >= 0")
    if temperature == 0:
        return logits.argmax(axis=-1)  # (B,)
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)  # (B, V)
    u = rng.random((p.shape[0], 1))
    return np.minimum((p.cumsum(axis=-1) < u).sum(axis=-1), p.shape[1] - 1)  # (B,)
