"""Reductions over axes, NumPy style (``axis=None`` means all, ``keepdims``): sum, mean, max.

The backward of a reduction broadcasts the incoming gradient back over the reduced axes;
``expand_reduced`` re-inserts those axes (as size 1) so the broadcast lines up.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe.autograd import Function


def normalize_axes(op: str, axis: Any, ndim: int) -> tuple[int, ...]:
    """``axis`` (None, int or tuple) as a sorted tuple of non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for ax in axes:
        if not -ndim <= ax < max(ndim, 1):
            raise ValueError(f"{op}: axis {ax} is out of range for a tensor with {ndim} axes")
        out.append(int(ax) % max(ndim, 1))
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: repeated axis in {axis}")
    return tuple(sorted(out))


def expand_reduced(grad: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """Give ``grad`` back the reduced axes as size-1 axes (a no-op when keepdims)."""
    return grad if keepdims else np.expand_dims(grad, axes)


class Sum(Function):
    """out = sum over ``axis``;  da = grad broadcast back over the summed axes."""

    @staticmethod
    def forward(ctx, a, *, axis=None, keepdims=False):
        ctx.axes = normalize_axes("sum", axis, a.ndim)
        ctx.shape, ctx.keepdims = a.shape, keepdims
        return np.sum(a, axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        g = expand_reduced(grad, ctx.axes, ctx.keepdims)
        return (np.broadcast_to(g, ctx.shape),)


class Mean(Function):
    """out = mean over ``axis``;  da = grad / n broadcast back (n = number averaged)."""

    @staticmethod
    def forward(ctx, a, *, axis=None, keepdims=False):
        ctx.axes = normalize_axes("mean", axis, a.ndim)
        n = int(np.prod([a.shape[i] for i in ctx.axes]))
        if n == 0:
            raise ValueError(f"mean: cannot average over an empty axis (shape {a.shape}, "
                             f"axis={axis}); check the batch is not empty")
        ctx.shape, ctx.keepdims, ctx.n = a.shape, keepdims, n
        return np.mean(a, axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        g = expand_reduced(grad, ctx.axes, ctx.keepdims) / ctx.n
        return (np.broadcast_to(g, ctx.shape).astype(grad.dtype, copy=False),)


class Max(Function):
    """out = max over ``axis``; the gradient goes to the maximal entries, split evenly
    between ties (so it is the same whichever tied entry NumPy would pick)."""

    @staticmethod
    def forward(ctx, a, *, axis=None, keepdims=False):
        ctx.axes = normalize_axes("max", axis, a.ndim)
        if a.size == 0:
            raise ValueError(f"max: cannot take the max of an empty tensor (shape {a.shape})")
        out = np.max(a, axis=ctx.axes, keepdims=True)
        ctx.save_for_backward(a, out)
        ctx.keepdims = keepdims
        return out if keepdims else np.squeeze(out, axis=ctx.axes)

    @staticmethod
    def backward(ctx, grad):
        a, out = ctx.saved
        is_max = a == out
        share = is_max / np.sum(is_max, axis=ctx.axes, keepdims=True)
        return (share * expand_reduced(grad, ctx.axes, ctx.keepdims),)
