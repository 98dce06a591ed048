"""GShard's top-2 gating (Lepikhin et al. 2020) at work in a tiny character LM.

GShard's mechanisms (§2.2, Algorithm 1) are rules rather than a number to reproduce: each
token goes to at most two experts; each expert has ``2S/E`` slots per group of S tokens; all
first choices are placed before any second choice; the second expert is used only with
probability ``2·g2`` (g2 normalised over the two); a token whose experts are both full
passes through the residual; ``ℓ_aux`` (scaled by E², so 1 at uniform) keeps the first
choices spread. The paper's headline, a 600B-parameter translation model trained on 2048
TPU v3 cores in 4 days, is far out of reach; what we can check is that the rules behave as
described while a small model learns.

Measured on held-out batches after training (gate in training mode, so the random routing is
on): how often the second expert is used and its expected rate ``mean(2·g2)``, the share of
first and of second choices dropped, tokens reaching no expert, and ``ℓ_aux · E²``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tinymoe.autograd import no_grad
from tinymoe.app.experiments.switch_2021 import FAST, TOUR, TOUR_FULL, ExperimentConfig
from tinymoe.models.transformer import describe
from tinymoe.app.train import TrainResult, load_data, train, val_batches


@dataclass
class GShardResult:
    result: TrainResult
    second_used: float         # share of tokens whose second choice was active (random routing)
    second_expected: float     # mean of 2·g2 (normalised): the rate Algorithm 1 promises
    first_dropped: float       # share of first choices that found their expert full
    second_dropped: float      # share of active second choices that found their expert full
    tokens_dropped: float      # share of tokens that reached no expert
    aux_loss: float            # ℓ_aux · E², 1 at uniform routing
    capacity: int              # C per group
    val_ids: np.ndarray        # the held-out characters


def routing_stats(res: TrainResult, val_ids: np.ndarray) -> dict[str, float]:
    """Top-2 statistics of the first MoE layer on the held-out batches (random routing on)."""
    model = res.model
    layer = model.moe_layers[0]
    batches = val_batches(val_ids, res.train_config, model.cfg.block_size)
    rows: dict[str, list[float]] = {k: [] for k in ("second_used", "second_expected",
                                                     "first_dropped", "second_dropped",
                                                     "tokens_dropped", "aux_loss")}
    model.train()
    with no_grad():
        for x, _ in batches:
            model(x)
            r = layer.last_routing
            p = r.probs.numpy()
            g = np.take_along_axis(p, r.expert_index, axis=1)  # (T, 2)
            active = r.stats["active"]  # (T, 2): the second choice won its random draw
            rows["second_used"].append(active[:, 1].mean())
            rows["second_expected"].append(np.mean(2 * g[:, 1] / g.sum(1)))
            rows["first_dropped"].append(1.0 - r.kept[:, 0].mean())
            act = active[:, 1]
            rows["second_dropped"].append(float((act & ~r.kept[:, 1]).sum() / max(act.sum(), 1)))
            rows["tokens_dropped"].append(r.dropped_fraction)
            rows["aux_loss"].append(float(r.stats["balance_loss"].item()))  # before its α
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out["capacity"] = int(layer.last_routing.stats["group_capacity"])  # C per group
    return out


def run(fast: bool = True, progress: bool = False, config: ExperimentConfig | None = None,
        capacity_factor: float = 1.0) -> GShardResult:
    """Train the tiny LM with GShard top-2 FFNs every other block and measure the routing.

    Each sequence is one group (S = block_size tokens, C = ceil(2S/E · capacity_factor)).
    """
    cfg = config or (FAST if fast else TOUR)
    data = load_data(cfg.train.val_fraction)
    model_cfg = cfg.model.replace(vocab_size=data[0].vocab_size, kind="top2", jitter=0.0,
                                  capacity_factor=capacity_factor,
                                  group_size=cfg.model.block_size)  # a group per sequence
    res = train(model_cfg, cfg.train, data=data, progress=progress, desc="GShard top-2")
    return GShardResult(result=res, val_ids=data[2], **routing_stats(res, data[2]))


def figure_routing(g: GShardResult) -> Any:
    """Who goes where in one held-out sequence: tokens × experts, the combine weights."""
    from tinymoe import viz

    res = g.result
    layer = res.model.moe_layers[0]
    ids = val_batches(g.val_ids, res.train_config, res.model.cfg.block_size)[0][0][:1]
    res.model.eval()
    with no_grad():
        res.model(ids)
    r = layer.last_routing
    w = r.combine_weight.numpy() * r.kept  # dropped choices weigh nothing
    labels = [repr(c)[1:-1] for c in res.tokenizer.decode(ids[0])]
    return viz.routing_heatmap(r.expert_index, n_experts=layer.num_experts, weights=w,
                               token_labels=labels,
                               title="GShard top-2: kept combine weights, one sequence")


def tour_line(fast: bool = True, progress: bool = False) -> dict[str, Any]:
    """One line for ``tinymoe tour`` (about 15 s with ``fast``; under a minute without)."""
    g = run(progress=progress, config=TOUR if fast else TOUR_FULL)
    res = g.result
    c = res.model_config
    return {
        "stage": "4 · GShard top-2",
        "paper": "Lepikhin et al. 2020",
        "trained": f"char LM, top-2 of {c.num_experts} experts every other block, groups of "
                   f"S = {c.group_size} tokens with C = 2S/E = {g.capacity} slots (cf "
                   f"{c.capacity_factor:g}), random routing, {res.train_config.steps} steps",
        "params": describe(res.model),
        "metric": f"val loss {res.final_val_loss:.3f} nats/char; 2nd expert used for "
                  f"{100 * g.second_used:.0f}% of tokens (mean 2·g2 = "
                  f"{100 * g.second_expected:.0f}%); dropped: 1st choices "
                  f"{100 * g.first_dropped:.1f}%, 2nd {100 * g.second_dropped:.1f}%; "
                  f"ℓ_aux·E² = {g.aux_loss:.2f}",
        "paper_claim": "≤ 2 experts per token, 2S/E slots per group, 1st choices before 2nd, "
                       "2nd expert w.p. 2·g2, ℓ_aux·E² = 1 at uniform (§2.2, Alg. 1)",
        "figures": {"gshard_2020_routing": lambda: figure_routing(g)},
    }
