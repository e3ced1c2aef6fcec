"""Offloaded experts: identical greedy tokens to the resident model for every predictor, policy and
store down to a 2-expert cache; the byte budget; clear refusals; predictor accuracy vs true routing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import moekit
from moekit.offload import OffloadConfig, load_offloaded, parse_size
from moekit.experts.forms import DenseForm
from moekit.offload.planner import activation_bytes, kv_cache_bytes, prefill_activation_bytes, resident_bytes

from conftest import VOCAB, token_ids

CONTEXT = 40


def budget_for(cfg, slots: int, dtype=torch.float32, store_reserve: bool = True, batch: int = 1) -> int:
    """Returns the device budget that leaves exactly `slots` experts of cache (CPU, disk store)."""
    expert = DenseForm(cfg.hidden_size, cfg.expert_ffn, dtype).expert_bytes(0)
    fixed = (resident_bytes(cfg, dtype) + kv_cache_bytes(cfg, dtype, batch, CONTEXT)
             + activation_bytes(cfg, dtype, batch * CONTEXT, batch) + (expert if store_reserve else 0))
    return fixed + slots * expert


def offloaded(path, slots=2, **kw):
    cfg = moekit.read_config(path)[2]
    store = kw.get("store", "auto")
    config = OffloadConfig(device_memory=budget_for(cfg, slots, store_reserve=store != "host",
                                                    batch=kw.get("batch", 1)),
                           context_tokens=CONTEXT, **kw)
    return load_offloaded(path, offload=config)


def greedy(model, ids, n=12):
    return model.generate(ids, max_new_tokens=n, temperature=0, eos_token_ids=())


@pytest.fixture(scope="module")
def mixtral(tiny):
    ckpt = tiny("mixtral")
    return ckpt, moekit.load_model(ckpt.path)


# ---- outputs never change --------------------------------------------------------------------

@pytest.mark.parametrize("predictor", ["none", "speculative", "oracle"])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_greedy_equals_resident_with_two_expert_cache(mixtral, predictor, policy):
    ckpt, resident = mixtral
    for prompt_len in (3, 12):  # 6 routed slots (gathered path) and 24 (grouped), both in waves
        ids = token_ids(1, prompt_len, seed=prompt_len)
        expected = greedy(resident, ids)
        trace = None
        if predictor == "oracle":  # record the true routing in a first run, replay it in a second
            recorder = offloaded(ckpt.path, record_routing=True, predictor="none")
            greedy(recorder, ids)
            trace = recorder.offload.trace
        config = OffloadConfig(device_memory=budget_for(resident.config, 2), context_tokens=CONTEXT,
                               predictor=predictor, cache_policy=policy)
        model = load_offloaded(ckpt.path, offload=config, trace=trace)
        assert model.offload.cache.num_slots == 2
        assert torch.equal(greedy(model, ids), expected), (predictor, policy, prompt_len)
        report = model.offload.report()
        assert report["demand_fetches"] > 0 and report["lookups"] == report["hits"] + report["demand_fetches"]
        if predictor == "oracle":
            assert report["prefetch_precision"] == 1.0 and report["prefetch_recall"] == 1.0


@pytest.mark.parametrize("store", ["host", "disk"])
def test_batch_and_stores_match_resident(mixtral, store):
    ckpt, resident = mixtral
    ids = token_ids(3, 5, seed=9)  # batch 3: 6 routed slots per decode step, up to 4 distinct experts
    model = offloaded(ckpt.path, slots=3, store=store, batch=3)
    assert model.offload.store.kind == store
    assert torch.equal(greedy(model, ids), greedy(resident, ids))


def test_logits_match_resident_on_a_long_prefill(mixtral):
    ckpt, resident = mixtral
    ids = token_ids(1, 30, seed=5)
    model = offloaded(ckpt.path, slots=2)
    with torch.no_grad():
        assert torch.equal(model(ids), resident(ids))


def test_pregate_predictor_and_pins_keep_outputs(mixtral, tmp_path):
    from moekit.offload.pregate import save_pregates, train_pregates

    ckpt, resident = mixtral
    weights, report = train_pregates(resident, token_ids(1, 200, seed=2)[0], steps=30, seqlen=50)
    save_pregates(weights, resident.config, tmp_path, report)
    assert (tmp_path / "pregate.safetensors").exists() and (tmp_path / "expert_counts.json").exists()
    from moekit.offload import read_counts

    counts = read_counts(tmp_path / "expert_counts.json")
    ids = token_ids(1, 6, seed=4)
    config = OffloadConfig(device_memory=budget_for(resident.config, 4), context_tokens=CONTEXT,
                           predictor="pregate", pregate_path=str(tmp_path), pin_experts=0.5)
    model = load_offloaded(ckpt.path, offload=config, pin_counts=counts)
    assert len(model.offload.cache.pinned) == 2
    assert torch.equal(greedy(model, ids), greedy(resident, ids))
    pinned_keys = {model.offload.cache.key_of[s] for s in model.offload.cache.pinned}
    assert all(model.offload.cache.slot(k) is not None for k in pinned_keys)  # never evicted


# ---- the budget ------------------------------------------------------------------------------

def test_budget_is_never_exceeded(mixtral):
    ckpt, resident = mixtral
    cfg = resident.config
    for slots in (2, 3, 5, 8):
        budget = budget_for(cfg, slots) + 7  # a few spare bytes never make a slot
        model = load_offloaded(ckpt.path, offload=OffloadConfig(device_memory=budget, context_tokens=CONTEXT))
        runtime = model.offload
        slab = sum(t.numel() * t.element_size() for t in runtime.cache.slab.values())
        params = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
        assert runtime.cache.num_slots == slots
        assert slab == runtime.plan.cache_bytes
        assert params == runtime.plan.resident_bytes  # the planner counts exactly what was loaded
        assert runtime.plan.planned_bytes <= budget
        greedy(model, token_ids(1, 8), n=CONTEXT - 8)
        assert runtime.report()["peak_device_bytes"] <= budget


def test_too_small_budget_is_refused_with_the_size_needed(mixtral):
    """Below what a token's experts need even with the shortest prefill chunk (a tight budget
    halves the chunk before refusing), the load is refused naming the size needed."""
    from moekit.offload.planner import MIN_PREFILL_CHUNK

    ckpt, resident = mixtral
    cfg = resident.config
    chunk = CONTEXT
    while chunk > MIN_PREFILL_CHUNK:
        chunk //= 2
    need = (budget_for(cfg, 2) - activation_bytes(cfg, torch.float32, CONTEXT, 1)
            + activation_bytes(cfg, torch.float32, chunk, 1, CONTEXT))
    with pytest.raises(moekit.MoekitError) as err:
        load_offloaded(ckpt.path, offload=OffloadConfig(device_memory=need - 1, context_tokens=CONTEXT))
    message = str(err.value)
    assert "\n" not in message and "too small" in message and "needs at least" in message
    assert f"{need / 1e6:.2f}MB" in message or f"{need / 1e3:.2f}KB" in message


def test_generation_longer_than_planned_is_refused(mixtral):
    """A generation needing more KV cache than planned takes it from the expert cache; where a
    token's experts would no longer fit, it is refused in one line with the budget it needs."""
    ckpt, _ = mixtral
    model = offloaded(ckpt.path)  # 2 slots: the top-k, none to give
    with pytest.raises(moekit.MoekitError, match="needs .* of KV cache.*give --device-memory") as err:
        greedy(model, token_ids(1, 30), n=CONTEXT)
    assert "\n" not in str(err.value)


def test_generation_reserves_its_kv_cache_from_the_expert_cache(mixtral):
    """Loaded with only a budget, the plan holds no KV cache; each generation reserves its own
    (growing it when a later one is longer) from the expert cache, tokens unchanged."""
    ckpt, resident = mixtral
    cfg = moekit.read_config(ckpt.path)[2]
    budget = budget_for(cfg, 6)  # 6 experts + a KV cache of CONTEXT positions, planned as cache now
    model = load_offloaded(ckpt.path, offload=OffloadConfig(device_memory=budget, prefill_chunk=CONTEXT))
    plan = model.offload.plan
    assert plan.kv_cache_bytes == 0 and plan.kv_positions == 0 and plan.planned_bytes <= budget
    slots = model.offload.cache.num_slots
    ids = token_ids(1, 10)
    assert torch.equal(greedy(model, ids, n=6), greedy(resident, ids, n=6))
    first = model.offload.plan
    assert first.kv_cache_bytes == kv_cache_bytes(cfg, torch.float32, 1, 16) and first.planned_bytes <= budget
    assert model.offload.cache.num_slots <= slots
    ids = token_ids(1, 30, seed=3)
    assert torch.equal(greedy(model, ids, n=12), greedy(resident, ids, n=12))
    assert model.offload.plan.kv_cache_bytes == kv_cache_bytes(cfg, torch.float32, 1, 42)
    assert model.offload.plan.planned_bytes <= budget


def test_generation_takes_its_kv_cache_from_the_unspent_budget_first(mixtral):
    """A plan leaves less than one expert of its budget unspent; a generation whose KV cache fits
    there keeps every cache slot (at 8% of Mixtral's bytes the cache holds just the top-k, and
    giving one up refused a generation the budget could hold)."""
    ckpt, resident = mixtral
    cfg = moekit.read_config(ckpt.path)[2]
    config = OffloadConfig(device_memory=budget_for(cfg, 3), prefill_chunk=CONTEXT)
    probe = load_offloaded(ckpt.path, offload=config).offload.plan
    ids, n = token_ids(1, 10), 6
    kv = kv_cache_bytes(cfg, torch.float32, 1, 10 + n)
    act = prefill_activation_bytes(cfg, torch.float32, 1, 10, 10 + n, torch.device("cpu"))
    budget = probe.planned_bytes + kv + max(0, act - probe.activation_bytes)
    model = load_offloaded(ckpt.path, offload=dataclasses.replace(config, device_memory=budget))
    slots = model.offload.cache.num_slots
    assert slots == probe.cache_slots and budget - model.offload.plan.planned_bytes < model.offload.plan.expert_bytes
    assert torch.equal(greedy(model, ids, n=n), greedy(resident, ids, n=n))
    plan = model.offload.plan
    assert model.offload.cache.num_slots == slots and plan.kv_cache_bytes == kv and plan.planned_bytes <= budget


def test_prefill_runs_in_chunks_with_equal_tokens(mixtral):
    """Prefill in chunks of a few tokens (activations bounded by a chunk) gives the tokens of a
    whole-prompt prefill."""
    ckpt, resident = mixtral
    cfg = moekit.read_config(ckpt.path)[2]
    model = load_offloaded(ckpt.path, offload=OffloadConfig(device_memory=budget_for(cfg, 8), prefill_chunk=4,
                                                            context_tokens=CONTEXT))
    assert model.offload.prefill_chunk == 4
    ids = token_ids(1, 19, seed=4)
    assert torch.equal(greedy(model, ids, n=6), greedy(resident, ids, n=6))


def test_parse_size():
    assert parse_size("10MB") == 10**7 and parse_size("1.5GiB") == 1.5 * 2**30 and parse_size("512") == 512
    assert parse_size("2g") == 2 * 10**9
    with pytest.raises(moekit.MoekitError, match="--device-memory"):
        parse_size("ten megs")


# ---- predictor accuracy against the true routing -------------------------------------------

def test_prediction_accuracy_is_measured_against_true_routing(mixtral):
    ckpt, resident = mixtral
    ids = token_ids(1, 4, seed=6)
    recorder = offloaded(ckpt.path, record_routing=True, predictor="speculative", slots=8)
    greedy(recorder, ids)
    runtime = recorder.offload
    # recompute the speculative prediction and true routing from the trace, by hand
    from moekit.offload.predictors import speculative_weights

    w = speculative_weights(resident, runtime.next_of)
    xs = {}
    hooks = [resident.layers[i].mlp.register_forward_pre_hook(
        lambda _m, a, i=i: xs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for i in runtime.moe_layers]
    try:
        greedy(resident, ids)
    finally:
        for h in hooks:
            h.remove()
    correct = predicted = routed = 0
    for i, j in runtime.next_of.items():
        for call, x in enumerate(xs[i]):
            pred = set(torch.topk(x @ w[i].T, resident.config.top_k, dim=-1).indices.reshape(-1).tolist())
            true = set(runtime.trace[j][call].reshape(-1).tolist())
            correct, predicted, routed = correct + len(pred & true), predicted + len(pred), routed + len(true)
    report = runtime.report()
    assert report["predicted"] == predicted and report["routed"] == routed
    assert report["predicted_correct"] == correct
    assert 0 < report["prefetch_recall"] < 1


def test_no_predictor_prefetches_nothing(mixtral):
    ckpt, _ = mixtral
    model = offloaded(ckpt.path, predictor="none")
    greedy(model, token_ids(1, 5))
    report = model.offload.report()
    assert report["prefetches"] == 0 and report["predicted"] == 0 and report["prefetch_recall"] == 0.0


def test_strict_mode_warns(mixtral):
    ckpt, _ = mixtral
    with pytest.warns(UserWarning, match="strict"):
        model = offloaded(ckpt.path, predictor="speculative", strict=True, slots=4)
    out = greedy(model, token_ids(1, 5))
    assert out.shape == (1, 12)
    # strict mode fetches the predicted experts (misses auto by default), on any device
    assert model.offload.misses == "fetch" and "strict" in model.offload.misses_note


# ---- GPU -----------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_budget_and_outputs(tiny):
    ckpt = tiny("mixtral")
    resident = moekit.load_model(ckpt.path, device="cuda", dtype="float32")
    ids = token_ids(1, 8)
    expected = greedy(resident, ids)
    del resident
    torch.cuda.empty_cache()
    # cuBLAS/cuBLASLt keep 32 MiB workspaces per stream in the allocator; the budget covers
    # everything live on the device, so give room for a few of them
    budget = 192 * 2**20
    for predictor in ("none", "speculative"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # other tests' tensors still alive are not this model's
        model = load_offloaded(ckpt.path, device="cuda", dtype="float32", offload=OffloadConfig(
            device_memory=budget, context_tokens=CONTEXT, predictor=predictor))
        got = greedy(model, ids)
        report = model.offload.report()
        assert torch.equal(got, expected)
        assert report["peak_device_bytes"] <= budget
        assert torch.cuda.max_memory_allocated() - base <= budget
        del model
        torch.cuda.empty_cache()
    # Budgets around the smallest that works, each loaded in a fresh process (here earlier loads
    # already made the library workspaces, so they would not count as this load's bytes): each is
    # refused with the size needed (by the plan or by the measured warm-up), or it generates with
    # the allocator's peak under the budget; never silently exceeded.
    code = ("import json, moekit, torch\n"
            "from moekit.offload import OffloadConfig, load_offloaded\n"
            "out = []\n"
            "for mib in range(40, 100, 6):\n"
            "    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()\n"
            "    try:\n"
            f"        m = load_offloaded({str(ckpt.path)!r}, device='cuda', dtype='float32', offload=OffloadConfig(\n"
            f"            device_memory=mib * 2**20, context_tokens={CONTEXT}))\n"
            "    except moekit.MoekitError as e:\n"
            "        out.append([mib, 'refused', str(e)]); continue\n"
            f"    m.generate(torch.arange(8)[None] % {VOCAB}, max_new_tokens=8, temperature=0, eos_token_ids=())\n"
            "    out.append([mib, 'ran', m.offload.report()['peak_device_bytes'], torch.cuda.max_memory_allocated() - base])\n"
            "    del m\n"
            "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    for row in rows:
        if row[1] == "refused":
            assert "at least" in row[2], row
        else:
            assert row[2] <= row[0] * 2**20 and row[3] <= row[0] * 2**20, row
    assert {row[1] for row in rows} == {"refused", "ran"}, rows
