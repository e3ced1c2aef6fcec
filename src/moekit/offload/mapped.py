"""Missed experts read in place from page-locked host memory: OffloadConfig(misses="mapped").

Why. With misses fetched, each MoE layer call reads its routing on the host (one sync per layer)
and decides what to copy; at a high hit rate that host work, not the GPU, sets the speed
(qwen3-30b-a3b at a 25% budget: 99% hits, 48 syncs per token, 50% of the GPU-only rate). Here a
decode step needs no host decision at all, so it is captured whole as one CUDA graph:

  * the slot kernels (kernels/moe_slots.py, OFFSETS) take each expert's weights as an element
    offset from the cache slab's base: a cached expert's offset points at its slot, any other
    expert's at its row in the host store, which the GPU reads over PCIe in place (unified
    addressing; benchmarks/probe_zero_copy.py measured 45 GB/s, 83% of the copy rate, on an H200);
  * the offsets live on the device, one table per model: `table [L, E, C + 1]` int64 = an offset
    per stored tensor the form places (its `in_place_tensors`; dense: gate_up, down, so C = 2),
    then e + E * cached. A step gathers each layer's routed rows of that last column (`flag`)
    into `routes [L, S_max]`, the only record of what it did. Forms kept packed (gpt-oss: every
    tensor of an expert in one byte row, offload.layout) get each tensor's offset from the same
    row, relative to that tensor's stacked view of the slab;
  * between steps the host manages the cache from those records, read back without waiting
    (pinned ring buffers, events): it counts hits and in-place reads, updates use counts, and
    admits popular missed experts (copies on the cache's copy stream, as any fetch).

Invariant: every table row points at valid weights of its expert. The host keeps a mirror
(`mapped`: key -> slot) and changes the table only between steps, on the compute stream, so a
step reads exactly the mirror of the moment it was launched:
  * a key's row points at its slot only after the copy into the slot has landed (event query);
  * an evicted key's row goes back to its host row before the next step; the copy that
    overwrites the slot waits for `cache.barrier`, an event recorded after the latest step, so
    no step still running can read the slot mid-copy (eager prefill calls never read the table).

Admission (between steps, from a step's missed experts, most used first): into a free slot
always; when the cache is full, under lfu only an expert used more than ADMIT_RATIO times as
often as the least used unprotected one, under lru in place of the least recently used; and at
most `max_inflight` copies in flight, so admissions do not crowd the link the in-place reads use.

The gather (compressed forms with the CPU partner, experts of 64 MiB and up: partner.gather_slots).
Their slot kernels read cache slots only, so with the partner alone the CPU computed every miss and
nothing crossed PCIe (H200, Mixtral-8x7B shape cut to 8 layers, int4 experts of 88 MB at llama.cpp's
Q4_K_M footprint: 3.3 ms a layer for two experts, 35.8 tok/s). Here G cache slots are kept as scratch;
inside the step the device ranks the layer's missed slots (routed order), leaves rank 0 (and those past
G) to the CPU and marks ranks 1..G in `routes` (e + 2E: the CPU skips them, the readback counts them),
copies those experts' packed bytes from the pinned host store into the scratch slots
(kernels/expert_gather.py, reading host memory in place) while the CPU works, and runs them from
there with the cached ones. Same run, d3aa10f: 52.6 tok/s (1.68x llama.cpp's 31.3), ~0.7 GB a token on
each link.

Prefill (calls of more than `max_slots` routed slots) runs as with misses "fetch"; so does an eager
step on a machine that cannot read host memory from the device (the loader checks, and falls back).

Shapes: L = MoE layers, E = experts per layer, S = routed slots of a step (tokens * A), S_slab =
cache slots.
"""

from __future__ import annotations

from collections import deque

import torch

from ..errors import MoekitError
from ..experts.forms import KINDS, SLOT_KERNEL_MAX_SLOTS, DenseForm
from .cpu import ADMIT_RATIO

Key = tuple[int, int]  # (layer, expert)
READBACK_RING = 8  # steps whose routes may be in flight to the host before one is waited for
GATHER_BLOCK = 2048  # int32 words one gather program copies (8 KiB)


class MappedTable:
    """The device offset table, the host mirror and the between-step cache manager of one model."""

    def __init__(self, runtime, partner: bool = False, cpu_rows: int | None = None, gather: int = 0):
        """`partner`: missed experts are computed by the CPU inside the step (offload.partner), not
        read in place: an unmapped key's row holds -1 (the slot kernels skip it); for compressed
        forms (`by_slot`) the table holds a slot column instead, an unmapped key the cache's blank slot
        (weighted 0: ExpertCache.reserve_blank). `cpu_rows` r (dense, with the partner): the row split,
        the CPU computing ffn rows [0, r) of each missed expert and the device reading rows [r, I) in
        place through a second table (`split_table`: an unmapped key's host-row offsets, a mapped
        key -1), whose partial output adds to the cached experts' and the CPU's. `gather` G (compressed
        forms, with the partner): G cache slots kept as scratch, into which the device copies a
        step's missed experts of rank 1..G (in routed-slot order; rank 0 and those past G stay the
        CPU's) from the pinned host store inside the step, beside the CPU's work (the gather,
        module docstring); where that would leave fewer than max(2, top_k) slots to cache in: no gather."""
        self.runtime = runtime
        cache, cfg = runtime.cache, runtime.model_config
        self.device = runtime.device
        self.cuda = self.device.type == "cuda"
        self.num_experts = cfg.num_experts  # the table's width: the largest layer's count (a pruned layer's rows past its own count are never routed)
        self.max_slots = SLOT_KERNEL_MAX_SLOTS
        self.max_inflight = max(2 * cfg.top_k, 4)
        self.pos = {layer: i for i, layer in enumerate(runtime.moe_layers)}
        self.layers = list(runtime.moe_layers)
        self.partner = None
        self.split_host: torch.Tensor | None = None
        self.gather_slots: list[int] = []  # scratch cache slots of the gather (compressed forms, with the partner)
        self.by_slot = partner and not isinstance(runtime.form, DenseForm)
        if self.by_slot:  # compressed forms: a slot column (the slot kernels over the slab), no in-place offsets
            blank = cache.reserve_blank()
            if blank is None:
                raise MoekitError("the CPU partner needs one cache slot kept blank for the experts the device "
                                  "skips, and the cache has none free")
            self.names, self.stacked = ("slot",), {}
            # unmapped: the blank slot weighted 0 (any occupied slot may hold another layer's expert, which
            # need not decode in this layer's layout: H200, OLMoE's ternary code, an illegal address)
            host = torch.full((len(self.layers), self.num_experts, 2), blank, dtype=torch.int64)
            host[:, :, 1] = torch.arange(self.num_experts)
            self.slab, self.slot_offsets = (), (1,)
            self._plan_gather(gather, blank)
        else:
            self.names, self.stacked, host = host_row_offsets(runtime)
            self.slab = tuple(self.stacked.values())
            self.slot_offsets = tuple(t.stride(0) for t in self.slab)  # elements per slot, per column
        self.flag = len(self.names)  # the column of e + E * cached
        if partner:
            from .partner import CpuPartner

            if not self.by_slot:
                if cpu_rows is not None:
                    self.split_host = host[:, :, :self.flag].clone()  # [L, E, C]: what an unmapped key's split row holds
                host[:, :, :self.flag] = -1
            self.partner = CpuPartner(runtime, self.max_slots // cfg.top_k, cpu_rows)
        self.host_rows = host  # [L, E, C + 1] on the host: what an unmapped key's row holds
        self.table = host.to(self.device, copy=True)  # [L, E, C + 1]: what steps read (never host_rows itself)
        self.cpu_rows = cpu_rows if self.partner is not None and not self.by_slot else None
        self.split_table = self.split_host.to(self.device, copy=True) if self.cpu_rows else None  # [L, E, C]
        self.routes = torch.zeros(len(self.layers), self.max_slots, dtype=torch.int64, device=self.device)
        self.mapped: dict[Key, int] = {}  # mirror: keys whose row points at their slot
        self.to_map: dict[Key, int] = {}  # keys copied into a slot, mapped once the copy lands
        self.updates: dict[Key, int | None] = {}  # table changes for the next boundary (slot or None: host)
        self.readbacks: deque = deque()  # (host routes [L, S], event | None, tokens)
        self.free_buffers: list[torch.Tensor] = []
        self.step_slots = 0  # S of the step being run (eager: set by the first layer)
        self.hooks_in_run = True  # eager steps call the boundary hooks from run(); MappedStep calls them itself
        cache.listener = self
        for key, slot in cache.slot_of.items():  # experts already cached (pinned ones, a warm-up)
            self.filled(key, slot)

    # ---- the gather (compressed forms, with the partner) ---------------------------------------------
    def _plan_gather(self, count: int, blank: int) -> None:
        """Reserves `count` scratch slots and builds the gather's device tensors: each layer's host
        rows as int32-word offsets from the slab (unified addressing), a layer's words per expert."""
        runtime = self.runtime
        if count <= 0:
            return
        slab = runtime.cache.slab["packed"]  # [S_slab, slot_bytes] uint8
        self.gather_slots = runtime.cache.reserve_scratch(count, keep=runtime.model_config.top_k)
        if not self.gather_slots:
            return
        base = slab.data_ptr()
        offsets = torch.zeros(len(self.layers), self.num_experts, dtype=torch.int64)
        for pos, layer in enumerate(self.layers):
            rows = runtime.store.layers[layer]["packed"]  # [E_layer, layer_bytes] uint8, pinned
            for e in range(self.num_experts):
                delta = rows[min(e, rows.shape[0] - 1)].data_ptr() - base  # a pruned layer's extra ids are never routed
                if delta % 16:
                    raise MoekitError("a host row of the compressed store is not 16-byte aligned for the gather")
                offsets[pos, e] = delta // 4
        self.gather_offsets = offsets.to(self.device)
        self.gather_words = [runtime.layout.layer_bytes(layer) // 4 for layer in self.layers]
        self.slot_words = slab.stride(0) // 4  # slots are whole ALIGN_BYTES (16-byte) rows (offload.layout)
        self.gather_slab = slab.view(-1).view(torch.int32)
        # the destination of each gather index (index G: slots nothing is copied for, never read)
        self.gather_dst = torch.tensor(self.gather_slots + [blank], dtype=torch.int64, device=self.device)
        self.gather_srcs = torch.full((count + 1,), -1, dtype=torch.int64, device=self.device)

    def _gather(self, flat: torch.Tensor, routes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Picks the step's missed slots of rank 1..G for the device (routes of theirs += 2E in place:
        the CPU skips them, the readback counts them) and returns (dev [S] bool, index [S]: the
        scratch slot's position in gather_dst). Capturable: no host sync."""
        num_e, count = self.num_experts, len(self.gather_slots)
        missed = routes < num_e
        rank = torch.cumsum(missed, 0) - 1
        dev = missed & (rank >= 1) & (rank <= count)
        routes.copy_(torch.where(dev, routes + 2 * num_e, routes))
        index = torch.where(dev, rank - 1, count)
        self.gather_srcs.fill_(-1)
        self.gather_srcs.scatter_(0, index, torch.where(dev, flat, -1))
        return dev, index

    def _launch_gather(self, pos: int) -> None:
        """Queues the copies of gather_srcs' experts of layer `pos` into the scratch slots."""
        from ..kernels.expert_gather import expert_gather_kernel

        words = self.gather_words[pos]
        grid = (len(self.gather_slots), -(-words // GATHER_BLOCK))
        expert_gather_kernel[grid](self.gather_slab, self.gather_srcs, self.gather_dst, self.gather_offsets[pos],
                                   words, self.slot_words, BLOCK=GATHER_BLOCK)

    def gather_self_test(self) -> str | None:
        """Returns None when the gather copies the first layer's expert 0 into a scratch slot byte
        for byte, else why not (run once, before the first step; the slot is zeroed again)."""
        if not self.gather_slots:
            return None
        try:
            self.gather_srcs.fill_(-1)
            self.gather_srcs[0] = 0
            self._launch_gather(0)
            if self.cuda:
                torch.cuda.synchronize(self.device)
            words = self.gather_words[0]
            got = self.gather_slab[self.gather_slots[0] * self.slot_words:][:words].cpu()
            want = self.runtime.store.layers[self.layers[0]]["packed"][0].view(torch.int32)[:words]
            same = torch.equal(got, want)
            self.runtime.cache.slab["packed"][self.gather_slots[0]].zero_()
        except (RuntimeError, ValueError) as e:
            return str(e).splitlines()[0]
        return None if same else "the gather's copy of an expert came back wrong"

    def stop_gather(self) -> None:
        """Gives the scratch slots back: the CPU computes every miss (the gather failed its check)."""
        self.runtime.cache.release_scratch()
        self.gather_slots = []

    # ---- the cache tells us what it moves ------------------------------------------------------
    def filled(self, key: Key, slot: int) -> None:
        self.to_map[key] = slot

    def evicted(self, key: Key, slot: int) -> None:
        self.to_map.pop(key, None)
        if key in self.mapped:
            self.updates[key] = None

    # ---- one layer of a step ----------------------------------------------------------------------
    def serves(self, expert_ids: torch.Tensor) -> bool:
        """Returns whether this layer call runs here (a decode-sized call), not through fetches."""
        return expert_ids.numel() <= self.max_slots

    def run(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns the layer's expert output [N, D], reading each expert where the table says."""
        pos = self.pos[layer]
        eager_hooks = self.hooks_in_run and not _capturing(x)
        if eager_hooks and pos == 0:
            self.before_step()
        flat = expert_ids.reshape(-1)
        slots = flat.numel()
        self.step_slots = slots
        table = self.table[pos]  # [E, C + 1]
        torch.index_select(table[:, self.flag], 0, flat, out=self.routes[pos, :slots])
        if self.partner is None:
            out = self.runtime.form.fused(x, expert_ids, weights, self.stacked, offsets=table)
        else:
            out = self._run_with_partner(pos, x, expert_ids, weights, slots, table)
        if eager_hooks and pos == len(self.layers) - 1:
            self.after_step()
        return out

    def _run_with_partner(self, pos: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                          slots: int, table: torch.Tensor) -> torch.Tensor:
        """The device's share of the layer (cached experts) plus the CPU's (offload.partner); an eager
        step starts the CPU side at its first layer and waits for it after its last."""
        partner, eager = self.partner, not _capturing(x)
        if eager and pos == 0:  # a capture's warm-ups (hooks off) are not counted, as _account skips them
            partner.start(x.shape[0], count=self.hooks_in_run)
        try:
            routes = self.routes[pos, :slots]
            dev = None
            if self.gather_slots:  # the missed experts of rank 1..G: copied in by the device, beside the CPU
                dev, index = self._gather(expert_ids.reshape(-1), routes)
            partner.post(pos, x, weights, routes)
            if self.by_slot:  # the cached experts from their slots, the others (the blank slot) weighted 0
                runtime = self.runtime
                rows = table[:, 0].index_select(0, expert_ids.reshape(-1))
                if dev is not None:
                    self._launch_gather(pos)
                    rows = torch.where(dev, self.gather_dst.index_select(0, index), rows)
                rows = rows.view_as(expert_ids)
                here = (routes >= self.num_experts).view_as(weights).to(weights.dtype)
                out = runtime.form.run(x, rows, weights * here, runtime.layout.view(runtime.cache.slab, self.layers[pos]))
            else:
                form = self.runtime.form
                out = form.fused(x, expert_ids, weights, self.stacked, offsets=table, skip=True)
                if self.cpu_rows is not None:  # the missed experts' rows [r, I), read in place (cached ones skipped)
                    out = out + form.fused(x, expert_ids, weights, self.stacked, offsets=self.split_table[pos],
                                           skip=True, ffn_rows=(self.cpu_rows, form.ffn))
            partner.combine(pos, out)
        except BaseException:
            if eager:
                partner.abort()
            raise
        if eager and pos == len(self.layers) - 1:
            partner.finish()
        return out

    # ---- between steps ------------------------------------------------------------------------------
    def before_step(self) -> None:
        """Maps keys whose copies have landed and applies pending table changes (compute stream)."""
        cache = self.runtime.cache
        for key, slot in list(self.to_map.items()):
            if cache.slot(key) != slot:  # evicted again before it was mapped
                del self.to_map[key]
            elif cache.landed(slot):
                del self.to_map[key]
                self.updates[key] = slot
        if not self.updates:
            return
        rows, split = [], []
        for (layer, e), slot in self.updates.items():
            pos = self.pos[layer]
            if slot is None:
                self.mapped.pop((layer, e), None)
                entries = self.host_rows[pos, e].tolist()
            else:
                self.mapped[(layer, e)] = slot
                entries = [slot * step for step in self.slot_offsets] + [e + self.num_experts]
            rows.append((pos * self.num_experts + e, *entries))
            if self.split_table is not None:  # the split reads the key in place only while it is not cached
                split.append((pos * self.num_experts + e,
                              *(self.split_host[pos, e].tolist() if slot is None else [-1] * self.flag)))
        self.updates.clear()
        for changes, target in ((rows, self.table), (split, self.split_table)):
            if not changes:
                continue
            change = torch.tensor(changes, dtype=torch.int64)  # [n, 1 + columns]: flat row, then its entries
            if self.cuda:
                change = change.pin_memory().to(self.device, non_blocking=True)
            target.view(-1, change.shape[1] - 1).index_copy_(0, change[:, 0], change[:, 1:])

    def after_step(self, tokens: int | None = None) -> None:
        """Queues the step's routes for the host, fences the cache's copies behind the step, and
        manages the cache from steps whose routes have arrived."""
        slots = self.step_slots
        tokens = tokens if tokens is not None else max(slots // self.runtime.model_config.top_k, 1)
        buf = self.free_buffers.pop() if self.free_buffers else torch.empty(
            len(self.layers), self.max_slots, dtype=torch.int64, pin_memory=self.cuda)
        buf[:, :slots].copy_(self.routes[:, :slots], non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.runtime.cache.barrier = event  # a later copy into a slot waits for this step
        self.readbacks.append((buf, slots, tokens, event))
        while self.readbacks and (len(self.readbacks) > READBACK_RING or _done(self.readbacks[0][3])):
            self._account(*self.readbacks.popleft())

    def drain(self) -> None:
        """Processes every step's routes (waits for them): before a report (and with the CPU partner,
        raises where the device gave up waiting for it)."""
        if self.partner is not None and self.readbacks:
            self.partner.check()
        while self.readbacks:
            buf, slots, tokens, event = self.readbacks.popleft()
            if event is not None:
                event.synchronize()
            self._account(buf, slots, tokens, event)

    def _account(self, buf: torch.Tensor, slots: int, tokens: int, event) -> None:
        """Counts one step's hits and in-place reads, updates use counts, admits missed experts."""
        runtime = self.runtime
        cache, stats, layout = runtime.cache, runtime.stats, runtime.layout
        num_e = self.num_experts
        routes = buf[:, :slots].tolist()
        self.free_buffers.append(buf)
        stats.tokens += tokens
        decode = tokens == 1
        if decode:
            stats.decode_tokens += 1
        missed: list[Key] = []
        for pos, row in enumerate(routes):
            layer = self.layers[pos]
            for v in row:
                e, cached, gathered = v % num_e, num_e <= v < 2 * num_e, v >= 2 * num_e
                key = (layer, e)
                stats.lookups += 1
                cache.uses[key] += 1
                if gathered:  # the device copied it into a scratch slot inside the step (the gather)
                    nbytes = layout.layer_bytes(layer)
                    stats.gathered_experts += 1
                    stats.mapped_reads += 1
                    stats.mapped_bytes += nbytes
                    if decode:
                        stats.decode_mapped_bytes += nbytes
                    missed.append(key)
                elif cached:
                    stats.hits += 1
                    slot = cache.slot(key)
                    if slot is not None:
                        cache.last_used[slot] = cache._tick()
                elif self.partner is not None:  # the CPU computed it (counted from the native call) ...
                    if self.cpu_rows is not None:  # ... but for rows [r, I), read in place (the row split)
                        nbytes = round(layout.layer_bytes(layer) * (1 - self.cpu_rows / self.runtime.form.ffn))
                        stats.mapped_reads += 1
                        stats.mapped_bytes += nbytes
                        if decode:
                            stats.decode_mapped_bytes += nbytes
                    missed.append(key)
                else:
                    nbytes = layout.layer_bytes(layer)
                    stats.mapped_reads += 1
                    stats.mapped_bytes += nbytes
                    if decode:
                        stats.decode_mapped_bytes += nbytes
                    missed.append(key)
        before = stats.bytes_moved
        self._admit(missed)
        if decode:
            stats.decode_bytes_moved += stats.bytes_moved - before

    def _admit(self, missed: list[Key]) -> None:
        cache, stats = self.runtime.cache, self.runtime.stats
        protected: set[int] = set()
        for key in sorted(dict.fromkeys(missed), key=lambda k: -cache.uses[k]):
            if len(self.to_map) >= self.max_inflight and not cache.free:
                return
            if cache.slot(key) is not None:  # admitted since (or by an eager call)
                continue
            if cache.free or cache.policy == "lfu":
                slot = cache.admit(key, protected, ADMIT_RATIO)
            else:  # lru: in place of the least recently used
                slot = cache.fetch(key, protected, prefetch=True)
                if slot is not None:
                    cache.prefetched.discard(slot)
            if slot is None:
                if not cache.free:
                    return  # lfu: the most used missed expert is not worth a slot, nor are the rest
                continue
            stats.admissions += 1


class MappedStep:
    """A decode step captured whole (moekit.generate's graph) with the mapped runtime's hooks
    around each replay."""

    def __init__(self, mapped: MappedTable, graphed):
        self.mapped, self.graphed = mapped, graphed

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        mapped = self.mapped
        mapped.before_step()
        partner = mapped.partner
        if partner is None:
            logits = self.graphed(token, position)
        else:
            partner.start(token.shape[0])
            try:
                logits = self.graphed(token, position)
            except BaseException:
                partner.abort()
                raise
            partner.finish()
        mapped.after_step(tokens=token.shape[0])
        return logits


def capture_step(mapped: MappedTable, model, cache, token: torch.Tensor, position: int):
    """Returns the model's decode step for `token` [B, 1] captured whole, or None when a step of this
    batch routes more slots than the slot kernels serve (the caller captures it in pieces)."""
    from ..generate import _GraphedDecode

    if token.shape[0] * mapped.runtime.model_config.top_k > mapped.max_slots:
        return None
    mapped.before_step()  # the warm-up calls read the table as it is now
    mapped.hooks_in_run = False
    try:
        graphed = _GraphedDecode(model, cache, token, position)
    finally:
        mapped.hooks_in_run = True
    return MappedStep(mapped, graphed)


class InPlaceReads:
    """Missed experts read in place by the device beside the CPU's share (misses auto's split,
    offload.cpu "In-place share"): the host rows' offsets of every layer on the device, never
    changed (a key's row always points at its host row: cached experts run from their slots)."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.device = runtime.device
        self.cuda = self.device.type == "cuda"
        self.layers = list(runtime.moe_layers)
        self.pos = {layer: i for i, layer in enumerate(self.layers)}
        self.names, self.stacked, self.host_rows = host_row_offsets(runtime)
        self.slab = tuple(self.stacked.values())
        self.table = self.host_rows.to(self.device, copy=True)  # [L, E, C + 1]

    def run(self, layer: int, xs: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
            ffn_rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Returns weights [S, 1] * expert_{ids[s]}(xs[s]) as [S, D], each expert read from host memory
        (with `ffn_rows`, dense experts: only those ffn rows of each, a partial output)."""
        table = self.table[self.pos[layer]]
        if ffn_rows is None:
            return self.runtime.form.fused(xs, ids, weights, self.stacked, offsets=table)
        return self.runtime.form.fused(xs, ids, weights, self.stacked, offsets=table, ffn_rows=ffn_rows)


def host_row_offsets(runtime) -> tuple[tuple[str, ...], dict[str, torch.Tensor], torch.Tensor]:
    """Returns (names, stacked, host) for reading the host store's experts in place through the
    offset kernels: `names` the form's in-place tensors (the offset columns), `stacked` their views
    of the cache slab as layer 0 sees it (what every offset is relative to), `host` [L, E, C + 1]
    int64 on the host: per MoE layer and expert the element offset of its host row in each column,
    then the expert id (MappedTable's flag column for an unmapped key). Raises ValueError where
    one table cannot serve every layer or a host row is not laid out as a cache slot is."""
    cache, store, layout = runtime.cache, runtime.store, runtime.layout
    layers = list(runtime.moe_layers)
    names = tuple(getattr(runtime.form, "in_place_tensors", KINDS))
    slab_view = layout.view(cache.slab, layers[0])  # dense: [S_slab, 2I, D], [S_slab, D, I]
    stacked = {name: slab_view[name] for name in names}
    for layer in layers[1:]:  # one table serves every layer only where each views the slab alike
        view = layout.view(cache.slab, layer)
        if any(view[n].data_ptr() != t.data_ptr() or view[n].stride() != t.stride() for n, t in stacked.items()):
            raise ValueError(f"layer {layer}'s experts lie differently in the cache slab than layer "
                             f"{layers[0]}'s: one offsets table cannot serve both")
    num_e = runtime.model_config.num_experts  # the largest layer's count (a pruned layer's extra rows are never routed)
    host = torch.empty(len(layers), num_e, len(names) + 1, dtype=torch.int64)
    for i, layer in enumerate(layers):
        rows = layout.view(store.layers[layer], layer)
        for c, name in enumerate(names):
            t, base = rows[name], stacked[name]
            size = base.element_size()
            if t.dtype != base.dtype or t.stride()[1:] != base.stride()[1:]:  # the kernels take the slab's
                raise ValueError(f"host rows of layer {layer} {name} must be {base.dtype} laid out as a cache "
                                 f"slot is (strides {base.stride()[1:]} within an expert)")
            delta = t.data_ptr() - base.data_ptr()
            if delta % size:
                raise ValueError(f"host rows of layer {layer} {name} are not aligned to their elements")
            host[i, :, c] = delta // size + torch.arange(num_e, dtype=torch.int64) * t.stride(0)
        host[i, :, len(names)] = torch.arange(num_e, dtype=torch.int64)
    return names, stacked, host


def self_test(mapped: MappedTable | InPlaceReads) -> str | None:
    """Returns None when the device reads a host-store expert in place correctly, else why not.

    Runs the first layer's expert 0 through the offset kernels twice, from its host row and from a
    device copy of it, and compares bit for bit (the same compiled kernel reads both)."""
    runtime = mapped.runtime
    layer = mapped.layers[0]
    rows = runtime.layout.view(runtime.store.layers[layer], layer)
    dtype = runtime.dtype if mapped.stacked.get("gate_up") is None else mapped.stacked["gate_up"].dtype
    x = torch.randn(1, runtime.form.hidden, generator=torch.Generator().manual_seed(0)).to(mapped.device, dtype)
    ids = torch.zeros(1, 1, dtype=torch.long, device=mapped.device)
    w = torch.ones(1, 1, dtype=x.dtype, device=mapped.device)
    copies = [rows[name][0].to(mapped.device, copy=True) for name in mapped.names]  # kept alive until the reads
    on_device = torch.tensor([[(c.data_ptr() - t.data_ptr()) // t.element_size() for c, t in zip(copies, mapped.slab)]
                              + [0]], device=mapped.device)
    try:
        form = runtime.form
        got = form.fused(x, ids, w, mapped.stacked, offsets=mapped.host_rows[0].to(mapped.device))
        want = form.fused(x, ids, w, mapped.stacked, offsets=on_device)
        if mapped.cuda:
            torch.cuda.synchronize(mapped.device)
    except RuntimeError as e:
        return f"the device could not read host memory in place ({str(e).splitlines()[0]})"
    if got is None or want is None:
        return f"{form.name} experts' kernels do not read this stack in place"
    if not torch.equal(got, want):
        return "the device read wrong values from host memory in place"
    return None


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _done(event) -> bool:
    return event is None or event.query()
