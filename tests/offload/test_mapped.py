"""Misses read in place from host memory (offload/mapped.py): the same greedy tokens as the resident
model down to a 2-expert cache, for both policies, with prefill through fetches and decode through
the offset table; the table always points every expert at valid weights of its own; the stats
add up; admissions fill the cache; clear refusals and fallbacks. On the CPU the slot kernels run
under TRITON_INTERPRET=1 and the "host rows" are ordinary tensors; the GPU test captures steps."""

from __future__ import annotations

import shutil

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.experts import triton_ops
from moekit.offload import OffloadConfig, load_offloaded
from moekit.experts.forms import DenseForm
from moekit.offload.planner import activation_bytes, kv_cache_bytes, resident_bytes

from conftest import run_cli, token_ids, write_char_tokenizer

CONTEXT = 40
pytestmark = pytest.mark.skipif(not triton_ops.HAVE_TRITON, reason="triton not installed")


def budget_for(cfg, slots: int, batch: int = 1) -> int:
    """Returns the CPU budget (host store) that leaves exactly `slots` float32 experts of cache."""
    dtype = torch.float32
    fixed = (resident_bytes(cfg, dtype) + kv_cache_bytes(cfg, dtype, batch, CONTEXT)
             + activation_bytes(cfg, dtype, batch * CONTEXT, batch))
    return fixed + slots * DenseForm(cfg.hidden_size, cfg.expert_ffn, dtype).expert_bytes(0)


def mapped_model(path, slots=2, batch=1, **kw):
    cfg = moekit.read_config(path)[2]
    config = OffloadConfig(device_memory=budget_for(cfg, slots, batch), context_tokens=CONTEXT, store="host",
                           misses="mapped", predictor="none", batch=batch, **kw)
    return load_offloaded(path, offload=config)


def resident_tokens(path, ids, n: int):
    """Returns the resident float32 model's greedy tokens on CUDA, its memory freed after."""
    resident = moekit.load_model(path, device="cuda", dtype="float32")
    expected = greedy(resident, ids, n=n)
    del resident
    torch.cuda.empty_cache()
    return expected


def greedy(model, ids, n=12):
    return model.generate(ids, max_new_tokens=n, temperature=0, eos_token_ids=())


@pytest.fixture(scope="module")
def mixtral(tiny):
    if not triton_ops.triton_usable(torch.empty(0)):  # CPU tensors: only the interpreter runs the kernels
        pytest.skip("the CPU tests of the mapped path need TRITON_INTERPRET=1 (the gpu test covers CUDA)")
    ckpt = tiny("mixtral")
    return ckpt.path, moekit.load_model(ckpt.path)


def check_table(runtime) -> None:
    """Every table row points at its expert: its cache slot when the mirror maps it, else its host row
    (as the next step reads it: after the boundary applies the changes made since the last step)."""
    mapped = runtime.mapped
    mapped.before_step()
    table = mapped.table.cpu()
    cache = runtime.cache
    for pos, layer in enumerate(mapped.layers):
        for e in range(mapped.num_experts):
            key = (layer, e)
            row = table[pos, e].tolist()
            if key in mapped.mapped:
                slot = mapped.mapped[key]
                assert cache.slot(key) == slot, key  # mapped keys are cached, in that slot
                assert row == [slot * mapped.slot_offsets[0], slot * mapped.slot_offsets[1], e + mapped.num_experts]
                assert torch.equal(cache.slab["gate_up"][slot].cpu(), runtime.store.layers[layer]["gate_up"][e])
            else:
                assert row == mapped.host_rows[pos, e].tolist(), key


# each policy and each prompt path (3 tokens: reads in place; 12: prefill fetches) keeps one default case;
# the other three pairings (~10-14 s each under the interpreter) run in CI's slow set
@pytest.mark.parametrize("policy, prompt_len", [
    ("lfu", 3), pytest.param("lru", 12, marks=pytest.mark.slow), pytest.param("lru", 3, marks=pytest.mark.slow),
    pytest.param("lfu", 12, marks=pytest.mark.slow)])
def test_greedy_equals_resident_with_two_expert_cache(mixtral, policy, prompt_len):
    path, resident = mixtral
    ids = token_ids(1, prompt_len, seed=prompt_len)
    model = mapped_model(path, slots=2, cache_policy=policy)
    runtime = model.offload
    assert runtime.misses == "mapped" and runtime.mapped is not None and runtime.cache.num_slots == 2
    assert torch.equal(greedy(model, ids), greedy(resident, ids)), (policy, prompt_len)
    check_table(runtime)
    report = runtime.report()
    # prefill of 12 tokens (24 slots > 16) fetches; every other call reads misses in place
    assert report["lookups"] == report["hits"] + report["demand_fetches"] + report["mapped_reads"]
    assert report["mapped_reads"] > 0 and report["mapped_bytes_per_token"] > 0
    assert (report["demand_fetches"] > 0) == (prompt_len == 12)
    assert report["admissions"] > 0 and report["hits"] > 0  # admitted experts are then read from the cache
    assert report["decode_tokens"] == 11


@pytest.mark.slow
def test_bigger_cache_and_batch_match_resident_and_a_second_call_stays_right(mixtral):
    path, resident = mixtral
    ids = token_ids(2, 5, seed=3)
    model = mapped_model(path, slots=6, batch=2)
    # 6 new tokens a call (was 12, then 20: ~50 s interpreted): the batch, the cache and the carry-over
    # between calls are the point, not the length
    assert torch.equal(greedy(model, ids, n=6), greedy(resident, ids, n=6))
    check_table(model.offload)
    ids = token_ids(2, 9, seed=4)  # the cache and table carry over into the next generate call
    assert torch.equal(greedy(model, ids, n=6), greedy(resident, ids, n=6))
    check_table(model.offload)
    report = model.offload.report()
    assert report["hit_rate"] > 0.3  # six of eight experts per layer fit: most reads come from the cache


def test_cached_experts_are_mapped_only_once_their_copy_landed(mixtral):
    """The mirror maps a filled slot at the next step boundary; an eviction unmaps before the next step."""
    path, _ = mixtral
    model = mapped_model(path, slots=2)
    runtime, mapped = model.offload, model.offload.mapped
    cache = runtime.cache
    slot = cache.fetch((1, 3), set())
    assert (1, 3) in mapped.to_map and (1, 3) not in mapped.mapped
    mapped.before_step()
    assert mapped.mapped[(1, 3)] == slot
    check_table(runtime)
    # fill both slots with other experts: (1, 3) is evicted and its row points at the host again
    cache.fetch((0, 0), set())
    cache.fetch((0, 1), {cache.slot((0, 0))})
    assert cache.slot((1, 3)) is None and mapped.updates == {(1, 3): None}
    mapped.before_step()
    check_table(runtime)
    assert set(mapped.mapped) == {(0, 0), (0, 1)}


def test_stats_table_and_cli(mixtral, capsys, tmp_path):
    path = shutil.copytree(mixtral[0], tmp_path / "mixtral")  # not the bundled model: ~40 s interpreted
    write_char_tokenizer(path)
    code, out, err = run_cli(capsys, "generate", "def f(x):", "--model", str(path), "--device", "cpu",
                             "--max-new-tokens", "6", "--offload", "--misses", "mapped", "--predictor", "none",
                             "--stats")
    assert code == 0, err
    assert "read in place" in err and "expert reads" in err


def test_in_place_reads_equal_the_host_rows_computed_on_the_cpu(mixtral):
    """misses auto's in-place share (InPlaceReads) reads each layer's experts from their host rows
    through the offset kernels: equal to the native CPU kernel on the same rows, any cache contents."""
    from moekit.offload.mapped import InPlaceReads

    path, _ = mixtral
    runtime = mapped_model(path).offload
    runtime.cache.fetch((runtime.moe_layers[0], 1), set())  # a cached expert is still read from its host row
    reads = InPlaceReads(runtime)
    gen = torch.Generator().manual_seed(0)
    for layer in runtime.moe_layers:
        count = runtime.model_config.experts_in(layer)
        ids = torch.tensor([[0], [1], [count - 1]])
        xs = torch.randn(3, runtime.form.hidden, generator=gen)
        w = torch.rand(3, 1, generator=gen)
        got = reads.run(layer, xs, ids, w)
        host = runtime.layout.view(runtime.store.layers[layer], layer)
        want = torch.cat([runtime.form.run(xs[i:i + 1], ids[i:i + 1], w[i:i + 1], host) for i in range(3)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_refusals_and_fallbacks(mixtral, tmp_path):
    path, _ = mixtral
    with pytest.raises(MoekitError, match="host store"):
        OffloadConfig(misses="mapped", store="disk")
    with pytest.raises(MoekitError, match="strict"):
        OffloadConfig(misses="mapped", strict=True, predictor="speculative")
    cfg = moekit.read_config(path)[2]
    model = load_offloaded(path, offload=OffloadConfig(
        device_memory=budget_for(cfg, 2), context_tokens=CONTEXT, store="host", misses="mapped",
        predictor="speculative"))
    assert model.offload.misses == "mapped" and "prefill" in model.offload.misses_note


def test_compressed_experts_are_refused_in_one_line(tiny, tmp_path):
    """Compressed forms' kernels read cache slots, not host memory in place: asking for mapped
    misses with them is refused, naming what to use instead (it used to fall back silently)."""
    from moekit.errors import MoekitError
    from moekit.quant.compress import compress
    from moekit.quant.config import QuantConfig

    out = tmp_path / "int4"
    compress(tiny("mixtral").path, out, QuantConfig(bits="4", group_size=16, method="rtn"), progress=False)
    with pytest.raises(MoekitError, match="cannot be read in place.*use --misses fetch") as err:
        load_offloaded(out, offload=OffloadConfig(store="host", misses="mapped", predictor="none",
                                                  context_tokens=CONTEXT))
    assert "\n" not in str(err.value)


@pytest.mark.gpu
def test_gpu_steps_are_captured_whole_and_match_resident(tiny):
    from moekit.generate import GenerationStats

    ckpt = tiny("mixtral")
    ids = token_ids(1, 8)
    expected = resident_tokens(ckpt.path, ids, n=24)
    budget = 192 * 2**20
    for policy in ("lfu", "lru"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model = load_offloaded(ckpt.path, device="cuda", dtype="float32", offload=OffloadConfig(
            device_memory=budget, context_tokens=CONTEXT, misses="mapped", predictor="none", cache_policy=policy))
        runtime = model.offload
        assert runtime.misses == "mapped", runtime.misses_note
        stats = GenerationStats()
        got = model.generate(ids, max_new_tokens=24, temperature=0, eos_token_ids=(), stats=stats)
        assert stats.extra.get("graph") == "whole"
        assert torch.equal(got, expected), policy
        report = runtime.report()
        check_table(runtime)
        assert report["lookups"] == report["hits"] + report["demand_fetches"] + report["mapped_reads"]
        assert report["peak_device_bytes"] <= budget
        assert torch.cuda.max_memory_allocated() - base <= budget
        # a 2-slot cache: misses every step, admissions and evictions between steps, outputs unchanged
        small = load_offloaded(ckpt.path, device="cuda", dtype="float32", offload=OffloadConfig(
            device_memory=budget_for_gpu(ckpt.path, model, 2), context_tokens=CONTEXT, misses="mapped",
            predictor="none", cache_policy=policy))
        # the measured warm-up gives the cache what the plan over-estimated (here every expert of the
        # tiny model): a 2-slot cache, made as reserve() remakes it, misses again
        small.offload.new_cache(2)
        assert small.offload.cache.num_slots == 2 and small.offload.misses == "mapped"
        assert torch.equal(greedy(small, ids, n=24), expected), policy
        check_table(small.offload)
        assert small.offload.report()["admissions"] > 0
        del model, small
        torch.cuda.empty_cache()


def budget_for_gpu(path, model, slots: int) -> int:
    """Returns a GPU budget that leaves about `slots` experts: the larger of the planned and the
    measured non-expert bytes of `model`'s load, plus the slots and half an expert."""
    plan = model.offload.plan
    fixed = max(plan.planned_bytes, plan.measured_peak_bytes or 0) - plan.cache_bytes
    return fixed + slots * plan.expert_bytes + plan.expert_bytes // 2


def test_auto_reads_in_place_only_where_the_cache_holds_half_the_experts():
    from moekit.offload.source import AUTO_MAPPED_SHARE, auto_reads_in_place

    assert AUTO_MAPPED_SHARE == 0.5
    assert auto_reads_in_place(576, 1024) and auto_reads_in_place(512, 1024)  # the H200 half row: 56%
    assert not auto_reads_in_place(511, 1024) and not auto_reads_in_place(64, 1024)  # the host row: 6%
    assert not auto_reads_in_place(8, 0)
    # experts as large as Mixtral's (352 MB) stay on the split whatever the cache holds
    assert auto_reads_in_place(576, 1024, 12_582_912) and not auto_reads_in_place(36, 64, 352_321_536)


def test_auto_on_the_cpu_never_reads_in_place(tiny):
    """misses auto on the CPU device fetches (nothing crosses a link) whatever the cache holds."""
    ckpt = tiny("mixtral")
    model = load_offloaded(ckpt.path, offload=OffloadConfig(context_tokens=CONTEXT))  # a cache of every expert
    assert model.offload.misses == "fetch" and "CPU" in model.offload.misses_note


@pytest.mark.gpu
def test_gpu_auto_reads_in_place_where_the_cache_holds_most_experts(tiny):
    """misses auto (the default) with a cache of every expert runs as mapped: decode steps captured
    whole, tokens equal to resident."""
    from moekit.generate import GenerationStats

    ckpt = tiny("mixtral")
    ids = token_ids(1, 8)
    expected = resident_tokens(ckpt.path, ids, n=16)
    model = load_offloaded(ckpt.path, device="cuda", dtype="float32", offload=OffloadConfig(
        device_memory=192 * 2**20, context_tokens=CONTEXT))
    runtime = model.offload
    assert runtime.config.misses == "auto" and runtime.misses == "mapped", runtime.misses_note
    stats = GenerationStats()
    got = model.generate(ids, max_new_tokens=16, temperature=0, eos_token_ids=(), stats=stats)
    assert stats.extra.get("graph") == "whole"
    assert torch.equal(got, expected)
