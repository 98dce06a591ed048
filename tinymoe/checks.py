"""``tinymoe gradcheck``: gradient-check every op, layer, gate and loss, and print a table.

Each entry of :data:`CHECKS` builds ``(fn, inputs)`` in float64 from a seed; the command runs
``tm.gradcheck`` on each and reports the largest error. Later stages append their layers and
gates with :func:`register`.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

import tinymoe as tm
import tinymoe.functional as F

Builder = Callable[[np.random.Generator], tuple[Callable[..., Any], list[Any]]]
CHECKS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        CHECKS[name] = builder
        return builder
    return wrap


def leaf(a: np.ndarray) -> tm.Tensor:
    return tm.tensor(np.asarray(a, dtype=np.float64), requires_grad=True)


def _unary(name: str, fn: Callable[[Any], Any], low: float | None = None) -> None:
    def build(rng: np.random.Generator):
        x = rng.standard_normal((3, 4))
        if low is not None:
            x = np.abs(x) + low
        return fn, [leaf(x)]
    CHECKS[f"op {name}"] = build


for _name, _fn, _low in [
        ("exp", F.exp, None), ("log", F.log, 0.5), ("sqrt", F.sqrt, 0.5), ("tanh", F.tanh, None),
        ("sigmoid", F.sigmoid, None), ("softplus", F.softplus, None), ("relu", F.relu, 0.1),
        ("gelu", F.gelu, None), ("erf", F.erf, None), ("normal_cdf", F.normal_cdf, None),
        ("abs", F.abs, 0.1), ("softmax", lambda a: F.softmax(a, -1), None),
        ("log_softmax", lambda a: F.log_softmax(a, 0), None),
        ("logsumexp", lambda a: F.logsumexp(a, -1), None),
        ("sum/mean/max/var", lambda a: a.sum(0) + a.mean(1).sum() + a.max(1).sum() + a.var(),
         None),
        ("reshape/transpose/getitem", lambda a: a.T.reshape(2, 6)[:, np.array([0, 0, 5])], None),
        ("topk values", lambda a: F.topk(a, 2)[0], None)]:
    _unary(_name, _fn, _low)


@register("op add/sub/mul/div/pow (broadcast)")
def _binary(rng):
    a, b = leaf(rng.uniform(0.5, 2, (3, 4))), leaf(rng.uniform(0.5, 2, (4,)))
    return (lambda a, b: (a + b) * (a - b) / b + a ** b), [a, b]


@register("op matmul (batched)")
def _matmul(rng):
    return (lambda a, b: a @ b), [leaf(rng.standard_normal((2, 3, 4))),
                                  leaf(rng.standard_normal((4, 5)))]


@register("loss cross_entropy")
def _ce(rng):
    y = rng.integers(0, 4, 5)
    return (lambda z: F.cross_entropy(z, y)), [leaf(rng.standard_normal((5, 4)))]


def _module_check(module: Any, x: np.ndarray) -> tuple[Callable[..., Any], list[Any]]:
    """Check a module's output with respect to its input and all of its parameters."""
    params = list(module.parameters())
    return (lambda x, *ps: module(x)), [leaf(x)] + params


@register("nn Linear")
def _linear(rng):
    return _module_check(tm.nn.Linear(4, 3, dtype=np.float64, rng=rng), rng.standard_normal((5, 4)))


@register("nn LayerNorm")
def _layernorm(rng):
    m = tm.nn.LayerNorm(6, dtype=np.float64)
    return _module_check(m, rng.standard_normal((3, 6)))


@register("nn FeedForward")
def _ffn(rng):
    m = tm.nn.FeedForward(4, 8, dtype=np.float64, rng=rng)
    return _module_check(m, rng.standard_normal((3, 4)))


@register("nn CausalSelfAttention")
def _attn(rng):
    m = tm.nn.CausalSelfAttention(8, 2, dtype=np.float64, rng=rng)
    return _module_check(m, rng.standard_normal((2, 5, 8)))


def run_checks(names: list[str] | None = None, seed: int = 0) -> list[tuple[str, Any, float]]:
    """Run the named checks (all by default): ``[(name, report, seconds)]``."""
    results = []
    for name in names or list(CHECKS):
        fn, inputs = CHECKS[name](np.random.default_rng(seed))
        start = time.perf_counter()
        report = tm.gradcheck(fn, inputs, raise_exception=False)
        results.append((name, report, time.perf_counter() - start))
    return results


def main_gradcheck(verbose: bool = False) -> int:
    results = run_checks()
    print(f"{'check':<40} {'inputs':>6} {'checks':>7} {'max |error|':>12}  result")
    for name, report, _ in results:
        worst = max(r.max_abs_error for r in report.inputs)
        checks = sum(r.checks for r in report.inputs)
        print(f"{name:<40} {len(report.inputs):>6} {checks:>7} {worst:>12.2e}  "
              f"{'ok' if report else 'FAILED'}")
        if verbose or not report:
            print(str(report))
    failed = [name for name, report, _ in results if not report]
    print(f"\n{len(results) - len(failed)} of {len(results)} gradient checks passed")
    return 1 if failed else 0
