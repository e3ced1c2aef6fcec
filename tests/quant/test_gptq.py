"""Grids, packing, round-to-nearest and batched GPTQ: GPTQ must beat rounding in layer
reconstruction error on correlated inputs, at every grid."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.quant.gptq import gptq_quantize, hessian, rtn_quantize
from moekit.quant.grids import IntGrid, TernaryGrid, make_grid, pack_codes, unpack_codes


def correlated_inputs(n: int, cols: int, seed: int) -> torch.Tensor:
    """Returns inputs [n, cols] with strongly correlated features (a low-rank mix plus noise)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols // 4, cols, generator=g)
    return torch.randn(n, cols // 4, generator=g) @ mix + 0.1 * torch.randn(n, cols, generator=g)


@pytest.mark.parametrize("bits,group", [("ternary", None), (2, None), (3, None), (4, None), (3, 16)])
def test_gptq_beats_rounding_on_correlated_inputs(bits, group):
    g = torch.Generator().manual_seed(0)
    experts, rows, cols = 3, 24, 64
    w = torch.randn(experts, rows, cols, generator=g)
    xs = [correlated_inputs(256, cols, seed=e) for e in range(experts)]
    h = torch.stack([hessian(x) for x in xs])
    grid = make_grid(bits, group)
    gptq, rtn = gptq_quantize(w, h, grid), rtn_quantize(w, grid)
    assert not gptq.failed.any() and not gptq.no_tokens.any()
    for e, x in enumerate(xs):
        ref = x @ w[e].T
        err_gptq = (x @ gptq.dequantize(grid)[e].T - ref).norm()
        err_rtn = (x @ rtn.dequantize(grid)[e].T - ref).norm()
        assert err_gptq < 0.8 * err_rtn, (bits, e, err_gptq.item(), err_rtn.item())


def test_failed_factorisation_and_empty_experts_fall_back_to_rounding():
    w = torch.randn(3, 8, 16)
    h = torch.stack([hessian(correlated_inputs(64, 16, 0)), torch.zeros(16, 16), -torch.eye(16) * 5])
    grid = IntGrid(4)
    out = gptq_quantize(w, h, grid)
    assert out.no_tokens.tolist() == [False, True, False]
    assert out.failed.tolist() == [False, False, True]
    rtn = rtn_quantize(w, grid)
    assert torch.equal(out.codes[1:], rtn.codes[1:])


def test_ternary_grid_levels():
    w = torch.tensor([[[-2.0, -0.9, 0.1, 0.6, 1.0]]])
    q = rtn_quantize(w, TernaryGrid())
    assert q.codes.tolist() == [[[1, 0, 0, 2, 2]]]
    assert q.dequantize(TernaryGrid()).tolist() == [[[-2.0, 0.0, 0.0, 1.0, 1.0]]]


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), rows=st.integers(1, 5), cols=st.integers(1, 40), seed=st.integers(0, 99))
def test_pack_round_trip(bits, rows, cols, seed):
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (rows, -(-cols // (32 // bits)))
    assert torch.equal(unpack_codes(words, bits, cols), codes)
