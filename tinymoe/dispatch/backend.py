"""Which implementation of the dispatch contract runs: Numba kernels (default) or NumPy.

    tm.dispatch.set_backend("numpy")        # for the rest of the program
    with tm.dispatch.use_backend("numpy"):  # for a block
        ...
    TINYMOE_DISPATCH=numpy python train.py  # from the environment

Numba is imported only when the numba backend is first used, so ``import tinymoe`` (and
``import tinymoe.dispatch``) stay fast.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

BACKENDS = {"numba": "tinymoe.dispatch.kernels", "numpy": "tinymoe.dispatch.reference"}
ENV_VAR = "TINYMOE_DISPATCH"

_active: str | None = None  # None until first asked: then the env var or "numba"


def _check(name: object, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{where}: unknown dispatch backend {name!r}; valid backends are "
                         f"{', '.join(repr(b) for b in BACKENDS)}")
    return name.lower()


def get_backend() -> str:
    """The active backend's name: ``"numba"`` or ``"numpy"``."""
    global _active
    if _active is None:
        _active = _check(os.environ.get(ENV_VAR, "numba"), f"environment variable {ENV_VAR}")
    return _active


def set_backend(name: str) -> None:
    """Make ``name`` (``"numba"`` or ``"numpy"``) the backend of every later dispatch."""
    global _active
    _active = _check(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[ModuleType]:
    """Use backend ``name`` inside a ``with`` block; yields its module."""
    global _active
    name = _check(name, "use_backend")
    previous = get_backend()
    _active = name
    try:
        yield backend_module(name)
    finally:
        _active = previous


def backend_module(name: str | None = None) -> ModuleType:
    """The module implementing the contract for ``name`` (default: the active backend)."""
    name = get_backend() if name is None else _check(name, "backend_module")
    return importlib.import_module(BACKENDS[name])
