"""Missed experts computed on the CPU inside the step (offload/partner.py; forced on the CPU with
MOEKIT_CPU_GRAPH=1, the default on a GPU for experts under 64 MiB): the
same greedy tokens as the resident model with a small cache, for misses cpu and auto, the CPU's work
counted from the native call, admissions filling the cache; a CPU side that never gets its post
releases the device with zeros and says so, and a device that never gets its sum gives up and
flags it. On the CPU the device kernels run under TRITON_INTERPRET=1 against the native runner
thread; the GPU test captures whole steps and compares with resident and with the eager split."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.experts import triton_ops
from moekit.native import library
from moekit.offload import OffloadConfig, load_offloaded

from conftest import token_ids
from test_mapped import CONTEXT, budget_for, budget_for_gpu, check_table, greedy, resident_tokens

pytestmark = pytest.mark.skipif(not triton_ops.HAVE_TRITON or library() is None,
                                reason="needs triton and the native library")


def partner_model(path, misses="cpu", slots=2, batch=1, **kw):
    cfg = moekit.read_config(path)[2]
    config = OffloadConfig(device_memory=budget_for(cfg, slots, batch), context_tokens=CONTEXT, store="host",
                           misses=misses, predictor="none", batch=batch, **kw)
    return load_offloaded(path, offload=config)


def compressed_mixtral(tiny, tmp_path, bits: str):
    """The tiny mixtral compressed (RTN) to int4 in groups of 16 or to the ternary code."""
    from moekit.quant.compress import compress
    from moekit.quant.config import QuantConfig

    path = tmp_path / f"mixtral-{bits}"
    quant = (QuantConfig(bits="4", group_size=16, method="rtn") if bits == "4"
             else QuantConfig(bits="ternary", method="rtn"))
    compress(tiny("mixtral").path, path, quant, progress=False)
    return path


@pytest.fixture
def graph_env(monkeypatch):
    monkeypatch.setenv("MOEKIT_CPU_GRAPH", "1")


@pytest.fixture(scope="module")
def mixtral(tiny):
    if not triton_ops.triton_usable(torch.empty(0)):
        pytest.skip("the CPU tests of the partner need TRITON_INTERPRET=1 (the gpu test covers CUDA)")
    ckpt = tiny("mixtral")
    return ckpt.path, moekit.load_model(ckpt.path)


def test_greedy_equals_resident_with_the_cpu_as_partner(mixtral, graph_env):
    """misses cpu (auto on the CPU device fetches: the GPU test runs both)."""
    path, resident = mixtral
    ids = token_ids(1, 3, seed=5)
    model = partner_model(path, slots=2)
    runtime = model.offload
    assert runtime.mapped is not None and runtime.mapped.partner is not None, runtime.misses_note
    got = greedy(model, ids, n=8)
    assert torch.equal(got, greedy(resident, ids, n=8))
    check_table(runtime)
    report = runtime.report()
    assert report["cpu_partner"] and report["mapped_reads"] == 0
    # every routed slot not a hit went to the CPU, which runs each of a layer's missed experts once
    assert 0 < report["cpu_experts"] <= report["lookups"] - report["hits"]
    assert report["cpu_experts"] > 0 and report["cpu_bytes_per_token"] > 0 and report["cpu_s"] > 0
    assert report["admissions"] > 0 and report["hits"] > 0
    assert report["decode_tokens"] == 7
    layers = report["partner_layer_us"]  # each layer call with work: its kernel time, by experts computed
    counted = sum(int(k) * n for k, n in layers["calls_by_experts"].items())
    assert layers["calls"] == sum(layers["calls_by_experts"].values()) > 0 and 0 < counted <= report["cpu_experts"]
    assert 0 < layers["median"] <= layers["p90"]
    from moekit.offload.cli import _cpu_rows

    assert "partner" in dict(_cpu_rows(report))["CPU time"]


@pytest.mark.slow
def test_batch_of_two_matches_resident_and_off_by_default(mixtral, graph_env, monkeypatch):
    path, resident = mixtral
    ids = token_ids(2, 4, seed=6)
    model = partner_model(path, slots=3, batch=2)
    assert torch.equal(greedy(model, ids, n=5), greedy(resident, ids, n=5))
    check_table(model.offload)
    monkeypatch.delenv("MOEKIT_CPU_GRAPH")  # unset: on a GPU only
    plain = partner_model(path, slots=3)
    assert plain.offload.mapped is None and not plain.offload.report()["cpu_partner"]


@pytest.mark.slow
def test_row_split_inside_the_step_matches_resident(mixtral, graph_env, monkeypatch):
    """The partner's row split (large experts, MOEKIT_ROW_SPLIT=1 on a GPU; here r forced): the CPU
    computes ffn rows [0, r) of each missed expert, the device reads rows [r, I) in place through
    the split table (cached experts -1 there, missed ones at their host rows): greedy tokens equal
    resident, and the report counts both shares."""
    path, resident = mixtral
    model = partner_model(path, slots=2)
    runtime = model.offload
    ffn = runtime.form.ffn
    monkeypatch.setattr(runtime, "partner_rows", lambda: ffn // 2)
    runtime.new_cache(2)
    table = runtime.mapped
    assert table is not None and table.cpu_rows == ffn // 2 and table.partner.cpu_rows == ffn // 2
    ids = token_ids(1, 3, seed=5)
    assert torch.equal(greedy(model, ids, n=8), greedy(resident, ids, n=8))
    split = table.split_table.cpu()
    for (layer, e), slot in table.mapped.items():  # a cached key is never read in place ...
        assert (split[table.pos[layer], e] == -1).all()
    for pos, layer in enumerate(table.layers):  # ... an uncached one at its host row
        for e in range(table.num_experts):
            if (layer, e) not in table.mapped:
                assert torch.equal(split[pos, e], table.split_host[pos, e])
    report = runtime.report()
    assert report["cpu_partner_rows"] == ffn // 2 and report["row_split_experts"] == report["cpu_experts"] > 0
    assert report["mapped_reads"] > 0 and report["mapped_bytes_per_token"] > 0
    expert, stats = runtime.layout.layer_bytes(table.layers[0]), runtime.stats  # every layer's experts alike
    assert stats.cpu_bytes == stats.cpu_experts * expert // 2  # half the rows on each side
    assert stats.mapped_bytes == stats.mapped_reads * (expert - expert // 2)


def test_host_visible_settings_keep_the_split(mixtral, graph_env):
    """A recorded routing trace and a named predictor need the host to see every layer call: no partner."""
    path, _ = mixtral
    for kw in (dict(record_routing=True), dict(predictor="speculative")):
        cfg = moekit.read_config(path)[2]
        model = load_offloaded(path, offload=OffloadConfig(device_memory=budget_for(cfg, 2), context_tokens=CONTEXT,
                                                           store="host", misses="cpu", **{"predictor": "none", **kw}))
        assert model.offload.mapped is None, kw


@pytest.mark.parametrize("bits", ["4", pytest.param("ternary", marks=pytest.mark.slow)])
def test_compressed_experts_with_the_cpu_as_partner_match_resident(tiny, tmp_path, graph_env, monkeypatch, bits):
    """int4 / ternary-code experts: the device runs the cached ones from their slots (the others as
    slot 0 weighted 0), the native step runs the missed ones through the form's kernel: greedy tokens
    equal the compressed model resident. On the CPU device only with MOEKIT_CPU_GRAPH=1."""
    if not triton_ops.triton_usable(torch.empty(0)):
        pytest.skip("needs TRITON_INTERPRET=1 on the CPU")
    path = compressed_mixtral(tiny, tmp_path, bits)
    plan = load_offloaded(path, offload=OffloadConfig(context_tokens=CONTEXT)).offload.plan
    budget = plan.planned_bytes - plan.cache_bytes + 2 * plan.expert_bytes  # a 2-expert cache
    model = load_offloaded(path, offload=OffloadConfig(misses="cpu", store="host", context_tokens=CONTEXT,
                                                       device_memory=budget, predictor="none"))
    runtime = model.offload
    assert runtime.mapped is not None and runtime.mapped.partner is not None and runtime.mapped.by_slot, \
        runtime.partner_refused
    assert runtime.mapped.partner.compressed is not None  # the native step, not a Python loop
    ids = token_ids(1, 3, seed=2)
    assert torch.equal(greedy(model, ids, 6), greedy(moekit.load_model(path), ids, 6))
    report = runtime.report()
    assert report["cpu_partner"] and report["cpu_experts"] > 0 and report["hits"] > 0
    table = runtime.mapped.table.cpu()
    for (layer, e), slot in runtime.mapped.mapped.items():  # mapped keys point at their slots
        assert table[runtime.mapped.pos[layer], e].tolist() == [slot, e + runtime.mapped.num_experts]
    monkeypatch.delenv("MOEKIT_CPU_GRAPH")  # unasked, on the CPU device: the split
    plain = load_offloaded(path, offload=OffloadConfig(misses="cpu", store="host", context_tokens=CONTEXT,
                                                       device_memory=budget, predictor="none"))
    assert plain.offload.mapped is None


def test_the_gather_copies_missed_compressed_experts_beside_the_cpu(tiny, tmp_path, graph_env, monkeypatch):
    """MOEKIT_PARTNER_GATHER=1 (on a GPU the default for compressed experts of 64 MiB and up): each
    step's missed expert of rank 1 is copied by the device into the scratch slot, rank 0 stays the
    CPU's. Greedy tokens equal the compressed model resident; the report counts both shares, and the
    scratch slot is out of the cache's use."""
    if not triton_ops.triton_usable(torch.empty(0)):
        pytest.skip("needs TRITON_INTERPRET=1 on the CPU")
    monkeypatch.setenv("MOEKIT_PARTNER_GATHER", "1")
    path = compressed_mixtral(tiny, tmp_path, "4")
    plan = load_offloaded(path, offload=OffloadConfig(context_tokens=CONTEXT)).offload.plan
    budget = plan.planned_bytes - plan.cache_bytes + 4 * plan.expert_bytes  # blank + scratch + 2 to cache in
    model = load_offloaded(path, offload=OffloadConfig(misses="cpu", store="host", context_tokens=CONTEXT,
                                                       device_memory=budget, predictor="none"))
    runtime = model.offload
    table, cache = runtime.mapped, runtime.cache
    assert table is not None and table.by_slot and len(table.gather_slots) == 1, runtime.partner_refused
    scratch = table.gather_slots[0]
    assert scratch in cache.pinned and scratch != cache.blank and scratch not in cache.free
    ids = token_ids(1, 3, seed=2)
    assert torch.equal(greedy(model, ids, 6), greedy(moekit.load_model(path), ids, 6))
    assert cache.key_of[scratch] is None  # never handed to an expert by the cache
    report = runtime.report()
    assert report["gather_slots"] == 1 and report["gather_refused"] is None
    assert report["gathered_experts"] > 0 and report["cpu_experts"] > 0
    assert report["mapped_reads"] == report["gathered_experts"] and report["mapped_bytes_per_token"] > 0
    # a layer's missed experts: rank 0 the CPU's, rank 1 the device's (prefill's misses are fetched)
    assert report["gathered_experts"] <= report["cpu_experts"]
    from moekit.offload.cli import _cpu_rows

    assert "1 scratch slot" in dict(_cpu_rows(report))["copied in by the device"]
    assert report["cpu_experts"] + report["gathered_experts"] <= report["lookups"] - report["hits"]


def test_a_gather_that_fails_its_check_leaves_every_miss_to_the_cpu(tiny, tmp_path, graph_env, monkeypatch):
    """A gather whose load-time copy comes back wrong is dropped (its scratch slot given back to the
    cache), the report says why, and the partner alone still decodes resident's tokens."""
    if not triton_ops.triton_usable(torch.empty(0)):
        pytest.skip("needs TRITON_INTERPRET=1 on the CPU")
    from moekit.offload.mapped import MappedTable

    monkeypatch.setenv("MOEKIT_PARTNER_GATHER", "1")
    monkeypatch.setattr(MappedTable, "gather_self_test", lambda self: "the gather's copy of an expert came back wrong")
    path = compressed_mixtral(tiny, tmp_path, "4")
    plan = load_offloaded(path, offload=OffloadConfig(context_tokens=CONTEXT)).offload.plan
    budget = plan.planned_bytes - plan.cache_bytes + 4 * plan.expert_bytes
    model = load_offloaded(path, offload=OffloadConfig(misses="cpu", store="host", context_tokens=CONTEXT,
                                                       device_memory=budget, predictor="none"))
    runtime = model.offload
    assert runtime.mapped is not None and runtime.mapped.partner is not None and not runtime.mapped.gather_slots
    assert not runtime.cache.scratch and runtime.cache.blank is not None
    ids = token_ids(1, 3, seed=2)
    assert torch.equal(greedy(model, ids, 6), greedy(moekit.load_model(path), ids, 6))
    report = runtime.report()
    assert report["gather_slots"] == 0 and "came back wrong" in report["gather_refused"]
    assert report["gathered_experts"] == 0 and report["cpu_experts"] > 0


def test_a_gather_without_room_says_so_and_a_malformed_switch_is_refused(tiny, tmp_path, graph_env, monkeypatch):
    """A cache too small for the scratch slot beside top-k slots runs the partner alone and says why;
    MOEKIT_PARTNER_GATHER set to a non-number stops the load with a message naming it (not a silent
    fallback of the partner)."""
    if not triton_ops.triton_usable(torch.empty(0)):
        pytest.skip("needs TRITON_INTERPRET=1 on the CPU")
    path = compressed_mixtral(tiny, tmp_path, "4")
    plan = load_offloaded(path, offload=OffloadConfig(context_tokens=CONTEXT)).offload.plan
    config = OffloadConfig(misses="cpu", store="host", context_tokens=CONTEXT, predictor="none",
                           device_memory=plan.planned_bytes - plan.cache_bytes + 2 * plan.expert_bytes)
    monkeypatch.setenv("MOEKIT_PARTNER_GATHER", "1")
    runtime = load_offloaded(path, offload=config).offload
    assert runtime.mapped is not None and runtime.mapped.partner is not None and not runtime.mapped.gather_slots
    assert runtime.cache.num_slots - 1 - 1 < 2  # the blank slot and one scratch slot would leave under top-k
    assert "fewer than top-k slots" in runtime.report()["gather_refused"]
    monkeypatch.setenv("MOEKIT_PARTNER_GATHER", "some")
    with pytest.raises(MoekitError, match="MOEKIT_PARTNER_GATHER='some'"):
        load_offloaded(path, offload=config)


def test_how_many_the_gather_takes(monkeypatch):
    from moekit.offload.partner import gather_slots

    gpu, cpu, large = torch.device("cuda"), torch.device("cpu"), 64 * 2**20
    monkeypatch.delenv("MOEKIT_PARTNER_GATHER", raising=False)
    assert gather_slots(gpu, 88 * 2**20, large, 2, True) == 1 and gather_slots(gpu, 88 * 2**20, large, 8, True) == 4
    assert gather_slots(gpu, 9 * 2**20, large, 2, True) == 0  # small experts: the CPU alone
    assert gather_slots(gpu, 88 * 2**20, large, 2, False) == 0 and gather_slots(cpu, 88 * 2**20, large, 2, True) == 0
    monkeypatch.setenv("MOEKIT_PARTNER_GATHER", "2")
    assert gather_slots(cpu, 1, large, 2, False) == 2
    monkeypatch.setenv("MOEKIT_PARTNER_GATHER", "yes")
    with pytest.raises(MoekitError, match="number of scratch slots"):
        gather_slots(gpu, 1, large, 2, True)


@pytest.mark.slow
def test_skipped_compressed_experts_read_the_blank_slot(tmp_path, graph_env):
    """The bundled model's ternary code (each layer's chunk capacity its own), bf16, an 8-slot cache:
    occupied slots hold other layers' experts, which do not decode in this layer's layout (before
    the blank slot: a segfault here, an illegal address on the H200). Skipped experts point at the
    cache's blank slot, zeros in every layout: greedy tokens equal resident."""
    from moekit.cli import main

    path = tmp_path / "tiny-moe-ternary"
    assert main(["compress", "--method", "rtn", "--bits", "ternary", "--out", str(path)]) == 0
    plan = load_offloaded(path, dtype="bfloat16", offload=OffloadConfig(context_tokens=CONTEXT)).offload.plan
    budget = plan.planned_bytes - plan.cache_bytes + 8 * plan.expert_bytes
    model = load_offloaded(path, dtype="bfloat16", offload=OffloadConfig(
        misses="cpu", store="host", context_tokens=CONTEXT, device_memory=budget, predictor="none"))
    runtime = model.offload
    assert len({runtime.layout.layer_bytes(layer) for layer in runtime.moe_layers}) > 1  # the layouts differ
    cache, table = runtime.cache, runtime.mapped
    assert table is not None and table.by_slot and cache.blank is not None, runtime.partner_refused
    assert all(not t[cache.blank].any() for t in cache.slab.values())
    assert (table.host_rows[:, :, 0] == cache.blank).all()
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy(model, ids, 8), greedy(moekit.load_model(path, dtype="bfloat16"), ids, 8))
    assert runtime.report()["cpu_experts"] > 0 and runtime.report()["pinned_slots"] == 0


def test_where_the_partner_serves_by_default(monkeypatch):
    from moekit.offload.partner import wanted

    gpu, cpu, large = torch.device("cuda"), torch.device("cpu"), 64 * 2**20
    monkeypatch.delenv("MOEKIT_CPU_GRAPH", raising=False)
    assert wanted(gpu, 9_437_184, large) and not wanted(gpu, 352_321_536, large) and not wanted(cpu, 1, large)
    monkeypatch.setenv("MOEKIT_CPU_GRAPH", "1")
    assert wanted(gpu, 352_321_536, large) and wanted(cpu, 1, large) and wanted(gpu, 1, large, native=False)
    monkeypatch.delenv("MOEKIT_CPU_GRAPH")
    assert not wanted(gpu, 1, large, native=False)  # a form with no native step: only when asked for
    # large experts of a form with no in-place kernel (Mixtral's int4): auto's split would be CPU + fetches
    assert wanted(gpu, 92_209_152, large, in_place_share=False) and not wanted(cpu, 92_209_152, large, True, False)
    assert not wanted(gpu, 92_209_152, large, native=False, in_place_share=False)
    monkeypatch.setenv("MOEKIT_CPU_GRAPH", "0")
    assert not wanted(gpu, 9_437_184, large)
    monkeypatch.setenv("MOEKIT_CPU_GRAPH", "yes")
    with pytest.raises(MoekitError, match="MOEKIT_CPU_GRAPH='yes': set it to 1"):
        wanted(gpu, 9_437_184, large)


def test_a_cpu_side_never_posted_releases_the_device_and_raises(mixtral, graph_env, monkeypatch):
    """The native side times out waiting for a post: every layer gets a zero sum and its done flag (the
    device never hangs), and finish() raises; a device that never gets a done flag gives up after
    its polls and sets the error flag, which check() turns into an error."""
    from moekit.offload import partner as partner_mod

    path, _ = mixtral
    model = partner_model(path, slots=2)
    partner = model.offload.mapped.partner
    monkeypatch.setattr(partner_mod, "TIMEOUT_S", 0.05)
    partner.out.fill_(1.0)
    partner.start(1)
    with pytest.raises(MoekitError, match="waited too long for the device"):
        partner.finish()
    assert torch.equal(partner.flags[1, :, 0], torch.full((partner.num_layers,), partner.seq))
    assert not partner.out[:, :1].any()  # the step's one token row of every layer
    # the device side: the done flag of seq + 1 never comes; the sum it would add is all ones
    monkeypatch.setattr(partner_mod, "MAX_POLLS", 3)
    partner.seq_dev.fill_(partner.seq + 1)
    partner.out.fill_(1.0)
    out = torch.zeros(1, partner.hidden)
    partner.combine(0, out)
    partner.combine(1, out)  # once the flag is up, later layers do not wait at all
    with pytest.raises(MoekitError, match="device waited too long"):
        partner.check()
    assert not out.any()
    partner.check()  # raised once: the flag was cleared


def test_abort_lets_a_started_step_end_at_once(mixtral, graph_env):
    path, _ = mixtral
    model = partner_model(path, slots=2)
    runtime = model.offload
    partner = runtime.mapped.partner
    before = runtime.stats.cpu_experts
    partner.start(1)
    partner.abort()  # the host failed before posting: the CPU side runs through on the flags set here
    assert not partner.started
    partner.start(1)  # and the runner is free again; a step left unfinished is aborted by the next start
    partner.start(1)
    runtime.new_cache(3)  # a new table waits for the old partner's started step first
    assert not partner.started and runtime.mapped.partner is not partner
    assert runtime.stats.cpu_experts == before  # aborted steps are not counted


def test_a_failed_round_trip_keeps_the_split(mixtral, graph_env, monkeypatch):
    from moekit.offload.partner import CpuPartner

    monkeypatch.setattr(CpuPartner, "self_test", lambda self: "the sum came back wrong")
    path, resident = mixtral
    model = partner_model(path, slots=2)
    report = model.offload.report()
    assert model.offload.mapped is None and not report["cpu_partner"]
    assert "came back wrong" in report["cpu_partner_refused"] and "partner" in report["misses_note"]
    ids = token_ids(1, 3, seed=5)
    assert torch.equal(greedy(model, ids, n=4), greedy(resident, ids, n=4))


@pytest.mark.gpu
@pytest.mark.parametrize("misses", ["cpu", "auto"])
def test_gpu_partner_steps_are_captured_whole_and_match_resident(tiny, monkeypatch, misses):
    """The default on a GPU (the tiny model's experts are small): steps captured whole, token-equal."""
    from moekit.generate import GenerationStats

    monkeypatch.delenv("MOEKIT_CPU_GRAPH", raising=False)
    ckpt = tiny("mixtral")
    ids = token_ids(1, 8)
    expected = resident_tokens(ckpt.path, ids, n=24)
    probe = load_offloaded(ckpt.path, device="cuda", dtype="float32", offload=OffloadConfig(
        device_memory=192 * 2**20, context_tokens=CONTEXT, misses=misses, predictor="none"))
    budget = budget_for_gpu(ckpt.path, probe, 2)
    del probe
    torch.cuda.empty_cache()
    model = load_offloaded(ckpt.path, device="cuda", dtype="float32", offload=OffloadConfig(
        device_memory=budget, context_tokens=CONTEXT, misses=misses, predictor="none"))
    model.offload.new_cache(2)
    runtime = model.offload
    assert runtime.mapped is not None and runtime.mapped.partner is not None
    stats = GenerationStats()
    got = model.generate(ids, max_new_tokens=24, temperature=0, eos_token_ids=(), stats=stats)
    assert stats.extra.get("graph") == "whole"
    assert torch.equal(got, expected)
    check_table(runtime)
    report = runtime.report()
    assert report["cpu_partner"] and report["cpu_experts"] > 0 and report["mapped_reads"] == 0
    assert report["admissions"] > 0


@pytest.mark.gpu
def test_gpu_row_split_partner_is_captured_whole_and_matches_resident(tiny, monkeypatch):
    """MOEKIT_ROW_SPLIT=1, misses auto (the large-expert threshold and the row quantum lowered for the
    tiny model): each missed expert split by rows between the CPU and in-place reads inside the
    captured step, r from the load-time rates: token-equal to resident."""
    from moekit.generate import GenerationStats
    from moekit.offload import cpu, source

    monkeypatch.delenv("MOEKIT_CPU_GRAPH", raising=False)
    monkeypatch.setenv("MOEKIT_ROW_SPLIT", "1")
    monkeypatch.setattr(source, "IN_PLACE_MIN_EXPERT_BYTES", 0)
    monkeypatch.setattr(cpu, "ROW_QUANTUM", 8)
    ckpt = tiny("mixtral")
    ids = token_ids(1, 8)
    expected = resident_tokens(ckpt.path, ids, n=24)
    probe = load_offloaded(ckpt.path, device="cuda", dtype="float32", offload=OffloadConfig(
        device_memory=192 * 2**20, context_tokens=CONTEXT, misses="auto", predictor="none"))
    budget = budget_for_gpu(ckpt.path, probe, 2)
    del probe
    torch.cuda.empty_cache()
    model = load_offloaded(ckpt.path, device="cuda", dtype="float32", offload=OffloadConfig(
        device_memory=budget, context_tokens=CONTEXT, misses="auto", predictor="none"))
    model.offload.new_cache(2)
    runtime = model.offload
    assert runtime.mapped is not None and runtime.mapped.cpu_rows is not None, runtime.misses_note
    stats = GenerationStats()
    got = model.generate(ids, max_new_tokens=24, temperature=0, eos_token_ids=(), stats=stats)
    assert stats.extra.get("graph") == "whole"
    assert torch.equal(got, expected)
    report = runtime.report()
    assert report["row_split_experts"] > 0 and report["mapped_reads"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("bits,gather", [("4", "0"), ("ternary", "0"), ("4", "1"), ("ternary", "1")])
def test_gpu_compressed_partner_steps_are_captured_whole_and_match_resident(tiny, tmp_path, monkeypatch, bits,
                                                                            gather):
    """int4 / ternary-code experts on the GPU (the partner by default): steps captured whole,
    token-equal to the compressed model resident on the GPU (the code's tables live on the device:
    the CPU side reads its host copies); with the gather (MOEKIT_PARTNER_GATHER=1) the device copies a
    missed expert of each layer into the scratch slot inside the captured step."""
    from moekit.generate import GenerationStats
    monkeypatch.delenv("MOEKIT_CPU_GRAPH", raising=False)
    monkeypatch.setenv("MOEKIT_PARTNER_GATHER", gather)
    path = compressed_mixtral(tiny, tmp_path, bits)
    ids = token_ids(1, 8)
    expected = resident_tokens(path, ids, n=16)
    probe = load_offloaded(path, device="cuda", dtype="float32", offload=OffloadConfig(
        device_memory=192 * 2**20, context_tokens=CONTEXT, misses="cpu", predictor="none"))
    slots = 2 + 2 * int(gather)  # room for the scratch slot beside the blank one
    budget = budget_for_gpu(path, probe, slots)
    del probe
    torch.cuda.empty_cache()
    model = load_offloaded(path, device="cuda", dtype="float32", offload=OffloadConfig(
        device_memory=budget, context_tokens=CONTEXT, misses="cpu", predictor="none"))
    model.offload.new_cache(slots)
    runtime = model.offload
    assert runtime.mapped is not None and runtime.mapped.by_slot, runtime.partner_refused
    assert len(runtime.mapped.gather_slots) == int(gather), runtime.gather_refused
    assert runtime.mapped.partner.compressed is not None
    stats = GenerationStats()
    got = model.generate(ids, max_new_tokens=16, temperature=0, eos_token_ids=(), stats=stats)
    assert stats.extra.get("graph") == "whole"
    assert torch.equal(got, expected)
    assert runtime.report()["cpu_experts"] > 0
    assert (runtime.report()["gathered_experts"] > 0) == (gather == "1")
