"""``tinymoe train`` and ``tinymoe sample``: train the tiny Switch Transformer on Shakespeare.

    tinymoe train --out runs/switch --steps 2000             # progress bar, checkpoints
    tinymoe train --out runs/switch --steps 4000 --resume    # continue where it stopped
    tinymoe train --kind dense --out runs/dense              # the FLOP-matched baseline
    tinymoe sample --checkpoint runs/switch --prompt "ROMEO:" --temperature 0.8

A checkpoint (``<out>/checkpoint.npz``, written with :func:`tinymoe.nn.save`) holds the
model's weights (``model.*``), the optimizer's state (``optim.*``) and JSON metadata: the
step, both configs, the vocabulary, the training history and the state of **every** random
generator (the batch sampler and the model's jitter / dropout / routing generators). So a
resumed run draws exactly the batches and noise an uninterrupted one would have drawn, and
ends with the same weights, bit for bit.

Checkpoints go through :class:`tinymoe.nn.checkpoint.CheckpointWriter`: saving is atomic
(a temporary file, fsync, then ``os.replace``) and checksummed, a Ctrl-C during a save lets it
finish, the last ``keep_last`` saves are kept (``checkpoint-00000200.npz``) and the one with
the lowest validation loss (``checkpoint-best.npz``), and a lock file (``<out>/.lock``) keeps
a second run from writing the same folder. Ctrl-C during training saves the last completed
step before stopping.

A run that diverges stops (:class:`TrainingDiverged`, exit status 1) before it can save: a
non-finite loss, weight or optimizer state, or a loss above ``divergence_factor`` times the
best validation loss (before the first validation: the first training loss). The message
names the step and the first non-finite tensor; the checkpoints on disk are the last good
ones, and a state holding NaN or inf is never written.

Tip: on a small or shared machine, ``OPENBLAS_NUM_THREADS=1`` (or ``OMP_NUM_THREADS=1``) is
often several times faster for these small matrices.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

import tinymoe as tm
from tinymoe.autograd import no_grad
from tinymoe.data import CharTokenizer, get_batch, shakespeare, train_val_split
from tinymoe.models.transformer import Transformer, TransformerConfig
from tinymoe.nn.checkpoint import CheckpointWriter, LockError, RunLock
from tinymoe.nn.module import Module
from tinymoe.nn.serialization import first_nonfinite

CHECKPOINT_NAME = "checkpoint.npz"
CLI_KINDS = ("switch", "top2", "dense")  # the FFN kinds ``tinymoe train --kind`` offers


@dataclass(frozen=True)
class TrainConfig:
    """How to train (everything besides the model's shape)."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    ckpt_every: int = 200
    seed: int = 0
    val_fraction: float = 0.1
    keep_last: int = 3
    divergence_factor: float = 4.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every",
                     "ckpt_every", "keep_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"TrainConfig: {name}={v!r} must be a positive integer")
        for name in ("warmup", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"TrainConfig: {name}={v!r} must be an integer >= 0")
        for name in ("lr", "min_lr_ratio", "weight_decay", "clip", "val_fraction",
                     "divergence_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or math.isnan(v):
                raise ValueError(f"TrainConfig: {name}={v!r} must be a number")
        if not (0 < self.lr < math.inf):
            raise ValueError(f"TrainConfig: lr={self.lr} must be a finite number > 0 "
                             f"(e.g. 3e-3)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig: min_lr_ratio={self.min_lr_ratio} must be in "
                             f"[0, 1]")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"TrainConfig: weight_decay={self.weight_decay} must be a "
                             f"finite number >= 0")
        if not 0 <= self.clip < math.inf:
            raise ValueError(f"TrainConfig: clip={self.clip} must be a finite number >= 0 "
                             f"(the largest gradient norm; 0 turns clipping off)")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"TrainConfig: val_fraction={self.val_fraction} must be in "
                             f"(0, 1)")
        if not self.divergence_factor > 1:
            raise ValueError(f"TrainConfig: divergence_factor={self.divergence_factor} must "
                             f"be > 1 (stop when the loss exceeds this many times the best "
                             f"validation loss; inf never stops)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class History:
    """What the loop logged. Per logged step: ``steps``, ``train_loss`` (cross-entropy),
    ``router_loss``, ``dropped`` (fraction of tokens dropped, one value per MoE layer),
    ``load`` (tokens kept per expert, one (E,) list per MoE layer), ``demand`` (tokens that
    chose each expert, before dropping, likewise) and ``step_time`` (mean seconds per step
    since the last log). Per evaluation: ``val_steps``, ``val_loss``."""

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    router_loss: list[float] = field(default_factory=list)
    dropped: list[list[float]] = field(default_factory=list)
    load: list[list[list[int]]] = field(default_factory=list)
    demand: list[list[list[int]]] = field(default_factory=list)
    step_time: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        return cls(**{f.name: list(d.get(f.name, [])) for f in fields(cls)})


@dataclass
class TrainResult:
    model: Transformer
    history: History
    tokenizer: CharTokenizer
    model_config: TransformerConfig
    train_config: TrainConfig
    final_val_loss: float
    seconds: float
    checkpoint: Path | None = None


# --- data ----------------------------------------------------------------------------------
def load_data(val_fraction: float = 0.1) -> tuple[CharTokenizer, np.ndarray, np.ndarray]:
    """The shipped Shakespeare: tokenizer, training ids, validation ids (the last 10%)."""
    text = shakespeare()
    tok = CharTokenizer(text)
    train_ids, val_ids = train_val_split(tok.encode(text), val_fraction)
    return tok, train_ids, val_ids


def val_batches(val_ids: np.ndarray, cfg: TrainConfig, block_size: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fixed held-out batches (their own generator: they never touch the training streams)."""
    rng = np.random.default_rng(cfg.seed + 12345)
    return [get_batch(val_ids, cfg.batch_size, block_size, rng) for _ in range(cfg.eval_batches)]


def evaluate(model: Transformer, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean cross-entropy (nats per character) in eval mode: no jitter, no dropout."""
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            return float(np.mean([model.loss(x, y)[1].item() for x, y in batches]))
    finally:
        model.train(was_training)


# --- random generators of a model ------------------------------------------------------------
def model_generators(model: Module) -> dict[str, np.random.Generator]:
    """Every ``np.random.Generator`` held by the model's modules, by dotted path."""
    out = {}
    for name, m in model.named_modules():
        for attr, v in vars(m).items():
            if isinstance(v, np.random.Generator):
                out[f"{name}.{attr}" if name else attr] = v
    return out


def generator_states(model: Module) -> dict[str, Any]:
    return {k: g.bit_generator.state for k, g in model_generators(model).items()}


def set_generator_states(model: Module, states: dict[str, Any]) -> None:
    gens = model_generators(model)
    missing = sorted(set(gens) - set(states))
    if missing:
        raise ValueError(f"set_generator_states: the checkpoint has no state for the "
                         f"generators {missing}; it was written by a different model")
    for k, g in gens.items():
        g.bit_generator.state = states[k]


# --- checkpoints ---------------------------------------------------------------------------
def checkpoint_path(out: str | os.PathLike) -> Path:
    """``out`` itself when it names a ``.npz`` file, else ``out/checkpoint.npz``."""
    p = Path(out)
    return p if p.suffix == ".npz" else p / CHECKPOINT_NAME


def checkpoint_state(model: Transformer, opt: tm.optim.Optimizer, step: int,
                     train_cfg: TrainConfig, tok: CharTokenizer,
                     batch_rng: np.random.Generator, history: History
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(arrays, metadata)`` of one checkpoint: weights, optimizer state, configs,
    vocabulary, RNG states, history."""
    arrays = {f"model.{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"optim.{k}": v for k, v in opt.state_dict().items()})
    meta = {"step": int(step), "model_config": model.cfg.to_dict(),
            "train_config": asdict(train_cfg), "chars": tok.chars,
            "rng": {"batch": batch_rng.bit_generator.state, "model": generator_states(model)},
            "history": history.to_dict()}
    return arrays, meta


_META_TYPES = {"step": int, "model_config": dict, "train_config": dict, "chars": (str, list),
               "rng": dict, "history": dict}


def check_training_meta(meta: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a training checkpoint, its fields' types checked (ValueError naming
    the file and the field, instead of a KeyError deep inside the resume)."""
    for key, typ in _META_TYPES.items():
        v = meta.get(key)
        if v is None or isinstance(v, bool) or not isinstance(v, typ):
            raise ValueError(f"{path}: the checkpoint's metadata has no valid {key!r} "
                             f"(got {type(v).__name__}); it is not a tinymoe training "
                             f"checkpoint, or it was altered")
    if meta["step"] < 0 or not isinstance(meta["rng"].get("model"), dict) \
            or not isinstance(meta["rng"].get("batch"), dict):
        raise ValueError(f"{path}: the checkpoint's step or rng metadata is invalid; it was "
                         f"altered")
    return meta


def config_from_meta(cls: Any, d: dict[str, Any], path: str | os.PathLike) -> Any:
    """``cls.from_dict(d)`` with any error turned into one ValueError naming the file."""
    try:
        return cls.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: the checkpoint's {cls.__name__} is invalid: {e}") from None


class TrainingDiverged(FloatingPointError):
    """The loss or the state went non-finite, or the loss far above the best seen."""


def first_nonfinite_tensor(model: Module, opt: tm.optim.Optimizer | None = None) -> str | None:
    """``model.<name>`` / ``grad of model.<name>`` / ``optim.<name>``: the first non-finite."""
    for name, p in model.named_parameters():
        if not np.isfinite(p.data).all():
            return f"model.{name}"
        if p.grad is not None and not np.isfinite(p.grad).all():
            return f"gradient of model.{name}"
    if opt is not None:
        bad = first_nonfinite(opt.state_dict())
        if bad is not None:
            return f"optim.{bad}"
    return None


def legacy_name(name: str, kind: str) -> str:
    """A weight or generator name of a checkpoint written before every MoE layer was one
    :class:`~tinymoe.moe.layer.MoELayer` (``ffn.gate.router.W_r``, ``ffn.expert_dropout``),
    in today's terms; today's names are returned unchanged."""
    weight = "W_g" if kind == "top2" else "W_r"  # the GShard gate's weight is W_g
    return (name.replace(".ffn.gate.router.W_r", f".ffn.router.{weight}")
            .replace(".ffn.gate.router.rng", ".ffn.router.rng")
            .replace(".ffn.expert_dropout.rng", ".ffn.experts.dropout.rng"))


def split_state(state: dict[str, np.ndarray], kind: str) -> tuple[dict, dict]:
    """``(model weights, optimizer state)`` of a checkpoint's arrays (of a ``kind`` model)."""
    model = {legacy_name(k[len("model."):], kind): v for k, v in state.items()
             if k.startswith("model.")}
    optim = {k[len("optim."):]: v for k, v in state.items() if k.startswith("optim.")}
    return model, optim


def load_model(path: str | os.PathLike, **config_changes: Any
               ) -> tuple[Transformer, CharTokenizer, dict[str, Any]]:
    """The model and tokenizer of a checkpoint (a file, or a folder holding
    ``checkpoint.npz``), and its metadata. ``config_changes`` override settings that do
    not change the weights' shapes (e.g. ``eval_capacity_factor``)."""
    state, meta = tm.nn.load(checkpoint_path(path))
    if "model_config" not in meta:
        raise ValueError(f"load_model: {checkpoint_path(path)} is not a tinymoe training "
                         f"checkpoint (no model_config in its metadata)")
    where = checkpoint_path(path)
    if not isinstance(meta["model_config"], dict) or not isinstance(meta.get("chars"),
                                                                   (str, list)):
        raise ValueError(f"load_model: {where}: the checkpoint's model_config or chars "
                         f"metadata is invalid; it was altered")
    cfg = config_from_meta(TransformerConfig, meta["model_config"], where)
    try:
        cfg = cfg.replace(**config_changes)
        model = Transformer(cfg, rng=0)
        model.load_state_dict(split_state(state, cfg.kind)[0])
        tok = CharTokenizer(meta["chars"])
    except (TypeError, KeyError) as e:
        raise ValueError(f"load_model: {where}: {type(e).__name__}: {e}") from None
    return model, tok, meta


# --- the loop ------------------------------------------------------------------------------
def make_optimizer(model: Transformer, cfg: TrainConfig) -> tm.optim.Optimizer:
    return tm.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(model_cfg: TransformerConfig | None = None, train_cfg: TrainConfig | None = None, *,
          out: str | os.PathLike | None = None, resume: bool = False, progress: bool = True,
          data: tuple[CharTokenizer, np.ndarray, np.ndarray] | None = None,
          desc: str | None = None,
          on_step: Callable[[int, Transformer], None] | None = None,
          force_unlock: bool = False) -> TrainResult:
    """Train a :class:`~tinymoe.models.transformer.Transformer` on Shakespeare characters.

    ``out``: folder (or ``.npz`` path) for the checkpoints, written every ``ckpt_every``
    steps and at the end (see :class:`~tinymoe.nn.checkpoint.CheckpointWriter`); ``None``
    writes nothing. The folder is locked while the run lasts (LockError if another run
    holds it; ``force_unlock=True`` takes it over). ``resume=True`` continues from the
    checkpoint at ``out``: its model config wins, and without ``train_cfg`` its training
    config too. Resuming with the same ``steps`` reproduces the uninterrupted run exactly;
    a larger ``steps`` continues with the learning-rate schedule of the longer run.
    ``data`` = ``(tokenizer, train_ids, val_ids)`` (default: :func:`load_data`).
    ``on_step(step, model)`` is called after every optimizer step (step counted from 1),
    after that step's checkpoint (if any) was written. Raises :class:`TrainingDiverged`
    (nothing saved) when the run diverges (see the module docstring).
    """
    path = None if out is None else checkpoint_path(out)
    lock = None if path is None else RunLock(path.parent, force=force_unlock)
    try:
        return _train(model_cfg, train_cfg, path, lock, resume, progress, data, desc, on_step)
    finally:
        if lock is not None:
            lock.release()


def _train(model_cfg: TransformerConfig | None, train_cfg: TrainConfig | None,
           path: Path | None, lock: RunLock | None, resume: bool, progress: bool,
           data: tuple[CharTokenizer, np.ndarray, np.ndarray] | None, desc: str | None,
           on_step: Callable[[int, Transformer], None] | None) -> TrainResult:
    from tqdm.auto import tqdm

    start_step, history, meta = 0, History(), None
    if resume:
        if path is None or not path.is_file():
            raise FileNotFoundError(f"train: resume=True needs a checkpoint, and there is none "
                                    f"at {path}; start without resuming")
        state, meta = tm.nn.load(path)
        check_training_meta(meta, path)
        model_cfg = config_from_meta(TransformerConfig, meta["model_config"], path)
        train_cfg = train_cfg or config_from_meta(TrainConfig, meta["train_config"], path)
    train_cfg = train_cfg or TrainConfig()
    tok, train_ids, val_ids = data if data is not None else load_data(train_cfg.val_fraction)
    if meta is not None and meta["chars"] != tok.chars:
        raise ValueError("train: the checkpoint's vocabulary differs from the data's")
    model_cfg = model_cfg or TransformerConfig(vocab_size=tok.vocab_size)
    if model_cfg.vocab_size != tok.vocab_size:
        model_cfg = model_cfg.replace(vocab_size=tok.vocab_size)
    model = Transformer(model_cfg, rng=train_cfg.seed)
    opt = make_optimizer(model, train_cfg)
    batch_rng = np.random.default_rng(train_cfg.seed + 1)
    if meta is not None:
        model_state, optim_state = split_state(state, model_cfg.kind)
        try:
            model.load_state_dict(model_state)
            opt.load_state_dict(optim_state)
            set_generator_states(model, {legacy_name(k, model_cfg.kind): v
                                         for k, v in meta["rng"]["model"].items()})
            batch_rng.bit_generator.state = meta["rng"]["batch"]
            history = History.from_dict(meta["history"])
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{path}: cannot resume from this checkpoint: "
                             f"{type(e).__name__}: {e}") from None
        start_step = int(meta["step"])
    writer = None if path is None else CheckpointWriter(
        path.parent, stem=path.stem, keep_last=train_cfg.keep_last, lock=lock or False)
    if writer is not None and meta is None:
        writer.clear()  # a new run: the old run's files would pass for this one's
    sched = tm.optim.LinearWarmupCosine(train_cfg.steps, min(train_cfg.warmup, train_cfg.steps),
                                        train_cfg.lr, train_cfg.lr * train_cfg.min_lr_ratio)
    held_out = val_batches(val_ids, train_cfg, model_cfg.block_size)
    model.train()
    K = train_cfg.divergence_factor
    first_loss = history.train_loss[0] if history.train_loss else None
    best_val = min(history.val_loss, default=math.inf)

    def reference() -> tuple[float | None, str]:
        """What a loss is compared with: the best validation loss, else the first loss."""
        if best_val < math.inf:
            return best_val, "the best validation loss"
        return first_loss, "the first training loss"

    def diverged(step: int, what: str, value: float | None = None, cause: str = "") -> None:
        bad = first_nonfinite_tensor(model)
        tensor = (f"the first non-finite tensor is {bad}" if bad else
                  "every weight is finite")
        where = ("" if path is None else
                 f"; the checkpoints in {path.parent} are the last good ones (continue from "
                 f"one with --resume after lowering --lr)")
        raise TrainingDiverged(
            f"training diverged at step {step}: {what}"
            + ("" if value is None else f" = {value:.6g}") + (f" ({cause})" if cause else "")
            + f"; {tensor}; lower --lr, set --clip (e.g. 1.0), or raise "
              f"--divergence-factor (now {K:g}){where}")

    def check_loss(step: int, what: str, value: float) -> None:
        if not math.isfinite(value):
            diverged(step, f"{what} is not finite", value)
        ref, name = reference()
        if ref is not None and value > K * ref:
            diverged(step, f"{what} is more than {K:g} x {name} ({ref:.4g})", value)

    def validate_now(step: int) -> float:
        """The validation loss of the current weights; a diverged model stops the run."""
        nonlocal best_val
        states = generator_states(model)
        try:
            v = evaluate(model, held_out)
        except FloatingPointError as e:
            diverged(step, "the validation forward pass failed", cause=str(e))
        finally:
            set_generator_states(model, states)  # evaluation draws nothing; be sure
        check_loss(step, "the validation loss", v)
        best_val = min(best_val, v)
        return v

    def save(step: int, val_loss: float | None) -> None:
        if writer is None:
            return
        arrays, meta = checkpoint_state(model, opt, step, train_cfg, tok, batch_rng, history)
        try:
            writer.save(arrays, meta, step=step, val_loss=val_loss)
        except FloatingPointError as e:
            diverged(step, "the state to save is not finite", cause=str(e))

    bar = tqdm(range(start_step, train_cfg.steps), initial=start_step, total=train_cfg.steps,
               desc=desc or f"train {model_cfg.kind}", disable=not progress)
    began = time.perf_counter()
    tick, since = time.perf_counter(), 0
    completed, in_update, snapshot = start_step, False, None
    try:
        for step in bar:
            snapshot = (batch_rng.bit_generator.state, generator_states(model))
            x, y = get_batch(train_ids, train_cfg.batch_size, model_cfg.block_size, batch_rng)
            try:
                loss, ce = model.loss(x, y)
            except FloatingPointError as e:
                diverged(step + 1, "the forward pass failed", cause=str(e))
            if first_loss is None:
                first_loss = float(ce.item())
            check_loss(step + 1, "the training loss", float(ce.item()))
            if not math.isfinite(loss.item()):
                diverged(step + 1, "the loss with its auxiliary terms is not finite",
                         float(loss.item()))
            opt.zero_grad()
            loss.backward()
            if train_cfg.clip > 0:
                tm.optim.clip_grad_norm_(model.parameters(), train_cfg.clip)
            opt.lr = sched(step)
            in_update = True
            opt.step()
            completed, in_update, snapshot = step + 1, False, None
            if (bad := first_nonfinite_tensor(model)) is not None:
                diverged(completed, f"the update made {bad} non-finite")
            since += 1
            if completed % train_cfg.log_every == 0 or completed == 1:
                now = time.perf_counter()
                _log(history, completed, model, ce, loss, (now - tick) / since)
                tick, since = now, 0
                postfix = {"ce": f"{ce.item():.3f}"}
                if history.dropped and history.dropped[-1]:
                    postfix["drop"] = f"{100 * np.mean(history.dropped[-1]):.1f}%"
                if history.val_loss:
                    postfix["val"] = f"{history.val_loss[-1]:.3f}"
                bar.set_postfix(postfix)
            val = None
            if completed % train_cfg.eval_every == 0:
                val = validate_now(completed)
                history.val_steps.append(completed)
                history.val_loss.append(val)
            if writer is not None and (completed % train_cfg.ckpt_every == 0
                                       or completed == train_cfg.steps):
                save(completed, val if val is not None else validate_now(completed))
            if on_step is not None:
                on_step(completed, model)
    except KeyboardInterrupt:
        if not in_update:  # mid-update weights are half-stepped: keep the last checkpoint
            if snapshot is not None:  # the interrupted step drew noise and a batch: undo
                batch_rng.bit_generator.state = snapshot[0]
                set_generator_states(model, snapshot[1])
            if completed > start_step and first_nonfinite_tensor(model) is None:
                save(completed, None)  # atomic, so the previous file stays valid even now
        raise
    finally:
        bar.close()
    final = evaluate(model, held_out)
    return TrainResult(model, history, tok, model_cfg, train_cfg, final,
                       time.perf_counter() - began, path)


def _log(history: History, step: int, model: Transformer, ce: Any, loss: Any,
         step_time: float) -> None:
    history.steps.append(step)
    history.train_loss.append(float(ce.item()))
    history.router_loss.append(float(loss.item() - ce.item()))
    routings = [m.last_routing for m in model.moe_layers]
    history.dropped.append([r.dropped_fraction for r in routings])
    history.load.append([r.counts.tolist() for r in routings])
    history.demand.append([r.stats.get("demand", r.counts).tolist()  # dropless: = counts
                           for r in routings])
    history.step_time.append(float(step_time))


# --- sampling ------------------------------------------------------------------------------
def generate(model: Transformer, tok: CharTokenizer, prompt: str = "\n", length: int = 200,
             temperature: float = 1.0, seed: int | None = 0) -> str:
    """``length`` characters after ``prompt``, one at a time from the model's softmax.

    ``temperature`` divides the logits (0: always the most likely character). The context
    is the last ``block_size`` characters. Eval mode: no jitter, no dropout.
    """
    if temperature < 0:
        raise ValueError(f"generate: temperature={temperature} must be >= 0")
    if length < 0:
        raise ValueError(f"generate: length={length} must be >= 0")
    rng = np.random.default_rng(seed)
    ids = list(tok.encode(prompt or "\n"))
    block = model.cfg.block_size
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for _ in range(length):
                ctx = np.asarray(ids[-block:], dtype=np.int64)[None]  # (1, L)
                logits = model(ctx).numpy()[0, -1].astype(np.float64)  # (V,)
                if temperature == 0:
                    nxt = int(np.argmax(logits))
                else:
                    z = logits / temperature
                    p = np.exp(z - z.max())
                    nxt = int(rng.choice(len(p), p=p / p.sum()))
                ids.append(nxt)
    finally:
        model.train(was_training)
    return tok.decode(np.asarray(ids[len(ids) - length:] if length else [], dtype=np.int64))


# --- command lines -------------------------------------------------------------------------
FAST_MODEL = {"block_size": 32, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64,
              "num_experts": 4}
FAST_TRAIN = {"steps": 60, "batch_size": 8, "warmup": 10, "eval_every": 20, "eval_batches": 2,
              "log_every": 5, "ckpt_every": 20}


def _number(typ: type, name: str, allow_inf: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``typ(text)``, refusing NaN (and inf unless ``allow_inf``)."""
    def parse(text: str) -> Any:
        try:
            v = typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if typ is int else 'a number'}") from None
        if typ is float and (math.isnan(v) or (math.isinf(v) and not allow_inf)):
            raise argparse.ArgumentTypeError(f"{text!r}: give a finite number")
        return v
    parse.__name__ = name
    return parse


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end in one line, ``prog: error: ... (see prog --help)``, exit status 2."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_train_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(
        prog="tinymoe train",
        description="Train the tiny Switch Transformer (or its dense baseline, or a GShard "
                    "top-2 model) on the shipped Shakespeare characters, with checkpoints.")
    ap.add_argument("--out", default="runs/switch",
                    help="folder for checkpoint.npz (default: runs/switch)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from the checkpoint in --out (its model settings win)")
    ap.add_argument("--fast", action="store_true",
                    help="a tiny model and 60 steps (a smoke test; also TINYMOE_FAST=1)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ap.add_argument("--overwrite", action="store_true",
                    help="start a new run in an --out that holds another run's checkpoints "
                         "(deletes them)")
    ap.add_argument("--force-unlock", action="store_true",
                    help="take over --out from a run that is gone (its .lock stayed behind)")
    m = ap.add_argument_group("model")
    m.add_argument("--kind", choices=CLI_KINDS, default="switch")
    defaults = TransformerConfig()
    for name, typ in (("block_size", int), ("d_model", int), ("n_layers", int),
                      ("n_heads", int), ("d_ff", int), ("num_experts", int),
                      ("moe_every", int), ("capacity_factor", float),
                      ("eval_capacity_factor", float), ("group_size", int),
                      ("jitter", float), ("aux_loss_coef", float), ("z_loss_coef", float),
                      ("expert_dropout", float), ("dropout", float), ("init_scale", float)):
        m.add_argument("--" + name.replace("_", "-"), type=_number(typ, name), default=None,
                       help=f"default {getattr(defaults, name)}")
    m.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="precision of the model (default float32)")
    m.add_argument("--router-dtype", choices=["float16", "bfloat16", "float32", "float64"],
                   default=None, help="precision of the router (default float32)")
    t = ap.add_argument_group("training")
    tdefaults = TrainConfig()
    for name, typ in (("steps", int), ("batch_size", int), ("lr", float), ("warmup", int),
                      ("weight_decay", float), ("clip", float), ("eval_every", int),
                      ("eval_batches", int), ("log_every", int), ("ckpt_every", int),
                      ("seed", int), ("keep_last", int), ("divergence_factor", float)):
        t.add_argument("--" + name.replace("_", "-"),
                       type=_number(typ, name, allow_inf=name == "divergence_factor"),
                       default=None, help=f"default {getattr(tdefaults, name)}")
    par = ap.add_argument_group("parallel")
    par.add_argument("--expert-parallel", type=_number(int, "expert_parallel"), default=None,
                     metavar="D",
                     help="train on D MPI ranks, E/D experts and B/D sequences each "
                          "(launches mpiexec -n D unless already inside that MPI job; "
                          "needs pip install -e \".[mpi]\"; see tinymoe.app.train_mpi)")
    return ap


def configs_from_args(args: argparse.Namespace, resume_meta: dict[str, Any] | None = None
                      ) -> tuple[TransformerConfig, TrainConfig]:
    """The configs a command line asks for. When resuming, the checkpoint's training config
    is the base and only the options given on the command line change it (the model config
    always comes from the checkpoint)."""
    fast = args.fast or os.environ.get("TINYMOE_FAST") == "1"
    model_kw: dict[str, Any] = dict(FAST_MODEL) if fast else {}
    if resume_meta is not None:
        train_kw: dict[str, Any] = dict(resume_meta["train_config"])
    else:
        train_kw = dict(FAST_TRAIN) if fast else {}
    model_kw["kind"] = args.kind
    for f in fields(TransformerConfig):
        v = getattr(args, f.name, None)
        if v is not None and f.name != "kind":
            model_kw[f.name] = v
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            train_kw[f.name] = v
    return TransformerConfig(**model_kw), TrainConfig.from_dict(train_kw)


def _earlier(path: Path) -> str:
    """A hint naming the other checkpoints beside ``path`` (to copy over a refused one)."""
    others = sorted(p.name for p in path.parent.glob(f"{path.stem}-*.npz"))
    if not others:
        return ""
    return (f"; other checkpoints in {path.parent}: {', '.join(others)} (copy one over "
            f"{path.name} to resume from it)")


def main_train(argv: Sequence[str] | None = None) -> int:
    """``tinymoe train ...``: see ``tinymoe train --help``. Exit status 0 when done, 2 for a
    bad argument or checkpoint, 1 when the run diverged or --out is locked, 130 on Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_train_parser().parse_args(argv)
    if args.expert_parallel is not None:  # the ranks of an MPI job, or their launcher
        if args.expert_parallel < 1:
            print(f"tinymoe train: error: --expert-parallel {args.expert_parallel} must be "
                  f">= 1 (the number of MPI ranks)")
            return 2
        print("tinymoe train: error: --expert-parallel is run by the tinymoe command "
              "(tinymoe.app.cli.main_train -> tinymoe.app.train_mpi), not by "
              "tinymoe.app.train.main_train, which trains in one process")
        return 2
    path = checkpoint_path(args.out)
    try:
        meta = None
        if args.resume:
            if not path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without "
                                        f"--resume")
            try:
                _, meta = tm.nn.load(path)
            except ValueError as e:
                raise ValueError(f"{e}{_earlier(path)}") from None
            check_training_meta(meta, path)
            config_from_meta(TransformerConfig, meta["model_config"], path)
            print(f"resuming from {path} at step {meta['step']}")
        elif old := sorted(p.name for p in path.parent.glob(f"{path.stem}*.npz")
                           if p.name == path.name or p.name.startswith(path.stem + "-")):
            if not args.overwrite:
                raise ValueError(f"{path.parent} holds the checkpoints of another run "
                                 f"({', '.join(old)}); continue it with --resume, start "
                                 f"over with --overwrite (deletes them), or choose another "
                                 f"--out")
            print(f"note: --overwrite: deleting {', '.join(old)} in {path.parent}")
        model_cfg, train_cfg = configs_from_args(args, meta)
        res = train(model_cfg, train_cfg, out=args.out, resume=args.resume,
                    progress=not args.no_progress, force_unlock=args.force_unlock)
    except KeyboardInterrupt:
        if path.is_file():
            print(f"interrupted; the last completed step is saved in {path} (continue with "
                  f"--resume)")
        else:
            print("interrupted before the first step; nothing was saved")
        return 130
    except (TrainingDiverged, LockError) as e:
        print(f"tinymoe train: error: {e}")
        return 1
    except (ValueError, TypeError, KeyError, FileNotFoundError, FloatingPointError) as e:
        print(f"tinymoe train: error: {e}")
        return 2
    except OSError as e:
        print(f"tinymoe train: error: {e.strerror or e} ({e.filename or args.out}); check "
              f"that --out names a folder you can write")
        return 2
    m = res.model
    drops = [d for row in res.history.dropped[-10:] for d in row]
    print(f"{m.cfg.kind} LM, params {m.num_parameters():,} total / "
          f"{m.active_parameters():,} active; {res.train_config.steps} steps in "
          f"{res.seconds:.0f} s")
    print(f"validation loss {res.final_val_loss:.4f} nats/char"
          + (f"; dropped tokens (last logs) {100 * np.mean(drops):.2f}%" if drops else ""))
    print(f"checkpoint: {res.checkpoint}")
    return 0


def main_sample(argv: Sequence[str] | None = None) -> int:
    """``tinymoe sample --checkpoint PATH [--prompt TEXT] [--length N] [--temperature T]``."""
    ap = OneLineParser(prog="tinymoe sample",
                                 description="Print text sampled from a trained checkpoint.")
    ap.add_argument("--checkpoint", default="runs/switch",
                    help="checkpoint file or the --out folder of tinymoe train")
    ap.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    ap.add_argument("--length", "-n", type=int, default=300, help="characters to generate")
    ap.add_argument("--temperature", type=float, default=0.8,
                    help="softmax temperature; 0 picks the most likely character")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--capacity-factor", type=float, default=None,
                    help="eval capacity factor of the MoE layers (default: the model's)")
    args = ap.parse_args(argv)
    try:
        changes: dict[str, Any] = {"group_size": None}  # the context is one group
        if args.capacity_factor is not None:
            changes["eval_capacity_factor"] = args.capacity_factor
        model, tok, _ = load_model(args.checkpoint, **changes)
        text = generate(model, tok, args.prompt, args.length, args.temperature, args.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"tinymoe sample: error: {e}")
        return 2
    print(args.prompt + text)
    return 0
