"""LayerNorm (Ba, Kiros & Hinton 2016): normalise each vector over its last axis.

    mu = mean(x),   var = mean((x - mu)^2)                 (over the last axis, biased)
    y  = (x - mu) / sqrt(var + eps) * weight + bias

Built from differentiable ops, so autograd derives the backward for us.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import validate
from tinymoe.nn.module import Module, Parameter
from tinymoe.tensor import Tensor, as_tensor


class LayerNorm(Module):
    """Normalise ``x (..., dim)`` to zero mean and unit variance, then scale and shift."""

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype: Any = np.float32) -> None:
        super().__init__()
        self.dim = validate.positive_int(dim, "dim", "LayerNorm")
        if not eps > 0:
            raise ValueError(f"LayerNorm: eps must be positive, got {eps}")
        self.eps = float(eps)
        dt = validate.float_dtype(dtype, "dtype", "LayerNorm")
        self.weight = Parameter(np.ones(dim, dt))  # (dim,)
        self.bias = Parameter(np.zeros(dim, dt))  # (dim,)

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        validate.last_dim(x, self.dim, f"{type(self).__name__}({self.extra_repr()})")
        mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
        xc = x - mu  # (..., dim)
        var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1)
        x_hat = xc / (var + self.eps).sqrt()  # (..., dim)
        return x_hat * self.weight + self.bias  # (..., dim)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps:g}"
