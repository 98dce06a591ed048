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

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from tinymoe.app import records
from tinymoe.autograd import no_grad
from tinymoe.app.experiments.switch_2021 import (FAST, TOUR, TOUR_FULL, ExperimentConfig,
                                                 held_out_stats)
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


# --- ``tinymoe repro gshard``: top-2 against Switch top-1 at equal capacity, over seeds ------
# name -> how the run's FFNs differ from the shared config. Every MoE run routes one group per
# sequence (S = block_size tokens). Slots per expert and group: top-2 at cf 1 has
# C = 2S/E, the same as top-1 at cf 2 ("equal capacity"); top-1 at cf 1 has S/E.
COMPARE: dict[str, dict[str, Any]] = {
    "dense": {"kind": "dense"},
    "switch top-1, cf 1": {"kind": "switch", "capacity_factor": 1.0},
    "switch top-1, cf 2": {"kind": "switch", "capacity_factor": 2.0},
    "gshard top-2, cf 1": {"kind": "top2", "capacity_factor": 1.0, "jitter": 0.0},
}
# The full comparison: the tour's Switch model (d 32, 2 blocks, 8 experts of d_ff 128,
# batches of 16 x 32), 500 steps: cheap enough for 5 seeds x 4 runs in a few minutes.
COMPARE_FULL = TOUR
COMPARE_FAST = ExperimentConfig(FAST.model, replace(FAST.train, steps=30, eval_every=30))


def compare_run(name: str, cfg: ExperimentConfig, seed: int, data: tuple,
                progress: bool = False) -> dict[str, Any]:
    """Train run ``name`` of :data:`COMPARE` from ``seed``; its figures as a dict."""
    model_cfg = cfg.model.replace(vocab_size=data[0].vocab_size,
                                  group_size=cfg.model.block_size, **COMPARE[name])
    train_cfg = replace(cfg.train, seed=int(seed))
    start = time.perf_counter()
    res = train(model_cfg, train_cfg, data=data, progress=progress, desc=f"{name} s{seed}")
    out: dict[str, Any] = {
        "val_loss": res.final_val_loss, "params": describe(res.model),
        "flops_per_token": res.model.flops_per_token(),
        "train_dropped": float(np.mean([d for row in res.history.dropped for d in row]))
        if res.history.dropped and res.history.dropped[0] else 0.0}
    if model_cfg.kind == "switch":
        batches = val_batches(data[2], train_cfg, model_cfg.block_size)
        out["val_dropped"] = held_out_stats(res.model, batches)[0]
    elif model_cfg.kind == "top2":
        stats = routing_stats(res, data[2])
        out["val_dropped"] = stats.pop("tokens_dropped")
        out.update(stats)
    out["seconds"] = time.perf_counter() - start
    return out


def compare(seeds: Sequence[int], fast: bool = False, progress: bool = False,
            runs: Sequence[str] = tuple(COMPARE)) -> dict[str, Any]:
    """Every run of ``runs`` from every seed (each seed: the same weights' seed and the same
    batches for every run), the per-seed figures and, per run, mean and 95 % interval over
    the seeds, with the paired differences from ``gshard top-2, cf 1``."""
    from tinymoe.app.render import ci95

    cfg = COMPARE_FAST if fast else COMPARE_FULL
    data = load_data(cfg.train.val_fraction)
    per_seed = {str(s): {n: compare_run(n, cfg, s, data, progress) for n in runs}
                for s in seeds}
    summary: dict[str, Any] = {}
    for n in runs:
        row = {}
        for key in ("val_loss", "train_dropped", "val_dropped"):
            xs = [per_seed[str(s)][n].get(key, 0.0) for s in seeds]
            row[key] = {"mean": float(np.mean(xs)), "min": float(min(xs)),
                        "max": float(max(xs)),
                        "ci95": ci95(xs) if len(xs) > 1 else "n/a (one seed)"}
        if "gshard top-2, cf 1" in runs and n != "gshard top-2, cf 1":
            d = [per_seed[str(s)][n]["val_loss"] - per_seed[str(s)]["gshard top-2, cf 1"]
                 ["val_loss"] for s in seeds]
            row["minus_gshard"] = {"per_seed": d, "mean": float(np.mean(d)),
                                   "ci95": ci95(d) if len(d) > 1 else "n/a (one seed)"}
        summary[n] = row
    return {"config": {"model": asdict(cfg.model), "train": asdict(cfg.train)},
            "per_seed": per_seed, "summary": summary, "fast": fast}


def format_compare(result: dict[str, Any]) -> str:
    m, t = result["config"]["model"], result["config"]["train"]
    S, E = m["block_size"], m["num_experts"]
    seeds = list(result["per_seed"])
    lines = [f"GShard top-2 vs Switch top-1, char LM d {m['d_model']}, {m['n_layers']} blocks "
             f"(MoE every {m['moe_every']}), E = {E}, groups of S = {S} tokens; {t['steps']} "
             f"steps of {t['batch_size']}x{S}; seeds {', '.join(seeds)}"
             f"{' (fast)' if result['fast'] else ''}", "",
             "| run | slots per expert | FLOPs/token | val loss (mean ± 95 %) | "
             "minus top-2 | dropped % train | dropped % held-out |",
             "|---|---|---|---|---|---|---|"]
    first = result["per_seed"][seeds[0]]
    for n, row in result["summary"].items():
        spec = COMPARE[n]
        k = 2 if spec["kind"] == "top2" else 1
        slots = "—" if spec["kind"] == "dense" else \
            f"{int(np.ceil(k * S / E * spec['capacity_factor']))}"
        vl = row["val_loss"]
        ci = vl["ci95"] if isinstance(vl["ci95"], str) else f"{vl['ci95']:.3f}"
        diff = row.get("minus_gshard")
        dtext = "—" if diff is None else (f"{diff['mean']:+.3f}" + (
            "" if isinstance(diff["ci95"], str) else f" ± {diff['ci95']:.3f}"))
        lines.append(f"| {n} | {slots} | {first[n]['flops_per_token']:,} | "
                     f"{vl['mean']:.3f} ± {ci} | {dtext} | "
                     f"{100 * row['train_dropped']['mean']:.1f} | "
                     f"{100 * row['val_dropped']['mean']:.1f} |")
    g = [result["per_seed"][s].get("gshard top-2, cf 1") for s in seeds]
    if all(g):
        mean = {k: float(np.mean([x[k] for x in g])) for k in
                ("second_used", "second_expected", "first_dropped", "second_dropped",
                 "aux_loss")}
        lines += ["", f"GShard routing (held-out, random routing on, mean over seeds): second "
                      f"expert used {100 * mean['second_used']:.1f}% of tokens (mean 2·g2 = "
                      f"{100 * mean['second_expected']:.1f}%); first choices dropped "
                      f"{100 * mean['first_dropped']:.2f}%, active second choices "
                      f"{100 * mean['second_dropped']:.1f}%; ℓ_aux·E² = {mean['aux_loss']:.2f}"]
    return "\n".join(lines)


def main_gshard(argv: Sequence[str] | None = None) -> int:
    """``tinymoe repro gshard [--seeds N] [--fast] [--record] [--no-progress]``."""
    ap = argparse.ArgumentParser(prog="tinymoe repro gshard",
                                 description="GShard top-2 with capacity and random routing "
                                             "(Lepikhin et al. 2020, Algorithm 1) against "
                                             "Switch top-1 at equal capacity, over seeds.")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5; fast: 2)")
    ap.add_argument("--fast", action="store_true", help="tiny model, 30 steps")
    ap.add_argument("--no-progress", action="store_true")
    records.add_record_argument(ap)
    args = ap.parse_args(argv)
    fast = args.fast or os.environ.get("TINYMOE_FAST") == "1"
    if args.seeds < 1:
        ap.error(f"--seeds {args.seeds} must be >= 1")
    seeds = list(range(min(args.seeds, 2) if fast else args.seeds))
    start = time.perf_counter()
    result = compare(seeds, fast=fast, progress=not args.no_progress)
    print(format_compare(result))
    if args.record:
        path = records.record(
            "gshard", argv=["gshard", *(argv or [])], seeds=seeds,
            settings={**result["config"], "runs": COMPARE},
            results={"seconds": time.perf_counter() - start,
                     "per_seed": records.compact(result["per_seed"]),
                     "summary": records.compact(result["summary"])}, fast=fast)
        print("recorded", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_gshard())
