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
