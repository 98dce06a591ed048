"""The Tensor's methods and operators: each one is a function of :mod:`tinymoe.ops`.

``x.exp()`` is ``ops.exp(x)``, ``x.sum(axis=0)`` is ``ops.sum(x, axis=0)``, ``a + b`` is
``ops.add(a, b)``. The table :data:`METHODS` names, for each method, the function that does
the work, and the loop at the end sets them on :class:`~tinymoe.tensor.Tensor`. A function
stored on a class is called with the instance as its first argument, so ``Tensor.exp =
ops.exp`` is all a method needs; only the few whose arguments differ from the function's get
a one-line adapter below (reflected operators like ``2 - x``, ``x.reshape(2, 3)``, ``x.T``).

Why a separate file: the ops import the Tensor (they make tensors), so the Tensor cannot
import the ops. The engine's imports run one way, ``tensor <- autograd <- ops <- methods``,
and ``import tinymoe`` runs this file, so the methods are there whenever tinymoe is.
Comparisons (``x > 0``), which have no gradient, are defined in the Tensor class itself.
"""
from __future__ import annotations

from typing import Any, Callable

from tinymoe import ops
from tinymoe.tensor import Tensor


# --- adapters: a method whose arguments differ from its function's -----------------------------
# ``2 - x`` calls x.__rsub__(2), which must compute sub(2, x): the operands swap back.
def radd(x: Tensor, other: Any) -> Tensor: return ops.add(other, x)
def rsub(x: Tensor, other: Any) -> Tensor: return ops.sub(other, x)
def rmul(x: Tensor, other: Any) -> Tensor: return ops.mul(other, x)
def rtruediv(x: Tensor, other: Any) -> Tensor: return ops.div(other, x)
def rpow(x: Tensor, other: Any) -> Tensor: return ops.pow(other, x)
def rmatmul(x: Tensor, other: Any) -> Tensor: return ops.matmul(other, x)


def reshape_method(x: Tensor, *shape: Any) -> Tensor:
    """``x.reshape(2, 3)`` or ``x.reshape((2, 3))``, as NumPy allows both."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return ops.reshape(x, shape)


def transpose_method(x: Tensor, *axes: Any) -> Tensor:
    """``x.transpose()`` reverses the axes; ``x.transpose(1, 0, 2)`` or
    ``x.transpose((1, 0, 2))`` permutes them."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return ops.transpose(x, axes or None)


def transposed(x: Tensor) -> Tensor:
    """The transpose, axes reversed (``x.T``)."""
    return ops.transpose(x, None)


# --- the table: method name -> the function it calls -------------------------------------------
#: Every op method and operator of :class:`~tinymoe.tensor.Tensor` and the function it runs.
METHODS: dict[str, Callable[..., Any] | property] = {
    # operators
    "__add__": ops.add, "__radd__": radd,
    "__sub__": ops.sub, "__rsub__": rsub,
    "__mul__": ops.mul, "__rmul__": rmul,
    "__truediv__": ops.div, "__rtruediv__": rtruediv,
    "__pow__": ops.pow, "__rpow__": rpow,
    "__matmul__": ops.matmul, "__rmatmul__": rmatmul,
    "__neg__": ops.neg,
    "__getitem__": ops.getitem,
    # elementwise and activations
    "exp": ops.exp, "log": ops.log, "sqrt": ops.sqrt, "abs": ops.abs, "clip": ops.clip,
    "relu": ops.relu, "gelu": ops.gelu, "tanh": ops.tanh, "sigmoid": ops.sigmoid,
    "softplus": ops.softplus,
    # reductions and the softmax family
    "sum": ops.sum, "mean": ops.mean, "max": ops.max, "var": ops.var,
    "softmax": ops.softmax, "log_softmax": ops.log_softmax, "logsumexp": ops.logsumexp,
    # shapes
    "reshape": reshape_method, "transpose": transpose_method, "permute": transpose_method,
    "T": property(transposed),
    "swapaxes": ops.swapaxes, "broadcast_to": ops.broadcast_to, "squeeze": ops.squeeze,
    "unsqueeze": ops.unsqueeze, "astype": ops.astype,
}

for _name, _method in METHODS.items():
    setattr(Tensor, _name, _method)
