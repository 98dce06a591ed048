"""Experts with stacked weights: E feed-forward networks run as one grouped matmul.

After a dropless dispatch the kept (token, choice) rows are sorted by expert, so expert ``e``
owns the contiguous block ``rows[offsets[e]:offsets[e+1]]``. Keeping the E experts' weights
in one array ``W (E, d_in, d_out)`` lets one op multiply every block by its own matrix::

    out[offsets[e]:offsets[e+1]] = rows[offsets[e]:offsets[e+1]] @ W[e] + b[e]

(a "grouped GEMM", MegaBlocks' building block). Its backward per block is the usual pair
``d rows = g @ W[e]^T``, ``dW[e] = rows^T @ g``, ``db[e] = Σ_rows g``. Blocks may be empty
(an expert nobody chose gets zero gradient), and nothing of size (T, E, C) is ever built.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tinymoe import ops
from tinymoe.autograd import Function
from tinymoe.nn.init import RNGLike, as_rng, check_positive_int, float_dtype, lecun_normal
from tinymoe.nn.module import Module, Parameter
from tinymoe.tensor import Tensor, as_tensor

ACTIVATIONS = {"gelu": ops.gelu, "relu": ops.relu}


def check_offsets(offsets: Any, num_rows: int, num_experts: int, op: str) -> np.ndarray:
    """``offsets`` (E+1,) non-decreasing ints from 0 to ``num_rows``."""
    o = np.asarray(offsets)
    if o.shape != (num_experts + 1,) or not np.issubdtype(o.dtype, np.integer):
        raise ValueError(f"{op}: offsets must be (E+1,) = ({num_experts + 1},) integers, got "
                         f"shape {o.shape} dtype {o.dtype}; use the offsets of sort_tokens")
    if o[0] != 0 or o[-1] != num_rows or np.any(np.diff(o) < 0):
        raise ValueError(f"{op}: offsets {o.tolist()} must rise from 0 to the number of rows "
                         f"{num_rows}")
    return o.astype(np.int64, copy=False)


class GroupedLinear(Function):
    """``out[block e] = x[block e] @ W[e] + b[e]`` for blocks given by ``offsets``.

    ``x`` (N, d_in), ``W`` (E, d_in, d_out), ``b`` (E, d_out) -> (N, d_out).
    """

    @staticmethod
    def forward(ctx, x, W, b, *, offsets):
        E, d_in, d_out = W.shape
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(f"grouped_linear: rows of shape {x.shape} do not fit W of shape "
                             f"{W.shape}: expected (N, {d_in})")
        if b.shape != (E, d_out):
            raise ValueError(f"grouped_linear: bias has shape {b.shape}, expected (E, d_out) "
                             f"= {(E, d_out)}")
        o = check_offsets(offsets, x.shape[0], E, "grouped_linear")
        out = np.empty((x.shape[0], d_out), dtype=np.result_type(x, W))  # (N, d_out)
        for e in range(E):
            lo, hi = o[e], o[e + 1]
            out[lo:hi] = x[lo:hi] @ W[e] + b[e]  # (n_e, d_out)
        ctx.save_for_backward(x, W)
        ctx.offsets = o
        return out

    @staticmethod
    def backward(ctx, grad):
        x, W = ctx.saved
        o = ctx.offsets
        need_x, need_W, need_b = ctx.needs_input_grad
        dx = np.empty_like(x) if need_x else None  # (N, d_in)
        dW = np.zeros_like(W) if need_W else None  # (E, d_in, d_out)
        db = np.zeros((W.shape[0], W.shape[2]), dtype=grad.dtype) if need_b else None
        for e in range(W.shape[0]):
            lo, hi = o[e], o[e + 1]
            g = grad[lo:hi]  # (n_e, d_out)
            if need_x:
                dx[lo:hi] = g @ W[e].T  # (n_e, d_in)
            if need_W:
                dW[e] = x[lo:hi].T @ g  # (d_in, d_out)
            if need_b:
                db[e] = g.sum(axis=0)  # (d_out,)
        return dx, dW, db


def grouped_linear(x: Any, W: Any, b: Any, offsets: np.ndarray) -> Tensor:
    """Each block of rows of ``x`` times its own expert's matrix (see the module doc)."""
    return GroupedLinear.apply(x, W, b, offsets=offsets)


class StackedExperts(Module):
    """E two-layer FFN experts ``act(x W1[e] + b1[e]) W2[e] + b2[e]`` with stacked weights.

    ``W1`` (E, d_model, d_ff), ``b1`` (E, d_ff), ``W2`` (E, d_ff, d_model), ``b2`` (E,
    d_model); initialised like ``tm.nn.Linear`` (LeCun normal, zero biases). The 2017
    paper's experts are one-hidden-layer ReLU networks (App. C.1).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "relu",
                 *, dtype: Any = np.float32, rng: RNGLike = None,
                 init_scale: float = 1.0) -> None:
        super().__init__()
        E = check_positive_int(num_experts, "num_experts", "StackedExperts")
        d = check_positive_int(d_model, "d_model", "StackedExperts")
        f = check_positive_int(d_ff, "d_ff", "StackedExperts")
        if activation not in ACTIVATIONS:
            raise ValueError(f"StackedExperts: activation={activation!r}; choose one of "
                             f"{sorted(ACTIVATIONS)}")
        dt = float_dtype(dtype, "StackedExperts")
        gen = as_rng(rng)
        self.num_experts, self.d_model, self.d_ff, self.activation = E, d, f, activation
        self.W1 = Parameter(lecun_normal(gen, d, (E, d, f), dt, init_scale))  # (E, d, d_ff)
        self.b1 = Parameter(np.zeros((E, f), dt))  # (E, d_ff)
        self.W2 = Parameter(lecun_normal(gen, f, (E, f, d), dt, init_scale))  # (E, d_ff, d)
        self.b2 = Parameter(np.zeros((E, d), dt))  # (E, d)

    @classmethod
    def from_feedforwards(cls, experts: Sequence[Module]) -> StackedExperts:
        """Stack the weights of E ``tm.nn.FeedForward`` experts of one shape (copies)."""
        first = experts[0]
        d, f = first.fc1.in_features, first.fc1.out_features
        dt = first.fc1.weight.dtype
        out = cls(len(experts), d, f, first.activation, dtype=dt, rng=0)
        for name, get in (("W1", lambda m: m.fc1.weight), ("b1", lambda m: m.fc1.bias),
                          ("W2", lambda m: m.fc2.weight), ("b2", lambda m: m.fc2.bias)):
            getattr(out, name).data = np.stack([get(m).data for m in experts]).astype(dt)
        return out

    def forward(self, rows: Any, offsets: np.ndarray) -> Tensor:
        """``rows`` (N, d_model) sorted by expert, ``offsets`` (E+1,) -> (N, d_model)."""
        h = grouped_linear(as_tensor(rows), self.W1, self.b1, offsets)  # (N, d_ff)
        h = ACTIVATIONS[self.activation](h)  # (N, d_ff)
        return grouped_linear(h, self.W2, self.b2, offsets)  # (N, d_model)

    def expert(self, e: int, x: Any) -> Tensor:
        """Expert ``e`` alone on ``x`` (n, d_model): for tests and lessons."""
        h = ACTIVATIONS[self.activation](as_tensor(x) @ self.W1[e] + self.b1[e])  # (n, d_ff)
        return h @ self.W2[e] + self.b2[e]  # (n, d_model)

    def extra_repr(self) -> str:
        return (f"{self.num_experts} x ({self.d_model} -> {self.d_ff} -> {self.d_model}), "
                f"activation={self.activation!r}")
