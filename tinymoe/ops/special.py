"""The error function and the standard normal CDF.

NumPy has no ``erf``; we compile ``math.erf`` (the C library's, accurate to the last bit)
into a NumPy ufunc with Numba the first time it is needed, so ``import tinymoe`` stays fast.

    erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt,   d erf/dx = 2/sqrt(pi) exp(-x^2)
    Phi(x) = (1 + erf(x / sqrt(2))) / 2,           d Phi/dx = phi(x) = exp(-x^2/2) / sqrt(2 pi)
"""
from __future__ import annotations

import functools
import math

import numpy as np

from tinymoe.autograd import Function


@functools.lru_cache(maxsize=None)
def _erf_ufunc():
    import numba

    @numba.vectorize(["float32(float32)", "float64(float64)"], cache=True)
    def erf(x):
        return math.erf(x)

    return erf


def erf_array(x: np.ndarray) -> np.ndarray:
    """erf on a NumPy array, keeping float32 as float32 (float16 is computed in float32)."""
    x = np.asarray(x)
    if x.dtype == np.float16:
        return _erf_ufunc()(x.astype(np.float32)).astype(np.float16)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return _erf_ufunc()(x)


def normal_pdf_array(x: np.ndarray) -> np.ndarray:
    """exp(-x²/2) / sqrt(2 pi), computed in one new array."""
    out = -0.5 * x
    if not isinstance(out, np.ndarray):  # a 0-d input gives a NumPy scalar
        return np.exp(out * x) * (1.0 / math.sqrt(2.0 * math.pi))
    out *= x
    np.exp(out, out=out)
    out *= 1.0 / math.sqrt(2.0 * math.pi)
    return out


def normal_cdf_array(x: np.ndarray) -> np.ndarray:
    """(1 + erf(x / sqrt 2)) / 2, in one new array besides erf's."""
    out = erf_array(x * (1.0 / math.sqrt(2.0)))
    out += 1.0
    out *= 0.5
    return out


class Erf(Function):
    """out = erf(a);  da = grad * 2/sqrt(pi) * exp(-a^2)."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return erf_array(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return (grad * (2.0 / math.sqrt(math.pi)) * np.exp(-a * a),)


class NormalCDF(Function):
    """out = Phi(a), the standard normal CDF;  da = grad * phi(a)."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return normal_cdf_array(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved
        return (grad * normal_pdf_array(a),)
