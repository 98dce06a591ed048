"""Dropout (Srivastava et al. 2014), inverted: zero each entry with probability ``p`` while
training and scale the survivors by ``1/(1-p)``, so nothing changes at evaluation time."""
from __future__ import annotations

from typing import Any

from tinymoe import ops
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.module import Module
from tinymoe.tensor import Tensor


class Dropout(Module):
    """Random zeros while ``training``; the identity after ``eval()``. Masks come from the
    module's own generator ``self.rng`` (seed it for repeatable runs)."""

    def __init__(self, p: float = 0.1, *, rng: RNGLike = None) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p={p} must be in [0, 1)")
        self.p = float(p)
        self.rng = as_rng(rng)

    def forward(self, x: Any) -> Tensor:
        return ops.dropout(x, self.p, training=self.training, rng=self.rng)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"
