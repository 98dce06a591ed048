"""The experts: E feed-forward networks with stacked weights, or a list of any Modules.

Dispatch hands the experts their tokens in one of two layouts (the routing's dispatch mode):

* **capacity buffers** ``(E, C, d)``: expert e reads ``buf[e]``, padding included. Stacked
  weights ``W (E, d_in, d_out)`` turn the E FFNs into one batched matmul, GShard's
  Algorithm 2 (``"EGCM,EMH->EGCH"``).
* **sorted rows** ``(N, d)`` (dropless): the kept (token, choice) rows grouped by expert,
  expert e owning ``rows[offsets[e]:offsets[e+1]]``. One op multiplies every block by its
  own matrix (a "grouped GEMM", MegaBlocks' building block)::

      out[offsets[e]:offsets[e+1]] = rows[offsets[e]:offsets[e+1]] @ W[e] + b[e]

  Its backward per block is the usual pair ``d rows = g @ W[e]^T``, ``dW[e] = rows^T @ g``,
  ``db[e] = Σ_rows g``. Blocks may be empty (an expert nobody chose gets zero gradient).

Either way ``experts(buf, offsets)`` maps the layout to the same layout of outputs
(``offsets=None`` for buffers), and nothing of size (T, E, C) is ever built.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tinymoe import ops, validate
from tinymoe.autograd import Function
from tinymoe.dispatch.functions import as_dtype
from tinymoe.moe.ffn_kernels import bias_relu_, relu_grad_
from tinymoe.nn.dropout import Dropout
from tinymoe.nn.init import RNGLike, as_rng, lecun_normal, switch_init
from tinymoe.nn.module import Module, ModuleList, Parameter
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


def check_filled_rows(rows: Any, num_experts: int, capacity: int, op: str) -> np.ndarray:
    """``rows`` (E,) integers in [0, C]: how many leading slots of each buffer to compute."""
    r = np.asarray(rows)
    if r.shape != (num_experts,) or not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"{op}: rows must be (E,) = ({num_experts},) integers, got shape "
                         f"{r.shape} dtype {r.dtype}; use routing.filled_rows")
    if r.size and (r.min() < 0 or r.max() > capacity):
        raise ValueError(f"{op}: rows {r.tolist()} must lie in [0, C] = [0, {capacity}]")
    return r.astype(np.int64, copy=False)


class BufferLinear(Function):
    """``out[e, :n_e] = x[e, :n_e] @ W[e] + b[e]`` on capacity buffers, 0 past ``n_e``.

    ``x`` (E, C, d_in), ``W`` (E, d_in, d_out), ``b`` (E, d_out), ``rows`` (E,) the n_e.
    A router fills each expert's buffer from slot 0 up, so the slots past the last filled
    one are padding: their outputs are never combined and their gradients are 0, and
    multiplying them would be arithmetic thrown away (a fifth of the buffer at capacity
    factor 1.25 with perfect balance, more when the router is unbalanced). Each expert's
    product is one matrix product written straight into its rows of the output.
    ``relu=True`` applies max(., 0) in the same array (saved for backward, as
    :class:`~tinymoe.ops.activations.ReLU` saves its output): d pre = grad · [out > 0].
    Backward per expert: ``dx = g W^T``, ``dW = x^T g``, ``db = Σ_rows g`` over its n_e rows.
    """

    @staticmethod
    def forward(ctx, x, W, b, *, rows, relu=False):
        E, d_in, d_out = W.shape
        if x.ndim != 3 or x.shape[0] != E or x.shape[2] != d_in:
            raise ValueError(f"buffer_linear: buffers of shape {x.shape} do not fit W of "
                             f"shape {W.shape}: expected (E, C, d_in) = ({E}, C, {d_in})")
        if b.shape != (E, d_out):
            raise ValueError(f"buffer_linear: bias has shape {b.shape}, expected (E, d_out) "
                             f"= {(E, d_out)}")
        n = check_filled_rows(rows, E, x.shape[1], "buffer_linear")
        out = np.zeros((E, x.shape[1], d_out), dtype=np.result_type(x, W, b))  # (E, C, d_out)
        for e in range(E):
            o = out[e, :n[e]]  # (n_e, d_out), a view: the product lands in place
            np.matmul(x[e, :n[e]], W[e], out=o)
            bias_relu_(o, b[e], relu)  # o = max(o + b, 0): one pass (ffn_kernels)
        ctx.save_for_backward(x, W, out if relu else None)
        ctx.rows = n
        return out

    @staticmethod
    def backward(ctx, grad):
        x, W, out = ctx.saved
        n = ctx.rows
        need_x, need_W, need_b = ctx.needs_input_grad
        dx = np.zeros(x.shape, grad.dtype) if need_x else None  # (E, C, d_in), 0 in padding
        dW = np.zeros(W.shape, grad.dtype) if need_W else None  # (E, d_in, d_out)
        db = np.zeros((W.shape[0], W.shape[2]), grad.dtype) if need_b else None  # (E, d_out)
        for e in range(W.shape[0]):
            if n[e] == 0:
                continue  # an expert with no tokens: zero gradients
            g = grad[e, :n[e]]  # (n_e, d_out)
            if out is not None:  # through the ReLU, and db, in one pass (a copy of g)
                g = np.array(g)
                g_sum = relu_grad_(g, out[e, :n[e]])
            elif need_b:
                g_sum = g.sum(axis=0)  # (d_out,)
            if need_x:
                np.matmul(g, W[e].T, out=dx[e, :n[e]])  # (n_e, d_in)
            if need_W:
                np.matmul(x[e, :n[e]].T, g, out=dW[e])  # (d_in, d_out)
            if need_b:
                db[e] = g_sum
        return dx, dW, db


def buffer_linear(x: Any, W: Any, b: Any, rows: np.ndarray, relu: bool = False) -> Tensor:
    """Each expert's filled slots times its own matrix, ReLU optional (see BufferLinear)."""
    return BufferLinear.apply(x, W, b, rows=rows, relu=relu)


class BufferFFN(Function):
    """E ReLU FFN experts on the filled slots of capacity buffers, expert after expert::

        h[e, :n_e] = max(x[e, :n_e] @ W1[e] + b1[e], 0)        (n_e, d_ff), saved
        out[e, :n_e] = h[e, :n_e] @ W2[e] + b2[e]             (n_e, d_out), 0 past n_e

    The same numbers as two :class:`BufferLinear` (the first with ``relu=True``), as one op
    so that backward also runs expert by expert: ``dh = g W2^T`` is one expert's (n_e, d_ff)
    block, masked by ``[h > 0]`` in place and used at once for ``dW1 = x^T dh``,
    ``db1 = Σ_rows dh`` and ``dx = dh W1^T``. No (E, C, d_ff) gradient array exists: the
    backward needs one block of it at a time, still in cache when it is used. The hidden
    activations are kept as one (n_e, d_ff) array per expert (no padding), and backward
    frees each expert's as soon as it is done with it (unless the graph is retained).
    """

    @staticmethod
    def forward(ctx, x, W1, b1, W2, b2, *, rows):
        E, d, f = W1.shape
        if x.ndim != 3 or x.shape[0] != E or x.shape[2] != d or W2.shape[:2] != (E, f) \
                or b1.shape != (E, f) or b2.shape != (E, W2.shape[2]):
            raise ValueError(f"buffer_ffn: buffers {x.shape}, W1 {W1.shape}, b1 {b1.shape}, "
                             f"W2 {W2.shape}, b2 {b2.shape} do not fit: expected (E, C, d), "
                             f"(E, d, d_ff), (E, d_ff), (E, d_ff, d_out), (E, d_out)")
        n = check_filled_rows(rows, E, x.shape[1], "buffer_ffn")
        dt = np.result_type(x, W1, b1, W2, b2)
        out = np.zeros((E, x.shape[1], W2.shape[2]), dtype=dt)  # (E, C, d_out)
        hs = []  # one (n_e, d_ff) array per expert: backward frees each once used
        for e in range(E):
            he, oe = np.empty((n[e], f), dtype=dt), out[e, :n[e]]  # (n_e, d_ff), (n_e, d_out)
            np.matmul(x[e, :n[e]], W1[e], out=he)
            bias_relu_(he, b1[e], True)
            np.matmul(he, W2[e], out=oe)
            bias_relu_(oe, b2[e], False)
            hs.append(he)
        ctx.save_for_backward(x, W1, W2)
        ctx.hidden, ctx.rows = hs, n
        return out

    @staticmethod
    def backward(ctx, grad):
        x, W1, W2 = ctx.saved
        hs, n = ctx.hidden, ctx.rows
        nx, nW1, nb1, nW2, nb2 = ctx.needs_input_grad
        E, dt = W1.shape[0], grad.dtype
        dx = np.zeros(x.shape, dt) if nx else None  # (E, C, d), 0 in padding
        dW1 = np.zeros(W1.shape, dt) if nW1 else None  # (E, d, d_ff)
        db1 = np.zeros((E, W1.shape[2]), dt) if nb1 else None  # (E, d_ff)
        dW2 = np.zeros(W2.shape, dt) if nW2 else None  # (E, d_ff, d_out)
        db2 = np.zeros((E, W2.shape[2]), dt) if nb2 else None  # (E, d_out)
        for e in range(E):
            m = n[e]
            if m == 0:
                continue  # an expert with no tokens: zero gradients
            g, h = grad[e, :m], hs[e]  # (n_e, d_out), (n_e, d_ff)
            if not ctx.retain_graph:
                hs[e] = None  # freed when this expert is done (as the graph frees `saved`)
            if nW2:
                np.matmul(h.T, g, out=dW2[e])  # (d_ff, d_out)
            if nb2:
                db2[e] = g.sum(axis=0)
            if not (nx or nW1 or nb1):
                continue
            dh = g @ W2[e].T  # (n_e, d_ff): this expert's block only
            s = relu_grad_(dh, h)  # dh <- dh · [h > 0] in place; Σ_rows dh
            if nb1:
                db1[e] = s
            if nW1:
                np.matmul(x[e, :m].T, dh, out=dW1[e])  # (d, d_ff)
            if nx:
                np.matmul(dh, W1[e].T, out=dx[e, :m])  # (n_e, d)
        return dx, dW1, db1, dW2, db2


def batched_ffn(x: Tensor, W1: Tensor, b1: Tensor, W2: Tensor, b2: Tensor, activation: str,
                dropout: Module | None = None, rows: np.ndarray | None = None) -> Tensor:
    """E FFNs on their buffers at once: ``(E, n, d) -> (E, n, d)``, GShard's Algorithm 2.

    ``h = act(x @ W1 + b1)`` (E, n, d_ff) ("EGCM,EMH->EGCH"), expert dropout on h, then
    ``h @ W2 + b2``; each ``@ ... +`` is one :func:`~tinymoe.ops.linear` (the bias added into
    the product's array). The weights may be any E of the experts' (expert parallelism).
    ``rows`` (E,): expert e computes only its first ``rows[e]`` slots, the rest of its output
    is 0 (:class:`BufferFFN` for ReLU experts without active dropout, else two
    :func:`buffer_linear`).
    """
    if rows is not None:
        relu = activation == "relu"
        if relu and (dropout is None or dropout.p == 0.0 or not dropout.training):
            return BufferFFN.apply(x, W1, b1, W2, b2, rows=rows)  # (E, n, d), 0 past rows[e]
        h = buffer_linear(x, W1, b1, rows, relu=relu)  # (E, n, d_ff), 0 past rows[e]
        if not relu:
            h = ACTIVATIONS[activation](h)  # gelu(0) = 0: the padding stays 0
        if dropout is not None:
            h = dropout(h)  # (E, n, d_ff) expert dropout on the interim activations
        return buffer_linear(h, W2, b2, rows)  # (E, n, d)
    h = ACTIVATIONS[activation](ops.linear(x, W1, ops.unsqueeze(b1, 1)))  # (E, n, d_ff)
    if dropout is not None:
        h = dropout(h)  # (E, n, d_ff) expert dropout on the interim activations
    return ops.linear(h, W2, ops.unsqueeze(b2, 1))  # (E, n, d)


class StackedExperts(Module):
    """E two-layer FFN experts ``act(x W1[e] + b1[e]) W2[e] + b2[e]`` with stacked weights.

    ``W1`` (E, d_model, d_ff), ``b1`` (E, d_ff), ``W2`` (E, d_ff, d_model), ``b2`` (E,
    d_model); initialised like ``tm.nn.Linear`` (LeCun normal, zero biases). The 2017
    paper's experts are one-hidden-layer ReLU networks (App. C.1). ``dropout``: expert
    dropout on the hidden activations, training only (Fedus et al. 2021, §2.4 use 0.4 when
    fine-tuning). Inputs are cast to the weights' dtype.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str = "relu",
                 *, dtype: Any = np.float32, rng: RNGLike = None,
                 init_scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        E = validate.positive_int(num_experts, "num_experts", "StackedExperts")
        d = validate.positive_int(d_model, "d_model", "StackedExperts")
        f = validate.positive_int(d_ff, "d_ff", "StackedExperts")
        if activation not in ACTIVATIONS:
            raise ValueError(f"StackedExperts: activation={activation!r}; choose one of "
                             f"{sorted(ACTIVATIONS)}")
        dt = validate.float_dtype(dtype, "dtype", "StackedExperts")
        gen = as_rng(rng)
        self.num_experts, self.d_model, self.d_ff, self.activation = E, d, f, activation
        self.W1 = Parameter(lecun_normal(gen, d, (E, d, f), dt, init_scale))  # (E, d, d_ff)
        self.b1 = Parameter(np.zeros((E, f), dt))  # (E, d_ff)
        self.W2 = Parameter(lecun_normal(gen, f, (E, f, d), dt, init_scale))  # (E, d_ff, d)
        self.b2 = Parameter(np.zeros((E, d), dt))  # (E, d)
        self.dropout = Dropout(dropout, rng=gen)

    def switch_init_(self, rng: RNGLike, init_scale: float) -> StackedExperts:
        """Re-draw ``W1`` and ``W2`` from the Switch initialisation (truncated normal, std
        ``sqrt(init_scale / fan_in)``, Fedus et al. 2021 §2.4), in place."""
        gen = as_rng(rng)
        for name, fan_in in (("W1", self.d_model), ("W2", self.d_ff)):
            p = getattr(self, name)
            p.data = switch_init(gen, fan_in, p.shape, p.dtype, init_scale)
        return self

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

    def forward(self, x: Any, offsets: np.ndarray | None = None,
                rows: np.ndarray | None = None) -> Tensor:
        """Buffers ``x`` (E, C, d_model) with ``offsets=None``, or rows ``x`` (N, d_model)
        sorted by expert with ``offsets`` (E+1,): the experts' outputs, in the same layout.
        With buffers, ``rows`` (E,) (a routing's ``filled_rows``) skips each expert's padding
        slots past ``rows[e]``: their outputs are 0 instead of FFN(0)."""
        x = as_dtype(as_tensor(x), self.W1.dtype)
        act = ACTIVATIONS[self.activation]
        if offsets is None:  # capacity buffers: one batched matmul over the experts
            return batched_ffn(x, self.W1, self.b1, self.W2, self.b2, self.activation,
                               self.dropout, rows)  # (E, C, d)
        h = act(grouped_linear(x, self.W1, self.b1, offsets))  # (N, d_ff) sorted rows
        return grouped_linear(self.dropout(h), self.W2, self.b2, offsets)  # (N, d_model)

    def expert(self, e: int, x: Any) -> Tensor:
        """Expert ``e`` alone on ``x`` (n, d_model): for tests and lessons."""
        h = ACTIVATIONS[self.activation](as_tensor(x) @ self.W1[e] + self.b1[e])  # (n, d_ff)
        return h @ self.W2[e] + self.b2[e]  # (n, d_model)

    def extra_repr(self) -> str:
        return (f"{self.num_experts} x ({self.d_model} -> {self.d_ff} -> {self.d_model}), "
                f"activation={self.activation!r}")


class ExpertList(ModuleList):
    """Any E Modules as experts; expert e maps an (n, d) batch to (n, d_out), n may be 0.

    ``experts(buf, offsets)`` runs expert e on its part of the layout (``buf[e]`` of
    capacity buffers, or its block of sorted rows) and puts the outputs back in place.
    Experts may be MoE layers themselves: their own aux losses are then dropped (the 2017
    hierarchical MoE balances its experts through the primary gate instead).
    """

    def __init__(self, experts: Sequence[Module]) -> None:
        super().__init__(list(experts))

    def forward(self, x: Any, offsets: np.ndarray | None = None) -> Tensor:
        blocks = list(x) if offsets is None else \
            [x[int(offsets[e]):int(offsets[e + 1])] for e in range(len(self))]  # (n_e, d)
        outs = []
        for e, (expert, block) in enumerate(zip(self, blocks)):
            out = expert(block)  # (n_e, d_out)
            if isinstance(out, tuple):
                out = out[0]  # an MoE layer as an expert: (y, aux_losses)
            if out.ndim != 2 or out.shape[0] != block.shape[0]:
                raise ValueError(f"ExpertList: expert {e} ({type(expert).__name__}) returned "
                                 f"shape {out.shape} for a batch of shape {block.shape}; an "
                                 f"expert must map (n, d) to (n, d_out)")
            outs.append(out)
        widths = {o.shape[1] for o in outs}
        if len(widths) > 1:
            raise ValueError(f"ExpertList: the experts return different widths "
                             f"{sorted(widths)}; every expert must produce the same d_out")
        if offsets is None:
            return ops.stack(outs, axis=0)  # (E, C, d_out)
        return ops.concatenate(outs, axis=0)  # (N, d_out)
