"""Losses: cross-entropy over class indices (stable, via log_softmax), NLL and MSE.

    cross_entropy(z, y) = mean_t [ logsumexp(z_t) - z_t[y_t] ]
    nll(log_p, y)       = mean_t [ -log_p_t[y_t] ]
    mse(a, b)           = mean (a - b)^2
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinymoe import ops
from tinymoe.tensor import Tensor, as_tensor


def _targets(op: str, logits: Tensor, targets: Any) -> np.ndarray:
    t = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"{op}: targets must be integer class indices, got dtype {t.dtype}")
    if t.shape != logits.shape[:-1]:
        raise ValueError(f"{op}: targets of shape {t.shape} do not match scores of shape "
                         f"{logits.shape} (expected targets of shape {logits.shape[:-1]})")
    n = logits.shape[-1]
    if t.size and (t.min() < 0 or t.max() >= n):
        raise ValueError(f"{op}: targets must lie in [0, {n}), got min {t.min()} "
                         f"max {t.max()}")
    if not np.isfinite(logits.data).all():
        raise FloatingPointError(f"{op}: scores contain NaN or inf; training has diverged "
                                 f"(try a smaller learning rate or gradient clipping)")
    return t


def apply_reduction(op: str, per_item: Tensor, reduction: str) -> Tensor:
    """``per_item`` averaged (``"mean"``), summed (``"sum"``) or as it is (``"none"``)."""
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(f"{op}: reduction={reduction!r}; choose 'mean', 'sum' or 'none'")


def nll(log_probs: Any, targets: Any, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer ``targets`` under ``log_probs`` (..., classes)."""
    log_probs = as_tensor(log_probs)
    t = _targets("nll", log_probs, targets)
    picked = ops.take_along_axis(log_probs, t[..., None], axis=-1)  # (..., 1)
    return apply_reduction("nll", -ops.squeeze(picked, -1), reduction)


def cross_entropy(logits: Any, targets: Any, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of ``logits`` (..., classes) against integer ``targets`` (...)."""
    logits = as_tensor(logits)
    _targets("cross_entropy", logits, targets)
    return nll(ops.log_softmax(logits, axis=-1), targets, reduction)


def mse(pred: Any, target: Any, reduction: str = "mean") -> Tensor:
    """Mean squared error; shapes must match exactly (no silent broadcasting)."""
    pred, target = as_tensor(pred), as_tensor(target, like=as_tensor(pred))
    if pred.shape != target.shape:
        raise ValueError(f"mse: prediction {pred.shape} and target {target.shape} differ; "
                         f"reshape the target (a silent broadcast would give a wrong loss)")
    d = pred - target
    return apply_reduction("mse", d * d, reduction)
