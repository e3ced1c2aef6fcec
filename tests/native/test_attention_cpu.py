"""The native CPU decode attention (native/attention.cpp) against its PyTorch reference and
moekit.paged_attention's: GQA ratios, lengths 1..N over shuffled blocks, sliding windows, bf16 /
fp16 / fp32, any thread count giving the same bits, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import paged_case as make_case

from moekit import native
from moekit.native import attention as na
from moekit.paged_attention import decode_attention_reference

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no native library: {native.unavailable_reason()}")

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2), (12, 6), (8, 1)])
def test_matches_reference(dtype, h, hkv):
    lens = [1, 2, 15, 16, 17, 130, 300]  # inside a block, at its edge, across CHUNK (128) and beyond
    q, k, v, tables, ctx = make_case(lens, h, hkv, 32, 16, dtype)
    out = na.decode_attention(q, k, v, tables, ctx, threads=2)
    expected = na.reference(q, k, v, tables, ctx)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.float() - expected).abs().max() <= TOL[dtype] * expected.abs().max()


@pytest.mark.parametrize("window", [1, 7, 16, 200])
def test_sliding_window(window):
    lens = [1, 5, 40, 257]
    q, k, v, tables, ctx = make_case(lens, 8, 2, 64, 16, torch.float32, seed=1)
    out = na.decode_attention(q, k, v, tables, ctx, window=window)
    torch.testing.assert_close(out, na.reference(q, k, v, tables, ctx, window=window), rtol=2e-5, atol=2e-5)


def test_equals_paged_attention_reference():
    """The PyTorch decode path the models use (SDPA over gathered tables, masked) agrees too."""
    q, k, v, tables, ctx = make_case([3, 64, 33], 8, 4, 32, 8, torch.float32, seed=2)
    for window in (None, 10):
        expected = decode_attention_reference(q, k, v, tables, ctx, window)
        torch.testing.assert_close(na.decode_attention(q, k, v, tables, ctx, window), expected, rtol=1e-5, atol=1e-5)


def test_reference_against_sdpa_on_contiguous_tensors():
    """The reference itself, held to torch's SDPA with enable_gqa on plain [1, Hkv, S, Dh] tensors."""
    q, k, v, tables, ctx = make_case([50], 8, 2, 16, 64, torch.float32, seed=3)
    kk = k[tables[0, :1].long()].reshape(-1, 2, 16)[:50].transpose(0, 1)[None]
    vv = v[tables[0, :1].long()].reshape(-1, 2, 16)[:50].transpose(0, 1)[None]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(na.reference(q, k, v, tables, ctx), sdpa, rtol=1e-5, atol=1e-5)


def test_thread_count_does_not_change_bits():
    q, k, v, tables, ctx = make_case([5, 200, 31, 77, 1], 8, 2, 32, 16, torch.bfloat16, seed=4)
    outs = [na.decode_attention(q, k, v, tables, ctx, threads=t) for t in (1, 2, 3, 5)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_empty_context_gives_zeros_scale_and_out():
    q, k, v, tables, ctx = make_case([4, 9], 4, 2, 16, 4, torch.float32, seed=5)
    ctx[0] = 0
    out = torch.full_like(q, 3.0)
    assert na.decode_attention(q, k, v, tables, ctx, out=out, scale=0.3) is out
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, na.reference(q, k, v, tables, ctx, scale=0.3), rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_and_kv_bytes():
    q, k, v, tables, ctx = make_case([6, 20], 4, 2, 16, 8, torch.bfloat16, seed=6)
    out = na.decode_attention(q.float(), k, v, tables, ctx)  # fp32 queries over a bf16 cache
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, na.reference(q.float(), k, v, tables, ctx), rtol=1e-4, atol=1e-4)
    assert na.kv_bytes(k, ctx) == 26 * 2 * 2 * 16 * 2
    assert na.kv_bytes(k, ctx, window=10) == 16 * 2 * 2 * 16 * 2


def test_refuses_what_it_cannot_take():
    q, k, v, tables, ctx = make_case([4], 6, 4, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        na.decode_attention(q, k, v, tables, ctx)
    q, k, v, tables, ctx = make_case([4], 4, 2, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="one shape and dtype"):
        na.decode_attention(q, k, v.to(torch.bfloat16), tables, ctx)
    with pytest.raises(ValueError, match="context length"):
        na.decode_attention(q, k, v, tables, ctx + 1)
    with pytest.raises(ValueError, match="outside the pool"):
        na.decode_attention(q, k, v, tables + 100, ctx)
    assert not na.usable(q.to(torch.int32), k)


@pytest.mark.parametrize("dh", [8, 20, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dims_off_the_vector_width(dh, dtype):
    """Head dims that are no multiple of the vector width run the scalar path, to the same results."""
    q, k, v, tables, ctx = make_case([1, 9, 140], 6, 2, dh, 8, dtype, seed=7)
    for window in (None, 5):
        out = na.decode_attention(q, k, v, tables, ctx, window)
        expected = na.reference(q, k, v, tables, ctx, window)
        assert (out.float() - expected).abs().max() <= TOL[dtype] * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,hkv,dh", [(32, 8, 32), (12, 4, 32), (6, 2, 32), (8, 8, 32), (10, 2, 32), (16, 1, 64)])
def test_work_items_change_no_bits(dtype, h, hkv, dh):
    """By sequence (each position's whole row, every kv head) and by (sequence, kv head) give the
    same bits, with windows and sinks, and auto takes the by-sequence path at 10 sequences on one
    thread (several kv heads): the choice is memory order only."""
    lens = [1, 16, 17, 129, 300, 0, 77, 144, 5, 260]
    q, k, v, tables, ctx = make_case(lens, h, hkv, dh, 16, dtype, seed=6)
    assert na.chosen_items(len(lens), hkv, dh, 2, "sequence") == "sequence"
    assert na.chosen_items(len(lens), hkv, dh, 2, "head") == "head"
    assert na.chosen_items(len(lens), hkv, dh, 1, "auto") == ("sequence" if hkv > 1 else "head")
    assert na.chosen_items(len(lens), hkv, dh, 3, "auto") == "head"  # fewer than 4 sequences a thread
    sinks = torch.randn(h)
    for window, s in ((None, None), (20, None), (None, sinks), (130, sinks)):
        by_head = na.decode_attention(q, k, v, tables, ctx, window=window, sinks=s, threads=2, items="head")
        by_seq = na.decode_attention(q, k, v, tables, ctx, window=window, sinks=s, threads=2, items="sequence")
        auto = na.decode_attention(q, k, v, tables, ctx, window=window, sinks=s, threads=1, items="auto")
        assert torch.equal(by_head, by_seq) and torch.equal(by_head, auto)
    expected = na.reference(q, k, v, tables, ctx)
    out = na.decode_attention(q, k, v, tables, ctx, items="sequence")
    assert (out.float() - expected).abs().max() <= TOL[dtype] * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,hkv,dh", [(14, 2, 48), (12, 2, 80), (3, 3, 40), (16, 1, 576)])
def test_sub_groups_and_odd_vector_counts(dtype, h, hkv, dh):
    """The vectorised kernel's other shapes, against the reference and by head as by sequence, with
    sinks and a window: 7 and 6 heads a kv head (a full sub-group and 3 or 2 more with AVX2; one
    padded sub-group with AVX-512), one head, 16 over an MLA-wide row (two or four sub-groups), and
    head dims of an odd number of vectors, whose last one is read alone (40 with AVX2; 48 and 80
    with AVX-512)."""
    lens = [1, 3, 17, 130, 257]
    q, k, v, tables, ctx, sinks = make_case(lens, h, hkv, dh, 16, dtype, seed=9, sinks=True)
    for window, s in ((None, None), (100, sinks)):
        by_head = na.decode_attention(q, k, v, tables, ctx, window=window, sinks=s, threads=2, items="head")
        by_seq = na.decode_attention(q, k, v, tables, ctx, window=window, sinks=s, threads=2, items="sequence")
        assert torch.equal(by_head, by_seq)
        expected = na.reference(q, k, v, tables, ctx, window=window, sinks=s)
        assert (by_head.float() - expected).abs().max() <= TOL[dtype] * expected.abs().max()


def test_work_items_fall_back_by_head_off_the_vector_width():
    """A head dim that is not whole vectors runs by head whatever is asked, with the same bits."""
    q, k, v, tables, ctx = make_case([3, 40, 200], 8, 2, 20, 16, torch.float32, seed=8)
    assert na.chosen_items(3, 2, 20, 1, "sequence") == "head"
    assert torch.equal(na.decode_attention(q, k, v, tables, ctx, items="sequence"),
                       na.decode_attention(q, k, v, tables, ctx, items="head"))


def test_work_items_refused_in_one_line(monkeypatch):
    q, k, v, tables, ctx = make_case([3], 8, 2, 32, 16, torch.float32, seed=7)
    with pytest.raises(ValueError, match="items='rows'.*auto, head, sequence"):
        na.decode_attention(q, k, v, tables, ctx, items="rows")
    monkeypatch.setenv(na.ITEMS_ENV, "bogus")
    with pytest.raises(ValueError, match="MOEKIT_CPU_ATTENTION_ITEMS='bogus'"):
        na.decode_attention(q, k, v, tables, ctx)
    monkeypatch.setenv(na.ITEMS_ENV, "sequence")
    torch.testing.assert_close(na.decode_attention(q, k, v, tables, ctx), na.reference(q, k, v, tables, ctx),
                               rtol=2e-5, atol=2e-5)
