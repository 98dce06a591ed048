"""Tensor: a NumPy array that remembers how it was made, so gradients can flow back.

``tm.tensor(data, requires_grad=True)`` makes a leaf. Ops on tensors (``a @ b``,
``x.softmax(axis=-1)``) return new tensors that point back at the op that produced them;
``loss.backward()`` then fills ``.grad`` (a NumPy array of the tensor's shape and dtype) on
every leaf that asked for it.

Dtype rules: NumPy arrays keep their dtype; new float data from Python numbers or lists
becomes float32; ``dtype=`` overrides. Python numbers mixed into an op take the dtype of the
tensor they meet, so ``x * 0.5`` stays float32 when ``x`` is.

This file is the bottom of the engine and imports nothing else from tinymoe. It holds the
Tensor and the walk backward through its graph (:func:`topological_order`,
:func:`backpropagate`). The ops come on top: ``tinymoe/autograd.py`` defines ``Function``,
which records the graph; ``tinymoe/ops/`` holds one ``Function`` per op and a function that
calls it; ``tinymoe/ops/methods.py`` makes those functions the Tensor's methods and
operators (``x.exp()`` is ``ops.exp(x)``, ``a + b`` is ``ops.add(a, b)``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:
    from tinymoe.autograd import Context

DEFAULT_FLOAT = np.float32


def _check_grad_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind != "f":
        raise TypeError(f"{where}: requires_grad=True needs a floating-point tensor, got "
                        f"{dtype}; convert first, e.g. tm.tensor(x, dtype=np.float32)")


class Tensor:
    """A node of the computation graph wrapping ``data`` (an ``np.ndarray``)."""

    __array_priority__ = 1000  # make ``ndarray + Tensor`` call Tensor.__radd__
    __slots__ = ("data", "grad", "_node", "_retains_grad", "requires_grad", "__weakref__",
                 "__dict__")

    def __init__(self, data: np.ndarray, requires_grad: bool = False) -> None:
        self.data: np.ndarray = data
        self.grad: np.ndarray | None = None
        self._node: Context | None = None  # the op that made it; None for a leaf
        self._retains_grad = False
        self.requires_grad = False
        if requires_grad:
            _check_grad_dtype(data.dtype, "tensor")
            self.requires_grad = True

    # --- array-like facts -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        body = np.array2string(self.data, precision=4, threshold=20, separator=", ")
        return f"tensor({body}, dtype={self.dtype}{grad})"

    def numpy(self) -> np.ndarray:
        """The underlying array (not a copy; do not modify it if gradients are pending)."""
        return self.data

    def item(self) -> Any:
        return self.data.item()

    def __float__(self) -> float:
        return float(self.data)

    def __bool__(self) -> bool:
        raise TypeError("Tensor: the truth value of a tensor is ambiguous; compare "
                        "t.item() or use t.numpy().any() / .all()")

    # --- gradients -----------------------------------------------------------------------
    @property
    def is_leaf(self) -> bool:
        return self._node is None

    def detach(self) -> Tensor:
        """The same data, cut off from the graph."""
        return Tensor(self.data)

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if flag:
            _check_grad_dtype(self.dtype, "requires_grad_")
        self.requires_grad = flag
        return self

    def retain_grad(self) -> Tensor:
        """Keep ``.grad`` on this intermediate tensor during backward (for inspection)."""
        self._retains_grad = True
        return self

    def zero_grad(self) -> None:
        self.grad = None

    def _accumulate(self, g: np.ndarray) -> None:
        if self.grad is None:
            self.grad = np.array(g, dtype=self.dtype, copy=True)
        else:
            self.grad += g

    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Backpropagate from this tensor. ``grad`` (dL/dself) is required unless scalar."""
        if not self.requires_grad:
            raise RuntimeError("backward: this tensor does not require grad (no input of the "
                               "ops that made it had requires_grad=True, or it was made "
                               "under no_grad())")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward: a tensor of shape {self.shape} is not a scalar; "
                                   f"pass grad= of the same shape (dL/d this tensor)")
            g = np.ones(self.shape, dtype=self.dtype)
        else:
            g = np.asarray(grad.data if isinstance(grad, Tensor) else grad)
            if g.shape != self.shape:
                raise ValueError(f"backward: grad has shape {g.shape} but the tensor has "
                                 f"shape {self.shape}")
            g = g.astype(self.dtype, copy=False)
        backpropagate(self, g, retain_graph=retain_graph)

    # The ops (``x.exp()``, ``x.sum(axis=0)``, ``a + b``, ``a @ b``, ``x[idx]``, ``x.T``, ...)
    # are attached to this class by tinymoe/ops/methods.py: each is a function of tinymoe.ops.

    # comparisons give plain boolean arrays: they have no gradient
    def __lt__(self, o: Any) -> np.ndarray: return self.data < _raw(o)
    def __le__(self, o: Any) -> np.ndarray: return self.data <= _raw(o)
    def __gt__(self, o: Any) -> np.ndarray: return self.data > _raw(o)
    def __ge__(self, o: Any) -> np.ndarray: return self.data >= _raw(o)

    __hash__ = object.__hash__


def _raw(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def tensor(data: Any, requires_grad: bool = False, dtype: Any = None) -> Tensor:
    """Make a leaf tensor holding a copy of ``data``.

    NumPy arrays keep their dtype; Python floats and lists of them become float32 (the
    default float); ``dtype=`` overrides both.
    """
    if isinstance(data, Tensor):
        data = data.data
    from_python = not isinstance(data, (np.ndarray, np.generic))
    arr = np.array(data, dtype=dtype, copy=True)
    if dtype is None and from_python and arr.dtype == np.float64:
        arr = arr.astype(DEFAULT_FLOAT)
    if arr.dtype == object:
        raise TypeError(f"tensor: cannot make a tensor from {type(data).__name__} data; "
                        f"pass numbers, nested lists of numbers or a NumPy array")
    return Tensor(arr, requires_grad=requires_grad)


def as_tensor(x: Any, like: Tensor | None = None) -> Tensor:
    """``x`` if it is a Tensor, else a constant tensor (no copy of arrays).

    A Python number takes the dtype of ``like`` when that is floating, so ``x * 0.5`` keeps
    ``x``'s precision.
    """
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (bool, int, float)) and like is not None and like.dtype.kind == "f":
        return Tensor(np.asarray(x, dtype=like.dtype))
    if isinstance(x, (np.ndarray, np.generic)):
        return Tensor(np.asarray(x))
    return tensor(x)


# --- backpropagation: the walk through the graph ---------------------------------------------
# A vertex of the graph is a leaf Tensor or a recorded node (an autograd.Context, standing for
# the tensor an op made). A node knows its op (``fn``), where each input's gradient goes
# (``inputs``: a node, a leaf, or None), the output's shape and dtype, and what its backward
# saved.
def topological_order(root: Tensor) -> list[Context | Tensor]:
    """The graph behind ``root``, inputs before outputs: nodes and the leaves they reach.

    An iterative depth-first search appends a vertex once all of its inputs have been, so
    reversing the list gives an order in which every gradient is complete before it is
    passed on. No recursion, so a chain of 100,000 ops is fine.
    """
    order: list[Context | Tensor] = []
    visited: set[int] = set()
    start = root if root._node is None else root._node
    stack: list[tuple[Context | Tensor, bool]] = [(start, False)]
    while stack:
        v, inputs_done = stack.pop()
        if inputs_done:
            order.append(v)
            continue
        if id(v) in visited:
            continue
        visited.add(id(v))
        stack.append((v, True))
        if not isinstance(v, Tensor):  # a node: visit its inputs first
            for parent in v.inputs:
                if parent is not None and id(parent) not in visited:
                    stack.append((parent, False))
    return order


def backpropagate(root: Tensor, grad: np.ndarray, retain_graph: bool = False) -> None:
    """Backpropagate ``grad`` (dL/d root) to every tensor ``root`` depends on.

    Leaves (tensors made by the user with ``requires_grad=True``) and tensors that called
    ``retain_grad()`` get ``.grad`` += their gradient. Unless ``retain_graph`` is set, the
    graph's saved arrays are released afterwards and a second backward through it raises.
    """
    order = topological_order(root)
    grads: dict[int, np.ndarray] = {id(order[-1]): grad}
    for v in reversed(order):
        g = grads.pop(id(v), None)
        if g is None:  # a branch that received no gradient
            continue
        if isinstance(v, Tensor):  # a leaf
            v._accumulate(g)
            continue
        node = v
        out = node.output()
        if out is not None and out._retains_grad:
            out._accumulate(g)
        if node.freed:
            raise RuntimeError(
                f"backward: the graph through {node.fn.__name__} was already freed by an earlier "
                f"backward(); pass retain_graph=True to the first backward() to "
                f"backpropagate through the same graph twice")
        node.retain_graph = retain_graph  # False: backward may free saved arrays as it goes
        in_grads = node.fn.backward(node, g)
        del g
        if not isinstance(in_grads, tuple):
            in_grads = (in_grads,)
        if len(in_grads) != len(node.inputs):
            raise RuntimeError(f"{node.fn.__name__}.backward returned {len(in_grads)} gradients "
                               f"for {len(node.inputs)} inputs")
        for i, (parent, pg) in enumerate(zip(node.inputs, in_grads)):
            if pg is None or parent is None:
                continue
            if isinstance(parent, Tensor):
                shape, dtype = parent.shape, parent.dtype
            else:
                shape, dtype = parent.out_shape, parent.out_dtype
            if pg.shape != shape:
                raise RuntimeError(
                    f"{node.fn.__name__}.backward returned a gradient of shape {pg.shape} for "
                    f"input {i} of shape {shape}; an unbroadcast() is probably missing")
            if pg.dtype != dtype:
                pg = pg.astype(dtype)
            key = id(parent)
            if key in grads:
                grads[key] = grads[key] + pg  # used more than once: the sum
            else:
                grads[key] = pg
        in_grads = pg = None  # drop references before the next node runs
        if not retain_graph:
            node.saved, node.freed = (), True  # release the saved arrays


def graph_nodes(root: Tensor) -> Iterator[Context]:
    """The recorded nodes behind ``root``, inputs first (for lessons that draw the graph)."""
    for v in topological_order(root):
        if not isinstance(v, Tensor):
            yield v
