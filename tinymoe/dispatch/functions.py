"""Dispatch and combine as autograd Functions, on whichever backend is active.

A gate ends in a :class:`Routing`; the layer then does::

    routing = route(expert_index, gate_values, num_experts, capacity)   # positions, counts
    buf = dispatch(x, routing)          # (E, C, d), or (N, d) grouped by expert if dropless
    out = experts(buf)                  # expert e reads buf[e] or buf[offsets[e]:offsets[e+1]]
    y = combine(out, routing)           # (T, d): y_t = sum_j w_tj out[e_tj, p_tj]

Gradients flow to ``x`` (through dispatch), to the experts' outputs and to the gate values
(through combine). The choice of experts itself gets no gradient (reference §7.5).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinymoe.autograd import Function
from tinymoe.dispatch.backend import backend_module
from tinymoe.tensor import Tensor


def _array(a: Any) -> np.ndarray:
    return a.data if isinstance(a, Tensor) else np.asarray(a)


# --- capacity mode -----------------------------------------------------------------------


class Dispatch(Function):
    """buffer[e_tj, p_tj] = x[t] (E, C, d);  backward: dx_t = sum_j dbuffer[e_tj, p_tj]."""

    @staticmethod
    def forward(ctx, x, *, expert_index, position, num_experts, capacity):
        ctx.impl = backend_module()
        ctx.routing = (expert_index, position, num_experts, capacity)
        return ctx.impl.dispatch(x, expert_index, position, num_experts, capacity)

    @staticmethod
    def backward(ctx, grad):
        return (ctx.impl.dispatch_backward(grad, *ctx.routing),)


class Combine(Function):
    """y_t = sum_j w_tj buffer_out[e_tj, p_tj] (T, d);  backward to buffer_out and w."""

    @staticmethod
    def forward(ctx, buffer_out, combine_weight, *, expert_index, position):
        ctx.impl = backend_module()
        ctx.routing = (expert_index, position)
        ctx.save_for_backward(buffer_out, combine_weight)
        return ctx.impl.combine(buffer_out, expert_index, position, combine_weight)

    @staticmethod
    def backward(ctx, grad):
        buffer_out, w = ctx.saved
        expert_index, position = ctx.routing
        grad_out, grad_w = ctx.impl.combine_backward(grad, buffer_out, expert_index, position, w)
        need_out, need_w = ctx.needs_input_grad
        return (grad_out if need_out else None), (grad_w if need_w else None)


# --- sorted (dropless) mode ----------------------------------------------------------------


class DispatchSorted(Function):
    """rows[i] = x[order[i] // k] (N, d);  backward: dx_t = sum_j drows[row_tj]."""

    @staticmethod
    def forward(ctx, x, *, order, k):
        ctx.impl = backend_module()
        ctx.order, ctx.k, ctx.num_tokens = order, k, x.shape[0]
        return ctx.impl.dispatch_sorted(x, order, k)

    @staticmethod
    def backward(ctx, grad):
        return (ctx.impl.dispatch_sorted_backward(grad, ctx.order, ctx.num_tokens, ctx.k),)


class CombineSorted(Function):
    """y_t = sum_j w_tj rows_out[row_tj] (T, d);  backward to rows_out and w."""

    @staticmethod
    def forward(ctx, rows_out, combine_weight, *, order):
        ctx.impl = backend_module()
        ctx.order = order
        ctx.save_for_backward(rows_out, combine_weight)
        return ctx.impl.combine_sorted(rows_out, order, combine_weight)

    @staticmethod
    def backward(ctx, grad):
        rows_out, w = ctx.saved
        grad_out, grad_w = ctx.impl.combine_sorted_backward(grad, rows_out, ctx.order, w)
        need_out, need_w = ctx.needs_input_grad
        return (grad_out if need_out else None), (grad_w if need_w else None)


# --- the routing every gate produces -----------------------------------------------------


@dataclass(eq=False)
class Routing:
    """A router's decision, in the arrays of the dispatch contract.

    ``expert_index`` (T, k) int64 in priority order; ``combine_weight`` (T, k) the gate
    values (a Tensor, so the gate gets gradients, or an array); ``position`` (T, k) int64
    slot in the expert's buffer, -1 if dropped; ``counts`` (E,) slots filled per expert;
    ``capacity`` C, or None for dropless routing.
    """

    expert_index: np.ndarray
    combine_weight: Any
    position: np.ndarray
    counts: np.ndarray
    num_experts: int
    capacity: int | None
    _sorted: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False,
                                                          compare=False)

    @property
    def num_tokens(self) -> int:
        return self.expert_index.shape[0]

    @property
    def k(self) -> int:
        return self.expert_index.shape[1]

    @property
    def dropped(self) -> np.ndarray:
        """(T, k) bool: True where a choice found its expert full."""
        return self.position < 0

    @property
    def dropped_fraction(self) -> float:
        """Share of the T·k choices that were dropped."""
        return float(self.dropped.mean()) if self.position.size else 0.0

    def sorted_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """``(order (N,), offsets (E+1,))`` of the kept pairs, computed once."""
        if self._sorted is None:
            position = None if self.capacity is None else self.position
            self._sorted = backend_module().sort_tokens(self.expert_index, self.num_experts,
                                                        position)
        return self._sorted

    @property
    def order(self) -> np.ndarray:
        return self.sorted_layout()[0]

    @property
    def offsets(self) -> np.ndarray:
        """Expert e's rows in the sorted layout are ``offsets[e]:offsets[e + 1]``."""
        return self.sorted_layout()[1]


def route(expert_index: Any, combine_weight: Any, num_experts: int,
          capacity: int | None = None) -> Routing:
    """Positions and counts for a routing (choice-major priority; see assign_positions)."""
    e = _array(expert_index)
    position, counts = backend_module().assign_positions(e, num_experts, capacity)
    return Routing(np.asarray(e, dtype=np.int64), combine_weight, position, counts,
                   int(num_experts), None if capacity is None else int(capacity))


# --- user-facing functions of tensors ----------------------------------------------------


def dispatch(x: Tensor, routing: Routing) -> Tensor:
    """Tokens into the experts' inputs: (E, C, d) with a capacity, else sorted (N, d)."""
    if routing.capacity is None:
        return dispatch_sorted(x, routing)
    return Dispatch.apply(x, expert_index=routing.expert_index, position=routing.position,
                          num_experts=routing.num_experts, capacity=routing.capacity)


def combine(expert_out: Tensor, routing: Routing) -> Tensor:
    """Experts' outputs back to tokens, weighted by the gate: (T, d)."""
    if routing.capacity is None:
        return combine_sorted(expert_out, routing)
    return Combine.apply(expert_out, routing.combine_weight, expert_index=routing.expert_index,
                         position=routing.position)


def dispatch_sorted(x: Tensor, routing: Routing) -> Tensor:
    """Kept tokens as rows grouped by expert (N, d); expert e gets rows offsets[e]:offsets[e+1]."""
    return DispatchSorted.apply(x, order=routing.order, k=routing.k)


def combine_sorted(rows_out: Tensor, routing: Routing) -> Tensor:
    """The inverse of :func:`dispatch_sorted`, weighted by the gate: (T, d)."""
    return CombineSorted.apply(rows_out, routing.combine_weight, order=routing.order)
