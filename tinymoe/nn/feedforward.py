"""FeedForward: the transformer's position-wise two-layer MLP (Vaswani et al. 2017, eq. 2).

    FFN(x) = Dropout( act(x @ W_1 + b_1) @ W_2 + b_2 )        W_1: (d_model, d_ff)

In a Mixture-of-Experts layer each expert is one of these.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops
from tinymoe.nn.dropout import Dropout
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.linear import Linear
from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor

ACTIVATIONS = {"gelu": ops.gelu, "relu": ops.relu}


class FeedForward(Module):
    """``(..., d_model) -> (..., d_ff) -> (..., d_model)``."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu",
                 dropout: float = 0.0, *, bias: bool = True, dtype: Any = np.float32,
                 rng: RNGLike = None, init_scale: float = 1.0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"FeedForward: activation={activation!r}; choose one of "
                             f"{sorted(ACTIVATIONS)}")
        self.activation = activation
        gen = as_rng(rng)  # one stream for both layers and the dropout masks
        self.fc1 = Linear(d_model, d_ff, bias, dtype=dtype, rng=gen, init_scale=init_scale)
        self.fc2 = Linear(d_ff, d_model, bias, dtype=dtype, rng=gen, init_scale=init_scale)
        self.drop = Dropout(dropout, rng=gen)

    def forward(self, x: Any) -> Tensor:
        h = ACTIVATIONS[self.activation](self.fc1(x))  # (..., d_ff)
        return self.drop(self.fc2(h))  # (..., d_model)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
