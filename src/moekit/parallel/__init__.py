"""Parallelism on torch.distributed (torchrun; NCCL on GPUs, gloo on the CPU and in tests).

Expert parallelism (parallel.expert): each rank holds a slice of every MoE layer's experts, in
their stored form, behind the expert seam; tokens travel to the ranks that own their experts.

    comm = ExpertComm.from_env("cpu")                      # one process per rank, under torchrun
    model = load_expert_parallel("path/to/model", comm)   # outputs equal one process's
"""

from .comm import ExpertComm
from .expert import (
    ExpertParallelLoader,
    ShardedExperts,
    contiguous_owners,
    load_expert_parallel,
)

__all__ = ["ExpertComm", "ExpertParallelLoader", "ShardedExperts", "contiguous_owners", "load_expert_parallel"]
