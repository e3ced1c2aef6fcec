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
