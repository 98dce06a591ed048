"""Plot helpers: each returns a Figure with the expected artists, saves, and checks shapes.

Headless: tests/conftest.py selects the Agg backend before anything imports pyplot.
"""
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure

from tinymoe import viz

RNG = np.random.default_rng(0)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class _HasNumpy:
    """Stands in for a Tensor: only .numpy() is used."""

    def __init__(self, a):
        self.a = a

    def numpy(self):
        return self.a


def _png_ok(fig, path):
    out = viz.save(fig, path)
    data = out.read_bytes()
    return out.exists() and len(data) > 100 and data[:4] == b"\x89PNG"


# --- routing_heatmap --------------------------------------------------------------------

def test_routing_heatmap_gates(tmp_path):
    gates = _softmax(RNG.normal(size=(12, 4)))  # (T, E)
    fig = viz.routing_heatmap(gates, token_labels=list("abcdefghijkl"))
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2  # heatmap + colorbar
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), gates)
    assert _png_ok(fig, tmp_path / "nested" / "dir" / "heat.png")
    assert len(viz.routing_heatmap(_HasNumpy(gates), colorbar=False).axes) == 1


def test_routing_heatmap_expert_index_with_weights():
    index = np.array([[0, 2], [1, 0], [2, 1]])  # (T, k)
    weights = np.array([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])  # (T, k)
    fig = viz.routing_heatmap(index, n_experts=4, weights=weights)
    grid = np.asarray(fig.axes[0].images[0].get_array())
    expected = np.array([[0.7, 0, 0.3, 0], [0.4, 0.6, 0, 0], [0, 0.1, 0.9, 0]])
    np.testing.assert_allclose(grid, expected)
    one_hot = np.asarray(viz.routing_heatmap(index[:, :1]).axes[0].images[0].get_array())
    np.testing.assert_array_equal(one_hot, np.eye(3))  # E inferred as max + 1


@pytest.mark.parametrize("bad, kwargs, pattern", [
    (np.zeros(5), {}, r"routing_heatmap.*\(5,\)"),
    (np.zeros((2, 3, 4)), {}, r"routing_heatmap.*\(2, 3, 4\)"),
    (np.array([[0, 5]]), {"n_experts": 4}, r"routing_heatmap.*max 5 >= n_experts=4"),
    (np.array([[0, -1]]), {}, r"routing_heatmap.*negative"),
    (np.array([[0, 1]]), {"weights": np.ones((2, 2))}, r"routing_heatmap.*\(2, 2\)"),
])
def test_routing_heatmap_bad_input(bad, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        viz.routing_heatmap(bad, **kwargs)


# --- expert_load ------------------------------------------------------------------------

def test_expert_load_lines_with_uniform(tmp_path):
    load = RNG.integers(0, 50, size=(20, 4))  # (steps, E) token counts
    fig = viz.expert_load(load)
    ax = fig.axes[0]
    assert len(ax.lines) == 4 + 1
    uniform = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(uniform) == 1 and np.allclose(uniform[0].get_ydata(), 0.25)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), load[:, 0] / load.sum(axis=1))
    assert _png_ok(fig, tmp_path / "load.png")


def test_expert_load_stack_on_given_axes():
    fig0, ax = plt.subplots()
    try:
        fig = viz.expert_load(RNG.random((10, 3)), kind="stack", steps=np.arange(0, 100, 10),
                              ax=ax)
        assert fig is fig0
        assert len(ax.collections) == 3  # one band per expert
        assert len(ax.lines) == 2  # dashed boundaries at 1/3 and 2/3
    finally:
        plt.close(fig0)


@pytest.mark.parametrize("bad, kwargs, pattern", [
    (np.zeros(4), {}, r"expert_load.*\(4,\)"),
    (np.zeros((3, 2)), {"kind": "pie"}, r"expert_load.*kind='pie'"),
    (np.zeros((3, 2)), {"steps": [1, 2]}, r"expert_load.*steps shape \(2,\)"),
])
def test_expert_load_bad_input(bad, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        viz.expert_load(bad, **kwargs)


# --- dropped_fraction -------------------------------------------------------------------

def test_dropped_fraction_one_and_many_layers(tmp_path):
    fig = viz.dropped_fraction(np.linspace(0.2, 0.01, 30))
    assert len(fig.axes) == 1 and len(fig.axes[0].lines) == 1
    assert np.isclose(fig.axes[0].lines[0].get_ydata()[0], 20.0)  # percent
    fig = viz.dropped_fraction(RNG.random((30, 3)) * 0.1, labels=["l1", "l3", "l5"])
    assert len(fig.axes[0].lines) == 3
    assert _png_ok(fig, tmp_path / "drop.png")


@pytest.mark.parametrize("bad, pattern", [
    (np.zeros((2, 2, 2)), r"dropped_fraction.*\(2, 2, 2\)"),
    (np.array([0.1, 3.0]), r"dropped_fraction.*\[0, 1\]"),
])
def test_dropped_fraction_bad_input(bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        viz.dropped_fraction(bad)


# --- gate_regions_2d --------------------------------------------------------------------

def _linear_gate(W, b):
    return lambda points: _softmax(points @ W + b)  # (n, 2) -> (n, E)


def test_gate_regions_2d(tmp_path):
    X = RNG.normal(size=(60, 2))  # (n, 2)
    y = (X[:, 0] > 0).astype(int) + 2 * (X[:, 1] > 0)  # 4 classes
    W = np.array([[3.0, -3.0, 0.0], [0.0, 0.0, 3.0]])  # (2, E=3)
    gate = _linear_gate(W, np.zeros(3))
    lines = [(np.array([1.0, 0.0]), 0.0, 0), (np.array([0.0, 1.0]), -0.5)]
    fig = viz.gate_regions_2d(gate, X, y, experts_lines=lines, resolution=50,
                              xlabel="F1 (Hz)", ylabel="F2 (Hz)",
                              class_names=["a", "b", "c", "d"])
    ax = fig.axes[0]
    assert len(ax.images) == 1
    winner = np.asarray(ax.images[0].get_array())
    assert winner.shape == (50, 50) and set(np.unique(winner)) <= {0, 1, 2}
    xs = np.linspace(*ax.get_xlim(), 50)
    ys = np.linspace(*ax.get_ylim(), 50)
    point = np.array([[xs[40], ys[5]]])  # row = x2 index, column = x1 index
    assert winner[5, 40] == gate(point).argmax()
    assert sum(isinstance(c, PathCollection) for c in ax.collections) == 4  # one per class
    assert len(ax.lines) == 2
    assert len(ax.get_legend().get_texts()) == 3 + 4  # regions + classes
    assert ax.get_xlabel() == "F1 (Hz)"
    assert _png_ok(fig, tmp_path / "regions.png")


def test_gate_regions_2d_without_labels():
    X = _HasNumpy(RNG.normal(size=(10, 2)))
    fig = viz.gate_regions_2d(_linear_gate(np.eye(2), np.zeros(2)), X, resolution=20)
    assert len(fig.axes[0].collections) == 1


@pytest.mark.parametrize("X, fn, kwargs, pattern", [
    (np.zeros((5, 3)), None, {}, r"gate_regions_2d.*\(5, 3\)"),
    (np.zeros((5, 2)), lambda p: np.ones(len(p)), {}, r"gate_regions_2d.*returned shape"),
    (np.zeros((5, 2)), None, {"y": np.zeros(4)}, r"gate_regions_2d.*\(4,\)"),
    (np.zeros((5, 2)), None, {"experts_lines": [(np.ones(3), 0.0)]}, r"gate_regions_2d.*w"),
])
def test_gate_regions_2d_bad_input(X, fn, kwargs, pattern):
    fn = fn or _linear_gate(np.eye(2), np.zeros(2))
    with pytest.raises(ValueError, match=pattern):
        viz.gate_regions_2d(fn, X, resolution=10, **kwargs)


# --- loss_curves and save ---------------------------------------------------------------

def test_loss_curves(tmp_path):
    steps = np.arange(0, 50, 5)
    fig = viz.loss_curves({"train": np.linspace(3, 1, 40),
                           "val": (steps, np.linspace(3, 1.2, 10))}, logy=True)
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and ax.get_yscale() == "log"
    np.testing.assert_array_equal(ax.lines[1].get_xdata(), steps)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "val"]
    fig = viz.loss_curves({"train": list(RNG.random(30))}, smooth=0.9)
    assert len(fig.axes[0].lines) == 2  # smoothed + faint raw
    assert _png_ok(fig, tmp_path / "a" / "loss.png")


@pytest.mark.parametrize("curves, pattern", [
    ({}, r"loss_curves.*non-empty"),
    ({"x": np.zeros((3, 2))}, r"loss_curves.*'x'.*\(3, 2\)"),
    ({"x": (np.arange(3), np.zeros(4))}, r"loss_curves.*'x'.*\(3,\).*\(4,\)"),
])
def test_loss_curves_bad_input(curves, pattern):
    with pytest.raises(ValueError, match=pattern):
        viz.loss_curves(curves)


def test_new_figures_are_not_left_open_in_pyplot():
    before = len(plt.get_fignums())
    viz.loss_curves({"x": [1.0, 2.0]})
    assert len(plt.get_fignums()) == before
