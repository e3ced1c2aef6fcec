"""Issue 15's families against transformers, end to end: float32 logits and greedy tokens (batch
1 and 2, with and without the KV cache), offloaded (token-equal to resident), compressed (ternary
GPTQ beats RTN on held-out tokens), pruned (transformers loads the copy and agrees) and counted."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
from moekit.kv_cache import KVCache
from moekit.load import read_config
from moekit.offload import OffloadConfig, load_offloaded
from moekit.prune import count_usage, select_experts
from moekit.prune.rewrite import write_pruned
from moekit.quant.compress import compress
from moekit.quant.config import QuantConfig

from conftest import VOCAB, rel_error, token_ids, transformers

LOGITS_RTOL = 1e-4
VARIANTS = ["granitemoe", "granitemoe_tied", "phimoe", "phimoe_plain"]
FAMILY_OF = {v: v.split("_")[0] for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(tiny, variant):
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path)
    assert model.config.family == FAMILY_OF[variant]
    ids = token_ids(2, 12)
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 12, VOCAB)
    assert rel_error(logits, ckpt.hf_logits(ids)) <= LOGITS_RTOL


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_match_transformers(tiny, variant, batch):
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path)
    ids = token_ids(batch, 10, seed=2 + batch)
    new = model.generate(ids, max_new_tokens=12, temperature=0, eos_token_ids=())
    expected = ckpt.hf_greedy(ids, 12)
    assert torch.equal(new, expected), f"moekit {new.tolist()} != transformers {expected.tolist()}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_equals_full_forward(tiny, variant):
    model = moekit.load_model(tiny(variant).path)
    ids = token_ids(2, 16, seed=5)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch=2, capacity=16, device="cpu", dtype=model.dtype)
        prefill = model(ids[:, :9], cache=cache, start=0)
        steps = [model(ids[:, p:p + 1], cache=cache, start=p) for p in range(9, 16)]
    torch.testing.assert_close(prefill, full[:, :9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 9:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ragged_batch_equals_transformers_per_prompt(tiny, variant):
    """Prompts of different lengths in one ragged batch (paged KV cache) each get transformers' tokens."""
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path)
    prompts = [token_ids(1, n, seed=20 + n)[0] for n in (3, 11, 7)]
    new = model.generate(prompts, max_new_tokens=6, temperature=0, eos_token_ids=())
    for prompt, tokens in zip(prompts, new):
        assert torch.equal(tokens, ckpt.hf_greedy(prompt[None], 6)[0])


def _budget_for(path, config: OffloadConfig, slots: int) -> int:
    """Returns the device budget that leaves exactly `slots` experts of cache."""
    plan = load_offloaded(path, offload=dataclasses.replace(config, device_memory=None)).offload.plan
    return plan.planned_bytes - plan.cache_bytes + slots * plan.expert_bytes


@pytest.mark.parametrize("variant", ["granitemoe", "phimoe"])
def test_offloaded_equals_resident(tiny, variant):
    path = tiny(variant).path
    ids = token_ids(1, 10, seed=3)
    resident = moekit.load_model(path).generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    config = OffloadConfig(context_tokens=24, store="host", misses="fetch")
    model = load_offloaded(path, offload=dataclasses.replace(config, device_memory=_budget_for(path, config, 3)))
    tokens = model.generate(ids, max_new_tokens=8, temperature=0, eos_token_ids=())
    report = model.offload.report()
    assert report["cache_slots"] == 3 and report["demand_fetches"] > 0, report
    assert torch.equal(tokens, resident)


@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory):
    """Returns {(variant, method): path} of ternary copies, GPTQ and RTN, calibrated on random tokens."""
    root = tmp_path_factory.mktemp("family_compressed")
    calib = token_ids(16, 32, seed=7)
    out = {}
    for variant in ("granitemoe", "phimoe"):
        for method in ("gptq", "rtn"):
            path = root / f"{variant}-{method}"
            compress(tiny(variant).path, path, QuantConfig(bits="ternary", method=method), calib, progress=False)
            out[(variant, method)] = path
    return out


@pytest.mark.parametrize("variant", ["granitemoe", "phimoe"])
def test_compressed_ternary_gptq_beats_rtn(tiny, compressed, variant):
    held_out = token_ids(4, 24, seed=11)
    with torch.no_grad():
        dense = moekit.load_model(tiny(variant).path)(held_out)
        errors = {m: rel_error(moekit.load_model(compressed[(variant, m)])(held_out), dense) for m in ("gptq", "rtn")}
    assert errors["gptq"] < errors["rtn"], errors
    model = moekit.load_model(compressed[(variant, "gptq")])
    assert model.generate(held_out[:1, :8], max_new_tokens=4).shape == (1, 4)


@pytest.mark.parametrize("variant", ["granitemoe", "phimoe"])
def test_pruned_copy_loads_in_transformers_and_agrees(tiny, variant, tmp_path):
    src = tiny(variant).path
    model = moekit.load_model(src)
    usage = count_usage(model, token_ids(4, 16, seed=9), batch=2)
    assert usage.layers == [0, 1]
    kept = dict(zip(usage.layers, select_experts(usage, 0.75, "hard", "layer")))
    assert all(len(k) == 3 for k in kept.values())
    ckpt, family, cfg = read_config(src)
    out = write_pruned(ckpt, family, cfg, kept, tmp_path / "pruned", {"keep": 0.75})
    ours = moekit.load_model(out)
    assert ours.config.num_experts == 3
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = token_ids(2, 12)
    with torch.no_grad():
        assert rel_error(ours(ids), theirs(ids).logits) <= LOGITS_RTOL


@pytest.mark.parametrize("variant, expected", [
    ("granitemoe", {"scalars": "embedding x 3, residual x 0.6, logits / 2.5, attention scale 0.2",
                    "router": "softmax top-k, renormalised"}),
    ("phimoe", {"norm": "LayerNorm with bias", "router": "sparsemixer (gap 0.01)",
                "attention": "4 heads over 2 kv heads of 8, sliding window 6"}),
])
def test_inspect_shows_family_specifics(tiny, variant, expected, capsys):
    from conftest import run_cli

    code, out, _ = run_cli(capsys, "inspect", "--model", str(tiny(variant).path))
    assert code == 0
    for what, how in expected.items():
        assert any(line.split() == [*what.split(), *how.split()] for line in out.splitlines()), (what, how, out)
