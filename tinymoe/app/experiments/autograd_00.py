"""Stage 0 of the tour: the autograd core trains a small MLP on two moons.

What it shows: tinymoe's gradients agree with central differences on a whole network
(``tm.gradcheck`` over every parameter), and plain Adam on those gradients separates two
interleaved half circles that no linear model can.
"""
from __future__ import annotations

from typing import Any

import numpy as np

import tinymoe as tm
from tinymoe.data import two_moons


class MLP(tm.nn.Module):
    """x -> Linear -> tanh -> Linear -> tanh -> Linear: logits for 2 classes."""

    def __init__(self, d_in: int = 2, hidden: int = 32, d_out: int = 2, *,
                 dtype: Any = np.float32, rng: Any = 0) -> None:
        super().__init__()
        rng = tm.nn.as_rng(rng)
        self.l1 = tm.nn.Linear(d_in, hidden, dtype=dtype, rng=rng)
        self.l2 = tm.nn.Linear(hidden, hidden, dtype=dtype, rng=rng)
        self.l3 = tm.nn.Linear(hidden, d_out, dtype=dtype, rng=rng)

    def forward(self, x: Any) -> tm.Tensor:
        return self.l3(self.l2(self.l1(x).tanh()).tanh())


def train_two_moons(steps: int = 300, n: int = 400, lr: float = 0.02, seed: int = 0,
                    progress: bool = False) -> dict[str, Any]:
    """Full-batch Adam on two moons; returns the model, loss curve and accuracies."""
    X, y = two_moons(n, noise=0.15, seed=seed)
    Xt, yt = two_moons(n, noise=0.15, seed=seed + 1)
    model = MLP(rng=seed)
    opt = tm.optim.Adam(model.parameters(), lr=lr)
    x = tm.tensor(X.astype(np.float32))
    losses = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="autograd: MLP on two moons", leave=False)
    for _ in it:
        loss = tm.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with tm.no_grad():
        acc = float((model(x).numpy().argmax(1) == y).mean())
        test_acc = float((model(tm.tensor(Xt.astype(np.float32))).numpy().argmax(1) == yt).mean())
    return {"model": model, "losses": losses, "train_acc": acc, "test_acc": test_acc,
            "X": X, "y": y}


def check_mlp_gradients(seed: int = 0) -> tm.GradcheckReport:
    """gradcheck the MLP's loss with respect to every parameter, in float64."""
    model = MLP(hidden=8, dtype=np.float64, rng=seed)
    X, y = two_moons(16, seed=seed)
    params = [p for _, p in model.named_parameters()]
    names = [n for n, _ in model.named_parameters()]
    return tm.gradcheck(lambda *ps: tm.functional.cross_entropy(model(tm.tensor(X)), y),
                        params, names=names)


def tour_line(fast: bool = True, progress: bool = False) -> dict[str, Any]:
    report = check_mlp_gradients()
    worst = max(r.max_abs_error for r in report.inputs)
    res = train_two_moons(steps=200 if fast else 600, progress=progress)
    n_params = res["model"].num_parameters()

    def decision_plot():
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4))
        X, y, model = res["X"], res["y"], res["model"]
        g0, g1 = np.meshgrid(np.linspace(-1.5, 2.5, 120), np.linspace(-1.0, 1.5, 100))
        grid = np.stack([g0.ravel(), g1.ravel()], 1).astype(np.float32)
        with tm.no_grad():
            p = model(tm.tensor(grid)).softmax(-1).numpy()[:, 1].reshape(g0.shape)
        ax.contourf(g0, g1, p, levels=20, cmap="RdBu_r", alpha=0.6)
        ax.scatter(X[:, 0], X[:, 1], c=y, cmap="RdBu_r", s=8, edgecolors="k", linewidths=0.2)
        ax.set_title("MLP decision boundary (two moons)")
        plt.close(fig)
        return fig

    return {
        "stage": "0 · autograd core",
        "paper": "backpropagation (Rumelhart, Hinton & Williams 1986)",
        "trained": f"MLP 2-32-32-2, Adam, {len(res['losses'])} full-batch steps on two moons",
        "params": f"{n_params:,} / {n_params:,}",
        "metric": f"test acc {res['test_acc']:.1%}; gradcheck max |err| {worst:.1e}",
        "paper_claim": "gradients exact to float64 round-off",
        "figures": {"two_moons_boundary": decision_plot, "two_moons_loss":
                    lambda: _loss_fig(res["losses"])},
    }


def _loss_fig(losses):
    from tinymoe import viz

    return viz.loss_curves({"train loss": losses})
