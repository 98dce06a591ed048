"""A gradient checker for anyone's code: NumPy arrays in, NumPy arrays out.

:func:`tinymoe.gradcheck` checks tinymoe tensors. This one checks a pair of plain functions,

    f(*inputs) -> output (or a tuple of outputs)               the forward pass
    vjp(cotangent, *inputs) -> one gradient per input          the backward pass

where ``cotangent`` has the shape of the output (a tuple for several outputs) and the
gradients are ``J(x)ᵀ · cotangent`` (None for an input without a gradient, e.g. integer
expert indices). The method is the same, and so is the code
(:func:`tinymoe.gradcheck.compare_gradients`): fix a random cotangent R, take
``L(x) = Σ f(x) · R``, whose exact gradient is ``vjp(R, x)``, and compare it with

    dL/dx_i  ~  (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)          (error O(eps^2))

at every element of an input of at most ``max_elements`` entries, else along
``n_directions`` random unit directions. Entries pass when
``|analytic - numeric| <= atol + rtol · |numeric|``. Run it in float64: in float32 the
central difference has an error near 1e-3 and catches nothing smaller.

Adapters build ``(f, vjp)`` from what you have:

* :func:`from_torch` for a PyTorch function or ``nn.Module`` (torch is imported only when
  you call it), run in float64 with ``torch.autograd.grad``;
* :func:`from_numpy` for a hand-written NumPy layer in the ``out, cache = forward(*x)`` /
  ``grads = backward(dout, cache)`` style.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from tinymoe.gradcheck import GradcheckError, GradcheckReport, compare_gradients


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _outputs(f: Callable[..., Any], inputs: Sequence[Any]) -> list[np.ndarray]:
    outs = [np.asarray(o) for o in _as_tuple(f(*inputs))]
    if not outs or not all(np.issubdtype(o.dtype, np.floating) for o in outs):
        raise TypeError("tinymoe.testing.gradcheck: f must return a floating array or a tuple "
                        "of them (got dtypes " + ", ".join(str(o.dtype) for o in outs) + ")")
    return outs


def gradcheck(f: Callable[..., Any], vjp: Callable[..., Any], inputs: Sequence[Any], *,
              wrt: Sequence[int] | None = None, eps: float = 1e-6, atol: float = 1e-5,
              rtol: float = 1e-3, max_elements: int = 400, n_directions: int = 12,
              seed: int = 0, names: Sequence[str] | None = None,
              raise_exception: bool = True) -> GradcheckReport:
    """Check ``vjp`` against central differences of ``f`` at ``inputs`` (NumPy arrays).

    ``wrt``: the indices of the inputs to check (default: every floating input). Those must
    be float64 (copies are made, so your arrays are not modified). ``f`` must be
    deterministic (fix its noise). Returns a :class:`~tinymoe.gradcheck.GradcheckReport`,
    truthy when everything passed; on failure raises
    :class:`~tinymoe.gradcheck.GradcheckError` unless ``raise_exception=False``.

    >>> import numpy as np
    >>> x = np.array([1.0, -2.0, 3.0])
    >>> bool(gradcheck(np.tanh, lambda g, x: g * (1 - np.tanh(x) ** 2), [x]))
    True
    """
    inputs = [np.array(x, copy=True) if isinstance(x, np.ndarray) else x for x in inputs]
    names = list(names) if names is not None else [f"input {i}" for i in range(len(inputs))]
    if len(names) != len(inputs):
        raise ValueError(f"tinymoe.testing.gradcheck: {len(names)} names for {len(inputs)} "
                         f"inputs; give one name per input")
    if wrt is None:
        wrt = [i for i, x in enumerate(inputs)
               if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)]
    wrt = list(wrt)
    if not wrt:
        raise ValueError("tinymoe.testing.gradcheck: no floating input to check; pass the "
                         "inputs as float64 NumPy arrays (or choose them with wrt=[...])")
    for i in wrt:
        x = inputs[i] if 0 <= i < len(inputs) else None
        if not isinstance(x, np.ndarray) or x.dtype != np.float64:
            got = "no such input" if x is None else f"{type(x).__name__} " \
                f"{getattr(x, 'dtype', '')}".strip()
            raise TypeError(f"tinymoe.testing.gradcheck: {names[i] if x is not None else i} "
                            f"is {got}; central differences need a float64 NumPy array "
                            f"(np.asarray(x, dtype=np.float64))")
    rng = np.random.default_rng(seed)

    outs = _outputs(f, inputs)
    cot = [rng.standard_normal(o.shape) for o in outs]
    again = _outputs(f, inputs)
    if any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(outs, again)):
        raise ValueError("tinymoe.testing.gradcheck: f gave different outputs on two calls; "
                         "fix its random noise and dropout (seed it or pass the noise in)")
    grads = vjp(cot[0] if len(cot) == 1 else tuple(cot), *inputs)
    if len(inputs) == 1 and not (isinstance(grads, (tuple, list)) and len(grads) == 1):
        grads = [grads]  # one input: a bare gradient
    grads = list(_as_tuple(grads))
    if len(grads) != len(inputs):
        raise ValueError(f"tinymoe.testing.gradcheck: vjp returned {len(grads)} gradients for "
                         f"{len(inputs)} inputs; return one per input (None where there is "
                         f"none)")
    checked = []
    for i in wrt:
        g = np.zeros(inputs[i].shape) if grads[i] is None else \
            np.asarray(grads[i], dtype=np.float64)
        if g.shape != inputs[i].shape:
            raise ValueError(f"tinymoe.testing.gradcheck: vjp's gradient for {names[i]} has "
                             f"shape {g.shape}, but the input has shape {inputs[i].shape}")
        checked.append((names[i], inputs[i], g))

    def L() -> float:
        return float(sum(np.sum(o.astype(np.float64) * r) for o, r in zip(_outputs(f, inputs),
                                                                            cot)))

    report = compare_gradients(L, checked, rng, eps=eps, atol=atol, rtol=rtol,
                               max_elements=max_elements, n_directions=n_directions)
    if not report.ok and raise_exception:
        raise GradcheckError(report)
    return report


def from_numpy(forward: Callable[..., Any], backward: Callable[..., Any]
               ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(f, vjp)`` for a NumPy layer written as ``out, cache = forward(*inputs)`` and
    ``grads = backward(dout, cache)`` (one gradient per input, or a single array for one
    input; ``dout`` a tuple when ``out`` is).

    >>> fwd = lambda x, w: (x @ w, (x, w))
    >>> bwd = lambda g, cache: (g @ cache[1].T, cache[0].T @ g)
    >>> f, vjp = from_numpy(fwd, bwd)
    >>> bool(gradcheck(f, vjp, [np.ones((2, 3)), np.ones((3, 4))]))
    True
    """
    def f(*inputs: Any) -> Any:
        return forward(*inputs)[0]

    def vjp(cotangent: Any, *inputs: Any) -> Any:
        _, cache = forward(*inputs)
        return backward(cotangent, cache)

    return f, vjp


def from_torch(fn_or_module: Any, *, params: bool = False
               ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(f, vjp)`` for a PyTorch function or ``torch.nn.Module``, run in float64.

    The inputs (NumPy arrays) become float64 tensors (integer arrays stay integer, for
    expert indices); outputs come back as NumPy arrays; ``vjp`` is
    ``torch.autograd.grad`` of ``Σ out · cotangent``. A Module is copied and converted to
    float64 (yours is not touched). With ``params=True`` the Module's parameters are extra
    inputs after yours, in ``named_parameters()`` order (get their values with
    ``[p.detach().double().numpy() for p in module.parameters()]``), so their gradients are
    checked too. Needs torch (``pip install torch``); imported only here.
    """
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("tinymoe.testing.from_torch needs PyTorch: pip install torch") from err
    import copy

    module = None
    if isinstance(fn_or_module, torch.nn.Module):
        module = copy.deepcopy(fn_or_module).double()
        names = [n for n, _ in module.named_parameters()]
    elif params:
        raise TypeError("from_torch: params=True needs a torch.nn.Module, got "
                        f"{type(fn_or_module).__name__}")
    elif not callable(fn_or_module):
        raise TypeError(f"from_torch: expected a torch function or nn.Module, got "
                        f"{type(fn_or_module).__name__}")

    def to_torch(a: Any, grad: bool) -> Any:
        arr = np.asarray(a)
        if np.issubdtype(arr.dtype, np.floating):
            return torch.tensor(arr, dtype=torch.float64, requires_grad=grad)
        return torch.as_tensor(arr)

    def run(inputs: Sequence[Any], grad: bool) -> tuple[list[Any], list[Any]]:
        ts = [to_torch(a, grad) for a in inputs]
        if module is None:
            out = fn_or_module(*ts)
        elif params:
            n = len(ts) - len(names)
            out = torch.func.functional_call(module, dict(zip(names, ts[n:])), tuple(ts[:n]))
        else:
            out = module(*ts)
        return ts, list(_as_tuple(out))

    def f(*inputs: Any) -> Any:
        with torch.no_grad():
            _, outs = run(inputs, False)
        outs = [o.detach().numpy() for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def vjp(cotangent: Any, *inputs: Any) -> Any:
        with torch.enable_grad():
            ts, outs = run(inputs, True)
            cots = [torch.as_tensor(np.asarray(c), dtype=o.dtype)
                    for c, o in zip(_as_tuple(cotangent), outs)]
            total = sum((o * c).sum() for o, c in zip(outs, cots) if o.requires_grad)
            wanted = [t for t in ts if t.requires_grad]
            found = torch.autograd.grad(total, wanted, allow_unused=True) \
                if isinstance(total, torch.Tensor) and wanted else [None] * len(wanted)
        it = iter(found)
        grads = [(lambda g: None if g is None else g.numpy())(next(it)) if t.requires_grad
                 else None for t in ts]
        return grads[0] if len(grads) == 1 else tuple(grads)

    return f, vjp
