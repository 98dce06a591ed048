"""``tinymoe.testing``: check *your* code with tinymoe's tools, whatever it is written in.

- :func:`gradcheck` compares a function's vector-Jacobian product with central differences
  in float64 (the method and report of :func:`tinymoe.gradcheck`), for NumPy arrays;
- :func:`from_torch` and :func:`from_numpy` turn a PyTorch function or ``nn.Module``, or a
  NumPy forward/backward pair, into the ``(f, vjp)`` pair it takes.

The MoE conformance suite is :mod:`tinymoe.conformance` (run with pytest).
"""
from tinymoe.gradcheck import GradcheckError, GradcheckReport  # noqa: F401
from tinymoe.testing.gradcheck import from_numpy, from_torch, gradcheck  # noqa: F401

__all__ = ["gradcheck", "from_torch", "from_numpy", "GradcheckError", "GradcheckReport"]
