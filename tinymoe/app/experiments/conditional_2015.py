"""Conditional computation, 2013-2015: gradient estimators for binary gates, and a
block-gated network that learns to skip blocks.

**Part A: the estimators against the exact gradient** (Bengio, Léonard & Courville 2013).
A tiny problem: K = 4 stochastic binary gates ``b_k ~ Bernoulli(sigm(a_k))`` feed a fixed
softmax classifier, ``L(h) = -log softmax(V h + c)_y``. With 2^4 = 16 configurations the
expected loss and its gradient are exact sums (``moe.expected_over_gates``), and so are each
estimator's mean and variance (``moe.estimator_study``). For many random problems we report
each estimator's relative bias ``||E g - grad|| / ||grad||``, its relative variance
``E||g - E g||^2 / ||grad||^2``, and the error of an average of m samples,
``sqrt(bias^2 + var / m)``, against m (:func:`figure_estimators`).

**Part B: a block-gated network on the digits** (Bengio, Bacon, Pineau & Precup 2015).
Two hidden layers of 8 blocks x 8 ReLU units on the 8 x 8 UCI digits; each block is kept for
an input with probability ``sigma = sigm(Z h + d)``. The network learns by backprop through
the sampled masks, the policies by REINFORCE on each example's cross-entropy (baseline: a
running mean of the cost) plus ``lambda_s (L_b + L_e) + lambda_v L_v`` with target rate tau.
For each tau we report test accuracy (masks sampled, averaged over draws) against the
fraction of blocks used, next to the dense network and to dropping blocks at random at the
same rate. Several seeds; mean and 95 % t-interval.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import tinymoe as tm
from tinymoe import ops
from tinymoe.app.experiments.deep_moe_2013 import fmt, repro_main
from tinymoe.autograd import no_grad
from tinymoe.data import digits
from tinymoe.losses import cross_entropy
from tinymoe.moe.conditional import (
    ESTIMATORS,
    BlockGatedNet,
    block_fraction,
    estimator_study,
    reinforce_surrogate,
    sparsity_regularisers,
)

K_GATES, N_CLASSES_TOY = 4, 3
N_BLOCKS, BLOCK = 8, 8
LR, BATCH = 3e-3, 64
LAMBDA_S, LAMBDA_V = 0.3, 0.2  # from a short search on seed 0, tau 0.25 (1.0 and 0.5 starved
# the network: accuracy 0.39-0.65 at 15-30 epochs; 0.2 overshot tau)
TAUS = (0.5, 0.25, 0.125)
EVAL_DRAWS = 5
FULL = {"problems": 200, "epochs": 30, "seeds": 5}
FAST = {"problems": 60, "epochs": 15, "seeds": 2}
TOUR = {"problems": 60, "epochs": 20, "seeds": 1}
SAMPLES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


# --- part A ------------------------------------------------------------------------------------
def toy_problem(rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    """Gate logits ``a`` (K,) and the loss ``L(h)`` of a fixed random softmax classifier."""
    a = rng.normal(0.0, 1.5, K_GATES)
    V = rng.normal(0.0, 2.0, (K_GATES, N_CLASSES_TOY))
    c = rng.normal(0.0, 1.0, N_CLASSES_TOY)
    y = int(rng.integers(N_CLASSES_TOY))

    def loss(h: Any) -> Any:
        z = ops.matmul(ops.unsqueeze(h, 0), V) + c  # (1, classes)
        return -ops.log_softmax(z, axis=-1)[0, y]
    return a, loss


def estimator_table(n_problems: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """For each estimator, per problem: relative bias, relative variance, cosine."""
    rng = np.random.default_rng(seed)
    out = {name: {"bias": [], "variance": [], "cosine": []} for name in ESTIMATORS}
    for _ in range(n_problems):
        a, loss = toy_problem(rng)
        for name, mom in estimator_study(a, loss).items():
            norm2 = float(mom.exact @ mom.exact)
            out[name]["bias"].append(mom.bias)
            out[name]["variance"].append(mom.variance / norm2)
            out[name]["cosine"].append(mom.cosine)
    return {n: {k: np.array(v) for k, v in d.items()} for n, d in out.items()}


def sample_error(table: dict[str, dict[str, np.ndarray]], m: int) -> dict[str, float]:
    """Median over problems of ``sqrt(bias^2 + var / m)``: the relative error of an average
    of m independent samples of each estimator."""
    return {n: float(np.median(np.sqrt(d["bias"] ** 2 + d["variance"] / m)))
            for n, d in table.items()}


# --- part B ------------------------------------------------------------------------------------
@dataclass
class GatedRun:
    tau: float | None  # None: the dense network
    policy: str  # "dense", "learned" or "random"
    seed: int
    accuracy: float
    fraction: float  # blocks used at test time


def train_gated(tau: float | None, policy: str, seed: int, epochs: int,
                data: tuple | None = None) -> GatedRun:
    """Train a :class:`BlockGatedNet` on the 8 x 8 digits and test it.

    ``policy="dense"``: every block always on. ``"learned"``: the 2015 scheme with target
    ``tau``. ``"random"``: blocks kept with probability ``tau`` at random (the policy is
    fixed at ``sigma = tau``), the baseline a learned policy has to beat.
    """
    train, test = data or (digits("train"), digits("test"))
    rng = np.random.default_rng(seed)
    net = BlockGatedNet(64, 10, N_BLOCKS, BLOCK, rng=rng)
    policy_params = {id(p) for p in net.policy_parameters()}
    if policy == "random":
        for layer in net.layers:
            layer.policy.weight.data[...] = 0.0
            layer.policy.bias.data[...] = np.log(tau / (1 - tau))
    trainable = [p for p in net.parameters() if policy == "learned" or id(p) not in policy_params]
    opt = tm.optim.Adam(trainable, lr=LR)
    mode = "all" if policy == "dense" else "sample"
    baseline = None
    for _ in range(epochs):
        order = rng.permutation(len(train))
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]  # (B,)
            logits, outs = net(train.X[idx], mode=mode, rng=rng)
            per_case = cross_entropy(logits, train.y[idx], reduction="none")  # (B,)
            loss = per_case.mean()
            if policy == "learned":
                cost = per_case.data
                baseline = cost.mean() if baseline is None else 0.9 * baseline + 0.1 * cost.mean()
                for o in outs:
                    sigma = ops.sigmoid(o.logits)  # (B, k)
                    reg = sparsity_regularisers(sigma, tau)
                    loss = loss + reinforce_surrogate(o.logits, o.mask, cost, baseline) \
                        + LAMBDA_S * (reg["L_b"] + reg["L_e"]) + LAMBDA_V * reg["L_v"]
            opt.zero_grad()
            loss.backward()
            opt.step()
    accs, fracs = [], []
    draws = 1 if policy == "dense" else EVAL_DRAWS
    eval_rng = np.random.default_rng(seed + 777)
    with no_grad():
        for _ in range(draws):
            logits, outs = net(test.X, mode=mode, rng=eval_rng)
            accs.append(float((logits.data.argmax(1) == test.y).mean()))
            fracs.append(block_fraction(outs))
    return GatedRun(tau, policy, seed, float(np.mean(accs)), float(np.mean(fracs)))


@dataclass
class ConditionalResult:
    settings: dict[str, Any]
    estimators: dict[str, dict[str, np.ndarray]] = field(repr=False)
    gated: list[GatedRun]

    def rows(self) -> dict[str, list[GatedRun]]:
        """Runs grouped by setting: "dense", "learned tau=0.25", "random tau=0.25", ..."""
        out: dict[str, list[GatedRun]] = {}
        for r in self.gated:
            key = "dense" if r.policy == "dense" else f"{r.policy} tau={r.tau}"
            out.setdefault(key, []).append(r)
        return out

    def results(self) -> dict[str, Any]:
        """Every reported figure as plain JSON numbers (for ``records.record``)."""
        est = {n: {k: float(np.median(v)) for k, v in d.items()}
               for n, d in self.estimators.items()}
        errors = {str(m): sample_error(self.estimators, m) for m in SAMPLES}
        gated = {k: {"accuracy": [r.accuracy for r in v], "fraction": [r.fraction for r in v]}
                 for k, v in self.rows().items()}
        return {"estimators_median": est, "sample_error_median": errors, "block_gated": gated}


def run(fast: bool = False, progress: bool = True, cfg: dict[str, int] | None = None,
        taus: Sequence[float] = TAUS, random_baseline: bool = True,
        seeds: int | None = None, epochs: int | None = None) -> ConditionalResult:
    cfg = dict(cfg or (FAST if fast else FULL))
    cfg.update({k: v for k, v in (("seeds", seeds), ("epochs", epochs)) if v is not None})
    from tqdm.auto import tqdm

    table = estimator_table(cfg["problems"])
    data = (digits("train"), digits("test"))
    jobs = [(None, "dense")] + [(t, "learned") for t in taus]
    if random_baseline:
        jobs += [(t, "random") for t in taus]
    runs = []
    for seed in tqdm(range(cfg["seeds"]), desc="conditional", disable=not progress):
        for tau, policy in jobs:
            runs.append(train_gated(tau, policy, seed, cfg["epochs"], data))
    settings = {**cfg, "gates": K_GATES, "blocks": N_BLOCKS, "block": BLOCK, "lr": LR,
                "batch": BATCH, "lambda_s": LAMBDA_S, "lambda_v": LAMBDA_V,
                "taus": list(taus), "eval_draws": EVAL_DRAWS}
    return ConditionalResult(settings, table, runs)


SHAZEER_NOTE = (
    "What Shazeer et al. 2017 changed: the choice of the k experts is still not "
    "differentiable, but the kept experts' weights are a softmax over their logits, so the "
    "gate learns by ordinary backprop (no REINFORCE, no variance); balance is enforced by "
    "the importance loss and by a load estimate built from the normal CDF of the noisy "
    "logits, which is differentiable; and experts are whole networks chosen top-k per "
    "example, so the computation saved is real and batches of examples per expert stay "
    "large - that is why it scaled to thousands of experts.")
PAPER_CLAIM_A = ("Bengio et al. 2013: REINFORCE unbiased but high variance; straight-through "
                 "and stochastic-times-smooth biased, lower variance")
PAPER_CLAIM_B = ("Bengio et al. 2015: learned block policies keep accuracy close to the dense "
                 "net while evaluating a fraction of the blocks")


def format_table(result: ConditionalResult) -> str:
    est = result.estimators
    lines = [f"A. Gradient estimators vs the exact gradient ({result.settings['problems']} "
             f"random problems, K = {K_GATES} gates; medians over problems)", "",
             "| estimator | rel. bias | rel. variance | cosine(mean, exact) | "
             "error of 1 sample | of 16 | of 1024 |", "|---|---|---|---|---|---|---|"]
    e1, e16, e1k = (sample_error(est, m) for m in (1, 16, 1024))
    for name in ESTIMATORS:
        d = est[name]
        lines.append(f"| {name} | {np.median(d['bias']):.3f} | {np.median(d['variance']):.3f} | "
                     f"{np.median(d['cosine']):.3f} | {e1[name]:.3f} | {e16[name]:.3f} | "
                     f"{e1k[name]:.3f} |")
    lines += ["", f"B. Block-gated network on the 8x8 digits ({result.settings['seeds']} "
              f"seed(s), {result.settings['epochs']} epochs; mean ± 95% t-interval)", "",
              "| policy | blocks used | test accuracy |", "|---|---|---|"]
    for key, runs in result.rows().items():
        lines.append(f"| {key} | {fmt([r.fraction for r in runs])} | "
                     f"{fmt([r.accuracy for r in runs])} |")
    lines += ["", "Paper: " + PAPER_CLAIM_A + ".", "Paper: " + PAPER_CLAIM_B + ".", "",
              SHAZEER_NOTE]
    return "\n".join(lines)


def figure_estimators(result: ConditionalResult) -> Any:
    """Left: each estimator's relative bias and variance (medians over problems). Right: the
    relative error of an average of m samples against m: REINFORCE falls like 1/sqrt(m),
    the biased estimators level off at their bias."""
    import matplotlib.pyplot as plt

    est = result.estimators
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(ESTIMATORS))
    bias = [np.median(est[n]["bias"]) for n in ESTIMATORS]
    var = [np.median(est[n]["variance"]) for n in ESTIMATORS]
    ax1.bar(x - 0.2, bias, 0.4, label="relative bias")
    ax1.bar(x + 0.2, var, 0.4, label="relative variance")
    ax1.set_xticks(x)
    ax1.set_xticklabels([n.replace("-", "-\n", 1) if len(n) > 12 else n for n in ESTIMATORS],
                        fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylim(1e-3, None)  # REINFORCE's bias is 0 (round-off ~1e-16): below the axis
    ax1.text(0.5, 2e-3, "bias 0: unbiased", ha="center", fontsize=8)
    ax1.set_title("exact bias and variance (by enumeration)", fontsize=10)
    ax1.legend(fontsize=8)
    for name in ESTIMATORS:
        ax2.plot(SAMPLES, [sample_error(est, m)[name] for m in SAMPLES], marker="o",
                 label=name)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("samples averaged, m")
    ax2.set_ylabel("relative error of the estimate")
    ax2.set_title("error vs samples: sqrt(bias^2 + var/m)", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_tradeoff(result: ConditionalResult) -> Any:
    """Test accuracy against the fraction of blocks used: learned vs random policies."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for policy, marker in (("learned", "o"), ("random", "x"), ("dense", "s")):
        runs = [r for r in result.gated if r.policy == policy]
        if runs:
            ax.scatter([r.fraction for r in runs], [r.accuracy for r in runs], marker=marker,
                       label=policy)
    ax.set_xlabel("fraction of blocks used")
    ax.set_ylabel("test accuracy")
    ax.set_title("block-gated net on 8x8 digits", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tour_line(fast: bool = True, progress: bool = False) -> dict[str, Any]:
    """One line for ``tinymoe tour``: the estimator table, and tau = 0.25 vs dense/random."""
    result = run(cfg=TOUR if fast else FULL, progress=progress, taus=(0.25,))
    est = result.estimators
    rows = result.rows()
    learned, random, dense = rows["learned tau=0.25"], rows["random tau=0.25"], rows["dense"]
    net = BlockGatedNet(64, 10, N_BLOCKS, BLOCK, rng=0)
    total = sum(p.data.size for p in net.parameters())
    return {
        "stage": "2b · conditional computation",
        "paper": "Bengio, Léonard & Courville 2013; Bengio, Bacon, Pineau & Precup 2015",
        "trained": f"estimators on {result.settings['problems']} enumerable 4-gate problems; "
                   f"block-gated MLP (2 x 8 blocks of 8) on 8x8 digits, REINFORCE + L_b, L_e, "
                   f"L_v, tau 0.25",
        "params": f"{total} / ~{fmt([r.fraction for r in learned], 2)} of the hidden blocks",
        "metric": "rel. bias REINFORCE {:.3f}, ST {:.2f}, STS {:.2f}; rel. variance "
                  "REINFORCE {:.1f}, +baseline {:.1f}, ST {:.2f}; acc. learned {} with {} of "
                  "blocks, random {}, dense {}".format(
                      np.median(est["reinforce"]["bias"]),
                      np.median(est["straight-through"]["bias"]),
                      np.median(est["stochastic-times-smooth"]["bias"]),
                      np.median(est["reinforce"]["variance"]),
                      np.median(est["reinforce+baseline"]["variance"]),
                      np.median(est["straight-through"]["variance"]),
                      fmt([r.accuracy for r in learned], 2),
                      fmt([r.fraction for r in learned], 2),
                      fmt([r.accuracy for r in random], 2), fmt([r.accuracy for r in dense], 2)),
        "paper_claim": PAPER_CLAIM_A + "; " + PAPER_CLAIM_B,
        "figures": {"conditional_2015_estimators": lambda: figure_estimators(result),
                    "conditional_2015_tradeoff": lambda: figure_tradeoff(result)},
    }


def main_conditional(argv: Sequence[str] | None = None) -> int:
    """``tinymoe repro conditional [--seeds N] [--epochs N] [--fast] [--out DIR] [--record]``."""
    return repro_main("conditional", "conditional_2015",
                      "Conditional computation 2013-2015: gradient estimators vs the exact "
                      "gradient, and a block-gated network on digits.", run, format_table,
                      {"conditional_2015_estimators.png": figure_estimators,
                       "conditional_2015_tradeoff.png": figure_tradeoff}, argv)


if __name__ == "__main__":
    raise SystemExit(main_conditional())
