"""Training the character LM with its MoE layers expert-parallel over MPI ranks.

    tinymoe train --expert-parallel 2 --fast --out runs/ep2          # launches 2 ranks
    mpiexec -n 2 python -m mpi4py -m tinymoe train --expert-parallel 2 --fast --out runs/ep2

(``pip install -e ".[mpi]"``; ``tinymoe train`` comes here only with ``--expert-parallel``,
so one-process training never needs MPI.)

Every rank builds the same :class:`~tinymoe.models.transformer.Transformer` from the same
seed, then replaces each MoE layer by its part of it (:class:`ExpertParallelLayer`: the
router replicated, E/D experts). One step on rank r of D:

    1. every rank draws the global batch (B sequences) from the same generator and keeps
       sequences r·B/D .. (r+1)·B/D - 1: its token shard (data parallel)
    2. forward and backward on its sequences; each MoE layer carries the tokens to the
       ranks of their experts and back (the all-to-alls of :mod:`tinymoe.parallel.mpi`)
    3. the gradients of the job's loss L = (1/D) Σ_r L_r: every replicated parameter
       (embeddings, attention, norms, routers) summed over the ranks by ``Allreduce`` then
       / D; the experts' (already summed over the ranks by the reverse all-to-all) / D
    4. clipping by the global norm: ||g||² = Σ_replicated ||g_p||² + Allreduce(Σ_my experts)
    5. the same AdamW step on every rank: the replicas stay equal, each expert lives once

**Equal to one process** (same seed, same global batch): the one-process run whose capacity
groups are the ranks' token shards, ``group_size`` = B·L/D (the default here; give
``--group-size`` G dividing B·L/D to fix the groups for every D). Each rank draws the
router's noise (jitter, GShard's random routing) for the whole batch from its copy of the
router's generator, the same state everywhere, and keeps its rows, as one process would.
What is not bit for bit: an ``Allreduce`` adds the ranks' partial gradients in another
order than one process's matmul sums its tokens, and the loss is a mean of D means; the
rounding differs in the last bits and training feeds it back. tests/test_mpi.py holds a
float64 run to 1e-12 relative on the loss curve and 1e-11 on the weights (the largest
difference is in the attention's key bias, whose exact gradient is 0: Adam scales the
rounding noise of both runs up to real steps, which change no output).

**Checkpoints** are the one-process format (``tinymoe sample`` and a one-process
``--resume`` read them): rank 0 gathers the experts' shards of the weights and of AdamW's
moments, and writes once, atomically, through its
:class:`~tinymoe.nn.checkpoint.CheckpointWriter` (which holds the folder's lock). A run
resumes on any D that divides E (each rank reads the whole checkpoint, keeps its experts).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Sequence

import numpy as np
from mpi4py import MPI

import tinymoe as tm
from tinymoe.app import train as tr
from tinymoe.autograd import no_grad
from tinymoe.models.transformer import Transformer, TransformerConfig
from tinymoe.nn.checkpoint import CheckpointWriter
from tinymoe.parallel.mpi import MPIExpertParallelMoE, check_same_on_all_ranks
from tinymoe.tensor import Tensor, as_tensor

SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # set by Open MPI's / MPICH's mpiexec
KINDS = ("switch", "top2")  # the MoE kinds with stacked experts a rank can split


def job_size() -> int | None:
    """The number of ranks of the MPI job this process is part of, or None (not in one)."""
    for var in SIZE_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


class ExpertParallelLayer(MPIExpertParallelMoE):
    """:class:`MPIExpertParallelMoE` whose router noise is what one process would draw.

    ``layer(x)`` on S tokens: every rank draws the noise of all D·S tokens from its copy of
    the router's generator (the same state on every rank), in the router's order (jitter
    (D·S, d), then GShard's uniforms (D·S,)), and passes its own S rows to the router.
    """

    def forward(self, x: Any) -> tuple[Tensor, dict[str, Tensor]]:
        x = as_tensor(x)
        S = int(np.prod(x.shape[:-1]))
        return super().forward(x, **self.router_noise(S))

    def router_noise(self, S: int) -> dict[str, np.ndarray]:
        router, T, r = self.router, S * self.num_ranks, self.rank
        mine = slice(r * S, (r + 1) * S)
        inputs = {}
        if router.training and router.jitter > 0:  # as multiplicative_jitter draws it
            noise = router.rng.uniform(1.0 - router.jitter, 1.0 + router.jitter,
                                       size=(T, self.d_model))  # (D·S, d)
            inputs["jitter_noise"] = noise[mine]  # (S, d)
        if getattr(router, "second_policy", None) == "random":  # Top2Gate, train and eval
            inputs["uniform"] = router.rng.random(T)[mine]  # (S,)
        return inputs


# --- the model, split --------------------------------------------------------------------
def split_model(model: Transformer, comm: Any) -> dict[str, slice]:
    """Replace every MoE layer of ``model`` by this rank's :class:`ExpertParallelLayer`, in
    place; returns ``{parameter name: the rows of the full expert stack it holds}`` for the
    expert parameters (the others are replicated)."""
    experts = {}
    for i, block in enumerate(model.blocks):
        if block.is_moe:
            block.ffn = ExpertParallelLayer(block.ffn, comm)
            lo = block.ffn.first_expert
            rows = slice(lo, lo + block.ffn.local_experts)
            for name in block.ffn.expert_parameter_names():
                experts[f"blocks.{i}.ffn.{name}"] = rows
    return experts


def average_gradients(model: Transformer, experts: dict[str, slice], comm: Any) -> None:
    """Gradients of L = (1/D) Σ_r L_r: replicated ones Allreduce-summed, all divided by D."""
    D = comm.Get_size()
    for name, p in model.named_parameters():
        g = np.zeros_like(p.data) if p.grad is None else np.ascontiguousarray(p.grad)
        if name not in experts:
            comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
        p.grad = g / D


def clip_global_norm(model: Transformer, experts: dict[str, slice], max_norm: float,
                     comm: Any) -> float:
    """:func:`tinymoe.optim.clip_grad_norm_` over the whole job: the replicated gradients
    counted once, every rank's experts added by an Allreduce. Returns the norm."""
    sq = {True: 0.0, False: 0.0}
    for name, p in model.named_parameters():
        sq[name in experts] += float(np.sum(np.square(p.grad, dtype=np.float64)))
    total = math.sqrt(sq[False] + comm.allreduce(sq[True], op=MPI.SUM))
    if not math.isfinite(total):
        raise FloatingPointError(f"clip_global_norm: the gradient norm is {total}; training "
                                 f"diverged (lower --lr)")
    scale = min(1.0, max_norm / (total + 1e-6))
    if scale < 1.0:
        for p in model.parameters():
            p.grad = (p.grad * scale).astype(p.grad.dtype, copy=False)
    return total


def _param_names(model: Transformer) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def gather_checkpoint_arrays(model: Transformer, opt: tm.optim.Optimizer,
                             experts: dict[str, slice], comm: Any, root: int = 0
                             ) -> dict[str, np.ndarray] | None:
    """The one-process checkpoint arrays (``model.*``, ``optim.*``) on ``root``, the expert
    shards of weights and AdamW moments gathered in rank order; None elsewhere. Collective."""
    names, D, me = _param_names(model), comm.Get_size(), comm.Get_rank()

    def whole(local: np.ndarray) -> np.ndarray | None:
        local = np.ascontiguousarray(local)
        full = np.empty((D, *local.shape), local.dtype) if me == root else None  # (D, E/D, ..)
        comm.Gather(local, full, root=root)
        return None if full is None else full.reshape(D * local.shape[0], *local.shape[1:])

    out = {}
    for name, value in model.state_dict().items():
        out[f"model.{name}"] = whole(value) if name in experts else value
    for key, value in opt.state_dict().items():
        parts = key.split(".")
        if parts[0] == "state" and names[int(parts[1])] in experts and np.ndim(value) >= 1:
            value = whole(value)  # AdamW's m and v of an expert stack: (E/D, ...) -> (E, ...)
        out[f"optim.{key}"] = value
    return out if me == root else None


def local_optimizer_state(state: dict[str, np.ndarray], names: list[str],
                          experts: dict[str, slice]) -> dict[str, np.ndarray]:
    """A one-process optimizer state cut to this rank: expert moments keep its rows."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "state" and names[int(parts[1])] in experts and np.ndim(value) >= 1:
            value = np.asarray(value)[experts[names[int(parts[1])]]]  # (E/D, ...)
        out[key] = value
    return out


def _everyone(comm: Any, error: str | None, root: int = 0) -> None:
    """Raise on every rank if ``root`` reported an error (the others would wait forever)."""
    error = comm.bcast(error, root=root)
    if error is not None:
        raise ValueError(error)


# --- the loop -------------------------------------------------------------------------------
def train_expert_parallel(model_cfg: TransformerConfig | None, train_cfg: tr.TrainConfig, *,
                          out: str | os.PathLike | None = None, resume: bool = False,
                          overwrite: bool = False, progress: bool = False,
                          force_unlock: bool = False, comm: Any = None) -> tr.History:
    """Train on every rank of ``comm`` (default: the whole job); returns the history (the
    same on every rank). ``out``/``resume``/``overwrite`` as ``tinymoe train``'s; when
    resuming the checkpoint's model config wins, except ``group_size`` when
    ``model_cfg`` (a config or None) sets one."""
    comm = MPI.COMM_WORLD if comm is None else comm
    rank, D = comm.Get_rank(), comm.Get_size()
    path = None if out is None else tr.checkpoint_path(out)
    state, meta, error = None, None, None
    if resume:
        if path is None or not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without --resume")
        state, meta = tm.nn.load(path)  # every rank reads the whole checkpoint
        tr.check_training_meta(meta, path)
        group = None if model_cfg is None else model_cfg.group_size
        model_cfg = tr.config_from_meta(TransformerConfig, meta["model_config"], path)
        if group is not None:
            model_cfg = model_cfg.replace(group_size=group)
    elif path is not None and rank == 0:
        old = sorted(p.name for p in path.parent.glob(f"{path.stem}*.npz"))
        if old and not overwrite:
            error = (f"{path.parent} holds the checkpoints of another run ({', '.join(old)}); "
                     f"continue it with --resume, start over with --overwrite, or choose "
                     f"another --out")
    _everyone(comm, error)
    tok, train_ids, val_ids = tr.load_data(train_cfg.val_fraction)
    model_cfg = (model_cfg or TransformerConfig()).replace(vocab_size=tok.vocab_size)
    if model_cfg.kind not in KINDS:
        raise ValueError(f"tinymoe train --expert-parallel: kind={model_cfg.kind!r} has no "
                         f"experts to split; choose one of {KINDS}")
    B, L = train_cfg.batch_size, model_cfg.block_size
    if B % D:
        raise ValueError(f"tinymoe train --expert-parallel {D}: --batch-size {B} does not "
                         f"split over {D} ranks; use a multiple of {D}")
    S = B // D * L  # tokens per rank
    if model_cfg.group_size is None:
        model_cfg = model_cfg.replace(group_size=S)  # one capacity group per rank
    elif S % model_cfg.group_size:
        raise ValueError(f"tinymoe train --expert-parallel {D}: group_size="
                         f"{model_cfg.group_size} does not divide the {S} tokens of a rank; "
                         f"give --group-size dividing {S}")
    check_same_on_all_ranks({"model": model_cfg.to_dict(), "train": vars(train_cfg).copy()},
                            comm, "train_expert_parallel")
    model = Transformer(model_cfg, rng=train_cfg.seed)
    batch_rng = np.random.default_rng(train_cfg.seed + 1)
    history, start = tr.History(), 0
    if meta is not None:  # the whole model first: splitting keeps this rank's experts
        model_state, optim_state = tr.split_state(state, model_cfg.kind)
        model.load_state_dict(model_state)
    experts = split_model(model, comm)
    names = _param_names(model)
    opt = tr.make_optimizer(model, train_cfg)
    if meta is not None:
        opt.load_state_dict(local_optimizer_state(optim_state, names, experts))
        tr.set_generator_states(model, meta["rng"]["model"])
        batch_rng.bit_generator.state = meta["rng"]["batch"]
        history, start = tr.History.from_dict(meta["history"]), int(meta["step"])
    writer = None
    if path is not None and rank == 0:
        try:
            writer = CheckpointWriter(path.parent, stem=path.stem,
                                      keep_last=train_cfg.keep_last, force_unlock=force_unlock)
            if meta is None:
                writer.clear()
        except Exception as exc:  # a locked folder: every rank stops
            error = f"{type(exc).__name__}: {exc}"
    _everyone(comm, error)
    sched = tm.optim.LinearWarmupCosine(train_cfg.steps, min(train_cfg.warmup, train_cfg.steps),
                                        train_cfg.lr, train_cfg.lr * train_cfg.min_lr_ratio)
    held_out = tr.val_batches(val_ids, train_cfg, L)
    mine = slice(rank * (B // D), (rank + 1) * (B // D))  # this rank's sequences

    def mean(value: float) -> float:
        return comm.allreduce(float(value), op=MPI.SUM) / D

    def validate() -> float:
        states = tr.generator_states(model)
        model.eval()
        try:
            with no_grad():
                return float(np.mean([mean(model.loss(x[mine], y[mine])[1].item())
                                      for x, y in held_out]))
        finally:
            model.train()
            tr.set_generator_states(model, states)

    def save(step: int, val: float) -> None:
        arrays = gather_checkpoint_arrays(model, opt, experts, comm)
        error = None
        if rank == 0:
            try:
                meta = {"step": step, "model_config": model_cfg.to_dict(),
                        "train_config": vars(train_cfg).copy(), "chars": tok.chars,
                        "rng": {"batch": batch_rng.bit_generator.state,
                                "model": tr.generator_states(model)},
                        "history": history.to_dict(), "expert_parallel": D}
                writer.save(arrays, meta, step=step, val_loss=val)
            except Exception as exc:
                error = f"rank 0 could not write step {step}: {type(exc).__name__}: {exc}"
        _everyone(comm, error)

    from tqdm.auto import tqdm

    bar = tqdm(range(start, train_cfg.steps), initial=start, total=train_cfg.steps,
               desc=f"train {model_cfg.kind} on {D} ranks", disable=not progress or rank > 0)
    model.train()
    tick, since = time.perf_counter(), 0
    try:
        for step in bar:
            x, y = tr.get_batch(train_ids, B, L, batch_rng)  # (B, L) the same on every rank
            loss, ce = model.loss(x[mine], y[mine])  # this rank's B/D sequences
            model.zero_grad()
            loss.backward()
            average_gradients(model, experts, comm)
            if train_cfg.clip > 0:
                clip_global_norm(model, experts, train_cfg.clip, comm)
            opt.lr = sched(step)
            opt.step()
            done, since = step + 1, since + 1
            ce_all, loss_all = mean(ce.item()), mean(loss.item())
            if not math.isfinite(loss_all):
                raise FloatingPointError(f"training diverged at step {done}: the loss is "
                                         f"{loss_all}; lower --lr")
            if done % train_cfg.log_every == 0 or done == 1:
                now = time.perf_counter()
                history.steps.append(done)
                history.train_loss.append(ce_all)
                history.router_loss.append(loss_all - ce_all)
                routings = [m.last_routing for m in model.moe_layers]
                history.dropped.append([mean(r.dropped_fraction) for r in routings])
                history.load.append([comm.allreduce(r.counts).tolist() for r in routings])
                history.demand.append([comm.allreduce(r.stats.get("demand", r.counts)
                                                      ).tolist() for r in routings])
                history.step_time.append((now - tick) / since)
                tick, since = now, 0
                bar.set_postfix({"ce": f"{ce_all:.3f}"})
            val = None
            if done % train_cfg.eval_every == 0:
                val = validate()
                history.val_steps.append(done)
                history.val_loss.append(val)
            if path is not None and (done % train_cfg.ckpt_every == 0
                                     or done == train_cfg.steps):
                save(done, val if val is not None else validate())
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return history


def main_expert_parallel(argv: Sequence[str]) -> int:
    """``tinymoe train --expert-parallel D ...``: inside an MPI job of D ranks, train;
    outside one, launch it (``mpiexec -n D python -m mpi4py -m tinymoe train ARGV``) and
    wait for it."""
    argv = list(argv)
    args = tr.build_train_parser().parse_args(argv)
    D = args.expert_parallel
    if D is None or D < 1:
        print(f"tinymoe train: error: --expert-parallel {D} must be >= 1 (MPI ranks)")
        return 2
    if job_size() is None:
        from tinymoe.parallel.mpi_launch import launch, mpi_command

        cmd = ["-m", "tinymoe", "train", *argv]
        print(" ".join(mpi_command(D, cmd)), flush=True)
        return launch(D, cmd, timeout=None, capture=False).returncode
    return _rank_main(args, D)


def _rank_main(args: argparse.Namespace, D: int) -> int:
    """One rank of ``tinymoe train --expert-parallel D`` (errors raise: the job aborts)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if job_size() != D or comm.Get_size() != D:
        raise ValueError(f"tinymoe train: --expert-parallel {D} in a job of "
                         f"{comm.Get_size()} ranks; start it with mpiexec -n {D}")
    model_cfg, train_cfg = tr.configs_from_args(args)
    if args.resume:  # the checkpoint's configs, changed by what the command line gives
        path = tr.checkpoint_path(args.out)
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without "
                                    f"--resume")
        _, meta = tm.nn.load(path)
        tr.check_training_meta(meta, path)
        _, train_cfg = tr.configs_from_args(args, meta)
        model_cfg = None if args.group_size is None else TransformerConfig(
            group_size=args.group_size)
    t0 = time.perf_counter()
    history = train_expert_parallel(model_cfg, train_cfg, out=args.out, resume=args.resume,
                                    overwrite=args.overwrite,
                                    progress=not args.no_progress,
                                    force_unlock=args.force_unlock, comm=comm)
    if comm.Get_rank() == 0:
        last = history.val_loss[-1] if history.val_loss else float("nan")
        print(f"{D} ranks: {train_cfg.steps} steps in {time.perf_counter() - t0:.1f} s; "
              f"train loss {history.train_loss[-1]:.4f}, validation loss {last:.4f} "
              f"nats/char; checkpoint: {tr.checkpoint_path(args.out)}")
    return 0


__all__ = ["ExpertParallelLayer", "average_gradients", "clip_global_norm",
           "gather_checkpoint_arrays", "job_size", "local_optimizer_state", "main_expert_parallel",
           "split_model", "train_expert_parallel"]
