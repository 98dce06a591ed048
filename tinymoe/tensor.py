"""Tensor: a NumPy array that remembers how it was made, so gradients can flow back.

``tm.tensor(data, requires_grad=True)`` makes a leaf. Ops on tensors (``a @ b``,
``x.softmax(axis=-1)``) return new tensors that point back at the op that produced them;
``loss.backward()`` then fills ``.grad`` (a NumPy array of the tensor's shape and dtype) on
every leaf that asked for it.

Dtype rules: NumPy arrays keep their dtype; new float data from Python numbers or lists
becomes float32; ``dtype=`` overrides. Python numbers mixed into an op take the dtype of the
tensor they meet, so ``x * 0.5`` stays float32 when ``x`` is.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tinymoe import autograd

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
        self._node: autograd.Node | None = None
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
        autograd.backward(self, g, retain_graph=retain_graph)

    # --- operators (the ops live in tinymoe.ops) --------------------------------------------
    def __add__(self, o: Any) -> Tensor: return Add.apply(self, o)
    def __radd__(self, o: Any) -> Tensor: return Add.apply(o, self)
    def __sub__(self, o: Any) -> Tensor: return Sub.apply(self, o)
    def __rsub__(self, o: Any) -> Tensor: return Sub.apply(o, self)
    def __mul__(self, o: Any) -> Tensor: return Mul.apply(self, o)
    def __rmul__(self, o: Any) -> Tensor: return Mul.apply(o, self)
    def __truediv__(self, o: Any) -> Tensor: return Div.apply(self, o)
    def __rtruediv__(self, o: Any) -> Tensor: return Div.apply(o, self)
    def __pow__(self, o: Any) -> Tensor: return ops.pow(self, o)
    def __rpow__(self, o: Any) -> Tensor: return ops.pow(o, self)
    def __neg__(self) -> Tensor: return Neg.apply(self)
    def __matmul__(self, o: Any) -> Tensor: return MatMul.apply(self, o)
    def __rmatmul__(self, o: Any) -> Tensor: return MatMul.apply(o, self)
    def __getitem__(self, idx: Any) -> Tensor: return ops.getitem(self, idx)

    # comparisons give plain boolean arrays: they have no gradient
    def __lt__(self, o: Any) -> np.ndarray: return self.data < _raw(o)
    def __le__(self, o: Any) -> np.ndarray: return self.data <= _raw(o)
    def __gt__(self, o: Any) -> np.ndarray: return self.data > _raw(o)
    def __ge__(self, o: Any) -> np.ndarray: return self.data >= _raw(o)

    __hash__ = object.__hash__

    # --- methods mirroring tm.functional ---------------------------------------------------
    def exp(self) -> Tensor: return ops.exp(self)
    def log(self) -> Tensor: return ops.log(self)
    def sqrt(self) -> Tensor: return ops.sqrt(self)
    def abs(self) -> Tensor: return ops.abs(self)
    def relu(self) -> Tensor: return ops.relu(self)
    def gelu(self) -> Tensor: return ops.gelu(self)
    def tanh(self) -> Tensor: return ops.tanh(self)
    def sigmoid(self) -> Tensor: return ops.sigmoid(self)
    def softplus(self) -> Tensor: return ops.softplus(self)
    def clip(self, lo: Any = None, hi: Any = None) -> Tensor: return ops.clip(self, lo, hi)

    def sum(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return ops.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return ops.mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis: Any = None, keepdims: bool = False) -> Tensor:
        return ops.max(self, axis=axis, keepdims=keepdims)

    def var(self, axis: Any = None, keepdims: bool = False, ddof: int = 0) -> Tensor:
        return ops.var(self, axis=axis, keepdims=keepdims, ddof=ddof)

    def softmax(self, axis: int = -1) -> Tensor: return ops.softmax(self, axis=axis)
    def log_softmax(self, axis: int = -1) -> Tensor: return ops.log_softmax(self, axis=axis)

    def logsumexp(self, axis: Any = -1, keepdims: bool = False) -> Tensor:
        return ops.logsumexp(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape: Any) -> Tensor:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return ops.reshape(self, shape)

    def transpose(self, *axes: Any) -> Tensor:
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return ops.transpose(self, axes or None)

    permute = transpose

    @property
    def T(self) -> Tensor:
        return ops.transpose(self, None)

    def swapaxes(self, a: int, b: int) -> Tensor: return ops.swapaxes(self, a, b)
    def broadcast_to(self, shape: Sequence[int]) -> Tensor: return ops.broadcast_to(self, shape)
    def squeeze(self, axis: Any = None) -> Tensor: return ops.squeeze(self, axis)
    def unsqueeze(self, axis: int) -> Tensor: return ops.unsqueeze(self, axis)
    def astype(self, dtype: Any) -> Tensor: return ops.astype(self, dtype)


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


autograd._TENSOR_TYPES[:] = [Tensor, as_tensor]

# the ops import Tensor, so they are bound here, after it exists
from tinymoe import ops  # noqa: E402
from tinymoe.ops.elementwise import Add, Div, Mul, Neg, Sub  # noqa: E402
from tinymoe.ops.linalg import MatMul  # noqa: E402
