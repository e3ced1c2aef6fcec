"""Parallelism on torch.distributed (torchrun; NCCL on GPUs, gloo on the CPU and in tests).

Expert parallelism (parallel.expert): each rank holds a slice of every MoE layer's experts, in
their stored form, behind the expert seam; tokens travel to the ranks that own their experts.

    comm = ExpertComm.from_env("cpu")                      # one process per rank, under torchrun
    model = load_expert_parallel("path/to/model", comm)   # outputs equal one process's

Tensor parallelism and both (parallel.tensor): ep x tp ranks form a grid; a row of tp ranks
splits attention heads and MLP widths (all_reduce after o_proj and down), a column of ep ranks
splits the routed experts.

    groups = ParallelGroups.create(comm, ep=2, tp=2)     # 4 ranks; every rank calls it alike
    model = load_parallel("path/to/model", groups)

Offloaded ranks (parallel.offload): expert parallelism where each rank offloads its own shard
under its own device budget, load_offloaded_parallel(path, comm, OffloadConfig(device_memory=B)).

Or the same ranks split both: ParallelGroups.create(comm, 2, 2, ep_over_tp=True) on 2 ranks (the
heads by tp, the routed experts by id; `--parallel tp=2,ep=tp`). On CUDA (NCCL) every collective is
stream-ordered: a tensor-parallel decode step is captured whole in one CUDA graph, an expert-
parallel one in pieces between the exchanges (whose split sizes the host reads).
"""

from .comm import ExpertComm
from .expert import (
    ExpertParallelLoader,
    ShardedExperts,
    contiguous_owners,
    load_expert_parallel,
)
from .offload import OffloadedParallelLoader, load_offloaded_parallel
from .tensor import ParallelGroups, ParallelLoader, load_parallel

__all__ = ["ExpertComm", "ExpertParallelLoader", "OffloadedParallelLoader", "ParallelGroups", "ParallelLoader",
           "ShardedExperts", "contiguous_owners", "load_expert_parallel", "load_offloaded_parallel", "load_parallel"]
