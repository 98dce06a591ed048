"""One training step of an expert-parallel layer on MPI ranks, saved for comparison.

    python -m tinymoe.parallel.mpi_step OUT.npz --ranks 2          # launches the job
    # runs: mpiexec -n 2 --oversubscribe python -m mpi4py -m tinymoe.parallel.mpi_step OUT.npz

What lesson 07 launches beside its one-process simulation. :func:`build_problem` makes a
layer and its inputs from fixed seeds (no MPI needed: the notebook builds the same); every
rank builds it too, wraps it in :class:`~tinymoe.parallel.mpi.MPIExpertParallelMoE` and
runs one step on its T/D tokens with the job's loss

    L = Σ_t y_t · cot_t + mean over ranks of the auxiliary losses
      = (1/D) Σ_r L_r,   L_r = D · Σ_{t of r} y_t · cot_t + aux_r

then rank 0 gathers and saves, per case, the output ``y`` (T, d), the input gradient ``dx``
(T, d), every parameter gradient (the experts' shards gathered into (E, ...)), the loss,
and the bytes each rank sent in each collective. Two cases: ``capacity`` (a Switch layer,
one capacity group per rank: fixed ``Alltoall`` buffers) and ``dropless`` (top-2 without
capacity: the counts exchange, then ``Alltoallv``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import numpy as np

CASES = ("capacity", "dropless")


def build_problem(case: str, num_ranks: int, *, tokens: int = 32, num_experts: int = 4,
                  d_model: int = 8, d_ff: int = 16, seed: int = 0) -> dict[str, Any]:
    """``{"layer", "x" (T, d), "cot" (T, d), "inputs" (per-token router inputs)}`` in float64,
    the same on every call with the same arguments. The router favours the first expert
    (so the capacity case drops tokens); ``capacity``: a Switch layer with
    ``group_size = T/D``; ``dropless``: a renormalised top-2 router without capacity."""
    import tinymoe as tm
    from tinymoe.moe.experts import StackedExperts
    from tinymoe.moe.layer import MoELayer
    from tinymoe.moe.topk_router import TopKRouter

    T, E, d, D = tokens, num_experts, d_model, num_ranks
    rng = np.random.default_rng(seed + 1)
    if case == "capacity":
        layer = tm.moe.switch_layer(d, E, d_ff, capacity_factor=1.0, group_size=T // D,
                                    router_dtype="float64", dtype=np.float64, rng=seed)
        W, inputs = layer.router.W_r, {"jitter_noise": rng.uniform(0.99, 1.01, (T, d))}
    elif case == "dropless":
        layer = MoELayer(TopKRouter(d, E, 2, normalize=True, aux_loss_coef=0.0,
                                    router_dtype="float64", rng=seed),
                         StackedExperts(E, d, d_ff, dtype=np.float64, rng=seed))
        W, inputs = layer.router.W_g, {}
    else:
        raise ValueError(f"build_problem: case={case!r}; choose one of {CASES}")
    W.data = rng.standard_normal((d, E))
    W.data[0, 0] += 1.5  # feature 0 is 1 for every token: expert 0 is popular
    x = rng.standard_normal((T, d))
    x[:, 0] = 1.0
    for p in (layer.experts.b1, layer.experts.b2):
        p.data = 0.1 * rng.standard_normal(p.shape)
    return {"layer": layer, "x": x, "cot": rng.standard_normal((T, d)), "inputs": inputs}


def run_ranks(out: str, **sizes: Any) -> None:
    """On every rank of the job: both cases, one step each; rank 0 writes ``out`` (.npz)."""
    import tinymoe as tm
    from mpi4py import MPI

    from tinymoe.parallel.mpi import MPIExpertParallelMoE, shard

    comm = MPI.COMM_WORLD
    D, rank = comm.Get_size(), comm.Get_rank()
    saved: dict[str, np.ndarray] = {"num_ranks": np.array(D)}
    for case in CASES:
        p = build_problem(case, D, **sizes)
        model = MPIExpertParallelMoE(p["layer"])
        xs = tm.tensor(shard(p["x"]), requires_grad=True)  # (T/D, d) this rank's tokens
        y, aux = model(xs, **{n: shard(v) for n, v in p["inputs"].items()})
        task = (y * tm.tensor(D * shard(p["cot"]))).sum()  # D · Σ_{t of r} y_t · cot_t
        extra = tm.moe.sum_losses(aux.values())
        loss = task if extra is None else task + extra  # L_r
        loss.backward()
        model.sync_gradients()  # every gradient that of (1/D) Σ_r L_r
        grads = model.gather_state(grads=True)
        ys, dxs = comm.gather(y.numpy()), comm.gather(xs.grad / D)  # dL/dx = (1/D) dL_r/dx
        job_loss = comm.allreduce(loss.item()) / D
        sent = comm.gather(model.stats.bytes_sent)
        if rank == 0:
            saved[f"{case}/y"] = np.concatenate(ys)
            saved[f"{case}/dx"] = np.concatenate(dxs)
            saved[f"{case}/loss"] = np.array(job_loss)
            for name, g in grads.items():
                saved[f"{case}/grad/{name}"] = g
            for name in ("dispatch", "combine", "dispatch.grad", "combine.grad", "counts"):
                saved[f"{case}/bytes/{name}"] = np.array([s.get(name, 0) for s in sent])
    if rank == 0:
        np.savez(out, **saved)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tinymoe.parallel.mpi_step OUT [--ranks D]``: outside an MPI job, launch
    D ranks of this module (through :func:`~tinymoe.parallel.mpi_launch.launch`) and wait;
    inside one (``python -m mpi4py -m tinymoe.parallel.mpi_step OUT``), be a rank."""
    import os

    ap = argparse.ArgumentParser(prog="python -m tinymoe.parallel.mpi_step")
    ap.add_argument("out", help=".npz file rank 0 writes")
    ap.add_argument("--ranks", type=int, default=2, help="D, when launching (default 2)")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args(argv)
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
        run_ranks(args.out)
        return 0
    from tinymoe.parallel.mpi_launch import launch

    res = launch(args.ranks, ["-m", "tinymoe.parallel.mpi_step", args.out],
                 timeout=args.timeout)
    print(res.stdout, end="")
    print(res.stderr, end="", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
