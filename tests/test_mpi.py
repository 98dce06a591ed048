"""Expert parallelism over real MPI ranks (``tinymoe.parallel.mpi``, launched by
``tinymoe.parallel.mpi_launch``): the launcher, ``tinymoe mpi-check``, the layer equal to one
process on 1, 2 and 4 ranks, and the failure story (mismatched configuration, a rank that
raises or is killed). Every job is launched by ``launch`` with a timeout: nothing can hang.

Skipped, with the reason, where mpi4py or mpiexec is missing (``pip install -e ".[mpi]"``).
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tinymoe
import tinymoe as tm
from mpi_ranks import CASES, LR, E, T, build, d, loss_of
from tinymoe.nn.checkpoint import CheckpointWriter
from tinymoe.nn.serialization import load
from tinymoe.parallel import alltoall_bytes, expert_parallel_forward
from tinymoe.process_tags import kill_tagged
from tinymoe.parallel.mpi_launch import (
    ROOT_VARS,
    THREAD_VARS,
    YIELD_VAR,
    launch,
    main_mpi_check,
    mpi_command,
    mpi_env,
    mpi_status,
)

MPI_OK, MPI_WHAT = mpi_status()
needs_mpi = pytest.mark.skipif(not MPI_OK, reason=f"no usable MPI: {MPI_WHAT}")
RANKS = str(Path(__file__).with_name("mpi_ranks.py"))  # the ranks' side of these tests


def routers(f):  # the capacity gates of lesson 04 and the top-k gate of lesson 06 run here
    return pytest.mark.task4_1(pytest.mark.task4_2(pytest.mark.task4_3(
        pytest.mark.task6_1(f))))


def run_ranks(D, *args, timeout=240):
    """``tests/mpi_ranks.py ARGS`` on D ranks; the job's output if it failed."""
    res = launch(D, [RANKS, *map(str, args)], timeout=timeout)
    assert res.returncode == 0, f"mpiexec -n {D} failed:\n{res.stdout[-3000:]}\n" \
                                f"{res.stderr[-3000:]}"
    return res


# --- the launcher ---------------------------------------------------------------------------
def test_environment_allows_root_and_gives_one_thread_per_rank():
    env = mpi_env(env={"PYTHONPATH": "/elsewhere", "OMP_NUM_THREADS": "8"})
    for var, value in ROOT_VARS.items():
        assert env[var] == value
    for var in THREAD_VARS:
        assert env[var] == "1"
    first, *rest = env["PYTHONPATH"].split(os.pathsep)  # this checkout first, for the ranks
    assert Path(first) == Path(tinymoe.__file__).resolve().parents[1] and rest == ["/elsewhere"]
    assert mpi_env(threads=2, env={})["OPENBLAS_NUM_THREADS"] == "2"
    assert env[YIELD_VAR] == "1" and mpi_env(env={YIELD_VAR: "0"})[YIELD_VAR] == "0"


def test_command_runs_python_under_mpi4py_with_oversubscribe():
    cmd = mpi_command(4, ["-m", "x", 3], mpiexec="/opt/mpi/bin/mpiexec")
    assert cmd == ["/opt/mpi/bin/mpiexec", "-n", "4", "--oversubscribe", sys.executable,
                   "-m", "mpi4py", "-m", "x", "3"]
    assert "--oversubscribe" not in mpi_command(2, [], oversubscribe=False, mpiexec="m")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"mpi_command: num_ranks=.* must be an integer"):
            mpi_command(bad, [], mpiexec="m")


@needs_mpi
@pytest.mark.task4_1  # warming the Numba cache runs a capacity layer
def test_mpi_check_runs_an_all_to_all_on_two_ranks(capsys):
    assert main_mpi_check(["-n", "2", "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    assert "Open MPI" in out or "MPICH" in out or "MPI" in out.splitlines()[0]
    assert "rank 0 received [0.0, 100.0]" in out and "rank 1 received [1.0, 101.0]" in out
    assert "all-to-all on 2 ranks: OK" in out


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_job_that_outlives_its_timeout_is_killed_with_every_rank():
    """TimeoutExpired, and no rank left running: Open MPI starts the ranks outside
    mpiexec's process group, so killing that group alone once left them asleep. The ranks
    inherit a tag of this test's own; tests/test_process_tags.py shows the scan finds a
    live tagged process."""
    marker = f"tinymoe-timeout-test-{os.getpid()}-{time.time_ns()}"
    with pytest.raises(subprocess.TimeoutExpired):
        launch(2, ["-c", "import time; time.sleep(600)"], timeout=5, warm=False,
               env={**os.environ, "TINYMOE_TEST_TAG": marker})
    left = kill_tagged("TINYMOE_TEST_TAG", marker)  # never leave them behind
    assert left == [], f"ranks still running after the timeout: {left}"


# --- equal to one process ---------------------------------------------------------------------
@needs_mpi
@routers
@pytest.mark.task7_2  # the dropless cases run the Alltoallv plan
@pytest.mark.parametrize("D", [1, 2, 4])
def test_layer_on_D_ranks_equals_one_process(D, tmp_path):
    """Outputs, input gradients and expert gradients bit for bit; the router's gradient and
    the auxiliary losses to 1e-12 (relative); the bytes of every all-to-all as computed.

    Why the router is not bit for bit: on one process its gradient ``x^T · dlogits`` is one
    matmul summing over all T tokens; over MPI each rank sums its T/D tokens and the
    Allreduce adds the D partial sums: the same terms, added in another order (float64
    rounding, a few 1e-16). Everything else is computed row by row, or by an expert over
    the same rows in the same order (the dropless rows are regrouped into the one-process
    order), and the factors D and 1/D of the job's loss are powers of two, exact.

    In capacity mode the outputs and the input and expert gradients agree to 1e-14 (relative)
    rather than bit for bit: an expert multiplies only the filled rows of its buffer, which on
    one process is one block of n_e rows and over MPI one block per source rank; BLAS picks
    its kernels by the number of rows, and a row can come out one unit in the last place
    apart (seen: 2 of 192 outputs on 4 ranks).
    """
    run_ranks(D, "equal", tmp_path / "out.npz")
    got = np.load(tmp_path / "out.npz")
    for case in CASES:
        layer, x, cot, inputs = build(case, D)
        xt = tm.tensor(x, requires_grad=True)
        y, aux = layer(xt, **inputs)
        loss_of(y, aux, cot).backward()
        r = layer.last_routing
        assert r.counts[-1] == 0, case  # an empty expert
        if r.capacity is not None:
            assert r.dropped_choices.sum() > 0, case  # the capacity bites
        same = (np.testing.assert_array_equal if r.capacity is None else
                lambda a, b, err_msg: np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-17,
                                                                 err_msg=err_msg))
        same(got[f"{case}/y"], y.numpy(), err_msg=case)
        same(got[f"{case}/dx"], xt.grad, err_msg=case)
        for name, p in layer.named_parameters():
            g = got[f"{case}/grad/{name}"]
            if name.startswith("experts."):
                same(g, p.grad, err_msg=f"{case} {name}")
            else:  # replicated: D partial sums added by the Allreduce
                np.testing.assert_allclose(g, p.grad, rtol=1e-12, atol=1e-14,
                                           err_msg=f"{case} {name}")
                assert np.abs(p.grad).max() > 1e-3  # the router is trained
        for name, a in aux.items():
            np.testing.assert_allclose(got[f"{case}/aux/{name}"], a.item(), rtol=1e-12,
                                       atol=1e-15, err_msg=f"{case} aux {name}")
        check_bytes(got, case, layer, x, inputs, D)
        if r.capacity is None:  # rows[q, src, j]: rows rank src sent expert j of rank q
            rows = got[f"{case}/rows"]
            np.testing.assert_array_equal(rows.sum(axis=1).reshape(-1), r.counts)
            if D == 4:
                assert rows[3].sum() == 0  # rank 3's only expert got no rows: empty buffers


def check_bytes(got, case, layer, x, inputs, D):
    """Bytes each rank sent to the others in the four all-to-alls (dispatch, combine, and
    their gradients in the backward pass).

    Capacity buffers: ``alltoall_bytes(T, d, E, D, cf, k)`` in each, padding included, as
    the simulation reports. Dropless: the dispatch (and the combine's gradient) carry the
    rank's own rows bound for other ranks' experts; the combine (and the dispatch's
    gradient) carry back the rows the rank's experts processed for other ranks' tokens."""
    S, El = T // D, E // D
    names = ("dispatch", "combine", "dispatch.grad", "combine.grad")
    if case.endswith("capacity"):
        report = expert_parallel_forward(layer, x, D, **inputs).report
        formula = alltoall_bytes(T, d, E, D, 1.0, layer.k, itemsize=8)
        assert (formula > 0) == (D > 1)
        np.testing.assert_array_equal(report.dispatch_sent, formula)
        np.testing.assert_array_equal(report.combine_sent, formula)
        expected = dict.fromkeys(names, formula)
    else:
        e = layer.last_routing.expert_index  # (T, k)
        home = np.repeat(np.arange(D), S)[:, None]  # (T, 1) the rank owning each token
        away = e // El != home  # (T, k) rows that cross the network
        out = np.array([away[home[:, 0] == r].sum() for r in range(D)]) * d * 8  # (D,)
        into = np.array([(away & (e // El == q)).sum() for q in range(D)]) * d * 8  # (D,)
        assert (out.sum() > 0) == (D > 1)
        expected = {"dispatch": out, "combine.grad": out, "combine": into,
                    "dispatch.grad": into}
    for name in names:
        np.testing.assert_array_equal(got[f"{case}/bytes/{name}"],
                                      np.broadcast_to(expected[name], (D,)),
                                      err_msg=f"{case} {name}")


# --- faults: the job ends, with a clear error, and leaves a good checkpoint -----------------------
@needs_mpi
@routers
@pytest.mark.parametrize("what, message", [
    ("seed", r"router_weights: rank 0 has '[0-9a-f]+', rank 1 has '[0-9a-f]+'"),
    ("tokens", r"forward: the 2 ranks disagree\n  capacity: rank 0 has 4, rank 1 has 2\n"
               r"  tokens: rank 0 has 16, rank 1 has 8"),
])
def test_ranks_that_disagree_stop_the_job_with_the_difference_named(what, message):
    res = launch(2, [RANKS, "mismatch", what], timeout=120)
    assert res.returncode != 0
    assert "RankMismatchError" in res.stderr and re.search(message, res.stderr), res.stderr


@needs_mpi
@routers
def test_experts_that_do_not_split_over_the_ranks_stop_the_job():
    res = launch(3, [RANKS, "mismatch", "experts"], timeout=120)
    assert res.returncode != 0
    assert "ValueError: MPIExpertParallelMoE: num_experts=4 does not split over " \
           "num_devices=3" in res.stderr, res.stderr


def train_one_process(num_steps, ranks=None):
    """The reference for ``mpi_ranks.steps``: the same SGD steps on the whole batch, step i
    with the capacity groups of ``ranks[i]`` ranks (default 2)."""
    ranks = ranks or [2] * num_steps
    layer, x, cot, inputs = build("top1-capacity", ranks[0])
    for D in ranks:
        layer.router.group_size = T // D  # one group per rank of that step's job
        layer.zero_grad()
        y, aux = layer(tm.tensor(x), **inputs)
        loss_of(y, aux, cot).backward()
        for p in layer.parameters():
            p.data -= LR * p.grad
    return dict(layer.named_parameters())


@needs_mpi
@routers
def test_training_steps_write_one_checkpoint_equal_to_one_process(tmp_path):
    res = run_ranks(2, "steps", "none", tmp_path, 3)
    assert "3 steps done" in res.stdout
    state, meta = load(tmp_path / "checkpoint.npz")
    assert meta["step"] == 3 and meta["num_ranks"] == 2
    for name, p in train_one_process(3).items():  # tolerance: the router's Allreduce
        np.testing.assert_allclose(state[name], p.data, rtol=1e-12, atol=1e-14, err_msg=name)


@needs_mpi
@routers
def test_a_run_resumes_on_a_different_number_of_ranks(tmp_path):
    """Step 1 on 2 ranks, steps 2-3 on 4 ranks from its checkpoint (each rank of the new
    job reads the whole layer and keeps its own experts): the one-process steps with the
    capacity groups of 2 then 4 ranks."""
    run_ranks(2, "steps", "none", tmp_path, 1)
    run_ranks(4, "steps", "none", tmp_path, 3, "resume")
    state, meta = load(tmp_path / "checkpoint.npz")
    assert meta["step"] == 3 and meta["num_ranks"] == 4
    assert load(tmp_path / "checkpoint-00000001.npz")[1]["num_ranks"] == 2
    for name, p in train_one_process(3, ranks=[2, 4, 4]).items():
        np.testing.assert_allclose(state[name], p.data, rtol=1e-12, atol=1e-14, err_msg=name)
    assert not (tmp_path / ".lock").exists()  # the writer closed: lock released


@needs_mpi
@routers
@pytest.mark.parametrize("failure", ["raise", "kill"])
def test_a_rank_that_fails_mid_step_ends_the_job(failure, tmp_path):
    """Rank 1 raises (``python -m mpi4py`` turns it into MPI_Abort) or is killed by SIGKILL
    (mpiexec sees it die) in step 2 while rank 0 waits in the all-to-all of the backward:
    the whole job exits non-zero within the launch's timeout (TimeoutExpired would fail
    this test), and the checkpoint of step 1 is intact."""
    res = launch(2, [RANKS, "steps", failure, tmp_path, 3], timeout=120)
    assert res.returncode != 0
    if failure == "raise":
        assert "RuntimeError: rank 1 fails in step 2" in res.stderr
        assert "MPI_ABORT was invoked on rank 1" in res.stderr
    else:
        assert "exited on" in res.stderr and "signal 9" in res.stderr
    assert "steps done" not in res.stdout
    state, meta = load(tmp_path / "checkpoint.npz")  # checksums verified
    assert meta["step"] == 1
    for name, p in train_one_process(1).items():
        np.testing.assert_allclose(state[name], p.data, rtol=1e-12, atol=1e-14, err_msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        [".lock", "checkpoint-00000001.npz", "checkpoint.npz"]  # nothing half-written
    with CheckpointWriter(tmp_path) as writer:  # the dead rank 0's lock is taken over
        assert writer.lock.taken_over is not None



@needs_mpi
@routers
@pytest.mark.task7_2
def test_gradcheck_on_two_ranks():
    """Central differences on every rank at once (float64): each rank's tokens and the
    replicated router weight, top-1 capacity and top-2 dropless; a wrong reverse
    all-to-all fails here (the job aborts with the GradcheckError)."""
    res = run_ranks(2, "gradcheck")
    for rank in (0, 1):
        for case in ("top1-capacity", "top2-dropless"):
            assert f"rank {rank} {case} gradcheck ok: True" in res.stdout, res.stdout


# --- training the character LM over MPI -------------------------------------------------------
TINY_LM = ["--block-size", "8", "--d-model", "16", "--n-layers", "2", "--n-heads", "2",
           "--d-ff", "32", "--num-experts", "4", "--batch-size", "8", "--warmup", "2",
           "--log-every", "1", "--eval-every", "3", "--eval-batches", "2", "--ckpt-every", "3",
           "--dtype", "float64", "--router-dtype", "float64", "--no-progress"]


def train_lm_one_process(out, group_size, phases):
    """The one-process reference: ``tinymoe.app.train.train`` with the same tiny settings,
    run to each number of steps in ``phases`` (a resume between two)."""
    from tinymoe.app.train import TrainConfig, train
    from tinymoe.models.transformer import TransformerConfig

    model_cfg = TransformerConfig(block_size=8, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                  num_experts=4, group_size=group_size, dtype="float64",
                                  router_dtype="float64")
    result = None
    for i, steps in enumerate(phases):
        train_cfg = TrainConfig(steps=steps, batch_size=8, warmup=2, log_every=1,
                                eval_every=3, eval_batches=2, ckpt_every=3)
        result = train(None if i else model_cfg, train_cfg, out=out, resume=i > 0,
                       progress=False)
    return result


def assert_same_run(directory, reference, num_ranks):
    """The MPI run's checkpoint against the one-process run, float64.

    Tolerances, and why: the loss curve to 1e-12 relative (measured: 2e-16) and the
    weights and AdamW moments to 1e-11 absolute (measured: 1e-13). The ranks' partial
    gradients are added by Allreduce in another order than one process's matmul adds the
    tokens, so the last bits differ; the largest difference is in the attention's key bias,
    whose gradient is exactly 0 in exact arithmetic (softmax is shift-invariant), so both
    runs feed rounding noise of ~1e-17 to Adam, which scales it up to steps of ~1e-14.
    """
    state, meta = load(directory / "checkpoint.npz")
    h, ref = meta["history"], reference.history
    assert meta["step"] == ref.steps[-1] and meta["expert_parallel"] == num_ranks
    assert h["steps"] == ref.steps and h["val_steps"] == ref.val_steps
    np.testing.assert_allclose(h["train_loss"], ref.train_loss, rtol=1e-12, atol=0)
    np.testing.assert_allclose(h["router_loss"], ref.router_loss, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(h["val_loss"], ref.val_loss, rtol=1e-12, atol=0)
    assert h["load"] == ref.load and h["demand"] == ref.demand  # the same routing decisions
    one, _ = load(directory.parent / "one" / "checkpoint.npz")
    assert sorted(state) == sorted(one)  # the one-process format: full expert stacks
    for name, value in one.items():
        if value.dtype.kind in "fc":
            np.testing.assert_allclose(state[name], value, rtol=0, atol=1e-11, err_msg=name)
        else:  # the optimizer's kind and step counters
            np.testing.assert_array_equal(state[name], value, err_msg=name)


@needs_mpi
@pytest.mark.task4_1
@pytest.mark.task4_2
@pytest.mark.task4_3
def test_training_the_lm_on_two_ranks_equals_one_process(tmp_path):
    """``tinymoe train --expert-parallel 2`` (it launches mpiexec itself): 6 steps of the
    tiny Switch LM in float64, each rank one capacity group of B·L/D = 32 tokens; the
    one-process run with group_size 32 is the reference. Rank 0 wrote the checkpoints
    (steps 3 and 6) once each, and nothing else is left in the folder."""
    from tinymoe.app.cli import main_train

    out = tmp_path / "ep"
    assert main_train([*TINY_LM, "--steps", "6", "--out", str(out),
                       "--expert-parallel", "2"]) == 0
    reference = train_lm_one_process(tmp_path / "one", 32, [6])
    assert_same_run(out, reference, 2)
    assert load(out / "checkpoint.npz")[1]["model_config"]["group_size"] == 32
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint-00000003.npz", "checkpoint-00000006.npz", "checkpoint-best.npz",
        "checkpoint.npz"]  # no lock, no temporary file


@needs_mpi
@pytest.mark.task4_1
@pytest.mark.task4_2
@pytest.mark.task4_3
def test_training_the_lm_resumes_on_another_number_of_ranks(tmp_path):
    """3 steps on 2 ranks (``mpiexec -n 2 python -m mpi4py -m tinymoe train``), then
    ``--resume`` to step 6 on 4 ranks: the one-process run of 3 steps resumed to 6. The
    capacity groups are fixed at 16 tokens (``--group-size``), so they are the same on 1,
    2 and 4 ranks; each rank of the second job reads the whole checkpoint and keeps its
    expert and its slices of AdamW's moments."""
    from tinymoe.app.cli import main_train

    out = tmp_path / "ep"
    res = launch(2, ["-m", "tinymoe", "train", *TINY_LM, "--steps", "3", "--group-size", "16",
                     "--out", out, "--expert-parallel", "2"], timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "2 ranks: 3 steps" in res.stdout
    assert load(out / "checkpoint.npz")[1]["expert_parallel"] == 2
    assert main_train(["--resume", "--steps", "6", "--out", str(out), "--no-progress",
                       "--expert-parallel", "4"]) == 0
    reference = train_lm_one_process(tmp_path / "one", 16, [3, 6])
    assert_same_run(out, reference, 4)
