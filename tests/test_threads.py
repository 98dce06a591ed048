"""The thread policy (tinymoe.threads): adapts to free cores unless the user chose.

No timings here: each check runs a fresh interpreter with a given environment and reads
the policy tinymoe settled on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinymoe import threads

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import json, numpy as np, tinymoe as tm
from tinymoe import threads
{action}
x = tm.tensor(np.ones((64, 64), np.float32), requires_grad=True)
(x @ x).sum().backward()
info = threads.describe()
blas = threads._openblas()
info["blas"] = blas[1]() if blas else None
print(json.dumps(info))
"""


def run_probe(env_updates: dict[str, str], action: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in threads.USER_VARS}
    env.update(env_updates)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", PROBE.format(action=action)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("var", ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                 "NUMBA_NUM_THREADS", "TINYMOE_NUM_THREADS"])
def test_user_env_vars_are_kept(var):
    info = run_probe({var: "1"})
    assert info["mode"] == "environment"
    assert info["user_vars"] == [var]
    if var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") and info["blas"] is not None:
        assert info["blas"] == 1  # OpenBLAS read the user's count, and tinymoe left it


def test_set_num_threads_fixes_both_pools():
    info = run_probe({}, "tm.set_num_threads(1)")
    assert info["mode"] == "fixed" and info["threads"] == 1
    if info["blas"] is not None:
        assert info["blas"] == 1


def test_no_user_choice_means_all_cores_so_seeded_runs_repeat():
    info = run_probe({})
    assert info["mode"] == "all cores"
    assert info["threads"] == info["cores"]


@pytest.mark.parametrize("how", ["env", "call"])
def test_auto_adapts_to_the_free_cores(how):
    info = (run_probe({"TINYMOE_NUM_THREADS": "auto"}) if how == "env"
            else run_probe({}, 'tm.set_num_threads("auto")'))
    if info["cores"] > 1 and Path("/proc/stat").exists():
        assert info["mode"] == "adaptive"
        assert info["user_vars"] == []
        assert 1 <= info["threads"] <= info["cores"]


def test_choose_counts_the_free_cores():
    assert threads.choose(2, 0.1) == 2   # idle
    assert threads.choose(2, 1.0) == 1   # one core taken
    assert threads.choose(2, 2.0) == 1   # both taken: still one thread
    assert threads.choose(8, 3.2) == 5
    assert threads.choose(4, -0.3) == 4  # sampling noise never exceeds the cores


def test_set_num_threads_rejects_bad_counts():
    with pytest.raises(ValueError, match="set_num_threads"):
        threads.set_num_threads(0)


def test_the_tour_adapts_unless_the_user_chose():
    """``tinymoe tour`` calls adapt_unless_chosen: adaptive on a free machine, but a thread
    variable or an earlier set_num_threads wins."""
    info = run_probe({}, "assert threads.adapt_unless_chosen() == threads._POLICY.adaptive")
    if info["cores"] > 1 and Path("/proc/stat").exists():
        assert info["mode"] == "adaptive"
    info = run_probe({"OMP_NUM_THREADS": "1"}, "assert not threads.adapt_unless_chosen()")
    assert info["mode"] == "environment" and info["user_vars"] == ["OMP_NUM_THREADS"]
    info = run_probe({}, "tm.set_num_threads(1); assert not threads.adapt_unless_chosen()")
    assert info["mode"] == "fixed" and info["threads"] == 1


def test_tour_threads_option_is_checked_and_restored():
    from tinymoe.app.tour import use_threads

    for bad in ("0", "two", "-1"):
        with pytest.raises(ValueError, match="--threads must be auto, all or a count"):
            with use_threads(bad):
                pass
    before = threads.describe()
    with use_threads("1") as mode:
        assert mode == "fixed" and threads.num_threads() == 1
    with use_threads("auto"):
        pass
    assert threads.describe() == before  # the caller's policy is back
