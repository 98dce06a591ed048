"""The 1991 adaptive mixture of local experts (Jacobs, Jordan, Nowlan & Hinton).

Several experts and one gate see the same input ``x``. The gate is a softmax over its
"total weighted inputs" ``x_j`` (here ``gate_logits``)::

    p_j = exp(x_j) / sum_i exp(x_i)                              (Fig. 1 caption)

and the paper compares three errors for a case with target ``d`` and expert outputs ``o_i``:

    (1) cooperative:  E = || d - sum_i p_i o_i ||^2
    (2) competitive:  E = sum_i p_i || d - o_i ||^2
    (3) mixture NLL:  E = -log sum_i p_i exp(-1/2 || d - o_i ||^2)

Eq. (3) is the negative log-likelihood of a mixture of unit-variance Gaussians, the one the
paper's simulations use. Its gradients are eqs. (4)-(5)::

    dE/do_i = -h_i (d - o_i),    dE/dx_j = p_j - h_j,
    h_i = p_i exp(-1/2||d - o_i||^2) / sum_j p_j exp(-1/2||d - o_j||^2)

where ``h`` is the posterior responsibility of each expert for the case. For experts that
output class scores, the same mixture gives ``-log sum_i p_i P_i(y|x)``.

Every loss takes ``gate_logits`` (n, E) rather than probabilities, so that ``log p`` comes
from ``log_softmax`` and eq. (3) from ``logsumexp``: no ``exp`` can underflow to 0 and no
``log(0)`` appears, however large the errors.

The gate's decision is the :class:`~tinymoe.dispatch.routing.Routing` every later router
returns, in its **dense** form: every case goes to all E experts, weighted by ``p``
(:func:`softmax_routing`). The blend ``sum_i p_i o_i`` is then ``combine`` over the experts'
outputs (:func:`blend`), the last step of every MoE layer since 2017. Eqs. (2)-(5) need each
expert's own output ``o_i``, so the losses take all of them, (n, E, D).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from tinymoe import ops, validate
from tinymoe.autograd import no_grad
from tinymoe.dispatch.functions import combine
from tinymoe.dispatch.routing import Routing, route
from tinymoe.losses import apply_reduction
from tinymoe.nn import Linear, Module, ModuleList, as_rng
from tinymoe.tensor import Tensor, as_tensor

ACTIVATIONS = ("identity", "sigmoid", "softmax")


# --- argument checks ---------------------------------------------------------------------------
def _check_parts(op: str, gate_logits: Any, expert_outputs: Any) -> tuple[Tensor, Tensor]:
    gate_logits, expert_outputs = as_tensor(gate_logits), as_tensor(expert_outputs)
    if gate_logits.ndim != 2:
        raise ValueError(f"{op}: gate_logits must be (n, E), got shape {gate_logits.shape}")
    n, E = gate_logits.shape
    if E == 0:
        raise ValueError(f"{op}: the gate has zero experts (gate_logits {gate_logits.shape}); "
                         f"a mixture needs at least one expert")
    if expert_outputs.ndim != 3 or expert_outputs.shape[:2] != (n, E):
        raise ValueError(f"{op}: expert_outputs must be (n, E, D) = ({n}, {E}, D) to match "
                         f"gate_logits {gate_logits.shape}, got {expert_outputs.shape}")
    validate.finite(gate_logits, "gate_logits", op, rows="case")
    for i in range(E):
        validate.finite(expert_outputs.data[:, i], f"expert {i}'s outputs", op, rows="case",
                        cols="output")
    return gate_logits, expert_outputs


def _check_target(op: str, target: Any, expert_outputs: Tensor) -> Tensor:
    target = as_tensor(target, like=expert_outputs)
    n, _, D = expert_outputs.shape
    if target.shape != (n, D):
        raise ValueError(f"{op}: target must be (n, D) = ({n}, {D}) to match expert_outputs "
                         f"{expert_outputs.shape}, got {target.shape}")
    if not np.isfinite(target.data).all():
        raise ValueError(f"{op}: target contains NaN or inf")
    return target


def _check_labels(op: str, y: Any, n: int, n_classes: int) -> np.ndarray:
    y = np.asarray(y.data if isinstance(y, Tensor) else y)
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{op}: y must hold integer class indices, got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{op}: y must be ({n},) class indices, got shape {y.shape}")
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        raise ValueError(f"{op}: unknown class label {y[bad][0]} (row {np.flatnonzero(bad)[0]}); "
                         f"labels must lie in [0, {n_classes})")
    return y


# --- the gate's routing, and the blend ----------------------------------------------------------
def dense_routing(probs: Tensor, **fields: Any) -> Routing:
    """A dense gate's decision as a :class:`Routing`: every case goes to all E experts.

    For n cases and gate probabilities ``probs`` (n, E), rows summing to one::

        expert_index[t] = (0, 1, ..., E-1)    combine_weight = probs    capacity None

    so ``dispatch`` gives each expert every case (expert e's rows are
    ``offsets[e]:offsets[e+1] = e*n:(e+1)*n``) and ``combine`` computes
    ``sum_i probs_i o_i``. ``fields`` fill the rest (``logits``, ``stats``).
    """
    n, E = probs.shape
    expert_index = np.tile(np.arange(E), (n, 1))  # (n, E) every expert, in order
    return route(expert_index, probs, E, probs=probs, **fields)


def softmax_routing(gate_logits: Any) -> Routing:
    """The 1991 gate: ``p_j = exp(x_j) / sum_i exp(x_i)`` (Fig. 1 caption) over all E
    experts, as a dense :class:`Routing` with ``probs = combine_weight = p`` and
    ``logits = x`` (n, E)."""
    gate_logits = as_tensor(gate_logits)
    return dense_routing(ops.softmax(gate_logits, axis=-1), logits=gate_logits)


def blend(expert_outputs: Any, routing: Routing) -> Tensor:
    """The blended output ``sum_i p_i o_i`` (n, D) of every expert's output (n, E, D),
    weighted by a dense routing (:func:`dense_routing`): ``combine`` over the experts' rows."""
    expert_outputs = as_tensor(expert_outputs)
    n, E, D = expert_outputs.shape
    if routing.expert_index.shape != (n, E) or routing.num_experts != E \
            or not (routing.expert_index == np.arange(E)).all():
        raise ValueError(f"blend: expert_outputs {expert_outputs.shape} need the dense "
                         f"routing of those n = {n} cases over all E = {E} experts "
                         f"(expert_index 0..{E - 1} on every row, see dense_routing), got "
                         f"expert_index {routing.expert_index.shape} over "
                         f"{routing.num_experts} experts")
    rows = ops.reshape(ops.transpose(expert_outputs, (1, 0, 2)), (E * n, D))  # (E*n, D)
    return combine(rows, routing)  # (n, D)  sum_i p_i o_i: expert e's rows e*n:(e+1)*n


# --- per-expert likelihoods --------------------------------------------------------------------
def gaussian_log_likelihood(expert_outputs: Any, target: Any) -> Tensor:
    """``log P_i(d|x) = -1/2 ||d - o_i||^2`` for each case and expert: (n, E).

    A unit-variance Gaussian around each expert's output, without the constant
    ``-D/2 log(2 pi)``, exactly as in eq. (3) (the constant cancels in ``h``).
    """
    expert_outputs = as_tensor(expert_outputs)
    if expert_outputs.ndim != 3:
        raise ValueError(f"gaussian_log_likelihood: expert_outputs must be (n, E, D), got "
                         f"{expert_outputs.shape}")
    target = _check_target("gaussian_log_likelihood", target, expert_outputs)
    diff = ops.unsqueeze(target, 1) - expert_outputs  # (n, E, D)
    return (diff * diff).sum(axis=-1) * -0.5  # (n, E)


def categorical_log_likelihood(expert_logits: Any, y: Any) -> Tensor:
    """``log P_i(y|x)``, expert i's log-probability of the true class: (n, E).

    ``expert_logits`` (n, E, C) are each expert's class scores; ``P_i = softmax`` over C.
    """
    expert_logits = as_tensor(expert_logits)
    if expert_logits.ndim != 3:
        raise ValueError(f"categorical_log_likelihood: expert_logits must be (n, E, C), got "
                         f"{expert_logits.shape}")
    n, E, C = expert_logits.shape
    y = _check_labels("categorical_log_likelihood", y, n, C)
    log_P = ops.log_softmax(expert_logits, axis=-1)  # (n, E, C)
    idx = np.broadcast_to(y[:, None, None], (n, E, 1))  # (n, E, 1)
    return ops.squeeze(ops.take_along_axis(log_P, idx, axis=-1), -1)  # (n, E)


# --- the three error functions of the paper, and the classification form ---------------------
def cooperative_loss(gate_logits: Any, expert_outputs: Any, target: Any,
                     reduction: str = "mean") -> Tensor:
    """Eq. (1): ``E = || d - sum_i p_i o_i ||^2``, the error of the blended output.

    Each expert must cancel the residual the others leave, so many experts end up used on
    every case. ``gate_logits`` (n, E), ``expert_outputs`` (n, E, D), ``target`` (n, D).
    """
    op = "cooperative_loss"
    gate_logits, expert_outputs = _check_parts(op, gate_logits, expert_outputs)
    target = _check_target(op, target, expert_outputs)
    y = blend(expert_outputs, softmax_routing(gate_logits))  # (n, D)  sum_i p_i o_i
    diff = target - y  # (n, D)
    return apply_reduction(op, (diff * diff).sum(axis=-1), reduction)


def competitive_loss(gate_logits: Any, expert_outputs: Any, target: Any,
                     reduction: str = "mean") -> Tensor:
    """Eq. (2): ``E = sum_i p_i || d - o_i ||^2``, the expected error of a chosen expert.

    Each expert must produce the whole output; ``dE/do_i = -2 p_i (d - o_i)`` (eq. 4).
    """
    op = "competitive_loss"
    gate_logits, expert_outputs = _check_parts(op, gate_logits, expert_outputs)
    target = _check_target(op, target, expert_outputs)
    p = ops.softmax(gate_logits, axis=-1)  # (n, E)
    sq = gaussian_log_likelihood(expert_outputs, target) * -2.0  # (n, E) ||d - o_i||^2
    return apply_reduction(op, (p * sq).sum(axis=-1), reduction)


def mixture_nll(gate_logits: Any, expert_outputs: Any, target: Any,
                reduction: str = "mean") -> Tensor:
    """Eq. (3): ``E = -log sum_i p_i exp(-1/2 || d - o_i ||^2)``, via logsumexp.

    The negative log-likelihood of a mixture of unit-variance Gaussians centred on the
    expert outputs (constant dropped). Computed as
    ``-logsumexp_i(log_softmax(x)_i - 1/2 ||d - o_i||^2)``, which stays finite when every
    ``exp(-1/2 ||d - o_i||^2)`` underflows. Gradients: eq. (5), ``dE/do_i = -h_i (d - o_i)``.
    """
    op = "mixture_nll"
    gate_logits, expert_outputs = _check_parts(op, gate_logits, expert_outputs)
    target = _check_target(op, target, expert_outputs)
    log_lik = gaussian_log_likelihood(expert_outputs, target)  # (n, E)  -1/2 ||d - o_i||^2
    return apply_reduction(op, _mixture_nll_per_case(gate_logits, log_lik), reduction)


def _mixture_nll_per_case(gate_logits: Tensor, log_lik: Tensor) -> Tensor:
    """``-log sum_i p_i P_i`` per case from the gate's logits and ``log P_i`` (n, E).  (n,)"""
    ### BEGIN SOLUTION task1_1
    log_p = ops.log_softmax(gate_logits, axis=-1)  # (n, E)  log p_i
    per_case = -ops.logsumexp(log_p + log_lik, axis=-1)  # (n,)
    ### END SOLUTION
    return per_case


def mixture_classification_nll(gate_logits: Any, expert_logits: Any, y: Any,
                               reduction: str = "mean") -> Tensor:
    """``E = -log sum_i p_i P_i(y|x)`` with ``P_i = softmax(expert_logits_i)``.

    The classification form of eq. (3): each expert is a classifier over C classes and the
    gate mixes their predictive distributions. ``expert_logits`` (n, E, C), ``y`` (n,) ints.
    The same mixture log-likelihood as :func:`mixture_nll` (task 1_1), another ``P_i``.
    """
    op = "mixture_classification_nll"
    gate_logits, expert_logits = _check_parts(op, gate_logits, expert_logits)
    log_P = categorical_log_likelihood(expert_logits, y)  # (n, E)
    return apply_reduction(op, _mixture_nll_per_case(gate_logits, log_P), reduction)


def posterior_responsibilities(gate_logits: Any, expert_outputs: Any, target: Any, *,
                               likelihood: str = "gaussian") -> Tensor:
    """The posterior ``h_i = p_i P_i / sum_j p_j P_j`` of each expert for each case: (n, E).

    ``likelihood="gaussian"``: ``P_i = exp(-1/2 ||d - o_i||^2)`` with ``target`` (n, D), as in
    eqs. (3)-(5). ``likelihood="categorical"``: ``expert_outputs`` are class logits (n, E, C)
    and ``target`` the class indices (n,). Rows sum to one. A Tensor (it carries gradient);
    take ``.numpy()`` to plot it. Compare with the gate's prior ``p``: the gate's gradient
    under eq. (3) is ``p - h``, prior minus posterior.
    """
    op = "posterior_responsibilities"
    gate_logits, expert_outputs = _check_parts(op, gate_logits, expert_outputs)
    if likelihood == "gaussian":
        log_lik = gaussian_log_likelihood(expert_outputs, target)  # (n, E)
    elif likelihood == "categorical":
        log_lik = categorical_log_likelihood(expert_outputs, target)  # (n, E)
    else:
        raise ValueError(f"{op}: likelihood={likelihood!r}; choose 'gaussian' or "
                         f"'categorical'")
    ### BEGIN SOLUTION task1_2
    log_p = ops.log_softmax(gate_logits, axis=-1)  # (n, E)  prior log p_i
    h = ops.softmax(log_p + log_lik, axis=-1)  # (n, E)  normalise p_i P_i over experts
    ### END SOLUTION
    return h


# --- the model -----------------------------------------------------------------------------------
class MixtureOutput(NamedTuple):
    """What :class:`AdaptiveMixture` computes for a batch: the gate's logits and every
    expert's output. The losses above take these two directly."""

    gate_logits: Tensor  # (n, E)    x_j: the gate's total weighted inputs
    expert_outputs: Tensor  # (n, E, D) o_i

    @property
    def gate_probs(self) -> Tensor:
        """``p = softmax(gate_logits)``: (n, E), the mixing proportions."""
        return ops.softmax(self.gate_logits, axis=-1)

    @property
    def routing(self) -> Routing:
        """The gate's decision: every case to all E experts, weighted by ``p``."""
        return softmax_routing(self.gate_logits)

    @property
    def output(self) -> Tensor:
        """The blended output ``sum_i p_i o_i``: (n, D), ``combine`` with the routing."""
        return blend(self.expert_outputs, self.routing)


class LinearExpert(Module):
    """``o = f(x W + b)``: a one-layer expert; ``f`` is the identity, the logistic sigmoid
    (one unit per output) or a softmax over the outputs (a class distribution).

    Either way the expert's decision surfaces are linear: with ``"sigmoid"`` output ``k`` is
    exactly 0.5 on the line ``x W[:, k] + b[k] = 0``; with ``"softmax"`` classes ``k`` and
    ``l`` tie (each 0.5 of their pair) on the line ``x (W[:, k] - W[:, l]) + b[k] - b[l] = 0``.
    """

    def __init__(self, in_features: int, out_features: int, activation: str = "identity", *,
                 dtype: Any = np.float64, rng: np.random.Generator | None = None,
                 init_scale: float = 1.0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"LinearExpert: activation={activation!r}; choose one of "
                             f"{ACTIVATIONS}")
        self.activation = activation
        self.linear = Linear(in_features, out_features, dtype=dtype, rng=rng,
                             init_scale=init_scale)

    def forward(self, x: Any) -> Tensor:
        z = self.linear(x)  # (n, D)
        if self.activation == "sigmoid":
            return z.sigmoid()
        if self.activation == "softmax":
            return z.softmax(axis=-1)
        return z

    def decision_line(self, k: int, k2: int | None = None) -> tuple[np.ndarray, float]:
        """``(w, b)`` of the line ``w . x + b = 0`` where the pre-activation of output ``k``
        is 0 (a sigmoid unit's 0.5 line), or, with ``k2``, where outputs ``k`` and ``k2`` are
        equal (a softmax expert's boundary between two classes). For 2-D inputs: a line."""
        W, b = self.linear.weight.data, self.linear.bias.data  # (d, D), (D,)
        if k2 is None:
            return W[:, k].copy(), float(b[k])
        return W[:, k] - W[:, k2], float(b[k] - b[k2])


class AdaptiveMixture(Module):
    """A softmax gate over ``E`` experts that all see the same input (Jacobs et al. 1991).

    ``AdaptiveMixture(in_features, out_features, n_experts)`` builds linear experts
    (:class:`LinearExpert`, with ``activation``); pass ``experts=[...]`` to use any Modules
    that map ``(n, in_features) -> (n, out_features)`` instead. The gate is a ``Linear``
    layer ``x -> x_j`` whose weights start at zero, so every expert starts with the same
    mixing proportion ``1/E`` (the paper's unbiased gate, Fig. 3 text).

    ``forward(x)`` returns a :class:`MixtureOutput` ``(gate_logits, expert_outputs)``; feed
    it to :func:`mixture_nll` and the other losses, or read ``.output`` (the blend),
    ``.gate_probs`` and ``.routing``. ``route(x)`` is the gate alone: a dense
    :class:`~tinymoe.dispatch.routing.Routing`.
    """

    def __init__(self, in_features: int, out_features: int, n_experts: int | None = None, *,
                 experts: Sequence[Module] | None = None, activation: str = "identity",
                 dtype: Any = np.float64, rng: np.random.Generator | None = None,
                 init_scale: float = 1.0, gate_init: str = "zeros") -> None:
        super().__init__()
        where = "AdaptiveMixture"
        in_features = validate.positive_int(in_features, "in_features", where)
        out_features = validate.positive_int(out_features, "out_features", where)
        if experts is None:
            n_experts = validate.positive_int(n_experts, "n_experts", where)
            rng = as_rng(rng)
            experts = [LinearExpert(in_features, out_features, activation, dtype=dtype,
                                    rng=rng, init_scale=init_scale)
                       for _ in range(n_experts)]
        experts = list(experts)
        if not experts:
            raise ValueError("AdaptiveMixture: experts=[] is empty; the gate needs at least "
                             "one expert to choose from")
        if n_experts is not None and int(n_experts) != len(experts):
            raise ValueError(f"AdaptiveMixture: n_experts={n_experts} but {len(experts)} "
                             f"experts were given")
        if gate_init not in ("zeros", "random"):
            raise ValueError(f"AdaptiveMixture: gate_init={gate_init!r}; choose 'zeros' "
                             f"(equal proportions) or 'random'")
        self.in_features, self.out_features = in_features, out_features
        self.n_experts = len(experts)
        self.experts = ModuleList(experts)
        self.gate = Linear(in_features, self.n_experts, dtype=dtype, rng=as_rng(rng),
                           init_scale=init_scale)
        if gate_init == "zeros":
            self.gate.weight.data[...] = 0.0
            self.gate.bias.data[...] = 0.0

    def _check_input(self, x: Any) -> Tensor:
        x = as_tensor(x)
        validate.tokens(x, self.in_features, "AdaptiveMixture")
        if not np.isfinite(x.data).all():  # bad data, not a diverged model: a ValueError
            rows = np.flatnonzero(~np.isfinite(x.data).all(axis=1))
            raise ValueError(f"AdaptiveMixture: input has NaN or inf features in rows "
                             f"{rows[:5].tolist()}; clean or drop them first")
        return x

    def route(self, x: Any) -> Routing:
        """The gate's decision for the cases ``x`` (n, in_features): see
        :func:`softmax_routing`."""
        return softmax_routing(self.gate(self._check_input(x)))

    def forward(self, x: Any) -> MixtureOutput:
        """The gate's logits and every expert's output for the cases ``x`` (n, in_features).

        Every expert sees every case: ``dispatch`` of the dense routing would hand each
        expert a copy of ``x``, so each expert is simply run on ``x``.
        """
        x = self._check_input(x)
        gate_logits = self.gate(x)  # (n, E)
        outs = []
        for i, expert in enumerate(self.experts):
            o = expert(x)  # (n, D)
            if o.shape != (x.shape[0], self.out_features):
                raise ValueError(f"AdaptiveMixture: expert {i} returned shape {o.shape}; "
                                 f"expected ({x.shape[0]}, {self.out_features})")
            outs.append(o)
        expert_outputs = ops.stack(outs, axis=1)  # (n, E, D)
        return MixtureOutput(gate_logits, expert_outputs)

    def gate_probs(self, x: Any) -> np.ndarray:
        """The mixing proportions ``p`` (n, E) as an array, without recording a graph."""
        with no_grad():
            return self.route(x).probs.data

    def predict(self, x: Any) -> np.ndarray:
        """The blended output ``sum_i p_i o_i`` (n, D) as an array, without a graph."""
        with no_grad():
            return self.forward(x).output.data
