"""The host KV pool's row store (native/kv_store.cpp through native.attention.store_rows and the
pipeline's NativeAttention.store): the same pool as torch's index_copy_, bad slots refused."""

from __future__ import annotations

import pytest
import torch

from moekit import native
from moekit.config import ModelConfig
from moekit.kv_cache import PagedKVCache
from moekit.native.attention import store_rows
from moekit.pipeline.host_attention import NativeAttention

pytestmark = pytest.mark.skipif(native.library() is None, reason="no native library")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_rows_equals_index_copy(dtype):
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(12, 16, 4, 8, generator=g).to(dtype)
    rows = torch.randn(5, 4, 8, generator=g).to(dtype)
    slots = torch.tensor([3, 190, 17, 0, 64])
    want = pool.clone()
    want.view(-1, 4, 8).index_copy_(0, slots, rows)
    store_rows(pool, rows, slots)
    assert torch.equal(pool, want)


def test_store_rows_refuses_what_does_not_fit():
    pool = torch.zeros(2, 16, 4, 8)
    with pytest.raises(ValueError, match="outside the pool's 32 rows"):
        store_rows(pool, torch.ones(1, 4, 8), torch.tensor([32]))
    with pytest.raises(ValueError, match="outside"):
        store_rows(pool, torch.ones(1, 4, 8), torch.tensor([-1]))
    with pytest.raises(ValueError, match="rows of its dtype"):
        store_rows(pool, torch.ones(1, 4, 8, dtype=torch.bfloat16), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"slots must be \[N\]"):
        store_rows(pool, torch.ones(2, 4, 8), torch.tensor([0]))
    assert not pool.any()  # nothing written by a refused call


CFG = ModelConfig(family="mixtral", vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, num_experts=4, top_k=2, expert_ffn=32, moe_layers=(True, True), dtype="float32")


def test_native_attention_store_writes_what_cache_write_does():
    cfg = CFG
    a = PagedKVCache.for_tokens(cfg, 64, 16, "cpu", torch.float32)
    b = PagedKVCache.for_tokens(cfg, 64, 16, "cpu", torch.float32)
    a.prepare([("x", 0, 20), ("y", 0, 3)])  # blocks taken, so the step's slots are not the first ones
    batch = a.prepare([("x", 20, 1), ("y", 3, 1)])
    call = NativeAttention.of(a, batch, cfg.num_heads, torch.float32)
    k = torch.randn(2, cfg.num_kv_heads, cfg.head_dim)
    v = torch.randn_like(k)
    assert call.store(a.keys[1], a.values[1], k, v)
    b.write(1, k, v, batch.slots)
    assert torch.equal(a.keys[1], b.keys[1]) and torch.equal(a.values[1], b.values[1])
    assert a.keys[1].any()
    assert not call.store(a.keys[1], a.values[1], k.to(torch.bfloat16), v.to(torch.bfloat16))  # not the pool's dtype


def test_store_and_attend_is_store_then_the_kernel():
    """The pipeline worker's one call: the same pools and the same output bits as store() followed
    by the kernel's call, and a positive time spent inside."""
    cfg = CFG
    a = PagedKVCache.for_tokens(cfg, 64, 16, "cpu", torch.float32)
    b = PagedKVCache.for_tokens(cfg, 64, 16, "cpu", torch.float32)
    g = torch.Generator().manual_seed(1)
    for cache in (a, b):
        cache.prepare([("x", 0, 20), ("y", 0, 3)])
        for layer in range(cfg.num_layers):  # the same earlier positions in both
            cache.keys[layer].copy_(torch.randn(cache.keys[layer].shape, generator=torch.Generator().manual_seed(layer)))
            cache.values[layer].copy_(cache.keys[layer].flip(0))
    batch = a.prepare([("x", 20, 1), ("y", 3, 1)])
    b.prepare([("x", 20, 1), ("y", 3, 1)])
    call = NativeAttention.of(a, batch, cfg.num_heads, torch.float32)
    q = torch.randn(2, cfg.num_heads, cfg.head_dim, generator=g)
    k = torch.randn(2, cfg.num_kv_heads, cfg.head_dim, generator=g)
    v = torch.randn(k.shape, generator=g)
    assert call.can_store(a.keys[1], k, v)
    out_a, seconds = call.store_and_attend(a.keys[1], a.values[1], q, k, v, torch.empty_like(q), None, 2)
    assert call.store(b.keys[1], b.values[1], k, v)
    out_b = call(b.keys[1], b.values[1], q, torch.empty_like(q), None, 2)
    assert torch.equal(a.keys[1], b.keys[1]) and torch.equal(a.values[1], b.values[1])
    assert torch.equal(out_a, out_b) and seconds > 0
    # the new rows took part: the output differs from attention over the pools without them
    stale = call(a.keys[0], a.values[0], q, torch.empty_like(q), None, 2)
    assert not torch.equal(out_a, stale)
    assert not call.can_store(a.keys[1], k.to(torch.bfloat16), v.to(torch.bfloat16))


def test_read_bytes_counts_each_sequence_within_its_window():
    cfg = CFG
    a = PagedKVCache.for_tokens(cfg, 64, 16, "cpu", torch.float32)
    a.prepare([("x", 0, 20), ("y", 0, 3)])
    batch = a.prepare([("x", 20, 1), ("y", 3, 1)])  # 21 and 4 positions
    call = NativeAttention.of(a, batch, cfg.num_heads, torch.float32)
    row = cfg.num_kv_heads * cfg.head_dim * 4
    assert call.read_bytes(None, 4) == (21 + 4) * row * 2
    assert call.read_bytes(8, 4) == (8 + 4) * row * 2
    assert call.read_bytes(8, 4, joint=True) == (8 + 4) * row
