"""The MoE conformance suite: tinymoe's adapter passes every case, tinymoe's conventions are
the ones the docs' table lists, and deliberately broken implementations fail with messages
that point at the bug."""
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tinymoe.conformance import (CATALOGUE, CONVENTIONS, TINYMOE, ConformanceError, check,
                                 detect_conventions, inputs_for, resolve, run)
from tinymoe.conformance import reference as ref
from tinymoe.conformance import tinymoe_adapter
from tinymoe.conformance.plugin import load_adapter, parse_conventions

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [(c, k) for c, (_, cases) in CATALOGUE.items() for k in cases]

# The classroom tasks whose solution regions tinymoe's adapter runs for each component (a
# student copy's stubs make those checks fail, so they carry the tasks' markers).
TASKS_OF = {"top1_router": ("task4_1", "task4_2", "task4_3"), "topk_router": ("task6_1",),
            "noisy_topk_router": ("task3_1", "task3_2", "task3_3"),
            "expert_choice": ("task6_2",), "bias_update": ("task6_3",),
            "expert_capacity": ("task4_1",), "capacity_positions": ("task4_1",),
            "switch_aux_loss": ("task4_2",), "gshard_aux_loss": ("task4_2",),
            "mixtral_aux_loss": ("task6_1",), "z_loss": ("task4_3",),
            "switch_layer": ("task4_1", "task4_2", "task4_3"), "mixtral_layer": ("task6_1",)}
# an empty batch returns before the loss's solution region
NO_TASK = {("z_loss", "no_tokens"), ("switch_aux_loss", "no_tokens"),
           ("gshard_aux_loss", "no_tokens")}


def _pair(component, case):
    tasks = () if (component, case) in NO_TASK else TASKS_OF.get(component, ())
    return pytest.param(component, case, id=f"{component}-{case}",
                        marks=[getattr(pytest.mark, t) for t in tasks])


# --- tinymoe passes, under its documented conventions -------------------------------------
@pytest.mark.parametrize("component,case", [_pair(c, k) for c, k in PAIRS])
def test_tinymoe_passes_the_suite(component, case):
    check(tinymoe_adapter, component, case)


def test_the_catalogue_covers_the_cases_of_the_issue():
    every = {k for _, cases in CATALOGUE.values() for k in cases}
    assert {"exact_ties", "all_to_one", "capacity_1", "capacity_ge_T", "no_tokens",
            "one_expert", "k_equals_E", "large_logits", "float16", "bfloat16"} <= every
    assert len(CATALOGUE) == 15 and len(PAIRS) == 90


@pytest.mark.task4_1
@pytest.mark.task4_2
@pytest.mark.task4_3
@pytest.mark.task6_1
def test_tinymoe_conventions_are_the_documented_ones():
    """Each tinymoe entry of the docs' conventions table, checked: the strict value passes
    and no other value of the same convention does (the suite tells them apart)."""
    for component in ("top1_router", "mixtral_aux_loss"):  # (a task stub stops here)
        check(tinymoe_adapter, component, "random")
    found = detect_conventions(tinymoe_adapter)
    assert found == {"tie_breaking": ["lowest_index", "any"],  # 'any' is the looser check
                     "router_precision": ["float32", "input"],  # 'input' is looser
                     "capacity_rounding": ["ceil"], "capacity_counts_k": [True],
                     "min_capacity": [1], "capacity_at_most_tokens": [True],
                     "priority": ["choice_major"], "dropped_tokens": ["zero"],
                     "aux_pooling": ["per_layer_sum"], "mixtral_k_factor": [False]}
    assert tinymoe_adapter.conventions == TINYMOE
    assert TINYMOE["capacity_rounding"] == "ceil" and TINYMOE["priority"] == "choice_major"


def test_reference_formulas_on_hand_computed_values():
    conv = dict(TINYMOE)
    assert ref.expert_capacity(10, 4, 1.0, 1, conv) == 3
    assert ref.expert_capacity(10, 4, 1.0, 1, dict(conv, capacity_rounding="floor")) == 2
    assert ref.expert_capacity(100, 2, 1.1, 1, conv) == 55
    assert ref.expert_capacity(3, 8, 1.0, 1, dict(conv, min_capacity=4)) == 4
    pos = ref.capacity_positions(np.array([[0, 1], [1, 0], [0, 1]]), 2, 2, conv)
    np.testing.assert_array_equal(pos, [[0, 1], [0, -1], [1, -1]])  # firsts, then seconds
    tok = ref.capacity_positions(np.array([[0, 1], [1, 0], [0, 1]]), 2, 2,
                                 dict(conv, priority="token_major"))
    np.testing.assert_array_equal(tok, [[0, 0], [1, 1], [-1, -1]])
    assert ref.switch_aux_loss([np.full((4, 2), 0.5)], [np.array([0, 1, 0, 1])], conv) == 1.0
    assert ref.mixtral_aux_loss([np.zeros((4, 4))], 2, conv) == pytest.approx(1.0)
    assert ref.z_loss(np.zeros((3, 4))) == pytest.approx(math.log(4) ** 2)
    np.testing.assert_array_equal(ref.bias_update(np.zeros(3), np.array([1, 2, 3]), 0.1),
                                  [0.1, 0.0, -0.1])


# --- broken implementations are caught, with the bug named ---------------------------------
class Broken:
    """tinymoe's adapter with one method replaced by a buggy one."""

    conventions = {}

    def __init__(self, **methods):
        for name, fn in methods.items():
            setattr(self, name, fn)


def failure(adapter, component, case):
    with pytest.raises(ConformanceError) as info:
        check(adapter, component, case)
    return str(info.value)


def test_load_estimator_with_the_wrong_threshold():
    """The k-th largest H as the threshold for every expert: the experts inside the top k
    must be compared with the (k+1)-th (their own logit excluded, eq. 9)."""
    def noisy(clean, sigma, noise, k):
        H = clean + noise * sigma
        gates, _ = ref.noisy_topk_router(clean, sigma, noise, k)
        kth = -np.sort(-H, axis=1)[:, k - 1:k]  # wrong: the same threshold for all
        z = (clean - kth) / sigma
        return gates, (0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))).sum(axis=0)

    msg = failure(Broken(noisy_topk_router=noisy), "noisy_topk_router", "random")
    assert msg.startswith("noisy_topk_router [case random]: output 'load' differs at index (")
    assert "kth_excluding" in msg and "(k+1)-th" in msg and "expected" in msg and "got" in msg


def test_capacity_positions_off_by_one():
    """An inclusive cumulative sum compared with ``<= C`` keeps C + 1 tokens per expert."""
    def positions(expert_index, E, C):
        pos = ref.capacity_positions(expert_index, E, C + 1, TINYMOE)  # one slot too many
        return pos

    msg = failure(Broken(capacity_positions=positions), "capacity_positions", "capacity_1")
    assert "output 'position' differs at index (" in msg and "expected -1, got 1" in msg
    assert "position < C" in msg


def test_capacity_rounding_and_priority_are_told_apart_from_bugs():
    floor = Broken(expert_capacity=lambda T, E, cf, k: max(min(int(k * T * cf / E), T), 1))
    msg = failure(floor, "expert_capacity", "not_divisible")
    assert "expected 3, got 2" in msg
    assert "matches the convention capacity_rounding='floor'" in msg
    off = Broken(expert_capacity=lambda T, E, cf, k: math.ceil(k * T * cf / E) + 1)
    msg = failure(off, "expert_capacity", "random")
    assert "capacity_rounding='ceil'" in msg and "matches the convention" not in msg

    token_major = Broken(capacity_positions=lambda e, E, C: ref.capacity_positions(
        e, E, C, dict(TINYMOE, priority="token_major")))
    msg = failure(token_major, "capacity_positions", "random")
    assert "conventions: priority='choice_major'" in msg
    assert "matches the convention priority='token_major'" in msg
    check(token_major, "capacity_positions", "random", {"priority": "token_major"})


def test_router_bugs():
    def no_renorm(logits, k):
        p = ref.softmax(logits, TINYMOE)
        e = ref.top_k(p, k)
        return e, np.take_along_axis(p, e, axis=1)

    msg = failure(Broken(topk_router=no_renorm), "topk_router", "random")
    assert "output 'weight' differs" in msg and "divided by their sum" in msg

    def last_of_ties(logits):
        z = np.asarray(logits, np.float64)
        e = z.shape[1] - 1 - np.argmax(z[:, ::-1], axis=1)  # the highest tied index
        return e, ref.softmax(z, TINYMOE)[np.arange(len(e)), e]

    msg = failure(Broken(top1_router=last_of_ties), "top1_router", "exact_ties")
    assert "output 'expert' differs at index (0,): expected 0, got 1" in msg
    assert "matches the convention tie_breaking='any'" in msg

    def naive_softmax(logits):
        e = np.exp(np.asarray(logits, np.float64))  # no max subtraction: inf / inf
        with np.errstate(invalid="ignore"):
            p = e / e.sum(axis=1, keepdims=True)
        idx = np.argmax(logits, axis=1)
        return idx, p[np.arange(len(idx)), idx]

    with np.errstate(over="ignore"):
        msg = failure(Broken(top1_router=naive_softmax), "top1_router", "large_logits")
    assert "output 'gate' differs" in msg and "got nan" in msg

    def half_softmax(logits):
        z = np.asarray(logits)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p = (p / p.sum(axis=1, keepdims=True)).astype(z.dtype)  # float16 arithmetic
        idx = np.argmax(z, axis=1)
        return idx, p[np.arange(len(idx)), idx]

    msg = failure(Broken(top1_router=half_softmax), "top1_router", "float16")
    assert "router_precision='float32'" in msg
    assert "matches the convention router_precision='input'" in msg


@pytest.mark.task6_1
@pytest.mark.task4_1
@pytest.mark.task4_2
@pytest.mark.task4_3
def test_loss_and_layer_bugs():
    k_times = Broken(mixtral_aux_loss=lambda zs, k: k * tinymoe_adapter.mixtral_aux_loss(zs, k))
    msg = failure(k_times, "mixtral_aux_loss", "uniform")
    assert "expected 1.0, got 2.0" in msg
    assert "matches the convention mixtral_k_factor=True" in msg

    flipped = Broken(bias_update=lambda b, load, s: b + s * np.sign(load - load.mean()))
    msg = failure(flipped, "bias_update", "all_to_one")
    assert "output 'bias' differs at index (0,)" in msg and "overloaded experts go down" in msg

    unsquared = Broken(z_loss=lambda z: float(np.mean(np.log(np.exp(z).sum(axis=1)))))
    assert "logsumexp(logits)²" in failure(unsquared, "z_loss", "random")

    def passthrough(x, W, w_in, w_out, C):
        y = tinymoe_adapter.switch_layer(x, W, w_in, w_out, C)
        e = np.argmax(x @ W, axis=1)
        kept = ref.capacity_positions(e[:, None], W.shape[1], C, TINYMOE)[:, 0] >= 0
        return np.where(kept[:, None], y, x)

    msg = failure(Broken(switch_layer=passthrough), "switch_layer", "capacity_1")
    assert "output 'y' differs" in msg
    assert "matches the convention dropped_tokens='passthrough'" in msg

    def scaled(x, W, w_in, w_out, C):  # HF transformers' Switch before PR #37123: p·x
        y = passthrough(x, W, w_in, w_out, C)
        p = ref.softmax(x @ W, TINYMOE).max(axis=1, keepdims=True)
        return np.where(y == x, p * x, y)

    msg = failure(Broken(switch_layer=scaled), "switch_layer", "capacity_1")
    assert "matches the convention dropped_tokens='scaled_passthrough'" in msg


def test_wrong_shapes_and_missing_outputs_are_reported():
    msg = failure(Broken(top1_router=lambda z: (np.argmax(z, axis=1)[:-1], z.max(axis=1))),
                  "top1_router", "random")
    assert "output 'expert' has shape (7,), expected (8,)" in msg
    with pytest.raises(ConformanceError, match="returned 1 values, expected 2"):
        check(Broken(topk_router=lambda z, k: (np.zeros((8, k), int),)), "topk_router",
              "random")


def test_conventions_and_adapter_loading_errors():
    with pytest.raises(KeyError, match="unknown convention 'capacity'"):
        resolve({"capacity": "ceil"})
    with pytest.raises(ValueError, match="priority='first'"):
        resolve({"priority": "first"})
    assert set(CONVENTIONS) == set(TINYMOE)
    assert parse_conventions(["min_capacity=4", "priority=token_major",
                              "mixtral_k_factor=True"]) == {
        "min_capacity": 4, "priority": "token_major", "mixtral_k_factor": True}
    assert load_adapter("tinymoe.conformance.tinymoe_adapter") is tinymoe_adapter
    with pytest.raises(pytest.UsageError, match="cannot import"):
        load_adapter("no_such_package_xyz.adapter")
    with pytest.raises(KeyError, match="has no case"):
        inputs_for("z_loss", "capacity_1")


def test_run_reports_every_case_and_skips_what_an_adapter_cannot_express():
    class Partial:
        def capacity_positions(self, e, E, C):
            if e.shape[1] > 1:
                raise NotImplementedError("top-1 only")
            return ref.capacity_positions(e, E, C, TINYMOE)

    results = run(Partial())
    assert set(results) == {("capacity_positions", k) for k in CATALOGUE["capacity_positions"][1]}
    assert results["capacity_positions", "one_expert"] is None
    assert results["capacity_positions", "random"] == "skipped: top-1 only"


# --- the pytest route: --pyargs tinymoe.conformance --moe-impl ... ---------------------------
def test_pytest_plugin_runs_the_suite_on_a_users_adapter(tmp_path):
    (tmp_path / "myadapter.py").write_text(textwrap.dedent("""
        import numpy as np

        conventions = {"priority": "choice_major"}

        def expert_capacity(num_tokens, num_experts, capacity_factor, k):
            return int(np.ceil(k * num_tokens * capacity_factor / num_experts)) + 1  # bug

        def z_loss(logits):
            z = np.asarray(logits, dtype=np.float64)
            if len(z) == 0:
                return 0.0
            m = z.max(axis=1, keepdims=True)
            return float(np.mean((m[:, 0] + np.log(np.exp(z - m).sum(axis=1))) ** 2))
    """))
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tinymoe.conformance.plugin", "--pyargs",
         "tinymoe.conformance", "--moe-impl", "myadapter", "-q", "-p", "no:cacheprovider",
         "-k", "expert_capacity or z_loss"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-2000:]
    assert "8 failed, 6 passed" in out, out[-3000:]  # no_tokens: ceil(0) + 1 = 1 is right
    assert "During handling" not in out
    assert "expert_capacity [case random]: output 'capacity' differs at the value: expected " \
           "10, got 11 (1 of 1 elements differ)" in out
    assert "conventions: capacity_rounding='ceil'" in out


def test_the_docs_show_the_message_the_suite_prints():
    """docs/testing_your_moe.md quotes a failure message: it is the one the suite prints."""
    import re

    page = (ROOT / "docs" / "testing_your_moe.md").read_text(encoding="utf-8")
    quoted = re.search(r"```text\n(.*?)```", page, re.DOTALL).group(1).strip()
    floor = Broken(expert_capacity=lambda T, E, cf, k: max(min(int(k * T * cf / E), T), 1))
    assert failure(floor, "expert_capacity", "not_divisible") == quoted
