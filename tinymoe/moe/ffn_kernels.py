"""The elementwise work around the experts' matrix products, as Numba kernels (one pass each).

An expert layer on capacity buffers is ``out[e, :n_e] = act(x[e, :n_e] @ W[e] + b[e])``
(:class:`~tinymoe.moe.experts.BufferLinear`). BLAS does the products; what is left is
elementwise and memory-bound, and NumPy would spend a single-threaded pass over the
(E, C, d_out) array on each step (add the bias, apply the ReLU; in backward: build the mask
``out > 0``, multiply, sum the bias gradient). These kernels do each direction in one pass
over the filled rows of every expert at once (one parallel launch, not one per expert):

* :func:`bias_relu_` — ``out[e, :n_e] = max(out[e, :n_e] + b[e], 0)`` in place
  (``relu=False``: ``+ b[e]`` only);
* :func:`relu_grad_bias_sum` — ``g_pre = grad · [out > 0]`` on the filled rows and
  ``db[e] = Σ_rows g_pre[e]``.

Deterministic and race-free: each expert's rows are split into fixed chunks of ``CHUNK``
rows (the same chunks whatever the number of threads); each chunk writes its own rows of
``g_pre`` and its own row of partial sums (float64), and the partial sums are then added
chunk after chunk. The bits do not depend on the thread count. Jobs smaller than
``PARALLEL_MIN_ELEMENTS`` run on one thread (waking a second costs more than the pass), as
the dispatch kernels do. Valid Python under ``NUMBA_DISABLE_JIT=1``. Other dtypes than
float32 and float64 (float16, which Numba does not take) run the same steps in NumPy.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as tinymoe.dispatch.kernels

import numba
import numpy as np
from numba import prange

from tinymoe.dispatch.kernels import PARALLEL_MIN_ELEMENTS

CHUNK = 64  # rows per chunk of the bias-gradient sum
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _bias_relu_body(out, bias, rows, relu):
    E, C, f = out.shape
    for p in prange(E * C):  # (expert, slot) pairs; slots past rows[e] are padding
        e, i = p // C, p % C
        if i < rows[e]:
            for j in range(f):
                v = out[e, i, j] + bias[e, j]
                if relu and v < 0:  # max(v, 0); NaN stays NaN, as np.maximum
                    v = 0
                out[e, i, j] = v


def _relu_grad_body(grad, out, rows, g_pre, partial):
    E, C, f = grad.shape
    chunks = partial.shape[1]
    for p in prange(E * chunks):  # (expert, chunk) pairs: one writer per row and partial
        e, c = p // chunks, p % chunks
        for i in range(c * CHUNK, min(rows[e], (c + 1) * CHUNK)):
            for j in range(f):
                v = grad[e, i, j] if out[e, i, j] > 0 else 0
                g_pre[e, i, j] = v
                partial[e, c, j] += v


_bias_relu_par = numba.njit(cache=True, parallel=True)(_bias_relu_body)
_bias_relu_one = numba.njit(cache=True)(_bias_relu_body)
_relu_grad_par = numba.njit(cache=True, parallel=True)(_relu_grad_body)
_relu_grad_one = numba.njit(cache=True)(_relu_grad_body)


def _parallel(rows: np.ndarray, f: int) -> bool:
    return int(rows.sum()) * f >= PARALLEL_MIN_ELEMENTS


def bias_relu_(out: np.ndarray, bias: np.ndarray, rows: np.ndarray, relu: bool) -> np.ndarray:
    """``out`` (E, C, f) <- ``max(out + bias[e], 0)`` (or ``+ bias[e]``) on each expert's
    first ``rows[e]`` slots, in place; ``bias`` (E, f). The other slots are left as they are."""
    if out.dtype not in KERNEL_DTYPES:
        for e, n in enumerate(rows):
            o = out[e, :n]  # (n_e, f)
            o += bias[e]
            if relu:
                np.maximum(o, 0, out=o)
        return out
    kernel = _bias_relu_par if _parallel(rows, out.shape[2]) else _bias_relu_one
    kernel(out, np.ascontiguousarray(bias, dtype=out.dtype), rows, relu)
    return out


def relu_grad_bias_sum(grad: np.ndarray, out: np.ndarray, rows: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(g_pre (E, C, f), db (E, f))``: ``grad · [out > 0]`` on each expert's first
    ``rows[e]`` slots (the other slots of ``g_pre`` are not written) and its sums over them."""
    E, C, f = grad.shape
    if grad.dtype not in KERNEL_DTYPES:
        g_pre = grad * (out > 0)
        db = np.stack([g_pre[e, :n].sum(axis=0, dtype=np.float64) for e, n in
                       enumerate(rows)]) if E else np.zeros((0, f))
        return g_pre, db.astype(grad.dtype)
    g_pre = np.empty((E, C, f), dtype=grad.dtype)
    partial = np.zeros((E, (C + CHUNK - 1) // CHUNK, f), dtype=np.float64)  # (E, chunks, f)
    kernel = _relu_grad_par if _parallel(rows, f) else _relu_grad_one
    kernel(np.ascontiguousarray(grad), np.ascontiguousarray(out), rows, g_pre, partial)
    db = np.zeros((E, f), dtype=np.float64)
    for c in range(partial.shape[1]):  # chunk after chunk: a fixed order
        db += partial[:, c]
    return g_pre, db.astype(grad.dtype)
