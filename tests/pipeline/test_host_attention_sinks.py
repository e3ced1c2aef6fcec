"""gpt-oss's attention sinks in CGOPipe's CPU attention: the native kernel's `sinks` (one logit
per query head in each softmax's denominator) against its PyTorch reference and moekit.sinks'
arithmetic, with and without a sliding window, on both of the kernel's paths (head dims on and
off the vector width), bf16 and fp32 pools; host_attention's PyTorch fallback to the same."""

from __future__ import annotations

import pytest
import torch
from conftest import paged_case

from moekit import native
from moekit.kv_cache import RaggedBatch
from moekit.native import attention as na
from moekit.pipeline.host_attention import cpu_attention, sink_decode_attention

needs_native = pytest.mark.skipif(native.library() is None, reason=f"no native library: {native.unavailable_reason()}")
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}


def make_case(lens, h, hkv, dh, bs, dtype, seed=0):
    """paged_case with sink logits [H] after the context lens."""
    return paged_case(lens, h, hkv, dh, bs, dtype, seed, sinks=True)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dh", [32, 8, 20])  # the vector path, and the scalar one off the width
@pytest.mark.parametrize("window", [None, 5])
def test_kernel_sinks_match_the_reference(dtype, dh, window):
    lens = [1, 2, 17, 130, 300]  # a lone position, across blocks, across CHUNK (128)
    q, k, v, tables, ctx, sinks = make_case(lens, 8, 2, dh, 16, dtype)
    out = na.decode_attention(q, k, v, tables, ctx, window, sinks=sinks, threads=2)
    expected = na.reference(q, k, v, tables, ctx, window, sinks=sinks)
    assert (out.float() - expected).abs().max() <= TOL[dtype] * expected.abs().max()
    plain = na.reference(q, k, v, tables, ctx, window)
    # the sinks change the output (a test that ignored them would fail), and only by a factor per head:
    # out = plain * sum / (sum + exp(sink)), between 0 and 1
    ratio = (expected * plain).sum(-1) / (plain * plain).sum(-1)  # [B, H]
    assert ratio.min() > -1e-4 and ratio.max() < 1 + 1e-4
    assert ratio[:, 0].max() < 1e-3 and ratio[:, -1].min() > 1 - 1e-4


def test_reference_sinks_equal_moekit_sinks():
    """The reference's sink column is moekit.sinks.sink_attention's, on plain contiguous tensors."""
    from moekit.sinks import sink_attention

    q, k, v, tables, ctx, sinks = make_case([50], 8, 2, 16, 64, torch.float32, seed=3)
    kk = k[tables[0, :1].long()].reshape(-1, 2, 16)[:50].transpose(0, 1)[None]  # [1, Hkv, S, Dh]
    vv = v[tables[0, :1].long()].reshape(-1, 2, 16)[:50].transpose(0, 1)[None]
    want = sink_attention(q[:, :, None], kk, vv, sinks, None)[:, :, 0]
    torch.testing.assert_close(na.reference(q, k, v, tables, ctx, sinks=sinks), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_pytorch_fallback_equals_the_reference(window, monkeypatch):
    """host_attention's path where the kernel does not apply gives the reference's output too."""
    q, k, v, tables, ctx, sinks = make_case([3, 40, 9], 4, 2, 16, 8, torch.float32, seed=5)
    expected = na.reference(q, k, v, tables, ctx, window, sinks=sinks)
    torch.testing.assert_close(sink_decode_attention(q, k, v, tables, ctx, window, sinks), expected,
                               rtol=1e-5, atol=1e-5)
    batch = RaggedBatch(starts=tuple(int(n) - 1 for n in ctx), query_lens=(1, 1, 1), positions=ctx.long() - 1,
                        slots=torch.zeros(3, dtype=torch.long), block_tables=tables, context_lens=ctx,
                        last_index=torch.arange(3))
    monkeypatch.setattr(na, "usable", lambda q, keys: False)  # as on a machine without the library
    out = cpu_attention(q, k, v, batch, window, out=torch.empty_like(q), sinks=sinks)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)


@needs_native
def test_empty_context_and_refusals():
    q, k, v, tables, ctx, sinks = make_case([4, 9], 4, 2, 16, 4, torch.float32, seed=6)
    ctx[0] = 0
    out = na.decode_attention(q, k, v, tables, ctx, sinks=sinks)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # no positions: zeros, not NaN
    with pytest.raises(ValueError, match="one logit per query head"):
        na.decode_attention(q, k, v, tables, ctx, sinks=sinks[:3])


@needs_native
def test_thread_count_does_not_change_bits():
    q, k, v, tables, ctx, sinks = make_case([5, 200, 31, 77, 1], 8, 2, 32, 16, torch.bfloat16, seed=4)
    outs = [na.decode_attention(q, k, v, tables, ctx, 3, sinks=sinks, threads=t) for t in (1, 2, 3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
