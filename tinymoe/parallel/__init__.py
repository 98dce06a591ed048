"""``tinymoe.parallel``: what it takes to run experts across machines.

- expert parallelism simulated on D devices in one process, the all-to-all collective
  that carries tokens to their experts and back, and a report of the bytes it moves:
  ``expert_parallel``
- the same layer on real processes, one MPI rank per device (``pip install -e ".[mpi]"``;
  not imported here, so tinymoe works without MPI): ``mpi``, and the launcher of every MPI
  job, ``mpi_launch``
"""
from tinymoe.parallel.expert_parallel import (
    CommReport,
    ExpertParallelMoE,
    ExpertParallelOutput,
    all_to_all,
    alltoall_bytes,
    check_num_devices,
    expert_parallel_forward,
)

__all__ = ["CommReport", "ExpertParallelMoE", "ExpertParallelOutput", "all_to_all",
           "alltoall_bytes", "check_num_devices", "expert_parallel_forward"]
