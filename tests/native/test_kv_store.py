"""The pipeline worker's store-and-attend call (native/kv_store.cpp and attention.cpp through
NativeAttention.store_and_attend): the pools PagedKVCache.write leaves, the kernel's output bits,
rows it cannot store refused, and the KV bytes a call reads."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit import native
from moekit.config import ModelConfig
from moekit.kv_cache import PagedKVCache
from moekit.pipeline.host_attention import NativeAttention

pytestmark = pytest.mark.skipif(native.library() is None, reason="no native library")

CFG = ModelConfig(family="mixtral", vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, num_experts=4, top_k=2, expert_ffn=32, moe_layers=(True, True), dtype="float32")


def two_caches():
    """Two caches with the same earlier positions and the same step prepared (its slots not the first ones)."""
    cfg = CFG
    caches = [PagedKVCache.for_tokens(cfg, 64, 16, "cpu", torch.float32) for _ in range(2)]
    for cache in caches:
        cache.prepare([("x", 0, 20), ("y", 0, 3)])
        for layer in range(cfg.num_layers):
            cache.keys[layer].copy_(torch.randn(cache.keys[layer].shape, generator=torch.Generator().manual_seed(layer)))
            cache.values[layer].copy_(cache.keys[layer].flip(0))
    batches = [cache.prepare([("x", 20, 1), ("y", 3, 1)]) for cache in caches]  # 21 and 4 positions
    return caches, batches[0]


def test_store_and_attend_is_cache_write_then_the_kernel():
    """The one call: the pools PagedKVCache.write leaves and the bits of the kernel's call after it,
    with a positive time spent inside; the new rows take part in the output."""
    cfg = CFG
    (a, b), batch = two_caches()
    call = NativeAttention.of(a, batch, cfg.num_heads, torch.float32)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, cfg.num_heads, cfg.head_dim, generator=g)
    k = torch.randn(2, cfg.num_kv_heads, cfg.head_dim, generator=g)
    v = torch.randn(k.shape, generator=g)
    assert call.can_store(a.keys[1], k, v)
    out_a, seconds = call.store_and_attend(a.keys[1], a.values[1], q, k, v, torch.empty_like(q), None, 2)
    b.write(1, k, v, batch.slots)
    out_b = call(b.keys[1], b.values[1], q, torch.empty_like(q), None, 2)
    assert torch.equal(a.keys[1], b.keys[1]) and torch.equal(a.values[1], b.values[1])
    assert torch.equal(a.keys[0], b.keys[0])  # the other layer untouched
    assert torch.equal(out_a, out_b) and seconds > 0
    stale = call(a.keys[0], a.values[0], q, torch.empty_like(q), None, 2)
    assert not torch.equal(out_a, stale)


def test_rows_it_cannot_store_are_refused():
    cfg = CFG
    (a, _), batch = two_caches()
    call = NativeAttention.of(a, batch, cfg.num_heads, torch.float32)
    k = torch.randn(2, cfg.num_kv_heads, cfg.head_dim)
    assert call.can_store(a.keys[1], k, k)
    assert not call.can_store(a.keys[1], k.to(torch.bfloat16), k.to(torch.bfloat16))  # not the pool's dtype
    assert not call.can_store(a.keys[1], k[:1], k[:1])  # not the micro-batch's rows
    assert not call.can_store(a.keys[1], k.transpose(1, 2).contiguous().transpose(1, 2), k)  # not contiguous
    pool_rows = a.keys[1].shape[0] * a.keys[1].shape[1]
    for bad in (pool_rows, -1):  # a slot outside the pool: no store (the worker writes through the cache)
        outside = NativeAttention.of(a, dataclasses.replace(batch, slots=torch.tensor([3, bad])), cfg.num_heads,
                                     torch.float32)
        assert outside is not None and not outside.can_store(a.keys[1], k, k)


def test_read_bytes_counts_each_sequence_within_its_window():
    cfg = CFG
    (a, _), batch = two_caches()
    call = NativeAttention.of(a, batch, cfg.num_heads, torch.float32)
    row = cfg.num_kv_heads * cfg.head_dim * 4
    assert call.read_bytes(None, 4) == (21 + 4) * row * 2
    assert call.read_bytes(8, 4) == (8 + 4) * row * 2
    assert call.read_bytes(8, 4, joint=True) == (8 + 4) * row
