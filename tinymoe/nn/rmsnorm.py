"""RMSNorm (Zhang & Sennrich 2019, eq. 4): rescale each vector by its root mean square.

    rms(x) = sqrt( mean(x^2) + eps )                       (over the last axis)
    y      = x / rms(x) * weight

LayerNorm without the mean subtraction and without the bias: cheaper, and what Llama and
Mixtral (Jiang et al. 2024) use in front of attention and of the MoE block. Built from
differentiable ops, so autograd derives the backward for us.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import validate
from tinymoe.nn.module import Module, Parameter
from tinymoe.tensor import Tensor, as_tensor


def rms_norm(x: Any, weight: Any, eps: float) -> Tensor:
    """``x / sqrt(mean(x²) + eps) * weight`` over the last axis of ``x`` (..., dim)."""
    x = as_tensor(x)
    ### BEGIN SOLUTION task8_1
    ms = (x * x).mean(axis=-1, keepdims=True)  # (..., 1) mean square
    return x / (ms + eps).sqrt() * weight      # (..., dim)
    ### END SOLUTION


class RMSNorm(Module):
    """Normalise ``x (..., dim)`` to unit root mean square, then scale by ``weight`` (dim,).

    ``eps`` defaults to 1e-6, the default of Hugging Face's ``MixtralRMSNorm`` (which also
    computes in float32 and casts back; we compute in the input's dtype).
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype: Any = np.float32) -> None:
        super().__init__()
        self.dim = validate.positive_int(dim, "dim", "RMSNorm")
        if not eps > 0:
            raise ValueError(f"RMSNorm: eps must be positive, got {eps}; Mixtral uses 1e-5")
        self.eps = float(eps)
        dt = validate.float_dtype(dtype, "dtype", "RMSNorm")
        self.weight = Parameter(np.ones(dim, dt))  # (dim,)

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        validate.last_dim(x, self.dim, f"RMSNorm({self.extra_repr()})")
        return rms_norm(x, self.weight, self.eps)  # (..., dim)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps:g}"
