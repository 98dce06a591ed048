"""Pointwise non-linearities: relu, gelu, tanh, sigmoid, softplus.

Each is one op with a closed-form derivative, written to stay finite for large |x|.
"""
from __future__ import annotations

import numpy as np

from tinymoe.autograd import Function
from tinymoe.ops.special import normal_cdf_array, normal_pdf_array


class ReLU(Function):
    """out = max(a, 0);  da = grad * [out > 0].

    Saves the output, not the input or a mask: the next op (a matmul) usually saves the same
    array, so ReLU's backward costs no extra memory ([a > 0] equals [out > 0]).
    """

    @staticmethod
    def forward(ctx, a):
        out = np.maximum(a, 0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return (grad * (out > 0),)


class GELU(Function):
    """out = a * Phi(a) (the exact GELU);  da = grad * (Phi(a) + a * phi(a))."""

    @staticmethod
    def forward(ctx, a):
        cdf = normal_cdf_array(a)
        ctx.save_for_backward(a, cdf)
        return a * cdf

    @staticmethod
    def backward(ctx, grad):
        a, cdf = ctx.saved
        d = normal_pdf_array(a) * a  # a phi(a), then in place: + Phi(a), times grad
        if not isinstance(d, np.ndarray) or np.result_type(d, cdf, grad) != d.dtype:
            return (grad * (cdf + d),)
        d += cdf
        d *= grad
        return (d,)


class Tanh(Function):
    """out = tanh(a);  da = grad * (1 - out^2)."""

    @staticmethod
    def forward(ctx, a):
        out = np.tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return (grad * (1 - out * out),)


def sigmoid_array(a: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-a) without overflow: for a < 0 use e^a / (1 + e^a)."""
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1 / (1 + e), e / (1 + e)).astype(a.dtype, copy=False)


class Sigmoid(Function):
    """out = 1 / (1 + e^-a);  da = grad * out * (1 - out)."""

    @staticmethod
    def forward(ctx, a):
        out = sigmoid_array(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return (grad * out * (1 - out),)


class Softplus(Function):
    """out = ln(1 + e^a) = max(a, 0) + ln(1 + e^-|a|);  da = grad * sigmoid(a)."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return np.maximum(a, 0) + np.log1p(np.exp(-np.abs(a)))

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return (grad * sigmoid_array(a),)
