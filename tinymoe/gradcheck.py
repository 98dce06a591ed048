"""Gradient checking: compare backward() with central differences, in float64.

For a function ``f`` of tensors we fix a random cotangent ``R`` (one per output) and check the
scalar ``L(x) = sum(f(x) * R)``. Its exact gradient is what backward computes from
``f(x).backward(R)``; its numerical gradient, element by element, is

    dL/dx_i  ~  (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)          (error O(eps^2))

Inputs with at most ``max_elements`` entries are checked at every element. Larger ones are
checked along ``n_directions`` random unit directions v, comparing ``grad . v`` with
``(L(x + eps v) - L(x - eps v)) / (2 eps)``, which covers every element at once.

An entry passes when ``|analytic - numeric| <= atol + rtol * |numeric|`` (PyTorch's rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from tinymoe.autograd import no_grad
from tinymoe.tensor import Tensor


@dataclass
class Mismatch:
    input: str
    where: str  # an element index, or "direction j"
    analytic: float
    numeric: float

    @property
    def rel_error(self) -> float:
        return abs(self.analytic - self.numeric) / max(abs(self.numeric), 1e-12)


@dataclass
class InputReport:
    name: str
    shape: tuple[int, ...]
    mode: str  # "every element" or "k random directions"
    checks: int
    max_abs_error: float


@dataclass
class GradcheckReport:
    """What was checked and what failed; truthy when everything passed."""

    inputs: list[InputReport] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        lines = [f"gradcheck: {'PASSED' if self.ok else 'FAILED'}"]
        for r in self.inputs:
            lines.append(f"  {r.name:<12} shape {str(r.shape):<14} {r.mode:<22} "
                         f"{r.checks:>5} checks   max |error| {r.max_abs_error:.2e}")
        for m in self.mismatches[:10]:
            lines.append(f"  MISMATCH {m.input} at {m.where}: analytic {m.analytic:.8g} vs "
                         f"numeric {m.numeric:.8g} (relative error {m.rel_error:.2e})")
        if len(self.mismatches) > 10:
            lines.append(f"  ... and {len(self.mismatches) - 10} more mismatches")
        return "\n".join(lines)


class GradcheckError(AssertionError):
    """Raised by gradcheck on failure; ``.report`` holds the details."""

    def __init__(self, report: GradcheckReport) -> None:
        super().__init__(str(report))
        self.report = report


def _outputs(fn: Callable[..., Any], inputs: Sequence[Any]) -> list[Tensor]:
    out = fn(*inputs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not outs or not all(isinstance(o, Tensor) for o in outs):
        raise TypeError("gradcheck: fn must return a Tensor or a tuple of Tensors")
    return outs


def _scalar(fn: Callable[..., Any], inputs: Sequence[Any], cot: list[np.ndarray]) -> float:
    with no_grad():
        outs = _outputs(fn, inputs)
    return float(sum(np.sum(o.data.astype(np.float64) * r) for o, r in zip(outs, cot)))


def central_difference(L: Callable[[], float], x: np.ndarray, index: tuple[int, ...],
                       eps: float) -> float:
    """(L(x + eps e_i) - L(x - eps e_i)) / (2 eps), perturbing ``x[index]`` in place."""
    orig = x[index]
    x[index] = orig + eps
    up = L()
    x[index] = orig - eps
    down = L()
    x[index] = orig  # restore exactly
    return (up - down) / (2 * eps)


def compare_gradients(L: Callable[[], float],
                      checked: Sequence[tuple[str, np.ndarray, np.ndarray]],
                      rng: np.random.Generator, *, eps: float, atol: float, rtol: float,
                      max_elements: int, n_directions: int) -> GradcheckReport:
    """The method shared by :func:`gradcheck` and :func:`tinymoe.testing.gradcheck`.

    ``L()`` evaluates the scalar ``sum(f(x) * R)`` at the current values of the arrays;
    ``checked`` lists ``(name, x, analytic)``: an array ``x`` that ``L`` reads (perturbed in
    place here and restored exactly) and the exact gradient of ``L`` with respect to it.
    Every element when ``x.size <= max_elements``, else ``n_directions`` random unit
    directions drawn from ``rng``. Returns the report (mismatches included; never raises).
    """
    report = GradcheckReport()
    for name, x, a in checked:
        errors = []
        if x.size <= max_elements:
            for idx in np.ndindex(x.shape):
                num = central_difference(L, x, idx, eps)
                errors.append((str(idx), float(a[idx]), num))
            mode = "every element"
        else:
            orig = x.copy()
            for j in range(n_directions):
                v = rng.standard_normal(x.shape)
                v /= np.linalg.norm(v)
                x[...] = orig + eps * v
                up = L()
                x[...] = orig - eps * v
                down = L()
                x[...] = orig
                errors.append((f"direction {j}", float(np.sum(a * v)), (up - down) / (2 * eps)))
            mode = f"{n_directions} random directions"
        worst = 0.0
        for where, an, num in errors:
            worst = max(worst, abs(an - num))
            if not abs(an - num) <= atol + rtol * abs(num):  # also catches NaN
                report.mismatches.append(Mismatch(name, where, an, num))
        report.inputs.append(InputReport(name, tuple(x.shape), mode, len(errors), worst))
    return report


def gradcheck(fn: Callable[..., Any], inputs: Sequence[Any], *, eps: float = 1e-6,
              atol: float = 1e-5, rtol: float = 1e-3, max_elements: int = 400,
              n_directions: int = 12, seed: int = 0, names: Sequence[str] | None = None,
              raise_exception: bool = True) -> GradcheckReport:
    """Check ``fn(*inputs)``'s gradients with respect to every input that requires grad.

    ``fn`` must be deterministic (fix its noise and dropout) and may return one tensor or a
    tuple of them. Inputs that require grad must be float64. Returns a
    :class:`GradcheckReport` (truthy on success); on failure raises :class:`GradcheckError`
    unless ``raise_exception=False``, in which case the (falsy) report is returned.
    """
    names = list(names) if names is not None else [f"input {i}" for i in range(len(inputs))]
    checked = [i for i, x in enumerate(inputs) if isinstance(x, Tensor) and x.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input has requires_grad=True, so there is nothing to "
                         "check; make the inputs with tm.tensor(x, requires_grad=True)")
    for i in checked:
        x = inputs[i]
        if x.dtype != np.float64:
            raise TypeError(f"gradcheck: {names[i]} is {x.dtype}; central differences need "
                            f"float64 (make it with dtype=np.float64)")
        if not x.data.flags.writeable:
            x.data = x.data.copy()
    rng = np.random.default_rng(seed)

    # the exact gradient of L = sum(f(x) * R), via backward (.grad is restored afterwards)
    before = {i: inputs[i].grad for i in checked}
    for i in checked:
        inputs[i].grad = None
    outs = _outputs(fn, inputs)
    cot = [rng.standard_normal(o.shape) for o in outs]
    again = _outputs(fn, inputs)
    if any(not np.array_equal(a.data, b.data, equal_nan=True) for a, b in zip(outs, again)):
        raise ValueError("gradcheck: fn gave different outputs on two calls; fix its random "
                         "noise and dropout (pass a seeded generator or explicit noise)")
    loss = sum((o * r).sum() for o, r in zip(outs, cot) if o.requires_grad)
    if isinstance(loss, Tensor):
        loss.backward()
    analytic = {i: (inputs[i].grad if inputs[i].grad is not None
                    else np.zeros(inputs[i].shape)) for i in checked}
    for i in checked:
        inputs[i].grad = before[i]

    L = lambda: _scalar(fn, inputs, cot)  # noqa: E731
    report = compare_gradients(L, [(names[i], inputs[i].data, analytic[i]) for i in checked],
                               rng, eps=eps, atol=atol, rtol=rtol, max_elements=max_elements,
                               n_directions=n_directions)
    if not report.ok and raise_exception:
        raise GradcheckError(report)
    return report
