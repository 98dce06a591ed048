"""softmax, log_softmax and logsumexp along an axis, stable for large logits.

    logsumexp(x) = m + ln sum_j exp(x_j - m),   m = max_j x_j       (never overflows)
    softmax(x)_i = exp(x_i - logsumexp(x))
    log_softmax(x)_i = x_i - logsumexp(x)

Backward, with s = softmax(x) and upstream gradient g:
    softmax:      dx = s * (g - sum_j g_j s_j)
    log_softmax:  dx = g - s * sum_j g_j
    logsumexp:    dx = g * s
"""
from __future__ import annotations

import numpy as np

from tinymoe.autograd import Function


def logsumexp_array(x: np.ndarray, axis: int) -> np.ndarray:
    """ln sum exp over ``axis`` with keepdims; a row of all -inf gives -inf (not NaN)."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    with np.errstate(divide="ignore"):
        return m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def softmax_array(x: np.ndarray, axis: int) -> np.ndarray:
    e = x - np.max(x, axis=axis, keepdims=True)
    if not np.issubdtype(e.dtype, np.inexact):
        e = e.astype(np.float64)  # integers: exp gives float64, as np.exp would
    np.exp(e, out=e)  # in place: one array of x's size instead of three
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def _check_axis(op: str, x: np.ndarray, axis: int) -> None:
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{op}: axis {axis} is out of range for a tensor of shape {x.shape}")


class Softmax(Function):
    @staticmethod
    def forward(ctx, x, *, axis=-1):
        _check_axis("softmax", x, axis)
        s = softmax_array(x, axis)
        ctx.save_for_backward(s)
        ctx.axis = axis
        return s

    @staticmethod
    def backward(ctx, grad):
        (s,) = ctx.saved
        gs = grad * s
        dot = np.sum(gs, axis=ctx.axis, keepdims=True)  # sum_j g_j s_j
        np.subtract(grad, dot, out=gs)  # reuse the product's array
        gs *= s
        return (gs,)


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, x, *, axis=-1):
        _check_axis("log_softmax", x, axis)
        out = x - logsumexp_array(x, axis)
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return (grad - np.exp(out) * np.sum(grad, axis=ctx.axis, keepdims=True),)


class LogSumExp(Function):
    @staticmethod
    def forward(ctx, x, *, axis=-1, keepdims=False):
        _check_axis("logsumexp", x, axis)
        out = logsumexp_array(x, axis)
        ctx.save_for_backward(x, out)
        ctx.axis, ctx.keepdims = axis, keepdims
        return out if keepdims else np.squeeze(out, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved
        g = grad if ctx.keepdims else np.expand_dims(grad, ctx.axis)
        return (g * np.exp(x - out),)
