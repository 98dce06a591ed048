"""Small synthetic data sets made on the fly from a seed (nothing is stored or downloaded)."""
from __future__ import annotations

import numpy as np


def two_moons(n: int = 400, noise: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles in 2-D: ``X (n, 2)`` float64 and labels ``y (n,)`` in {0, 1}.

    Class 0 is the upper arc (cos t, sin t), class 1 the lower arc (1 - cos t, 0.5 - sin t),
    t uniform in [0, pi], plus Gaussian noise of standard deviation ``noise``.
    """
    if n < 2:
        raise ValueError(f"two_moons: n={n} must be at least 2 (one point per class)")
    if noise < 0:
        raise ValueError(f"two_moons: noise={noise} must be >= 0")
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2  # alternate classes so any prefix is balanced
    t = rng.uniform(0.0, np.pi, n)
    X = np.where(y[:, None] == 0,
                 np.stack([np.cos(t), np.sin(t)], axis=1),
                 np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1))  # (n, 2)
    return X + noise * rng.standard_normal((n, 2)), y
