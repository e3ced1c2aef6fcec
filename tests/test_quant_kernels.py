"""The compressed-form kernels equal their PyTorch references (Triton interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

from moekit.quant import ops
from moekit.quant.code import build_dictionary, encode, symbol_probabilities
from moekit.quant.grids import IntGrid, TernaryGrid, pack_codes
from moekit.quant.gptq import rtn_quantize

pytestmark = pytest.mark.skipif(not ops.HAVE_TRITON, reason="needs triton")


def int_matrix(rows, cols, bits, group, seed=0):
    w = torch.randn(1, rows, cols, generator=torch.Generator().manual_seed(seed))
    q = rtn_quantize(w, IntGrid(bits, group))
    return pack_codes(q.codes[0], bits), q.params[0][0].half(), q.params[1][0].to(torch.uint8)


def code_matrix(rows, cols, dict_bits, seed=0):
    w = torch.randn(1, rows, cols, generator=torch.Generator().manual_seed(seed))
    q = rtn_quantize(w, TernaryGrid())
    d = build_dictionary(symbol_probabilities(q.codes), dict_bits)
    words, starts = encode(q.codes[0], d)
    return words, starts, q.params[0][0, :, 0].half(), q.params[1][0, :, 0].half(), d.table


@pytest.mark.parametrize("batch,rows,cols,bits,group", [
    (1, 40, 96, 4, None), (3, 33, 70, 3, None), (17, 64, 128, 2, 32), (5, 20, 64, 4, 16)])
def test_int_kernel_matches_reference(batch, rows, cols, bits, group):
    q, scale, zero = int_matrix(rows, cols, bits, group)
    x = torch.randn(batch, cols)
    ref = ops.int_linear_reference(x, q, scale, zero, bits)
    out = ops.int_linear_triton(x, q, scale, zero, bits, block_n=32, block_k=32)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch,rows,cols,dict_bits", [(1, 37, 300, 8), (4, 16, 129, 10), (33, 9, 64, 8)])
def test_code_kernel_matches_reference(batch, rows, cols, dict_bits):
    words, starts, lo, hi, table = code_matrix(rows, cols, dict_bits)
    x = torch.randn(batch, cols)
    ref = ops.code_linear_reference(x, words, starts, lo, hi, table)
    out = ops.code_linear_triton(x, words, starts, lo, hi, table)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_expert_source_through_the_kernels(monkeypatch):
    from moekit.quant.compress import _store
    from moekit.quant.config import QuantConfig
    from moekit.quant.formats import build_experts

    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(3, 2 * 24, 32, generator=g), torch.randn(3, 32, 24, generator=g)
    for bits in ("ternary", "4"):
        grid = TernaryGrid() if bits == "ternary" else IntGrid(4)
        tensors, _ = _store(QuantConfig(bits=bits), {"gate_up": rtn_quantize(gate_up, grid),
                                                     "down": rtn_quantize(down, grid)})
        experts = build_experts(QuantConfig(bits=bits).form, 3, 32, 24, tensors, bits)
        x = torch.randn(5, 32)
        ids = torch.tensor([[0, 2], [1, 2], [2, 0], [0, 1], [2, 1]])
        w = torch.rand(5, 2)
        ref = experts(x, ids, w)
        monkeypatch.setenv("MOEKIT_QUANT_KERNELS", "1")
        torch.testing.assert_close(experts(x, ids, w), ref, rtol=1e-4, atol=1e-4)
        monkeypatch.delenv("MOEKIT_QUANT_KERNELS")


# ---- tile configurations of the redesigned kernels (odd shapes, batch 1 / 3 / 17 / 64) ---------

INT_CONFIGS = [  # (BLOCK_N, BLOCK_K code lanes, num_warps, use_dot)
    (4, 1024, 4, False), (8, 64, 4, False), (1, 16, 1, False), (16, 32, 4, True), (64, 128, 4, True)]


@pytest.mark.parametrize("config", INT_CONFIGS)
@pytest.mark.parametrize("batch,rows,cols,bits,group", [
    (1, 37, 300, 4, None),  # one scale per row
    (3, 19, 256, 4, 128),  # one scale per tile or per word, depending on the tile
    (17, 45, 130, 2, 32),  # groups of whole words, last word partly used
    (64, 24, 200, 3, 40),  # 3-bit: 10 codes per word in 16 lanes, one scale per word
    (3, 11, 96, 3, 16),  # 3-bit groups that split words: one scale per code
])
def test_int_kernel_tile_configs(config, batch, rows, cols, bits, group):
    q, scale, zero = int_matrix(rows, cols, bits, group, seed=batch)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(1))
    ref = ops.int_linear_reference(x, q, scale, zero, bits)
    out = ops.int_linear_triton(x, q, scale, zero, bits, config=config)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups,group_cols,per_word,tile_cols,mode", [
    (1, 4096, 8, 1024, 0), (32, 128, 8, 128, 1), (32, 128, 8, 1024, 2), (32, 128, 10, 640, 3)])
def test_int_scale_mode(groups, group_cols, per_word, tile_cols, mode):
    assert ops.int_scale_mode(groups, group_cols, per_word, tile_cols) == mode


def test_int_kernel_bfloat16():
    """bfloat16 through the elementwise path (batch 2); the Triton 3.6 interpreter computes
    tl.dot on bfloat16 wrongly (a bare 16x16 bf16 tl.dot is off by 1e10), so the tl.dot path is
    checked in float32 / float16 here and in bfloat16 by benchmarks/tune_quant_kernels.py on a GPU."""
    q, scale, zero = int_matrix(33, 512, 4, 128)
    x = torch.randn(2, 512).bfloat16()
    ref = ops.int_linear_reference(x.float(), q, scale, zero, 4)
    out = ops.int_linear_triton(x, q, scale, zero, 4)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


CODE_CONFIGS = [(8, 256, 4), (4, 32, 4), (1, 4, 1), (16, 64, 2)]  # (BLOCK_R, words per step, warps)


@pytest.mark.parametrize("config", CODE_CONFIGS)
@pytest.mark.parametrize("batch,rows,cols,dict_bits", [
    (1, 37, 300, 8), (3, 21, 129, 10), (17, 9, 500, 8), (64, 5, 77, 8)])
def test_code_kernel_tile_configs(config, batch, rows, cols, dict_bits):
    words, starts, lo, hi, table = code_matrix(rows, cols, dict_bits, seed=batch)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(1))
    ref = ops.code_linear_reference(x, words, starts, lo, hi, table)
    out = ops.code_linear_triton(x, words, starts, lo, hi, table, config=config)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [4, 64])
def test_code_kernel_chunk_sizes(chunk):
    """Every chunk width encode may choose (and chunks of a row past its end)."""
    w = torch.randn(1, 13, 700, generator=torch.Generator().manual_seed(3))
    q = rtn_quantize(w, TernaryGrid())
    d = build_dictionary(symbol_probabilities(q.codes), 8)
    words, starts = encode(q.codes[0], d, chunk=chunk)
    lo, hi = q.params[0][0, :, 0].half(), q.params[1][0, :, 0].half()
    x = torch.randn(3, 700)
    ref = ops.code_linear_reference(x, words, starts, lo, hi, d.table)
    torch.testing.assert_close(ops.code_linear_triton(x, words, starts, lo, hi, d.table), ref, rtol=1e-4, atol=1e-4)


def test_code_kernel_int32_starts():
    """Rows longer than 32767 columns store int32 chunk starts."""
    words, starts, lo, hi, table = code_matrix(2, 33000, 8)
    assert starts.dtype == torch.int32
    x = torch.randn(1, 33000)
    ref = ops.code_linear_reference(x, words, starts, lo, hi, table)
    torch.testing.assert_close(ops.code_linear_triton(x, words, starts, lo, hi, table), ref, rtol=1e-4, atol=1e-3)


def test_tuned_tables_are_well_formed():
    for bucket in (1, 8, 64):
        bn, bk, warps, use_dot = ops.INT_DEFAULT[bucket]
        assert bn & (bn - 1) == 0 and bk & (bk - 1) == 0 and warps in (1, 2, 4, 8)
    for cfg in list(ops.INT_TUNED.values()) + list(ops.CODE_TUNED.values()) + list(ops.CODE_DEFAULT.values()):
        assert all(v > 0 and v & (v - 1) == 0 for v in cfg[:2])
    assert [ops.batch_bucket(b) for b in (1, 2, 8, 9, 64)] == [1, 8, 8, 64, 64]
