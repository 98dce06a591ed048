"""Elementwise arithmetic with NumPy broadcasting: add, sub, mul, div, neg, pow, exp, log,
sqrt, abs, maximum, minimum, clip, where.

The backward of a broadcast is a sum over the stretched axes (``unbroadcast``); every binary
op below applies it to both of its gradients.
"""
from __future__ import annotations

import numpy as np

from tinymoe.autograd import Function, unbroadcast


def check_broadcast(op: str, a: np.ndarray, b: np.ndarray) -> None:
    """Raise a readable error when two shapes cannot broadcast."""
    if a.shape == b.shape or not a.ndim or not b.ndim:
        return  # the common cases, checked cheaply
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} do not broadcast (trailing "
                         f"axes must match or be 1); reshape one operand, e.g. "
                         f"x.reshape(-1, 1)") from None


class Add(Function):
    """out = a + b."""

    @staticmethod
    def forward(ctx, a, b):
        check_broadcast("add", a, b)
        ctx.shapes = a.shape, b.shape
        return a + b

    @staticmethod
    def backward(ctx, grad):
        sa, sb = ctx.shapes
        need_a, need_b = ctx.needs_input_grad
        return (unbroadcast(grad, sa) if need_a else None,
                unbroadcast(grad, sb) if need_b else None)


class Sub(Function):
    """out = a - b."""

    @staticmethod
    def forward(ctx, a, b):
        check_broadcast("sub", a, b)
        ctx.shapes = a.shape, b.shape
        return a - b

    @staticmethod
    def backward(ctx, grad):
        sa, sb = ctx.shapes
        need_a, need_b = ctx.needs_input_grad
        return (unbroadcast(grad, sa) if need_a else None,
                unbroadcast(-grad, sb) if need_b else None)


class Mul(Function):
    """out = a * b;  da = grad * b,  db = grad * a."""

    @staticmethod
    def forward(ctx, a, b):
        check_broadcast("mul", a, b)
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        da = unbroadcast(grad * b, a.shape) if ctx.needs_input_grad[0] else None
        db = unbroadcast(grad * a, b.shape) if ctx.needs_input_grad[1] else None
        return da, db


class Div(Function):
    """out = a / b;  da = grad / b,  db = -grad * a / b^2."""

    @staticmethod
    def forward(ctx, a, b):
        check_broadcast("div", a, b)
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        da = unbroadcast(grad / b, a.shape) if ctx.needs_input_grad[0] else None
        db = unbroadcast(-grad * a / (b * b), b.shape) if ctx.needs_input_grad[1] else None
        return da, db


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, grad):
        return (-grad,)


class Pow(Function):
    """out = a ** b;  da = grad * b * a^(b-1),  db = grad * a^b * log(a)."""

    @staticmethod
    def forward(ctx, a, b):
        check_broadcast("pow", a, b)
        out = a ** b
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, out = ctx.saved
        da = db = None
        if ctx.needs_input_grad[0]:
            da = unbroadcast(grad * b * a ** (b - 1), a.shape)
        if ctx.needs_input_grad[1]:
            db = unbroadcast(grad * out * np.log(a), b.shape)
        return da, db


class Exp(Function):
    """out = e^a;  da = grad * out."""

    @staticmethod
    def forward(ctx, a):
        out = np.exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return (grad * out,)


class Log(Function):
    """out = ln a;  da = grad / a."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return np.log(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return (grad / a,)


class Sqrt(Function):
    """out = sqrt(a);  da = grad / (2 out)."""

    @staticmethod
    def forward(ctx, a):
        out = np.sqrt(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved
        return (grad / (2 * out),)


class Abs(Function):
    """out = |a|;  da = grad * sign(a) (0 at a = 0)."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return np.abs(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return (grad * np.sign(a),)


class Maximum(Function):
    """out = max(a, b) elementwise; at a tie the gradient is split half and half."""

    @staticmethod
    def forward(ctx, a, b):
        check_broadcast("maximum", a, b)
        ctx.save_for_backward(a, b)
        return np.maximum(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        wa = (a > b) + 0.5 * (a == b)  # share of the gradient going to a
        return unbroadcast(grad * wa, a.shape), unbroadcast(grad * (1 - wa), b.shape)


class Minimum(Function):
    """out = min(a, b) elementwise; at a tie the gradient is split half and half."""

    @staticmethod
    def forward(ctx, a, b):
        check_broadcast("minimum", a, b)
        ctx.save_for_backward(a, b)
        return np.minimum(a, b)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved
        wa = (a < b) + 0.5 * (a == b)
        return unbroadcast(grad * wa, a.shape), unbroadcast(grad * (1 - wa), b.shape)


class Clip(Function):
    """out = clip(a, lo, hi); gradient passes where lo <= a <= hi."""

    @staticmethod
    def forward(ctx, a, *, lo, hi):
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"clip: lo={lo} is larger than hi={hi}")
        ctx.save_for_backward(a)
        ctx.lo, ctx.hi = lo, hi
        return np.clip(a, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        inside = np.ones(a.shape, dtype=bool)
        if ctx.lo is not None:
            inside &= a >= ctx.lo
        if ctx.hi is not None:
            inside &= a <= ctx.hi
        return (grad * inside,)


class Where(Function):
    """out = cond ? a : b, with ``cond`` a boolean array (no gradient)."""

    @staticmethod
    def forward(ctx, a, b, *, cond):
        cond = np.asarray(cond)
        if cond.dtype != bool:
            raise TypeError(f"where: cond must be a boolean array, got dtype {cond.dtype}; "
                            f"compare first, e.g. where(x > 0, a, b)")
        try:
            out = np.where(cond, a, b)
        except ValueError:
            raise ValueError(f"where: shapes cond {cond.shape}, a {a.shape}, b {b.shape} do "
                             f"not broadcast together") from None
        ctx.cond, ctx.shapes = cond, (a.shape, b.shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        sa, sb = ctx.shapes
        need_a, need_b = ctx.needs_input_grad
        zero = np.zeros((), dtype=grad.dtype)
        return (unbroadcast(np.where(ctx.cond, grad, zero), sa) if need_a else None,
                unbroadcast(np.where(ctx.cond, zero, grad), sb) if need_b else None)
