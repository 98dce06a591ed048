"""Expert parallelism on real processes: the all-to-all over MPI (``mpi4py``).

The same layer as the simulation in :mod:`tinymoe.parallel.expert_parallel` (GShard,
Lepikhin et al. 2020, §2.2; Switch, Fedus et al. 2021, §2.2), but each of the D "devices" is
an MPI rank, a separate process with its own memory. Rank r owns its S tokens (its shard of
the batch, data parallel) and the E/D experts ``r·E/D .. (r+1)·E/D - 1`` (expert parallel);
the router is replicated. One forward pass on rank r:

    1. route       the gate on its S tokens (the router's weights are the same on every rank)
    2. dispatch    tokens to the ranks holding their experts     (an all-to-all)
    3. experts     its E/D experts on the rows that arrived from every rank
    4. combine     outputs back to the ranks owning the tokens   (an all-to-all, reversed)
    5. y_t = Σ_j w_tj · FFN_{e_tj}(x_t) for its own tokens

Two ways to carry the tokens (``routing.capacity`` decides, as in the one-process layer):

* **capacity buffers** (Switch, GShard): rank r's send buffer is (E, C, d) = D chunks
  (E/D, C, d), padding included, so ``MPI_Alltoall`` moves fixed, equal chunks;
* **dropless** (Mixtral, DeepSeekMoE, MegaBlocks): rank r sends exactly the rows routed to
  each rank's experts, a different number to each, so first the ranks exchange their
  (E/D,) row counts per expert (an ``Alltoall`` of integers), then ``MPI_Alltoallv`` moves
  the rows with those counts. Rows arrive source-major; a fixed permutation regroups them
  expert-major, the layout of the grouped matmul (rows, displacements and permutation:
  :func:`~tinymoe.parallel.alltoallv.alltoallv_plan`).

The backward pass is the same collectives in reverse: an all-to-all is a permutation of
chunks between ranks, and the gradient of a permutation is its inverse, so the gradient of
the combine all-to-all is an all-to-all (fixed chunks: the same call; dropless: send and
receive counts swapped) that carries the gradients of the experts' outputs back to the
experts' ranks, and the gradient of the dispatch all-to-all carries the gradients of the
tokens home. They are autograd Functions here (:class:`AllToAll`, :class:`AllToAllV`), so
``loss.backward()`` on every rank runs them, in the same order on every rank.

**One loss for the job.** Each rank computes a loss ``L_r`` on its own tokens (e.g. the
mean over its shard); the job's loss is the mean ``L = (1/D) Σ_r L_r``, the data-parallel
convention (equal shards make it the mean over the whole batch). After ``backward``,
:meth:`MPIExpertParallelMoE.sync_gradients` makes every gradient the gradient of L:

    replicated (router):  g = (1/D) Σ_r ∂L_r/∂θ           one Allreduce, then / D
    expert on its rank:   g = (1/D) · (what backward left)  already Σ_r ∂L_r/∂θ: the reverse
                                                            all-to-all brought every rank's
                                                            gradients to the expert

Randomness: a router's training noise is drawn by each rank's own copy of the router (the
same generator state on every rank), so for results equal to one process pass the
per-token noise (``jitter_noise``, ``uniform``) of the rank's tokens, as the tests do;
expert dropout draws its masks on the experts' ranks, so it matches one process only
when off.

Every rank must call the layer (and backward) the same number of times with the same
shapes: a collective that one rank skips blocks the others. Each forward first exchanges a
few numbers (tokens, capacity, whether gradients are wanted) and raises the same
ValueError on every rank if they disagree, instead of hanging or mixing buffers.
"""
from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
from mpi4py import MPI

from tinymoe import validate
from tinymoe.autograd import Function, is_grad_enabled
from tinymoe.dispatch.functions import as_dtype, combine, dispatch, kernel_dtype
from tinymoe.dispatch.routing import Routing
from tinymoe.moe.experts import StackedExperts, batched_ffn
from tinymoe.moe.layer import MoELayer
from tinymoe.nn.module import Module
from tinymoe.parallel.alltoallv import AlltoallvPlan, alltoallv_plan
from tinymoe.parallel.expert_parallel import check_layer, check_num_devices
from tinymoe.tensor import Tensor, as_tensor


# --- what crossed the network, and how long it took -------------------------------------------
class CommStats:
    """Per collective name (``dispatch``, ``combine``, ``counts``, ``allreduce``, the backward
    ``dispatch.grad``, ``combine.grad``, and ``agree``, the sizes checked before each
    forward's all-to-alls): calls, bytes, and seconds inside the MPI call (waiting for the
    slowest rank included: a collective ends when every rank has joined it).

    Bytes of an all-to-all are what this rank sends to the other ranks (its own chunk stays
    home and is not counted), the quantity of :func:`~tinymoe.parallel.alltoall_bytes`; of
    an Allreduce, the size of the buffer reduced (the algorithm MPI picks decides how much
    of it crosses the network, about 2·(D-1)/D of it for a ring)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes_sent: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def add(self, name: str, nbytes: int, seconds: float) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.bytes_sent[name] = self.bytes_sent.get(name, 0) + int(nbytes)
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    def reset(self) -> None:
        self.__init__()


def _timed(stats: CommStats | None, name: str, nbytes: int, call: Any, *args: Any) -> None:
    t0 = time.perf_counter()
    call(*args)
    if stats is not None:
        stats.add(name, nbytes, time.perf_counter() - t0)


# --- the collectives, differentiable ------------------------------------------------------
class AllToAll(Function):
    """``recv[src] = send_src[me]`` for (D, *chunk) buffers: ``MPI_Alltoall``, equal chunks.

    Backward: the same call on the gradients (a swap of the rank axes is its own inverse).
    """

    @staticmethod
    def forward(ctx, send, *, comm, stats=None, name="alltoall"):
        ctx.comm, ctx.stats, ctx.name = comm, stats, name
        send = np.ascontiguousarray(send)
        recv = np.empty_like(send)  # (D_src, *chunk)
        away = send.nbytes - send[0].nbytes  # every chunk but the one that stays home
        _timed(stats, name, away, comm.Alltoall, send, recv)
        return recv

    @staticmethod
    def backward(ctx, grad):
        grad = np.ascontiguousarray(grad)
        out = np.empty_like(grad)  # (D_dst, *chunk) gradients of what each rank sent
        away = grad.nbytes - grad[0].nbytes
        _timed(ctx.stats, ctx.name + ".grad", away, ctx.comm.Alltoall, grad, out)
        return (out,)


def _alltoallv(comm: Any, send: np.ndarray, send_rows: np.ndarray, send_displs: np.ndarray,
               recv_rows: np.ndarray, recv_displs: np.ndarray, stats: CommStats | None = None,
               name: str = "alltoallv") -> np.ndarray:
    """Rows ``send`` (N, d), ``send_rows[q]`` of them from row ``send_displs[q]`` for rank q,
    exchanged: (Σ recv_rows, d), ``recv_rows[src]`` rows from each rank at ``recv_displs``."""
    d = send.shape[1]
    send = np.ascontiguousarray(send)
    recv = np.empty((int(recv_rows.sum()), d), dtype=send.dtype)  # (M, d)
    away = (int(send_rows.sum()) - int(send_rows[comm.Get_rank()])) * d * send.itemsize
    _timed(stats, name, away, comm.Alltoallv,  # MPI counts numbers, not rows: times d
           [send, (send_rows * d, send_displs * d)], [recv, (recv_rows * d, recv_displs * d)])
    return recv


class AllToAllV(Function):
    """Rows to ranks, a different number to each: ``MPI_Alltoallv`` with the rows and
    displacements of an :class:`~tinymoe.parallel.alltoallv.AlltoallvPlan`.

    ``send`` (N, d) holds ``plan.send_rows[q]`` rows for rank q, in rank order; returns the
    (Σ recv_rows, d) rows received, ``plan.recv_rows[src]`` from each rank in rank order.
    Backward: the same exchange with sends and receives swapped (the reverse all-to-all).
    """

    @staticmethod
    def forward(ctx, send, *, comm, plan, stats=None, name="alltoallv"):
        ctx.comm, ctx.plan, ctx.stats, ctx.name = comm, plan, stats, name
        return _alltoallv(comm, send, plan.send_rows, plan.send_displs, plan.recv_rows,
                          plan.recv_displs, stats, name)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.plan  # the reverse direction: what arrived goes back where it came from
        return (_alltoallv(ctx.comm, grad, p.recv_rows, p.recv_displs, p.send_rows,
                           p.send_displs, ctx.stats, ctx.name + ".grad"),)


def all_to_all(send: Any, comm: Any, stats: CommStats | None = None,
               name: str = "alltoall") -> Tensor:
    """Differentiable ``MPI_Alltoall`` of ``send`` (D, *chunk): chunk q goes to rank q."""
    return AllToAll.apply(as_tensor(send), comm=comm, stats=stats, name=name)


def all_to_all_v(send: Any, plan: AlltoallvPlan, comm: Any, stats: CommStats | None = None,
                 name: str = "alltoallv") -> Tensor:
    """Differentiable ``MPI_Alltoallv`` of rows as ``plan`` says (see :class:`AllToAllV`)."""
    return AllToAllV.apply(as_tensor(send), comm=comm, plan=plan, stats=stats, name=name)


# --- agreement across ranks -----------------------------------------------------------------
class RankMismatchError(ValueError):
    """The ranks of one job disagree on something they must share (raised on every rank)."""


def check_same_on_all_ranks(value: dict[str, Any], comm: Any, what: str) -> None:
    """Gather ``value`` (a JSON-able dict) from every rank; if any rank's differs from rank
    0's, raise :class:`RankMismatchError` on every rank, naming the keys and the ranks."""
    values = comm.allgather(value)
    bad = {}
    for rank, v in enumerate(values):
        for key in sorted(set(v) | set(values[0])):
            if v.get(key) != values[0].get(key):
                bad.setdefault(key, []).append((rank, v.get(key)))
    if bad:
        lines = [f"  {key}: rank 0 has {values[0].get(key)!r}, "
                 + ", ".join(f"rank {r} has {v!r}" for r, v in diffs)
                 for key, diffs in bad.items()]
        raise RankMismatchError(f"{what}: the {len(values)} ranks disagree\n" + "\n".join(lines)
                                + "\nevery rank must build the same model from the same "
                                  "configuration and seed, and pass the same batch shapes")


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def layer_config(layer: MoELayer) -> dict[str, Any]:
    """What every rank's copy of ``layer`` must share: types, sizes, dtypes, router settings,
    and a digest of the router's weights (replicas must start equal)."""
    router, experts = layer.router, layer.experts
    settings = {k: (str(v) if isinstance(v, np.dtype) else v) for k, v in vars(router).items()
                if not k.startswith("_")
                and isinstance(v, (bool, int, float, str, type(None), np.dtype))}
    return {"router": type(router).__name__, "router_settings": json.dumps(settings,
                                                                          sort_keys=True),
            "d_model": layer.d_model, "num_experts": layer.num_experts, "k": layer.k,
            "d_ff": int(experts.W1.shape[2]), "activation": experts.activation,
            "dtype": str(experts.W1.dtype), "residual": layer.residual,
            "router_weights": _digest([p.data for _, p in router.named_parameters()])}


# --- the layer -------------------------------------------------------------------------------
class MPIExpertParallelMoE(Module):
    """This rank's part of an expert-parallel :class:`~tinymoe.moe.layer.MoELayer`.

    Every rank builds the same full ``layer`` (same configuration, same seed) and wraps it:
    the module keeps the router (replicated) and copies of this rank's E/D experts, named as
    in the layer (``router.*``, ``experts.*``). ``model(x)`` takes this rank's tokens ``x``
    (..., d) and returns ``(y, aux_losses)`` for them, like the layer; the auxiliary losses
    are this rank's (its shard is one group, as GShard's groups). The configuration is
    checked across ranks here (:class:`RankMismatchError` on every rank if they differ).
    """

    def __init__(self, layer: MoELayer, comm: Any = None) -> None:
        super().__init__()
        check_layer(layer, "MPIExpertParallelMoE")
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.num_ranks = self.comm.Get_rank(), self.comm.Get_size()
        D, E = self.num_ranks, layer.num_experts
        check_same_on_all_ranks({"num_ranks": D, **layer_config(layer)}, self.comm,
                                "MPIExpertParallelMoE")
        check_num_devices(D, None, E, "MPIExpertParallelMoE")
        self.num_experts, self.d_model, self.k = E, layer.d_model, layer.k
        self.local_experts = E // D
        lo, hi = self.rank * self.local_experts, (self.rank + 1) * self.local_experts
        self.first_expert = lo
        full = layer.experts
        self.router = layer.router
        self.experts = StackedExperts(hi - lo, full.d_model, full.d_ff, full.activation,
                                      dtype=full.W1.dtype, rng=0, dropout=full.dropout.p)
        for name in ("W1", "b1", "W2", "b2"):  # this rank's slice of the stacked weights
            getattr(self.experts, name).data = getattr(full, name).data[lo:hi].copy()
        self.residual = layer.residual
        self.last_routing: Routing | None = None
        self.last_counts: np.ndarray | None = None  # (D, E/D) rows received per expert
        self.stats = CommStats()  # bytes and seconds of every collective, accumulated

    def _agree(self, x2: Tensor, capacity: int | None) -> None:
        """Every rank calls the same collectives with matching sizes, or all raise."""
        sizes = {"mode": "dropless" if capacity is None else "capacity",
                 "tokens": None if capacity is None else int(x2.shape[0]),  # dropless: free
                 "capacity": capacity,
                 "gradients": [is_grad_enabled(), bool(x2.requires_grad)]}  # same backward
        _timed(self.stats, "agree", 0, check_same_on_all_ranks, sizes, self.comm,
               "MPIExpertParallelMoE.forward")

    def forward(self, x: Any, **router_inputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        x = as_tensor(x)
        validate.last_dim(x, self.d_model, "MPIExpertParallelMoE")
        lead, d = x.shape[:-1], self.d_model
        x2 = x.reshape(-1, d)  # (S, d) this rank's tokens
        routing = self.router(x2, **router_inputs)
        if not isinstance(routing, Routing):
            raise TypeError(f"MPIExpertParallelMoE: the router returned "
                            f"{type(routing).__name__}, not a Routing")
        self._agree(x2, routing.capacity)
        if routing.capacity is None:
            out = self._dropless(x2, routing)
        else:
            out = self._capacity(x2, routing)
        y = as_dtype(combine(kernel_dtype(out), routing), x.dtype)  # (S, d) Σ_j w_tj FFN(x_t)
        if self.residual:
            y = x2 + y  # (S, d)
        self.last_routing = routing
        return y.reshape(*lead, d), routing.aux_losses

    def _capacity(self, x2: Tensor, routing: Routing) -> Tensor:
        """Fixed buffers: (E, C, d) out, Alltoall, E/D experts on D·C rows each, Alltoall back."""
        D, El, d = self.num_ranks, self.local_experts, self.d_model
        dtype = self.experts.W1.dtype
        buf = as_dtype(dispatch(kernel_dtype(x2), routing), dtype)  # (E, C, d) 0 padding
        C = buf.shape[1]
        recv = all_to_all(buf.reshape(D, El, C, d), self.comm, self.stats,
                          "dispatch")  # (D_src, E/D, C, d)
        rows = recv.transpose(1, 0, 2, 3).reshape(El, D * C, d)  # (E/D, D·C, d) group-major
        e = self.experts
        out = batched_ffn(rows, e.W1, e.b1, e.W2, e.b2, e.activation, e.dropout)  # (E/D, D·C, d)
        back = out.reshape(El, D, C, d).transpose(1, 0, 2, 3)  # (D_dst, E/D, C, d)
        home = all_to_all(back, self.comm, self.stats,
                          "combine")  # (D_expert, E/D, C, d) my slots, processed
        self.last_counts = None
        return home.reshape(D * El, C, d)  # (E, C, d)

    def _dropless(self, x2: Tensor, routing: Routing) -> Tensor:
        """Exact rows: counts by Alltoall, rows by Alltoallv, grouped matmul, Alltoallv back.

        Rows arrive source-major; they are regrouped into the order the one-process layer
        gives expert j (all first choices in token order, then all second choices, ...: the
        priority order of the dispatch), so each expert multiplies the same rows in the same
        order, and its gradients are summed in the same order, as on one process.
        """
        D, El, k = self.num_ranks, self.local_experts, routing.k
        rows = dispatch(kernel_dtype(x2), routing)  # (N, d) sorted by expert, choice, token
        e = routing.expert_index  # (S, k)
        per_choice = np.stack([np.bincount(e[:, c], minlength=self.num_experts)
                               for c in range(k)], axis=1).astype(np.int64)  # (E, k)
        send = per_choice.reshape(D, El, k)  # (D_dst, E/D, k) rows for each rank's experts
        counts = np.empty_like(send)  # (D_src, E/D, k) rows each rank sends my experts
        _timed(self.stats, "counts", send.nbytes - send[0].nbytes, self.comm.Alltoall,
               send, counts)  # the counts exchange, before any row moves
        plan = alltoallv_plan(send, counts)  # rows, displacements, expert-major order
        recv = all_to_all_v(rows, plan, self.comm, self.stats, "dispatch")  # (M, d) by source
        out = self.experts(recv[plan.order], plan.offsets)  # (M, d) grouped matmul, by expert
        back = out[np.argsort(plan.order)]  # (M, d) source-major again, to send home
        self.last_counts = counts.sum(axis=2)  # (D_src, E/D)
        reverse = plan._replace(send_rows=plan.recv_rows, send_displs=plan.recv_displs,
                                recv_rows=plan.send_rows, recv_displs=plan.send_displs)
        return all_to_all_v(back, reverse, self.comm, self.stats, "combine")  # (N, d) mine

    # --- after backward ----------------------------------------------------------------------
    def expert_parameter_names(self) -> list[str]:
        return [f"experts.{n}" for n, _ in self.experts.named_parameters()]

    def sync_gradients(self) -> None:
        """Make every gradient that of the job's loss ``L = (1/D) Σ_r L_r``: the replicated
        (router) gradients averaged over the ranks with one ``Allreduce`` each, the expert
        gradients (already summed over the ranks by the reverse all-to-all) divided by D.
        A parameter without a gradient on a rank contributes zeros (every rank calls the
        same Allreduces)."""
        D = self.num_ranks
        experts = set(self.expert_parameter_names())
        for name, p in self.named_parameters():
            if p.grad is None:
                p.grad = np.zeros_like(p.data)
            if name not in experts:
                grad = np.ascontiguousarray(p.grad)
                _timed(self.stats, "allreduce", grad.nbytes, self.comm.Allreduce, MPI.IN_PLACE,
                       grad, MPI.SUM)
                p.grad = grad
            p.grad = p.grad / D

    def gather_state(self, root: int = 0, *, grads: bool = False
                     ) -> dict[str, np.ndarray] | None:
        """The full layer's parameters (``grads=True``: their gradients) on rank ``root``, the
        experts' shards gathered in rank order into (E, ...), with the layer's names; None on
        the other ranks. For checkpoints: one rank writes, every rank must call this."""
        experts = set(self.expert_parameter_names())
        state: dict[str, np.ndarray] = {}
        for name, p in self.named_parameters():
            value = p.data if not grads else (np.zeros_like(p.data) if p.grad is None
                                              else p.grad)
            if name in experts:
                local = np.ascontiguousarray(value)
                full = np.empty((self.num_ranks, *local.shape), local.dtype) \
                    if self.rank == root else None  # (D, E/D, ...)
                self.comm.Gather(local, full, root=root)
                if self.rank == root:
                    state[name] = full.reshape(self.num_experts, *local.shape[1:])  # (E, ...)
            elif self.rank == root:
                state[name] = np.array(value, copy=True)
        return state if self.rank == root else None

    def extra_repr(self) -> str:
        lo = self.first_expert
        return (f"rank {self.rank} of {self.num_ranks}, experts {lo}..{lo + self.local_experts - 1}"
                f" of {self.num_experts}")


def save_checkpoint(model: MPIExpertParallelMoE, writer: Any, *, step: int,
                    metadata: dict[str, Any] | None = None, val_loss: float | None = None,
                    root: int = 0) -> None:
    """One checkpoint of the whole layer, written once: every rank calls this; rank ``root``
    gathers the experts' shards (:meth:`~MPIExpertParallelMoE.gather_state`) and writes them
    through its :class:`~tinymoe.nn.checkpoint.CheckpointWriter` ``writer`` (None on the
    other ranks), which writes atomically and holds the directory's lock. If the write
    fails, every rank raises (the others would otherwise wait in the next collective)."""
    comm = model.comm
    state = model.gather_state(root)
    error = None
    if comm.Get_rank() == root:
        try:
            meta = {"num_ranks": model.num_ranks, **(metadata or {})}
            writer.save(state, meta, step=step, val_loss=val_loss)
        except Exception as exc:  # told to every rank below, raised on every rank
            error = f"{type(exc).__name__}: {exc}"
    error = comm.bcast(error, root=root)
    if error is not None:
        raise RuntimeError(f"save_checkpoint: rank {root} could not write step {step}: {error}")


def shard(a: Any, comm: Any = None) -> Any:
    """This rank's equal share of the rows of ``a`` (T, ...): rows ``r·T/D .. (r+1)·T/D``."""
    comm = MPI.COMM_WORLD if comm is None else comm
    a = np.asarray(a)
    D, r = comm.Get_size(), comm.Get_rank()
    if a.shape[0] % D:
        raise ValueError(f"shard: {a.shape[0]} rows do not split over {D} ranks; use a "
                         f"batch of a multiple of {D} tokens")
    S = a.shape[0] // D
    return a[r * S:(r + 1) * S]  # (S, ...)


__all__ = ["AllToAll", "AllToAllV", "CommStats", "MPIExpertParallelMoE", "RankMismatchError",
           "all_to_all", "all_to_all_v", "check_same_on_all_ranks", "layer_config",
           "save_checkpoint", "shard"]
