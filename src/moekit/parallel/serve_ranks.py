"""`moekit serve --parallel` under torchrun: rank 0 serves HTTP and schedules, every rank runs each step.

    torchrun --nproc-per-node 2 -m moekit serve MODEL --parallel tp=2 --port 8000

Rank 0 runs the HTTP front end, the continuous-batching scheduler and the sampling, as the
single-process server does. Each of its model steps is one ragged forward over the paged KV cache
(moekit.generate.forward_step); StepMirror broadcasts that step's inputs (the packed token ids and
the RaggedBatch: positions, cache slots, block tables, context lengths) from a forward pre-hook,
so the scheduler itself is unchanged, and `follow` on every other rank runs the same forward on
its shard, into a KV cache of its own with the same blocks. The collectives inside the forward
(all_reduce, all_to_all) then meet as they do in `moekit generate --parallel`. Static decode
steps (moekit.paged_decode.PagedDecode, CUDA graphs on GPUs) are mirrored one level up: rank 0's
scheduler.decode is wrapped (`attach`) to send each decode step's rows (position, token, block
table) and each warm-up, and every rank replays its own graph of the same bucket; the model's
forward inside them (a capture) is not sent again.

Headers and decode rows travel over a gloo group of their own (host memory), so that a rank
waiting for the next step waits on the host, not in a GPU kernel; the packed inputs of a ragged
step, which rank 0 holds on its device, over the model's group (NCCL on GPUs).

Messages, in order on every rank: a header [8] int64 (kind, tokens N or decode rows B, sequences
B, table width MB, query tiles T, KV blocks, block size, last_only or warm-up batch) and, for a
step, one int64 payload. While rank 0 is idle it sends a heartbeat every timeout/4 seconds, so
that a following rank's wait for the next step never reaches the collective timeout; at shutdown
it sends STOP and every rank leaves the process group. Steps with prompt chunks run eagerly
(static mixed steps are off), and consecutive decode steps do not overlap: a follower needs each
step's input tokens, which rank 0 samples, before that step runs.

Shapes: N = packed tokens of a step, B = its sequences, MB = blocks in the widest block table,
T = query tiles (packed prefill kernel; 0 in a decode step).
"""

from __future__ import annotations

import signal
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import MoekitError
from ..kv_cache import PagedKVCache, RaggedBatch
from .comm import ExpertComm

STOP, STEP, IDLE, DECODE, WARM = 0, 1, 2, 3, 4  # header kinds
HEADER_LEN = 8


class StepMirror:
    """Rank 0's side: broadcasts each paged forward's inputs before the forward runs (a pre-hook on
    the model), heartbeats while idle and stops the followers; the Engine calls `idle` and `stop`
    on its own thread, so every message leaves in the order the followers read them."""

    def __init__(self, model: torch.nn.Module, comm: ExpertComm):
        if comm.rank != 0:
            raise MoekitError(f"StepMirror runs on rank 0 (the HTTP front end), not rank {comm.rank}")
        self.comm, self.control = comm, control_comm(comm)
        self.heartbeat_s = comm.timeout_s / 4  # an idle follower hears from rank 0 well before its timeout
        self.steps = 0  # steps broadcast
        self.stopped = False
        self._quiet = False  # inside a mirrored decode step: its forwards are not sent again
        self._handle = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def attach(self, scheduler) -> None:
        """Wraps the scheduler's static decode steps (if any) so that each one, and each warm-up
        of their buckets, is sent too; call it before the scheduler runs or warms anything."""
        if scheduler.decode is not None:
            scheduler.decode = _MirroredDecode(scheduler.decode, self)

    def _before_forward(self, module, args: tuple, kwargs: dict) -> None:
        if self._quiet:
            return
        cache, batch = kwargs.get("cache"), kwargs.get("start")
        if not (isinstance(cache, PagedKVCache) and isinstance(batch, RaggedBatch) and len(args) == 1):
            raise MoekitError("serving over ranks mirrors only ragged steps over the paged KV cache "
                              "(moekit.generate.forward_step); this forward cannot be sent to the other ranks")
        if batch.padded:
            raise MoekitError("serving over ranks runs every step eagerly: static mixed steps are not mirrored; "
                              "drop --static-mixed")
        ids = args[0]  # [1, N]
        tiles = batch.query_tiles
        header = [STEP, ids.shape[1], batch.num_seqs, batch.block_tables.shape[1],
                  0 if tiles is None else tiles.shape[0], cache.num_blocks, cache.block_size,
                  int(bool(kwargs.get("last_only", False)))]
        device = self.comm.device
        host = torch.tensor(list(batch.starts) + list(batch.query_lens), dtype=torch.long)
        parts = [ids.reshape(-1), batch.positions, batch.slots, batch.block_tables.reshape(-1),
                 batch.context_lens, batch.last_index, host]
        if tiles is not None:
            parts.append(tiles.reshape(-1))
        payload = torch.cat([p.to(device, torch.long) for p in parts])
        self._send(header, "sending a step to the other ranks")
        _broadcast(self.comm, payload, "sending a step to the other ranks")  # on the model's device
        self.steps += 1

    def idle(self) -> None:
        """Tells the followers rank 0 is alive with no work (the Engine calls it every heartbeat_s idle)."""
        self._send([IDLE] + [0] * (HEADER_LEN - 1), "a heartbeat to the other ranks")

    def stop(self) -> None:
        """Sends STOP (once): every follower leaves its loop; no model step may run after it."""
        if self.stopped:
            return
        self.stopped = True
        self._handle.remove()
        self._send([STOP] + [0] * (HEADER_LEN - 1), "stopping the other ranks")

    def _send(self, header: list[int], what: str) -> None:
        _broadcast(self.control, torch.tensor(header, dtype=torch.long), what)


class _MirroredDecode:
    """Rank 0's PagedDecode, sending each decode step's rows and each warm-up before running it."""

    def __init__(self, decode, mirror: StepMirror):
        self.inner, self.mirror = decode, mirror

    def __getattr__(self, name: str):  # piecewise, pool, steps, ...: the wrapped step's
        return getattr(self.inner, name)

    def __call__(self, work: list[tuple[object, int, int]], tokens: torch.Tensor | None = None) -> torch.Tensor:
        if tokens is not None:
            raise MoekitError("serving over ranks sends each decode step's tokens from the host: overlap must be off")
        cache = self.inner.cache
        for seq, position, _ in work:  # as PagedDecode does first: the tables sent must hold the new position
            cache.grow(seq, position + 1)
        tables = [cache.tables[seq] for seq, _, _ in work]
        width = max(len(t) for t in tables)
        rows = ([position for _, position, _ in work] + [token for _, _, token in work] + [len(t) for t in tables]
                + [b for t in tables for b in t + [0] * (width - len(t))])
        header = [DECODE, len(work), len(work), width, 0, cache.num_blocks, cache.block_size, 0]
        self.mirror._send(header, "sending a decode step to the other ranks")
        _broadcast(self.mirror.control, torch.tensor(rows, dtype=torch.long), "sending a decode step to the other ranks")
        self.mirror.steps += 1
        return self._quietly(self.inner, work)

    def warm(self, max_batch: int) -> list[int]:
        cache = self.inner.cache
        self.mirror._send([WARM, 0, 0, 0, 0, cache.num_blocks, cache.block_size, max_batch],
                          "sending a warm-up to the other ranks")
        return self._quietly(self.inner.warm, max_batch)

    def _quietly(self, fn, *args):
        self.mirror._quiet = True
        try:
            return fn(*args)
        finally:
            self.mirror._quiet = False


def follow(model: torch.nn.Module, comm: ExpertComm) -> int:
    """Returns the steps run after rank 0's STOP: runs every step rank 0 broadcasts on this rank's
    shard of the model, into this rank's own paged KV cache (made at the first message's size);
    decode steps and warm-ups (sent when rank 0's scheduler has static decode steps) run through
    a PagedDecode of this rank's own, made at the first of them.

    SIGINT and SIGTERM are ignored here: rank 0 decides when the server stops (uvicorn's graceful
    shutdown) and says so with STOP; a rank 0 that is gone ends the wait with the collective timeout."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    from ..paged_decode import PagedDecode

    control = control_comm(comm)
    cache: PagedKVCache | None = None
    decode: PagedDecode | None = None
    steps = 0
    with torch.inference_mode():
        while True:
            kind, n, b, mb, t, num_blocks, block_size, extra = _broadcast(
                control, torch.zeros(HEADER_LEN, dtype=torch.long), "waiting for rank 0's next step").tolist()
            if kind == STOP:
                return steps
            if kind == IDLE:
                continue
            if kind not in (STEP, DECODE, WARM):
                raise MoekitError(f"rank {comm.rank}: unknown message {kind} from rank 0 (ranks of different "
                                  "moekit versions?)")
            if cache is None or (cache.num_blocks, cache.block_size) != (num_blocks, block_size):
                cache = PagedKVCache(model.config, num_blocks, block_size, model.device, model.dtype)
                decode = None
            if kind != STEP and decode is None:
                decode = PagedDecode(model, cache)
            if kind == WARM:
                decode.warm(extra)
                continue
            if kind == DECODE:
                rows = _broadcast(control, torch.zeros(3 * b + b * mb, dtype=torch.long),
                                  "receiving rank 0's decode step").tolist()
                positions, tokens, lens = rows[:b], rows[b:2 * b], rows[2 * b:3 * b]
                # the block tables are rank 0's: this rank's pool mirrors its blocks one for one
                cache.tables = {i: rows[3 * b + i * mb:3 * b + i * mb + lens[i]] for i in range(b)}
                decode([(i, positions[i], tokens[i]) for i in range(b)])
                steps += 1
                continue
            payload = torch.zeros(3 * n + b * mb + 4 * b + 4 * t, dtype=torch.long, device=comm.device)
            _broadcast(comm, payload, "receiving rank 0's step")
            ids, batch = _unpack(payload, n, b, mb, t, model.device)
            model(ids, cache=cache, start=batch, last_only=bool(extra))
            steps += 1


def control_comm(comm: ExpertComm) -> ExpertComm:
    """Returns a comm over a new gloo group of the same ranks, on the host (every rank must call
    it at the same point: creating a group is collective)."""
    group = dist.new_group(list(range(comm.world)), timeout=timedelta(seconds=comm.timeout_s), backend="gloo")
    return ExpertComm(comm.rank, comm.world, torch.device("cpu"), comm.timeout_s, group,
                      label=f"rank {comm.rank} of {comm.world} (control)")


def _unpack(payload: torch.Tensor, n: int, b: int, mb: int, t: int,
            device: torch.device) -> tuple[torch.Tensor, RaggedBatch]:
    """Returns (ids [1, N], RaggedBatch) from a step's payload, as StepMirror packed them."""
    sizes = [n, n, n, b * mb, b, b, 2 * b, 4 * t]
    ids, positions, slots, tables, context_lens, last_index, host, tiles = torch.split(payload.to(device), sizes)
    host = host.tolist()
    batch = RaggedBatch(starts=tuple(host[:b]), query_lens=tuple(host[b:]), positions=positions, slots=slots,
                        block_tables=tables.view(b, mb).to(torch.int32), context_lens=context_lens.to(torch.int32),
                        last_index=last_index, query_tiles=tiles.view(t, 4).to(torch.int32) if t else None)
    return ids.view(1, n), batch


def _broadcast(comm: ExpertComm, t: torch.Tensor, what: str) -> torch.Tensor:
    """Returns `t` holding rank 0's values on every rank (in place), waited on with the comm's timeout."""
    try:
        work = dist.broadcast(t, 0, group=comm.group, async_op=True)
    except (RuntimeError, TimeoutError) as e:
        raise comm._failed(what, e) from None
    comm._wait(work, what)
    return t
