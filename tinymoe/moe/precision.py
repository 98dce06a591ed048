"""Selective precision: the router computes in float32 whatever the model's dtype.

Fedus et al. (2021, §2.4) found that a router computed in bfloat16 made training
unstable, because the exponentials of its softmax amplify rounding errors; computing only
the router in float32 (its input cast up, its output cast back) kept the speed of a
bfloat16 model and the stability of a float32 one. ``router_dtype`` names the precision a
router computes in: ``"float32"`` (the paper's choice, the default), ``"float64"`` (for
gradient checks), ``"float16"``, or ``"bfloat16"``.

NumPy has no bfloat16, so it is emulated: float32 arithmetic whose values are rounded to
bfloat16's 8-bit significand (round to nearest, ties to even) after every step.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe.autograd import Function
from tinymoe.tensor import Tensor

ROUTER_DTYPES = ("float16", "bfloat16", "float32", "float64")


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


def router_dtype(value: Any, where: str) -> str:
    """``value`` as one of :data:`ROUTER_DTYPES`, or a ValueError naming ``where``."""
    name = value if isinstance(value, str) else np.dtype(value).name
    if name not in ROUTER_DTYPES:
        raise ValueError(f"{where}: router_dtype={value!r}; choose one of "
                         f"{', '.join(ROUTER_DTYPES)} (float32 is the paper's selective "
                         f"precision)")
    return name


def to_router_precision(a: Tensor, router_dtype: str) -> Tensor:
    """``a`` in the router's compute precision (bfloat16: float32 rounded to bfloat16)."""
    if router_dtype == "bfloat16":
        return RoundBFloat16.apply(a.astype(np.float32) if a.dtype != np.float32 else a)
    return a if a.dtype == np.dtype(router_dtype) else a.astype(router_dtype)


def round_bfloat16(a: Tensor) -> Tensor:
    """``a`` (float32) rounded to bfloat16 in the forward and its gradient in the backward."""
    return RoundBFloat16.apply(a.astype(np.float32) if a.dtype != np.float32 else a)


class rounded_weights:
    """``with rounded_weights(params, keep=...):`` the parameters hold their bfloat16-rounded
    values inside the block and their float32 values again after it (mixed precision: the
    forward and backward see bfloat16 weights, the optimizer updates float32 master copies).
    Parameters in ``keep`` (e.g. a float32 router's weight) stay float32.
    """

    def __init__(self, params: Any, keep: Any = ()) -> None:
        skip = {id(p) for p in keep}
        self.params = [p for p in params if id(p) not in skip]
        self.saved: list[np.ndarray] = []

    def __enter__(self) -> rounded_weights:
        for p in self.params:
            if p.dtype != np.float32:
                raise ValueError(f"rounded_weights: a parameter of dtype {p.dtype}; bfloat16 "
                                 f"is emulated on float32 weights only")
            self.saved.append(p.data)
            p.data = round_bfloat16_array(p.data)
        return self

    def __exit__(self, *exc: Any) -> None:
        for p, d in zip(self.params, self.saved):
            p.data = d
        self.saved = []
