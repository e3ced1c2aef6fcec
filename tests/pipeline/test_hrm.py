"""The HRM (moekit.pipeline.hrm): its per-layer terms against hand-computed cases, the MoE-Lightning
brief's H200 arithmetic for Mixtral-8x7B (§5.1-5.2), and the policy search against exhaustive
enumeration and on machines whose best policy is known by construction."""

from __future__ import annotations

import dataclasses

import pytest

from moekit.config import ModelConfig
from moekit.errors import MoekitError
from moekit.pipeline.hrm import (
    ModelCosts,
    Policy,
    Workload,
    decode_layer_time,
    evaluate,
    max_batch,
    memory,
    model_costs,
    search,
)
from moekit.pipeline.machine import PRESETS, Machine

MIXTRAL = ModelConfig(family="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, expert_ffn=14336,
                      moe_layers=(True,) * 32, dtype="bfloat16")
BF16_EXPERT = 3 * 4096 * 14336 * 2


def toy(**over) -> ModelCosts:
    """Round numbers: 2 layers, 4 experts of 1000 bytes (top-2), KV 10 bytes a position."""
    base = {"num_layers": 2, "hidden": 8, "experts": 4, "top_k": 2, "moe_fraction": 1.0, "expert_bytes": 1000.0,
                "expert_flops": 100.0, "other_bytes": 200.0, "other_flops": 50.0, "resident_bytes": 500.0,
                "kv_bytes_per_token": 10.0, "attention_flops_per_position": 4.0, "qkv_values": 6, "out_values": 4,
                "act_bytes": 2, "prefill_act_bytes_per_token": 16.0}
    return ModelCosts(**{**base, **over})


TOY_MACHINE = Machine(name="toy", gpu_flops=1e6, gpu_bandwidth=1e5, gpu_memory=10**6, h2d_bandwidth=1e3,
                      d2h_bandwidth=2e3, host_flops=1e4, host_bandwidth=1e4, host_memory=10**6,
                      cpu_attention_bandwidth=5e3)


def test_decode_layer_terms_by_hand():
    m = toy()
    p = Policy(batch=4, micro_batch=2, resident_share=0.25, attention="cpu")
    t = decode_layer_time(m, TOY_MACHINE, p, context=10)
    streamed = 4 * 1000 * 0.75  # 3000 bytes of the layer's experts
    assert t.h2d == pytest.approx((streamed + 4 * 4 * 2) / 1e3)  # + attention outputs of 4 tokens
    assert t.d2h == pytest.approx(4 * 6 * 2 / 2e3)
    assert t.host_compute == pytest.approx(4 * 10 * 4 / 1e4)
    assert t.cpu_attention_kernel == pytest.approx(4 * 10 * 10 / 5e3)
    assert t.host_bandwidth == pytest.approx((400 + streamed) / 1e4)
    touched = 4 * (1 - (1 - 2 / 4) ** 2)  # experts two tokens route to: 3
    ffn = max(4 * 2 * 100 / 1e6, 2 * touched * 1000 / 1e5)
    other = max(4 * 50 / 1e6, 2 * 200 / 1e5)
    assert t.gpu == pytest.approx(ffn + other)
    assert t.time == pytest.approx(max(t.h2d, t.d2h, t.cpu, t.gpu)) == pytest.approx(3.032)
    assert t.bound == "PCIe host-to-device"


def test_the_rate_measured_inside_the_pipeline_is_preferred():
    """Machine.pipeline_attention_bandwidth (a batch run's) over the probe's cpu_attention_bandwidth."""
    m = toy()
    p = Policy(batch=4, micro_batch=2, resident_share=0.25, attention="cpu")
    inside = dataclasses.replace(TOY_MACHINE, pipeline_attention_bandwidth=2.5e3)
    assert inside.attention_rate == 2.5e3 and TOY_MACHINE.attention_rate == 5e3
    assert decode_layer_time(m, inside, p, context=10).cpu_attention_kernel == pytest.approx(4 * 10 * 10 / 2.5e3)


def test_gpu_attention_terms_and_memory_by_hand():
    m = toy()
    p = Policy(batch=4, micro_batch=4, resident_share=1.0, attention="gpu")
    t = decode_layer_time(m, TOY_MACHINE, p, context=10)
    assert t.h2d == 0 and t.d2h == 0 and t.host_bandwidth == 0
    attention = max(4 * 10 * 4 / 1e6, 4 * 10 * 10 / 1e5)
    ffn = max(4 * 2 * 100 / 1e6, 1 * 4 * (1 - 0.5 ** 4) * 1000 / 1e5)
    assert t.gpu == pytest.approx(attention + ffn + 200 / 1e5)
    w = Workload(prompt_len=6, gen_len=4)
    mem = memory(m, p, w)
    kv_all = 4 * 10 * 10 * 2
    assert mem.device == pytest.approx(500 + 8000 + 4 * 8 * 2 * 2 + 4 * 6 * 16 + 64 * 2**20 + kv_all)
    assert mem.host == pytest.approx(8000 + 4 * 6 * 8 * 2)
    cpu = memory(m, dataclasses.replace(p, attention="cpu", resident_share=0.0), w)
    # the prefill's KV staging (4 prompts of 6 positions, and its copy to the host), the q, k, v
    # packets of 4 tokens in flight
    assert cpu.device == pytest.approx(500 + 2 * 4000 + 4 * 8 * 2 * 2 + 4 * 6 * 16 + 64 * 2**20 + 2 * 4 * 6 * 10
                                       + 4 * 6 * 2)
    assert cpu.host == pytest.approx(8000 + 4 * 6 * 8 * 2 + kv_all + 4 * 10 * 2)


def test_sliding_window_caps_the_context():
    m = toy(sliding_window=4)
    p = Policy(2, 1, 0.0)
    assert decode_layer_time(m, TOY_MACHINE, p, 100).cpu_attention_kernel == pytest.approx(2 * 4 * 10 / 5e3)


# ---- the MoE-Lightning brief's H200 arithmetic (§5.1-5.2) ---------------------------------------

def h200(**over) -> Machine:
    return dataclasses.replace(PRESETS["h200"], **over)


def test_mixtral_bytes_and_flops():
    m = model_costs(MIXTRAL, BF16_EXPERT)
    assert m.layer_expert_bytes == pytest.approx(2.8186e9, rel=1e-4)
    assert m.total_expert_bytes == pytest.approx(90.19e9, rel=1e-4)
    assert m.kv_bytes_per_token * 32 == 131072
    assert m.top_k * m.expert_flops * 32 == pytest.approx(22.5e9, rel=1e-2)  # FFN FLOPs per token
    assert m.layer_expert_bytes / 4.8e12 == pytest.approx(0.59e-3, rel=1e-2)  # one HBM re-read per micro-batch
    assert m.resident_bytes == pytest.approx(2.68e9 + 0.52e9, rel=0.02)  # QKVO + embeddings and head


def test_h200_pcie_bound_is_0_61_tokens_per_s_per_sequence():
    m = model_costs(MIXTRAL, BF16_EXPERT)
    plan = evaluate(m, h200(), Policy(720, 36, 0.0, "cpu"), Workload(77, 128))
    assert plan.bound == "PCIe host-to-device"
    assert plan.layer.h2d == pytest.approx(51.2e-3, rel=0.01)  # per layer, r_w = 0
    assert plan.decode_step_s == pytest.approx(1.640, rel=0.01)
    assert plan.decode_tok_s / 720 == pytest.approx(0.610, rel=0.01)


def test_h200_attention_bound_at_75_gb_per_s():
    """Attention alone (no streamed weights, a fast link): 75e9 / (131072 c) tok/s, whatever N."""
    m = model_costs(MIXTRAL, BF16_EXPERT)
    fast = h200(h2d_bandwidth=1e15, d2h_bandwidth=1e15)
    for context, expected in ((141, 4058), (205, 2791)):
        t = decode_layer_time(m, fast, Policy(1000, 500, 1.0, "cpu"), context)
        assert t.bound == "host memory bandwidth"
        assert 1000 / (32 * t.time) == pytest.approx(expected, rel=2e-3)


def test_h200_shared_dram_crossover():
    """DMA of the weights and attention share host memory: W/55e9 = (W + N c 131072)/75e9 at N ~ 1221 (c = 205)."""
    m = model_costs(MIXTRAL, BF16_EXPERT)

    def crossing(context: float) -> int:
        lo, hi = 1, 10**5
        while lo < hi:
            n = (lo + hi) // 2
            t = decode_layer_time(m, h200(), Policy(n, 1, 0.0, "cpu"), context)
            lo, hi = (n + 1, hi) if t.host_bandwidth < t.h2d else (lo, n)
        return lo

    # the model also sends the attention outputs (8 KB a sequence) over the link: ~1.4% later
    assert crossing(205) == pytest.approx(1221, rel=0.02)
    assert crossing(141) == pytest.approx(1775, rel=0.02)


def test_h200_host_ram_bounds_the_batch_near_1535():
    """128 GiB less ~6 GB for the OS: the KV of ~1535 sequences of 205 positions beside the 90 GB store."""
    m = model_costs(MIXTRAL, BF16_EXPERT)
    n, limit = max_batch(m, h200(), 1, 0.0, "cpu", Workload(77, 128), 16 * 2**30, 128 * 2**30 - 6e9)
    assert limit == "host memory"
    assert n == pytest.approx(1535, rel=0.03)  # the brief counts no staging; the model counts the prompts' hidden states


def test_h200_search_sits_on_the_pcie_roof_at_the_host_memory_limit():
    m = model_costs(MIXTRAL, BF16_EXPERT)
    plan = search(m, h200(), Workload(77, 128), device_budget=16 * 2**30, host_budget=128 * 2**30 - 6e9)
    # one more expert in all 32 layers does not fit (11.3 GB), some over the layers do
    r = plan.policy.resident_experts
    assert plan.policy.attention == "cpu" and 0 < r < 32 and plan.memory.device <= 16 * 2**30
    assert plan.limited_by == "host memory" and plan.bound == "PCIe host-to-device"
    # the brief's decode ceiling for this box (every expert streamed), over the share still streamed
    assert 700 < plan.decode_tok_s * (256 - r) / 256 < 950
    assert plan.decode_tok_s == pytest.approx(0.61 * plan.policy.batch * 256 / (256 - r), rel=0.02)


# ---- the search -----------------------------------------------------------------------------------

def test_search_equals_exhaustive_enumeration():
    m = toy(num_layers=3)
    machine = dataclasses.replace(TOY_MACHINE, gpu_memory=64 * 2**20 + 13000, host_memory=10**5)
    w = Workload(prompt_len=5, gen_len=7, num_prompts=30)
    best = search(m, machine, w, host_budget=60000)
    brute = []
    for place in ("cpu", "gpu"):
        for r_w in (0, 0.25, 0.5, 0.75, 1.0):
            for mu in range(1, 31):
                for n in range(mu, 31, mu):
                    p = Policy(n, mu, r_w, place)
                    mem = memory(m, p, w)
                    if mem.device <= machine.gpu_memory and mem.host <= 60000:
                        brute.append(evaluate(m, machine, p, w).tok_s)
    assert brute and best.tok_s == pytest.approx(max(brute), rel=1e-9)


def test_search_breaks_ties_toward_fewer_micro_batches():
    """On the PCIe roof every micro-batch size decodes equally fast in the model; the search keeps
    the largest that fits (fewest micro-batches: each costs launches the model does not count).
    Mixtral cut to 8 layers, 15.5 GiB, 512 prompts: as bench_pipeline plans it."""
    cfg = dataclasses.replace(MIXTRAL, num_layers=8, moe_layers=(True,) * 8)
    costs = model_costs(cfg, BF16_EXPERT)
    w = Workload(77, 128, num_prompts=512)
    best = search(costs, PRESETS["h200"], w, device_budget=15.5 * 2**30, attention=("cpu",))
    assert best.bound == "PCIe host-to-device"
    for mu in range(best.policy.micro_batch + 1, 513):
        p = best.policy
        n, _ = max_batch(costs, PRESETS["h200"], mu, p.resident_share, "cpu", w, 15.5 * 2**30,
                         0.8 * PRESETS["h200"].host_memory, p.resident_experts)
        if n:
            policy = Policy(n, mu, p.resident_share, resident_experts=p.resident_experts)
            assert evaluate(costs, PRESETS["h200"], policy, w).tok_s < best.tok_s * (1 - 1e-9)


def test_search_keeps_everything_on_a_big_gpu_with_a_slow_host():
    m = model_costs(MIXTRAL, BF16_EXPERT)
    machine = h200(host_bandwidth=5e9, host_flops=5e10, h2d_bandwidth=5e9)
    plan = search(m, machine, Workload(77, 32, num_prompts=256))
    assert plan.policy.resident_share == 1.0 and plan.policy.attention == "gpu"
    assert plan.policy.batch == 256 and plan.limited_by == "prompts"


def test_search_puts_attention_on_the_cpu_when_the_gpu_holds_little():
    m = model_costs(MIXTRAL, BF16_EXPERT)
    plan = search(m, h200(), Workload(512, 128), device_budget=12e9, host_budget=200e9)
    assert plan.policy.attention == "cpu" and plan.policy.resident_share == 0.0
    gpu_only = search(m, h200(), Workload(512, 128), device_budget=12e9, host_budget=200e9, attention=("gpu",))
    assert plan.tok_s > gpu_only.tok_s  # KV in host memory admits a far larger N


def test_search_refuses_with_what_is_short():
    m = model_costs(MIXTRAL, BF16_EXPERT)
    with pytest.raises(MoekitError, match="no policy fits.*device memory"):
        search(m, h200(), Workload(77, 128), device_budget=4e9)
    with pytest.raises(MoekitError, match="lacks gpu_flops"):
        search(m, Machine(host_flops=1e9, host_bandwidth=1e9, host_memory=10**9), Workload(77, 128))
    with pytest.raises(MoekitError, match="--gen-len"):
        Workload(77, 0)
    with pytest.raises(MoekitError, match="micro_batch"):
        Policy(4, 8, 0.0)


def test_a_compressed_forms_bytes_kernels_and_memory():
    """Ternary-code experts (RTN on Mixtral: ~13.03 MB an expert, 0.59 bits a weight): PCIe and the
    host store count their bytes, the device their slots, tables and decode workspace; the GPU
    their kernels (a floor per routed expert, a slower rate per token), and past the kernels'
    token limit a whole decode and a dense GEMM."""
    from moekit.pipeline.hrm import (
        DECODE_WORKSPACE_BYTES_PER_WEIGHT,
        FORM_KERNELS,
        expert_calls_time,
        layer_decode_time,
        routed_tokens,
    )

    cfg = dataclasses.replace(MIXTRAL, num_layers=8, moe_layers=(True,) * 8)
    dense = model_costs(cfg, BF16_EXPERT)
    code = model_costs(cfg, 13.03e6, form="ternary_code", slot_bytes=13.04e6, table_bytes=16384)
    assert code.bits_per_weight == pytest.approx(0.592, abs=1e-3) and dense.bits_per_weight == 16
    machine, p, w = h200(), Policy(512, 32, 0.0), Workload(80, 32)
    td, tc = decode_layer_time(dense, machine, p, 96), decode_layer_time(code, machine, p, 96)
    outputs = 512 * dense.out_values * 2 / machine.h2d_bandwidth  # attention outputs cross either way
    assert (tc.h2d - outputs) / (td.h2d - outputs) == pytest.approx(13.03e6 / BF16_EXPERT)
    md, mc = memory(dense, p, w), memory(code, p, w)
    # the paged runtime decodes a whole layer (8 experts) into the workspace past the per-slot kernels
    workspace = 8 * cfg.params_per_expert * DECODE_WORKSPACE_BYTES_PER_WEIGHT
    assert mc.device - md.device == pytest.approx(2 * 8 * (13.04e6 - BF16_EXPERT) + 16384 + workspace)
    assert md.host - mc.host == pytest.approx(64 * (BF16_EXPERT - 13.03e6))
    weights_per_s, flops = FORM_KERNELS["ternary_code"]
    # a micro-batch of 8 tokens (16 routed slots): the per-slot kernels, a floor per expert called
    assert expert_calls_time(code, machine, 8, 1) == pytest.approx(
        16 * code.expert_flops / flops + code.touched(8) * cfg.params_per_expert / weights_per_s)
    assert expert_calls_time(dense, machine, 32, 1) == pytest.approx(64 * dense.expert_flops / machine.gpu_flops)
    # 32 and 1024 tokens: the layer decoded whole once (its own kernels), then a dense GEMM per call
    decode = 8 * code.decode_bytes / machine.gpu_bandwidth
    assert layer_decode_time(code, machine, 32, 1) == pytest.approx(decode) == layer_decode_time(code, machine, 1024, 1)
    assert layer_decode_time(code, machine, 8, 1) == 0 == layer_decode_time(dense, machine, 32, 1)
    assert expert_calls_time(code, machine, 32, 1) == pytest.approx(64 * code.expert_flops / machine.gpu_flops)
    assert expert_calls_time(code, machine, 1024, 1) == pytest.approx(2048 * code.expert_flops / machine.gpu_flops)
    # 16 micro-batches of a layer share its decode and read the dense workspace: bf16's reads plus one decode
    assert tc.gpu == pytest.approx(td.gpu + decode)
    called, below, past, above = routed_tokens(256, 0.25, 64)  # mean 64: about half past the limit
    assert 0.4 < past < 0.6 and called == pytest.approx(1 - past) and below + above == pytest.approx(64)
    assert tc.gpu > td.gpu  # its kernels cost the GPU more than bf16 GEMMs at these micro-batches
    one = decode_layer_time(code, machine, Policy(64, 64, 0.0), 96)  # one micro-batch: nothing to overlap
    assert one.serial and one.time == pytest.approx(max(one.comm, one.cpu + one.gpu))


# ---- host memory shared by the weight pages' DMA and CPU attention ----------------------------------

def test_shared_host_rate_bounds_the_layer():
    """A layer is no shorter than (streamed + KV bytes) / the shared host rate: the H200 run's copies
    slowed from 55 to 25-35 GB/s while CPU attention read the KV cache."""
    m = model_costs(MIXTRAL, BF16_EXPERT)
    policy = Policy(512, 32, 0.5, "cpu")
    alone = decode_layer_time(m, h200(), policy, 144)
    shared = decode_layer_time(m, h200(host_shared_bandwidth=50e9), policy, 144)
    streamed, kv = 4 * BF16_EXPERT, 512 * 144 * m.kv_bytes_per_token
    assert shared.host_bandwidth == pytest.approx((streamed + kv) / 50e9)
    assert shared.time >= shared.host_bandwidth > alone.h2d  # now above the PCIe term: it binds
    assert shared.bound == "host memory bandwidth" and alone.bound == "PCIe host-to-device"


def test_shared_host_rate_is_monotone_and_the_search_stays_feasible():
    m = model_costs(MIXTRAL, BF16_EXPERT)
    w = Workload(77, 128, num_prompts=1024)
    times = [decode_layer_time(m, h200(host_shared_bandwidth=rate), Policy(512, 32, 0.25, "cpu"), 141).time
             for rate in (200e9, 100e9, 70e9, 40e9, 20e9)]
    assert times == sorted(times)  # a slower shared rate never makes a layer faster
    by_n = [decode_layer_time(m, h200(host_shared_bandwidth=40e9), Policy(n, 32, 0.25, "cpu"), 141).time
            for n in (32, 256, 512, 1024)]
    assert by_n == sorted(by_n)
    budget = 16 * 2**30
    plans = [search(m, h200(host_shared_bandwidth=rate), w, device_budget=budget, attention=("cpu",))
             for rate in (None, 70e9, 40e9)]
    tok_s = [p.decode_tok_s for p in plans]
    assert tok_s == sorted(tok_s, reverse=True) and tok_s[-1] > 0
    for plan, rate in zip(plans, (75e9, 70e9, 40e9)):  # the preset's host_bandwidth is 75e9
        assert plan.memory.device <= budget
        layer = plan.layer
        streamed = m.layer_expert_bytes * (1 - plan.policy.resident_share)
        kv = plan.policy.batch * m.attended(w.mean_context) * m.kv_bytes_per_token
        assert layer.time >= (streamed + kv) / rate * (1 - 1e-9)


def test_measured_expert_rate_raises_the_ffn_term_and_favours_fewer_micro_batches():
    """Dense experts read at the grouped kernels' measured rate (a few tokens an expert reads far
    below the copy rate): each micro-batch re-reads every touched expert, so a slower rate moves the
    search to larger micro-batches; compressed forms keep their kernels' own cost."""
    m = model_costs(MIXTRAL, BF16_EXPERT)
    policy = Policy(512, 32, 0.5, "cpu")
    fast = decode_layer_time(m, h200(), policy, 141)
    slow = decode_layer_time(m, h200(expert_bandwidth=1e12), policy, 141)
    assert slow.hbm > fast.hbm
    ffn = 16 * m.touched(32) * BF16_EXPERT / 1e12
    assert slow.gpu >= ffn and slow.gpu > fast.gpu
    w = Workload(77, 128, num_prompts=512)
    plans = [search(m, h200(expert_bandwidth=rate), w, device_budget=16 * 2**30, attention=("cpu",))
             for rate in (None, 0.3e12)]
    assert plans[1].policy.micro_batches <= plans[0].policy.micro_batches
    assert plans[1].decode_tok_s <= plans[0].decode_tok_s
    compressed = dataclasses.replace(m, form="int4")
    assert decode_layer_time(compressed, h200(expert_bandwidth=1e9), policy, 141).gpu == pytest.approx(
        decode_layer_time(compressed, h200(), policy, 141).gpu)


def test_launch_thread_bounds_the_layer_and_favours_fewer_micro_batches():
    """The launch thread issues N / mu tasks a layer: with a measured host cost per task a layer is
    no shorter than their sum, and the search moves to fewer, larger micro-batches."""
    m = model_costs(MIXTRAL, BF16_EXPERT)
    policy = Policy(512, 32, 0.5, "cpu")
    t = decode_layer_time(m, h200(launch_task_s=3e-3), policy, 141)
    assert t.launch == pytest.approx(16 * 3e-3) and t.time == pytest.approx(t.launch)
    assert t.bound == "launch thread"
    assert decode_layer_time(m, h200(), policy, 141).launch == 0
    w = Workload(77, 128, num_prompts=512)
    plans = [search(m, h200(launch_task_s=s), w, device_budget=16 * 2**30, attention=("cpu",)) for s in (None, 3e-3)]
    assert plans[1].policy.micro_batches <= plans[0].policy.micro_batches
    assert plans[1].decode_tok_s <= plans[0].decode_tok_s
    assert plans[1].layer.time >= plans[1].policy.micro_batches * 3e-3 * (1 - 1e-9)


def test_prefill_adds_the_first_layers_experts_and_the_host_pool_by_hand():
    """The toy's prefill: 2 layers of prefill_layer_time, then the first layer's streamed experts
    (2 of 4 experts of 1000 bytes at 1e3 B/s: 2 s) and, with CPU attention, the host KV pool
    (4 sequences x (3 + 2) positions x 10 bytes x 2 layers at 1e4 B/s: 0.04 s); GPU attention no pool."""
    from moekit.pipeline.hrm import prefill_layer_time, prefill_time

    m, w = toy(), Workload(3, 2)
    for attention, pool in (("cpu", 0.04), ("gpu", 0.0)):
        policy = Policy(4, 2, 0.5, attention)
        layers = 2 * prefill_layer_time(m, TOY_MACHINE, policy, 3)
        assert prefill_time(m, TOY_MACHINE, policy, w) == pytest.approx(layers + 2.0 + pool)
        assert evaluate(m, TOY_MACHINE, policy, w).prefill_s == pytest.approx(layers + 2.0 + pool)


def test_prefill_time_is_monotone_and_the_search_stays_feasible():
    """More prompts, longer prompts, fewer resident experts or a slower link never shorten the
    prefill; the search's plans with it stay within the budget and their generation time counts it."""
    from moekit.pipeline.hrm import prefill_time

    m = model_costs(MIXTRAL, BF16_EXPERT)
    w = Workload(80, 32)
    by_n = [prefill_time(m, h200(), Policy(n, 32, 0.25, "cpu"), w) for n in (32, 128, 512)]
    by_len = [prefill_time(m, h200(), Policy(128, 32, 0.25, "cpu"), Workload(p, 32)) for p in (16, 80, 400)]
    by_share = [prefill_time(m, h200(), Policy(128, 32, r, "cpu"), w) for r in (0.75, 0.5, 0.25)]
    by_link = [prefill_time(m, h200(h2d_bandwidth=b), Policy(128, 32, 0.25, "cpu"), w) for b in (55e9, 25e9, 10e9)]
    for times in (by_n, by_len, by_share, by_link):
        assert times == sorted(times) and times[0] > 0
    budget = 16 * 2**30
    plan = search(m, h200(), Workload(80, 32, num_prompts=1024), device_budget=budget, attention=("cpu",))
    assert plan.memory.device <= budget
    assert plan.prefill_s == pytest.approx(prefill_time(m, h200(), plan.policy, Workload(80, 32, num_prompts=1024)))
    assert plan.generation_s == pytest.approx(plan.prefill_s + 31 * plan.decode_step_s)


def test_prefill_experts_run_at_the_measured_grouped_rate():
    """The prefill's routed-expert FLOPs are priced once, at Machine.prefill_expert_flops (the grouped
    kernels' measured prefill rate, 204-474 TFLOP/s on the H200 against a 785 GEMM): the layer is then
    the rest at the GEMM rate plus the experts at that rate; a faster rate never lengthens it; left
    out (or at the GEMM peak) the prefill is what it was; the decode's pricing does not change."""
    from moekit.pipeline.hrm import prefill_layer_time, prefill_time

    m, w = model_costs(MIXTRAL, BF16_EXPERT), Workload(80, 32)
    policy = Policy(512, 32, 0.5, "cpu")
    tokens = 512 * 80
    rest = tokens * (m.other_flops + m.attention_flops_per_position * 80 / 2) / 790e12
    experts = tokens * 2 * m.expert_flops
    # the ef150b8 run's policy is compute-bound: the layer is its GPU sum, the experts at the GEMM peak as before
    assert prefill_layer_time(m, h200(), policy, 80) == pytest.approx(rest + experts / 790e12)
    assert prefill_time(m, h200(prefill_expert_flops=790e12), policy, w) == pytest.approx(prefill_time(m, h200(), policy, w))
    assert prefill_layer_time(m, h200(prefill_expert_flops=204e12), policy, 80) == pytest.approx(rest + experts / 204e12)
    by_rate = [prefill_time(m, h200(prefill_expert_flops=r), policy, w) for r in (100e12, 204e12, 474e12, 700e12)]
    assert by_rate == sorted(by_rate, reverse=True) and by_rate[0] > 2 * by_rate[-1]
    # a rate above the GEMM peak is a measurement's artefact: capped there
    assert prefill_time(m, h200(prefill_expert_flops=2e15), policy, w) == pytest.approx(prefill_time(m, h200(), policy, w))
    assert decode_layer_time(m, h200(prefill_expert_flops=100e12), policy, 120) == decode_layer_time(m, h200(), policy, 120)
    # a compressed form's prefill decodes each layer whole and runs the same grouped kernels
    int4 = dataclasses.replace(m, form="int4", kernel_floor_s=1e-4, kernel_flops=33e12, kernel_max_tokens=64,
                               decode_bytes=1e8)
    assert prefill_time(int4, h200(prefill_expert_flops=204e12), policy, w) > prefill_time(int4, h200(), policy, w)
    measured = evaluate(m, h200(prefill_expert_flops=204e12), policy, w)
    assert "204 TFLOP/s" in measured.prefill_experts and "not measured" not in measured.prefill_experts
    assert "not measured" in evaluate(m, h200(), policy, w).prefill_experts
    assert measured.to_dict()["prefill_experts"] == measured.prefill_experts
# ---- resident experts over the layers (R in all, not the same count in every layer) ------------------

def test_spread_resident_puts_the_extra_experts_in_the_first_layers():
    from moekit.pipeline.hrm import spread_resident

    assert spread_resident(0, [8] * 4) == [0, 0, 0, 0]
    assert spread_resident(6, [8] * 4) == [2, 2, 1, 1]
    assert spread_resident(32, [8] * 4) == [8] * 4
    assert spread_resident(9, [2, 8, 8]) == [2, 4, 3]  # a small layer full, the rest spread over the others
    with pytest.raises(MoekitError, match="33 asked, the MoE layers hold 32"):
        spread_resident(33, [8] * 4)
    with pytest.raises(MoekitError, match="resident_experts must be a whole count"):
        Policy(2, 1, resident_experts=-1)


def test_uneven_residency_memory_and_step_by_hand():
    """3 layers of 4 experts of 1000 bytes, R = 5: layers hold 2, 2, 1. The device holds the 5
    resident slots and two buffers of the layer that streams the most (3 experts); a decode step
    is two layers streaming 2 experts and one streaming 3, each its own roofline max."""
    from moekit.pipeline.hrm import (
        describe_resident,
        layer_groups,
        prefill_layer_time,
        prefill_time,
        resident_layers,
    )

    m, w = toy(num_layers=3), Workload(prompt_len=3, gen_len=5)
    p = Policy(4, 2, 5 / 12, "gpu", resident_experts=5)
    assert resident_layers(m, p) == [2, 2, 1] and layer_groups(m, p) == [(2.0, 2), (1.0, 1)]
    assert describe_resident(m, p) == "5 of 12 experts resident (2 in 2 MoE layers, 1 in 1)"
    three, six = (memory(m, dataclasses.replace(p, resident_experts=r), w).device for r in (3, 6))
    assert memory(m, p, w).device - three == 2 * 1000  # two more resident slots, the same buffers (3 slots each)
    assert memory(m, p, w).device - six == 1000  # R = 6 streams 2 a layer at most: its buffers are 2 slots smaller
    two, one = (decode_layer_time(m, TOY_MACHINE, p, w.mean_context, j) for j in (2, 1))
    assert (two.h2d, one.h2d) == (2.0, 3.0)  # streamed bytes / 1e3 B/s
    plan = evaluate(m, TOY_MACHINE, p, w)
    assert plan.decode_step_s == pytest.approx(2 * two.time + one.time) and plan.layer == one  # the slowest layer
    layers = 2 * prefill_layer_time(m, TOY_MACHINE, p, 3, 2) + prefill_layer_time(m, TOY_MACHINE, p, 3, 1)
    assert prefill_time(m, TOY_MACHINE, p, w) == pytest.approx(layers + 2000 / 1e3)  # the first layer holds 2
    # a policy without R holds round(r_w E) in every layer: the same plan as R = that count x L
    old, new = Policy(4, 2, 0.25, "cpu"), Policy(4, 2, 0.25, "cpu", resident_experts=3)
    assert evaluate(m, TOY_MACHINE, old, w).to_dict()["tok_s"] == evaluate(m, TOY_MACHINE, new, w).tok_s
    assert memory(m, old, w) == memory(m, new, w)


def test_search_holds_extra_resident_experts_the_budget_has_room_for():
    """6 layers of 4 experts, 6 prompts, device budgets from one sequence's floor up in steps of one
    expert slot: the search equals the exhaustive enumeration over every R (0..24), N and mu; it
    never exceeds the budget, its prediction never falls as the budget grows, and between whole
    experts per layer it holds the extra experts that fit (R not a multiple of 6)."""
    m, w = toy(num_layers=6), Workload(prompt_len=5, gen_len=7, num_prompts=6)
    floor = memory(m, Policy(6, 1, 0.0, "cpu", 0), w).device
    plans = []
    for budget in (floor + 1000 * k for k in range(17)):
        best = search(m, TOY_MACHINE, w, device_budget=budget, host_budget=60000)
        assert memory(m, best.policy, w).device <= budget and best.memory.device <= budget
        brute = max(evaluate(m, TOY_MACHINE, p, w).tok_s
                    for place in ("cpu", "gpu") for r in range(25) for mu in range(1, 7) for n in range(mu, 7, mu)
                    for p in [Policy(n, mu, r / 24, place, r)]
                    if memory(m, p, w).device <= budget and memory(m, p, w).host <= 60000)
        assert best.tok_s == pytest.approx(brute, rel=1e-9)
        plans.append(best)
    assert [p.tok_s for p in plans] == sorted(p.tok_s for p in plans)
    uneven = [p.policy.resident_experts for p in plans if p.policy.resident_experts % 6]
    assert len(uneven) >= 8 and plans[1].policy.resident_experts == 1  # one slot of room: one expert more


def test_h200_32_layers_hold_extra_experts_within_16_gib():
    """The 32-layer run's case (bench_pipeline_32l_c8f8092: 512 prompts of 80, gen 128, the plan's
    16 GiB less the reserve): no whole expert more in every layer fits, so R was 0 and 5.5 GiB went
    unused; now the plan holds some over the layers, within the budget, and predicts more."""
    m = model_costs(MIXTRAL, BF16_EXPERT)
    w, budget = Workload(80, 128, num_prompts=512), 16642998272
    plan = search(m, h200(), w, device_budget=budget, attention=("cpu",))
    assert 0 < plan.policy.resident_experts < 32 and plan.memory.device <= budget
    none = dataclasses.replace(plan.policy, resident_share=0.0, resident_experts=0)
    assert plan.tok_s > evaluate(m, h200(), none, w).tok_s
    # budgets up to the whole box: never over, never slower
    plans = [search(m, h200(), w, device_budget=b * 2**30, attention=("cpu",)) for b in (12, 14, 16, 20, 40, 80)]
    assert all(p.memory.device <= b * 2**30 for p, b in zip(plans, (12, 14, 16, 20, 40, 80)))
    assert [p.tok_s for p in plans] == sorted(p.tok_s for p in plans)
    assert plans[-1].policy.resident_experts > 4 * 32  # 80 GiB: more than half of the experts
