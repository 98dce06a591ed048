"""E SwiGLU experts with stacked weights: Mixtral's experts (Jiang et al. 2024, §2.1).

    E_e(x) = ( SiLU(x W_gate[e]) ⊙ (x W_up[e]) ) W_down[e]        (Shazeer 2020, eq. 6)

``W_gate``, ``W_up`` (E, d_model, d_ff), ``W_down`` (E, d_ff, d_model), no biases. Like
:class:`~tinymoe.moe.experts.StackedExperts` they take either layout of the dispatch:

* capacity buffers ``(E, C, d)``: three batched matmuls over the expert axis;
* sorted rows ``(N, d)`` with ``offsets`` (E+1,) (dropless, as Mixtral runs):
  :func:`~tinymoe.moe.experts.grouped_linear` with a zero bias, once per matrix.

Hugging Face's ``MixtralExperts`` stores the same numbers fused and transposed:
``gate_up_proj`` (E, 2·d_ff, d) is ``[W_gate[e]ᵀ; W_up[e]ᵀ]`` and ``down_proj`` (E, d,
d_ff) is ``W_down[e]ᵀ`` (:meth:`SwiGLUExperts.from_hf` maps them).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import validate
from tinymoe.dispatch.functions import as_dtype
from tinymoe.moe.experts import grouped_linear
from tinymoe.nn.dropout import Dropout
from tinymoe.nn.init import RNGLike, as_rng, lecun_normal
from tinymoe.nn.module import Module, Parameter
from tinymoe.nn.swiglu import swiglu, swiglu_gate
from tinymoe.tensor import Tensor, as_tensor


class SwiGLUExperts(Module):
    """E SwiGLU FFNs; LeCun-normal weights (std ``init_scale / sqrt(fan_in)``).

    ``dropout``: expert dropout on the gated hidden units, training only.
    ``experts(buf, offsets)`` maps a layout to the same layout (see the module doc).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, dtype: Any = np.float32,
                 rng: RNGLike = None, init_scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        E = validate.positive_int(num_experts, "num_experts", "SwiGLUExperts")
        d = validate.positive_int(d_model, "d_model", "SwiGLUExperts")
        f = validate.positive_int(d_ff, "d_ff", "SwiGLUExperts")
        dt = validate.float_dtype(dtype, "dtype", "SwiGLUExperts")
        gen = as_rng(rng)
        self.num_experts, self.d_model, self.d_ff = E, d, f
        self.W_gate = Parameter(lecun_normal(gen, d, (E, d, f), dt, init_scale))  # (E, d, f)
        self.W_up = Parameter(lecun_normal(gen, d, (E, d, f), dt, init_scale))  # (E, d, f)
        self.W_down = Parameter(lecun_normal(gen, f, (E, f, d), dt, init_scale))  # (E, f, d)
        self.dropout = Dropout(dropout, rng=gen)

    @classmethod
    def from_hf(cls, gate_up_proj: Any, down_proj: Any, dtype: Any = np.float64
                ) -> SwiGLUExperts:
        """From HF ``MixtralExperts``' fused arrays: ``gate_up_proj`` (E, 2·d_ff, d),
        ``down_proj`` (E, d, d_ff) (NumPy arrays; copies)."""
        gu, dn = np.asarray(gate_up_proj), np.asarray(down_proj)
        if gu.ndim != 3 or dn.ndim != 3 or gu.shape[1] % 2 or \
                dn.shape != (gu.shape[0], gu.shape[2], gu.shape[1] // 2):
            raise ValueError(f"SwiGLUExperts.from_hf: gate_up_proj {gu.shape} and down_proj "
                             f"{dn.shape} must be (E, 2·d_ff, d) and (E, d, d_ff)")
        E, f2, d = gu.shape
        f = f2 // 2
        out = cls(E, d, f, dtype=dtype, rng=0)
        out.W_gate.data = gu[:, :f].transpose(0, 2, 1).astype(dtype)  # (E, d, f)
        out.W_up.data = gu[:, f:].transpose(0, 2, 1).astype(dtype)  # (E, d, f)
        out.W_down.data = dn.transpose(0, 2, 1).astype(dtype)  # (E, f, d)
        return out

    def forward(self, x: Any, offsets: np.ndarray | None = None) -> Tensor:
        """Buffers ``x`` (E, C, d_model) with ``offsets=None``, or rows ``x`` (N, d_model)
        sorted by expert with ``offsets`` (E+1,): the experts' outputs, in the same layout."""
        x = as_dtype(as_tensor(x), self.W_gate.dtype)
        if offsets is None:  # capacity buffers (E, C, d): batched over the experts
            if self.dropout.p == 0.0 or not self.training:
                return swiglu(x, self.W_gate, self.W_up, self.W_down)  # (E, C, d)
            h = swiglu_gate(x @ self.W_gate, x @ self.W_up)  # (E, C, f)
            return self.dropout(h) @ self.W_down  # (E, C, d)
        zf = np.zeros((self.num_experts, self.d_ff), self.W_gate.dtype)  # no biases
        zd = np.zeros((self.num_experts, self.d_model), self.W_gate.dtype)
        h = swiglu_gate(grouped_linear(x, self.W_gate, zf, offsets),
                        grouped_linear(x, self.W_up, zf, offsets))  # (N, f) sorted rows
        return grouped_linear(self.dropout(h), self.W_down, zd, offsets)  # (N, d)

    def expert(self, e: int, x: Any) -> Tensor:
        """Expert ``e`` alone on ``x`` (n, d_model): for tests and lessons."""
        return swiglu(x, self.W_gate[e], self.W_up[e], self.W_down[e])  # (n, d)

    def extra_repr(self) -> str:
        return f"{self.num_experts} x SwiGLU({self.d_model} -> {self.d_ff} -> {self.d_model})"
