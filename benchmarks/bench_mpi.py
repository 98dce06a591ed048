"""Expert parallelism over MPI: bytes per all-to-all and a step split into compute and
communication, for D = 1, 2, 4 ranks.

    python benchmarks/bench_mpi.py [--quick] [--ranks 1 2 4]

One MoE layer, the same global batch on every D (T tokens, E experts: each rank owns T/D
tokens and E/D experts), float32, a training step = forward + backward + gradient sync.
Two routings: Switch top-1 with capacity buffers (``MPI_Alltoall``) and top-2 dropless
(counts exchanged, then ``MPI_Alltoallv``). Each job is launched by
``tinymoe.parallel.mpi_launch.launch`` (one thread per rank, ``--oversubscribe``).

Per step, over the timed steps: the wall time of the slowest rank, and the seconds spent
inside MPI calls (mean over ranks; this includes waiting for the slowest rank, since a
collective ends when every rank has joined it): the all-to-alls (with the counts exchange
of the dropless mode), the gradient Allreduce, and the small check of sizes before each
forward; compute = step - communication. Bytes:
what one rank sends to the others in one dispatch all-to-all, against the simulation's
formula ``alltoall_bytes`` for capacity buffers.

On a shared 2-core machine D = 4 runs two ranks per core, so its steps are not faster: the
figures show the split and the bytes, not a speed-up. The tests never assert a timing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table  # noqa: E402

A2A = ("dispatch", "combine", "counts")  # the all-to-alls (and their gradients)
SIZES = {"full": dict(T=2048, d=128, f=256, E=8, steps=10),
         "quick": dict(T=256, d=32, f=64, E=4, steps=3)}


def build(kind: str, T: int, d: int, f: int, E: int, D: int):
    from tinymoe.moe import switch_layer
    from tinymoe.moe.experts import StackedExperts
    from tinymoe.moe.layer import MoELayer
    from tinymoe.moe.topk_router import TopKRouter

    if kind == "top1-capacity":
        return switch_layer(d, E, f, capacity_factor=1.25, group_size=T // D,
                            router_dtype="float32", dtype=np.float32, rng=0)
    return MoELayer(TopKRouter(d, E, 2, router_dtype="float32", rng=0),
                    StackedExperts(E, d, f, dtype=np.float32, rng=0))


def rank_main(size: str, kind: str) -> None:
    """One job: warm-up steps, then timed steps; rank 0 prints one JSON line."""
    from mpi4py import MPI

    import tinymoe as tm
    from tinymoe.parallel.mpi import MPIExpertParallelMoE, shard

    comm = MPI.COMM_WORLD
    D = comm.Get_size()
    s = SIZES[size]
    T, d, f, E, steps = s["T"], s["d"], s["f"], s["E"], s["steps"]
    model = MPIExpertParallelMoE(build(kind, T, d, f, E, D))
    rng = np.random.default_rng(0)
    x = shard(rng.standard_normal((T, d)).astype(np.float32))  # (T/D, d)

    def step():
        model.zero_grad()
        y, aux = model(tm.tensor(x, requires_grad=True))
        loss = (y * y).mean()
        for a in aux.values():
            loss = loss + a
        loss.backward()
        model.sync_gradients()

    for _ in range(2):
        step()
    model.stats.reset()
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - t0
    st = model.stats
    per_rank = comm.gather({"wall": wall, "comm": st.total_seconds,
                            "seconds": st.seconds, "bytes": st.bytes_sent,
                            "calls": st.calls})
    if comm.Get_rank() == 0:
        wall = max(p["wall"] for p in per_rank) / steps
        comm_s = float(np.mean([p["comm"] for p in per_rank])) / steps
        names = sorted(per_rank[0]["seconds"])
        print(json.dumps({
            "D": D, "kind": kind, "step_ms": 1e3 * wall, "comm_ms": 1e3 * comm_s,
            "by_collective_ms": {n: 1e3 * float(np.mean([p["seconds"][n] for p in per_rank]))
                                 / steps for n in names},
            "dispatch_bytes": [p["bytes"].get("dispatch", 0) // steps for p in per_rank]}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small layer, 3 steps")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rank-job", nargs=2, metavar=("SIZE", "KIND"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_job:  # inside mpiexec
        rank_main(*args.rank_job)
        return 0

    from tinymoe.parallel import alltoall_bytes
    from tinymoe.parallel.mpi_launch import launch, mpi_status

    ok, what = mpi_status()
    if not ok:
        print(f"bench_mpi: {what}", file=sys.stderr)
        return 2
    size = "quick" if args.quick else "full"
    s = SIZES[size]
    print(machine())
    print(what)
    print(f"layer: T={s['T']} tokens in all, d={s['d']}, d_ff={s['f']}, E={s['E']}, float32; "
          f"{s['steps']} timed steps of forward + backward + gradient sync\n")
    for kind in ("top1-capacity", "top2-dropless"):
        rows = []
        for D in args.ranks:
            res = launch(D, [__file__, "--rank-job", size, kind], timeout=600)
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads([line for line in res.stdout.splitlines()
                            if line.startswith("{")][-1])  # rank 0's JSON line
            by = r["by_collective_ms"]
            a2a = sum(v for n, v in by.items() if n.split(".")[0] in A2A)
            sent = r["dispatch_bytes"]
            if kind == "top1-capacity":
                formula = alltoall_bytes(s["T"], s["d"], s["E"], D, 1.25, 1, itemsize=4)
                bytes_col = f"{sent[0]:,} (formula {formula:,})" if len(set(sent)) == 1 \
                    else f"{sent} (formula {formula:,})"
            else:
                bytes_col = f"{min(sent):,}-{max(sent):,} (rows that leave)"
            rows.append([D, f"{r['step_ms']:.1f}", f"{r['step_ms'] - r['comm_ms']:.1f}",
                         f"{r['comm_ms']:.1f}", f"{a2a:.1f}", f"{by.get('allreduce', 0):.2f}",
                         bytes_col])
        print(f"{kind}:")
        print(table(["D", "step ms", "compute ms", "comm ms", "all-to-alls ms",
                     "allreduce ms", "dispatch bytes per rank"], rows))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
