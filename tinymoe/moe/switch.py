"""The Switch Transformer router (Fedus, Zoph & Shazeer 2021): one expert per token.

    h(x) = x · W_r                    router logits, (T, N)
    p_i(x) = softmax(h(x))_i          over all N experts                      eq. (1)
    y = p_{i*}(x) · E_{i*}(x),        i* = argmax_i p_i(x)                     eq. (2)

The combine weight is the **raw** ``p_{i*}`` (below 1), not renormalised: renormalised over a
single expert it would be the constant 1 and the router would get no gradient from the task
loss (reference §7.5). Ties in the argmax go to the lowest expert index.

Stability measures of §2.4, each a parameter here:

* **selective precision** (``router_dtype``, default float32): the router's input is cast
  to float32 and the router body (matmul, softmax) runs in float32 whatever the model's
  dtype; the combine weights are cast back to the model's dtype afterwards. ``W_r`` is
  stored in float32 (float64 when the router runs in float64), like a master copy, so a
  float16 router is a float16 *computation*, not float16 weights. ``"bfloat16"`` is emulated:
  float32 arithmetic whose input, weights, logits and probabilities are rounded to
  bfloat16's 8-bit significand (round to nearest even);
* **input jitter** (``jitter``, ε = 1e-2, training only): the router's input is multiplied by
  noise from U(1 - ε, 1 + ε) (Mesh TF's ``multiplicative_jitter``; the paper's Figure 15
  adds the noise to the logits instead, which does almost nothing, reference §5.4);
* **smaller initialisation** (``init_scale``, s = 0.1): ``W_r`` from a normal with standard
  deviation ``sqrt(s / fan_in)`` truncated at two standard deviations.

Capacity (eq. 3, :func:`~tinymoe.moe.capacity.expert_capacity`): C = ceil(T/N ·
capacity_factor) per group, clamped to [1, T]; the first C tokens of each expert in sequence
order are kept, the others dropped (they leave the layer through the residual unchanged).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tinymoe import ops
from tinymoe.autograd import Function
from tinymoe.dispatch.functions import Routing
from tinymoe.moe.aux_losses import load_balancing_loss, router_z_loss
from tinymoe.moe.capacity import (
    CapacityRouting,
    capacity_positions,
    check_capacity_factor,
    check_num_experts,
    expert_capacity,
    num_groups,
)
from tinymoe.nn.init import RNGLike, as_rng, check_positive_int
from tinymoe.nn.module import Module, Parameter
from tinymoe.tensor import Tensor, as_tensor

ROUTER_DTYPES = ("float16", "bfloat16", "float32", "float64")
JITTER_EPS = 1e-2
INIT_SCALE = 0.1


# --- precision ------------------------------------------------------------------------------
def round_bfloat16_array(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (8 significant bits, ties to even)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    lsb = (bits >> 16) & 1                                    # ties go to an even result
    rounded = (bits + np.uint32(0x7FFF) + lsb) & np.uint32(0xFFFF0000)
    out = rounded.view(np.float32)
    return np.where(np.isfinite(a), out, a).astype(np.float32)  # keep inf / NaN as they are


class RoundBFloat16(Function):
    """Round to bfloat16 in the forward and the backward (an emulated bfloat16 tensor)."""

    @staticmethod
    def forward(ctx, a):
        return round_bfloat16_array(a)

    @staticmethod
    def backward(ctx, grad):
        return (round_bfloat16_array(grad),)


def check_router_dtype(router_dtype: Any, where: str) -> str:
    name = router_dtype if isinstance(router_dtype, str) else np.dtype(router_dtype).name
    if name not in ROUTER_DTYPES:
        raise ValueError(f"{where}: router_dtype={router_dtype!r}; choose one of "
                         f"{', '.join(ROUTER_DTYPES)} (float32 is the paper's selective "
                         f"precision)")
    return name


def to_router_precision(a: Tensor, router_dtype: str) -> Tensor:
    """``a`` in the router's compute precision (bfloat16: float32 rounded to bfloat16)."""
    if router_dtype == "bfloat16":
        return RoundBFloat16.apply(a.astype(np.float32) if a.dtype != np.float32 else a)
    return a if a.dtype == np.dtype(router_dtype) else a.astype(router_dtype)


def truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float,
                     dtype: Any = np.float32) -> np.ndarray:
    """N(0, std²) truncated at ±2 std (values outside are drawn again), as TF's
    ``truncated_normal`` initialiser."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return (out * std).astype(dtype)


def switch_init(rng: np.random.Generator, fan_in: int, shape: tuple[int, ...], dtype: Any,
                scale: float = INIT_SCALE) -> np.ndarray:
    """§2.4: truncated normal with standard deviation ``sqrt(scale / fan_in)`` (s = 0.1)."""
    return truncated_normal(rng, shape, math.sqrt(scale / fan_in), dtype)


# --- the router -----------------------------------------------------------------------------
def router_weight(rng: np.random.Generator, d_model: int, num_experts: int, router_dtype: str,
                  init_scale: float = INIT_SCALE) -> Parameter:
    """A router's (d_model, E) matrix, Switch-initialised (:func:`switch_init`), stored in
    float32 like a master copy (float64 when the router runs in float64)."""
    store = np.float64 if router_dtype == "float64" else np.float32
    return Parameter(switch_init(rng, d_model, (d_model, num_experts), store, init_scale))


def check_router_input(x: Tensor, d_model: int, where: str, min_tokens: int = 0) -> None:
    """``x`` must be (T, d_model), T >= ``min_tokens``: a ValueError naming ``where`` if not."""
    if x.ndim != 2 or x.shape[1] != d_model or x.shape[0] < min_tokens:
        at_least = f" with T >= {min_tokens} tokens" if min_tokens else ""
        raise ValueError(f"{where}(d_model={d_model}): x must be (T, {d_model}){at_least}, got "
                         f"shape {x.shape}; flatten the leading axes first, e.g. "
                         f"x.reshape(-1, {d_model})")


def router_logits(x: Tensor, W_r: Tensor, router_dtype: str = "float32",
                  jitter_noise: np.ndarray | None = None) -> Tensor:
    """``h(x) = x · W_r`` (T, N), computed in ``router_dtype`` (selective precision).

    ``jitter_noise`` (T, d), if given, multiplies the router's input (already drawn from
    U(1 - ε, 1 + ε)). Overflow in a low precision gives inf/NaN logits silently here: the
    gates check them (:func:`check_finite_logits`) and raise a FloatingPointError that says
    what to do.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: see check_finite_logits
        xr = to_router_precision(as_tensor(x), router_dtype)  # (T, d) selective precision
        if jitter_noise is not None:
            xr = xr * to_router_precision(as_tensor(np.asarray(jitter_noise, xr.dtype)),
                                          router_dtype)  # (T, d) multiplicative input jitter
        logits = xr @ to_router_precision(W_r, router_dtype)  # (T, N)
        if router_dtype == "bfloat16":
            logits = RoundBFloat16.apply(logits)
    return logits


def router_probabilities(x: Tensor, W_r: Tensor, router_dtype: str = "float32",
                         jitter_noise: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
    """``(logits, probs)`` (T, N) of eq. (1), computed in ``router_dtype``
    (:func:`router_logits`, then a softmax that subtracts the row maximum first)."""
    logits = router_logits(x, W_r, router_dtype, jitter_noise)  # (T, N)
    with np.errstate(over="ignore", invalid="ignore"):  # NaN logits: see check_finite_logits
        if router_dtype == "bfloat16":
            return logits, RoundBFloat16.apply(ops.softmax(logits, axis=-1))
        return logits, ops.softmax(logits, axis=-1)  # (T, N) each


def check_finite_logits(logits: Tensor, where: str) -> None:
    bad = ~np.isfinite(logits.data)
    if bad.any():
        t, e = np.argwhere(bad)[0]
        raise FloatingPointError(
            f"{where}: the router logits of shape {logits.shape} ({logits.dtype}) contain "
            f"{int(bad.sum())} NaN/inf entries (first at token {t}, expert {e}); the router "
            f"overflowed or training diverged: compute the router in float32 "
            f"(router_dtype='float32'), add the z-loss, lower the learning rate or clip "
            f"gradients")


class SwitchRouter(Module):
    """``W_r`` (d_model, N) and the router body: ``x -> (logits, probs)`` in ``router_dtype``.

    In training mode with ``jitter > 0`` the input is multiplied by U(1 - jitter, 1 + jitter)
    noise from ``self.rng`` (or the ``jitter_noise`` passed to ``forward``); in eval mode
    there is no jitter.
    """

    def __init__(self, d_model: int, num_experts: int, *, router_dtype: Any = "float32",
                 jitter: float = JITTER_EPS, init_scale: float = INIT_SCALE,
                 rng: RNGLike = None) -> None:
        super().__init__()
        self.d_model = check_positive_int(d_model, "d_model", "SwitchRouter")
        self.num_experts = check_num_experts(num_experts, "SwitchRouter")
        self.router_dtype = check_router_dtype(router_dtype, "SwitchRouter")
        if not 0.0 <= float(jitter) < 1.0:
            raise ValueError(f"SwitchRouter: jitter={jitter!r} must be in [0, 1) (the paper "
                             f"uses 1e-2; 0 turns it off)")
        self.jitter = float(jitter)
        self.rng = as_rng(rng)
        self.W_r = router_weight(self.rng, self.d_model, self.num_experts, self.router_dtype,
                                 init_scale)  # (d, N)

    def draw_jitter(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """U(1 - ε, 1 + ε) noise of ``shape`` in training, None in eval or with ε = 0."""
        if not self.training or self.jitter == 0.0:
            return None
        return self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter, size=shape)

    def forward(self, x: Any, jitter_noise: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
        x = as_tensor(x)
        check_router_input(x, self.d_model, "SwitchRouter")
        if jitter_noise is None:
            jitter_noise = self.draw_jitter(x.shape)
        elif not self.training:
            jitter_noise = None  # no jitter in eval, whatever was passed
        elif np.shape(jitter_noise) != x.shape:
            raise ValueError(f"SwitchRouter: jitter_noise has shape {np.shape(jitter_noise)}, "
                             f"expected the input's shape {x.shape}")
        return router_probabilities(x, self.W_r, self.router_dtype, jitter_noise)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, "
                f"router_dtype={self.router_dtype!r}, jitter={self.jitter:g}")


# --- the gate: router + top-1 + capacity + losses ----------------------------------------------
def switch_route(logits: Tensor, probs: Tensor, capacity_factor: float, *,
                 group_size: int | None = None, out_dtype: Any = np.float32
                 ) -> CapacityRouting:
    """Top-1 routing with capacity from the router's ``logits`` and ``probs`` (T, N).

    The chosen expert is ``argmax p`` (ties: lowest index); its combine weight is the raw
    ``p_{i*}`` (eq. 2) cast to ``out_dtype``; C = ``expert_capacity(S, N,
    capacity_factor)`` per group of S tokens; the load-balancing loss (eqs. 4-6, without α)
    and the z-loss are computed on the pre-drop choices.
    """
    T, N = probs.shape
    G, S = num_groups(T, group_size, "switch_route")
    expert = np.argmax(probs.data, axis=1)[:, None]  # (T, 1) i*, lowest index on ties
    p_top = ops.take_along_axis(probs, expert, axis=1)  # (T, 1) p_{i*}, eq. (2)
    C = expert_capacity(S, N, capacity_factor)
    position, counts = capacity_positions(expert, N, C, group_size=group_size)  # (T, 1), (E,)
    weight = p_top if p_top.dtype == np.dtype(out_dtype) else p_top.astype(out_dtype)
    routing = Routing(expert.astype(np.int64), weight, position, counts, N, G * C)
    aux = load_balancing_loss(probs.reshape(G, S, N), expert[:, 0].reshape(G, S))
    demand = np.bincount(expert[:, 0], minlength=N).astype(np.int64)  # (E,)
    return CapacityRouting(routing, logits, probs, C, G, aux, router_z_loss(logits), demand,
                           np.ones((T, 1), dtype=bool))


class SwitchGate(Module):
    """The Switch layer's gate: a :class:`SwitchRouter`, top-1, capacity, balancing losses.

    ``gate(x)`` for ``x`` (T, d_model) returns a
    :class:`~tinymoe.moe.capacity.CapacityRouting`. ``capacity_factor`` applies in training,
    ``eval_capacity_factor`` (default: the same) in eval mode. ``group_size``: tokens per
    group (each group has its own C slots per expert; None: the whole batch is one group,
    the paper's per-core capacity on one core).
    """

    k = 1

    def __init__(self, d_model: int, num_experts: int, *, capacity_factor: float = 1.0,
                 eval_capacity_factor: float | None = None, group_size: int | None = None,
                 router_dtype: Any = "float32", jitter: float = JITTER_EPS,
                 init_scale: float = INIT_SCALE, rng: RNGLike = None) -> None:
        super().__init__()
        self.num_experts = check_num_experts(num_experts, "SwitchGate")
        self.capacity_factor = check_capacity_factor(capacity_factor, "SwitchGate")
        self.eval_capacity_factor = self.capacity_factor if eval_capacity_factor is None \
            else check_capacity_factor(eval_capacity_factor, "SwitchGate (eval)")
        if group_size is not None:
            check_positive_int(group_size, "group_size", "SwitchGate")
        self.group_size = group_size
        self.router = SwitchRouter(d_model, num_experts, router_dtype=router_dtype,
                                   jitter=jitter, init_scale=init_scale, rng=rng)

    @property
    def d_model(self) -> int:
        return self.router.d_model

    @property
    def current_capacity_factor(self) -> float:
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def forward(self, x: Any, jitter_noise: np.ndarray | None = None) -> CapacityRouting:
        x = as_tensor(x)
        logits, probs = self.router(x, jitter_noise=jitter_noise)  # (T, N) each
        check_finite_logits(logits, "SwitchGate")
        out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
        return switch_route(logits, probs, self.current_capacity_factor,
                            group_size=self.group_size, out_dtype=out_dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, capacity_factor={self.capacity_factor:g}, "
                f"eval_capacity_factor={self.eval_capacity_factor:g}, "
                f"group_size={self.group_size}")
