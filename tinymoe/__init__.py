"""tinymoe: Mixture-of-Experts from first principles.

    import tinymoe as tm
    x = tm.tensor([[1.0, 2.0]], requires_grad=True)
    y = (x @ tm.tensor([[3.0], [4.0]])).sum()
    y.backward()          # x.grad == [[3., 4.]]

Sub-packages load when first used, so ``import tinymoe`` stays fast: ``tm.nn``, ``tm.optim``,
``tm.moe``, ``tm.data``, ``tm.viz``, ``tm.dispatch``, ``tm.parallel``, and the tools that test
your own code, ``tm.testing`` and ``tm.conformance``.
"""
from __future__ import annotations

import importlib
from typing import Any

from tinymoe import functional
from tinymoe.ops import methods as _methods  # noqa: F401  (gives Tensor its ops as methods)
from tinymoe.autograd import Function, enable_grad, is_grad_enabled, no_grad, unbroadcast
from tinymoe.gradcheck import GradcheckError, GradcheckReport, gradcheck
from tinymoe.tensor import Tensor, tensor
from tinymoe.threads import set_num_threads

__version__ = "0.1.0"

__all__ = ["Tensor", "tensor", "Function", "no_grad", "enable_grad", "is_grad_enabled",
           "unbroadcast", "set_num_threads", "gradcheck", "GradcheckError", "GradcheckReport",
           "functional",
           "nn", "optim", "moe", "data", "viz", "dispatch", "losses", "models", "params",
           "parallel", "testing", "conformance"]

_LAZY = {"nn", "optim", "moe", "data", "viz", "dispatch", "losses", "models", "params",
         "parallel", "testing", "conformance"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"tinymoe.{name}")
    raise AttributeError(f"module 'tinymoe' has no attribute {name!r}")
