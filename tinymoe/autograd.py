"""The autograd engine: Function (a forward/backward pair) and the graph it records, no_grad,
unbroadcast.

Every differentiable op is a subclass of :class:`Function` with two static methods side by
side::

    class Mul(Function):
        @staticmethod
        def forward(ctx, a, b):            # NumPy arrays in, a NumPy array out
            ctx.save_for_backward(a, b)
            return a * b

        @staticmethod
        def backward(ctx, grad):           # dL/d(out) in, one dL/d(input) per input out
            a, b = ctx.saved
            return unbroadcast(grad * b, a.shape), unbroadcast(grad * a, b.shape)

``Mul.apply(x, y)`` runs ``forward`` on the arrays inside the tensors and, when gradients are
wanted, records a node (the :class:`Context`) in the result so that ``loss.backward()`` can
walk the graph later. Positional arguments are the differentiable inputs (Tensors, or
arrays/numbers taken as constants); keyword arguments are non-differentiable settings (an
axis, integer indices, a seed).

The walk itself, :func:`~tinymoe.tensor.backpropagate`, lives with the Tensor in
``tinymoe/tensor.py``: it visits the nodes in reverse topological order, found with an
explicit stack (no recursion, so a chain of 100,000 ops is fine), and sums the gradient
flowing into a tensor from every place it was used. The imports run one way: ``tensor.py``
imports nothing from tinymoe, this file imports ``tensor.py``, and the ops import both.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any

import numpy as np

from tinymoe.tensor import Tensor, as_tensor
# the graph walk, importable from here too (tinymoe.autograd is the engine's public face)
from tinymoe.tensor import backpropagate, graph_nodes, topological_order  # noqa: F401

_GRAD_ENABLED = True


def is_grad_enabled() -> bool:
    """True unless inside a ``no_grad()`` block."""
    return _GRAD_ENABLED


class no_grad(contextlib.ContextDecorator):
    """Context manager (and decorator) that stops ops from recording the graph."""

    def __enter__(self) -> None:
        global _GRAD_ENABLED
        self._prev, _GRAD_ENABLED = _GRAD_ENABLED, False

    def __exit__(self, *exc: Any) -> None:
        global _GRAD_ENABLED
        _GRAD_ENABLED = self._prev


class enable_grad(contextlib.ContextDecorator):
    """Context manager that turns graph recording back on inside a ``no_grad`` block."""

    def __enter__(self) -> None:
        global _GRAD_ENABLED
        self._prev, _GRAD_ENABLED = _GRAD_ENABLED, True

    def __exit__(self, *exc: Any) -> None:
        global _GRAD_ENABLED
        _GRAD_ENABLED = self._prev


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` down to ``shape``: the backward of NumPy broadcasting.

    Broadcasting prepends axes of size 1 and stretches size-1 axes; the gradient of a
    stretched axis is the sum over it. Example: ``(4, 3) -> (3,)`` sums axis 0;
    ``(4, 3) -> (4, 1)`` sums axis 1 keeping it.
    """
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra < 0:
        raise ValueError(f"unbroadcast: gradient of shape {grad.shape} has fewer axes "
                         f"than the target shape {tuple(shape)}")
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))  # drop the prepended axes
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    if grad.shape != tuple(shape):
        raise ValueError(f"unbroadcast: cannot reduce a gradient of shape {grad.shape} "
                         f"to shape {tuple(shape)}")
    return grad


class Context:
    """One op application: scratch space shared by its forward and backward, and (once
    recorded in the graph) a node standing for the op's output.

    A recorded node remembers, for each input, where its gradient goes: the input's own
    node if an op made it, the tensor itself if it is a leaf, ``None`` if it needs no
    gradient. It does **not** keep the input tensors, so an intermediate array stays in
    memory only while something uses it or a backward ``saved`` it (as in PyTorch): the
    graph of a big layer holds what backward needs, not every array the forward made.
    """

    def __init__(self, fn: type[Function], needs_input_grad: tuple[bool, ...]) -> None:
        self.fn = fn
        self.needs_input_grad = needs_input_grad
        self.saved: tuple[Any, ...] = ()
        self.inputs: tuple[Context | Tensor | None, ...] = ()  # where each gradient goes
        self.out_shape: tuple[int, ...] = ()  # the output's shape and dtype
        self.out_dtype: np.dtype | None = None
        self.output: weakref.ref | None = None  # the output tensor, for retain_grad()
        self.freed = False
        self.retain_graph = False  # set by backward(): may its backward free what it saved?

    def save_for_backward(self, *values: Any) -> None:
        self.saved = values


Node = Context  # a recorded Context is a node of the graph


def _edge(t: Tensor) -> Context | Tensor | None:
    """Where the gradient of input ``t`` goes: its node, the leaf itself, or nowhere."""
    if not t.requires_grad:
        return None
    return t if t._node is None else t._node


class Function:
    """Base class of every differentiable op (see the module docstring)."""

    @staticmethod
    def forward(ctx: Context, *args: np.ndarray, **kwargs: Any) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, grad: np.ndarray) -> tuple[np.ndarray | None, ...]:
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Any, **kwargs: Any) -> Tensor:
        like = None
        for x in inputs:
            if isinstance(x, Tensor):
                like = x
                break
        tensors = tuple(x if isinstance(x, Tensor) else as_tensor(x, like=like)
                        for x in inputs)
        needs = tuple([t.requires_grad for t in tensors])
        ctx = Context(cls, needs)
        out = cls.forward(ctx, *[t.data for t in tensors], **kwargs)
        if not isinstance(out, np.ndarray):
            out = np.asarray(out)
        result = Tensor(out)
        if _GRAD_ENABLED and True in needs:
            result.requires_grad = True  # a float result: it came from float inputs
            ctx.inputs = tuple([_edge(t) for t in tensors])
            ctx.out_shape, ctx.out_dtype = out.shape, out.dtype
            ctx.output = weakref.ref(result)
            result._node = ctx
        return result
