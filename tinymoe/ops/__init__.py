"""The differentiable ops as plain functions (``tm.functional`` re-exports them).

Each function checks its arguments and calls one Function's ``apply``; the Functions live
in the files of this package, one family per file, forward and backward side by side. The
Tensor's methods and operators are these same functions (``x.exp()`` is ``exp(x)``, ``a + b``
is ``add(a, b)``), attached to the class in one table in ``tinymoe/ops/methods.py``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tinymoe.ops.activations import GELU, ReLU, Sigmoid, Softplus, Tanh
from tinymoe.ops.elementwise import (Abs, Add, Clip, Div, Exp, Log, Maximum, Minimum, Mul,
                                     Neg, Pow, Sqrt, Sub, Where)
from tinymoe.ops.indexing import GetItem, TakeAlongAxis, _as_index
from tinymoe.ops.linalg import Linear, MatMul
from tinymoe.ops.reductions import Max, Mean, Sum, normalize_axes
from tinymoe.ops.shape import AsType, BroadcastTo, Concatenate, Reshape, Transpose
from tinymoe.ops.softmax import LogSoftmax, LogSumExp, Softmax
from tinymoe.ops.special import Erf, NormalCDF
from tinymoe.tensor import Tensor, as_tensor


# --- elementwise ----------------------------------------------------------------------------
def add(a: Any, b: Any): return Add.apply(a, b)
def sub(a: Any, b: Any): return Sub.apply(a, b)
def mul(a: Any, b: Any): return Mul.apply(a, b)
def div(a: Any, b: Any): return Div.apply(a, b)
def neg(a: Any): return Neg.apply(a)
def pow(a: Any, b: Any): return Pow.apply(a, b)  # noqa: A001
def exp(a: Any): return Exp.apply(a)
def log(a: Any): return Log.apply(a)
def sqrt(a: Any): return Sqrt.apply(a)
def abs(a: Any): return Abs.apply(a)  # noqa: A001
def maximum(a: Any, b: Any): return Maximum.apply(a, b)
def minimum(a: Any, b: Any): return Minimum.apply(a, b)
def clip(a: Any, lo: Any = None, hi: Any = None): return Clip.apply(a, lo=lo, hi=hi)


def where(cond: Any, a: Any, b: Any):
    """``cond ? a : b`` elementwise; ``cond`` is a boolean array (or tensor) with no gradient."""
    cond = cond.data if isinstance(cond, Tensor) else np.asarray(cond)
    like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
    return Where.apply(as_tensor(a, like), as_tensor(b, like), cond=cond)


# --- activations and special functions ---------------------------------------------------------
def relu(a: Any): return ReLU.apply(a)
def gelu(a: Any): return GELU.apply(a)
def tanh(a: Any): return Tanh.apply(a)
def sigmoid(a: Any): return Sigmoid.apply(a)
def softplus(a: Any): return Softplus.apply(a)
def erf(a: Any): return Erf.apply(a)
def normal_cdf(a: Any): return NormalCDF.apply(a)


# --- matmul and reductions -----------------------------------------------------------------------
def matmul(a: Any, b: Any): return MatMul.apply(a, b)
def linear(a: Any, b: Any, bias: Any): return Linear.apply(a, b, bias)  # a @ b + bias
def sum(a: Any, axis: Any = None, keepdims: bool = False):  # noqa: A001
    return Sum.apply(a, axis=axis, keepdims=keepdims)
def mean(a: Any, axis: Any = None, keepdims: bool = False):
    return Mean.apply(a, axis=axis, keepdims=keepdims)
def max(a: Any, axis: Any = None, keepdims: bool = False):  # noqa: A001
    return Max.apply(a, axis=axis, keepdims=keepdims)


def var(a: Any, axis: Any = None, keepdims: bool = False, ddof: int = 0):
    """Variance sum((a - mean)^2) / (n - ddof), composed from differentiable ops."""
    a = as_tensor(a)
    axes = normalize_axes("var", axis, a.ndim)
    n = int(np.prod([a.shape[i] for i in axes]))
    if n - ddof <= 0:
        raise ValueError(f"var: {n} values with ddof={ddof} leave no degrees of freedom")
    d = a - mean(a, axis=axes, keepdims=True)
    return sum(d * d, axis=axes, keepdims=keepdims) / float(n - ddof)


# --- softmax family ------------------------------------------------------------------------------
def softmax(a: Any, axis: int = -1): return Softmax.apply(a, axis=axis)
def log_softmax(a: Any, axis: int = -1): return LogSoftmax.apply(a, axis=axis)
def logsumexp(a: Any, axis: int = -1, keepdims: bool = False):
    return LogSumExp.apply(a, axis=axis, keepdims=keepdims)


# --- shapes --------------------------------------------------------------------------------------
def reshape(a: Any, shape: Sequence[int]): return Reshape.apply(a, shape=tuple(shape))
def transpose(a: Any, axes: Sequence[int] | None = None): return Transpose.apply(a, axes=axes)
permute = transpose


def swapaxes(a: Any, i: int, j: int):
    axes = list(range(a.ndim))
    axes[i], axes[j] = axes[j], axes[i]
    return transpose(a, axes)


def broadcast_to(a: Any, shape: Sequence[int]): return BroadcastTo.apply(a, shape=tuple(shape))
def astype(a: Any, dtype: Any): return AsType.apply(a, dtype=np.dtype(dtype))


def squeeze(a: Any, axis: Any = None):
    shape = a.shape
    axes = [i for i, n in enumerate(shape) if n == 1] if axis is None else \
        list(normalize_axes("squeeze", axis, a.ndim))
    for i in axes:
        if shape[i] != 1:
            raise ValueError(f"squeeze: axis {i} has size {shape[i]}, not 1 (shape {shape})")
    return reshape(a, [n for i, n in enumerate(shape) if i not in axes])


def unsqueeze(a: Any, axis: int):
    ndim = a.ndim + 1
    if not -ndim <= axis < ndim:
        raise ValueError(f"unsqueeze: axis {axis} is out of range for a result with {ndim} axes")
    shape = list(a.shape)
    shape.insert(axis % ndim, 1)
    return reshape(a, shape)


def concatenate(tensors: Sequence[Any], axis: int = 0):
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors: Sequence[Any], axis: int = 0):
    if not len(tensors):
        raise ValueError("stack: need at least one tensor")
    shapes = {tuple(np.shape(t.data if hasattr(t, "data") else t)) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"stack: all tensors need the same shape, got {sorted(shapes)}")
    return concatenate([unsqueeze(as_tensor(t), axis) for t in tensors], axis=axis)


# --- indexing and selection ------------------------------------------------------------------
def getitem(a: Any, idx: Any): return GetItem.apply(a, idx=_as_index(idx))


def take_along_axis(a: Any, indices: Any, axis: int):
    if isinstance(indices, Tensor):
        indices = indices.data
    return TakeAlongAxis.apply(a, indices=indices, axis=axis)


def topk(a: Any, k: int, axis: int = -1):
    """The ``k`` largest entries along ``axis``, largest first: ``(values, indices)``.

    ``values`` is a tensor that carries gradient back to the chosen entries; ``indices`` is
    an int64 NumPy array (selection has no gradient). Ties go to the lower index
    (tinymoe's convention, from ``np.argsort(kind="stable")``): ``topk(zeros(8), 2)`` picks
    ``[0, 1]``. ``torch.topk`` does not promise an order for ties (on CPU it returns
    ``[6, 5]`` for that input), so compare with it only on inputs without ties.
    """
    a = as_tensor(a)
    if a.ndim == 0:
        raise ValueError("topk: needs a tensor with at least one axis")
    n = a.shape[axis]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"topk: k={k} must be an integer in [1, {n}] (axis {axis} has "
                         f"{n} entries)")
    if np.isnan(a.data).any():
        raise ValueError("topk: input contains NaN, so the order is undefined; check the "
                         "logits upstream (a NaN in the router input?)")
    idx = np.argsort(-a.data, axis=axis, kind="stable")
    idx = np.take(idx, np.arange(k), axis=axis)  # (..., k, ...)
    return take_along_axis(a, idx, axis), idx


def one_hot(indices: Any, num_classes: int, dtype: Any = np.float32):
    """A constant tensor with a 1 at each index along a new last axis."""
    idx = np.asarray(indices.data if isinstance(indices, Tensor) else indices)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"one_hot: indices must be integers, got {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
        raise ValueError(f"one_hot: indices must lie in [0, {num_classes}), got "
                         f"min {idx.min()} max {idx.max()}")
    out = np.zeros(idx.shape + (num_classes,), dtype=dtype)
    np.put_along_axis(out, idx[..., None], 1, axis=-1)
    return Tensor(out)


def dropout(a: Any, p: float, training: bool = True, rng: np.random.Generator | None = None):
    """Zero each entry with probability ``p`` and scale the rest by 1/(1-p) (inverted
    dropout); the identity when not training or when p = 0."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p={p} must be in [0, 1)")
    a = as_tensor(a)
    if not training or p == 0.0:
        return a
    rng = np.random.default_rng() if rng is None else rng
    keep = (rng.random(a.shape) >= p).astype(a.dtype) / np.asarray(1.0 - p, dtype=a.dtype)
    return a * keep
