"""Linear: the affine map ``y = x @ W + b`` on the last axis.

The weight is stored as ``(in_features, out_features)`` so the forward reads like the
math, ``x @ W`` (PyTorch stores the transpose and computes ``x @ W.T``). It starts as
``N(0, (init_scale / sqrt(in_features))^2)`` (see :mod:`tinymoe.nn.init`), the bias at 0.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops, validate
from tinymoe.nn.init import RNGLike, as_rng, lecun_normal
from tinymoe.nn.module import Module, Parameter
from tinymoe.tensor import Tensor, as_tensor


class Linear(Module):
    """``y = x @ W + b`` for ``x`` of shape ``(..., in_features)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: Any = np.float32, rng: RNGLike = None,
                 init_scale: float = 1.0) -> None:
        super().__init__()
        self.in_features = validate.positive_int(in_features, "in_features", "Linear")
        self.out_features = validate.positive_int(out_features, "out_features", "Linear")
        dt = validate.float_dtype(dtype, "dtype", "Linear")
        w = lecun_normal(as_rng(rng), in_features, (in_features, out_features), dt, init_scale)
        self.weight = Parameter(w)  # (in, out)
        self.bias = Parameter(np.zeros(out_features, dt)) if bias else None  # (out,)

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        validate.last_dim(x, self.in_features, f"{type(self).__name__}({self.extra_repr()})")
        if self.bias is None:
            return x @ self.weight  # (..., out)
        return ops.linear(x, self.weight, self.bias)  # (..., out) x W + b as one op

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}" + \
            ("" if self.bias is not None else ", bias=False")
