"""The batch pipeline's prefill (MoE-Lightning's zig-zag): every micro-batch through layer i on the
model's device before layer i + 1, each layer's keys and values staged in one device pool and
moved to the host-resident paged cache that CGOPipe's decode attends over on the CPU.

What the launch thread never waits for: the token ids and the staging cache's tables go to the
device through pinned memory; a layer's keys and values are gathered on the compute stream (the
staging pool is free for the next layer at once) and copied on their own stream into pinned
buffers; the host writes them into the pool one layer later (after layer i + 1's micro-batches
are issued, one event wait), while the device runs layer i + 1, and only then queues layer
i + 1's copy into the same buffers. So per layer the host waits once (for the copy of the layer
before), never per micro-batch, and the pool holds every layer when prefill_to_host returns.
With paged experts each MoE layer is queued whole on the weight stream a layer ahead.

The host pool (~2 GB for 490 Mixtral prompts of 8 layers) costs more to fault in than to fill: a
zeroed pool touches every page before the prefill starts (0.45-0.75 s on a 2-core VM, serial with
the device). generate_pipelined allocates it untouched (empty_host_cache) and the per-layer store
writes the prompts' blocks and zeroes the rest of that layer (zero_rest), so each page is touched
once, while the device runs the next layer.

Shapes: N prompts, mu per micro-batch, NB staging blocks of BS positions, Hkv kv heads, Dh head
dim (MLA: one head of the latent / rope key width), V vocabulary.
"""

from __future__ import annotations

import time

import torch

from ..errors import MoekitError
from ..kv_cache import PagedKVCache
from ..native.hugepages import advise_huge_pages


class OneLayerCache(PagedKVCache):
    """A PagedKVCache whose layers all share one pool [NB + 1, BS, Hkv, Dh]: the zig-zag prefill
    stages one layer's keys and values at a time on the device (moved to the host after it)."""

    pin_host_copies = True  # prepare's tables go to the device through pinned memory (no host sync)

    def __init__(self, config, num_blocks: int, block_size: int, device, dtype: torch.dtype):
        (hk, dk), (hv, dv) = config.kv_cache_dims()
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        self.scratch_block = num_blocks
        keys = torch.zeros((num_blocks + 1, block_size, hk, dk), device=device, dtype=dtype)
        values = torch.zeros((num_blocks + 1, block_size, hv, dv), device=device, dtype=dtype)
        self.keys, self.values = [keys] * config.num_layers, [values] * config.num_layers
        self._free = list(range(num_blocks - 1, -1, -1))
        self.tables = {}


def to_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Returns a list of ints as a tensor on `device`; to CUDA through pinned memory, so the
    launch thread does not wait for the device (a pageable copy waits for the stream to drain)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def empty_host_cache(config, tokens: int, block_size: int, dtype: torch.dtype) -> PagedKVCache:
    """Returns latent.host_cache's host cache for `tokens` positions with its pools allocated but
    not touched (torch.empty): no page is faulted in until a store writes it. Only for
    prefill_to_host(zero_rest=True), which writes or zeroes every block of every layer."""
    from .latent import LatentHostCache

    cls = LatentHostCache if config.mla is not None else PagedKVCache
    cache = cls.for_tokens(config, tokens, block_size, "meta", dtype)  # checks and block lists; no storage
    cache.device = torch.device("cpu")
    if isinstance(cache, LatentHostCache):  # keys, values: views of one joint row [latent | rope key]
        width = cache.keys[0].shape[-1]
        cache.joint = [torch.empty(p.shape, dtype=dtype) for p in cache.joint]
        cache.keys = [p[..., :width] for p in cache.joint]
        cache.values = [p[..., width:] for p in cache.joint]
    else:
        cache.keys = [torch.empty(p.shape, dtype=dtype) for p in cache.keys]
        cache.values = [torch.empty(p.shape, dtype=dtype) for p in cache.values]
    # 2 MB pages before the first touch: the CPU attention kernel reads each sequence's blocks
    # scattered over the pool, and with 4 KB pages every 32 KB block crosses 8 pages (a TLB miss
    # and a prefetcher stop each); native.hugepages says why
    advise_huge_pages(cache.joint if isinstance(cache, LatentHostCache) else cache.keys + cache.values)
    return cache


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Returns (first, one past the last) of each run of consecutive blocks, ascending."""
    runs: list[tuple[int, int]] = []
    for b in sorted(blocks):
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


def _span(blocks: list[int]) -> tuple[int, int] | None:
    """Returns (first, count) when the blocks are consecutive and ascending, else None."""
    if blocks and blocks == list(range(blocks[0], blocks[0] + len(blocks))):
        return blocks[0], len(blocks)
    return None


class HostKV:
    """Moves each layer's staged keys and values into the host pool (see the module docstring):
    `send(i)` after layer i's micro-batches are issued, `finish()` once after the last layer.
    `zero_rest`: each layer's store also zeroes the pool's blocks outside `dst` (a pool from
    empty_host_cache: its pages first touched there, while the device runs the next layer)."""

    def __init__(self, staging: OneLayerCache, host: PagedKVCache, src: list[int], dst: list[int],
                 timings: dict | None = None, zero_rest: bool = False):
        self.staging, self.host, self.timings = staging, host, timings
        self.cuda = staging.device.type == "cuda"
        pool_blocks = host.keys[0].shape[0]  # NB + 1: the scratch block too
        self.rest = _runs(list(set(range(pool_blocks)) - set(dst))) if zero_rest else []
        self.src_span, self.dst_span = _span(src), _span(dst)
        self.src = None if self.src_span else to_device(src, staging.device)  # [blocks] staging blocks
        self.dst = None if self.dst_span else torch.tensor(dst)  # [blocks] host blocks, same order
        self.pending: tuple | None = None  # (layer, pinned buffers, copy done event, copy start event)
        if self.cuda:
            self.stream = torch.cuda.Stream(staging.device)
            self.buffers: list[torch.Tensor] | None = None  # pinned [blocks, BS, heads, Dh] keys, values

    def _gather(self, pool: torch.Tensor) -> torch.Tensor:
        """Returns the staged blocks [blocks, BS, heads, Dh] of a staging pool, in host order."""
        if self.src_span is not None:
            first, count = self.src_span
            return pool[first:first + count]
        return pool[self.src]

    def _store(self, layer: int, parts: list[torch.Tensor]) -> None:
        """Writes a layer's keys and values (host tensors, staged blocks in order) into the pool
        (and zeroes its other blocks with zero_rest)."""
        t0 = time.perf_counter()
        for pool, data in zip((self.host.keys[layer], self.host.values[layer]), parts):
            if self.dst_span is not None:
                first, count = self.dst_span
                pool[first:first + count].copy_(data)
            else:
                pool[self.dst] = data
            for a, b in self.rest:
                pool[a:b].zero_()
        if self.timings is not None:
            self.timings["kv_store_s"] += time.perf_counter() - t0

    def send(self, layer: int) -> None:
        """Queues layer `layer`'s keys and values to the host (after the compute issued so far);
        first stores the layer before's, whose copy the host waits for here (CUDA: the device is
        on this layer by then), which frees the one pair of pinned buffers for this layer's copy.
        On the CPU the staged copy is the host copy, stored one layer late all the same."""
        # a copy on the compute stream: the next layer's writes may reuse the staging pool at once
        staged = [self._gather(p[layer]).clone() for p in (self.staging.keys, self.staging.values)]
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()
        previous, self.pending = self.pending, None
        if previous is not None:
            self._drain(previous)
        done = start = None
        if self.cuda:
            if self.buffers is None:  # every layer's staged blocks have the same shapes
                self.buffers = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in staged]
            timed = self.timings is not None
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                start = torch.cuda.Event(enable_timing=True) if timed else None
                if start is not None:
                    start.record()
                for buf, t in zip(self.buffers, staged):
                    buf.copy_(t, non_blocking=True)
                    t.record_stream(self.stream)
                done = torch.cuda.Event(enable_timing=timed, blocking=True)  # the host sleeps on it
                done.record()
            staged = self.buffers
        self.pending = (layer, staged, done, start)

    def _drain(self, pending: tuple) -> None:
        layer, buffers, done, start = pending
        if done is not None:
            t0 = time.perf_counter()
            done.synchronize()
            if self.timings is not None:
                self.timings["kv_wait_s"] += time.perf_counter() - t0
                self.timings["d2h_events"].append((start, done))
        self._store(layer, buffers)

    def finish(self) -> None:
        """Stores the last layer sent: the host pool then holds every layer."""
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._drain(previous)


def prefill_to_host(model, host: PagedKVCache, prompts: list[list[int]], micro_batch: int,
                    block_size: int = 16, timings: dict | None = None, zero_rest: bool = False) -> torch.Tensor:
    """Returns the last logits [N, V] of each prompt, prefilled on the model's device in
    MoE-Lightning's zig-zag order: every micro-batch of `micro_batch` prompts through layer i
    before layer i + 1 (so a layer's streamed experts are loaded once, not once per micro-batch),
    each layer's keys and values staged in one device pool and then copied into the host cache
    (sequences 0..N-1; every layer is there on return). With paged experts the next MoE layer is
    queued whole on the weight stream before this one's micro-batches (the decode's first layer
    after the last). The residual streams of all N prompts stay on the device. `timings` (a dict,
    filled by prefill_timings) receives where the host's time goes and, on CUDA, timing events.
    `zero_rest`: the host cache holds nothing else and may be untouched (empty_host_cache): every
    block the prompts do not fill is zeroed, layer by layer, as the prompts' blocks are stored."""
    from .paged import PagedRuntime

    cfg, device = model.config, model.device
    cuda = device.type == "cuda"
    if zero_rest and host.tables:
        raise MoekitError("prefill_to_host(zero_rest=True) zeroes every block the prompts do not fill: give it a "
                          "host cache that holds no sequence yet")
    if timings is not None:
        timings.update(setup_s=0.0, issue_s=0.0, kv_wait_s=0.0, kv_store_s=0.0, d2h_events=[], layer_events=[])
    t0 = time.perf_counter()
    blocks = sum(-(-len(p) // block_size) for p in prompts)
    staging = OneLayerCache(cfg, blocks, block_size, device, model.dtype)
    mbs, xs = [], []  # (batch, cos, sin) and the residual stream [1, tokens, D] of each micro-batch
    for at in range(0, len(prompts), micro_batch):
        part = list(enumerate(prompts[at:at + micro_batch], start=at))
        batch = staging.prepare([(g, 0, len(p)) for g, p in part])
        ids = to_device([t for _, p in part for t in p], device)[None]  # [1, tokens of the micro-batch]
        mbs.append((batch, *model.rope(batch.positions)))
        xs.append(model.embed_input(ids))
    for g, p in enumerate(prompts):
        host.grow(g, len(p))
    # every sequence's staging blocks and host blocks, in one list each: one copy per layer
    src = [b for g in range(len(prompts)) for b in staging.tables[g]]
    dst = [b for g in range(len(prompts)) for b in host.tables[g][:len(staging.tables[g])]]
    kv = HostKV(staging, host, src, dst, timings, zero_rest)
    paged = getattr(model, "expert_runtime", None)
    paged = paged if isinstance(paged, PagedRuntime) else None
    if paged is not None:
        paged.prefetch(paged.layers[0])
    timed = timings is not None and cuda
    if timed:
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        timings["layer_events"].append(start)
    if timings is not None:
        timings["setup_s"] = time.perf_counter() - t0
    for i, layer in enumerate(model.layers):
        t1 = time.perf_counter()
        if paged is not None:  # the next MoE layer streams (whole: one page) while this one computes
            paged.prefetch(paged.next_layer(i))
        for j, (batch, cos, sin) in enumerate(mbs):
            xs[j] = layer(xs[j], cos, sin, staging, batch)
        if timed:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            timings["layer_events"].append(end)
        if timings is not None:
            timings["issue_s"] += time.perf_counter() - t1
        kv.send(i)
    logits = torch.cat([model.head(x[0, batch.last_index]) for x, (batch, _, _) in zip(xs, mbs)])
    kv.finish()
    return logits


def prefill_timings(timings: dict, total_s: float, host_cache_s: float) -> dict:
    """Returns a prefill's profile from the dict prefill_to_host filled (call it after the device
    is synchronised): host seconds by part, and on CUDA each layer's compute span and each
    layer's KV copy to the host in milliseconds."""
    out = {"total_s": total_s, "host_cache_s": host_cache_s,
           **{k: timings[k] for k in ("setup_s", "issue_s", "kv_wait_s", "kv_store_s")}}
    events = timings.get("layer_events") or []
    if events:
        start = events[0]
        ends = [start.elapsed_time(e) for e in events[1:]]
        out["layer_ms"] = [b - a for a, b in zip([0.0, *ends[:-1]], ends)]
        out["kv_d2h_ms"] = [a.elapsed_time(b) for a, b in timings["d2h_events"] if a is not None]
    return out
