"""The 2013 deep mixture of experts (Eigen, Ranzato & Sutskever).

A mixture of experts (Jacobs et al. 1991) becomes one *layer*: N expert networks and a
gating network all see the layer's input, and the layer outputs the gate-weighted sum of
the experts' outputs. Stacking two such layers, each with its **own** gating network over
all of its experts, gives the two-layer DMoE of the paper (§3, Fig. 1b)::

    z^1 = sum_i g^1_i(x)   f^1_i(x)          first mixture layer
    z^2 = sum_j g^2_j(z^1) f^2_j(z^1)        second mixture layer
    F(x) = softmax(W z^2 + b)                the classifier on top

Experts are one rectified-linear layer, ``f_i(x) = max(0, W_i x + b_i)``; a gating network
is a small network with a softmax output, ``g(x) = softmax(B max(0, A x))``. Each layer is
the library's one :class:`~tinymoe.moe.layer.MoELayer` with a *dense* router: every input
goes to every expert, weighted by ``g`` -- the 1991 blend, dispatched and combined the way
every later layer is. Each input
takes a *combination* of one (soft) expert per layer, so two layers of N experts give N^2
paths for the size of 2N experts. The whole model is trained end to end by backprop on the
classifier's cross-entropy.

**The gate-collapse remedy** (§4, training). Early in training one expert of a layer can
win most inputs, get most of the gradient, and keep them: the gate "collapses" and the
other experts are never trained. The paper constrains the gate assignments during the
first epochs: it keeps a running total ``S_i`` of the gate outputs each expert has
received, and an expert whose total exceeds that of the least-used expert by more than a
margin ``m`` gets gate output 0 for the next inputs (the remaining outputs are
renormalised), until the others catch up. After that phase the constraint is dropped.
:class:`AssignmentConstraint` is that rule; pass one per layer to ``DeepMoE.forward``.
We apply it example by example within each minibatch, in the batch's order.

**The paper's analysis** (§4.1, Fig. 2): the mean gate output of each expert for each
translation of the digit and for each class. :func:`gate_table` is one such heat map and
:func:`gate_mutual_information` sums it into one number, the mutual information (in nats)
between "which expert" and the label, with the joint ``P(e, c) = 1/n sum_{t: c_t = c}
g_e(x_t)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from tinymoe import ops, validate
from tinymoe.autograd import no_grad
from tinymoe.dispatch.routing import Routing
from tinymoe.moe.layer import MoELayer
from tinymoe.moe.mixture import dense_routing
from tinymoe.nn import Linear, Module, ModuleList, as_rng
from tinymoe.tensor import Tensor, as_tensor


class AssignmentConstraint:
    """The early-training rule of §4: keep every expert's running assignment total ``S_i``
    within ``margin`` of the least-used expert's.

    ``mask(probs)`` walks the cases of a batch in order; for case t it allows the experts
    with ``S_i - min_j S_j <= margin`` (the least-used one always qualifies), renormalises
    the gate over them, and adds the renormalised gate outputs to ``S``. It returns the
    allowed set (n, E) of booleans; the totals carry over from batch to batch.
    """

    def __init__(self, n_experts: int, margin: float) -> None:
        self.n_experts = validate.positive_int(n_experts, "n_experts", "AssignmentConstraint")
        margin = float(margin)
        if not (np.isfinite(margin) and margin >= 0):
            raise ValueError(f"AssignmentConstraint: margin={margin!r} must be a finite "
                             f"number >= 0 (in units of whole assignments, e.g. 10.0)")
        self.margin = margin
        self.totals = np.zeros(self.n_experts)  # (E,) S_i

    def mask(self, probs: np.ndarray) -> np.ndarray:
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != self.n_experts:
            raise ValueError(f"AssignmentConstraint.mask: probs must be (n, {self.n_experts})"
                             f", got {probs.shape}")
        allowed = np.zeros(probs.shape, dtype=bool)  # (n, E)
        for t, p in enumerate(probs):
            ok = self.totals - self.totals.min() <= self.margin  # (E,)
            kept = np.where(ok, p, 0.0)
            total = kept.sum()
            # a gate that gives the allowed experts (almost) nothing: share them equally
            kept = kept / total if total > 1e-12 else ok / ok.sum()
            self.totals += kept
            allowed[t] = ok
        return allowed


class DeepMoEOutput(NamedTuple):
    """What :class:`DeepMoE` computes: the class scores and each layer's gate outputs."""

    logits: Tensor  # (n, C) W z^L + b
    gates: list[Tensor]  # one (n, E_l) gate output g^l per mixture layer


class GatingNetwork(Module):
    """``g(x) = softmax(B max(0, A x + a) + b)``: the one-hidden-layer gating network of a
    DMoE layer, as a router: ``forward(x, allowed=None)`` returns the dense
    :class:`~tinymoe.dispatch.routing.Routing` that sends every input to all E experts with
    weights ``g`` (:func:`~tinymoe.moe.mixture.dense_routing`), so that
    :class:`~tinymoe.moe.layer.MoELayer` computes ``sum_i g_i(x) f_i(x)``.

    ``allowed`` (n, E) booleans, from an :class:`AssignmentConstraint`, zero the disallowed
    experts' gate outputs and renormalise over the rest (a softmax over the allowed logits).
    """

    def __init__(self, in_features: int, n_experts: int, hidden: int, *,
                 rng: np.random.Generator | None = None, dtype: Any = np.float64) -> None:
        super().__init__()
        where = "GatingNetwork"
        self.d_model = validate.positive_int(in_features, "in_features", where)
        self.num_experts = validate.positive_int(n_experts, "n_experts", where)
        rng = as_rng(rng)
        self.hidden = Linear(in_features, validate.positive_int(hidden, "hidden", where),
                             dtype=dtype, rng=rng)
        self.out = Linear(hidden, n_experts, dtype=dtype, rng=rng)

    def probs(self, x: Any, allowed: np.ndarray | None = None) -> Tensor:
        """``g(x)`` (n, E); with ``allowed``, renormalised over the allowed experts."""
        logits = self.out(ops.relu(self.hidden(x)))  # (n, E)
        if allowed is not None:
            allowed = np.asarray(allowed, dtype=bool)
            if allowed.shape != logits.shape or not allowed.any(axis=1).all():
                raise ValueError(f"GatingNetwork: allowed must be (n, E) = {logits.shape} "
                                 f"booleans with at least one True per row, got "
                                 f"{allowed.shape}")
            # -inf logits get probability exactly 0 and gradient exactly 0
            logits = logits + np.where(allowed, 0.0, -np.inf)
        return ops.softmax(logits, axis=-1)  # (n, E)

    def forward(self, x: Any, allowed: np.ndarray | None = None) -> Routing:
        return dense_routing(self.probs(x, allowed))


class ReLUExpert(Module):
    """``f(x) = max(0, W x + b)``: one expert of a DMoE layer."""

    def __init__(self, in_features: int, out_features: int, *,
                 rng: np.random.Generator | None = None, dtype: Any = np.float64) -> None:
        super().__init__()
        self.linear = Linear(in_features, out_features, dtype=dtype, rng=rng)

    def forward(self, x: Any) -> Tensor:
        return ops.relu(self.linear(x))


def mixture_layer(in_features: int, out_features: int, n_experts: int, gate_hidden: int, *,
                  rng: np.random.Generator | None = None, dtype: Any = np.float64) -> MoELayer:
    """One DMoE layer, ``z = sum_i g_i(x) f_i(x)``: a :class:`GatingNetwork` over
    ``n_experts`` :class:`ReLUExpert` s, run by the one :class:`~tinymoe.moe.layer.MoELayer`.
    ``layer(x, allowed=mask)`` passes a constraint's mask to the gate; after a call,
    ``layer.last_routing.probs`` (n, E) are the gate outputs."""
    rng = as_rng(rng)
    experts = [ReLUExpert(in_features, out_features, rng=rng, dtype=dtype)
               for _ in range(validate.positive_int(n_experts, "n_experts", "mixture_layer"))]
    gate = GatingNetwork(in_features, n_experts, gate_hidden, rng=rng, dtype=dtype)
    return MoELayer(gate, experts)


class DeepMoE(Module):
    """The stacked mixture of experts: ``len(n_experts)`` layers from :func:`mixture_layer`,
    then a linear classifier.

    ``n_experts=(4, 4)``, ``hidden=(h1, h2)`` is the paper's two-layer DMoE; a single entry
    gives a one-layer mixture (the 1991 model with ReLU experts and a classifier on top).
    ``forward(x, constraints=None)`` returns :class:`DeepMoEOutput`; ``constraints`` is
    one :class:`AssignmentConstraint` (or None) per layer.
    """

    def __init__(self, in_features: int, n_classes: int, n_experts: Sequence[int] = (4, 4),
                 hidden: Sequence[int] = (32, 32), gate_hidden: int = 32, *,
                 rng: np.random.Generator | None = None, dtype: Any = np.float64) -> None:
        super().__init__()
        n_experts, hidden = tuple(n_experts), tuple(hidden)
        if not n_experts or len(n_experts) != len(hidden):
            raise ValueError(f"DeepMoE: n_experts={n_experts} and hidden={hidden} must be "
                             f"non-empty and of the same length (one entry per layer)")
        rng = as_rng(rng)
        sizes = (validate.positive_int(in_features, "in_features", "DeepMoE"),) + hidden
        self.layers = ModuleList([mixture_layer(sizes[i], sizes[i + 1], n_experts[i],
                                                gate_hidden, rng=rng, dtype=dtype)
                                  for i in range(len(hidden))])
        self.classifier = Linear(hidden[-1], validate.positive_int(n_classes, "n_classes",
                                                                   "DeepMoE"),
                                 dtype=dtype, rng=rng)

    def forward(self, x: Any, constraints: Sequence[AssignmentConstraint | None] | None = None
                ) -> DeepMoEOutput:
        constraints = list(constraints) if constraints is not None else [None] * len(self.layers)
        if len(constraints) != len(self.layers):
            raise ValueError(f"DeepMoE: {len(constraints)} constraints for "
                             f"{len(self.layers)} layers; pass one (or None) per layer")
        z, gates = as_tensor(x), []
        validate.tokens(z, self.layers[0].d_model, "DeepMoE")
        for layer, rule in zip(self.layers, constraints):
            allowed = None
            if rule is not None:
                with no_grad():
                    allowed = rule.mask(layer.router.probs(z).data)  # (n, E)
            z, _ = layer(z, allowed=allowed)  # (n, hidden)
            gates.append(layer.last_routing.probs)  # (n, E)
        return DeepMoEOutput(self.classifier(z), gates)


# --- the paper's analysis (§4.1, Fig. 2) --------------------------------------------------------
def gate_table(probs: Any, labels: Any, n_labels: int | None = None) -> np.ndarray:
    """The mean gate output of each expert for each label: (n_labels, E).

    Row c is ``mean_{t: label_t = c} g(x_t)`` -- one row of the paper's heat maps, with
    ``labels`` a class or a translation cell. Rows of unseen labels are NaN.
    """
    probs = np.asarray(probs.data if isinstance(probs, Tensor) else probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"gate_table: probs must be (n, E) and labels (n,), got "
                         f"{probs.shape} and {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise ValueError("gate_table: labels must be integers >= 0 (a class or cell index)")
    n_labels = int(labels.max()) + 1 if n_labels is None else int(n_labels)
    sums = np.zeros((n_labels, probs.shape[1]))  # (L, E)
    np.add.at(sums, labels, probs)
    counts = np.bincount(labels, minlength=n_labels)[:, None]  # (L, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def gate_mutual_information(probs: Any, labels: Any) -> float:
    """``I(expert; label)`` in nats, with ``P(e, c) = 1/n sum_{t: c_t = c} g_e(x_t)``.

    0 when the gate ignores the label; at most ``log min(E, n_labels)``.
    """
    probs = np.asarray(probs.data if isinstance(probs, Tensor) else probs, dtype=np.float64)
    labels = np.asarray(labels)
    table = gate_table(probs, labels)  # (L, E)
    p_label = np.bincount(labels, minlength=table.shape[0]) / len(labels)  # (L,)
    joint = np.nan_to_num(table) * p_label[:, None]  # (L, E) P(c, e)
    p_expert = joint.sum(axis=0, keepdims=True)  # (1, E)
    outer = p_label[:, None] * p_expert  # (L, E) P(c) P(e)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log(joint[nz] / outer[nz])))
