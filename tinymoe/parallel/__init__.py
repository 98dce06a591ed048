"""``tinymoe.parallel``: what it takes to run experts across machines.

- expert parallelism simulated on D devices in one process, the all-to-all collective
  that carries tokens to their experts and back, and a report of the bytes it moves:
  ``expert_parallel``; the plan of a variable-size all-to-all (the counts exchange of the
  dropless mode): ``alltoallv``
- the same layer on real processes, one MPI rank per device (``pip install -e ".[mpi]"``;
  not imported here, so tinymoe works without MPI): ``mpi``, and the launcher of every MPI
  job, ``mpi_launch`` (the char LM trained over MPI, ``tinymoe train --expert-parallel D``,
  is the app ``tinymoe.app.train_mpi``)
"""
from tinymoe.parallel.alltoallv import AlltoallvPlan, alltoallv_plan, exchange_counts
from tinymoe.parallel.expert_parallel import (
    CommReport,
    ExpertParallelMoE,
    ExpertParallelOutput,
    all_to_all,
    alltoall_bytes,
    check_num_devices,
    expert_parallel_forward,
)

__all__ = ["AlltoallvPlan", "CommReport", "ExpertParallelMoE", "ExpertParallelOutput",
           "all_to_all", "alltoall_bytes", "alltoallv_plan", "check_num_devices", "exchange_counts",
           "expert_parallel_forward"]
