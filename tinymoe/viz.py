"""Plots for Mixture-of-Experts: routing heatmaps, expert load, drops, gate regions, losses,
text coloured by expert.

Every function draws on ``ax`` when given (and returns ``ax.figure``), otherwise on a new
Figure that it returns. New figures are created through pyplot and then closed in
pyplot's registry, so nothing is ever shown twice, no figure piles up in memory, and
headless runs (Agg) work. In Jupyter the returned Figure displays when it is the value of
a cell; in scripts write it with :func:`save`. No function calls ``plt.show``.

Inputs are NumPy arrays (anything with a ``.numpy()`` method, such as a Tensor, is
converted first). A wrong shape raises ``ValueError`` naming the function and the shape.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _array(x: Any, fn: str, name: str) -> np.ndarray:
    """``x`` as an ndarray; calls ``x.numpy()`` first when it exists (Tensors)."""
    if hasattr(x, "numpy") and callable(x.numpy):
        x = x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:  # ragged lists
        raise ValueError(f"{fn}: {name} is not a rectangular array ({err})") from err


def _figure_and_axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """(fig, ax): the given axes' figure, or a new one-axes Figure closed in pyplot."""
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    fig, new_ax = plt.subplots(figsize=figsize)
    plt.close(fig)  # keep it out of pyplot's registry: returned, never auto-shown
    return fig, new_ax


def routing_heatmap(routing: Any, n_experts: int | None = None, weights: Any = None, *,
                    token_labels: Sequence[str] | None = None, ax: Any = None,
                    title: str = "routing", cmap: str = "viridis",
                    colorbar: bool = True) -> Any:
    """Tokens × experts heatmap of who goes where.

    ``routing`` is either gate probabilities ``(T, E)`` (floats) or ``expert_index``
    ``(T, k)`` (integers, the dispatch contract). Integer input becomes a ``(T, E)``
    matrix holding ``weights[t, j]`` (the combine weights, ``(T, k)``) at
    ``[t, expert_index[t, j]]``, or 1 without weights; ``E = n_experts`` or max index + 1.
    """
    fn = "routing_heatmap"
    r = _array(routing, fn, "routing")
    if r.ndim != 2:
        raise ValueError(f"{fn}: expected gates (T, E) or expert_index (T, k), got shape "
                         f"{r.shape}; pass one row per token")
    if np.issubdtype(r.dtype, np.integer):
        grid = _index_to_grid(r, n_experts, weights, fn)  # (T, E)
    else:
        if weights is not None:
            raise ValueError(f"{fn}: weights only go with an integer expert_index (T, k); "
                             f"routing is float {r.shape}, already the gate values")
        grid = r.astype(float)  # (T, E)
    T, E = grid.shape
    fig, ax = _figure_and_axes(ax, (min(2.0 + 0.45 * E, 12.0), min(1.5 + 0.18 * T, 10.0)))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap)
    ax.set_xlabel("expert")
    ax.set_ylabel("token")
    ax.set_xticks(np.arange(E))
    if token_labels is not None:
        if len(token_labels) != T:
            raise ValueError(f"{fn}: {len(token_labels)} token_labels for {T} tokens")
        ax.set_yticks(np.arange(T))
        ax.set_yticklabels(list(token_labels))
    ax.set_title(title)
    if colorbar:
        fig.colorbar(im, ax=ax, label="gate" if weights is not None or
                     not np.issubdtype(r.dtype, np.integer) else "chosen")
    return fig


def _index_to_grid(index: np.ndarray, n_experts: int | None, weights: Any,
                   fn: str) -> np.ndarray:
    """expert_index (T, k) [+ weights (T, k)] -> dense (T, E) grid."""
    T, k = index.shape
    if index.size == 0:
        raise ValueError(f"{fn}: expert_index has shape {index.shape}; need T >= 1, k >= 1")
    if index.min() < 0:
        raise ValueError(f"{fn}: expert_index has negative entries (min {index.min()}); "
                         "mark dropped tokens with weights=0 instead")
    E = int(index.max()) + 1 if n_experts is None else int(n_experts)
    if index.max() >= E:
        raise ValueError(f"{fn}: expert_index max {index.max()} >= n_experts={E}; "
                         "pass the right n_experts")
    w = np.ones((T, k)) if weights is None else _array(weights, fn, "weights").astype(float)
    if w.shape != (T, k):
        raise ValueError(f"{fn}: weights shape {w.shape} != expert_index shape {(T, k)}")
    grid = np.zeros((T, E))  # (T, E)
    rows = np.repeat(np.arange(T), k)  # (T*k,)
    np.add.at(grid, (rows, index.reshape(-1)), w.reshape(-1))
    return grid


def expert_load(load_history: Any, *, steps: Any = None, kind: str = "lines",
                normalize: bool = True, ax: Any = None, title: str = "expert load",
                expert_names: Sequence[str] | None = None) -> Any:
    """Load per expert over training, with the uniform share dashed.

    ``load_history`` is ``(steps, E)``: tokens (or fractions) per expert at each logged
    step. With ``normalize`` each row is divided by its sum, so uniform is 1/E.
    ``kind="lines"`` draws one line per expert; ``kind="stack"`` a stackplot whose
    dashed lines mark the balanced boundaries i/E.
    """
    fn = "expert_load"
    load = _array(load_history, fn, "load_history").astype(float)
    if load.ndim != 2:
        raise ValueError(f"{fn}: expected load_history (steps, E), got shape {load.shape}; "
                         "stack one row of per-expert loads per step")
    if kind not in ("lines", "stack"):
        raise ValueError(f"{fn}: kind={kind!r}; use 'lines' or 'stack'")
    n, E = load.shape
    x = _steps(steps, n, fn)  # (steps,)
    if normalize:
        sums = load.sum(axis=1, keepdims=True)  # (steps, 1)
        load = np.divide(load, sums, out=np.zeros_like(load), where=sums > 0)
    uniform = 1.0 / E if normalize else float(load.sum(axis=1).mean()) / E
    names = _names(expert_names, E, "expert", fn)
    fig, ax = _figure_and_axes(ax, (7.0, 4.0))
    if kind == "stack":
        ax.stackplot(x, load.T, labels=names)  # (E, steps)
        total = 1.0 if normalize else float(load.sum(axis=1).mean())
        for i in range(1, E):
            ax.axhline(i * total / E, color="k", linestyle="--", linewidth=0.7)
    else:
        for e in range(E):
            ax.plot(x, load[:, e], label=names[e])
        ax.axhline(uniform, color="k", linestyle="--", linewidth=1.0, label="uniform")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of tokens" if normalize else "tokens")
    ax.set_title(title)
    if E <= 16:
        ax.legend(fontsize="small", ncol=2 if E > 8 else 1, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))  # outside: bands fill the whole plot
    return fig


def dropped_fraction(history: Any, *, steps: Any = None, labels: Sequence[str] | None = None,
                     ax: Any = None, title: str = "dropped tokens") -> Any:
    """Fraction of tokens dropped (over capacity) per step, in percent.

    ``history`` is ``(steps,)`` or ``(steps, L)`` (one line per MoE layer); values in
    [0, 1].
    """
    fn = "dropped_fraction"
    h = _array(history, fn, "history").astype(float)
    if h.ndim not in (1, 2):
        raise ValueError(f"{fn}: expected history (steps,) or (steps, L), got shape "
                         f"{h.shape}")
    if h.ndim == 1:
        h = h[:, None]  # (steps, 1)
    if h.size and (np.nanmin(h) < 0 or np.nanmax(h) > 1):
        raise ValueError(f"{fn}: values must be fractions in [0, 1], got range "
                         f"[{np.nanmin(h):.3g}, {np.nanmax(h):.3g}]; divide counts by the "
                         "number of tokens")
    n, L = h.shape
    x = _steps(steps, n, fn)
    names = _names(labels, L, "layer", fn)
    fig, ax = _figure_and_axes(ax, (7.0, 3.5))
    for j in range(L):
        ax.plot(x, 100.0 * h[:, j], label=names[j])
    ax.set_xlabel("step")
    ax.set_ylabel("dropped (%)")
    ax.set_ylim(bottom=0.0)
    ax.set_title(title)
    if L > 1 or labels is not None:
        ax.legend(fontsize="small")
    return fig


def gate_regions_2d(predict_gate_fn: Callable[[np.ndarray], Any], X: Any, y: Any = None,
                    experts_lines: Sequence[tuple] | None = None, *, resolution: int = 200,
                    padding: float = 0.05, ax: Any = None,
                    xlabel: str = "x1", ylabel: str = "x2", title: str = "gate regions",
                    class_names: Sequence[str] | None = None,
                    expert_names: Sequence[str] | None = None) -> Any:
    """A 2-D plane coloured by the winning expert, argmax_i g_i(x), with the data on top.

    ``predict_gate_fn(points (n, 2)) -> (n, E)`` gate probabilities. ``X`` is ``(n, 2)``,
    ``y`` optional ``(n,)`` class labels (one marker colour per class). Each item of
    ``experts_lines`` is ``(w, b)`` or ``(w, b, expert)``: the line w·x + b = 0 with
    ``w`` of 2 entries, drawn in that expert's colour (black when none is given).
    Example: the 1991 vowel experts in the F1-F2 plane.
    """
    fn = "gate_regions_2d"
    X = _array(X, fn, "X").astype(float)
    if X.ndim != 2 or X.shape[1] != 2:
        raise ValueError(f"{fn}: expected X (n, 2) points in the plane, got shape {X.shape}")
    labels = None if y is None else _array(y, fn, "y")
    if labels is not None and labels.shape != (len(X),):
        raise ValueError(f"{fn}: expected y ({len(X)},) labels, got shape {labels.shape}")
    lo, hi = X.min(axis=0), X.max(axis=0)  # (2,), (2,)
    pad = padding * np.where(hi > lo, hi - lo, 1.0)
    lo, hi = lo - pad, hi + pad
    g1 = np.linspace(lo[0], hi[0], resolution)  # (R,)
    g2 = np.linspace(lo[1], hi[1], resolution)  # (R,)
    G1, G2 = np.meshgrid(g1, g2)  # (R, R) each; rows follow x2
    grid = np.stack([G1.ravel(), G2.ravel()], axis=1)  # (R*R, 2)
    gates = _array(predict_gate_fn(grid), fn, "predict_gate_fn(points)")
    if gates.ndim != 2 or gates.shape[0] != len(grid):
        raise ValueError(f"{fn}: predict_gate_fn returned shape {gates.shape} for "
                         f"{len(grid)} points; it must return (n, E) probabilities")
    E = gates.shape[1]
    winner = gates.argmax(axis=1).reshape(resolution, resolution)  # (R, R)

    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    colours = _palette(E)
    fig, ax = _figure_and_axes(ax, (6.0, 5.0))
    ax.imshow(winner, origin="lower", extent=(lo[0], hi[0], lo[1], hi[1]), aspect="auto",
              cmap=ListedColormap(colours), norm=BoundaryNorm(np.arange(E + 1) - 0.5, E),
              alpha=0.35, interpolation="nearest")
    enames = _names(expert_names, E, "expert", fn)
    _scatter_classes(ax, X, labels, class_names, fn)
    for item in experts_lines or ():
        _draw_line(ax, item, lo, hi, colours, fn)
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    regions = [Patch(color=colours[e], alpha=0.35, label=enames[e]) for e in range(E)]
    points, _ = ax.get_legend_handles_labels()
    ax.legend(handles=regions + points, fontsize="small", loc="best")
    return fig


def _scatter_classes(ax: Any, X: np.ndarray, labels: np.ndarray | None,
                     class_names: Sequence[str] | None, fn: str) -> None:
    """One scatter per class (or one grey scatter without labels)."""
    if labels is None:
        ax.scatter(X[:, 0], X[:, 1], s=10, c="0.2", label="data")
        return
    classes = np.unique(labels)
    names = _names(class_names, len(classes), "class", fn) if class_names is not None \
        else [str(c) for c in classes]
    markers = "o^sDvP*Xh<>"
    for i, cls in enumerate(classes):
        sel = labels == cls  # (n,)
        ax.scatter(X[sel, 0], X[sel, 1], s=14, marker=markers[i % len(markers)],
                   edgecolors="k", linewidths=0.3, label=names[i])


def _draw_line(ax: Any, item: tuple, lo: np.ndarray, hi: np.ndarray,
               colours: list, fn: str) -> None:
    """Draw w·x + b = 0 across the box [lo, hi], solving for the steeper coordinate."""
    if len(item) not in (2, 3):
        raise ValueError(f"{fn}: each experts_lines item is (w, b) or (w, b, expert), got "
                         f"{len(item)} entries")
    w = _array(item[0], fn, "w").astype(float).reshape(-1)
    b = float(np.asarray(item[1]).reshape(()))
    if w.shape != (2,) or not np.any(w):
        raise ValueError(f"{fn}: line weight w must have 2 entries, not all zero; got "
                         f"{w.tolist()}")
    colour = "k" if len(item) == 2 else colours[int(item[2]) % len(colours)]
    if abs(w[1]) >= abs(w[0]):  # x2 = -(w0·x1 + b) / w1
        x1 = np.array([lo[0], hi[0]])
        x2 = -(w[0] * x1 + b) / w[1]
    else:  # x1 = -(w1·x2 + b) / w0
        x2 = np.array([lo[1], hi[1]])
        x1 = -(w[1] * x2 + b) / w[0]
    ax.plot(x1, x2, color=colour, linewidth=1.5)


def loss_curves(curves: Mapping[str, Any], *, ax: Any = None, logy: bool = False,
                smooth: float = 0.0, xlabel: str = "step", ylabel: str = "loss",
                title: str = "loss") -> Any:
    """One line per named curve: ``name -> values`` or ``name -> (steps, values)``.

    ``smooth`` in [0, 1) applies an exponential moving average
    s_t = smooth·s_{t-1} + (1 - smooth)·v_t, drawing the raw curve faintly beneath.
    """
    fn = "loss_curves"
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"{fn}: expected a non-empty dict name -> values, got "
                         f"{type(curves).__name__}")
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"{fn}: smooth={smooth} must be in [0, 1)")
    fig, ax = _figure_and_axes(ax, (7.0, 4.0))
    for name, value in curves.items():
        x, v = _steps_values(value, fn, name)
        if smooth > 0.0 and len(v):
            line, = ax.plot(x, _ema(v, smooth), label=name)
            ax.plot(x, v, color=line.get_color(), alpha=0.25, linewidth=0.8)
        else:
            ax.plot(x, v, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def _steps_values(value: Any, fn: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """values -> (arange, values); (steps, values) -> both, checked 1-D and equal length."""
    if isinstance(value, tuple) and len(value) == 2 and np.ndim(value[0]) == 1 \
            and np.ndim(value[1]) == 1:
        x = _array(value[0], fn, f"{name!r} steps").astype(float)
        v = _array(value[1], fn, f"{name!r} values").astype(float)
        if x.shape != v.shape:
            raise ValueError(f"{fn}: curve {name!r}: steps shape {x.shape} != values shape "
                             f"{v.shape}")
        return x, v
    v = _array(value, fn, f"{name!r} values").astype(float)
    if v.ndim != 1:
        raise ValueError(f"{fn}: curve {name!r}: expected values (steps,) or a pair "
                         f"(steps, values), got shape {v.shape}")
    return np.arange(len(v)), v


def _ema(v: np.ndarray, beta: float) -> np.ndarray:
    """s_0 = v_0, s_t = beta·s_{t-1} + (1 - beta)·v_t."""
    out = np.empty_like(v)
    s = v[0]
    for t, value in enumerate(v):
        s = beta * s + (1.0 - beta) * value
        out[t] = s
    return out


def _steps(steps: Any, n: int, fn: str) -> np.ndarray:
    """x values for n logged points: 0..n-1, or the given (n,) steps."""
    if steps is None:
        return np.arange(n)
    x = _array(steps, fn, "steps")
    if x.shape != (n,):
        raise ValueError(f"{fn}: steps shape {x.shape} != ({n},), one per row")
    return x


def text_by_expert(text: str, experts: Any, n_experts: int | None = None, *,
                   width: int = 64, ax: Any = None, title: str = "expert per character",
                   legend: bool = True) -> Any:
    """``text`` drawn in a monospace grid, each character on the colour of its expert.

    ``experts`` (len(text),): the expert each character was routed to (top-1), -1 for a
    dropped token (drawn without colour). Lines wrap at ``width`` characters and at
    newlines (a newline is drawn as a coloured ``⏎``)."""
    fn = "text_by_expert"
    e = _array(experts, fn, "experts").astype(int)
    if e.shape != (len(text),):
        raise ValueError(f"{fn}: experts shape {e.shape} != ({len(text)},), one per character")
    E = int(e.max()) + 1 if n_experts is None else int(n_experts)
    if e.size and (e.max() >= E or e.min() < -1):
        raise ValueError(f"{fn}: expert ids must lie in [-1, {E}), got {e.min()}..{e.max()}")
    cells, row, col = [], 0, 0  # (row, col, char, expert)
    for ch, ex in zip(text, e):
        if col >= width:
            row, col = row + 1, 0
        cells.append((row, col, "⏎" if ch == "\n" else ch, ex))
        col += 1
        if ch == "\n":
            row, col = row + 1, 0
    rows = row + 1
    fig, ax = _figure_and_axes(ax, (width * 0.13 + 1, rows * 0.26 + 1))
    colours = _palette(E)
    from matplotlib.patches import Patch, Rectangle

    for r, c, ch, ex in cells:
        if ex >= 0:
            ax.add_patch(Rectangle((c, -r - 1), 1, 1, color=colours[ex], alpha=0.45, lw=0))
        ax.text(c + 0.5, -r - 0.5, ch, ha="center", va="center", family="monospace",
                fontsize=8)
    ax.set_xlim(0, width)
    ax.set_ylim(-rows, 0)
    ax.set_aspect("auto")
    ax.axis("off")
    ax.set_title(title)
    if legend:
        ax.legend(handles=[Patch(color=colours[i], alpha=0.45, label=f"expert {i}")
                           for i in range(E)], loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  fontsize=7)
    return fig


def _names(names: Sequence[str] | None, n: int, prefix: str, fn: str) -> list[str]:
    if names is None:
        return [f"{prefix} {i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{fn}: {len(names)} {prefix} names for {n} {prefix}s")
    return [str(s) for s in names]


def _palette(n: int) -> list:
    """n distinct colours: tab10, then tab20, then evenly spaced hues."""
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["hsv"](i / n) for i in range(n)]


def save(fig: Any, path: str | Path, *, dpi: int = 120, **kwargs: Any) -> Path:
    """``fig.savefig(path)`` after creating the parent directories; returns the Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("bbox_inches", "tight")
    fig.savefig(path, dpi=dpi, **kwargs)
    return path
