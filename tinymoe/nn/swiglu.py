"""SwiGLU: the gated feed-forward network of Llama and Mixtral (Shazeer 2020, eq. 6).

    SwiGLU(x) = ( SiLU(x W_gate) ⊙ (x W_up) ) W_down          SiLU(z) = z · σ(z)

Three matrices instead of two (``W_gate``, ``W_up``: (d_model, d_ff); ``W_down``: (d_ff,
d_model)) and no biases. The gate ``SiLU(x W_gate)`` decides, feature by feature, how much
of the linear path ``x W_up`` passes. Shazeer's paper shrinks d_ff by 2/3 so that the
three matrices cost what the usual two do; Mixtral does not (d 4096, d_ff 14336).
In Mixtral every expert is one of these (:class:`~tinymoe.moe.swiglu.SwiGLUExperts`
stacks E of them).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops
from tinymoe.nn.dropout import Dropout
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.linear import Linear
from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor, as_tensor


def swiglu_gate(a_gate: Any, a_up: Any) -> Tensor:
    """``SiLU(a_gate) ⊙ a_up`` with ``SiLU(z) = z · σ(z)`` (Swish with β = 1): the gated
    hidden units of a SwiGLU FFN, given the two projections ``a_gate = x W_gate`` and
    ``a_up = x W_up`` (any matching shapes)."""
    a_gate, a_up = as_tensor(a_gate), as_tensor(a_up)
    ### BEGIN SOLUTION task8_2
    return a_gate * ops.sigmoid(a_gate) * a_up  # (..., d_ff)
    ### END SOLUTION


def swiglu(x: Any, W_gate: Any, W_up: Any, W_down: Any) -> Tensor:
    """``(SiLU(x W_gate) ⊙ x W_up) W_down`` for ``x`` (..., d_model); the weights may carry
    a leading expert axis (E, ...) with ``x`` (E, n, d_model)."""
    x = as_tensor(x)
    return swiglu_gate(x @ W_gate, x @ W_up) @ W_down  # (..., d_model)


class SwiGLU(Module):
    """A dense SwiGLU FFN, ``(..., d_model) -> (..., d_model)``, three bias-free Linears.

    ``dropout`` applies to the hidden units in training.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, *,
                 dtype: Any = np.float32, rng: RNGLike = None, init_scale: float = 1.0) -> None:
        super().__init__()
        gen = as_rng(rng)
        self.gate = Linear(d_model, d_ff, False, dtype=dtype, rng=gen, init_scale=init_scale)
        self.up = Linear(d_model, d_ff, False, dtype=dtype, rng=gen, init_scale=init_scale)
        self.down = Linear(d_ff, d_model, False, dtype=dtype, rng=gen, init_scale=init_scale)
        self.drop = Dropout(dropout, rng=gen)

    def forward(self, x: Any) -> Tensor:
        h = swiglu_gate(self.gate(x), self.up(x))  # (..., d_ff)
        return self.down(self.drop(h))  # (..., d_model)
