"""Matrix multiplication with NumPy's ``@`` rules: batched, broadcasting, 1-D promotion.

For out = A @ B:   dA = dOut @ B^T,   dB = A^T @ dOut   (then summed over broadcast batch axes).

:class:`Linear` is ``A @ B + bias`` as one op: the bias is added into the product's own
array (no second array of the output's size), and backward gives dbias = dOut summed over
the broadcast axes. Same numbers as ``a @ b + bias``, less memory traffic.
"""
from __future__ import annotations

import numpy as np

from tinymoe import threads
from tinymoe.autograd import Function, unbroadcast


def _check(a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: {a.shape} @ {b.shape}: both operands need at least one "
                         f"axis; use * to multiply by a scalar")
    k_a = a.shape[-1]
    k_b = b.shape[0] if b.ndim == 1 else b.shape[-2]
    if k_a != k_b:
        raise ValueError(f"matmul: {a.shape} @ {b.shape}: inner dims {k_a} != {k_b}; the "
                         f"last axis of the left operand must equal the "
                         f"{'only' if b.ndim == 1 else 'second-to-last'} axis of the right one")
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: {a.shape} @ {b.shape}: batch axes {a.shape[:-2]} and "
                         f"{b.shape[:-2]} do not broadcast") from None


def _matmul_grads(ctx, a: np.ndarray, b: np.ndarray, grad: np.ndarray):
    """(dA, dB) of out = a @ b for the inputs that need them (None for the others)."""
    threads.num_threads()  # BLAS threads for the cores free now (tinymoe.threads)
    a2 = a[None, :] if a.ndim == 1 else a  # (1, k) for a vector on the left
    b2 = b[:, None] if b.ndim == 1 else b  # (k, 1) for a vector on the right
    g = grad
    if b.ndim == 1:
        g = np.expand_dims(g, -1)  # re-insert the column axis @ removed
    if a.ndim == 1:
        g = np.expand_dims(g, -2)  # re-insert the row axis @ removed
    da = db = None
    if ctx.needs_input_grad[0]:
        da = unbroadcast(g @ np.swapaxes(b2, -1, -2), a2.shape).reshape(a.shape)
    if ctx.needs_input_grad[1]:
        db = unbroadcast(np.swapaxes(a2, -1, -2) @ g, b2.shape).reshape(b.shape)
    return da, db


class MatMul(Function):
    @staticmethod
    def forward(ctx, a, b):
        _check(a, b)
        ctx.save_for_backward(a, b)
        threads.num_threads()  # BLAS threads for the cores free now (tinymoe.threads)
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        return _matmul_grads(ctx, a, b, grad)


class Linear(Function):
    """out = a @ b + bias;  da, db as for matmul,  dbias = dOut summed to bias's shape."""

    @staticmethod
    def forward(ctx, a, b, bias):
        _check(a, b)
        ctx.save_for_backward(a, b)
        ctx.bias_shape = bias.shape
        threads.num_threads()  # BLAS threads for the cores free now (tinymoe.threads)
        out = a @ b
        if (np.broadcast_shapes(out.shape, bias.shape) == out.shape
                and np.result_type(out, bias) == out.dtype):
            out += bias  # in place: the product's array is ours
            return out
        return out + bias  # bias widens the shape or the dtype: a new array, as a @ b + bias

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        da, db = _matmul_grads(ctx, a, b, grad)
        dbias = unbroadcast(grad, ctx.bias_shape) if ctx.needs_input_grad[2] else None
        return da, db, dbias
