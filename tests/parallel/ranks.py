"""Runs a function on R gloo ranks (spawned processes on 127.0.0.1) and returns what each returned.

    results = run_ranks(2, worker, args)   # worker(comm, *args) in each rank; [rank 0's, rank 1's]
    results = run_ranks(2, worker, args, backend="nccl")   # on cuda:0 and cuda:1

A rank's exception comes back as RankError(its message) in its place, so a test can check that
every rank failed with the right message; a rank that does not finish within `timeout_s` fails
the call (a hang is a bug).
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankError(str):
    """The message of an exception a rank raised (its type's name first)."""


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn, args, timeout_s: float, backend: str) -> None:
    from moekit.parallel import ExpertComm

    torch.set_num_threads(1)  # 2 ranks on a shared 2-core machine
    device = torch.device("cpu")
    if backend == "nccl":  # one GPU per rank
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    result: object
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        result = fn(ExpertComm(rank, world, device, timeout_s), *args)
    except BaseException as e:  # noqa: BLE001 - handed back to the test
        result = RankError(f"{type(e).__name__}: {e}")
    with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    if dist.is_initialized() and not isinstance(result, RankError):
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown (a failed gloo group may block in its destructor)


def run_ranks(world: int, fn, *args, timeout_s: float = 30.0, join_s: float = 120.0, backend: str = "gloo") -> list:
    """Returns [fn(comm, *args) of rank r] for r < world (a RankError where rank r raised); backend
    "nccl" puts rank r on cuda:r (results should come back as CPU tensors)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_entry, args=(r, world, port, out, fn, args, timeout_s, backend))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(join_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        assert not hung, f"rank(s) {hung} did not finish in {join_s} s"
        results = []
        for r in range(world):
            path = Path(out) / f"rank{r}.pkl"
            results.append(pickle.loads(path.read_bytes()) if path.exists() else RankError(f"rank {r} wrote nothing "
                                                                                             f"(exit code {procs[r].exitcode})"))
        return results
