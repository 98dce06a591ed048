"""``tinymoe.parallel``: what it takes to run experts across machines.

- expert parallelism simulated on D devices in one process, the all-to-all collective
  that carries tokens to their experts and back, and a report of the bytes it moves:
  ``expert_parallel``
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
