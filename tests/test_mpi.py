"""Expert parallelism over real MPI ranks (``tinymoe.parallel.mpi``, launched by
``tinymoe.parallel.mpi_launch``): the launcher, ``tinymoe mpi-check``, the layer equal to one
process on 1, 2 and 4 ranks, and the failure story (mismatched configuration, a rank that
raises or is killed). Every job is launched by ``launch`` with a timeout: nothing can hang.

Skipped, with the reason, where mpi4py or mpiexec is missing (``pip install -e ".[mpi]"``).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tinymoe
from tinymoe.parallel.mpi_launch import (
    ROOT_VARS,
    THREAD_VARS,
    launch,
    main_mpi_check,
    mpi_command,
    mpi_env,
    mpi_status,
)

MPI_OK, MPI_WHAT = mpi_status()
needs_mpi = pytest.mark.skipif(not MPI_OK, reason=f"no usable MPI: {MPI_WHAT}")


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


def test_command_runs_python_under_mpi4py_with_oversubscribe():
    cmd = mpi_command(4, ["-m", "x", 3], mpiexec="/opt/mpi/bin/mpiexec")
    assert cmd == ["/opt/mpi/bin/mpiexec", "-n", "4", "--oversubscribe", sys.executable,
                   "-m", "mpi4py", "-m", "x", "3"]
    assert "--oversubscribe" not in mpi_command(2, [], oversubscribe=False, mpiexec="m")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"mpi_command: num_ranks=.* must be an integer"):
            mpi_command(bad, [], mpiexec="m")


@needs_mpi
def test_mpi_check_runs_an_all_to_all_on_two_ranks(capsys):
    assert main_mpi_check(["-n", "2", "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    assert "Open MPI" in out or "MPICH" in out or "MPI" in out.splitlines()[0]
    assert "rank 0 received [0.0, 100.0]" in out and "rank 1 received [1.0, 101.0]" in out
    assert "all-to-all on 2 ranks: OK" in out


@needs_mpi
def test_a_job_that_outlives_its_timeout_is_killed():
    with pytest.raises(subprocess.TimeoutExpired):
        launch(2, ["-c", "import time; time.sleep(600)"], timeout=5, warm=False)
