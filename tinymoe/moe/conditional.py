"""Conditional computation with stochastic binary gates (Bengio, Léonard & Courville 2013;
Bengio, Bacon, Pineau & Precup 2015).

A gate ``b in {0, 1}`` switches a unit or a block of units on or off for one input; it is
drawn as ``b ~ Bernoulli(p)`` with ``p = sigm(a)`` computed from the input. The sample has
no derivative, so the gradient of the expected loss ``E_b[L]`` with respect to ``a`` must
be *estimated*. Bengio, Léonard & Courville (2013) compare:

- **REINFORCE** (Williams 1992; their §3): ``(L - beta) d log P(b)/da = (L - beta)(b - p)``
  for a Bernoulli(sigm(a)) gate. Unbiased for any constant baseline ``beta``; a good
  baseline (e.g. ``beta = E[L]``) lowers its variance. :func:`reinforce_surrogate`.
- **straight-through** (their §4): back-propagate through the sample as if it were the
  identity of ``p``: ``dL/da ~ dL/db * sigm'(a)``. Biased, low variance.
  :func:`straight_through`.
- **stochastic times smooth** (their §5): the unit outputs ``h = b * s`` with
  ``s = sqrt(sigm(a))`` and ``b ~ Bernoulli(s)``, so ``E[h] = sigm(a)``; the gradient goes
  through the smooth factor ``s`` only, ``b`` held fixed. :func:`stochastic_times_smooth`.

On a few gates the expectation is a finite sum over the ``2^K`` configurations, so the
*true* gradient and each estimator's exact mean and variance can be computed:
:func:`expected_over_gates`, :func:`estimator_study`.

Bengio, Bacon, Pineau & Precup (2015) gate **blocks** of units of each hidden layer with a
policy ``sigma = sigm(Z h + d)`` over the blocks (their §3), trained by REINFORCE on the
classification loss, and add three regularisers on the probabilities ``sigma`` (n, k) of
a minibatch (their §3.2), with a target rate ``tau``::

    L_b = sum_j || E_x[sigma_j] - tau ||_2        every block on for a fraction tau of inputs
    L_e = E_x[ || 1/k sum_j sigma_j - tau ||_2 ]  every input uses a fraction tau of blocks
    L_v = - sum_j Var_x[sigma_j]                  varied policies across inputs

(norms of scalars, i.e. absolute values). The total is
``L = L_NLL + lambda_s (L_b + L_e) + lambda_v L_v`` (+ weight decay).
:class:`GatedBlocks`, :class:`BlockGatedNet`, :func:`sparsity_regularisers`.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from tinymoe import ops, validate
from tinymoe.autograd import Function, no_grad
from tinymoe.nn import Linear, Module, ModuleList, as_rng
from tinymoe.tensor import Tensor, as_tensor


def _check_uniforms(op: str, u: Any, shape: tuple[int, ...]) -> np.ndarray:
    u = np.asarray(u.data if isinstance(u, Tensor) else u, dtype=np.float64)
    if u.shape != shape:
        raise ValueError(f"{op}: the uniforms u must have the gates' shape {shape}, got "
                         f"{u.shape}; draw them with rng.random({shape})")
    if not ((u >= 0) & (u <= 1)).all():
        raise ValueError(f"{op}: the uniforms u must lie in [0, 1]")
    return u


# --- the three estimators ----------------------------------------------------------------------
def bernoulli_log_prob(logits: Any, b: Any) -> Tensor:
    """``log P(b) = b log sigm(a) + (1 - b) log(1 - sigm(a))``, elementwise, from the logits.

    Written as ``-b softplus(-a) - (1 - b) softplus(a)`` so it stays finite for large |a|.
    """
    logits = as_tensor(logits)
    b = np.asarray(b.data if isinstance(b, Tensor) else b, dtype=logits.dtype)
    if b.shape != logits.shape:
        raise ValueError(f"bernoulli_log_prob: b {b.shape} must match logits {logits.shape}")
    return ops.softplus(-logits) * (-b) - ops.softplus(logits) * (1.0 - b)


def reinforce_surrogate(logits: Any, b: Any, cost: Any, baseline: Any = 0.0) -> Tensor:
    """A scalar whose gradient is the REINFORCE estimate of ``d E[cost] / d logits``.

    ``logits`` (n, K) of the gates, ``b`` (n, K) their samples, ``cost`` (n,) each case's
    loss (a number, not differentiated), ``baseline`` a number or (n,)::

        surrogate = 1/n sum_t (cost_t - baseline) sum_k log P(b_tk)

    so ``d surrogate / d a_tk = (cost_t - baseline)(b_tk - p_tk) / n``.
    """
    logits = as_tensor(logits)
    if logits.ndim != 2:
        raise ValueError(f"reinforce_surrogate: logits must be (n, K), got {logits.shape}")
    n = logits.shape[0]
    cost = np.asarray(cost.data if isinstance(cost, Tensor) else cost, dtype=np.float64)
    base = np.asarray(baseline.data if isinstance(baseline, Tensor) else baseline,
                      dtype=np.float64)
    if cost.shape != (n,) or base.shape not in ((), (n,)):
        raise ValueError(f"reinforce_surrogate: cost must be ({n},) and baseline a number or "
                         f"({n},), got {cost.shape} and {base.shape}")
    if not (np.isfinite(cost).all() and np.isfinite(base).all()):
        raise ValueError("reinforce_surrogate: cost or baseline contains NaN or inf")
    ### BEGIN SOLUTION task2b_2
    advantage = (cost - base)[:, None]  # (n, 1) a constant: no gradient flows into the cost
    log_p = bernoulli_log_prob(logits, b)  # (n, K)
    surrogate = (log_p * advantage).sum() * (1.0 / n)
    ### END SOLUTION
    return surrogate


class StraightThrough(Function):
    """out = 1[u < p] (a Bernoulli(p) sample);  dp = grad (the sample's derivative taken as 1)."""

    @staticmethod
    def forward(ctx, p, u):
        return (u < p).astype(p.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(probs: Any, u: Any) -> Tensor:
    """A Bernoulli sample ``b = 1[u < p]`` whose backward pass is the identity in ``p``.

    With ``p = sigm(a)`` the estimate of ``dL/da`` is ``dL/db * sigm'(a)``: the
    straight-through estimator of Bengio, Léonard & Courville (2013, §4).
    ``u`` are uniforms in [0, 1] of ``probs``' shape (fixed, so the op is repeatable).
    """
    probs = as_tensor(probs)
    u = _check_uniforms("straight_through", u, probs.shape)
    return StraightThrough.apply(probs, u)


def stochastic_times_smooth(logits: Any, u: Any) -> Tensor:
    """The stochastic-times-smooth unit: ``h = b * s``, ``s = sqrt(sigm(a))``,
    ``b = 1[u < s]`` ~ Bernoulli(s), so ``E[h] = sigm(a)``.

    ``b`` is a constant of the graph: the gradient flows through ``s`` alone (Bengio,
    Léonard & Courville 2013, §5). ``u`` are uniforms of ``logits``' shape.
    """
    logits = as_tensor(logits)
    u = _check_uniforms("stochastic_times_smooth", u, logits.shape)
    ### BEGIN SOLUTION task2b_1
    s = ops.sqrt(ops.sigmoid(logits))  # the smooth factor, sqrt(p)
    b = (u < s.data).astype(s.dtype)  # the stochastic factor ~ Bernoulli(sqrt(p)), no gradient
    h = s * b
    ### END SOLUTION
    return h


# --- exact enumeration over the 2^K gate configurations ------------------------------------------
def gate_configurations(n_gates: int) -> np.ndarray:
    """Every configuration of ``n_gates`` binary gates: (2^K, K), in binary counting order."""
    n_gates = validate.positive_int(n_gates, "n_gates", "gate_configurations")
    if n_gates > 16:
        raise ValueError(f"gate_configurations: n_gates={n_gates} gives 2^{n_gates} "
                         f"configurations; enumeration is for K <= 16")
    return np.array(list(itertools.product((0.0, 1.0), repeat=n_gates)))  # (2^K, K)


def expected_over_gates(probs: Any, loss_of: Callable[[np.ndarray], Tensor]) -> Tensor:
    """``E_b[L(b)] = sum_b P(b) L(b)`` over all ``2^K`` configurations of K independent
    gates ``b_k ~ Bernoulli(p_k)``, exactly, as a differentiable Tensor.

    ``probs`` (K,) are the gates' probabilities (a Tensor: the gradient flows through
    ``P(b) = prod_k (b_k p_k + (1 - b_k)(1 - p_k))``); ``loss_of(b)`` takes one
    configuration (K,) and returns a scalar Tensor (it may depend on parameters too).
    Backward gives the true gradient of the expected loss.
    """
    probs = as_tensor(probs)
    if probs.ndim != 1:
        raise ValueError(f"expected_over_gates: probs must be (K,), got {probs.shape}")
    configs = gate_configurations(probs.shape[0])  # (2^K, K)
    P = ops.where(configs.astype(bool), ops.unsqueeze(probs, 0),
                  1.0 - ops.unsqueeze(probs, 0))  # (2^K, K) P(b_k)
    weights = ops.exp(ops.log(P).sum(axis=1))  # (2^K,) P(b) = prod_k P(b_k)
    losses = ops.stack([as_tensor(loss_of(b)).reshape(()) for b in configs])  # (2^K,)
    return (weights * losses).sum()


class EstimatorMoments(NamedTuple):
    """An estimator's exact mean (K,), its variance (total, ``E||g - E g||^2``), and the
    true gradient (K,) of the expected loss it estimates."""

    mean: np.ndarray
    variance: float
    exact: np.ndarray

    @property
    def bias(self) -> float:
        """``||E g - true|| / ||true||``: 0 for an unbiased estimator."""
        return float(np.linalg.norm(self.mean - self.exact) / np.linalg.norm(self.exact))

    @property
    def cosine(self) -> float:
        """The cosine between the estimator's mean and the true gradient."""
        return float(self.mean @ self.exact
                     / (np.linalg.norm(self.mean) * np.linalg.norm(self.exact)))


ESTIMATORS = ("reinforce", "reinforce+baseline", "straight-through", "stochastic-times-smooth")


def _grad_of(fn: Callable[[Tensor], Tensor], a: np.ndarray) -> np.ndarray:
    leaf = Tensor(np.array(a, dtype=np.float64), requires_grad=True)
    fn(leaf).backward()
    return leaf.grad.copy()


def estimator_study(logits: Any, loss_of_h: Callable[[Tensor], Tensor]
                    ) -> dict[str, EstimatorMoments]:
    """The exact mean and variance of each estimator of ``d E[L] / d a``, against the truth.

    ``logits`` (K,) are the gates' ``a``; ``loss_of_h(h)`` maps the gates' outputs ``h`` (a
    (K,) Tensor) to a scalar loss Tensor. For the three Bernoulli(sigm(a)) estimators the
    gate output is ``h = b`` and the target is ``d/da E_{b ~ Bern(sigm a)}[L(b)]``; for the
    stochastic-times-smooth unit ``h = b sqrt(sigm a)``, ``b ~ Bern(sqrt(sigm a))``, and the
    target is that unit's own ``d/da E[L(h)]``. Every mean and variance is a sum over the
    ``2^K`` configurations, weighted by their probabilities -- no sampling noise.
    The baseline of "reinforce+baseline" is the constant ``E[L]``.
    """
    a = np.asarray(logits.data if isinstance(logits, Tensor) else logits, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"estimator_study: logits must be (K,), got {a.shape}")
    configs = gate_configurations(a.shape[0])  # (2^K, K)
    p = 1.0 / (1.0 + np.exp(-a))  # (K,)
    s = np.sqrt(p)  # (K,) the STS unit's firing probability

    def weights(q: np.ndarray) -> np.ndarray:
        return np.prod(np.where(configs > 0, q, 1.0 - q), axis=1)  # (2^K,)

    w_bern, w_sts = weights(p), weights(s)
    with no_grad():
        L = np.array([float(loss_of_h(Tensor(b)).data) for b in configs])  # (2^K,)
    exact_bern = _grad_of(lambda t: expected_over_gates(ops.sigmoid(t),
                                                        lambda b: loss_of_h(Tensor(b))), a)
    exact_sts = _grad_of(lambda t: expected_over_gates(
        ops.sqrt(ops.sigmoid(t)), lambda b: loss_of_h(ops.sqrt(ops.sigmoid(t)) * b)), a)
    mean_loss = float(w_bern @ L)
    per = {
        "reinforce": L[:, None] * (configs - p),  # (2^K, K)
        "reinforce+baseline": (L - mean_loss)[:, None] * (configs - p),
        # u = 1 - b makes 1[u < p] equal b for 0 < p < 1
        "straight-through": np.array([_grad_of(
            lambda t, b=b: loss_of_h(straight_through(ops.sigmoid(t), 1.0 - b)), a)
            for b in configs]),
        "stochastic-times-smooth": np.array([_grad_of(
            lambda t, b=b: loss_of_h(stochastic_times_smooth(t, 1.0 - b)), a)
            for b in configs]),
    }
    out = {}
    for name, g in per.items():
        w, exact = (w_sts, exact_sts) if name == "stochastic-times-smooth" else (w_bern, exact_bern)
        mean = w @ g  # (K,)
        var = float(w @ ((g - mean) ** 2).sum(axis=1))
        out[name] = EstimatorMoments(mean, var, exact)
    return out


# --- the 2015 block-gated network ----------------------------------------------------------------
def sparsity_regularisers(sigma: Any, tau: float) -> dict[str, Tensor]:
    """The three regularisers of Bengio, Bacon, Pineau & Precup (2015, §3.2) on the block
    probabilities ``sigma`` (n, k) of a minibatch, target rate ``tau``::

        L_b = sum_j |mean_t sigma_tj - tau|     (batch-wise)
        L_e = mean_t |mean_j sigma_tj - tau|    (example-wise)
        L_v = - sum_j var_t sigma_tj            (variance)
    """
    sigma = as_tensor(sigma)
    if sigma.ndim != 2:
        raise ValueError(f"sparsity_regularisers: sigma must be (n, k), got {sigma.shape}")
    tau = float(tau)
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"sparsity_regularisers: tau={tau!r} is a target fraction of "
                         f"blocks; use 0 < tau <= 1")
    ### BEGIN SOLUTION task2b_3
    L_b = ops.abs(sigma.mean(axis=0) - tau).sum()  # over the k blocks
    L_e = ops.abs(sigma.mean(axis=1) - tau).mean()  # over the n examples
    L_v = -ops.var(sigma, axis=0).sum()
    ### END SOLUTION
    return {"L_b": L_b, "L_e": L_e, "L_v": L_v}


class BlockGatedOutput(NamedTuple):
    """What a :class:`GatedBlocks` computes for a batch."""

    h: Tensor  # (n, k * block) the layer's output, switched-off blocks zero
    logits: Tensor  # (n, k) the policy's scores, sigma = sigm(logits)
    mask: np.ndarray  # (n, k) the blocks used (0/1)


class GatedBlocks(Module):
    """``h = max(0, W x + c)`` in ``k`` blocks of ``block`` units, each block kept for an
    input with probability ``sigma_j = sigm(Z x + d)_j`` (Bengio et al. 2015, §3).

    ``forward(x, mode, u)``: ``mode="sample"`` draws the mask ``1[u < sigma]`` (``u``
    uniforms (n, k), or ``rng``), ``"all"`` keeps every block (the dense layer),
    ``"threshold"`` keeps the blocks with ``sigma > 1/2``. The mask is a constant of the
    graph: the policy learns through :func:`reinforce_surrogate` and the regularisers.
    Here every block is computed and then masked; a real implementation skips the
    switched-off blocks' rows of ``W``, and the fraction of blocks kept is the fraction of
    the layer's multiply-adds it needs.
    """

    MODES = ("sample", "all", "threshold")

    def __init__(self, in_features: int, n_blocks: int, block: int, *,
                 rng: np.random.Generator | None = None, dtype: Any = np.float64) -> None:
        super().__init__()
        where = "GatedBlocks"
        self.in_features = validate.positive_int(in_features, "in_features", where)
        self.n_blocks = validate.positive_int(n_blocks, "n_blocks", where)
        self.block = validate.positive_int(block, "block", where)
        rng = as_rng(rng)
        self.linear = Linear(in_features, n_blocks * block, dtype=dtype, rng=rng)
        self.policy = Linear(in_features, n_blocks, dtype=dtype, rng=rng)
        self.policy.bias.data[...] = 2.0  # start with every block on (sigma ~ 0.88)

    def forward(self, x: Any, mode: str = "sample", u: Any = None,
                rng: np.random.Generator | None = None) -> BlockGatedOutput:
        x = as_tensor(x)
        validate.tokens(x, self.in_features, "GatedBlocks")
        if mode not in self.MODES:
            raise ValueError(f"GatedBlocks: mode={mode!r}; choose one of {self.MODES}")
        n, k = x.shape[0], self.n_blocks
        logits = self.policy(x.detach())  # (n, k) the policy learns only by REINFORCE
        sigma = 1.0 / (1.0 + np.exp(-logits.data))  # (n, k)
        if mode == "all":
            mask = np.ones((n, k))
        elif mode == "threshold":
            mask = (sigma > 0.5).astype(np.float64)
        else:
            if u is None:
                u = as_rng(rng).random((n, k))
            mask = (_check_uniforms("GatedBlocks", u, (n, k)) < sigma).astype(np.float64)
        h = ops.relu(self.linear(x)).reshape((n, k, self.block))  # (n, k, block)
        h = (h * mask[:, :, None]).reshape((n, k * self.block))  # (n, k * block)
        return BlockGatedOutput(h, logits, mask)


class BlockGatedNet(Module):
    """Block-gated hidden layers, then a linear classifier: the 2015 paper's network.

    ``forward(x, mode, rng)`` returns ``(class logits (n, C), [BlockGatedOutput per layer])``.
    """

    def __init__(self, in_features: int, n_classes: int, n_blocks: int = 8, block: int = 8,
                 n_layers: int = 2, *, rng: np.random.Generator | None = None,
                 dtype: Any = np.float64) -> None:
        super().__init__()
        rng = as_rng(rng)
        n_layers = validate.positive_int(n_layers, "n_layers", "BlockGatedNet")
        width = validate.positive_int(n_blocks, "n_blocks", "BlockGatedNet") * \
            validate.positive_int(block, "block", "BlockGatedNet")
        sizes = [in_features] + [width] * n_layers
        self.layers = ModuleList([GatedBlocks(sizes[i], n_blocks, block, rng=rng,
                                                  dtype=dtype) for i in range(n_layers)])
        self.classifier = Linear(width, n_classes, dtype=dtype, rng=rng)

    def forward(self, x: Any, mode: str = "sample", rng: np.random.Generator | None = None
                ) -> tuple[Tensor, list[BlockGatedOutput]]:
        rng = as_rng(rng) if mode == "sample" else None
        h, outs = as_tensor(x), []
        for layer in self.layers:
            out = layer(h, mode=mode, rng=rng)
            outs.append(out)
            h = out.h
        return self.classifier(h), outs

    def policy_parameters(self) -> list[Tensor]:
        """The policies' weights ``Z, d`` of every layer."""
        return [p for layer in self.layers for p in layer.policy.parameters()]


def block_fraction(outs: Sequence[BlockGatedOutput]) -> float:
    """The fraction of the hidden layers' blocks that were used, over a batch."""
    return float(np.mean([o.mask.mean() for o in outs]))
