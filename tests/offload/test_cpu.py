"""Misses computed on the CPU (offload/cpu.py): the same greedy tokens as the resident model for every
predictor and store down to a 2-expert cache, in "cpu" mode, in "auto" with rates given, on the
worker thread and with the native call on the runner thread; the auto cost model's split; admission
of popular experts; stats; clear refusals."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future

import pytest
import torch
from conftest import run_cli, token_ids

import moekit
from moekit.cli import main
from moekit.experts.forms import DenseForm
from moekit.offload import OffloadConfig, load_offloaded
from moekit.offload.cache import ExpertCache
from moekit.offload.cpu import CPU_SCALE_RANGE, CostModel, CpuWorker, row_split, share_in_place, split_misses
from moekit.offload.planner import activation_bytes, kv_cache_bytes, resident_bytes
from moekit.offload.stats import OffloadStats
from moekit.offload.store import HostStore

CONTEXT = 40


@pytest.fixture(autouse=True)
def eager_split(monkeypatch):
    """This module tests the split run between captured pieces: decode steps with the CPU as partner
    inside one graph (offload.partner, the default on a GPU for small experts) are test_partner's."""
    monkeypatch.setenv("MOEKIT_CPU_GRAPH", "0")


def budget_for(cfg, slots: int, store: str = "disk", batch: int = 1) -> int:
    """Returns the CPU budget that leaves exactly `slots` float32 experts of cache."""
    dtype = torch.float32
    expert = DenseForm(cfg.hidden_size, cfg.expert_ffn, dtype).expert_bytes(0)
    fixed = (resident_bytes(cfg, dtype) + kv_cache_bytes(cfg, dtype, batch, CONTEXT)
             + activation_bytes(cfg, dtype, batch * CONTEXT, batch) + (expert if store == "disk" else 0))
    return fixed + slots * expert


def offloaded(path, cfg, slots=2, store="disk", trace=None, **kw):
    config = OffloadConfig(device_memory=budget_for(cfg, slots, store), context_tokens=CONTEXT, store=store, **kw)
    return load_offloaded(path, offload=config, trace=trace)


def greedy(model, ids, n=12):
    return model.generate(ids, max_new_tokens=n, temperature=0, eos_token_ids=())


@pytest.fixture(scope="module")
def mixtral(tiny):
    ckpt = tiny("mixtral")
    return ckpt.path, moekit.load_model(ckpt.path)


def check_counts(report: dict) -> None:
    """Every lookup was a hit, a demand fetch, an expert computed on the CPU or one read in place."""
    assert report["lookups"] == (report["hits"] + report["demand_fetches"] + report["cpu_experts"]
                                 + report["in_place_experts"] + report["row_split_experts"])


# ---- outputs never change --------------------------------------------------------------------

@pytest.mark.parametrize("predictor", ["none", "speculative", "oracle"])
@pytest.mark.parametrize("store", ["host", "disk"])
def test_cpu_misses_greedy_equals_resident_with_two_expert_cache(mixtral, predictor, store):
    path, resident = mixtral
    for prompt_len in (3, 12):  # every call on the CPU path; a 12-token prefill (> cpu_max_tokens) fetches
        ids = token_ids(1, prompt_len, seed=prompt_len)
        trace = None
        if predictor == "oracle":
            recorder = offloaded(path, resident.config, store=store, predictor="none", record_routing=True)
            greedy(recorder, ids)
            trace = recorder.offload.trace
        model = offloaded(path, resident.config, store=store, predictor=predictor, misses="cpu", trace=trace)
        assert model.offload.cache.num_slots == 2 and model.offload.misses == "cpu"
        assert torch.equal(greedy(model, ids), greedy(resident, ids)), (predictor, store, prompt_len)
        report = model.offload.report()
        check_counts(report)
        assert report["cpu_experts"] > 0 and report["cpu_s"] > 0 and report["cpu_bytes_per_token"] > 0
        if prompt_len == 3:  # no call above cpu_max_tokens: a miss is never fetched on demand
            assert report["demand_fetches"] == 0
        else:
            assert report["demand_fetches"] > 0


def test_pregate_predictor_and_pins_with_cpu_misses(mixtral, tmp_path):
    from moekit.offload import read_counts
    from moekit.offload.pregate import save_pregates, train_pregates

    path, resident = mixtral
    weights, report = train_pregates(resident, token_ids(1, 200, seed=2)[0], steps=30, seqlen=50)
    save_pregates(weights, resident.config, tmp_path, report)
    config = OffloadConfig(device_memory=budget_for(resident.config, 2), context_tokens=CONTEXT, misses="cpu",
                           predictor="pregate", pregate_path=str(tmp_path), pin_experts=0.5)
    model = load_offloaded(path, offload=config, pin_counts=read_counts(tmp_path / "expert_counts.json"))
    assert len(model.offload.cache.pinned) == 1
    ids = token_ids(1, 5, seed=4)
    assert torch.equal(greedy(model, ids), greedy(resident, ids))
    report = model.offload.report()
    check_counts(report)
    assert report["cpu_experts"] > 0 and report["predictor"] == "pregate"


def test_cpu_misses_logits_close_to_resident(mixtral):
    path, resident = mixtral
    ids = token_ids(1, 6, seed=3)
    model = offloaded(path, resident.config, misses="cpu", predictor="none")
    with torch.no_grad():
        got, expected = model(ids), resident(ids)
    # the CPU path runs F.linear where the resident model gathers and runs bmm: float32 rounding apart
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert model.offload.report()["cpu_experts"] > 0


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("store", ["host", "disk"])
def test_native_kernel_and_pytorch_path_give_the_resident_tokens(mixtral, monkeypatch, native, store):
    """The CPU part runs in the native kernel where a compiler exists (one call per layer), else
    in PyTorch: both give the resident model's tokens, batch 1 and 3."""
    from moekit import native as native_lib
    from moekit.offload import cpu

    if native and native_lib.library() is None:
        pytest.skip(f"no native library: {native_lib.unavailable_reason()}")
    if not native:
        monkeypatch.setattr(cpu, "native_usable", lambda layout, max_tokens: False)
    path, resident = mixtral
    for batch in (1, 3):
        ids = token_ids(batch, 4, seed=11)
        model = offloaded(path, resident.config, store=store, misses="cpu", predictor="none")
        assert model.offload.cpu.native is native
        assert torch.equal(greedy(model, ids, n=6), greedy(resident, ids, n=6)), (native, store, batch)
        assert model.offload.report()["cpu_experts"] > 0


def test_batch_of_three_on_the_cpu_path(mixtral):
    path, resident = mixtral
    ids = token_ids(3, 4, seed=8)
    config = OffloadConfig(device_memory=budget_for(resident.config, 2, batch=3), context_tokens=CONTEXT, batch=3,
                           misses="cpu")
    model = load_offloaded(path, offload=config)
    assert model.offload.cache.num_slots == 2
    assert torch.equal(greedy(model, ids, n=6), greedy(resident, ids, n=6))
    assert model.offload.report()["cpu_experts"] > 0


def test_worker_thread_gives_the_same_tokens(mixtral):
    """The former CUDA arrangement (experts on a worker thread, joined after the device part) on the CPU."""
    path, resident = mixtral
    model = offloaded(path, resident.config, misses="cpu", predictor="speculative", cpu_threads=1)
    runtime = model.offload
    runtime.cpu = CpuWorker(runtime.layout, runtime.store, runtime.device, 8, threads=1, threaded=True)
    ids = token_ids(1, 5, seed=11)
    try:
        assert torch.equal(greedy(model, ids), greedy(resident, ids))
    finally:
        runtime.cpu.close()
    report = runtime.report()
    assert report["cpu_experts"] > 0 and 0 < report["cpu_wait_s"] and report["cpu_threads"] == 1


def test_an_unknown_runner_team_setting_is_refused(mixtral, monkeypatch):
    """MOEKIT_RUNNER_TEAM other than own / omp (async_runner.cpp would take it as unset) is refused
    in one line where a worker first uses the runner thread; the known settings are taken."""
    from moekit.errors import MoekitError

    path, resident = mixtral
    model = offloaded(path, resident.config, store="host", misses="cpu", predictor="speculative", cpu_threads=1)
    runtime = model.offload
    monkeypatch.setenv("MOEKIT_RUNNER_TEAM", "openmp")
    with pytest.raises(MoekitError, match="MOEKIT_RUNNER_TEAM='openmp' is not a setting: use own"):
        CpuWorker(runtime.layout, runtime.store, runtime.device, 8, threads=1, asynchronous=True)
    CpuWorker(runtime.layout, runtime.store, runtime.device, 8, threads=1, asynchronous=False)  # no runner: not read
    for setting in ("own", "omp"):
        monkeypatch.setenv("MOEKIT_RUNNER_TEAM", setting)
        CpuWorker(runtime.layout, runtime.store, runtime.device, 8, threads=1, asynchronous=True)


def test_a_failure_after_the_start_leaves_no_call_running(mixtral, monkeypatch):
    """An error raised while the device part is launched (after the CPU call was started on the
    runner thread) propagates, and the runtime's next calls start and finish normally."""
    path, resident = mixtral
    model = offloaded(path, resident.config, store="host", misses="cpu", predictor="speculative", cpu_threads=1)
    runtime = model.offload
    runtime.cpu = CpuWorker(runtime.layout, runtime.store, runtime.device, 8, threads=1, asynchronous=True)
    real, failed = runtime._prefetch, []

    def prefetch(*a, **kw):
        if not failed:
            failed.append(1)
            raise RuntimeError("device part failed")
        return real(*a, **kw)

    monkeypatch.setattr(runtime, "_prefetch", prefetch)
    ids = token_ids(1, 5, seed=11)
    with pytest.raises(RuntimeError, match="device part failed") as caught:
        greedy(model, ids)
    # the traceback (kept, as a server's log record may keep it) holds the failed call's frames
    assert failed and caught.tb is not None and torch.equal(greedy(model, ids), greedy(resident, ids))


def test_runner_thread_gives_the_same_tokens_and_sums(mixtral):
    """The CUDA arrangement (the native call started on the runner thread, the device part launched,
    then the wait) run on the CPU device: the same greedy tokens as the resident model, and each
    submit/join gives the inline worker's bits (1 and 3 tokens, experts sharing tokens)."""
    from moekit.native.experts import Started

    path, resident = mixtral
    model = offloaded(path, resident.config, store="host", misses="cpu", predictor="speculative", cpu_threads=1)
    runtime = model.offload
    assert not runtime.cpu.asynchronous  # off CUDA: inline unless asked
    runtime.cpu = CpuWorker(runtime.layout, runtime.store, runtime.device, 8, threads=1, asynchronous=True)
    assert runtime.cpu.overlaps and runtime.cpu.native
    ids = token_ids(1, 5, seed=11)
    assert torch.equal(greedy(model, ids), greedy(resident, ids))
    report = runtime.report()
    assert report["cpu_experts"] > 0 and report["cpu_s"] > 0
    inline = CpuWorker(runtime.layout, runtime.store, runtime.device, 8, threads=1, asynchronous=False)
    layer, top_k, d = runtime.moe_layers[0], resident.config.top_k, resident.config.hidden_size
    g = torch.Generator().manual_seed(3)
    for tokens in (1, 3):
        x, w = torch.randn(tokens, d, generator=g), torch.rand(tokens, top_k, generator=g)
        jobs = [(e, [t * top_k + a for t in range(tokens) if (t + e) % 2 == 0 or tokens == 1])
                for a, e in enumerate(range(top_k))]
        handle = runtime.cpu.submit(layer, jobs, x, w)
        assert isinstance(handle[0], Started)
        out, cpu_s, wait_s = runtime.cpu.join(handle)
        assert torch.equal(out, inline.join(inline.submit(layer, jobs, x, w))[0]) and cpu_s > 0 and wait_s >= 0


def test_runner_thread_is_chosen_beside_cuda_with_a_host_store(mixtral, monkeypatch):
    """Beside CUDA (the worker is only made here, no device is used) the native call starts on the
    runner thread, unless MOEKIT_CPU_ASYNC=0, the store is on disk or the worker is threaded."""
    from moekit.offload.cpu import ASYNC_ENV

    path, resident = mixtral
    cuda = torch.device("cuda")
    monkeypatch.delenv(ASYNC_ENV, raising=False)
    host = offloaded(path, resident.config, store="host", misses="cpu").offload
    assert CpuWorker(host.layout, host.store, cuda, 8).asynchronous
    assert not CpuWorker(host.layout, host.store, cuda, 8, threaded=True).asynchronous
    disk = offloaded(path, resident.config, store="disk", misses="cpu").offload
    assert not CpuWorker(disk.layout, disk.store, cuda, 8).asynchronous
    monkeypatch.setenv(ASYNC_ENV, "0")
    assert not CpuWorker(host.layout, host.store, cuda, 8).asynchronous


@pytest.mark.parametrize("mode,store", [("inline", "host"), ("inline", "disk"), ("threaded", "host"),
                                        ("runner", "host")])
def test_profile_marks_every_split_call_in_order(mixtral, monkeypatch, mode, store):
    """MOEKIT_PROFILE_CPU_MISSES=1 records each split layer call's host timestamps in the order the
    path runs them (benchmarks/probes/profile_cpu_misses.py reads them); tokens do not change;
    unset, nothing is recorded."""
    from moekit.offload.cpu import PROFILE_ENV

    path, resident = mixtral
    ids = token_ids(1, 5, seed=4)
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert offloaded(path, resident.config, misses="cpu", predictor="none").offload.cpu.profile is None
    monkeypatch.setenv(PROFILE_ENV, "1")
    model = offloaded(path, resident.config, store=store, misses="cpu", predictor="speculative")
    runtime = model.offload
    if mode != "inline":
        runtime.cpu = CpuWorker(runtime.layout, runtime.store, runtime.device, 8, threads=1,
                                threaded=mode == "threaded", asynchronous=mode == "runner")
    try:
        assert torch.equal(greedy(model, ids, n=4), greedy(resident, ids, n=4))
    finally:
        runtime.cpu.close()
    calls = runtime.cpu.profile.calls
    assert len(calls) == 4 * len(runtime.moe_layers)  # a prefill call and 3 decode steps per MoE layer
    order = ["enter", "sync_start", "sync_end", "split", "device_launched", "cpu_start", "kernel_start",
             "kernel_end", "exit"]
    ran_cpu = [c for c in calls if c["cpu_experts"] > 0]
    assert ran_cpu and all(c["cpu_experts"] + c["device_experts"] >= 1 for c in calls)
    if mode == "runner":  # started before the device part is launched, waited for after it
        order = ["enter", "sync_start", "sync_end", "split", "cpu_start", "kernel_start", "device_launched",
                 "kernel_wait", "kernel_end", "exit"]
    for c in ran_cpu:
        if mode == "threaded":  # the worker runs beside the device part: only each thread's own order holds
            assert c["enter"] <= c["sync_start"] <= c["sync_end"] <= c["split"] <= c["cpu_start"] <= c["kernel_start"]
            assert c["kernel_start"] <= c["kernel_end"] <= c["exit"] and c["device_launched"] <= c["exit"]
        else:
            assert [c[k] for k in order] == sorted(c[k] for k in order), c


def test_cpu_rate_is_measured_on_layer_calls_of_top_k_experts(mixtral, monkeypatch):
    """measure_costs times CPU calls of top_k distinct experts (every token in each) and keeps an
    expert's share: a decode call's marginal cost, not one expert alone with the call's fixed cost."""
    from moekit.offload.cpu import measure_costs

    path, resident = mixtral
    model = offloaded(path, resident.config, store="host", misses="cpu", predictor="none")
    runtime, cfg = model.offload, resident.config
    calls, submit = [], runtime.cpu.submit

    def recording(layer, jobs, x_host, w_host):
        calls.append((layer, jobs, x_host.shape[0]))
        return submit(layer, jobs, x_host, w_host)

    monkeypatch.setattr(runtime.cpu, "submit", recording)
    costs = measure_costs(runtime, torch.float32)
    assert costs.cpu_s_one > 0 and costs.cpu_s_max > 0 and costs.max_tokens == 8 and costs.h2d_bytes_per_s > 0
    assert len(calls) == 8  # a warm-up and three runs at 1 and at 8 tokens
    for layer, jobs, tokens in calls:
        assert len(jobs) == cfg.top_k and len({e for e, _ in jobs}) == cfg.top_k
        assert all(flat == [t * cfg.top_k + a for t in range(tokens)] for a, (_, flat) in enumerate(jobs))
    measured = [(layer, tuple(e for e, _ in jobs)) for layer, jobs, _ in calls[1:4]]
    assert len(set(measured)) == 3  # a different layer or group each run: none warm in the caches


def with_costs(model, misses: str, link: str) -> None:
    """Gives a CPU-device runtime measured-looking rates: a slow link (a copy takes a second, the
    CPU a microsecond) or a fast one (the reverse)."""
    runtime = model.offload
    runtime.misses = misses
    expert = runtime.layout.expert_bytes()
    if link == "slow":
        runtime.costs = CostModel(h2d_bytes_per_s=1.0 * expert, cpu_s_one=1e-6, cpu_s_max=2e-6, max_tokens=8)
    else:
        runtime.costs = CostModel(h2d_bytes_per_s=1e6 * expert, cpu_s_one=1.0, cpu_s_max=2.0, max_tokens=8)
    runtime.cache.h2d_bytes_per_s = runtime.costs.h2d_bytes_per_s


def test_auto_falls_back_to_fetch_on_a_cpu_device(mixtral):
    path, resident = mixtral
    model = offloaded(path, resident.config, misses="auto", predictor="none")
    runtime = model.offload
    assert runtime.misses == "fetch" and "CPU" in runtime.misses_note and runtime.cpu is None
    ids = token_ids(1, 3, seed=4)
    assert torch.equal(greedy(model, ids), greedy(resident, ids))
    assert runtime.report()["cpu_experts"] == 0


@pytest.mark.parametrize("link", ["slow", "fast"])
@pytest.mark.parametrize("store,predictor", [("host", "none"), ("disk", "speculative")])
def test_auto_follows_its_cost_model(mixtral, link, store, predictor):
    """With rates given, a slow link sends every miss to the CPU and a fast one fetches them, with
    the resident model's tokens either way (the disk store's prefetches are copies in flight)."""
    path, resident = mixtral
    # 8 slots: every expert of both layers fits, so no fetch evicts one and auto is never forced to the CPU
    model = offloaded(path, resident.config, slots=8, misses="cpu", predictor=predictor, store=store)
    assert model.offload.cache.num_slots == 8
    with_costs(model, "auto", link)
    runtime = model.offload
    ids = token_ids(1, 3, seed=4)
    assert torch.equal(greedy(model, ids), greedy(resident, ids))
    report = runtime.report()
    check_counts(report)
    assert report["cost_model"]["h2d_bytes_per_s"] == runtime.costs.h2d_bytes_per_s
    if link == "slow":
        assert report["demand_fetches"] == 0 and report["cpu_experts"] > 0
    else:
        assert report["cpu_experts"] == 0 and report["demand_fetches"] > 0


def test_auto_fetches_only_misses_the_cache_would_keep(mixtral):
    """Over a link fast enough to fetch every miss, auto still computes on the CPU each miss whose
    fetch would evict a much more used expert (lfu, ADMIT_RATIO): popular cached experts stay, and
    a miss used more than ADMIT_RATIO times as often as the least used cached one is fetched."""
    path, resident = mixtral
    model = offloaded(path, resident.config, slots=2, store="host", misses="cpu", predictor="none")
    with_costs(model, "auto", "fast")
    runtime = model.offload
    cache, (first, last) = runtime.cache, runtime.moe_layers
    popular = [(first, 0), (last, 0)]
    for key in popular:
        cache.fetch(key, set())
    cache.count_uses(popular * 1000)  # far more than a few tokens' uses of any other expert
    ids = token_ids(1, 3, seed=4)
    assert torch.equal(greedy(model, ids), greedy(resident, ids))
    report = runtime.report()
    check_counts(report)
    assert [cache.slot(key) is not None for key in popular] == [True, True]
    assert report["demand_fetches"] == 0 and report["cpu_experts"] > 0
    # the other side of the rule: a miss far more used than a cached expert takes its slot
    cache.count_uses([(first, 0)] * 10000)  # still worth more than the popular misses: kept
    cache.count_uses([(last, e) for e in range(4) if e != 0] * 5000)
    runtime.reset_stats()
    assert torch.equal(greedy(model, ids), greedy(resident, ids))
    assert runtime.report()["demand_fetches"] > 0 and cache.slot((last, 0)) is None
    assert cache.slot((first, 0)) is not None


class Landing(Future):
    """A copy that never reports landed (done() is False) but has (result() returns at once)."""

    def done(self) -> bool:
        return False

    def result(self, timeout=None):
        return None


def test_auto_fetches_evict_no_copy_the_cpu_outran(mixtral):
    """A layer's expert whose copy is still in flight, computed on the CPU instead (it lands too late),
    keeps its slot: the layer's demand fetch evicts the expert the split compared with, not it."""
    path, resident = mixtral
    model = offloaded(path, resident.config, slots=2, store="host", misses="cpu", predictor="none")
    with_costs(model, "auto", "fast")
    runtime = model.offload
    cache, (first, last) = runtime.cache, runtime.moe_layers
    landing = cache.fetch((first, 1), set())  # the older of the two: evicted first on a tie of uses
    cache.fetch((last, 1), set())
    cache.pending[landing], cache.ready_at[landing] = Landing(), time.perf_counter() + 1e3  # lands in 1000 s
    cache.count_uses([(last, 1)] + [(first, 2)] * 5)
    ids, weights = torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.5]])
    with torch.no_grad():
        runtime.run(first, torch.randn(1, resident.config.hidden_size), ids, weights)
    report = runtime.report()
    assert (report["cpu_experts"], report["demand_fetches"]) == (1, 1)  # (first, 1) on the CPU, (first, 2) fetched
    assert cache.slot((first, 1)) == landing and cache.slot((last, 1)) is None


@pytest.mark.parametrize("link", ["slow", "fast"])
def test_prefetch_only_what_lands_in_time(mixtral, link):
    """With a cost model, a prediction is fetched only if its copy lands before the CPU would
    have computed it: never over a slow link, as before over a fast one."""
    path, resident = mixtral
    model = offloaded(path, resident.config, slots=4, misses="cpu", predictor="speculative", store="host")
    with_costs(model, "cpu", link)
    ids = token_ids(1, 3, seed=6)  # every call has at most 8 tokens: all take the CPU-miss path
    assert torch.equal(greedy(model, ids), greedy(resident, ids))
    report = model.offload.report()
    assert report["predicted"] > 0
    if link == "slow":
        assert report["prefetches"] == 0
    else:
        assert report["prefetches"] > 0


# ---- the cost model ----------------------------------------------------------------------------

def test_split_misses():
    # a copy costs 3, computing on the CPU 1: everything absent goes to the CPU
    assert sorted(split_misses([], [(1, 1.0), (2, 1.0)], 0.0, 3.0, 8)) == [1, 2]
    # a copy costs 1, the CPU 3: fetch them all
    assert split_misses([], [(1, 3.0), (2, 3.0)], 0.0, 1.0, 8) == []
    # equal costs: 4 misses balance 2 and 2 (max(2 fetches, 2 on the CPU) = 2)
    assert len(split_misses([], [(e, 1.0) for e in range(4)], 0.0, 1.0, 8)) == 2
    # the CPU takes the cheapest on the CPU (one token), the link the costliest (many tokens)
    assert split_misses([], [(1, 0.5), (2, 2.0)], 0.0, 1.5, 8) == [1]
    # a copy in flight that lands soon is waited for; one landing late is computed on the CPU
    assert split_misses([(1, 0.1, 1.0)], [], 0.0, 3.0, 8) == []
    assert split_misses([(1, 5.0, 1.0)], [], 0.0, 3.0, 8) == [1]
    # a busy link: demand fetches queue behind the copies already issued
    assert split_misses([], [(1, 1.0)], 5.0, 0.5, 8) == [1]
    # no free slot for a fetch: the CPU
    assert split_misses([], [(1, 3.0)], 0.0, 1.0, 0) == [1]
    # a miss the cache would not keep runs on the CPU however fast the link, and its time counts there:
    # two fetchable misses are both fetched (max(2 fetches, 1 on the CPU) = 2) where alone they split 1 and 1
    assert split_misses([], [(1, 3.0)], 0.0, 0.001, 8, [(5, 1.0)]) == [5]
    assert split_misses([], [(1, 1.0), (2, 1.0)], 0.0, 1.0, 8, [(3, 1.0)]) == [3]


def test_share_in_place():
    """The in-place share takes the costliest CPU experts while the link and the CPU finish sooner together."""
    # 2 CPU experts of 4.9 (Mixtral's, at 72 GB/s), in place 7.8: one moves (max(7.8, 4.9) < 9.8), not both
    assert share_in_place([(1, 4.9), (2, 4.9)], 0.0, 7.8) == [1]
    # eight equal misses, in place 1.5x the CPU's cost: three move (max(4.5, 5) = 5 < 8; a fourth: max(6, 4) = 6)
    assert len(share_in_place([(e, 1.0) for e in range(8)], 0.0, 1.5)) == 3
    # the costliest on the CPU (many tokens) moves first
    assert share_in_place([(1, 0.5), (2, 2.0)], 0.0, 1.0) == [2]
    # a link busy with the split's fetches takes none; no in-place rate, none
    assert share_in_place([(1, 1.0), (2, 1.0)], 5.0, 0.5) == []
    assert share_in_place([(1, 1.0), (2, 1.0)], 0.0, 0.0) == []
    # a fast link takes everything but keeps the CPU's share where equal (max(2 * 0.4, 0) vs max(0.4, 1))
    assert share_in_place([(1, 1.0), (2, 1.0)], 0.0, 0.4) == [1, 2]
    assert share_in_place([], 0.0, 1.0) == []


def test_row_split():
    """The row split's boundary: rows in proportion to the other side's time, a multiple of the quantum,
    strictly inside; none for narrow experts or a missing rate."""
    assert row_split(3.8, 7.8, 14336) == 9664  # Mixtral's rates: the CPU takes 67% of the rows (9,637 -> 9,664)
    assert row_split(1.0, 1.0, 1024) == 512
    assert row_split(1.0, 1000.0, 1024) == 960 and row_split(1000.0, 1.0, 1024) == 64  # never all on one side
    assert row_split(1.0, 1.0, 100) is None and row_split(0.0, 1.0, 1024) is None and row_split(1.0, 0.0, 1024) is None
    assert row_split(1.0, 1.0, 48, quantum=8) == 24


def test_cost_model_follows_observed_cpu_calls():
    """observe_cpu moves the CPU side geometrically toward observed / modelled, within its clamp; a
    call with nothing modelled or no time changes nothing."""
    model = CostModel(h2d_bytes_per_s=50e9, cpu_s_one=1.2e-3, cpu_s_max=2e-3, max_tokens=8)  # 6x too slow
    for _ in range(40):
        model.observe_cpu(8 * model.cpu_s(1), 8 * 0.2e-3)  # calls of 8 experts at 0.2 ms each
    assert model.cpu_s(1) == pytest.approx(0.2e-3, rel=0.02) and model.cpu_calls == 40
    model.observe_cpu(0.0, 1.0)
    model.observe_cpu(1.0, 0.0)
    assert model.cpu_calls == 40
    for _ in range(100):
        model.observe_cpu(model.cpu_s(1), 1e3)  # absurdly slow calls: at most CPU_SCALE_RANGE's top
    assert model.cpu_scale == CPU_SCALE_RANGE[1]


def test_cost_model_follows_observed_in_place_parts():
    """observe_in_place moves the in-place side like observe_cpu moves the CPU's: toward observed /
    modelled, within the same clamp; nothing modelled or no time changes nothing."""
    model = CostModel(h2d_bytes_per_s=50e9, cpu_s_one=1e-3, cpu_s_max=1e-3, max_tokens=1, in_place_s_one=0.3e-3)
    for _ in range(40):
        model.observe_in_place(3 * model.in_place_s(), 3 * 0.9e-3)  # parts of 3 experts at 0.9 ms each: 3x slower
    assert model.in_place_s() == pytest.approx(0.9e-3, rel=0.02) and model.in_place_calls == 40
    model.observe_in_place(0.0, 1.0)
    model.observe_in_place(1.0, 0.0)
    assert model.in_place_calls == 40 and model.cpu_scale == 1.0  # the CPU side untouched
    for _ in range(100):
        model.observe_in_place(model.in_place_s(), 1e-12)
    assert model.in_place_scale == CPU_SCALE_RANGE[0]


def test_split_calls_teach_the_cost_model(mixtral):
    """A runtime whose load-time CPU figure is far too slow (a second an expert) learns the real one
    from its own CPU calls as it decodes, with the resident model's tokens."""
    path, resident = mixtral
    model = offloaded(path, resident.config, slots=4, misses="cpu", predictor="none")
    with_costs(model, "cpu", "fast")  # cpu_s_one = 1 s
    ids = token_ids(1, 4, seed=4)
    assert torch.equal(greedy(model, ids), greedy(resident, ids))
    costs = model.offload.costs
    assert costs.cpu_calls > 0 and costs.cpu_scale < 0.5 and model.offload.report()["cost_model"]["cpu_calls"] > 0


def test_cost_model_interpolates_tokens():
    model = CostModel(h2d_bytes_per_s=50e9, cpu_s_one=2e-3, cpu_s_max=4e-3, max_tokens=5)
    assert model.cpu_s(1) == 2e-3 and model.cpu_s(5) == pytest.approx(4e-3) and model.cpu_s(3) == pytest.approx(3e-3)
    assert model.fetch_s(100e6) == pytest.approx(2e-3)
    assert CostModel(1.0, 1e-3, 1e-3, 1).cpu_s(4) == 1e-3


# ---- the cache: admission and the copy-queue model -------------------------------------------

def small_cache(policy: str = "lfu", slots: int = 2) -> ExpertCache:
    form = dense_form_small()
    store = HostStore(form, pin=False)
    store.add_layer(0, {"gate_up": torch.randn(4, 8, 4), "down": torch.randn(4, 4, 4)})
    return ExpertCache(form, store, slots, torch.device("cpu"), policy, OffloadStats())


def dense_form_small():
    from moekit.offload.layout import TensorLayout

    return TensorLayout(DenseForm(hidden=4, ffn=4, dtype=torch.float32), [0])


def test_admission_replaces_only_a_much_less_used_expert():
    cache = small_cache()
    assert cache.admit((0, 0), set(), 2.0) is not None  # a free slot takes any expert
    cache.fetch((0, 1), set())
    cache.count_uses([(0, 0)] * 5 + [(0, 1)] + [(0, 2)] * 2)
    assert cache.admit((0, 2), set(), 2.0) is None  # 2 uses is not more than twice expert 1's one
    cache.count_uses([(0, 2)])
    slot = cache.admit((0, 2), set(), 2.0)
    assert slot is not None and cache.slot((0, 1)) is None and cache.slot((0, 0)) is not None
    assert slot not in cache.prefetched  # a later use is a plain hit
    assert torch.equal(cache.expert(slot)["down"], cache.store.get(0, 2)["down"])
    lru = small_cache("lru")
    lru.fetch((0, 0), set())
    lru.fetch((0, 1), set())
    lru.count_uses([(0, 2)] * 10)
    assert lru.admit((0, 2), set(), 2.0) is None  # lru has no counts to compare: a full cache admits nothing


def test_copy_queue_model():
    cache = small_cache()
    assert cache.link_idle() and cache.queue_s() == 0.0 and cache.eta_s(0) == 0.0
    cache.h2d_bytes_per_s = cache.layout.expert_bytes() / 10.0  # 10 s per copy
    cache._model_copy(0, 0)
    cache._model_copy(1, 0)
    assert cache.ready_at[1] - cache.ready_at[0] == pytest.approx(10.0)
    assert cache.copy_free_at == cache.ready_at[1]


# ---- refusals, stats, the command line ------------------------------------------------------

def test_bad_values_are_refused():
    with pytest.raises(moekit.MoekitError, match="--misses 'gpu' unknown"):
        OffloadConfig(misses="gpu")
    with pytest.raises(moekit.MoekitError, match="cpu_max_tokens"):
        OffloadConfig(misses="cpu", cpu_max_tokens=0)


def test_compressed_experts_run_on_the_cpu_and_are_refused_without_a_compiler(tiny, tmp_path, monkeypatch):
    from moekit import native
    from moekit.quant.compress import compress
    from moekit.quant.config import QuantConfig

    path = tmp_path / "mixtral-4"
    compress(tiny("mixtral").path, path, QuantConfig(bits="4", group_size=16, method="rtn"), progress=False)
    if native.library() is not None:  # the native kernels decode in the matvec (native.compressed)
        ids = token_ids(1, 6, seed=2)
        plan = load_offloaded(path, offload=OffloadConfig(context_tokens=CONTEXT)).offload.plan
        budget = plan.planned_bytes - plan.cache_bytes + 2 * plan.expert_bytes  # a 2-expert cache
        model = load_offloaded(path, offload=OffloadConfig(misses="cpu", context_tokens=CONTEXT, device_memory=budget))
        assert model.offload.misses == "cpu" and model.offload.cpu.native
        expected = greedy(moekit.load_model(path), ids, 6)
        assert torch.equal(greedy(model, ids, 6), expected)
        assert model.offload.report()["cpu_experts"] > 0
        # the same on the runner thread (the CUDA arrangement: form.native_ffn(start=True); host store)
        model = load_offloaded(path, offload=OffloadConfig(misses="cpu", store="host", context_tokens=CONTEXT,
                                                           device_memory=budget))
        runtime = model.offload
        runtime.cpu = CpuWorker(runtime.layout, runtime.store, runtime.device, 8, threads=1, asynchronous=True)
        assert runtime.cpu.asynchronous and torch.equal(greedy(model, ids, 6), expected)
        assert runtime.report()["cpu_experts"] > 0
    monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no C++ compiler found (set CXX, or install g++)")
    with pytest.raises(moekit.MoekitError, match="--misses cpu: experts stored as int4 have no fast CPU path.*compiler"):
        load_offloaded(path, offload=OffloadConfig(misses="cpu", context_tokens=CONTEXT))
    model = load_offloaded(path, offload=OffloadConfig(misses="auto", context_tokens=CONTEXT))
    report = model.offload.report()
    assert report["misses"] == "auto" and report["misses_used"] == "fetch" and "int4" in report["misses_note"]


def test_generate_cli_cpu_misses(capsys):
    code, out, _ = run_cli(capsys, "generate", "--device", "cpu", "def f(x):", "--max-new-tokens", "8", "--json", "--dtype", "bfloat16")
    resident = json.loads(out)
    code, out, err = run_cli(capsys, "generate", "--device", "cpu", "def f(x):", "--max-new-tokens", "8", "--json", "--offload",
                         "--device-memory", "10MB", "--misses", "cpu")
    assert code == 0
    offloaded_ = json.loads(out)
    assert offloaded_["token_ids"] == resident["token_ids"]
    stats = offloaded_["offload"]
    assert stats["misses_used"] == "cpu" and stats["cpu_experts"] > 0
    code, out, err = run_cli(capsys, "generate", "--device", "cpu", "def f(x):", "--max-new-tokens", "4", "--offload",
                         "--device-memory", "10MB", "--misses", "cpu", "--stats")
    assert code == 0 and "experts on the CPU" in err and "CPU time" in err


def test_misses_flag_needs_offload_and_a_known_value(capsys):
    code, _, err = run_cli(capsys, "generate", "--device", "cpu", "hi", "--misses", "cpu")
    assert code == 2 and "--misses needs --offload" in err
    with pytest.raises(SystemExit):
        main(["generate", "hi", "--device", "cpu", "--offload", "--misses", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr()[1]


# ---- GPU: the CPU part inline, pinned staging and the measured cost model -------------------------

def gpu_split_model(tiny, ids: torch.Tensor, misses: str, predictor: str):
    """Returns (the resident float32 tiny mixtral's greedy tokens on ids, that model offloaded on CUDA
    with `misses`, its cache shrunk to 2 slots: the budget holds every tiny expert, so most routed
    experts then miss); the resident model is freed before the offloaded one loads."""
    ckpt = tiny("mixtral")
    resident = moekit.load_model(ckpt.path, device="cuda", dtype="float32")
    expected = greedy(resident, ids)
    del resident
    torch.cuda.empty_cache()
    model = load_offloaded(ckpt.path, device="cuda", dtype="float32", offload=OffloadConfig(
        device_memory=192 * 2**20, context_tokens=CONTEXT, misses=misses, predictor=predictor))
    model.offload.new_cache(2)
    return expected, model


@pytest.mark.gpu
@pytest.mark.parametrize("misses", ["cpu", "auto"])
def test_gpu_cpu_misses_match_resident(tiny, misses, monkeypatch):
    # the budget holds every tiny expert, where auto would read misses in place (mapped): this test is of
    # the split, so auto keeps it here (test_mapped covers auto's switch)
    monkeypatch.setattr("moekit.offload.source.AUTO_MAPPED_SHARE", 2.0)
    ids = token_ids(1, 5)
    expected, model = gpu_split_model(tiny, ids, misses, "speculative")
    runtime = model.offload
    costs = runtime.costs
    assert costs is not None and costs.h2d_bytes_per_s > 0 and 0 < costs.cpu_s_one and runtime.cpu.worker is None
    try:
        assert torch.equal(greedy(model, ids), expected)
    finally:
        runtime.cpu.close()
    report = runtime.report()
    check_counts(report)
    assert report["cost_model"] == costs.to_dict()
    if misses == "cpu":
        assert report["cpu_experts"] > 0 and report["demand_fetches"] == 0 and report["cpu_wait_s"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("share", ["mixed", "off", "rows"])
def test_gpu_auto_in_place_share_matches_resident(tiny, share, monkeypatch):
    """misses auto's split with its in-place share: missed experts computed on the CPU and read in
    place by the GPU in the same calls (whole, or split by rows: MOEKIT_ROW_SPLIT=1), the greedy
    tokens those of the resident model; with MOEKIT_IN_PLACE=0 none is read in place."""
    monkeypatch.setattr("moekit.offload.source.AUTO_MAPPED_SHARE", 2.0)  # keep the split (see above)
    monkeypatch.setattr("moekit.offload.source.IN_PLACE_MIN_EXPERT_BYTES", 0)  # tiny experts get the share too
    monkeypatch.setattr("moekit.offload.cpu.ROW_QUANTUM", 8)  # and tiny widths their row split
    if share == "off":
        monkeypatch.setenv("MOEKIT_IN_PLACE", "0")
    monkeypatch.setenv("MOEKIT_ROW_SPLIT", "1" if share == "rows" else "0")  # on by default
    ids = token_ids(1, 5)
    expected, model = gpu_split_model(tiny, ids, "auto", "none")
    runtime = model.offload
    costs = runtime.costs
    if share != "off":
        assert runtime.in_place is not None and costs.in_place_s_one > 0 and runtime.row_split_on == (share == "rows")
        costs.cpu_s_max = costs.cpu_s_one  # a tiny expert's times are launch costs: make the two sides equal
        costs.cpu_scale, costs.in_place_s_one = 1.0, costs.cpu_s_one
        monkeypatch.setattr("moekit.offload.cpu.CPU_SCALE_RANGE", (1.0, 1.0))  # and keep them so
    else:
        assert runtime.in_place is None
    try:
        assert torch.equal(greedy(model, ids), expected)
    finally:
        runtime.cpu.close()
    report = runtime.report()
    check_counts(report)
    assert report["in_place_share"] == (share != "off") and report["row_split"] == (share == "rows")
    if share == "mixed":
        assert report["cpu_experts"] > 0 and report["mapped_reads"] > 0 and report["decode_mapped_bytes"] > 0
    elif share == "rows":
        assert report["row_split_experts"] > 0 and report["decode_mapped_bytes"] > 0 and report["cpu_bytes"] > 0
    else:
        assert report["mapped_reads"] == 0
    # the in-place parts' device time was read back (events, without waiting)
    assert (costs.in_place_calls > 0) == (share != "off")


def test_the_auto_predictor_skips_only_calls_whose_misses_run_on_the_cpu(mixtral):
    """The default predictor (auto) is speculative, left unconsulted in decode-sized calls whose
    misses run on the CPU (prefill-sized calls, which fetch, still prefetch); a predictor asked for
    by name is consulted in every call."""
    path, resident = mixtral
    assert OffloadConfig().predictor == "auto"
    model = offloaded(path, resident.config, misses="cpu", store="host")
    ids = token_ids(1, 12, seed=3)  # 12 prompt tokens: a prefill call past cpu_max_tokens (8)
    assert torch.equal(greedy(model, ids, n=6), greedy(resident, ids, n=6))
    report = model.offload.report()
    assert report["predictor"] == "speculative" and report["predictor_in_split_calls"] is False
    assert model.offload.stats.predicted > 0 and report["cpu_experts"] > 0  # the prefill was predicted
    decode_only = offloaded(path, resident.config, misses="cpu", store="host")
    greedy(decode_only, token_ids(1, 4, seed=3), n=6)  # a 4-token prefill: every call split
    assert decode_only.offload.stats.predicted == 0
    named = offloaded(path, resident.config, misses="cpu", store="host", predictor="speculative")
    greedy(named, token_ids(1, 4, seed=3), n=6)
    assert named.offload.report()["predictor_in_split_calls"] is True
    assert named.offload.stats.predicted > 0  # its split calls predicted
