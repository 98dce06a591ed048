"""The rank side of tests/test_mpi.py: ``python -m mpi4py tests/mpi_ranks.py SCENARIO ...``
under ``mpiexec -n D`` (launched by ``tinymoe.parallel.mpi_launch.launch``).

``build(case, D)`` makes one layer and its inputs from fixed seeds; the test builds the
same in one process for the reference, the ranks build it here and run it expert-parallel.
"""
import sys
from pathlib import Path

import numpy as np

import tinymoe as tm
from tinymoe.moe import gshard_layer, sum_losses, switch_layer
from tinymoe.moe.experts import StackedExperts
from tinymoe.moe.layer import MoELayer
from tinymoe.moe.topk_router import TopKRouter

CASES = ("top1-capacity", "top2-capacity", "top1-dropless", "top2-dropless")
T, E, d, f = 32, 4, 6, 8  # tokens, experts, model width, expert width


def build(case, D, seed=0, grouped=True):
    """(layer, x (T, d), cotangent (T, d), per-token router inputs) for ``case``.

    The router is skewed so that the capacity layers drop tokens and the last expert is
    chosen by no token (an empty expert; with D = 4 a rank whose expert gets no rows).
    A capacity router has one group per rank, group_size = T/D (GShard's groups), so that
    its capacity is per rank, as it must be with fixed all-to-all buffers
    (``grouped=False``: no group size, every call is one group, the same on a rank).
    """
    group = T // D if grouped else None
    rng = np.random.default_rng(seed + 100)
    k = 2 if case.startswith("top2") else 1
    if case == "top1-capacity":
        layer = switch_layer(d, E, f, capacity_factor=1.0, group_size=group,
                             router_dtype="float64", dtype=np.float64, rng=seed)
        W, inputs = layer.router.W_r, {"jitter_noise": rng.uniform(0.99, 1.01, size=(T, d))}
    elif case == "top2-capacity":
        layer = gshard_layer(d, E, f, capacity_factor=1.0, group_size=group,
                             router_dtype="float64", dtype=np.float64, rng=seed)
        W, inputs = layer.router.W_g, {"uniform": rng.random(T)}
    else:  # dropless top-k; the balancing loss is a whole-batch statistic: off (see test)
        router = TopKRouter(d, E, k, normalize=k > 1, aux_loss_coef=0.0,
                            router_dtype="float64", rng=seed)
        layer = MoELayer(router, StackedExperts(E, d, f, dtype=np.float64, rng=seed))
        W, inputs = router.W_g, {}
    W.data = 2.0 * rng.standard_normal((d, E))
    W.data[0] = [0.0] * (E - 1) + [-30.0]  # feature 0 is 1 for every token: the last
    x = rng.standard_normal((T, d))         # expert's logit is about -30, it never wins
    x[:, 0] = 1.0
    for name in ("b1", "b2"):
        p = getattr(layer.experts, name)
        p.data = 0.1 * rng.standard_normal(p.shape)
    cot = rng.standard_normal((T, d))
    return layer, x, cot, inputs


def loss_of(y, aux, cot):
    """Σ y·cot + Σ aux: the loss whose gradients are compared."""
    task = (y * tm.tensor(cot)).sum()
    extra = sum_losses(aux.values())
    return task if extra is None else task + extra


def equal(out_path):
    """Every case on this job's D ranks; rank 0 saves what the test compares."""
    from mpi4py import MPI

    from tinymoe.parallel.mpi import MPIExpertParallelMoE, shard

    comm = MPI.COMM_WORLD
    D = comm.Get_size()
    results = {}
    for case in CASES:
        layer, x, cot, inputs = build(case, D)
        model = MPIExpertParallelMoE(layer)
        xs = tm.tensor(shard(x), requires_grad=True)  # (S, d) this rank's tokens
        y, aux = model(xs, **{n: shard(v) for n, v in inputs.items()})
        # L_r = D·Σ_{t in r} y_t·cot_t + aux_r, so (1/D) Σ_r L_r is the one-process loss
        loss_of(y, aux, D * shard(cot)).backward()
        model.sync_gradients()
        grads = model.gather_state(grads=True)
        ys, dxs = comm.gather(y.numpy()), comm.gather(xs.grad / D)  # dL/dx = (1/D) dL_r/dx
        auxes = {n: comm.allreduce(a.item()) / D for n, a in aux.items()}  # mean over ranks
        rows = comm.gather(model.last_counts)
        sent = comm.gather(model.stats.bytes_sent)  # per rank: bytes per collective
        if comm.Get_rank() == 0:
            results[f"{case}/y"] = np.concatenate(ys)
            results[f"{case}/dx"] = np.concatenate(dxs)
            for n, g in grads.items():
                results[f"{case}/grad/{n}"] = g
            for n, a in auxes.items():
                results[f"{case}/aux/{n}"] = np.array(a)
            for name in ("dispatch", "combine", "dispatch.grad", "combine.grad"):
                results[f"{case}/bytes/{name}"] = np.array([b.get(name, -1) for b in sent])
            if rows[0] is not None:
                results[f"{case}/rows"] = np.stack(rows)  # (D_expert, D_src, E/D)
    if comm.Get_rank() == 0:
        np.savez(out_path, **results)


def mismatch(what):
    """Rank 1 disagrees with rank 0: its router drawn from another seed, or (``tokens``) a
    batch of another size: every rank must raise RankMismatchError. ``experts``: launched
    on 3 ranks, 4 experts do not split over them: every rank raises ValueError."""
    from mpi4py import MPI

    from tinymoe.parallel.mpi import MPIExpertParallelMoE, shard

    rank, D = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    if what == "experts":  # E = 4 experts on D = 3 ranks
        layer, *_ = build("top1-dropless", 1)
        MPIExpertParallelMoE(layer)
    layer, x, _, inputs = build("top1-capacity", D,
                                seed=1 if what == "seed" and rank == 1 else 0, grouped=False)
    model = MPIExpertParallelMoE(layer)
    xs, noise = shard(x), shard(inputs["jitter_noise"])
    if rank == 1:  # half a batch: capacity 2 where rank 0 has 4
        xs, noise = xs[:8], noise[:8]
    model(tm.tensor(xs), jitter_noise=noise)


def steps(failure, directory, num_steps="3", resume="fresh"):
    """SGD steps on the top-1 capacity layer; after each, rank 0 writes a checkpoint through
    its CheckpointWriter. ``failure``: none, or rank 1 raises / is killed (SIGKILL) in step
    2 between its forward and its backward, while the others wait in the all-to-all.
    ``resume``: start from the directory's checkpoint (written by a job of any D)."""
    import os
    import signal

    from mpi4py import MPI

    from tinymoe.nn.checkpoint import CheckpointWriter
    from tinymoe.nn.serialization import load
    from tinymoe.parallel.mpi import MPIExpertParallelMoE, save_checkpoint, shard

    comm = MPI.COMM_WORLD
    D, rank = comm.Get_size(), comm.Get_rank()
    layer, x, cot, inputs = build("top1-capacity", D)
    first = 1
    if resume == "resume":  # every rank reads the whole layer, then keeps its experts
        state, meta = load(Path(directory) / "checkpoint.npz")
        layer.load_state_dict(state)
        first = meta["step"] + 1
    model = MPIExpertParallelMoE(layer)
    writer = CheckpointWriter(directory, keep_last=5) if rank == 0 else None
    for step in range(first, int(num_steps) + 1):
        model.zero_grad()
        y, aux = model(tm.tensor(shard(x)), jitter_noise=shard(inputs["jitter_noise"]))
        if step == 2 and rank == 1 and failure == "raise":
            raise RuntimeError("rank 1 fails in step 2, between its forward and backward")
        if step == 2 and rank == 1 and failure == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        loss_of(y, aux, D * shard(cot)).backward()
        model.sync_gradients()
        for p in model.parameters():
            p.data -= LR * p.grad
        save_checkpoint(model, writer, step=step)
    if rank == 0:
        writer.close()
        print(f"{num_steps} steps done")


LR = 0.05


def gradcheck():
    """``tm.gradcheck`` on every rank at once: this rank's tokens and the router's weights
    (perturbed alike on every rank, as the one replicated parameter), float64, for the
    top-1 capacity and the top-2 dropless layers. Rank r's output depends only on its own
    tokens, so central differences of its output give its own gradients before the sync;
    every rank makes the same number of calls, so the collectives stay in step."""
    from mpi4py import MPI

    from tinymoe.parallel.mpi import MPIExpertParallelMoE, shard

    comm = MPI.COMM_WORLD
    for case in ("top1-capacity", "top2-dropless"):
        layer, x, _, inputs = build(case, comm.Get_size())
        model = MPIExpertParallelMoE(layer)
        local = {n: shard(v) for n, v in inputs.items()}
        W = layer.router.W_r if case == "top1-capacity" else layer.router.W_g
        xs = tm.tensor(shard(x), requires_grad=True)
        report = tm.gradcheck(lambda a, w: model(a, **local)[0], [xs, W],
                              names=["x (this rank's tokens)", "router weight"])
        print(f"rank {comm.Get_rank()} {case} gradcheck ok: {bool(report)}", flush=True)


if __name__ == "__main__":
    {"equal": equal, "mismatch": mismatch, "steps": steps, "gradcheck": gradcheck}[
        sys.argv[1]](*sys.argv[2:])
