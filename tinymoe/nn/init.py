"""Random generators and initial weights, so every layer's start is repeatable.

Every layer takes ``rng``: a ``np.random.Generator`` (used as is, so several layers can
share one stream), an ``int`` (seeds a new generator: the same int gives the same weights)
or ``None`` (a fresh, unseeded generator).

The weight scale follows LeCun: a layer ``y = x @ W`` with ``fan_in`` inputs of unit
variance keeps unit variance at the output when ``W ~ N(0, 1/fan_in)``, so we draw

    W ~ N(0, (init_scale / sqrt(fan_in))^2)

and start biases at zero. ``init_scale`` shrinks (or grows) the start, e.g. GPT-2 scales the
projections that feed a residual stream by ``1/sqrt(2 n_layers)``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

RNGLike = np.random.Generator | int | None


def as_rng(rng: RNGLike) -> np.random.Generator:
    """A ``np.random.Generator`` from a generator (returned as is), an int seed or None."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a np.random.Generator, an int seed or None, got "
                    f"{type(rng).__name__}")



def lecun_normal(rng: np.random.Generator, fan_in: int, shape: tuple[int, ...],
                 dtype: np.dtype, init_scale: float = 1.0) -> np.ndarray:
    """Draw ``shape`` from N(0, (init_scale / sqrt(fan_in))^2) in ``dtype``."""
    std = init_scale / math.sqrt(fan_in)
    return (rng.standard_normal(shape) * std).astype(dtype)


def truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float,
                     dtype: Any = np.float32) -> np.ndarray:
    """N(0, std²) truncated at ±2 std (values outside are drawn again), as TF's
    ``truncated_normal`` initialiser."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return (out * std).astype(dtype)


INIT_SCALE = 0.1  # the Switch Transformer's s


def switch_init(rng: np.random.Generator, fan_in: int, shape: tuple[int, ...], dtype: Any,
                scale: float = INIT_SCALE) -> np.ndarray:
    """The Switch Transformer's initialisation (Fedus et al. 2021, §2.4): a truncated normal
    with standard deviation ``sqrt(scale / fan_in)``, s = 0.1, ten times smaller than the
    usual ``1 / fan_in`` variance, which made training more stable."""
    return truncated_normal(rng, shape, math.sqrt(scale / fan_in), dtype)

