"""A pytest plugin that writes each test's markers and outcome to a JSON file.

:mod:`tinymoe.classroom.runner` copies this file to a temporary directory as
``tinymoe_classroom_plugin.py`` and runs ``pytest -p tinymoe_classroom_plugin`` with
``TINYMOE_CLASSROOM_REPORT=<path>``, so it works in any tree (a student copy, a synthetic
project) without importing the tree's ``tinymoe``. Stand-alone on purpose: no imports from
tinymoe.

The report::

    {"tests": [{"nodeid", "markers", "outcome", "exc_type", "message", "duration"}],
     "collect_errors": [{"nodeid", "message"}], "exitstatus": int, "tinymoe_file": str|null}

``outcome`` is passed, failed, error (setup/teardown), skipped, xfailed or xpassed;
``exc_type``/``message`` describe the first exception the test raised.
"""
import json
import os
import sys

_tests = {}
_collect_errors = []


def _record(nodeid):
    return _tests.setdefault(nodeid, {"nodeid": nodeid, "markers": [], "outcome": None,
                                      "exc_type": None, "message": None, "duration": 0.0})


def pytest_collection_finish(session):
    for item in session.items:
        _record(item.nodeid)["markers"] = sorted({m.name for m in item.iter_markers()})


def pytest_collectreport(report):
    if report.failed:
        _collect_errors.append({"nodeid": report.nodeid, "message": report.longreprtext[-2000:]})


def pytest_exception_interact(node, call, report):
    rec = _tests.get(getattr(node, "nodeid", None))
    if rec is not None and rec["exc_type"] is None and call.excinfo is not None:
        rec["exc_type"] = call.excinfo.typename
        rec["message"] = str(call.excinfo.value)[:2000]


def pytest_runtest_logreport(report):
    rec = _record(report.nodeid)
    rec["duration"] += report.duration
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if report.passed:
            rec["outcome"] = "xpassed" if xfail else "passed"
        elif report.skipped:
            rec["outcome"] = "xfailed" if xfail else "skipped"
        else:
            rec["outcome"] = "failed"
    elif report.failed:  # setup or teardown
        rec["outcome"] = "error" if rec["outcome"] in (None, "passed") else rec["outcome"]
    elif report.skipped and report.when == "setup":
        rec["outcome"] = "xfailed" if xfail else "skipped"


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("TINYMOE_CLASSROOM_REPORT")
    if not path:
        return
    mod = sys.modules.get("tinymoe")
    report = {"tests": sorted(_tests.values(), key=lambda r: r["nodeid"]),
              "collect_errors": _collect_errors, "exitstatus": int(exitstatus),
              "tinymoe_file": getattr(mod, "__file__", None) or
              (list(getattr(mod, "__path__", [])) or [None])[0]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
