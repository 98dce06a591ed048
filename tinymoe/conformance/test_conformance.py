"""The conformance suite: every component the adapter implements, on every case.

Run with ``python -m pytest -p tinymoe.conformance.plugin --pyargs tinymoe.conformance
--moe-impl mypkg.adapter``; the
``moe_adapter`` and ``moe_conventions`` fixtures come from :mod:`tinymoe.conformance.plugin`.
"""
import pytest

from tinymoe.conformance.cases import CATALOGUE
from tinymoe.conformance.checks import ConformanceError, check

PAIRS = [(component, case) for component, (_, cases) in CATALOGUE.items() for case in cases]


@pytest.mark.parametrize("component,case", PAIRS, ids=[f"{c}-{k}" for c, k in PAIRS])
def test_component(moe_adapter, moe_conventions, component, case):
    if not callable(getattr(moe_adapter, component, None)):
        pytest.skip(f"the adapter has no {component}()")
    problem = None
    try:
        check(moe_adapter, component, case, moe_conventions)
    except NotImplementedError as err:
        pytest.skip(f"{component}: {err}")
    except ConformanceError as err:
        problem = str(err)
    if problem is not None:  # outside the except: no chained traceback in the report
        pytest.fail(problem, pytrace=False)
