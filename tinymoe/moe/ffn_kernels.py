"""The elementwise work around an expert's matrix products, as Numba kernels (one pass each).

An expert's layer is ``out = act(x @ W + b)``. BLAS does the product; what is left is
elementwise and memory-bound, and NumPy would spend a pass over the (n, d_out) array on each
step (add the bias, apply the ReLU; in backward: build the mask ``out > 0``, multiply, sum
the bias gradient), on one thread. These kernels do each direction in one parallel pass:

* :func:`bias_relu_` — ``out = max(out + b, 0)`` in place (``relu=False``: ``out + b``);
* :func:`relu_grad_bias_sum` — ``g_pre = grad · [out > 0]`` and ``db = Σ_rows g_pre``.

Deterministic and race-free: rows are split into fixed chunks of ``CHUNK`` rows (the same
chunks whatever the number of threads); each chunk writes its own rows of ``g_pre`` and its
own row of partial sums (accumulated in float64), and the partial sums are then added chunk
after chunk. The bits do not depend on the thread count. Valid Python under
``NUMBA_DISABLE_JIT=1``. Other dtypes than float32 and float64 (float16, which Numba does not
take) run the same steps in NumPy.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as tinymoe.dispatch.kernels

import numba
import numpy as np
from numba import prange

CHUNK = 64  # rows per chunk of the bias-gradient sum
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@numba.njit(cache=True, parallel=True)
def _bias_relu(out, bias, relu):
    n, f = out.shape
    for i in prange(n):
        for j in range(f):
            v = out[i, j] + bias[j]
            if relu and v < 0:  # max(v, 0); NaN stays NaN, as np.maximum
                v = 0
            out[i, j] = v


@numba.njit(cache=True, parallel=True)
def _relu_grad_partial(grad, out, g_pre, partial):
    n, f = grad.shape
    for c in prange(partial.shape[0]):
        for i in range(c * CHUNK, min(n, (c + 1) * CHUNK)):
            for j in range(f):
                v = grad[i, j] if out[i, j] > 0 else 0
                g_pre[i, j] = v
                partial[c, j] += v


def bias_relu_(out: np.ndarray, bias: np.ndarray, relu: bool) -> np.ndarray:
    """``out`` (n, f) <- ``max(out + bias, 0)`` (or ``out + bias``) in place; ``bias`` (f,)."""
    if out.dtype not in KERNEL_DTYPES:
        out += bias
        return np.maximum(out, 0, out=out) if relu else out
    if out.shape[0]:
        _bias_relu(out, np.ascontiguousarray(bias, dtype=out.dtype), relu)
    return out


def relu_grad_bias_sum(grad: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(g_pre, db)``: ``grad · [out > 0]`` (n, f) and its column sums (f,), in one pass."""
    if grad.dtype not in KERNEL_DTYPES:
        g_pre = grad * (out > 0)
        return g_pre, g_pre.sum(axis=0, dtype=np.float64).astype(grad.dtype)
    n, f = grad.shape
    g_pre = np.empty((n, f), dtype=grad.dtype)
    partial = np.zeros(((n + CHUNK - 1) // CHUNK, f), dtype=np.float64)  # (chunks, f)
    if n:
        _relu_grad_partial(np.ascontiguousarray(grad), np.ascontiguousarray(out), g_pre,
                           partial)
    db = np.zeros(f, dtype=np.float64)
    for c in range(partial.shape[0]):  # chunk after chunk: a fixed order
        db += partial[c]
    return g_pre, db.astype(grad.dtype)
