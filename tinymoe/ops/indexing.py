"""Indexing ops: ``x[idx]`` (slices, integer arrays, masks) and take_along_axis.

Their backward is a scatter-add: each output element's gradient is added back to the input
element it was read from. ``np.add.at`` adds repeated indices correctly (``x[[0, 0]]`` sends
two gradients to ``x[0]``), where ``g[idx] += grad`` would keep only one of them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe.autograd import Function
from tinymoe.tensor import Tensor


def _is_basic(idx: Any) -> bool:
    """True when ``idx`` only slices (ints, slices, None, Ellipsis): no element repeats."""
    parts = idx if isinstance(idx, tuple) else (idx,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, np.integer, slice))
               for p in parts)


def _as_index(idx: Any) -> Any:
    """Unwrap tensors inside an index expression into arrays."""
    if isinstance(idx, tuple):
        return tuple(_as_index(p) for p in idx)
    if isinstance(idx, Tensor):
        return idx.data
    if isinstance(idx, list):
        return np.asarray(idx)
    return idx


class GetItem(Function):
    @staticmethod
    def forward(ctx, a, *, idx):
        try:
            out = a[idx]
        except IndexError as e:
            raise IndexError(f"getitem: index {idx!r} does not fit a tensor of shape "
                             f"{a.shape}: {e}") from None
        ctx.idx, ctx.shape, ctx.basic = idx, a.shape, _is_basic(idx)
        return np.array(out, copy=True) if ctx.basic else out

    @staticmethod
    def backward(ctx, grad):
        g = np.zeros(ctx.shape, dtype=grad.dtype)
        if ctx.basic:
            g[ctx.idx] = grad  # slices never overlap themselves
        else:
            np.add.at(g, ctx.idx, grad)  # repeated indices add up
        return (g,)


def along_axis_index(indices: np.ndarray, axis: int) -> tuple[np.ndarray, ...]:
    """The full index tuple that ``take_along_axis(a, indices, axis)`` reads from."""
    grids = list(np.ogrid[tuple(slice(n) for n in indices.shape)])
    grids[axis] = indices
    return tuple(grids)


class TakeAlongAxis(Function):
    """out = np.take_along_axis(a, indices, axis); backward scatter-adds into ``a``."""

    @staticmethod
    def forward(ctx, a, *, indices, axis):
        indices = np.asarray(indices)
        if not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"take_along_axis: indices must be integers, got {indices.dtype}")
        if indices.ndim != a.ndim:
            raise ValueError(f"take_along_axis: indices {indices.shape} must have as many axes "
                             f"as the tensor {a.shape}")
        axis = axis % a.ndim
        n = a.shape[axis]
        if indices.size and (indices.min() < -n or indices.max() >= n):
            raise IndexError(f"take_along_axis: index out of range for axis {axis} of size {n}")
        ctx.index = along_axis_index(indices % max(n, 1), axis)
        ctx.shape = a.shape
        return a[ctx.index]

    @staticmethod
    def backward(ctx, grad):
        g = np.zeros(ctx.shape, dtype=grad.dtype)
        np.add.at(g, ctx.index, grad)
        return (g,)
