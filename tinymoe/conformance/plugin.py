"""The pytest plugin of the conformance suite: ``--moe-impl`` and ``--moe-convention``.

Load it with ``-p``:

    python -m pytest -p tinymoe.conformance.plugin --pyargs tinymoe.conformance \
        --moe-impl mypkg.adapter

(or once in your project: ``addopts = "-p tinymoe.conformance.plugin"`` in its pytest
configuration). It is deliberately not registered as an entry point: a plugin loaded into
every pytest run would import tinymoe before pytest's ``pythonpath`` setting applies, and a
course copy of the repository would then test the installed tinymoe instead of its own.
Without ``--moe-impl`` the suite tests tinymoe's own adapter. ``--moe-convention
name=value`` (repeatable) overrides the adapter's declared conventions, e.g.
``--moe-convention priority=token_major``.
"""
from __future__ import annotations

import ast
import importlib
import inspect
from typing import Any

import pytest

DEFAULT_IMPL = "tinymoe.conformance.tinymoe_adapter"


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("tinymoe-conformance", "tinymoe MoE conformance suite")
    group.addoption("--moe-impl", default=None, metavar="MODULE[:ATTR]",
                    help="the adapter to test (a module, or module:attribute; a class is "
                         f"instantiated); default {DEFAULT_IMPL}")
    group.addoption("--moe-convention", action="append", default=[], metavar="NAME=VALUE",
                    help="override one of the adapter's conventions (repeatable)")


def load_adapter(spec: str) -> Any:
    """``module`` or ``module:attribute`` -> the adapter object (a class is instantiated)."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise pytest.UsageError(f"--moe-impl {spec}: cannot import {module_name!r} ({err}); "
                                f"is it on sys.path (PYTHONPATH, or pip install -e .)?")
    for part in filter(None, attr.split(".")):
        if not hasattr(obj, part):
            raise pytest.UsageError(f"--moe-impl {spec}: {module_name} has no attribute "
                                    f"{attr!r}")
        obj = getattr(obj, part)
    return obj() if inspect.isclass(obj) else obj


def parse_conventions(items: list[str]) -> dict[str, Any]:
    """``["priority=token_major", "min_capacity=4"]`` -> a dict (values parsed as Python
    literals when they are, e.g. numbers and booleans)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise pytest.UsageError(f"--moe-convention {item!r}: write NAME=VALUE")
        try:
            out[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[name.strip()] = value.strip()
    return out


@pytest.fixture(scope="session")
def moe_adapter(request: Any) -> Any:
    """The adapter under test (``--moe-impl``, default tinymoe's)."""
    return load_adapter(request.config.getoption("--moe-impl") or DEFAULT_IMPL)


@pytest.fixture(scope="session")
def moe_conventions(request: Any, moe_adapter: Any) -> dict[str, Any]:
    """The conventions the checks use: the adapter's, overridden by ``--moe-convention``."""
    from tinymoe.conformance.conventions import resolve

    declared = dict(getattr(moe_adapter, "conventions", None) or {})
    declared.update(parse_conventions(request.config.getoption("--moe-convention")))
    try:
        return resolve(declared)
    except (KeyError, ValueError) as err:
        raise pytest.UsageError(str(err))


def pytest_report_header(config: Any) -> str | None:
    impl = config.getoption("--moe-impl", default=None)
    return f"tinymoe conformance: --moe-impl {impl}" if impl else None
