"""Dispatch and combine as autograd Functions, on whichever backend is active.

A router ends in a :class:`~tinymoe.dispatch.routing.Routing`; the layer then does::

    routing = router(x)                 # or route(expert_index, gate_values, E, capacity)
    buf = dispatch(x, routing)          # (E, C, d), or (N, d) grouped by expert if dropless
    out = experts(buf)                  # expert e reads buf[e] or buf[offsets[e]:offsets[e+1]]
    y = combine(out, routing)           # (T, d): y_t = sum_j w_tj out[e_tj, p_tj]

Gradients flow to ``x`` (through dispatch), to the experts' outputs and to the gate values
(through combine). The choice of experts itself gets no gradient: it is a discrete decision,
which is why a top-1 router must weight its expert by the raw probability (Switch, eq. 2).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe.autograd import Function
from tinymoe.dispatch.backend import backend_module
from tinymoe.dispatch.routing import Routing
from tinymoe.tensor import Tensor


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
    return Combine.apply(expert_out, _weight(routing), expert_index=routing.expert_index,
                         position=routing.position)


def dispatch_sorted(x: Tensor, routing: Routing) -> Tensor:
    """Kept tokens as rows grouped by expert (N, d); expert e gets rows offsets[e]:offsets[e+1]."""
    return DispatchSorted.apply(x, order=routing.order, k=routing.k)


def combine_sorted(rows_out: Tensor, routing: Routing) -> Tensor:
    """The inverse of :func:`dispatch_sorted`, weighted by the gate: (T, d)."""
    return CombineSorted.apply(rows_out, _weight(routing), order=routing.order)


def _weight(routing: Routing) -> Any:
    """The combine weights in a dtype the kernels take (float16 gates move as float32)."""
    w = routing.combine_weight
    return kernel_dtype(w) if isinstance(w, Tensor) else w


# --- dtypes the kernels take -------------------------------------------------------------


def as_dtype(a: Tensor, dtype: Any) -> Tensor:
    """``a`` in ``dtype`` (no op when it already is)."""
    return a if a.dtype == np.dtype(dtype) else a.astype(dtype)


def kernel_dtype(a: Tensor) -> Tensor:
    """float16 (which the Numba kernels do not take) moves as float32: exact for the copies
    of dispatch, and combine's products are rounded once, at the end."""
    return as_dtype(a, np.float32) if a.dtype not in (np.float32, np.float64) else a
