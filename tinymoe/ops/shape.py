"""Ops that move elements around without changing them: reshape, transpose, broadcast_to,
concatenate, stack, astype. Their backward moves the gradient back the same way."""
from __future__ import annotations

import numpy as np

from tinymoe.autograd import Function, unbroadcast


class Reshape(Function):
    @staticmethod
    def forward(ctx, a, *, shape):
        ctx.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape {a.shape} ({a.size} elements) into "
                             f"{tuple(shape)}") from None

    @staticmethod
    def backward(ctx, grad):
        return (grad.reshape(ctx.shape),)


class Transpose(Function):
    """Permute axes (``axes=None`` reverses them); backward applies the inverse permutation."""

    @staticmethod
    def forward(ctx, a, *, axes):
        axes = tuple(range(a.ndim))[::-1] if axes is None else tuple(int(x) for x in axes)
        if sorted(x % max(a.ndim, 1) for x in axes) != list(range(a.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of the "
                             f"{a.ndim} axes of a tensor of shape {a.shape}")
        ctx.inverse = tuple(np.argsort([x % a.ndim for x in axes]))
        return np.transpose(a, axes)

    @staticmethod
    def backward(ctx, grad):
        return (np.transpose(grad, ctx.inverse),)


class BroadcastTo(Function):
    @staticmethod
    def forward(ctx, a, *, shape):
        ctx.shape = a.shape
        try:
            return np.broadcast_to(a, tuple(shape))
        except ValueError:
            raise ValueError(f"broadcast_to: cannot broadcast {a.shape} to "
                             f"{tuple(shape)}") from None

    @staticmethod
    def backward(ctx, grad):
        return (unbroadcast(grad, ctx.shape),)


class Concatenate(Function):
    """Join along ``axis``; backward slices the gradient back into the pieces."""

    @staticmethod
    def forward(ctx, *arrays, axis=0):
        if not arrays:
            raise ValueError("concatenate: need at least one tensor")
        try:
            out = np.concatenate(arrays, axis=axis)
        except ValueError as e:
            shapes = ", ".join(str(a.shape) for a in arrays)
            raise ValueError(f"concatenate: shapes {shapes} do not fit along axis {axis} "
                             f"(all other axes must match): {e}") from None
        ctx.axis = axis % out.ndim
        ctx.splits = np.cumsum([a.shape[ctx.axis] for a in arrays])[:-1]
        return out

    @staticmethod
    def backward(ctx, grad):
        return tuple(np.split(grad, ctx.splits, axis=ctx.axis))


class AsType(Function):
    """Change dtype; the gradient is cast back to the input's dtype."""

    @staticmethod
    def forward(ctx, a, *, dtype):
        ctx.dtype = a.dtype
        return a.astype(dtype)

    @staticmethod
    def backward(ctx, grad):
        return (grad.astype(ctx.dtype),)
