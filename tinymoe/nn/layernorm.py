"""LayerNorm (Ba, Kiros & Hinton 2016): normalise each vector over its last axis.

    mu = mean(x),   var = mean((x - mu)^2)                 (over the last axis, biased)
    y  = (x - mu) / sqrt(var + eps) * weight + bias

Built from differentiable ops, so autograd derives the backward for us.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe.nn.init import check_positive_int, float_dtype
from tinymoe.nn.linear import check_last_dim
from tinymoe.nn.module import Module, Parameter
from tinymoe.tensor import Tensor, as_tensor


class LayerNorm(Module):
    """Normalise ``x (..., dim)`` to zero mean and unit variance, then scale and shift."""

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype: Any = np.float32) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "dim", "LayerNorm")
        if not eps > 0:
            raise ValueError(f"LayerNorm: eps must be positive, got {eps}")
        self.eps = float(eps)
        dt = float_dtype(dtype, "LayerNorm")
        self.weight = Parameter(np.ones(dim, dt))  # (dim,)
        self.bias = Parameter(np.zeros(dim, dt))  # (dim,)

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        check_last_dim(self, x, self.dim)
        mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
        xc = x - mu  # (..., dim)
        var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1)
        x_hat = xc / (var + self.eps).sqrt()  # (..., dim)
        return x_hat * self.weight + self.bias  # (..., dim)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps:g}"
