"""The elementwise work around an expert's matrix products, as Numba kernels (one pass each).

An expert layer on its filled slots is ``out = act(x @ W + b)`` for one block of rows
(:class:`~tinymoe.moe.experts.BufferLinear`, :class:`~tinymoe.moe.experts.BufferFFN`). BLAS
does the product; what is left is elementwise and memory-bound, and NumPy would spend a pass
over the block on each step (add the bias, apply the ReLU; in backward: build the mask
``h > 0``, multiply, sum the bias gradient). Each kernel does one direction in one pass over
one expert's block, right after BLAS wrote it, while it is still in cache:

* :func:`bias_relu_` — ``out = max(out + b, 0)`` in place (``relu=False``: ``out + b``);
* :func:`relu_grad_` — ``g = g · [h > 0]`` in place, returning ``db = Σ_rows g``.

Blocks of ``PARALLEL_MIN_ELEMENTS`` elements or more run on Numba's threads, smaller ones on
one (as the dispatch kernels). Deterministic and race-free: the rows are split into fixed
chunks of ``CHUNK`` rows (the same chunks whatever the number of threads); each chunk
writes its own rows and its own row of partial sums (float64), and the partial sums are
then added chunk after chunk, so the bits do not depend on the thread count. Valid Python
under ``NUMBA_DISABLE_JIT=1``. Other dtypes than float32 and float64 (float16, which Numba does not
take) run the same steps in NumPy.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as tinymoe.dispatch.kernels

import numba
import numpy as np
from numba import prange

from tinymoe.dispatch.kernels import PARALLEL_MIN_ELEMENTS

KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
CHUNK = 64  # rows per chunk of the bias-gradient sum


def _bias_relu_body(out, bias, relu):
    n, f = out.shape
    for i in prange(n):  # row i is written by iteration i only
        for j in range(f):
            v = out[i, j] + bias[j]
            if relu and v < 0:  # max(v, 0); NaN stays NaN, as np.maximum
                v = 0
            out[i, j] = v


def _relu_grad_body(g, h, partial):
    n, f = g.shape
    for c in prange(partial.shape[0]):  # chunk c: its own rows and its own partial sums
        for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            for j in range(f):
                v = g[i, j] if h[i, j] > 0 else 0
                g[i, j] = v
                partial[c, j] += v


_bias_relu_par = numba.njit(cache=True, parallel=True)(_bias_relu_body)
_bias_relu_one = numba.njit(cache=True)(_bias_relu_body)
_relu_grad_par = numba.njit(cache=True, parallel=True)(_relu_grad_body)
_relu_grad_one = numba.njit(cache=True)(_relu_grad_body)


def bias_relu_(out: np.ndarray, bias: np.ndarray, relu: bool) -> np.ndarray:
    """``out`` (n, f) <- ``max(out + bias, 0)`` (or ``out + bias``) in place; ``bias`` (f,)."""
    if out.dtype not in KERNEL_DTYPES or not out.flags.c_contiguous:
        out += bias
        return np.maximum(out, 0, out=out) if relu else out
    if out.size:
        kernel = _bias_relu_par if out.size >= PARALLEL_MIN_ELEMENTS else _bias_relu_one
        kernel(out, np.ascontiguousarray(bias, dtype=out.dtype), relu)
    return out


def relu_grad_(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``g`` (n, f) <- ``g · [h > 0]`` in place; returns its column sums (f,) in g's dtype."""
    if g.dtype not in KERNEL_DTYPES or not g.flags.c_contiguous:
        np.multiply(g, h > 0, out=g)
        return g.sum(axis=0, dtype=np.float64).astype(g.dtype)
    partial = np.zeros(((g.shape[0] + CHUNK - 1) // CHUNK, g.shape[1]), np.float64)  # (chunks, f)
    if g.size:
        kernel = _relu_grad_par if g.size >= PARALLEL_MIN_ELEMENTS else _relu_grad_one
        kernel(g, np.ascontiguousarray(h), partial)
    acc = np.zeros(g.shape[1], dtype=np.float64)  # (f,)
    for c in range(partial.shape[0]):  # chunk after chunk: a fixed order
        acc += partial[c]
    return acc.astype(g.dtype)
