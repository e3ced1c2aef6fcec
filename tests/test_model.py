"""The decoder against transformers, family by family: logits, greedy generation, KV cache."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.kv_cache import KVCache
from moekit.model import DenseMLP, MoEBlock, RMSNorm

from conftest import FAMILY_VARIANTS, MAX_POS, VOCAB, rel_error, token_ids

LOGITS_RTOL = 1e-4

# every family plus the tied-embedding, sliding-window and rope-scaling variants
ALL_VARIANTS = FAMILY_VARIANTS + ["mixtral_tied", "mixtral_sliding", "mixtral_yarn", "mixtral_linear"]


def _prompt_length(variant: str) -> int:
    # yarn: run past original_max_position_embeddings (32) so the scaled range is exercised
    return 40 if variant == "mixtral_yarn" else 12


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_logits_match_transformers(tiny, variant):
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path)
    ids = token_ids(2, _prompt_length(variant))
    with torch.no_grad():
        logits = model(ids)
    expected = ckpt.hf_logits(ids)
    assert logits.shape == (2, ids.shape[1], VOCAB)
    assert logits.dtype == torch.float32
    assert rel_error(logits, expected) <= LOGITS_RTOL


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generate_matches_transformers(tiny, variant, batch):
    ckpt = tiny(variant)
    model = moekit.load_model(ckpt.path)
    ids = token_ids(batch, _prompt_length(variant), seed=2 + batch)
    new = model.generate(ids, max_new_tokens=16, temperature=0, eos_token_ids=())
    expected = ckpt.hf_greedy(ids, 16)
    assert new.shape == (batch, 16)
    assert torch.equal(new, expected), f"moekit {new.tolist()} != transformers {expected.tolist()}"


def test_structure_of_qwen2_moe(tiny):
    """mlp_only_layers=[1] makes layer 1 dense; the MoE layers carry a gated shared expert."""
    model = moekit.load_model(tiny("qwen2_moe").path)
    kinds = [type(layer.mlp) for layer in model.layers]
    assert kinds == [MoEBlock, DenseMLP, MoEBlock]
    assert model.layers[0].mlp.shared is not None and model.layers[0].mlp.shared_gate is not None
    assert model.layers[0].attn.qkv.bias is not None
    step = moekit.load_model(tiny("qwen2_moe_step").path)
    assert [type(layer.mlp) for layer in step.layers] == [DenseMLP, MoEBlock, DenseMLP]


def test_tied_embeddings_share_storage(tiny):
    model = moekit.load_model(tiny("mixtral_tied").path)
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()


@pytest.mark.parametrize("variant", ["mixtral", "mixtral_sliding", "qwen2_moe", "qwen3_moe", "olmoe_clip"])
def test_kv_cache_equals_full_forward(tiny, variant):
    """Prefill in two chunks, then decode one token at a time: every step's logits equal the
    no-cache forward over the whole sequence at that position."""
    model = moekit.load_model(tiny(variant).path)
    ids = token_ids(2, 20, seed=5)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch=2, capacity=20, device="cpu", dtype=model.dtype)
        chunk1 = model(ids[:, :7], cache=cache, start=0)
        chunk2 = model(ids[:, 7:12], cache=cache, start=7)  # prefill continuing from a cache
        steps = [model(ids[:, p:p + 1], cache=cache, start=p) for p in range(12, 20)]
    torch.testing.assert_close(chunk1, full[:, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunk2, full[:, 7:12], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 12:], rtol=1e-5, atol=1e-5)


def test_kv_cache_with_device_position_equals_int_position(mixtral_model):
    """The graph-safe decode path (start as a 0-d tensor, attending to the whole buffer under a
    mask) gives the same logits as the plain path."""
    model = mixtral_model
    ids = token_ids(1, 10, seed=6)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch=1, capacity=16, device="cpu", dtype=model.dtype)
        model(ids[:, :6], cache=cache, start=0)
        steps = [model(ids[:, p:p + 1], cache=cache, start=torch.tensor(p)) for p in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], rtol=1e-5, atol=1e-5)


def test_kv_cache_overflow_is_an_error(mixtral_model):
    cache = KVCache(mixtral_model.config, batch=1, capacity=4, device="cpu", dtype=torch.float32)
    with pytest.raises(moekit.MoekitError, match="KV cache holds 4 positions"):
        with torch.no_grad():
            mixtral_model(token_ids(1, 5), cache=cache, start=0)
    assert cache.bytes == 2 * 2 * (1 * 2 * 4 * 8) * 4  # K and V, 2 layers, [1, 2, 4, 8] float32


def test_last_only_is_the_last_row(mixtral_model):
    ids = token_ids(2, 9)
    with torch.no_grad():
        full, last = mixtral_model(ids), mixtral_model(ids, last_only=True)
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)


def test_batch_rows_are_independent(mixtral_model):
    """A row's logits do not depend on what else is in the batch."""
    ids = token_ids(3, 8, seed=9)
    with torch.no_grad():
        batched = mixtral_model(ids)
        alone = torch.cat([mixtral_model(ids[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)


def test_moe_block_routing_renormalises_only_when_asked(tiny):
    qwen2 = moekit.load_model(tiny("qwen2_moe").path)  # norm_topk_prob False
    qwen3 = moekit.load_model(tiny("qwen3_moe").path)  # norm_topk_prob True
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, ids, w2 = qwen2.layers[0].mlp.route(x)
        _, _, w3 = qwen3.layers[0].mlp.route(x)
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(w2, probs.gather(1, ids))
    assert (w2.sum(-1) < 1).all()
    torch.testing.assert_close(w3.sum(-1), torch.ones(5))


def test_context_limit_is_the_config_max_position(mixtral_model):
    assert mixtral_model.config.max_position_embeddings == MAX_POS


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe_clip"])
def test_cuda_float32_logits_match_cpu(tiny, variant):
    ckpt = tiny(variant)
    cpu = moekit.load_model(ckpt.path)
    gpu = moekit.load_model(ckpt.path, device="cuda", dtype="float32")
    ids = token_ids(2, 12)
    with torch.no_grad():
        expected, actual = cpu(ids), gpu(ids.cuda()).cpu()
    # float32 on the GPU too: the Triton expert kernels use IEEE float32 dots for float32 inputs
    assert rel_error(actual, expected) <= 1e-4
