"""The fused decode kernel of attention with sinks (moekit.sinks.fused_decode, paged_fused_decode;
moekit.kernels.sink_decode) against SinkAttention's PyTorch reference, and tiny gpt-oss models
decoding with it on and off, over a dense cache and over a paged one (the serving path). The same
kernel without sinks (moekit.model.Attention's one-token graph steps) against the mask and torch
SDPA it stands in for, and tiny OLMoE / Mixtral models decoding with it. Dense steps split into runs
of positions (the split kernel and the paged decode's combine), forced on at small sizes.

On CPU machines the kernel runs under TRITON_INTERPRET=1 (set in conftest.py); on a GPU, for real.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_without_interpreter, kernel_device, rel_error, token_ids
from test_fused import _close, _decode_logits

import moekit
from moekit import fused, sinks
from moekit.config import ModelConfig
from moekit.generate import forward_step
from moekit.kv_cache import KVCache, PagedKVCache
from moekit.model import Attention, SinkAttention
from moekit.sinks import sink_attention

pytestmark = pytest.mark.skipif(not fused.HAVE_TRITON, reason="triton not installed")

DTYPES = [torch.float32, torch.bfloat16]

# (batch, new tokens, heads, kv heads, head dim, window, cached positions): gpt-oss's GQA shrunk;
# no window; a window shorter than the context (whole tiles of positions skipped); one longer;
# several new tokens under a short window; odd group and head dim (padding to the dot's 16 rows and
# columns); one kv head; at gpt-oss's head widths (64 positions an iteration) a context of several
# iterations, full and under a window that starts mid-tile; gpt-oss-20b's 64 / 8 heads under its
# window of 128 (the step's own row inside the last tile)
SINK_CASES = [
    (1, 1, 8, 2, 16, None, 9),
    (2, 1, 4, 4, 8, 4, 21),
    (1, 3, 6, 2, 12, 32, 5),
    (2, 2, 4, 1, 8, 3, 7),
    (1, 1, 6, 2, 12, 6, 40),
    (1, 1, 8, 1, 64, None, 150),
    (1, 2, 16, 2, 64, 100, 150),
    (1, 1, 64, 8, 64, 128, 300),
]


def _layer(heads: int, kv_heads: int, head_dim: int, window: int | None, dtype, device) -> SinkAttention:
    """Returns a SinkAttention with random weights and sinks of either sign, some large enough to
    take most of a softmax."""
    cfg = ModelConfig(family="gpt_oss", vocab_size=64, hidden_size=32, num_layers=1, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, num_experts=2, top_k=1, expert_ffn=8,
                      moe_layers=(True,), qkv_bias=True, o_bias=True, sliding_window=window, attention_sinks=True)
    attn = SinkAttention(cfg, 0)
    g = torch.Generator().manual_seed(heads * head_dim + (window or 0))
    with torch.no_grad():
        attn.sinks.copy_(3 * torch.randn(heads, generator=g))
    return attn.to(device, dtype)


@pytest.fixture(autouse=True)
def _windowed_plain_decode(monkeypatch):
    """The kernel's windowed plain path stays tested here, though Attention keeps SDPA for it by default
    (sinks.PLAIN_DECODE_WINDOWED: test_windowed_plain_decode_keeps_sdpa_by_default)."""
    monkeypatch.setattr(sinks, "PLAIN_DECODE_WINDOWED", True)


def _cache(attn: SinkAttention, batch: int, cached: int, capacity: int, dtype, device) -> KVCache:
    cache = KVCache(attn.cfg, batch, capacity, device, dtype)
    g = torch.Generator().manual_seed(7)  # the same history in every cache
    shape = (batch, attn.cfg.num_kv_heads, cached, attn.cfg.head_dim)
    cache.keys[0][:, :, :cached] = torch.randn(shape, generator=g).to(device, dtype)
    cache.values[0][:, :, :cached] = torch.randn(shape, generator=g).to(device, dtype)
    return cache


def _qkv(attn: SinkAttention, batch: int, t: int, dtype, device):
    """Returns q [B, H, T, Dh], k, v [B, Hkv, T, Dh] as the fused projection leaves them (views of
    [B*T, heads, Dh] rows, transposed)."""
    cfg, g = attn.cfg, torch.Generator().manual_seed(11)
    q = torch.randn(batch, t, cfg.num_heads, cfg.head_dim, generator=g).to(device, dtype).transpose(1, 2)
    k, v = (torch.randn(batch, t, cfg.num_kv_heads, cfg.head_dim, generator=g).to(device, dtype).transpose(1, 2)
            for _ in range(2))
    return q, k, v


def _attend(attn, q, k, v, cache, start, fused_on: bool, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv("MOEKIT_FUSED", "1" if fused_on else "0")
    with torch.inference_mode():
        return attn.attend(q, k, v, cache, start)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SINK_CASES)
def test_sink_decode_matches_reference(case, dtype, monkeypatch):
    """One launch (cache write + attention with sinks over the window) gives the reference's output
    and leaves the same cache behind."""
    device = kernel_device()
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    b, t, heads, kv_heads, head_dim, window, cached = case
    attn = _layer(heads, kv_heads, head_dim, window, dtype, device)
    q, k, v = _qkv(attn, b, t, dtype, device)
    start = torch.tensor(cached, device=device)
    ref_cache, cache = (_cache(attn, b, cached, cached + t + 3, dtype, device) for _ in range(2))
    # float32 of the same (rounded) inputs: the reference rounds its probabilities in bf16, the kernel not
    wide = _cache(attn, b, cached, cached + t + 3, torch.float32, device)
    wide.keys[0].copy_(ref_cache.keys[0])
    wide.values[0].copy_(ref_cache.values[0])
    truth = _attend(copy.deepcopy(attn).float(), q.float(), k.float(), v.float(), wide, start, False, monkeypatch)
    expected = _attend(attn, q, k, v, ref_cache, start, False, monkeypatch)
    calls = []
    real = sinks.fused_decode
    monkeypatch.setattr(sinks, "fused_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = _attend(attn, q, k, v, cache, start, True, monkeypatch)
    assert calls == [1]
    if dtype == torch.float32:
        _close(got, expected, dtype)
    else:  # a rounding step from the reference, and about as far as it from float32 on the same inputs
        # (both round the probabilities to bf16 for the second product: the kernel unnormalized)
        torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=1e-2)
        assert rel_error(got, truth) <= 1.25 * rel_error(expected, truth) and rel_error(got, truth) < 5e-3
    assert torch.equal(cache.keys[0], ref_cache.keys[0]) and torch.equal(cache.values[0], ref_cache.values[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cached", [6, 7, 8, 9])
@pytest.mark.parametrize("head_dim", [8, 16])
def test_sink_decode_window_in_a_full_cache(cached, head_dim, dtype, monkeypatch):
    """The tiny gpt-oss model's windowed steps (4 heads over 2, window 5, the cache exactly as long as
    the context): on the H200 its fused decode logits moved ~12% from the reference at the steps whose
    window starts at an odd position (tests/test_fused.py::test_model_decode_fused_equals_reference_cuda)."""
    device = kernel_device()
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    attn = _layer(4, 2, head_dim, 5, dtype, device)
    q, k, v = _qkv(attn, 1, 1, dtype, device)
    start = torch.tensor(cached, device=device)
    ref_cache, cache = (_cache(attn, 1, cached, cached + 1, dtype, device) for _ in range(2))
    expected = _attend(attn, q, k, v, ref_cache, start, False, monkeypatch)
    got = _attend(attn, q, k, v, cache, start, True, monkeypatch)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=1e-2)
    assert torch.equal(cache.keys[0], ref_cache.keys[0]) and torch.equal(cache.values[0], ref_cache.values[0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 128, 37])
def test_paged_sink_decode_at_gpt_oss_heads_matches_reference(dtype, window):
    """paged_fused_decode at gpt-oss-20b's heads (G = 8, Dh = 64) over scattered 16-position blocks,
    contexts of one position to several iterations, the window starting mid-block and mid-tile:
    it stores each new k, v at its slot and gives the reference's attention over the pool."""
    from conftest import paged_case

    device = kernel_device()
    lens, heads, kv_heads, head_dim, bs = [300, 77, 1, 129], 64, 8, 64, 16
    q, keys, values, tables, ctx, logits = (z.to(device) for z in paged_case(lens, heads, kv_heads, head_dim, bs,
                                                                             dtype, seed=3, sinks=True))
    g = torch.Generator().manual_seed(4)
    ks, vs = (torch.randn(len(lens), kv_heads, head_dim, generator=g).to(device, dtype) for _ in range(2))
    last = ctx.long() - 1
    slots = tables.long().gather(1, (last // bs)[:, None])[:, 0] * bs + last % bs  # [B]
    pool_k, pool_v = keys.clone(), values.clone()
    got = sinks.paged_fused_decode(q, ks, vs, logits.to(dtype), pool_k, pool_v, tables, ctx, window, slots)
    flat_k, flat_v = keys.flatten(0, 1).clone(), values.flatten(0, 1).clone()  # [NB*BS, Hkv, Dh]
    flat_k[slots], flat_v[slots] = ks, vs
    assert torch.equal(pool_k.flatten(0, 1), flat_k) and torch.equal(pool_v.flatten(0, 1), flat_v)
    for b, n in enumerate(lens):
        rows = (tables[b].long()[:, None] * bs + torch.arange(bs, device=device)).flatten()[:n]
        kb, vb = (z[rows].transpose(0, 1)[None] for z in (flat_k, flat_v))  # [1, Hkv, S, Dh]
        mask = None if window is None else (torch.arange(n, device=device) > n - 1 - window)[None]  # [1, S]
        expected = sink_attention(q[b, None, :, None], kb, vb, logits.to(dtype), mask)[0, :, 0]  # [H, Dh]
        truth = sink_attention(q[b, None, :, None].float(), kb.float(), vb.float(), logits.to(dtype).float(),
                               mask)[0, :, 0]
        if dtype == torch.float32:
            _close(got[b], expected, dtype)
        else:  # as in test_sink_decode_matches_reference
            torch.testing.assert_close(got[b].float(), expected.float(), rtol=1.6e-2, atol=1e-2)
            assert rel_error(got[b], truth) <= 1.25 * rel_error(expected, truth) and rel_error(got[b], truth) < 5e-3


def test_sink_decode_window_and_sinks_matter(monkeypatch):
    """The kernel's output changes with the sinks and with the window (a test of the reference
    alone would pass a kernel that ignored both only if the reference ignored them too)."""
    device = kernel_device()
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    monkeypatch.setenv("MOEKIT_FUSED", "1")
    outs = {}
    for name, window, scale in (("base", 4, 1.0), ("no_window", None, 1.0), ("sinks", 4, 0.0)):
        attn = _layer(4, 2, 8, window, torch.float32, device)
        with torch.no_grad():
            attn.sinks.mul_(scale)
        q, k, v = _qkv(attn, 1, 1, torch.float32, device)
        cache = _cache(attn, 1, 12, 16, torch.float32, device)
        outs[name] = _attend(attn, q, k, v, cache, torch.tensor(12, device=device), True, monkeypatch)
    assert rel_error(outs["no_window"], outs["base"]) > 1e-2
    assert rel_error(outs["sinks"], outs["base"]) > 1e-2


def test_sink_decode_drops_positions_past_the_cache(monkeypatch):
    """A step at the capacity S writes nothing there (KVCache.write raises on the host path; the
    device path cannot) and still attends to what is cached and to its own token."""
    device = kernel_device()
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    attn = _layer(4, 2, 8, None, torch.float32, device)
    q, k, v = _qkv(attn, 1, 1, torch.float32, device)
    cache = _cache(attn, 1, 4, 4, torch.float32, device)
    before = cache.keys[0].clone()
    out = _attend(attn, q, k, v, cache, torch.tensor(4, device=device), True, monkeypatch)
    assert torch.equal(cache.keys[0], before) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["gpt_oss", "gpt_oss_full"])
def test_gpt_oss_decode_fused_equals_reference(tiny, variant, dtype, monkeypatch):
    """On the CPU through the interpreter: gpt-oss decode steps (sliding window 5 on alternate layers,
    past it by the last steps) with the fused sink kernel give the reference's logits and tokens."""
    kernel_device()
    if torch.cuda.is_available():
        pytest.skip("CPU-only: the interpreter path")
    model = moekit.load_model(tiny(variant).path).to(dtype)
    prompt = token_ids(1, 6)
    monkeypatch.setenv("MOEKIT_FUSED", "0")
    expected = _decode_logits(model, prompt, 4)
    truth = _decode_logits(copy.deepcopy(model).float(), prompt, 4)  # the same rounded weights, float32
    monkeypatch.setenv("MOEKIT_FUSED", "1")
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    calls = []
    real = sinks.fused_decode
    monkeypatch.setattr(sinks, "fused_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = _decode_logits(model, prompt, 4)
    assert len(calls) == 4 * model.config.num_layers
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
    else:  # the reference rounds its probabilities in bf16, the kernel not: compared with float32 too
        assert rel_error(got, expected) < 2e-2
        assert rel_error(got, truth) < 1.25 * rel_error(expected, truth)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])  # bf16: ~6 s
def test_gpt_oss_paged_decode_fused_equals_reference(tiny, dtype, monkeypatch):
    """Ragged steps over a paged cache (the serving path): a decode step of 3 sequences (the cache
    write in the kernel) and a mixed step (a prompt chunk beside 2 single tokens, written first)
    give the same logits with the paged kernel as with the PyTorch gather, window 5 passed."""
    device = kernel_device()
    model = moekit.load_model(tiny("gpt_oss").path).to(device, dtype)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (5, 11, 2)]
    results, calls = [], []
    real = sinks.paged_fused_decode

    def counted(*args, **kwargs):  # records whether the kernel stores k, v (slots given)
        calls.append(kwargs.get("slots", args[9] if len(args) > 9 else None) is not None)
        return real(*args, **kwargs)
    monkeypatch.setattr(sinks, "paged_fused_decode", counted)
    # the reference, the kernel, and (bf16) the reference on the same rounded weights in float32
    runs = [("0", model), ("1", model)] + ([("0", copy.deepcopy(model).float())] if dtype != torch.float32 else [])
    for flag, m in runs:
        monkeypatch.setenv("MOEKIT_FUSED", flag)
        monkeypatch.setattr(fused, "ALLOW_INTERPRETER", flag == "1")
        calls.clear()
        cache = PagedKVCache(m.config, 24, 4, device, m.dtype)
        with torch.inference_mode():
            forward_step(m, cache, [(i, 0, p) for i, p in enumerate(prompts)])
            decode = forward_step(m, cache, [(i, len(p), [7 + i]) for i, p in enumerate(prompts)])
            mixed = forward_step(m, cache, [(0, 6, [9]), (1, 12, [3, 4, 5]), (2, 3, [8])])
            again = forward_step(m, cache, [(0, 7, [4]), (1, 15, [6]), (2, 4, [2])])
        layers = m.config.num_layers
        # the decode steps store k, v in the kernel (slots given); the mixed step's rows were written first
        assert calls == ([True] * layers + [False] * layers + [True] * layers if flag == "1" else [])
        results.append(torch.cat([decode, mixed, again]).float())
    if dtype == torch.float32:
        torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)
    else:  # both round the probabilities to bf16 (the kernel unnormalized): each about as far from float32
        expected, got, truth = results
        assert rel_error(got, expected) < 2e-2
        assert rel_error(got, truth) < 1.25 * rel_error(expected, truth)


def test_gpt_oss_static_paged_step_fused_equals_plain(tiny, monkeypatch):
    """A serving decode step at static shapes (moekit.paged_decode: 3 sequences padded to 4, slots
    a strided column of the step's buffer, the padding row writing the scratch block) with the
    kernel equals the plain ragged step with the reference, fp32, and leaves the same blocks behind."""
    from test_paged_decode import _prefilled

    from moekit.paged_decode import PagedDecode

    device = kernel_device()
    model = moekit.load_model(tiny("gpt_oss").path).to(device)
    results, caches = [], []
    for flag in ("1", "0"):
        monkeypatch.setenv("MOEKIT_FUSED", flag)
        monkeypatch.setattr(fused, "ALLOW_INTERPRETER", flag == "1")
        cache, prompts = _prefilled(model, [5, 11, 2], device)
        work = [(i, len(p), 7 + i) for i, p in enumerate(prompts)]
        with torch.inference_mode():
            if flag == "1":
                results.append(PagedDecode(model, cache, graphs=False)(work).clone())
            else:
                results.append(forward_step(model, cache, [(i, pos, [tok]) for i, pos, tok in work]))
        caches.append(cache)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)
    held = sorted({b for table in caches[1].tables.values() for b in table})
    for got, want in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        # each new token's k, v at its slot (past layer 0 from inputs a float32 rounding apart)
        torch.testing.assert_close(got[held], want[held], rtol=1e-4, atol=1e-4)


# (batch, heads, kv heads, head dim, window, cached positions) of plain decode (no sinks): MHA;
# Qwen3's GQA shrunk (G = 8) over several 64-position tiles; a window shorter than the context
# starting mid-tile; batch 2 (at one position: a KVCache step has one start for all rows) with an
# odd group and head dim; OLMoE's head dim 128, MHA, batch 2 under a window, two tiles
PLAIN_CASES = [
    (1, 4, 4, 16, None, 9),
    (1, 16, 2, 64, None, 150),
    (1, 8, 2, 32, 37, 100),
    (2, 6, 2, 12, None, 21),
    (2, 4, 4, 128, 6, 70),
]


def _plain_layer(heads: int, kv_heads: int, head_dim: int, window: int | None, dtype, device) -> Attention:
    """Returns a grouped-query Attention without sinks (random weights; attend uses none of them)."""
    cfg = ModelConfig(family="qwen3_moe", vocab_size=64, hidden_size=32, num_layers=1, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=head_dim, num_experts=2, top_k=1, expert_ffn=8,
                      moe_layers=(True,), sliding_window=window)
    return Attention(cfg, 0).to(device, dtype)


def _plain_calls(monkeypatch) -> dict:
    """Returns {name: [...]} filled as the attention runs: fused_decode's sinks argument and store
    flag, write_kv's mask flag, one entry for each decode_mask."""
    calls = {"fused_decode": [], "write_kv": [], "decode_mask": []}
    for module, name, record in ((sinks, "fused_decode", lambda a, kw: (a[3], kw.get("store", True))),
                                 (fused, "write_kv", lambda a, kw: kw.get("mask", False)),
                                 (fused, "decode_mask", lambda a, kw: True)):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, _f=record, **kw:
                            calls[_n].append(_f(a, kw)) or _r(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PLAIN_CASES)
def test_plain_decode_matches_sdpa(case, dtype, monkeypatch):
    """A one-token graph step of Attention without sinks: write_kv without a mask, then the kernel
    with SINKS off gives the mask + SDPA path's output and the same cache; no mask is built."""
    device = kernel_device()
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    b, heads, kv_heads, head_dim, window, cached = case
    attn = _plain_layer(heads, kv_heads, head_dim, window, dtype, device)
    q, k, v = _qkv(attn, b, 1, dtype, device)
    start = torch.tensor(cached, device=device)
    ref_cache, cache = (_cache(attn, b, cached, cached + 4, dtype, device) for _ in range(2))
    wide = _cache(attn, b, cached, cached + 4, torch.float32, device)  # float32 of the same rounded inputs
    wide.keys[0].copy_(ref_cache.keys[0])
    wide.values[0].copy_(ref_cache.values[0])
    truth = _attend(copy.deepcopy(attn).float(), q.float(), k.float(), v.float(), wide, start, False, monkeypatch)
    expected = _attend(attn, q, k, v, ref_cache, start, False, monkeypatch)
    calls = _plain_calls(monkeypatch)
    got = _attend(attn, q, k, v, cache, start, True, monkeypatch)
    assert calls == {"fused_decode": [(None, False)], "write_kv": [False], "decode_mask": []}
    if dtype == torch.float32:
        _close(got, expected, dtype)
    else:  # a rounding step from SDPA (the kernel rounds p to bf16 for p . V) and as close to float32
        torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=1e-2)
        assert rel_error(got, truth) <= 1.25 * rel_error(expected, truth) and rel_error(got, truth) < 5e-3
    assert torch.equal(cache.keys[0], ref_cache.keys[0]) and torch.equal(cache.values[0], ref_cache.values[0])


@pytest.mark.parametrize("t, head_dim", [(2, 16), (1, 2 * sinks.PLAIN_DECODE_MAX_HEAD_DIM)])
def test_plain_decode_keeps_sdpa_where_the_kernel_does_not_apply(t, head_dim, monkeypatch):
    """Two new tokens a step (a graph step of several), or a head dim past the kernel's: write_kv
    builds the mask and SDPA attends, as before; the output equals the reference's."""
    device = kernel_device()
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    attn = _plain_layer(4, 2, head_dim, None, torch.float32, device)
    q, k, v = _qkv(attn, 1, t, torch.float32, device)
    start = torch.tensor(5, device=device)
    ref_cache, cache = (_cache(attn, 1, 5, 8, torch.float32, device) for _ in range(2))
    expected = _attend(attn, q, k, v, ref_cache, start, False, monkeypatch)
    calls = _plain_calls(monkeypatch)
    got = _attend(attn, q, k, v, cache, start, True, monkeypatch)
    assert calls == {"fused_decode": [], "write_kv": [True], "decode_mask": []}
    _close(got, expected, torch.float32)


def test_windowed_plain_decode_keeps_sdpa_by_default(monkeypatch):
    """A window shorter than the cache takes SDPA unless PLAIN_DECODE_WINDOWED (off by default)."""
    device = kernel_device()
    monkeypatch.undo()
    assert sinks.PLAIN_DECODE_WINDOWED is False
    attn = _plain_layer(4, 2, 16, 16, torch.float32, device)
    q, k, v = _qkv(attn, 1, 1, torch.float32, device)
    cache = _cache(attn, 1, 5, 64, torch.float32, device)
    assert not sinks.plain_decode_supported(q, k, v, cache.keys[0], cache.values[0], 16)
    assert sinks.plain_decode_supported(q, k, v, cache.keys[0], cache.values[0], 64)  # the window covers it


@pytest.mark.parametrize("window", [None, 16])
def test_plain_decode_takes_the_kernel_only_up_to_its_positions(window):
    """A cache longer than PLAIN_DECODE_MAX_POSITIONS keeps SDPA (the kernel walks a context alone),
    unless a sliding window keeps the attended positions within it."""
    device = kernel_device()
    attn = _plain_layer(4, 2, 16, window, torch.float32, device)
    q, k, v = _qkv(attn, 1, 1, torch.float32, device)
    for length, fits in ((sinks.PLAIN_DECODE_MAX_POSITIONS, True), (sinks.PLAIN_DECODE_MAX_POSITIONS + 1, False)):
        cache = _cache(attn, 1, 5, length, torch.float32, device)
        keys, values = cache.keys[0], cache.values[0]
        assert sinks.plain_decode_supported(q, k, v, keys, values, window) == (fits or window is not None)


@pytest.mark.parametrize("variant", ["olmoe", "mixtral_sliding"])
def test_model_decode_runs_plain_kernel(tiny, variant, monkeypatch):
    """On the CPU through the interpreter, float32: OLMoE's and Mixtral's decode steps (Mixtral's
    window passed by the last ones) attend through the kernel in every layer and give the
    reference's logits and tokens (tests/test_fused.py holds the whole fused step in bf16 too)."""
    kernel_device()
    if torch.cuda.is_available():
        pytest.skip("CPU-only: the interpreter path")
    model = moekit.load_model(tiny(variant).path)
    prompt = token_ids(1, 6)
    monkeypatch.setenv("MOEKIT_FUSED", "0")
    expected = _decode_logits(model, prompt, 4)
    monkeypatch.setenv("MOEKIT_FUSED", "1")
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    calls = _plain_calls(monkeypatch)
    got = _decode_logits(model, prompt, 4)
    assert calls["fused_decode"] == [(None, False)] * (4 * model.config.num_layers) and not calls["decode_mask"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


# ---- dense steps split into runs of positions (sink_attention_split_kernel + the paged combine) ----

# (batch, new tokens, heads, kv heads, head dim, window, cached positions, room past them, splits), 64
# positions a tile: three runs of 64 and an empty fourth; a window starting inside run 0 (at 51);
# two rows of two tokens under a window starting mid-tile past the first tiles (runs from 128: one
# of 64, one of 10, one empty); a 6-position context cut 16 ways (15 runs empty); the tiny gpt-oss
# layer's full cache (window 5, head dim 8, no room: the step's own row is the last cached one)
SPLIT_CASES = [
    (1, 1, 8, 2, 16, None, 150, 3, 4),
    (1, 1, 8, 2, 16, 100, 150, 3, 4),
    (2, 2, 4, 1, 8, 70, 200, 2, 3),
    (1, 1, 6, 2, 12, None, 5, 12, 16),
    (1, 1, 4, 2, 8, 5, 70, 1, 2),
]


class _Grids:
    """Stands in for a Triton kernel and records each launch's grid."""

    def __init__(self, kernel, grids: list):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, with_sinks", [(c, True) for c in SPLIT_CASES]
                         + [(c, False) for c in SPLIT_CASES if c[1] == 1])  # Attention's kernel: one token a step
def test_split_decode_matches_reference(case, with_sinks, dtype, monkeypatch):
    """A dense step cut into runs (splits forced on at small sizes): SinkAttention's and Attention's
    decode through the split kernel and the combine give the reference's output (sink_attention;
    mask + SDPA) and leave the same cache, windows starting inside a run and runs with nothing to attend."""
    device = kernel_device()
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    b, t, heads, kv_heads, head_dim, window, cached, room, splits = case
    make = _layer if with_sinks else _plain_layer
    attn = make(heads, kv_heads, head_dim, window, dtype, device)
    q, k, v = _qkv(attn, b, t, dtype, device)
    start = torch.tensor(cached, device=device)
    capacity = cached + t + room - 1
    ref_cache, cache = (_cache(attn, b, cached, capacity, dtype, device) for _ in range(2))
    wide = _cache(attn, b, cached, capacity, torch.float32, device)  # float32 of the same rounded inputs
    wide.keys[0].copy_(ref_cache.keys[0])
    wide.values[0].copy_(ref_cache.values[0])
    truth = _attend(copy.deepcopy(attn).float(), q.float(), k.float(), v.float(), wide, start, False, monkeypatch)
    expected = _attend(attn, q, k, v, ref_cache, start, False, monkeypatch)
    monkeypatch.setattr(sinks, "decode_splits", lambda rows, hkv, dev: splits)
    monkeypatch.setattr(sinks, "DENSE_SPLITS_ON", True)
    monkeypatch.setattr(sinks, "DENSE_SPLIT_MIN_POSITIONS", 1)
    grids = []
    monkeypatch.setattr(sinks, "sink_attention_split_kernel", _Grids(sinks.sink_attention_split_kernel, grids))
    got = _attend(attn, q, k, v, cache, start, True, monkeypatch)
    assert grids == [(b * t, kv_heads, splits)]
    if dtype == torch.float32:
        _close(got, expected, dtype)
    else:  # a rounding step from the reference, and no farther from float32 than the one-pass kernel
        # (which rounds p relative to the whole context's running max, a run relative to its own)
        with torch.inference_mode():
            one_pass = sinks.fused_decode(q, k, v, attn.sinks if with_sinks else None, ref_cache.keys[0],
                                          ref_cache.values[0], start, window, store=False, splits=1)
        torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=1e-2)
        error = rel_error(got, truth)
        assert error <= 1.1 * rel_error(one_pass.view(got.shape), truth) and error < 1e-2
    assert torch.equal(cache.keys[0], ref_cache.keys[0]) and torch.equal(cache.values[0], ref_cache.values[0])


def test_split_decode_sink_joins_the_denominator_once(monkeypatch):
    """Runs of a step with sinks equal the one-pass kernel in float32 (a sink counted in every run's
    sum would shrink the output by the runs' count of exp(sink) terms), and sinks of -inf give plain
    attention: the split kernel without sinks."""
    device = kernel_device()
    attn = _layer(4, 2, 8, None, torch.float32, device)
    q, k, v = _qkv(attn, 1, 1, torch.float32, device)
    cache = _cache(attn, 1, 200, 204, torch.float32, device)
    start = torch.tensor(200, device=device)
    keys, values = cache.keys[0], cache.values[0]
    with torch.inference_mode():
        one = sinks.fused_decode(q, k, v, attn.sinks, keys, values, start, None, splits=1)
        runs = sinks.fused_decode(q, k, v, attn.sinks, keys, values, start, None, splits=4)
        no_sink = sinks.fused_decode(q, k, v, torch.full_like(attn.sinks, float("-inf")), keys, values, start, None,
                                     splits=4)
        plain = sinks.fused_decode(q, k, v, None, keys, values, start, None, splits=4)
    torch.testing.assert_close(runs, one, rtol=1e-5, atol=1e-5)
    assert rel_error(runs, plain) > 1e-2  # the sinks matter here
    torch.testing.assert_close(no_sink, plain, rtol=1e-5, atol=1e-5)


def test_dense_splits_come_from_shapes(monkeypatch):
    """The split count: 1 off CUDA; with decode_splits' count (two programs an SM), at most one run per
    DENSE_SPLIT_MIN_POSITIONS positions of the cache (or window); plain decode takes longer caches
    through the kernel only when they split."""
    device = kernel_device()
    assert sinks.dense_splits(1, 16, 4224, torch.device("cpu")) == 1
    monkeypatch.setattr(sinks, "decode_splits", lambda rows, hkv, dev: 16)
    assert sinks.dense_splits(1, 16, 4224, device) == 1  # off until a GPU run checks the split kernel
    monkeypatch.setattr(sinks, "DENSE_SPLITS_ON", True)
    per_run = sinks.DENSE_SPLIT_MIN_POSITIONS
    assert [sinks.dense_splits(1, 16, n, device) for n in (per_run - 1, 2 * per_run, 100 * per_run)] == [1, 2, 16]
    attn = _plain_layer(4, 2, 16, None, torch.float32, device)
    q, k, v = _qkv(attn, 1, 1, torch.float32, device)
    for length, fits in ((sinks.PLAIN_SPLIT_DECODE_MAX_POSITIONS, True),
                         (sinks.PLAIN_SPLIT_DECODE_MAX_POSITIONS + 1, False)):
        keys = torch.zeros(1, 2, length, 16, device=device)
        assert sinks.plain_decode_supported(q, k, v, keys, keys.clone()) == fits
    with pytest.raises(sinks.MoekitError, match="splits"):
        sinks.fused_decode(q, k, v, None, keys, keys.clone(), torch.tensor(3, device=device), None, splits=0)


# builds the sinks kernel for sm_90 without a GPU (the interpreter the tests above run it under
# accepts code the compiler rejects: layouts, dot operands, shared memory), as test_paged_decode.py
# does the paged decode kernels
_SM90_BUILD = """
import re, subprocess, tempfile
from pathlib import Path
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moekit.kernels.sink_decode import sink_attention_kernel, sink_attention_split_kernel
from moekit.sinks import sink_launch
cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
# (dtype, head dim, group, paged, sinks, splits): gpt-oss; head dim 256; a padded float32 group; without
# sinks (Attention's plain decode, dense, the cache written before): OLMoE's heads (G = 1, Dh 128),
# Qwen3-30B-A3B's (G = 8), and float32 at the largest head dim it takes; the split kernel (dense) at
# gpt-oss's, OLMoE's and Qwen3's heads and float32 head dim 256
for dtype, head_dim, group, paged, with_sinks, splits in (
        (torch.bfloat16, 64, 8, True, True, 1), (torch.bfloat16, 64, 8, False, True, 1),
        (torch.bfloat16, 256, 1, True, True, 1), (torch.float32, 24, 3, True, True, 1),
        (torch.bfloat16, 128, 1, False, False, 1), (torch.bfloat16, 128, 8, False, False, 1),
        (torch.float32, 256, 2, False, False, 1), (torch.bfloat16, 64, 8, False, True, 16),
        (torch.bfloat16, 128, 1, False, False, 16), (torch.bfloat16, 128, 8, False, False, 16),
        (torch.float32, 256, 2, False, False, 16)):
    kernel = sink_attention_kernel if splits == 1 else sink_attention_split_kernel
    launch = sink_launch(dtype, head_dim, group, sinks=with_sinks)
    options = {"num_warps": launch.pop("num_warps"), "num_stages": launch.pop("num_stages")}
    launch.update(H=8 * group, WINDOW=True, STORE=with_sinks)
    launch.update(PAGED=paged) if splits == 1 else launch.update(SPLITS=splits)
    element = "*bf16" if dtype == torch.bfloat16 else "*fp32"
    types = {"start_ptr": "*i32" if paged else "*i64", "tables_ptr": "*i32", "slots_ptr": "*i64", "scale": "fp32",
             "part_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32"}
    signature = {n: "constexpr" if n in launch else types.get(n, element if n.endswith("_ptr") else "i32")
                 for n in kernel.arg_names}
    strides = [n for n in kernel.arg_names if n[0] == "s" and n[-2] == "_" and n not in ("stride_tb", "stride_slot")]
    aligned = [n for n, t in signature.items() if t.startswith("*")] + strides
    source = ASTSource(fn=kernel, signature=signature, constexprs=launch,
                       attrs={(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    case = (str(dtype), head_dim, group, paged, with_sinks, splits)
    assert compiled.asm.get("cubin"), case
    assert dtype == torch.float32 or "mma.sync" in compiled.asm["ptx"], (case, "no tensor-core dot")
    assert compiled.metadata.shared <= 227 * 1024, (case, compiled.metadata.shared)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    print(case, usage.strip().splitlines()[-1].strip(), "shared", compiled.metadata.shared)
    # float32's ieee dots are FMA loops that spill (3-4 KB of stack a thread at head dim 128-256, the
    # one-pass kernel before the splits too): correct, not tuned; the bf16 builds must not spill
    assert dtype == torch.float32 or int(re.search(r"STACK:(\\d+)", usage).group(1)) == 0, (case, "spills", usage)
"""


@pytest.mark.slow
def test_sink_kernel_compiles_for_sm90_with_tensor_core_dots():
    """The bf16 sinks kernel at gpt-oss's heads (G = 8, Dh = 64; paged and dense) and at head dim
    256 with G = 1 built for Hopper uses mma instructions, fits its shared memory and spills no
    registers (bf16 builds); float32 with a padded group and head dim builds too; so does it without sinks at
    OLMoE's and Qwen3's heads (mma) and in float32 at head dim 256 (sinks.PLAIN_DECODE_MAX_HEAD_DIM);
    and the split kernel (16 runs) at gpt-oss's, OLMoE's and Qwen3's heads and float32 head dim 256."""
    build_without_interpreter(["-c", _SM90_BUILD])
