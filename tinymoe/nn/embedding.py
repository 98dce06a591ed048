"""Embedding: a table of ``num_embeddings`` learned vectors, looked up by integer id.

``forward(ids)`` is ``weight[ids]``: an index, whose backward adds each output row's
gradient into the row it was read from (a token seen twice gets both gradients). Rows start
as ``N(0, init_scale^2)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import validate
from tinymoe.nn.init import RNGLike, as_rng
from tinymoe.nn.module import Module, Parameter
from tinymoe.tensor import Tensor


class Embedding(Module):
    """``ids (...) -> vectors (..., embedding_dim)``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: Any = np.float32,
                 rng: RNGLike = None, init_scale: float = 1.0) -> None:
        super().__init__()
        self.num_embeddings = validate.positive_int(num_embeddings, "num_embeddings", "Embedding")
        self.embedding_dim = validate.positive_int(embedding_dim, "embedding_dim", "Embedding")
        dt = validate.float_dtype(dtype, "dtype", "Embedding")
        w = as_rng(rng).standard_normal((num_embeddings, embedding_dim)) * init_scale
        self.weight = Parameter(w.astype(dt))  # (num, dim)

    def forward(self, ids: Any) -> Tensor:
        ids = np.asarray(ids.data if isinstance(ids, Tensor) else ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"Embedding({self.extra_repr()}): ids must be integers, got dtype "
                            f"{ids.dtype}")
        n = self.num_embeddings
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            bad = ids.max() if ids.max() >= n else ids.min()
            raise ValueError(f"Embedding({self.extra_repr()}): id {bad} is out of range; ids "
                             f"must lie in [0, {n - 1}] (is the vocabulary larger than "
                             f"num_embeddings?)")
        return self.weight[ids]  # (..., dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
