"""What every learned router shares: its weight ``W_r`` (d_model, E) and its logits.

    h(x) = x · W_r          the router's logits, (T, E), in the router's precision
    p(x) = softmax(h(x))    its probabilities over the E experts

The weight starts from the Switch Transformer's initialisation (Fedus et al. 2021, §2.4): a
normal with standard deviation ``sqrt(init_scale / fan_in)``, ``init_scale = 0.1``,
truncated at two standard deviations (TensorFlow's ``truncated_normal``). It is stored in
float32 like a master copy (float64 when the router runs in float64), so a float16 router
is a float16 *computation*, not float16 weights (see :mod:`tinymoe.moe.precision`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops, validate
from tinymoe.moe.precision import RoundBFloat16, to_router_precision
from tinymoe.nn.init import INIT_SCALE, switch_init
from tinymoe.nn.module import Parameter
from tinymoe.tensor import Tensor, as_tensor

def router_weight(rng: np.random.Generator, d_model: int, num_experts: int, router_dtype: str,
                  init_scale: float = INIT_SCALE) -> Parameter:
    """A router's (d_model, E) matrix, Switch-initialised (:func:`switch_init`), stored in
    float32 (float64 when the router runs in float64)."""
    store = np.float64 if router_dtype == "float64" else np.float32
    return Parameter(switch_init(rng, d_model, (d_model, num_experts), store, init_scale))


def router_logits(x: Tensor, W_r: Tensor, router_dtype: str = "float32",
                  jitter_noise: np.ndarray | None = None) -> Tensor:
    """``h(x) = x · W_r`` (T, E), computed in ``router_dtype`` (selective precision).

    ``jitter_noise`` (T, d), if given, multiplies the router's input (already drawn from
    U(1 - ε, 1 + ε)). Overflow in a low precision gives inf/NaN logits silently here: the
    routers check them (:func:`check_finite_logits`) and raise an error that says what to do.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: see check_finite_logits
        xr = to_router_precision(as_tensor(x), router_dtype)  # (T, d) selective precision
        if jitter_noise is not None:
            xr = xr * to_router_precision(as_tensor(np.asarray(jitter_noise, xr.dtype)),
                                          router_dtype)  # (T, d) multiplicative input jitter
        logits = xr @ to_router_precision(W_r, router_dtype)  # (T, E)
        if router_dtype == "bfloat16":
            logits = RoundBFloat16.apply(logits)
    return logits


def router_probabilities(x: Tensor, W_r: Tensor, router_dtype: str = "float32",
                         jitter_noise: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
    """``(logits, probs)`` (T, E): :func:`router_logits`, then a softmax (which subtracts the
    row maximum first), both in ``router_dtype``."""
    logits = router_logits(x, W_r, router_dtype, jitter_noise)  # (T, E)
    with np.errstate(over="ignore", invalid="ignore"):  # NaN logits: see check_finite_logits
        if router_dtype == "bfloat16":
            return logits, RoundBFloat16.apply(ops.softmax(logits, axis=-1))
        return logits, ops.softmax(logits, axis=-1)  # (T, E) each


def check_finite_logits(logits: Tensor, where: str) -> None:
    """NaN or inf router logits: an error that says what to do, not a silent bad route."""
    validate.finite(logits, "the router logits", where, hint=(
        "the router overflowed or training diverged: compute the router in float32 "
        "(router_dtype='float32'), add the z-loss, lower the learning rate or clip gradients"))


def out_dtype(x: Tensor) -> np.dtype:
    """The dtype a router's combine weights are cast back to: the model's (float32 for ids)."""
    return x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)


def multiplicative_jitter(router: Any, shape: tuple[int, ...],
                          jitter_noise: np.ndarray | None = None) -> np.ndarray | None:
    """The noise that multiplies a router's input, (T, d), or None for no jitter.

    Mesh TensorFlow's ``multiplicative_jitter``, used by the Switch Transformer (§2.4): in
    training mode with ``router.jitter = ε > 0``, U(1 - ε, 1 + ε) draws from
    ``router.rng`` (or the ``jitter_noise`` given, to fix it in tests); in eval mode none.
    """
    if not router.training:
        return None  # no jitter in eval, whatever was passed
    if jitter_noise is None:
        if router.jitter == 0.0:
            return None
        return router.rng.uniform(1.0 - router.jitter, 1.0 + router.jitter, size=shape)
    if np.shape(jitter_noise) != tuple(shape):
        raise ValueError(f"{type(router).__name__}: jitter_noise has shape "
                         f"{np.shape(jitter_noise)}, expected the input's shape {tuple(shape)}")
    return jitter_noise
