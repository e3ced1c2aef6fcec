"""The device expert cache: a slab of S expert slots under a byte budget, filled from a store.

Keys are (layer, expert). A fetch picks a free slot, else evicts the least recently (lru) or
least frequently (lfu, counts kept across evictions) used slot that is neither pinned nor
protected (needed by the layer being computed, or just prefetched for the next one), and copies
the expert in: on CUDA on a side stream with an event per slot, so the compute stream waits
only for the slots it needs now; on the CPU synchronously, or on one worker thread for prefetch.
Where a miss may run elsewhere instead (misses auto: on the CPU), `fetch_room` says which misses
are worth their eviction, by the rule background admissions follow (`admit`).

When the link's rate is known (`h2d_bytes_per_s`, measured at load for CPU misses), the cache keeps
a host-side model of its copy queue: copies run one after another at that rate, so each slot has
an expected landing time (`eta_s`) without asking the device. The CPU-miss runtime (offload.cpu)
uses it to decide whether waiting for a copy beats computing the expert on the CPU.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Hashable

import torch

from .layout import SlotLayout
from .stats import OffloadStats
from .store import DiskStore, HostStore

Key = tuple[int, int]  # (layer, expert)
_NEVER = (math.inf,)  # an lfu rank (uses, tick) after every other: a slot that may not be evicted


class ExpertCache:
    """`num_slots` experts in `layout` on `device`, filled from `store`."""

    def __init__(self, layout: SlotLayout, store: HostStore | DiskStore, num_slots: int,
                 device: torch.device, policy: str, stats: OffloadStats):
        self.layout, self.store, self.device, self.policy, self.stats = layout, store, device, policy, stats
        self.num_slots = num_slots
        self.slab = layout.empty(num_slots, device)  # {name: [S, *shape]}
        self.expert_bytes = layout.expert_bytes()
        self.slot_of: dict[Key, int] = {}
        self.key_of: list[Key | None] = [None] * num_slots
        self.free = list(range(num_slots - 1, -1, -1))
        self.last_used = [0] * num_slots
        self.uses: Counter[Key] = Counter()
        self.pinned: set[int] = set()
        self.prefetched: set[int] = set()  # slots filled by a prefetch and not used since
        self.pending: dict[int, Hashable] = {}  # slot -> CUDA event or Future of its copy
        self.read_done: dict[int, torch.cuda.Event] = {}  # slot -> compute finished reading it
        self.tick = 0
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.staging: list[tuple[dict, torch.cuda.Event | None]] = []
        if self.cuda and isinstance(store, DiskStore):  # disk -> pinned staging -> device
            self.staging = [(layout.empty(1, "cpu", pin=True), None) for _ in range(2)]
        self.next_staging = 0
        self.worker = ThreadPoolExecutor(1) if not self.cuda and isinstance(store, DiskStore) else None
        self.h2d_bytes_per_s: float | None = None  # the copy queue model's rate (None: no model)
        self.copy_free_at = 0.0  # perf_counter time the modelled copy queue drains
        self.ready_at: dict[int, float] = {}  # slot -> modelled landing time of its copy in flight
        self.last_copy: Hashable | None = None  # the latest copy issued (event or Future)
        self.listener = None  # told of every fill and eviction (offload.mapped keeps its table by it)
        self.barrier: torch.cuda.Event | None = None  # copies into an occupied slot wait for it (mapped steps)
        self.blank: int | None = None  # a zeroed slot no expert is copied into (reserve_blank)
        self.scratch: list[int] = []  # slots the device copies missed experts into inside a step (reserve_scratch)

    # ---- queries -------------------------------------------------------------------------
    def slot(self, key: Key) -> int | None:
        return self.slot_of.get(key)

    def expert(self, slot: int) -> dict[str, torch.Tensor]:
        return {k: v[slot] for k, v in self.slab.items()}

    # ---- fetching ------------------------------------------------------------------------
    def fetch(self, key: Key, protected: set[int], prefetch: bool = False) -> int | None:
        """Returns the slot of `key`, copying it in if absent (None when every slot is protected
        or pinned: only a prefetch may get None, the runtime sizes demand waves to fit)."""
        slot = self.slot_of.get(key)
        if slot is not None:
            protected.add(slot)
            return slot
        slot = self._victim(protected)
        if slot is None:
            return None
        t0 = time.perf_counter()
        old = self.key_of[slot]
        if old is not None:
            del self.slot_of[old]
            if self.listener is not None:
                self.listener.evicted(old, slot)
        self._wait_host(slot)
        self._copy_in(key, slot, async_ok=prefetch, occupied=old is not None)
        self.key_of[slot], self.slot_of[key] = key, slot
        if self.listener is not None:
            self.listener.filled(key, slot)
        self.last_used[slot] = self._tick()
        (self.prefetched.add if prefetch else self.prefetched.discard)(slot)
        protected.add(slot)
        self.stats.bytes_moved += self.layout.layer_bytes(key[0])
        self.stats.fetch_s += time.perf_counter() - t0
        return slot

    def _tick(self) -> int:
        self.tick += 1
        return self.tick

    def _victim(self, protected: set[int]) -> int | None:
        if self.free:
            return self.free.pop()
        return self._least_valuable(protected)

    def _least_valuable(self, protected: set[int]) -> int | None:
        """Returns the occupied slot the policy evicts first (None when all are protected or pinned)."""
        order = self._eviction_order(protected, 1)
        return order[0] if order else None

    def _eviction_order(self, protected: set[int], count: int) -> list[int]:
        """Returns up to `count` occupied slots, neither protected nor pinned, in the order the policy
        evicts them (lfu: fewest uses, then least recent; lru: least recent)."""
        # ranks built by C-level map/zip and compared by min/sorted: no Python call per slot (S = 64:
        # 9.4 -> 7.3 us a victim on the 2-core VM)
        if self.policy == "lfu":
            ranks: list = list(zip(map(self.uses.__getitem__, self.key_of), self.last_used))
            never = _NEVER
        else:
            ranks, never = list(self.last_used), math.inf
        for excluded in (protected, self.pinned, self.free):
            for slot in excluded:
                ranks[slot] = never
        if count == 1:
            order = [min(range(self.num_slots), key=ranks.__getitem__)]
        else:
            order = sorted(range(self.num_slots), key=ranks.__getitem__)[:count]
        return [s for s in order if ranks[s] is not never]

    def _wait_host(self, slot: int) -> None:
        """Waits on the host for a CPU-thread copy into `slot` (a CUDA copy is stream-ordered)."""
        job = self.pending.get(slot)
        if isinstance(job, Future):
            job.result()
            del self.pending[slot]

    def _copy_in(self, key: Key, slot: int, async_ok: bool, occupied: bool = True) -> None:
        layer, expert = key
        dst = self.expert(slot)
        if not self.cuda:
            if self.worker is not None and async_ok:
                self.pending[slot] = self.last_copy = self.worker.submit(self.store.read_into, layer, expert, dst)
                self._model_copy(slot, layer)
            elif isinstance(self.store, DiskStore):
                self.store.read_into(layer, expert, dst)
            else:
                self.layout.copy(dst, self.store.get(layer, expert), layer=layer)
            return
        if isinstance(self.store, DiskStore):
            buffers, used = self.staging[self.next_staging]
            self.next_staging = (self.next_staging + 1) % len(self.staging)
            if used is not None:
                used.synchronize()  # the buffer's previous copy has left for the device
            src = {k: v[0] for k, v in buffers.items()}
            self.store.read_into(layer, expert, src)
        else:
            src = self.store.get(layer, expert)
        with torch.cuda.stream(self.copy_stream):
            done_reading = self.read_done.pop(slot, None)
            if done_reading is not None:  # compute still reading the evicted expert
                self.copy_stream.wait_event(done_reading)
            if occupied and self.barrier is not None:  # a captured step may still read it in place
                self.copy_stream.wait_event(self.barrier)
            self.layout.copy(dst, src, non_blocking=True, layer=layer)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.pending[slot] = self.last_copy = event
        self._model_copy(slot, layer)
        if self.staging:
            self.staging[(self.next_staging - 1) % len(self.staging)] = (buffers, event)

    def _model_copy(self, slot: int, layer: int) -> None:
        """Queues a copy in the host-side model: it starts when the queue drains, at the link's rate."""
        if self.h2d_bytes_per_s:
            start = max(time.perf_counter(), self.copy_free_at)
            self.copy_free_at = start + self.layout.layer_bytes(layer) / self.h2d_bytes_per_s
            self.ready_at[slot] = self.copy_free_at

    # ---- copy state, without waiting ---------------------------------------------------------
    def ready(self, slot: int) -> bool:
        """Returns whether `slot`'s expert is on the device now (no copy into it in flight)."""
        job = self.pending.get(slot)
        if job is None:
            return True
        return job.done() if isinstance(job, Future) else job.query()

    def landed(self, slot: int) -> bool:
        """Returns whether `slot`'s copy has landed (forgetting the copy if so), without waiting."""
        if not self.ready(slot):
            return False
        self.pending.pop(slot, None)
        self.ready_at.pop(slot, None)
        return True

    def eta_s(self, slot: int) -> float | None:
        """Returns the modelled seconds until `slot`'s copy lands (0 when ready; None: no model)."""
        if self.ready(slot):
            return 0.0
        at = self.ready_at.get(slot)
        return None if at is None else max(at - time.perf_counter(), 0.0)

    def queue_s(self) -> float:
        """Returns the modelled seconds until every copy issued so far has landed (0: link idle)."""
        if self.link_idle():
            return 0.0
        return max(self.copy_free_at - time.perf_counter(), 0.0)

    def link_idle(self) -> bool:
        """Returns whether the latest copy issued has landed (so nothing is queued behind it)."""
        job = self.last_copy
        return job is None or (job.done() if isinstance(job, Future) else job.query())

    def admit(self, key: Key, protected: set[int], ratio: float) -> int | None:
        """Copies `key` in without waiting (as a prefetch) into a free slot, or, under lfu, in place
        of the least used unprotected expert when `key` was used more than `ratio` times as often;
        returns its slot, or None when it was not admitted."""
        if key in self.slot_of:
            return None
        if not self.free:
            if self.policy != "lfu":
                return None
            victim = self._least_valuable(protected)
            if victim is None or self.uses[key] <= ratio * self.uses[self.key_of[victim]]:
                return None
        slot = self.fetch(key, protected, prefetch=True)
        if slot is not None:
            self.prefetched.discard(slot)  # a later use is not a prefetch hit
        return slot

    def fetch_room(self, keys: list[Key], protected: set[int], ratio: float) -> list[Key]:
        """Returns those of `keys` (absent, each about to be used once) that demand fetches may copy
        in without evicting a more valuable expert, most used first: one per free slot, then, under
        lfu, each in place of the next least used unprotected expert when (this use counted) used
        more than `ratio` times as often: admit's rule. lru compares no counts: free slots only."""
        ranked = sorted(keys, key=lambda k: -self.uses[k])
        room = ranked[:len(self.free)]
        if self.policy != "lfu" or len(room) == len(ranked):
            return room
        victims = self._eviction_order(protected, len(ranked) - len(room))
        for key, slot in zip(ranked[len(room):], victims):  # both in order: the first refusal ends it
            if self.uses[key] + 1 <= ratio * self.uses[self.key_of[slot]]:
                break
            room.append(key)
        return room

    def count_uses(self, keys: list[Key]) -> None:
        """Counts uses of experts computed elsewhere (on the CPU), so lfu sees true popularity."""
        for key in keys:
            self.uses[key] += 1

    # ---- use by compute -----------------------------------------------------------------
    def use(self, slots: list[int], keys: list[Key]) -> None:
        """Makes compute wait for these slots' copies, and counts the use for the policy. On CUDA the
        stream's wait for the copies still in flight is timed by one pair of events (stats.stall_s)."""
        waits = []
        for slot, key in zip(slots, keys):
            self.last_used[slot] = self._tick()
            self.uses[key] += 1
            self.prefetched.discard(slot)
            self.ready_at.pop(slot, None)
            job = self.pending.pop(slot, None)
            if job is None:
                continue
            if isinstance(job, Future):
                t0 = time.perf_counter()
                job.result()
                self.stats.stall_s += time.perf_counter() - t0
            elif not job.query():  # a copy still in flight: the compute stream waits for it
                waits.append(job)
        if waits:  # back to back on the stream: start..end spans the waits one pair per slot would sum to
            stream = torch.cuda.current_stream(self.device)
            start, end = self.stats.stall_events()
            start.record(stream)
            for job in waits:
                stream.wait_event(job)
            end.record(stream)
            self.stats.pending_stalls.append((start, end))

    def release(self, slots: list[int]) -> None:
        """Marks the end of compute reading these slots (a later copy into them waits for it)."""
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            for slot in slots:
                self.read_done[slot] = event

    def pin(self, keys: list[Key]) -> None:
        """Loads these experts now and never evicts them."""
        for key in keys:
            slot = self.fetch(key, set(self.pinned))
            if slot is None:
                break
            self.pinned.add(slot)
        self.synchronize()

    def reserve_blank(self) -> int | None:
        """Takes a free slot out of use for good, zeroed, and returns it (None when none is free).
        Zeros read as an expert that adds nothing in every layer's layout, where an occupied slot
        may not even decode in another layer's (a ternary code's chunk capacity differs between
        layers): offload.mapped's compressed partner table points the experts it skips at it. Kept
        with the pinned slots, so never evicted nor counted as room; none where that would leave no
        slot to compute in (release_blank gives it back)."""
        if self.blank is None and self.free and self.num_slots - len(self.pinned) > 1:
            self.blank = self.free.pop(0)  # the last slot a fetch would take
            for t in self.slab.values():
                t[self.blank].zero_()
            self.pinned.add(self.blank)
        return self.blank

    def release_blank(self) -> None:
        """Gives the blank slot and the scratch slots back to the cache (the partner that needed
        them could not run)."""
        if self.blank is not None:
            self.pinned.discard(self.blank)
            self.free.append(self.blank)
            self.blank = None
        self.release_scratch()

    def reserve_scratch(self, count: int, keep: int = 2) -> list[int]:
        """Takes `count` free slots out of use for good and returns them (offload.mapped's gather
        copies missed experts into them inside a step), or [] where that would leave fewer than
        `keep` slots to cache experts in (a prefill call fetches a token's top-k into them). Kept
        with the pinned slots: never evicted nor counted as room."""
        if (self.scratch or count <= 0 or len(self.free) < count
                or self.num_slots - len(self.pinned) - count < max(keep, 2)):
            return []
        self.scratch = [self.free.pop(0) for _ in range(count)]
        self.pinned.update(self.scratch)
        return list(self.scratch)

    def release_scratch(self) -> None:
        self.pinned.difference_update(self.scratch)
        self.free.extend(self.scratch)
        self.scratch = []

    def synchronize(self) -> None:
        """Waits for every copy in flight."""
        for slot in list(self.pending):
            self._wait_host(slot)
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.shutdown(wait=True)
