"""The collectives expert and tensor parallelism need, each with a timeout and a message a user can act on.

A rank that dies (or hangs) must not leave the others waiting forever: every collective here is
started asynchronously and waited on with the group's timeout, and a failure becomes one
MoekitError naming the rank, what it was doing and what to look at, so `moekit` exits with it.
On CUDA (NCCL) the wait only orders the current stream after the collective, so a layer costs the
host no sync; the process group's timeout (NCCL's watchdog) ends a collective that never completes.

    comm = ExpertComm.from_env(device)     # under torchrun: RANK, WORLD_SIZE, MASTER_ADDR/PORT
    comm.check_same(digest, "checkpoint")  # every rank must hold the same bytes
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import MoekitError

DEFAULT_TIMEOUT_S = 120.0  # a collective waits this long for the other ranks (a first call may load weights)


@dataclass
class ExpertComm:
    """One process group's rank, size and collective timeout, and the device its tensors live on."""

    rank: int
    world: int
    device: torch.device
    timeout_s: float = DEFAULT_TIMEOUT_S
    group: object | None = None  # a torch.distributed ProcessGroup; None: the default group
    owns_group: bool = field(default=False, repr=False)  # from_env created the default group
    label: str = ""  # how messages name this rank (a subgroup's: its global rank too); "": "rank R of W"

    @staticmethod
    def from_env(device: torch.device | str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ExpertComm:
        """Returns the comm of the default process group, creating it from torchrun's environment
        (gloo on the CPU, NCCL on CUDA) when it does not exist yet."""
        device = torch.device(device)
        owns = False
        if device.type == "cuda":  # one GPU per rank: NCCL and the caching allocator use the current device
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise MoekitError(f"expert parallelism runs one process per rank under torchrun ({', '.join(missing)} "
                                  "not set): torchrun --nproc-per-node N -m moekit generate|serve|batch ... --parallel ep=N")
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            owns = True
        return ExpertComm(dist.get_rank(), dist.get_world_size(), device, timeout_s, None, owns)

    def close(self) -> None:
        """Destroys the default group if from_env created it, after a barrier (bounded by the
        timeout), so that no rank tears its connections down while another still uses them: a CI
        run once saw a gloo rank abort at exit ("terminate called without an active exception")
        under heavy load, not reproduced since."""
        if self.owns_group and dist.is_initialized():
            try:
                work = dist.barrier(async_op=True)
                if self.device.type == "cuda":
                    work.wait()
                else:
                    work.wait(timedelta(seconds=self.timeout_s))
            except (RuntimeError, TimeoutError):  # a rank already gone: nothing left to protect
                pass
            dist.destroy_process_group()
            self.owns_group = False

    # ---- collectives ---------------------------------------------------------------------------
    def _wait(self, work, what: str) -> None:
        if self.device.type == "cuda":
            # NCCL: wait() without a timeout only orders the current stream after the collective;
            # with one it would block the host until the collective ends (a sync per layer). A
            # hung NCCL collective is ended by the process group's own timeout (from_env, new_group).
            try:
                work.wait()
            except (RuntimeError, TimeoutError) as e:
                raise self._failed(what, e) from None
            return
        try:
            ok = work.wait(timedelta(seconds=self.timeout_s))
        except (RuntimeError, TimeoutError) as e:  # DistBackendError etc.: connection closed, timed out
            raise self._failed(what, e) from None
        if ok is False:
            raise self._failed(what, TimeoutError(f"no answer in {self.timeout_s:g} s"))

    def _failed(self, what: str, e: BaseException) -> MoekitError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        who = self.label or f"rank {self.rank} of {self.world}"
        return MoekitError(f"{who}: {what} failed ({first[:200]}); another rank "
                           f"exited or stopped answering: see its output (the collective timeout is "
                           f"{self.timeout_s:g} s, --parallel timeout=S)")

    def all_to_all(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int], what: str) -> torch.Tensor:
        """Returns the rows the ranks sent this one: send [sum(send_counts), ...] goes out in
        contiguous pieces send_counts[r] to rank r; recv_counts[r] rows come back from rank r."""
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        try:
            work = dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts,
                                          group=self.group, async_op=True)
        except (RuntimeError, TimeoutError) as e:
            raise self._failed(what, e) from None
        self._wait(work, what)
        return recv

    def all_gather(self, t: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Returns every rank's `t` (equal shapes), in rank order."""
        out = [torch.empty_like(t) for _ in range(self.world)]
        try:
            work = dist.all_gather(out, t.contiguous(), group=self.group, async_op=True)
        except (RuntimeError, TimeoutError) as e:
            raise self._failed(what, e) from None
        self._wait(work, what)
        return out

    def all_reduce(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Returns the sum of every rank's `t` (equal shapes), summed in place into `t` when it is
        contiguous; a group of one returns `t` as it is."""
        if self.world == 1:
            return t
        t = t.contiguous()
        if t.is_cuda and torch.cuda.is_current_stream_capturing():  # inside a CUDA graph: no host wait
            dist.all_reduce(t, group=self.group)
            return t
        try:
            work = dist.all_reduce(t, group=self.group, async_op=True)
        except (RuntimeError, TimeoutError) as e:
            raise self._failed(what, e) from None
        self._wait(work, what)
        return t

    def broadcast_int(self, value: int, what: str) -> int:
        """Returns rank 0's `value` on every rank."""
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        try:
            work = dist.broadcast(t, 0, group=self.group, async_op=True)
        except (RuntimeError, TimeoutError) as e:
            raise self._failed(what, e) from None
        self._wait(work, what)
        return int(t.item())

    def check_same(self, digest: bytes, what: str, where: str,
                   hint: str = "give every rank the same model directory (the same config.json and safetensors "
                               "files)") -> None:
        """Raises MoekitError on every rank unless every rank gave the same `digest` (e.g. a sha256
        of the checkpoint's config); `where` names this rank's source in the message, `hint` what to do."""
        mine = torch.tensor(list(digest), dtype=torch.uint8, device=self.device)
        others = [bytes(t.tolist()) for t in self.all_gather(mine, f"comparing the {what}")]
        differ = [r for r, d in enumerate(others) if d != others[0]]
        if differ:
            raise MoekitError(f"rank {self.rank} ({where}): the ranks disagree on the {what} (rank(s) "
                              f"{', '.join(map(str, differ))} differ from rank 0); {hint}")
