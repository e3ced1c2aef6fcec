"""The device expert cache (offload/cache.py) on the CPU: the eviction order, the room demand fetches
get under the admission rule, a layer's lookups never evicting its own hits, and the stall timing's
event pairs (offload/stats.py, with stand-in events: no GPU here)."""

from __future__ import annotations

import random

import pytest
import torch

from moekit.experts.forms import DenseForm
from moekit.offload.cache import ExpertCache
from moekit.offload.layout import TensorLayout
from moekit.offload.stats import OffloadStats
from moekit.offload.store import HostStore


def cache_of(slots: int, policy: str = "lfu", layers: int = 2, experts: int = 8) -> ExpertCache:
    """Returns an empty cache of `slots` tiny float32 experts over `layers` x `experts` random ones."""
    form = DenseForm(hidden=4, ffn=4, dtype=torch.float32)
    layout = TensorLayout(form, list(range(layers)))
    store = HostStore(layout, pin=False)
    for layer in range(layers):
        store.add_layer(layer, {"gate_up": torch.randn(experts, 8, 4), "down": torch.randn(experts, 4, 4)})
    return ExpertCache(layout, store, slots, torch.device("cpu"), policy, OffloadStats())


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_eviction_order_is_the_policy_rule(policy):
    """_least_valuable picks what the rule picks (lfu: fewest uses, then least recent; lru: least
    recent), never a protected or pinned slot, over random histories."""
    rng = random.Random(0)
    cache = cache_of(6, policy, experts=8)
    for _ in range(200):
        key = (rng.randrange(2), rng.randrange(8))
        protected = set(rng.sample(range(6), rng.randrange(4)))
        if cache.slot(key) is None:
            cache.fetch(key, set(protected))
        cache.use([cache.slot(key)], [key]) if rng.random() < 0.5 else cache.count_uses([key])
        cache.pinned = set(rng.sample(range(6), rng.randrange(2)))
        allowed = [s for s in range(6) if s not in protected and s not in cache.pinned and cache.key_of[s] is not None]
        if policy == "lfu":
            expected = min(allowed, key=lambda s: (cache.uses[cache.key_of[s]], cache.last_used[s]), default=None)
        else:
            expected = min(allowed, key=lambda s: cache.last_used[s], default=None)
        assert cache._least_valuable(protected) == expected
        order = cache._eviction_order(protected, 3)
        assert order == sorted(allowed, key=lambda s: (cache.uses[cache.key_of[s]], cache.last_used[s])
                               if policy == "lfu" else cache.last_used[s])[:3]
    cache.pinned = set()
    assert cache._least_valuable(set(range(6))) is None


def test_fetch_room_follows_the_admission_rule():
    """Free slots go to the most used misses; past them (lfu) a miss may replace the next least used
    unprotected expert only when, counting this use, used more than `ratio` times as often; lru
    compares no counts and gives free slots only."""
    cache = cache_of(3)
    cache.count_uses([(0, 5)] * 4 + [(0, 6)] * 2)
    assert cache.fetch_room([(0, 6), (0, 5), (0, 7)], set(), 2.0) == [(0, 5), (0, 6), (0, 7)]
    for e in (0, 1, 2):
        cache.fetch((1, e), set())
    cache.count_uses([(1, 0)] * 1 + [(1, 1)] * 3 + [(1, 2)] * 20)  # slots ranked by uses: 1, 3, 20
    # 5 + 1 > 2 * 1 replaces (1, 0); 2 + 1 > 2 * 3 does not replace (1, 1): the rest are refused
    assert cache.fetch_room([(0, 6), (0, 5), (0, 7)], set(), 2.0) == [(0, 5)]
    # a protected slot (this layer's hit) is never a victim: (1, 1) is next, and 5 + 1 is not > 2 * 3
    assert cache.fetch_room([(0, 5)], {cache.slot((1, 0))}, 2.0) == []
    assert cache.fetch_room([(0, 5)], set(), 1.0) == [(0, 5)]
    assert cache.fetch_room([], set(), 2.0) == []
    lru = cache_of(2, "lru")
    lru.count_uses([(0, 1)] * 50)
    assert lru.fetch_room([(0, 1), (0, 2), (0, 3)], set(), 2.0) == [(0, 1), (0, 2)]  # the free slots
    lru.fetch((1, 0), set())
    lru.fetch((1, 1), set())
    assert lru.fetch_room([(0, 1)], set(), 2.0) == []


def test_fetch_room_fetches_evict_only_the_victims_it_ranked():
    """Fetching what fetch_room allowed evicts exactly the least valuable experts it compared with."""
    cache = cache_of(4)
    for e in range(4):
        cache.fetch((1, e), set())
    cache.count_uses([(1, 0)] * 1 + [(1, 1)] * 2 + [(1, 2)] * 30 + [(1, 3)] * 40)
    cache.count_uses([(0, 0)] * 10 + [(0, 1)] * 10 + [(0, 2)] * 10)
    room = cache.fetch_room([(0, 0), (0, 1), (0, 2)], set(), 2.0)
    assert sorted(room) == [(0, 0), (0, 1)]
    protected: set[int] = set()
    for key in room:
        cache.fetch(key, protected)
    assert {k for k in cache.key_of} == {(0, 0), (0, 1), (1, 2), (1, 3)}


def test_a_layers_fetches_never_evict_its_own_hits(tiny):
    """A lookup protects every hit of the layer before its first fetch: a miss listed before a hit
    evicts another expert, not the hit (which would then be fetched again)."""
    from moekit.offload import OffloadConfig, load_offloaded

    path = tiny("mixtral").path
    plan = load_offloaded(path, offload=OffloadConfig(context_tokens=40)).offload.plan
    budget = plan.planned_bytes - plan.cache_bytes + 2 * plan.expert_bytes
    runtime = load_offloaded(path, offload=OffloadConfig(context_tokens=40, device_memory=budget)).offload
    cache = runtime.cache
    assert cache.num_slots == 2
    cache.fetch((0, 1), set())
    cache.fetch((1, 3), set())
    cache.count_uses([(1, 3)] * 10)  # (0, 1) is the least valuable slot
    runtime.reset_stats()
    slots = runtime._lookup(0, [0, 1], set())
    stats = runtime.stats
    assert (stats.lookups, stats.hits, stats.demand_fetches) == (2, 1, 1)
    assert slots == [cache.slot((0, 0)), cache.slot((0, 1))] and None not in slots
    assert cache.slot((1, 3)) is None


class FakeEvent:
    """Stands in for a timing CUDA event: `at` is its timestamp (ms), `ended` whether it has run."""

    def __init__(self, at: float, ended: bool = True):
        self.at, self.ended, self.synchronized = at, ended, False

    def query(self) -> bool:
        return self.ended

    def synchronize(self) -> None:
        self.synchronized = self.ended = True

    def elapsed_time(self, end: FakeEvent) -> float:
        assert end.ended, "elapsed_time of an event that has not run"
        return end.at - self.at


def test_stall_pairs_are_added_as_they_end_and_reused():
    """Stall timing keeps few event pairs however long the run: ended pairs are added to stall_s
    oldest first without waiting and handed out again; resolve waits for the rest; the report
    holds only seconds."""
    stats = OffloadStats()
    first, second = (FakeEvent(0.0), FakeEvent(2.0)), (FakeEvent(5.0), FakeEvent(9.0, ended=False))
    third = (FakeEvent(10.0), FakeEvent(11.0))
    stats.pending_stalls.extend([first, second, third])
    assert stats.stall_events() is first  # ended: added (2 ms) and reused; the second holds the third back
    assert stats.stall_s == pytest.approx(2e-3) and list(stats.pending_stalls) == [second, third]
    stats.resolve()
    assert second[1].synchronized and not stats.pending_stalls
    assert stats.stall_s == pytest.approx(7e-3) and stats.spare_events == [second, third]
    report = stats.to_dict()
    assert report["stall_s"] == pytest.approx(7e-3) and "spare_events" not in report and "pending_stalls" not in report


def test_the_blank_slot_is_zeroed_kept_out_of_use_and_given_back():
    """reserve_blank takes a free slot for good (zeroed, never filled nor evicted while the cache
    works through more experts than it holds), refuses where no other slot would be left, and
    release_blank gives it back."""
    cache = cache_of(3)
    cache.slab["gate_up"].fill_(float("nan"))
    blank = cache.reserve_blank()
    assert blank is not None and cache.reserve_blank() == blank  # once
    assert not cache.slab["gate_up"][blank].isnan().any() and not cache.slab["gate_up"][blank].any()
    for e in range(8):  # more experts than slots: every fetch lands elsewhere
        slot = cache.fetch((0, e), set())
        assert slot is not None and slot != blank
        cache.use([slot], [(0, e)])
    assert cache.key_of[blank] is None and not cache.slab["gate_up"][blank].any()
    cache.release_blank()
    assert cache.blank is None and blank not in cache.pinned and blank in cache.free
    assert cache_of(1).reserve_blank() is None  # the only slot: none to compute in
    two = cache_of(2)
    two.pin([(0, 0)])
    assert two.reserve_blank() is None and two.blank is None


def test_scratch_slots_stay_out_of_use_leave_room_and_go_back_with_the_blank():
    """reserve_scratch takes its slots for good (never filled nor evicted), refuses where fewer than
    `keep` (at least 2) slots would be left to cache in, and release_blank gives them back too."""
    cache = cache_of(5)
    blank = cache.reserve_blank()
    assert cache.reserve_scratch(2, keep=3) == []  # 5 - blank - 2 = 2 < 3
    scratch = cache.reserve_scratch(1, keep=3)
    assert len(scratch) == 1 and scratch[0] != blank and cache.reserve_scratch(1) == []  # once
    for e in range(8):  # more experts than slots: every fetch lands in the other three
        slot = cache.fetch((1, e), set())
        assert slot is not None and slot not in scratch + [blank]
        cache.use([slot], [(1, e)])
    assert cache.key_of[scratch[0]] is None and scratch[0] in cache.pinned
    cache.release_blank()
    assert not cache.scratch and scratch[0] in cache.free and scratch[0] not in cache.pinned
    assert cache_of(3).reserve_scratch(2) == []  # one slot would be left
