"""Optimizers, gradient clipping and learning-rate schedules.

After ``loss.backward()`` each parameter ``p`` holds ``p.grad``; ``optimizer.step()``
moves ``p.data`` in place (in the parameter's own dtype), skipping parameters whose
``.grad`` is None. The update rules, with g the gradient and lr the learning rate:

    SGD        p <- p - lr g
    momentum   b <- mu b + g;  p <- p - lr b             (Nesterov: p <- p - lr (g + mu b))
    Adam       m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2           (Kingma & Ba 2015)
               p <- p - lr m_hat / (sqrt(v_hat) + eps),  m_hat = m/(1-b1^t), v_hat = v/(1-b2^t)
    AdamW      p <- p (1 - lr wd), then the Adam step      (decoupled decay, Loshchilov &
                                                            Hutter 2019)

Adam's ``weight_decay`` is classic L2 (``g + wd p`` enters the moments), AdamW's is decoupled:
the conventions of ``torch.optim``, which ``tests/test_torch_nn.py`` checks against.

``optimizer.state_dict()`` is a flat ``{name: ndarray}``, so ``tm.nn.save`` can write it
next to the model's for a checkpoint that resumes exactly.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tinymoe.tensor import Tensor


def _number(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(value):
        raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def _positive(name: str, value: Any, where: str) -> float:
    v = _number(name, value, where)
    if v <= 0:
        raise ValueError(f"{where}: {name}={value} must be > 0")
    return v


def _non_negative(name: str, value: Any, where: str) -> float:
    v = _number(name, value, where)
    if v < 0:
        raise ValueError(f"{where}: {name}={value} must be >= 0")
    return v


def _unit_interval(name: str, value: Any, where: str) -> float:
    v = _number(name, value, where)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{where}: {name}={value} must be in [0, 1)")
    return v


# --- the update rules, as plain functions on arrays ----------------------------------------
def sgd_update(param: np.ndarray, grad: np.ndarray, buf: np.ndarray | None, *, lr: float,
               momentum: float, weight_decay: float, nesterov: bool) -> None:
    """One SGD step, in place on ``param`` (and on the momentum buffer ``buf``).

        g <- g + wd p                       (L2 weight decay)
        b <- mu b + g                       (heavy-ball momentum, when mu > 0)
        p <- p - lr b      or, Nesterov,    p <- p - lr (g + mu b)
    """
    g = grad + weight_decay * param if weight_decay else grad
    if momentum:
        buf *= momentum
        buf += g
        g = g + momentum * buf if nesterov else buf
    param -= lr * g


def adam_update(param: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, t: int, *,
                lr: float, beta1: float, beta2: float, eps: float) -> None:
    """Adam's step number ``t`` (1, 2, ...), in place on ``param`` and the moments m, v.

        m <- b1 m + (1 - b1) g                    running mean of g
        v <- b2 v + (1 - b2) g^2                  running mean of g^2
        m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)     undo the bias towards 0
        p <- p - lr m_hat / (sqrt(v_hat) + eps)
    """
    # the operations of the formulas above in their order, in two temporaries instead of eight
    m *= beta1
    m += (1 - beta1) * grad
    v *= beta2
    g2 = (1 - beta2) * grad
    g2 *= grad
    v += g2
    step = np.divide(m, 1 - beta1 ** t)  # m_hat
    denom = np.divide(v, 1 - beta2 ** t)  # v_hat
    np.sqrt(denom, out=denom)
    denom += eps
    step *= lr
    step /= denom
    param -= step


# --- the optimizers -----------------------------------------------------------------------------
class Optimizer:
    """Holds the parameters, their per-parameter state and the hyper-parameters.

    Subclasses list their hyper-parameter attribute names in ``hyper`` and their state
    entries in ``state_names``, and implement ``_update(p, grad, state)``.
    """

    hyper: tuple[str, ...] = ("lr",)
    state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Tensor], lr: float) -> None:
        name = type(self).__name__
        unique: dict[int, Tensor] = {}
        for p in params:
            if not isinstance(p, Tensor) or not p.requires_grad:
                raise TypeError(f"{name}: every parameter must be a Tensor with "
                                f"requires_grad=True, got {type(p).__name__}")
            unique.setdefault(id(p), p)
        if not unique:
            raise ValueError(f"{name}: got no parameters (a module without parameters, or a "
                             f"parameters() generator that was already used up?)")
        self.params: list[Tensor] = list(unique.values())
        self.lr = _positive("lr", lr, name)
        self.state: list[dict[str, Any]] = [{} for _ in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Update every parameter that has a gradient."""
        _non_negative("lr", self.lr, type(self).__name__)  # a schedule may reach 0
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            if p.grad.shape != p.shape:
                raise ValueError(f"{type(self).__name__}: a gradient of shape {p.grad.shape} "
                                 f"for a parameter of shape {p.shape}")
            self._update(p, np.asarray(p.grad, dtype=p.dtype), state)

    def _update(self, p: Tensor, grad: np.ndarray, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat ``{name: array}``: ``kind``, ``hyper.<name>``, ``state.<i>.<name>``."""
        out = {"kind": np.array(type(self).__name__)}
        for h in self.hyper:
            out[f"hyper.{h}"] = np.array(getattr(self, h))
        for i, state in enumerate(self.state):
            for k, v in state.items():
                out[f"state.{i}.{k}"] = np.array(v, copy=True)
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore hyper-parameters and state; on any mismatch raise ValueError and change
        nothing."""
        name = type(self).__name__
        problems, hyper = [], {}
        new_state: list[dict[str, Any]] = [{} for _ in self.params]
        kind = str(np.asarray(state_dict.get("kind", "?")))
        if kind != name:
            problems.append(f"it was saved by {kind}, not {name}")
        for key, value in state_dict.items():
            value, parts = np.asarray(value), key.split(".")
            if key == "kind":
                continue
            if len(parts) == 2 and parts[0] == "hyper" and parts[1] in self.hyper:
                old = getattr(self, parts[1])
                try:
                    hyper[parts[1]] = tuple(float(x) for x in value) \
                        if isinstance(old, tuple) else type(old)(value.item())
                except (TypeError, ValueError):
                    problems.append(f"{key}: cannot read {value!r} as {type(old).__name__}")
            elif len(parts) == 3 and parts[0] == "state" and parts[1].isdigit() and \
                    int(parts[1]) < len(self.params) and parts[2] in self.state_names:
                i, entry = int(parts[1]), parts[2]
                p = self.params[i]
                if entry == "step":
                    new_state[i][entry] = int(value)
                elif value.shape != p.shape:
                    problems.append(f"{key}: shape {value.shape}, parameter {i} has {p.shape}")
                else:
                    new_state[i][entry] = value.astype(p.dtype, copy=True)
            else:
                problems.append(f"unexpected key {key}")
        for i, st in enumerate(new_state):
            if st and set(st) != set(self.state_names):
                problems.append(f"state of parameter {i} has {sorted(st)}, expected "
                                f"{sorted(self.state_names)}")
        if problems:
            raise ValueError(f"{name}.load_state_dict: the state does not fit this optimizer "
                             f"({len(self.params)} parameters); nothing was loaded:\n  " +
                             "\n  ".join(problems))
        for h, v in hyper.items():
            setattr(self, h, v)
        self.state = new_state

    def __repr__(self) -> str:
        hp = ", ".join(f"{h}={getattr(self, h)!r}" for h in self.hyper)
        return f"{type(self).__name__}({len(self.params)} parameters, {hp})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    hyper = ("lr", "momentum", "weight_decay", "nesterov")
    state_names = ("momentum_buffer",)

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(params, lr)
        self.momentum = _unit_interval("momentum", momentum, "SGD")
        self.weight_decay = _non_negative("weight_decay", weight_decay, "SGD")
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")

    def _update(self, p: Tensor, grad: np.ndarray, state: dict[str, Any]) -> None:
        if self.momentum and "momentum_buffer" not in state:
            state["momentum_buffer"] = np.zeros_like(p.data)
        sgd_update(p.data, grad, state.get("momentum_buffer"), lr=self.lr,
                   momentum=self.momentum, weight_decay=self.weight_decay,
                   nesterov=self.nesterov)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015); ``weight_decay`` adds ``wd * p`` to the gradient (L2)."""

    hyper = ("lr", "betas", "eps", "weight_decay")
    state_names = ("step", "exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        name = type(self).__name__
        if len(tuple(betas)) != 2:
            raise ValueError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_unit_interval("beta1", betas[0], name),
                      _unit_interval("beta2", betas[1], name))
        self.eps = _non_negative("eps", eps, name)
        self.weight_decay = _non_negative("weight_decay", weight_decay, name)

    def _update(self, p: Tensor, grad: np.ndarray, state: dict[str, Any]) -> None:
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(p.data), exp_avg_sq=np.zeros_like(p.data))
        if self.weight_decay and self.decoupled:
            p.data *= 1 - self.lr * self.weight_decay  # AdamW: shrink p, outside the moments
        elif self.weight_decay:
            grad = grad + self.weight_decay * p.data  # Adam: L2 enters the moments
        state["step"] += 1
        adam_update(p.data, grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                    lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019): ``p <- p (1 - lr wd)``
    before each Adam step, so the decay is not rescaled by Adam's per-weight step size."""

    decoupled = True

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


# --- gradient clipping -------------------------------------------------------------------------
def clip_grad_norm_(params: Iterable[Tensor] | Tensor, max_norm: float) -> float:
    """Rescale all gradients together so their global L2 norm is at most ``max_norm``.

        total = sqrt( sum over parameters of ||g_p||^2 )
        if total > max_norm:  g_p <- g_p * max_norm / (total + 1e-6)      for every p

    The direction of the full gradient is kept; only its length shrinks. Returns ``total``,
    the norm *before* clipping (worth logging: spikes warn of instability). A NaN or inf
    gradient raises FloatingPointError instead of spreading into every parameter.
    """
    max_norm = _positive("max_norm", max_norm, "clip_grad_norm_")
    params = [params] if isinstance(params, Tensor) else list(params)
    with_grad = [p for p in params if p.grad is not None]
    grads = [p.grad for p in with_grad]
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads)))
        scale = min(1.0, max_norm / (total + 1e-6))
    if not math.isfinite(total):
        bad = [f"#{i} {p.shape}" for i, p in enumerate(params)
               if p.grad is not None and not np.isfinite(p.grad).all()]
        raise FloatingPointError(
            f"clip_grad_norm_: the gradient norm is {total}: gradients are NaN/inf in "
            f"parameters {', '.join(bad) or '(overflow of finite values)'}; training has "
            f"diverged (lower the learning rate, or look for a log/divide of zero)")
    if scale < 1.0:
        for p in with_grad:
            p.grad = (p.grad * scale).astype(p.grad.dtype, copy=False)
    return total


# --- learning-rate schedules -------------------------------------------------------------------
def cosine_schedule(step: int, total: int, warmup: int, lr_max: float,
                    lr_min: float = 0.0) -> float:
    """Linear warm-up to ``lr_max`` over ``warmup`` steps, then a cosine down to ``lr_min``.

        step < warmup:           lr_max (step + 1) / warmup
        warmup <= step < total:  lr_min + (lr_max - lr_min) (1 + cos(pi q)) / 2,
                                 q = (step - warmup) / (total - warmup)
        step >= total:           lr_min
    """
    _check_schedule(total, warmup, lr_max, lr_min)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"cosine_schedule: step must be an integer >= 0, got {step!r}")
    if step < warmup:
        return lr_max * (step + 1) / warmup
    if step >= total:
        return lr_min
    q = (step - warmup) / (total - warmup)
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * q))


def _check_schedule(total: int, warmup: int, lr_max: float, lr_min: float) -> None:
    where = "cosine_schedule"
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)) or total <= 0:
        raise ValueError(f"{where}: total={total!r} must be a positive integer")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or \
            not 0 <= warmup <= total:
        raise ValueError(f"{where}: warmup={warmup!r} must be an integer in [0, total={total}]")
    _positive("lr_max", lr_max, where)
    if not 0 <= _number("lr_min", lr_min, where) <= lr_max:
        raise ValueError(f"{where}: lr_min={lr_min} must be in [0, lr_max={lr_max}]")


class LinearWarmupCosine:
    """:func:`cosine_schedule` with its settings fixed: ``sched(step) -> lr``.

        sched = LinearWarmupCosine(total=2000, warmup=100, lr_max=3e-3, lr_min=3e-4)
        for step in range(2000):
            opt.lr = sched(step)
            ...
    """

    def __init__(self, total: int, warmup: int, lr_max: float, lr_min: float = 0.0) -> None:
        _check_schedule(total, warmup, lr_max, lr_min)
        self.total, self.warmup, self.lr_max, self.lr_min = total, warmup, lr_max, lr_min

    def __call__(self, step: int) -> float:
        return cosine_schedule(step, self.total, self.warmup, self.lr_max, self.lr_min)

    def __repr__(self) -> str:
        return (f"LinearWarmupCosine(total={self.total}, warmup={self.warmup}, "
                f"lr_max={self.lr_max:g}, lr_min={self.lr_min:g})")
