"""The 1991 adaptive mixture: the three error functions, the classification form, the
posterior responsibilities, the gate's dense routing and the blend through combine, the
model, bad input, and the vowel reproduction script."""
import numpy as np
import pytest

import tinymoe as tm
from tinymoe.dispatch import Routing, combine, dispatch
from tinymoe.moe import (
    AdaptiveMixture,
    LinearExpert,
    competitive_loss,
    cooperative_loss,
    mixture_classification_nll,
    mixture_nll,
    posterior_responsibilities,
)
from tinymoe.moe.mixture import blend, softmax_routing

N, E, D = 5, 3, 4


def _parts(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    gate_logits = tm.tensor(rng.standard_normal((N, E)), requires_grad=True)
    outputs = tm.tensor(scale * rng.standard_normal((N, E, D)), requires_grad=True)
    target = rng.standard_normal((N, D))
    return gate_logits, outputs, target


def _naive(gate_logits, outputs, target):
    """The three errors of the paper written out in NumPy, per case."""
    x = gate_logits - gate_logits.max(axis=1, keepdims=True)
    p = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)  # (n, E)
    sq = ((target[:, None, :] - outputs) ** 2).sum(-1)  # (n, E)
    blend = (p[:, :, None] * outputs).sum(1)  # (n, D)
    coop = ((target - blend) ** 2).sum(-1)
    comp = (p * sq).sum(-1)
    nll = -np.log((p * np.exp(-0.5 * sq)).sum(-1))
    h = p * np.exp(-0.5 * sq) / (p * np.exp(-0.5 * sq)).sum(-1, keepdims=True)
    return coop, comp, nll, p, h


# --- the values are the paper's equations ------------------------------------------------------
@pytest.mark.task1_1
def test_losses_match_the_equations():
    g, o, d = _parts()
    coop, comp, nll, _, _ = _naive(g.data, o.data, d)
    np.testing.assert_allclose(cooperative_loss(g, o, d, reduction="none").data, coop)
    np.testing.assert_allclose(competitive_loss(g, o, d, reduction="none").data, comp)
    np.testing.assert_allclose(mixture_nll(g, o, d, reduction="none").data, nll)
    np.testing.assert_allclose(mixture_nll(g, o, d).item(), nll.mean())
    np.testing.assert_allclose(mixture_nll(g, o, d, reduction="sum").item(), nll.sum())


@pytest.mark.task1_1
def test_mixture_nll_is_finite_when_every_expert_is_far_off():
    """exp(-1/2 ||d - o||^2) underflows to 0 for errors ~40; logsumexp does not."""
    g, o, d = _parts(scale=1.0)
    far = tm.tensor(o.data + 40.0, requires_grad=True)
    value = mixture_nll(g, far, d, reduction="none").data
    assert np.isfinite(value).all() and (value > 1000).all()
    with np.errstate(divide="ignore", invalid="ignore"):
        _, _, naive, _, _ = _naive(g.data, far.data, d)
    assert np.isinf(naive).all()  # the textbook formula gives -log 0


@pytest.mark.task1_2
def test_posteriors_sum_to_one_and_match_bayes():
    g, o, d = _parts(1)
    h = posterior_responsibilities(g, o, d).data
    np.testing.assert_allclose(h.sum(axis=1), 1.0)
    np.testing.assert_allclose(h, _naive(g.data, o.data, d)[4])
    far = posterior_responsibilities(g, tm.tensor(o.data + 40.0), d).data
    assert np.isfinite(far).all()
    np.testing.assert_allclose(far.sum(axis=1), 1.0)


@pytest.mark.task1_1
@pytest.mark.task1_2
def test_categorical_posteriors():
    rng = np.random.default_rng(2)
    g, logits = rng.standard_normal((N, E)), rng.standard_normal((N, E, D))
    y = rng.integers(0, D, N)
    h = posterior_responsibilities(g, logits, y, likelihood="categorical").data
    P = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    p = np.exp(g) / np.exp(g).sum(-1, keepdims=True)
    joint = p * P[np.arange(N), :, y]  # (n, E) p_i P_i(y|x)
    np.testing.assert_allclose(h, joint / joint.sum(1, keepdims=True))
    np.testing.assert_allclose(mixture_classification_nll(g, logits, y, reduction="none").data,
                               -np.log(joint.sum(1)))


# --- gradients -----------------------------------------------------------------------------
@pytest.mark.parametrize("loss", [cooperative_loss, competitive_loss,
                                  pytest.param(mixture_nll, marks=pytest.mark.task1_1)])
def test_gradcheck_losses(loss):
    g, o, d = _parts(3)
    tm.gradcheck(lambda a, b: loss(a, b, d), [g, o], names=["gate_logits", "expert_outputs"])


@pytest.mark.task1_1
@pytest.mark.task1_2
def test_gradcheck_classification_and_posteriors():
    g, o, d = _parts(4)
    y = np.array([0, 3, 1, 2, 3])
    tm.gradcheck(lambda a, b: mixture_classification_nll(a, b, y), [g, o])
    tm.gradcheck(lambda a, b: posterior_responsibilities(a, b, d), [g, o])
    tm.gradcheck(lambda a, b: posterior_responsibilities(a, b, y, likelihood="categorical"),
                 [g, o])


@pytest.mark.task1_1
@pytest.mark.task1_2
def test_gradients_are_eqs_4_and_5():
    """eq. (3): dE/do_i = -h_i (d - o_i), dE/dx_j = p_j - h_j; eq. (2): -2 p_i (d - o_i)."""
    g, o, d = _parts(5)
    mixture_nll(g, o, d, reduction="sum").backward()
    h = posterior_responsibilities(g, o, d).data
    p = tm.functional.softmax(g).data
    np.testing.assert_allclose(g.grad, p - h, atol=1e-12)
    np.testing.assert_allclose(o.grad, -h[:, :, None] * (d[:, None, :] - o.data), atol=1e-12)
    o.grad = None
    competitive_loss(g, o, d, reduction="sum").backward()
    np.testing.assert_allclose(o.grad, -2 * p[:, :, None] * (d[:, None, :] - o.data))


@pytest.mark.task1_1
def test_gradcheck_model_parameters():
    rng = np.random.default_rng(6)
    model = AdaptiveMixture(2, 4, 3, activation="softmax", gate_init="random", rng=0)
    X, T = rng.standard_normal((6, 2)), np.eye(4)[rng.integers(0, 4, 6)]
    names = [n for n, _ in model.named_parameters()]
    tm.gradcheck(lambda *ps: mixture_nll(*model(X), T), list(model.parameters()), names=names)


# --- the model -----------------------------------------------------------------------------
def test_model_shapes_and_unbiased_gate():
    model = AdaptiveMixture(2, 4, 8, activation="softmax", rng=0)
    assert model.num_parameters() == 8 * (2 * 4 + 4) + (2 * 8 + 8)
    X = np.random.default_rng(0).standard_normal((7, 2))
    out = model(X)
    assert out.gate_logits.shape == (7, 8) and out.expert_outputs.shape == (7, 8, 4)
    np.testing.assert_allclose(model.gate_probs(X), 1 / 8)  # the gate starts unbiased
    np.testing.assert_allclose(out.expert_outputs.data.sum(-1), 1.0)  # class distributions
    np.testing.assert_allclose(model.predict(X), out.output.data)


@pytest.mark.task1_1
def test_any_module_can_be_an_expert():
    experts = [tm.nn.FeedForward(2, 5, rng=i, dtype=np.float64) for i in range(2)]
    model = AdaptiveMixture(2, 2, experts=experts, rng=0)
    out = model(np.ones((4, 2)))
    assert out.expert_outputs.shape == (4, 2, 2)
    mixture_nll(*out, np.zeros((4, 2))).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="experts were given"):
        AdaptiveMixture(2, 2, 3, experts=experts)


def test_decision_line_is_where_two_classes_tie():
    ex = LinearExpert(2, 4, "softmax", rng=0)
    w, b = ex.decision_line(0, 2)
    x = np.array([1.0, 0.0])
    x = x - (w @ x + b) / (w @ w) * w  # project onto the line
    with tm.no_grad():
        o = ex(x[None]).data[0]
    assert o[0] == pytest.approx(o[2])


# --- the gate's routing and the blend ---------------------------------------------------------
def test_the_gate_is_a_dense_routing_whose_weights_sum_to_one():
    """Every case goes to all E experts, in order, weighted by p = softmax(x)."""
    g, _, _ = _parts(7)
    r = softmax_routing(g)
    assert isinstance(r, Routing) and r.capacity is None and r.num_experts == E
    np.testing.assert_array_equal(r.expert_index, np.tile(np.arange(E), (N, 1)))  # (n, E)
    np.testing.assert_allclose(r.combine_weight.data.sum(axis=1), 1.0)
    np.testing.assert_allclose(r.combine_weight.data, _naive(g.data, *_parts(7)[1:])[3])
    assert r.probs is r.combine_weight and r.logits is g
    np.testing.assert_array_equal(r.position, np.tile(np.arange(N)[:, None], (1, E)))
    np.testing.assert_array_equal(r.counts, N)  # every expert keeps every case
    np.testing.assert_array_equal(r.offsets, np.arange(E + 1) * N)
    assert r.dropped_fraction == 0.0


def test_the_models_gate_returns_the_routing_of_its_logits():
    model = AdaptiveMixture(2, 4, 3, activation="softmax", gate_init="random", rng=0)
    X = np.random.default_rng(1).standard_normal((6, 2))
    r, out = model.route(X), model(X)
    assert isinstance(r, Routing) and isinstance(out.routing, Routing)
    np.testing.assert_allclose(r.combine_weight.data.sum(axis=1), 1.0)
    np.testing.assert_array_equal(r.logits.data, out.gate_logits.data)
    np.testing.assert_array_equal(r.probs.data, out.gate_probs.data)
    np.testing.assert_array_equal(model.gate_probs(X), r.probs.data)


def test_the_output_is_the_direct_blend_and_its_gradient():
    """combine(expert outputs, routing) is sum_i p_i o_i, values and gradients."""
    g, o, _ = _parts(8)
    p = tm.functional.softmax(g)
    direct = (tm.functional.unsqueeze(p, -1) * o).sum(axis=1)  # (n, D)
    via = blend(o, softmax_routing(g))
    np.testing.assert_allclose(via.data, direct.data, rtol=1e-13, atol=1e-15)
    w = np.random.default_rng(8).standard_normal((N, D))
    (via * w).sum().backward()
    grads = g.grad.copy(), o.grad.copy()
    g.grad = o.grad = None
    (direct * w).sum().backward()
    np.testing.assert_allclose(grads[0], g.grad, atol=1e-13)
    np.testing.assert_allclose(grads[1], o.grad, atol=1e-13)
    model = AdaptiveMixture(2, 4, 3, activation="softmax", gate_init="random", rng=0)
    X = np.random.default_rng(2).standard_normal((6, 2))
    out = model(X)
    expected = (out.gate_probs.data[:, :, None] * out.expert_outputs.data).sum(axis=1)
    np.testing.assert_allclose(out.output.data, expected, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(model.predict(X), expected, rtol=1e-13, atol=1e-15)


def test_dispatch_of_a_dense_routing_gives_every_expert_every_case():
    """dispatch hands expert e the rows offsets[e]:offsets[e+1], all n cases in order, so
    running the experts on those rows gives o_i, and combine blends them back."""
    model = AdaptiveMixture(2, 4, 3, activation="softmax", gate_init="random", rng=0)
    X = np.random.default_rng(3).standard_normal((6, 2))
    r = model.route(X)
    rows = dispatch(tm.tensor(X), r)  # (E*n, d)
    off = r.offsets
    for e in range(3):
        np.testing.assert_array_equal(rows.data[off[e]:off[e + 1]], X)
    outs = tm.functional.concatenate([expert(rows[off[e]:off[e + 1]])
                                      for e, expert in enumerate(model.experts)])  # (E*n, D)
    parts = model(X)
    per_expert = outs.data.reshape(3, 6, 4)  # (E, n, D)
    np.testing.assert_allclose(per_expert.transpose(1, 0, 2), parts.expert_outputs.data)
    np.testing.assert_allclose(combine(outs, r).data, parts.output.data, rtol=1e-13)


def test_blend_needs_the_dense_routing_of_those_cases():
    g, o, _ = _parts(9)
    with pytest.raises(ValueError, match="need the dense routing of those n = 3 cases"):
        blend(o[:3], softmax_routing(g))
    with pytest.raises(ValueError, match="need the dense routing"):
        blend(o, tm.dispatch.route(np.zeros((N, 1), np.int64), g[:, :1], E))
    shuffled = np.tile(np.arange(E), (N, 1))
    shuffled[1] = shuffled[1, ::-1]  # every expert once, but case 1 in another order
    with pytest.raises(ValueError, match=r"expert_index 0..2 on every row"):
        blend(o, tm.dispatch.route(shuffled, tm.functional.softmax(g), E))


# --- bad input -------------------------------------------------------------------------------
def test_zero_experts_is_a_clear_error():
    with pytest.raises(ValueError, match="n_experts must be a positive integer, got 0"):
        AdaptiveMixture(2, 4, 0)
    with pytest.raises(ValueError, match="at least one expert"):
        AdaptiveMixture(2, 4, experts=[])
    with pytest.raises(ValueError, match="zero experts"):
        mixture_nll(np.zeros((3, 0)), np.zeros((3, 0, 2)), np.zeros((3, 2)))


def test_wrong_feature_count_and_nan_features():
    model = AdaptiveMixture(2, 4, 2, rng=0)
    with pytest.raises(ValueError, match=r"x must be \(T, 2\)"):
        model(np.zeros((3, 3)))
    X = np.zeros((3, 2))
    X[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model(X)


@pytest.mark.task1_1
def test_unknown_label_and_shape_errors():
    g, o, d = _parts()
    with pytest.raises(ValueError, match="unknown class label 7"):
        mixture_classification_nll(g, o, np.array([0, 1, 7, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        mixture_classification_nll(g, o, np.zeros(N))
    with pytest.raises(ValueError, match="target must be"):
        mixture_nll(g, o, d[:, :2])
    with pytest.raises(ValueError, match="expert_outputs must be"):
        mixture_nll(g, o[:, :2], d)
    with pytest.raises(ValueError, match="reduction"):
        mixture_nll(g, o, d, reduction="max")
    with pytest.raises(ValueError, match="likelihood"):
        posterior_responsibilities(g, o, d, likelihood="poisson")
    bad = o.data.copy()
    bad[2, 1, 3] = np.nan
    with pytest.raises(FloatingPointError, match="expert 1's outputs .* case 2, output 3"):
        mixture_nll(g, bad, d)
    with pytest.raises(FloatingPointError, match="gate_logits .* case 0, expert 2"):
        mixture_nll(np.where(np.arange(E) == 2, np.inf, g.data), o, d)


# --- the reproduction script ----------------------------------------------------------------
@pytest.mark.task1_1
def test_vowel_script_end_to_end_fast(tmp_path):
    from tinymoe.app.experiments import vowels_1991 as v

    res = v.run(seeds=2, fast=True, progress=False, systems=("ME4", "BP6"))
    assert set(res.summaries) == {"ME4", "BP6"} and len(res.runs) == 4
    for s in res.summaries.values():
        assert s.n_reached == 2 and s.epochs_mean > 0
        assert 0.7 < s.test_acc <= 1.0 and 0.7 < s.train_acc <= 1.0
    assert res.summaries["ME4"].used_experts is not None
    text = v.format_table(res)
    assert "1124" in text and "2209" in text and "BP epochs / mixture epochs" in text


@pytest.mark.task1_1
def test_vowel_training_criterion_and_figures():
    from tinymoe.app.experiments import vowels_1991 as v

    r, model = v.train("ME4", 0, max_epochs=3000)
    assert r.epochs is not None and r.mse_curve[r.epochs] <= v.CRITERION
    assert r.mse_curve[r.epochs - 1] > v.CRITERION
    assert np.asarray(r.load_curve).shape == (r.epochs + 1, 4)
    fig = v.figure_regions(model)
    assert fig.axes and v.figure_load(r).axes


def test_vowel_script_rejects_bad_data():
    from tinymoe.data import vowels
    from tinymoe.app.experiments import vowels_1991 as v

    tr, te = vowels("train"), vowels("test")
    bad = type(tr)(X=tr.X, y=np.where(tr.y == 3, 9, tr.y), labels=tr.labels, speaker=tr.speaker)
    with pytest.raises(ValueError, match="unknown vowel label 9"):
        v.train("ME4", 0, data=(bad, te), max_epochs=1)
    nan = type(tr)(X=np.where(np.arange(len(tr.X))[:, None] == 3, np.nan, tr.X), y=tr.y,
                   labels=tr.labels, speaker=tr.speaker)
    with pytest.raises(ValueError, match="NaN"):
        v.train("ME4", 0, data=(nan, te), max_epochs=1)
    three = type(tr)(X=np.c_[tr.X, tr.X[:, :1]], y=tr.y, labels=tr.labels, speaker=tr.speaker)
    with pytest.raises(ValueError, match=r"expected features \(n, 2\)"):
        v.train("ME4", 0, data=(three, te), max_epochs=1)
    with pytest.raises(ValueError, match="unknown system"):
        v.build("ME3x", 0)


def test_vowel_script_helpers():
    from tinymoe.app.experiments import vowels_1991 as v

    assert v.build("ME1", 0).num_parameters() == 15  # the control: one expert, trivial gate
    assert v.build("BP6", 0).num_parameters() == 46
    assert v.best_step_size({1.0: [10, 12], 2.0: [5, None], 4.0: [8, 9]}) == 4.0
    with pytest.raises(ValueError, match="no step size for"):
        v.run(seeds=1, systems=("ME2",), progress=False)
    t, df = v.pooled_t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert df == 4 and t == pytest.approx(-3 / np.sqrt(2 / 3))


def test_the_step_size_exploration_is_recorded_and_rendered(tmp_path, monkeypatch):
    from tinymoe.app import records, render
    from tinymoe.app.experiments import vowels_1991 as v

    monkeypatch.setattr(records, "RECORDS", tmp_path)
    tables = {"ME4": {1.0: [10, 12], 2.0: [5, None], 4.0: [8, 10]},
              "BP6": {1.0: [30, 32], 2.0: [20, 22], 4.0: [None, None]}}
    path = v.record_exploration(tables, ["vowels", "--explore", "--record"])
    rec = records.load("vowels-explore")
    assert path.exists() and rec["results"]["ME4"]["best"] == 4.0
    assert rec["results"]["ME4"]["mean"]["2"] is None  # a start never reached the criterion
    text = render.explore_table(rec)
    assert "| ME4 | 11 | — | **9** |" in text
    assert "| BP6 | 31 | **21** | — |" in text
