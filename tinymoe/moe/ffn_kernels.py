"""The elementwise work around an expert's matrix products, as Numba kernels (one pass each).

An expert layer on its filled slots is ``out = act(x @ W + b)`` for one block of rows
(:class:`~tinymoe.moe.experts.BufferLinear`, :class:`~tinymoe.moe.experts.BufferFFN`). BLAS
does the product; what is left is elementwise and memory-bound, and NumPy would spend a pass
over the block on each step (add the bias, apply the ReLU; in backward: build the mask
``h > 0``, multiply, sum the bias gradient). Each kernel does one direction in one pass over
one expert's block, right after BLAS wrote it, while it is still in cache:

* :func:`bias_relu_` — ``out = max(out + b, 0)`` in place (``relu=False``: ``out + b``);
* :func:`relu_grad_` — ``g = g · [h > 0]`` in place, returning ``db = Σ_rows g``.

They run on one thread: a block is a few megabytes, and waking a second thread for it costs
more on a busy machine than the pass (the matrix products use both cores). The sums run over
the rows in order, accumulated in float64, so the bits are fixed. Valid Python under
``NUMBA_DISABLE_JIT=1``. Other dtypes than float32 and float64 (float16, which Numba does not
take) run the same steps in NumPy.
"""
from __future__ import annotations

import numba
import numpy as np

KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@numba.njit(cache=True)
def _bias_relu(out, bias, relu):
    n, f = out.shape
    for i in range(n):
        for j in range(f):
            v = out[i, j] + bias[j]
            if relu and v < 0:  # max(v, 0); NaN stays NaN, as np.maximum
                v = 0
            out[i, j] = v


@numba.njit(cache=True)
def _relu_grad(g, h, acc):
    n, f = g.shape
    for i in range(n):
        for j in range(f):
            v = g[i, j] if h[i, j] > 0 else 0
            g[i, j] = v
            acc[j] += v


def bias_relu_(out: np.ndarray, bias: np.ndarray, relu: bool) -> np.ndarray:
    """``out`` (n, f) <- ``max(out + bias, 0)`` (or ``out + bias``) in place; ``bias`` (f,)."""
    if out.dtype not in KERNEL_DTYPES or not out.flags.c_contiguous:
        out += bias
        return np.maximum(out, 0, out=out) if relu else out
    if out.size:
        _bias_relu(out, np.ascontiguousarray(bias, dtype=out.dtype), relu)
    return out


def relu_grad_(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``g`` (n, f) <- ``g · [h > 0]`` in place; returns its column sums (f,) in g's dtype."""
    if g.dtype not in KERNEL_DTYPES or not g.flags.c_contiguous:
        np.multiply(g, h > 0, out=g)
        return g.sum(axis=0, dtype=np.float64).astype(g.dtype)
    acc = np.zeros(g.shape[1], dtype=np.float64)  # (f,)
    if g.size:
        _relu_grad(g, np.ascontiguousarray(h), acc)
    return acc.astype(g.dtype)
