"""``tinymoe gradcheck``: gradient-check every op, layer, gate and loss, and print a table.

Each entry of :data:`CHECKS` builds ``(fn, inputs)`` -- or ``(fn, inputs, options)``, the
options going to ``tm.gradcheck`` (``names``, ``max_elements``, ...) -- in float64 from a
seeded generator; the command runs ``tm.gradcheck`` on each and reports the largest error.
Entries register themselves with :func:`register` under a name that starts with their
stage, so the table reads in the order of the course: "op", "loss", "nn", "1991", "1994",
"2013", "2015", "2017", "dispatch" (lesson 05, the layers' token shuffling), "2020", "2021".

Routing is piecewise constant: a top-k choice or an argmax flips when a perturbation of
``eps`` crosses a tie, and the gradient there is not defined. The MoE entries therefore fix
every random draw (the gate noise, the jitter, the random-routing uniforms) and redraw their
weights until the logits that decide a choice are at least ``MARGIN`` apart; capacity
entries give every expert room for every token unless dropping is the point.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Any, Callable, TypeVar

import numpy as np

import tinymoe as tm
import tinymoe.functional as F
from tinymoe import moe
from tinymoe.dispatch import combine, dispatch, route
from tinymoe.gradcheck import GradcheckReport
from tinymoe.models.transformer import Transformer, TransformerConfig
from tinymoe.moe.noisy_topk import NOISE_EPSILON

Builder = Callable[[np.random.Generator], tuple[Any, ...]]
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


@register("op linear (a @ b + bias, fused)")
def _linear(rng):
    return F.linear, [leaf(rng.standard_normal((2, 3, 4))), leaf(rng.standard_normal((2, 4, 5))),
                      leaf(rng.standard_normal((2, 1, 5)))]


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


@register("nn RMSNorm")
def _rmsnorm(rng):
    m = tm.nn.RMSNorm(6, dtype=np.float64)
    m.weight.data = 1.0 + 0.3 * rng.standard_normal(6)
    return _module_check(m, rng.standard_normal((3, 6)))


@register("nn SwiGLU")
def _swiglu(rng):
    m = tm.nn.SwiGLU(4, 6, dtype=np.float64, rng=rng)
    return _module_check(m, rng.standard_normal((3, 4)))


# --- helpers for the MoE stages ----------------------------------------------------------------
F64 = np.float64
MARGIN = 0.01  # smallest gap between logits that decide a choice (eps is 1e-6: no flips)
TRIES = 200  # draws before a builder gives up looking for that margin

Draw = TypeVar("Draw")


def top_gap(logits: Any, k: int | None = None) -> float:
    """The smallest gap between neighbours among the ``k + 1`` largest entries of each row
    (all entries with ``k=None``): how far the top-k choices are from changing."""
    s = -np.sort(-np.asarray(logits.data if isinstance(logits, tm.Tensor) else logits), -1)
    s = s[..., : None if k is None else k + 1]
    return float(-np.diff(s, axis=-1).max()) if s.shape[-1] > 1 and s.size else np.inf


def with_margin(draw: Callable[[], Draw], gap: Callable[[Draw], float]) -> Draw:
    """``draw()`` again until ``gap(result) >= MARGIN`` (deterministic: the rng is seeded)."""
    for _ in range(TRIES):
        value = draw()
        if gap(value) >= MARGIN:
            return value
    raise RuntimeError(f"gradcheck: no draw in {TRIES} had routing logits {MARGIN} apart")


def require(ok: bool, what: str) -> None:
    """Fail loudly (not with a wrong gradient) when a fixed routing assumption breaks."""
    if not ok:
        raise RuntimeError(f"gradcheck: {what}")


def total(aux: dict[str, Any]) -> Any:
    """A layer's aux losses summed, as a model adds them to its task loss."""
    return moe.sum_losses(aux.values())


def module_inputs(module: Any, **leaves: tm.Tensor) -> tuple[list[Any], dict[str, Any]]:
    """``leaves`` then every parameter of ``module``, and their names for the report."""
    named = list(module.named_parameters())
    return list(leaves.values()) + [p for _, p in named], \
        {"names": list(leaves) + [n for n, _ in named]}


# --- 1991: adaptive mixtures of local experts ---------------------------------------------------
def _mixture_parts(rng: np.random.Generator, n: int = 5, E: int = 3, D: int = 4):
    """gate logits (n, E) and expert outputs (n, E, D) as leaves, a target (n, D)."""
    return (leaf(rng.standard_normal((n, E))), leaf(rng.standard_normal((n, E, D))),
            rng.standard_normal((n, D)))


def _mixture_loss(name: str, loss: Callable[..., Any]) -> None:
    def build(rng):
        g, o, d = _mixture_parts(rng)
        return (lambda g, o: loss(g, o, d)), [g, o], {"names": ["gate_logits", "outputs"]}
    CHECKS[name] = build


for _name, _loss in [("1991 cooperative_loss (eq. 1)", moe.cooperative_loss),
                     ("1991 competitive_loss (eq. 2)", moe.competitive_loss),
                     ("1991 mixture_nll (eq. 3)", moe.mixture_nll)]:
    _mixture_loss(_name, _loss)


@register("1991 mixture_classification_nll")
def _mixture_classification(rng):
    g, o, _ = _mixture_parts(rng)  # o: each expert's scores over 4 classes
    y = rng.integers(0, 4, 5)
    return ((lambda g, o: moe.mixture_classification_nll(g, o, y)), [g, o],
            {"names": ["gate_logits", "expert_logits"]})


@register("1991 posterior_responsibilities h")
def _posteriors(rng):
    g, o, d = _mixture_parts(rng)
    return ((lambda g, o: moe.posterior_responsibilities(g, o, d)), [g, o],
            {"names": ["gate_logits", "outputs"]})


@register("1991 AdaptiveMixture + mixture_nll")
def _adaptive_mixture(rng):
    model = moe.AdaptiveMixture(3, 2, 3, gate_init="random", rng=rng)  # float64
    x, d = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    inputs, options = module_inputs(model, x=leaf(x))
    return (lambda x, *ps: moe.mixture_nll(*model(x), d)), inputs, options


@register("1991 AdaptiveMixture output sum_i p_i o_i (combine)")
def _adaptive_mixture_output(rng):
    model = moe.AdaptiveMixture(3, 2, 3, gate_init="random", rng=rng)  # float64
    inputs, options = module_inputs(model, x=leaf(rng.standard_normal((6, 3))))
    return (lambda x, *ps: model(x).output), inputs, options


# --- 1994: hierarchical mixtures of experts -----------------------------------------------------
def _hme(expert: str) -> None:
    def build(rng):
        tree = moe.HME(2, 1, 2, 2, expert=expert, rng=rng, gate_scale=1.0)
        X = rng.uniform(-1, 1, (12, 2))
        if expert == "gaussian":
            Y = np.sin(3 * X[:, :1]) + 0.1 * rng.standard_normal((12, 1))
        else:
            Y = (X[:, :1] * X[:, 1:] > 0).astype(F64)  # XOR-like classes
        inputs, options = module_inputs(tree)
        return (lambda *ps: (tree.log_likelihood(X, Y), tree(X))), inputs, options
    CHECKS[f"1994 HME log-likelihood, prediction by combine ({expert})"] = build


for _expert in ("gaussian", "logistic"):
    _hme(_expert)


# --- 2013-2015: deep mixtures and conditional computation --------------------------------------
@register("2013 DeepMoE (two mixture layers) + cross_entropy")
def _deep_moe(rng):
    model = moe.DeepMoE(4, 3, (3, 2), (5, 4), 3, rng=rng)  # float64
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    inputs, options = module_inputs(model, x=leaf(x))
    return (lambda x, *ps: tm.losses.cross_entropy(model(x).logits, y)), inputs, options


@register("2013 mixture_layer (MoELayer, dense gate) with the constraint's mask")
def _mixture_layer_masked(rng):
    layer = moe.mixture_layer(4, 3, 3, 5, rng=rng)
    allowed = np.ones((6, 3), dtype=bool)
    allowed[[0, 3], 2] = False
    inputs, options = module_inputs(layer, x=leaf(rng.standard_normal((6, 4))))
    return (lambda x, *ps: layer(x, allowed=allowed)[0]), inputs, options


@register("2013 stochastic-times-smooth unit (fixed uniforms)")
def _stochastic_times_smooth(rng):
    a = rng.standard_normal((4, 5))
    u = rng.random((4, 5))
    s = np.sqrt(1 / (1 + np.exp(-a)))
    while np.abs(u - s).min() < MARGIN:  # keep every sample away from its threshold
        u = rng.random((4, 5))
    return (lambda a: moe.stochastic_times_smooth(a, u)), [leaf(a)]


@register("2013 REINFORCE surrogate (cost - baseline) log P(b)")
def _reinforce(rng):
    a, b = rng.standard_normal((5, 3)), (rng.random((5, 3)) < 0.5).astype(float)
    cost = rng.random(5)
    return (lambda a: moe.reinforce_surrogate(a, b, cost, 0.4)), [leaf(a)]


@register("2013 exact expected loss over all 2^K gate configurations")
def _expected_over_gates(rng):
    W, t = rng.standard_normal((3, 2)), rng.standard_normal(2)

    def loss(b):
        d = tm.tensor(b) @ W - t
        return (d * d).sum()
    return (lambda p: moe.expected_over_gates(p, loss)), [leaf(rng.uniform(0.1, 0.9, 3))]


def _sparsity(name: str) -> None:
    def build(rng):
        sigma = rng.uniform(0.05, 0.95, (6, 4))
        return (lambda s: moe.sparsity_regularisers(s, 0.3)[name]), [leaf(sigma)]
    CHECKS[f"2015 sparsity regulariser {name}"] = build


for _reg in ("L_b", "L_e", "L_v"):
    _sparsity(_reg)


@register("2015 GatedBlocks (fixed mask)")
def _block_gated(rng):
    layer = moe.GatedBlocks(5, 3, 2, rng=rng)
    x, u = rng.standard_normal((4, 5)), rng.random((4, 3))
    inputs, options = module_inputs(layer.linear, x=leaf(x))
    return (lambda x, *ps: layer(x, mode="sample", u=u).h), inputs, options


# --- 2017: the sparsely-gated MoE ---------------------------------------------------------------
@register("2017 noisy top-k gate (k=2, fixed noise)")
def _noisy_gate(rng):
    T, d, E, k = 6, 3, 5, 2

    def draw():
        x, W_g, W_noise = (rng.standard_normal((T, d)), rng.standard_normal((d, E)),
                           0.5 * rng.standard_normal((d, E)))
        noise = rng.standard_normal((T, E))
        H = x @ W_g + noise * (np.logaddexp(0, x @ W_noise) + NOISE_EPSILON)  # eq. (4)
        return x, W_g, W_noise, noise, H

    x, W_g, W_noise, noise, _ = with_margin(draw, lambda v: top_gap(v[4], k))

    def fn(x, W_g, W_noise):
        r = moe.noisy_top_k_gating(x, W_g, W_noise, k, noise=noise)
        return r.combine_weight, r.probs, r.stats["importance"], r.stats["load"]
    return fn, [leaf(x), leaf(W_g), leaf(W_noise)], {"names": ["x", "W_g", "W_noise"]}


@register("2017 load estimator prob_in_top_k")
def _prob_in_top_k(rng):
    clean = rng.standard_normal((4, 5))
    H = with_margin(lambda: clean + rng.standard_normal((4, 5)), top_gap)
    sigma = 0.5 + rng.random((4, 5))

    def fn(clean, H, sigma):
        top, _ = F.topk(H, 3)  # the top k + 1 = 3 values, as the gate passes them
        return moe.prob_in_top_k(clean, H, sigma, top, 2)
    return fn, [leaf(clean), leaf(H), leaf(sigma)], {"names": ["clean", "H", "sigma"]}


@register("2017 cv_squared")
def _cv_squared(rng):
    return moe.cv_squared, [leaf(rng.random(6) + 0.2)]


@register("2017 importance + load losses")
def _balance(rng):
    G, P = rng.random((8, 4)), rng.random((8, 4))
    return ((lambda G, P: moe.balance_loss(moe.importance(G), moe.load(P), 0.3, 0.7)),
            [leaf(G), leaf(P)], {"names": ["gates", "prob_in_top_k"]})


@register("2017 StackedExperts (grouped matmul)")
def _stacked_experts(rng):
    experts = moe.StackedExperts(4, 3, 5, "gelu", dtype=F64, rng=rng)
    for b in (experts.b1, experts.b2):
        b.data = 0.1 * rng.standard_normal(b.shape)
    offsets = np.array([0, 3, 3, 7, 9])  # expert 1 gets no rows
    inputs, options = module_inputs(experts, rows=leaf(rng.standard_normal((9, 3))))
    return (lambda rows, *ps: experts(rows, offsets)), inputs, options


@register("2020 StackedExperts on capacity buffers (filled slots only)")
def _buffer_experts(rng):
    experts = moe.StackedExperts(3, 3, 5, "relu", dtype=F64, rng=rng)
    for b in (experts.b1, experts.b2):
        b.data = 0.1 * rng.standard_normal(b.shape)
    rows = np.array([2, 0, 4])  # expert 1 has no tokens, expert 2 a full buffer of 4
    inputs, options = module_inputs(experts, buffers=leaf(rng.standard_normal((3, 4, 3))))
    return (lambda buffers, *ps: experts(buffers, rows=rows)), inputs, options


def _noisy_gates(layer: Any) -> list[Any]:
    return [m for m in layer.modules() if isinstance(m, moe.NoisyTopKGate)]


def _randomise_gates(layer: Any, rng: np.random.Generator) -> None:
    for gate in _noisy_gates(layer):  # zero-initialised gates would route by ties
        gate.W_g.data = rng.standard_normal(gate.W_g.shape)
        gate.W_noise.data = 0.3 * rng.standard_normal(gate.W_noise.shape)


def _layer_gap(layer: Any) -> float:
    """The smallest top-k gap of the noisy logits of every gate used in the last forward
    (a hierarchical gate's primary and group gates, which its routing keeps in ``stats``)."""
    r = layer.last_routing
    gates = [r.stats["primary"], *r.stats["groups"]] if "primary" in r.stats else [r]
    return min(top_gap(g.logits, g.k) for g in gates if g.num_tokens)


def _noisy_layer_check(rng, build, T: int, d: int, E: int):
    """A 2017 layer from ``build()`` with randomised gates, checked at fixed noise (T, E)."""
    def draw():
        layer = build()
        _randomise_gates(layer, rng)
        x, noise = rng.standard_normal((T, d)), rng.standard_normal((T, E))
        layer(tm.tensor(x), noise=noise)
        return layer, x, noise

    layer, x, noise = with_margin(draw, lambda v: _layer_gap(v[0]))
    inputs, options = module_inputs(layer, x=leaf(x))

    def fn(x, *ps):
        y, aux = layer(x, noise=noise)
        return y, total(aux)
    return fn, inputs, options


@register("2017 MoELayer + NoisyTopKGate (k=2, dropless, fixed noise)")
def _moe_layer(rng):
    T, d, E = 7, 4, 5
    return _noisy_layer_check(rng, lambda: moe.sparse_moe_layer(
        d, E, 2, d_ff=6, w_importance=0.5, w_load=0.5, rng=rng, dtype=F64), T, d, E)


@register("2017 MoELayer, ExpertList of any Modules (k=2, residual)")
def _moe_layer_modules(rng):
    """The one layer with a list of arbitrary expert Modules (a FeedForward, a Linear, a
    LayerNorm) and the residual connection."""
    T, d, E = 6, 4, 3

    def build():
        experts = [tm.nn.FeedForward(d, 5, "gelu", dtype=F64, rng=rng),
                   tm.nn.Linear(d, d, dtype=F64, rng=rng), tm.nn.LayerNorm(d, dtype=F64)]
        gate = moe.NoisyTopKGate(d, E, 2, w_importance=0.5, w_load=0.5, rng=rng, dtype=F64)
        return moe.MoELayer(gate, experts, residual=True)
    return _noisy_layer_check(rng, build, T, d, E)


@register("2017 hierarchical MoE (3 x 3 experts)")
def _hierarchical_moe(rng):
    def draw():
        layer = moe.hierarchical_moe(3, 3, 3, 2, d_ff=4, w_importance=0.5, w_load=0.5,
                                     rng=rng, dtype=F64)
        _randomise_gates(layer, rng)
        seeds = rng.integers(0, 2**31, len(_noisy_gates(layer)))

        def fn(x, *ps):
            for gate, seed in zip(_noisy_gates(layer), seeds):
                gate.rng = np.random.default_rng(seed)  # the inner gates draw their noise
            y, aux = layer(x)
            return y, total(aux)  # the balancing loss of eqs. (13)-(14)
        x = rng.standard_normal((6, 3))
        fn(tm.tensor(x))
        return layer, x, fn

    layer, x, fn = with_margin(draw, lambda v: _layer_gap(v[0]))
    inputs, options = module_inputs(layer, x=leaf(x))
    return fn, inputs, {**options, "max_elements": 40}


# --- token dispatch (lesson 05): the autograd Functions on the active backend -----------------
def _dispatch_check(capacity: int | None):
    def build(rng):
        T, E, k, d = 7, 3, 2, 4
        e = np.stack([rng.permutation(E)[:k] for _ in range(T)])  # (T, k) distinct experts
        r = route(e, None, E, capacity)  # positions from the active backend
        require(capacity is None or bool(r.dropped_choices.any()),
                "expected some dropped choices")
        rows = (E, capacity, d) if capacity else (int(r.counts.sum()), d)
        x, out, w = (leaf(rng.standard_normal((T, d))), leaf(rng.standard_normal(rows)),
                     leaf(rng.random((T, k))))
        return ((lambda x, out, w: (dispatch(x, r), combine(out, replace(r, combine_weight=w)))),
                [x, out, w], {"names": ["x", "expert_out", "combine_weight"]})
    return build


CHECKS["dispatch + combine, capacity mode (drops)"] = _dispatch_check(3)
CHECKS["dispatch + combine, sorted mode (dropless)"] = _dispatch_check(None)


# --- 2020-2021: GShard's top-2 and the Switch router, with capacity -----------------------------
@register("2020 Top2Gate (eval, capacity for all)")
def _top2_gate(rng):
    def draw():
        gate = moe.Top2Gate(5, 4, capacity_factor=2.0, router_dtype="float64", rng=rng).eval()
        gate.W_g.data = rng.standard_normal((5, 4))
        return gate, rng.standard_normal((10, 5))

    gate, x = with_margin(draw, lambda v: top_gap(v[1] @ v[0].W_g.data, 2))

    def fn(x, W):
        r = gate(x)  # eval: no random routing, every second choice is active
        require(bool(r.kept.all()), "Top2Gate dropped a choice")
        return r.combine_weight, r.stats["balance_loss"], r.stats["z_loss"]
    return fn, [leaf(x), gate.W_g], {"names": ["x", "W_g"]}


@register("2020 Top2Gate (train, random routing, drops)")
def _top2_gate_train(rng):
    """Random routing with fixed uniforms, a capacity that drops choices and renormalising
    after dropping: the routing is still constant near the point, so gradients exist."""
    T, d, E = 12, 5, 4

    def draw():
        gate = moe.Top2Gate(d, E, capacity_factor=0.75, normalize="after",
                            router_dtype="float64", rng=rng)
        gate.W_g.data = rng.standard_normal((d, E))
        x, u = rng.standard_normal((T, d)), rng.random(T)
        return gate, x, u

    def dropped_and_inactive(r):
        """Some active choice found its expert full, and some second choice was inactive."""
        active = r.stats["active"]
        return bool((active & r.dropped_choices).any()) and not active[:, 1].all()

    def gap(v):
        gate, x, u = v
        r = gate(tm.tensor(x), uniform=u)
        if not dropped_and_inactive(r):
            return -np.inf  # draw again: this check is about drops and inactive choices
        logits = x @ gate.W_g.data
        p = np.exp(logits - logits.max(1, keepdims=True))
        g = -np.sort(-p, axis=1)[:, :2]
        g2 = g[:, 1] / g.sum(1)  # the normalised second gate that random routing tests
        return min(top_gap(logits, 2), float(np.abs(2 * g2 - u).min()))

    gate, x, u = with_margin(draw, gap)

    def fn(x, W):
        r = gate(x, uniform=u)
        require(dropped_and_inactive(r), "expected dropped and inactive second choices")
        return r.combine_weight, r.stats["balance_loss"], r.stats["z_loss"]
    return fn, [leaf(x), gate.W_g], {"names": ["x", "W_g"]}


def _capacity_layer(gate: str, rng: np.random.Generator):
    """A float64 Switch or GShard layer (the one MoELayer with a SwitchRouter or a Top2Gate)
    with room for every choice, its input and fixed noise; both train the balancing loss and
    the z-loss (c_z = 1e-3)."""
    T, d, E = 8, 6, 3

    def draw():
        build = moe.switch_layer if gate == "switch" else moe.gshard_layer
        layer = build(d, E, 5, capacity_factor=3.0, router_dtype="float64", z_loss_coef=1e-3,
                      dtype=F64, rng=rng)
        W = layer.router.W_r if gate == "switch" else layer.router.W_g
        W.data = rng.standard_normal((d, E))
        for b in (layer.experts.b1, layer.experts.b2):
            b.data = 0.1 * rng.standard_normal(b.shape)
        x = rng.standard_normal((T, d))
        fixed = {"jitter_noise": rng.uniform(0.99, 1.01, (T, d))} if gate == "switch" else {}
        if gate == "top2":
            layer.eval()  # no random routing: every second choice is kept
        layer(tm.tensor(x), **fixed)
        return layer, x, fixed

    layer, x, fixed = with_margin(
        draw, lambda v: top_gap(v[0].last_routing.logits, v[0].k))

    def fn(x, *ps):
        y, aux = layer(x, **fixed)
        require(not layer.last_routing.dropped_choices.any(), "a choice was dropped")
        require(set(aux) == {"balance", "z"}, f"expected the balance and z losses, got {aux}")
        return y, total(aux)
    inputs, options = module_inputs(layer, x=leaf(x))
    return fn, inputs, options


@register("2020 gshard_layer: MoELayer + Top2Gate (eval)")
def _capacity_layer_top2(rng):
    return _capacity_layer("top2", rng)


@register("2021 router_probabilities (fixed jitter)")
def _router_probabilities(rng):
    """The router body every learned router shares: logits and softmax of the jittered input."""
    from tinymoe.moe.router_weight import router_probabilities

    W_r = leaf(rng.standard_normal((5, 4)))
    x, noise = rng.standard_normal((6, 5)), rng.uniform(0.99, 1.01, (6, 5))
    return ((lambda x, W: router_probabilities(x, W, "float64", noise)), [leaf(x), W_r],
            {"names": ["x", "W_r"]})


@register("2021 SwitchRouter (capacity for all)")
def _switch_router(rng):
    def draw():
        router = moe.SwitchRouter(5, 4, capacity_factor=4.0, router_dtype="float64", rng=rng)
        router.W_r.data = rng.standard_normal((5, 4))
        x, noise = rng.standard_normal((9, 5)), rng.uniform(0.99, 1.01, (9, 5))
        return router, x, noise

    router, x, noise = with_margin(draw, lambda v: top_gap((v[1] * v[2]) @ v[0].W_r.data, 1))

    def fn(x, W):
        r = router(x, jitter_noise=noise)
        require(not r.dropped_tokens.any(), "SwitchRouter dropped a token")
        return r.combine_weight, r.stats["balance_loss"], r.stats["z_loss"]
    return fn, [leaf(x), router.W_r], {"names": ["x", "W_r"]}


@register("2021 load_balancing_loss")
def _load_balancing(rng):
    logits = rng.standard_normal((13, 5))
    first = np.argmax(logits, axis=1)  # f_i counts these: a constant
    return ((lambda z: moe.load_balancing_loss(F.softmax(z, -1), first)), [leaf(logits)],
            {"names": ["router_logits"]})


@register("2021 router_z_loss")
def _router_z_loss(rng):
    return moe.router_z_loss, [leaf(3 * rng.standard_normal((6, 5)))], \
        {"names": ["router_logits"]}


@register("2021 switch_layer: MoELayer + SwitchRouter")
def _capacity_layer_switch(rng):
    return _capacity_layer("switch", rng)


@register("2021 Switch Transformer LM loss")
def _switch_lm(rng):
    cfg = TransformerConfig(vocab_size=11, block_size=6, d_model=8, n_layers=2, n_heads=2,
                            d_ff=12, num_experts=3, capacity_factor=3.0,
                            router_dtype="float64", jitter=0.0, dtype="float64")

    def draw():
        model = Transformer(cfg, rng=rng)
        for layer in model.moe_layers:  # larger router weights: clearer argmax margins
            layer.router.W_r.data = rng.standard_normal(layer.router.W_r.shape)
        ids = rng.integers(0, cfg.vocab_size, (2, cfg.block_size + 1))
        model.loss(ids[:, :-1], ids[:, 1:])
        return model, ids

    model, ids = with_margin(draw, lambda v: min(top_gap(m.last_routing.logits, 1)
                                                 for m in v[0].moe_layers))
    moe_block = cfg.moe_layer_ids[0]
    wanted = ["tok.weight", f"blocks.{moe_block}.ffn.router.W_r",
              f"blocks.{moe_block}.ffn.experts.W1"]
    params = dict(model.named_parameters())

    def fn(*ps):
        total, _ = model.loss(ids[:, :-1], ids[:, 1:])
        require(not any(m.last_routing.dropped_tokens.any() for m in model.moe_layers),
                "a token was dropped")
        return total
    # W1 (3, 8, 12) has 288 entries: checked along random directions
    return fn, [params[n] for n in wanted], {"names": wanted, "max_elements": 100}


@register("2024 TopKRouter (Mixtral top-2, renormalised)")
def _topk_router(rng):
    def draw():
        router = moe.TopKRouter(5, 4, 2, aux_loss_coef=0.1, z_loss_coef=0.01,
                                router_dtype="float64", rng=rng)
        router.W_g.data = rng.standard_normal((5, 4))
        return router, rng.standard_normal((7, 5))

    router, x = with_margin(draw, lambda v: top_gap(v[1] @ v[0].W_g.data, 2))

    def fn(x, W):
        r = router(x)
        require(set(r.aux_losses) == {"balance", "z"}, "expected the balance and z losses")
        return r.combine_weight, r.total_aux_loss()
    return fn, [leaf(x), router.W_g], {"names": ["x", "W_g"]}


def _router_layer(router: Any, gap: Callable[[Any], float], rng: np.random.Generator,
                  num_shared: int = 0) -> tuple[Callable[..., Any], list[Any], dict[str, Any]]:
    """A float64 MoELayer around ``router`` (``moe_layer``), its input and every trainable
    weight."""
    def draw():
        router.W_g.data = rng.standard_normal(router.W_g.shape)
        layer = moe.moe_layer(router, 5, num_shared=num_shared, dtype=F64, rng=rng)
        for b in (layer.experts.b1, layer.experts.b2):
            b.data = 0.1 * rng.standard_normal(b.shape)
        return layer.eval(), rng.standard_normal((8, router.d_model))

    layer, x = with_margin(draw, lambda v: gap(v[1] @ v[0].router.W_g.data))
    named = [(n, p) for n, p in layer.named_parameters() if n != "router.bias"]

    def fn(x, *ps):
        y, aux = layer(x)
        return (y, total(aux)) if aux else y
    return fn, [leaf(x)] + [p for _, p in named], {"names": ["x"] + [n for n, _ in named],
                                                   "max_elements": 100}


@register("2024 MoELayer + TopKRouter (top-2 + 1 shared expert)")
def _routed_topk(rng):
    router = moe.TopKRouter(4, 3, 2, normalize=False, router_dtype="float64", rng=rng)
    return _router_layer(router, lambda z: top_gap(z, 2), rng, num_shared=1)


@register("2024 SwiGLUExperts (grouped matmul)")
def _swiglu_experts(rng):
    experts = moe.SwiGLUExperts(4, 3, 5, dtype=F64, rng=rng)
    offsets = np.array([0, 3, 3, 7, 9])  # expert 1 gets no rows
    inputs, options = module_inputs(experts, rows=leaf(rng.standard_normal((9, 3))))
    return (lambda rows, *ps: experts(rows, offsets)), inputs, options


@register("2024 mixtral_layer: TopKRouter + SwiGLU experts")
def _mixtral_layer(rng):
    def draw():
        layer = moe.mixtral_layer(4, 4, 6, 2, aux_loss_coef=0.1, router_dtype="float64",
                                  dtype=F64, rng=rng)
        layer.router.W_g.data = rng.standard_normal((4, 4))
        return layer, rng.standard_normal((8, 4))

    layer, x = with_margin(draw, lambda v: top_gap(v[1] @ v[0].router.W_g.data, 2))
    inputs, options = module_inputs(layer, x=leaf(x))

    def fn(x, *ps):
        y, aux = layer(x)
        return y, total(aux)
    return fn, inputs, {**options, "max_elements": 100}


@register("2022 ExpertChoiceRouter + MoELayer")
def _expert_choice(rng):
    router = moe.ExpertChoiceRouter(4, 3, capacity_factor=1.5, router_dtype="float64",
                                    rng=rng)
    C = 4  # ceil(8 tokens · 1.5 / 3 experts): each expert's top 4 of 8 must be clear

    def gap(z):
        p = np.exp(z - z.max(axis=1, keepdims=True))
        return top_gap((p / p.sum(axis=1, keepdims=True)).T, C)  # (E, T): top-C per expert
    return _router_layer(router, gap, rng)


@register("2024 AuxFreeRouter + MoELayer (sigmoid, bias)")
def _aux_free(rng):
    router = moe.AuxFreeRouter(4, 4, 2, seq_aux_loss_coef=0.1, route_scale=2.5,
                               router_dtype="float64", rng=rng)
    router.bias.data = 0.3 * rng.standard_normal(4)
    bias = router.bias.data

    def gap(z):
        return top_gap(1.0 / (1.0 + np.exp(-z)) + bias, 2)  # the selection uses s + b
    return _router_layer(router, gap, rng)


@register("parallel all_to_all (D = 3)")
def _all_to_all(rng):
    from tinymoe.parallel import all_to_all

    chunks = [leaf(rng.standard_normal((3, 2, 4))) for _ in range(3)]  # (D_dst, C, d) each

    def fn(*cs):
        return tuple(all_to_all(list(cs)))
    return fn, chunks, {"names": [f"device {r}" for r in range(3)]}


# --- running them --------------------------------------------------------------------------------
def run_check(name: str, seed: int = 0) -> GradcheckReport:
    """Build check ``name`` from ``seed`` and run ``tm.gradcheck`` on it (never raises on a
    mismatch: the report is falsy)."""
    built = CHECKS[name](np.random.default_rng(seed))
    fn, inputs = built[0], built[1]
    options = built[2] if len(built) > 2 else {}
    return tm.gradcheck(fn, inputs, raise_exception=False, **options)


def run_checks(names: list[str] | None = None, seed: int = 0) -> list[tuple[str, Any, float]]:
    """Run the named checks (all by default): ``[(name, report, seconds)]``."""
    results = []
    for name in names or list(CHECKS):
        start = time.perf_counter()
        report = run_check(name, seed)
        results.append((name, report, time.perf_counter() - start))
    return results


def select(only: str | None = None) -> list[str]:
    """The registered names containing ``only`` (case-insensitive), in table order."""
    return [n for n in CHECKS if only is None or only.lower() in n.lower()]


def main_gradcheck(verbose: bool = False, only: str | None = None, list_only: bool = False,
                   raise_errors: bool = False) -> int:
    """Print one line per check; 0 if all pass, 1 if any fails or errors, 2 if none match.

    ``only``: run the checks whose name contains this text. ``list_only``: print the names
    and run nothing. An exception in a check (an unfinished exercise raises
    NotImplementedError) is reported on its line, or re-raised with ``raise_errors``.
    """
    names = select(only)
    if not names:
        print(f"tinymoe gradcheck: no check name contains {only!r}; --list shows them",
              file=sys.stderr)
        return 2
    if list_only:
        print("\n".join(names))
        return 0
    width = max(len(n) for n in names)
    print(f"{'check':<{width}} {'inputs':>6} {'checks':>7} {'max |error|':>12} {'s':>6}  result")
    failed, start = [], time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        try:
            report = run_check(name)
        except Exception as exc:  # reported on its line; the other checks still run
            if raise_errors:
                raise
            failed.append(name)
            first = (str(exc).strip().splitlines() or [""])[0]
            print(f"{name:<{width}} {'':>6} {'':>7} {'':>12} {time.perf_counter() - t0:>6.2f}"
                  f"  ERROR {type(exc).__name__}: {first}", flush=True)
            continue
        worst = max(r.max_abs_error for r in report.inputs)
        checks = sum(r.checks for r in report.inputs)
        print(f"{name:<{width}} {len(report.inputs):>6} {checks:>7} {worst:>12.2e} "
              f"{time.perf_counter() - t0:>6.2f}  {'ok' if report else 'FAILED'}", flush=True)
        if verbose or not report:
            print(str(report))
        if not report:
            failed.append(name)
    print(f"\n{len(names) - len(failed)} of {len(names)} gradient checks passed in "
          f"{time.perf_counter() - start:.1f} s")
    return 1 if failed else 0
