"""What the character-LM experiments share: the data, the training loop, the command line.

The 2017 balancing-loss table (:mod:`~tinymoe.app.experiments.table6_2017`) and the modern
routers (:mod:`~tinymoe.app.experiments.modern_2024`) train the same small character LM
(:func:`char_lm_config`) many times, changing only its MoE layer. Every run sees
the same batches (drawn from ``seed + 1``) and is measured on the same held-out batches
(seed 12345), so that differences between runs come from the layer alone.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import tinymoe as tm
from tinymoe.data import CharTokenizer, get_batch, shakespeare, train_val_split
from tinymoe.models.transformer import Transformer, TransformerConfig

EVAL_SEED = 12345  # the held-out batches every run is measured on


def shakespeare_data(val_fraction: float = 0.1) -> tuple[CharTokenizer, np.ndarray, np.ndarray]:
    """``(tokenizer, train ids, validation ids)`` of the shipped Shakespeare."""
    text = shakespeare()
    tok = CharTokenizer(text)
    train_ids, val_ids = train_val_split(tok.encode(text), val_fraction)
    return tok, train_ids, val_ids


def char_lm_config(vocab_size: int, cfg: Any, **ffn: Any) -> TransformerConfig:
    """The char LM of these experiments: ``cfg.n_layers`` (default 1) pre-norm blocks, every
    one with an MoE feed-forward of ``cfg.num_experts`` ReLU experts of width ``cfg.d_ff``
    (top-``cfg.k``), ``tm.nn``'s initialisation and a Linear head. ``ffn`` sets the MoE
    layer: ``kind`` and its settings (e.g. ``w_importance``, ``w_load``).

    The paper's LM put one MoE between two LSTM layers (Shazeer et al. 2017, §5.1); a tiny
    pre-norm transformer is the modern equivalent and trains in minutes in NumPy. The MoE
    layer sees the B·L positions as one batch of tokens, the "convolutional" use of §3.1.
    """
    return TransformerConfig(vocab_size=vocab_size, block_size=cfg.block_size,
                             d_model=cfg.d_model, n_layers=getattr(cfg, "n_layers", 1),
                             n_heads=cfg.n_heads, d_ff=cfg.d_ff, num_experts=cfg.num_experts,
                             k=cfg.k, moe_every=1, activation="relu", init="lecun",
                             tie_embeddings=False, **ffn)


def train_char_lm(model: Transformer, cfg: Any, train_ids: np.ndarray, *, desc: str,
                  progress: bool = False,
                  on_log: Callable[[int, float], None] | None = None) -> None:
    """Adam with linear warm-up and cosine decay to lr/10, gradients clipped to ``cfg.clip``,
    ``cfg.steps`` batches of ``cfg.batch_size x cfg.block_size`` characters.

    ``cfg`` needs ``steps, batch_size, block_size, lr, warmup, clip, seed, log_every``;
    ``on_log(step, cross_entropy)`` runs every ``log_every`` steps and at the last one.
    """
    from tqdm.auto import tqdm

    opt = tm.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = tm.optim.LinearWarmupCosine(cfg.steps, min(cfg.warmup, cfg.steps), cfg.lr,
                                        cfg.lr * 0.1)
    batch_rng = np.random.default_rng(cfg.seed + 1)  # the same batches for every run
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        x, y = get_batch(train_ids, cfg.batch_size, cfg.block_size, batch_rng)
        loss, ce = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        tm.optim.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.lr = sched(step)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            if on_log is not None:
                on_log(step, ce.item())
            bar.set_postfix(ce=f"{ce.item():.3f}")


def held_out_batches(val_ids: np.ndarray, cfg: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """``cfg.eval_batches`` fixed validation batches (the same for every run)."""
    rng = np.random.default_rng(EVAL_SEED)
    return [get_batch(val_ids, cfg.batch_size, cfg.block_size, rng)
            for _ in range(cfg.eval_batches)]


def repro_parser(prog: str, description: str, default_steps: int, fast_steps: int,
                 what: str = "setting") -> argparse.ArgumentParser:
    """``--steps N --fast --json PATH --no-progress`` for a ``tinymoe repro`` command."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--steps", type=int, default=None,
                    help=f"training steps per {what} (default {default_steps}; fast: "
                         f"{fast_steps})")
    ap.add_argument("--fast", action="store_true",
                    help="tiny model and few steps (also TINYMOE_FAST=1)")
    ap.add_argument("--json", default=None, help="also write the full result as JSON here")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def is_fast(args: argparse.Namespace) -> bool:
    return bool(args.fast) or os.environ.get("TINYMOE_FAST") == "1"


def report(result: Any, table: str, json_path: str | None) -> int:
    """Print ``table``; write ``result.to_dict()`` to ``json_path`` if given. Returns 0."""
    print(table)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=1)
    return 0


__all__: Sequence[str] = ["shakespeare_data", "char_lm_config", "train_char_lm", "held_out_batches",
                          "repro_parser", "is_fast", "report", "EVAL_SEED"]
