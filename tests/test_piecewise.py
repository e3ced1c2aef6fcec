"""Piecewise decode: the step cut at the expert calls equals the whole step (CPU: the cut run
as plain calls; GPU: captured graphs with offloaded experts between them)."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.kv_cache import KVCache
from moekit.piecewise import PiecewiseDecode

from conftest import FAMILY_VARIANTS, token_ids


def prefill(model, ids, capacity):
    cache = KVCache(model.config, ids.shape[0], capacity, model.device, model.dtype)
    logits = model(ids, cache=cache, start=0, last_only=True)
    return cache, logits[:, -1].argmax(-1)[:, None]


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_cut_step_equals_whole_step(tiny, variant):
    model = moekit.load_model(tiny(variant).path)
    ids = token_ids(2, 7)
    whole_cache, token = prefill(model, ids, 16)
    cut_cache, _ = prefill(model, ids, 16)
    step = PiecewiseDecode(model, cut_cache, token, 7, graphs=False)
    for position in range(7, 11):  # several steps: the cut keeps no state between them but the cache
        expected = model(token, cache=whole_cache, start=torch.tensor(position))
        got = step(token, position)
        assert torch.equal(got, expected)
        token = expected[:, -1].argmax(-1)[:, None]
    for layer in range(model.config.num_layers):
        assert torch.equal(cut_cache.keys[layer], whole_cache.keys[layer])


def test_model_without_moe_layers_is_refused(tiny):
    model = moekit.load_model(tiny("mixtral").path)
    for layer in model.layers:
        layer.mlp = moekit.model.DenseMLP(model.config.hidden_size, 8)
    cache, token = prefill(model, token_ids(1, 3), 8)
    with pytest.raises(ValueError, match="MoE layer"):
        PiecewiseDecode(model, cache, token, 3, graphs=False)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe_step"])
def test_offloaded_generation_is_captured_in_pieces(tiny, variant):
    from moekit.offload import OffloadConfig, load_offloaded

    path = tiny(variant).path
    ids = token_ids(1, 8)
    resident = moekit.load_model(path, device="cuda", dtype="float32")
    expected = resident.generate(ids, max_new_tokens=12, temperature=0, eos_token_ids=(), cuda_graph=False)
    del resident
    model = load_offloaded(path, device="cuda", dtype="float32",
                           offload=OffloadConfig(predictor="speculative", context_tokens=32))
    stats = moekit.GenerationStats()
    got = model.generate(ids, max_new_tokens=12, temperature=0, eos_token_ids=(), stats=stats)
    assert stats.extra.get("graph") == "piecewise"
    assert torch.equal(got, expected)
    # every capture runs on the model's one side stream: a second generate leaves no workspace
    # behind (a fresh stream per capture left a 32 MiB cuBLAS workspace per call, over the
    # offload budget); a few KiB of small state may change (measured: 13-15 KiB on the H200)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    model.generate(ids, max_new_tokens=12, temperature=0, eos_token_ids=())
    torch.cuda.synchronize()
    assert abs(torch.cuda.memory_allocated() - held) < 2**20


def test_a_dropped_step_is_freed_without_a_garbage_collection(tiny):
    """A step holds CUDA graphs and their memory pool: it must go when its last reference does,
    not at the next gc run (the offload warm-up measures the device memory right after)."""
    import gc
    import weakref

    model = moekit.load_model(tiny("olmoe").path)
    cache = KVCache(model.config, 1, 16, "cpu", model.dtype)
    step = PiecewiseDecode(model, cache, token_ids(1, 1), 3, graphs=False)
    step(token_ids(1, 1), 3)
    alive = weakref.ref(step)
    gc.disable()
    try:
        del step
        assert alive() is None
    finally:
        gc.enable()
