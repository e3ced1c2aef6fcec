"""The fused latent-attention decode kernels (moekit.fused.mla_project, mla_attention) against
LatentAttention's PyTorch reference, and whole DeepSeek models decoding with them on and off.

On CPU machines the kernels run under TRITON_INTERPRET=1 (set in conftest.py); on a GPU, for real.
"""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_device, rel_error, token_ids
from test_fused import _close, _decode_logits

import moekit
from moekit import fused
from moekit.config import MLAConfig, ModelConfig
from moekit.generate import forward_step
from moekit.kv_cache import KVCache, PagedKVCache
from moekit.mla import LatentAttention
from moekit.rope import cos_sin

pytestmark = pytest.mark.skipif(not fused.HAVE_TRITON, reason="triton not installed")

DTYPES = [torch.float32, torch.bfloat16]

# (batch, new tokens, heads, r, dn, dr, dv, interleaved rope, q_lora_rank): V2-Lite's proportions
# shrunk, odd widths (padding), rotate-half rope, V3's q bottleneck
MLA_CASES = [
    (1, 1, 4, 32, 16, 8, 16, True, None),
    (2, 1, 3, 24, 12, 6, 10, True, None),
    (1, 3, 4, 32, 16, 8, 16, False, None),
    (2, 2, 2, 16, 8, 4, 8, True, 24),
]


def _layer(case, dtype, device):
    """Returns (a LatentAttention of `case` with random weights, its cos and sin at positions 5..)."""
    _, t, heads, r, dn, dr, dv, interleave, q_rank = case
    mla = MLAConfig(kv_lora_rank=r, q_lora_rank=q_rank, qk_nope_head_dim=dn, qk_rope_head_dim=dr,
                    v_head_dim=dv, rope_interleave=interleave)
    cfg = ModelConfig(family="deepseek_v2", vocab_size=64, hidden_size=48, num_layers=1, num_heads=heads,
                      num_kv_heads=heads, head_dim=dn + dr, num_experts=2, top_k=1, expert_ffn=8,
                      moe_layers=(True,), mla=mla)
    g = torch.Generator().manual_seed(heads * r + t)
    attn = LatentAttention(cfg, 0)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name
                    else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    attn = attn.to(device, dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dr, 2, dtype=torch.float32) / dr))
    cos, sin = cos_sin(inv_freq.to(device), 1.0, torch.arange(5, 5 + t, device=device), dtype)
    return attn, cos, sin


def _run(attn, x, cos, sin, cache, start, fused_on: bool, monkeypatch):
    monkeypatch.setenv("MOEKIT_FUSED", "1" if fused_on else "0")
    with torch.inference_mode():
        q, latent, k_rope = attn.project(x, cos, sin)
        # absorbed for T > 1 too: the expanded form rounds bf16 elsewhere (the model test covers it)
        return (q, latent, k_rope), attn.attend(q, latent, k_rope, cache, start, absorbed=True)


@pytest.mark.parametrize("weights_in_kernel", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MLA_CASES)
def test_mla_decode_matches_reference(case, dtype, weights_in_kernel, monkeypatch):
    """project (norm + ropes) and attend (cache write + absorbed attention over 5 cached positions
    and the new ones; kv_b applied in the kernel, or by batched GEMMs around it) give the
    reference's tensors, and leave the same cache behind."""
    device = kernel_device()
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    monkeypatch.setattr(fused, "MLA_WEIGHTS_IN_KERNEL_MAX_ROWS", 1000 if weights_in_kernel else 0)
    b, t = case[0], case[1]
    attn, cos, sin = _layer(case, dtype, device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, t, attn.cfg.hidden_size, generator=g).to(device, dtype)
    caches = []
    for _ in range(2):
        cache = KVCache(attn.cfg, b, 12, device, dtype)
        history = torch.Generator().manual_seed(4)  # the same 5 cached positions in both caches
        cache.keys[0][:, :, :5] = torch.randn(b, 1, 5, attn.mla.kv_lora_rank, generator=history).to(device, dtype)
        cache.values[0][:, :, :5] = torch.randn(b, 1, 5, attn.mla.qk_rope_head_dim, generator=history).to(device, dtype)
        caches.append(cache)
    start = torch.tensor(5, device=device)
    (q_ref, lat_ref, rope_ref), out_ref = _run(attn, x, cos, sin, caches[0], start, False, monkeypatch)
    calls = []
    for name in ("mla_project", "mla_attention"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    (q, lat, rope), out = _run(attn, x, cos, sin, caches[1], start, True, monkeypatch)
    assert calls == ["mla_project", "mla_attention"]
    for got, want in ((q, q_ref), (lat, lat_ref), (rope, rope_ref), (out, out_ref)):
        _close(got, want, dtype)
    _close(caches[1].keys[0], caches[0].keys[0], dtype)
    _close(caches[1].values[0], caches[0].values[0], dtype)


def test_mla_attention_drops_positions_past_the_cache(monkeypatch):
    """A step whose positions run past the capacity S writes none of them there (KVCache.write
    raises on the host path; the device path cannot) and still attends to what is cached."""
    device = kernel_device()
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    attn, cos, sin = _layer((1, 1, 4, 32, 16, 8, 16, True, None), torch.float32, device)
    cache = KVCache(attn.cfg, 1, 4, device, torch.float32)
    cache.keys[0].normal_()
    before = cache.keys[0].clone()
    x = torch.randn(1, 1, attn.cfg.hidden_size, device=device)
    _, out = _run(attn, x, cos, sin, cache, torch.tensor(4, device=device), True, monkeypatch)
    assert torch.equal(cache.keys[0], before) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek_v2_group", "deepseek_v3"])
def test_deepseek_decode_fused_equals_reference(tiny, variant, dtype, monkeypatch):
    """On the CPU through the interpreter: DeepSeek decode steps with the fused MLA kernels give the
    reference's logits (V3: q's bottleneck norm fused too; V3's sigmoid and V2's group-limited
    routing through grouped_topk)."""
    kernel_device()
    if torch.cuda.is_available():
        pytest.skip("CPU-only: the interpreter path")
    model = moekit.load_model(tiny(variant).path).to(dtype)
    prompt = token_ids(1, 6)
    monkeypatch.setenv("MOEKIT_FUSED", "0")
    expected = _decode_logits(model, prompt, 3)
    monkeypatch.setenv("MOEKIT_FUSED", "1")
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    calls = set()
    for name in ("mla_project", "mla_attention", "rms_norm", "grouped_topk", "softmax_topk", "swiglu"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _real=real, _name=name, **k: calls.add(_name) or _real(*a, **k))
    got = _decode_logits(model, prompt, 3)
    rule = model.config.router
    router = "grouped_topk" if rule.scoring == "sigmoid" or rule.group_limited else "softmax_topk"
    assert calls == {"mla_project", "mla_attention", "rms_norm", router, "swiglu"}  # swiglu: shared experts
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    else:
        assert rel_error(got, expected) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_decode_fused_equals_reference_cuda(tiny, variant, monkeypatch):
    """bf16 on CUDA, the decode step captured as generate captures it: MOEKIT_FUSED=1 vs 0 (the
    kernels compiled for real, which the interpreter does not do)."""
    from moekit.generate import _GraphedDecode

    model = moekit.load_model(tiny(variant).path).to("cuda", torch.bfloat16)
    prompt = token_ids(1, 6).cuda()
    results = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("MOEKIT_FUSED", flag)
        eager = _decode_logits(model, prompt, 4)
        cache = KVCache(model.config, 1, 16, "cuda", torch.bfloat16)
        with torch.inference_mode():
            logits = model(prompt, cache=cache, start=0, last_only=True)
            token = logits[:, -1].argmax(-1, keepdim=True)
            step = _GraphedDecode(model, cache, token, prompt.shape[1])
            graphed = step(token, prompt.shape[1])[0, -1].float().clone()
        results[flag] = eager, graphed
    (eager_ref, graphed_ref), (eager, graphed) = results["0"], results["1"]
    assert rel_error(eager, eager_ref) < 2e-2
    assert rel_error(graphed, graphed_ref) < 2e-2
    assert rel_error(graphed, eager[0]) < 2e-2


@pytest.mark.parametrize("weights_in_kernel", [True, False])
@pytest.mark.parametrize("variant", ["deepseek_v2", "deepseek_v3"])
def test_paged_decode_fused_equals_reference(tiny, variant, weights_in_kernel, monkeypatch):
    """Ragged steps over a paged cache (the serving path): a decode step of 3 sequences and a mixed
    step (a prompt chunk beside 2 single tokens) give the same logits with the paged MLA kernel
    (reading the pools through the block tables) as with the PyTorch gather."""
    device = kernel_device()
    model = moekit.load_model(tiny(variant).path).to(device)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (5, 11, 2)]
    results, calls = [], []
    real = fused.mla_paged_decode
    monkeypatch.setattr(fused, "mla_paged_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(fused, "MLA_WEIGHTS_IN_KERNEL_MAX_ROWS", 1000 if weights_in_kernel else 0)
    for flag in ("0", "1"):
        monkeypatch.setenv("MOEKIT_FUSED", flag)
        monkeypatch.setattr(fused, "ALLOW_INTERPRETER", flag == "1")
        calls.clear()
        cache = PagedKVCache(model.config, 24, 4, device, model.dtype)
        with torch.inference_mode():
            forward_step(model, cache, [(i, 0, p) for i, p in enumerate(prompts)])
            decode = forward_step(model, cache, [(i, len(p), [7 + i]) for i, p in enumerate(prompts)])
            mixed = forward_step(model, cache, [(0, 6, [9]), (1, 12, [3, 4, 5]), (2, 3, [8])])
        assert len(calls) == (2 * model.config.num_layers if flag == "1" else 0)  # both steps, every layer
        results.append(torch.cat([decode, mixed]).float())
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)
