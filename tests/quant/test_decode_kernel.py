"""The decode kernels equal the PyTorch decodes. Ternary code (kernels.code_decode): codes exactly,
weights exactly in each output dtype (the levels are rounded as the reference rounds them). Int-N
(kernels.int_decode): float32 and float16 exactly, bfloat16 within one bf16 step (the Triton
interpreter truncates float32 to bfloat16; a GPU rounds to nearest, as PyTorch does). code_linear
and int_linear above the fused kernels' token limit (decode once + dense matmul) equal the references.

Inputs are built with the encoder from random ternary data on the CPU; the kernel runs on
kernel_device() (CUDA where there is a GPU, else the CPU under the Triton interpreter).
"""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_device

from moekit.quant import ops
from moekit.quant.code import (
    CHUNKS,
    build_dictionary,
    decode,
    encode,
    symbol_probabilities,
)
from moekit.quant.gptq import rtn_quantize
from moekit.quant.grids import IntGrid, pack_codes

pytestmark = pytest.mark.skipif(not ops.HAVE_TRITON, reason="needs triton")


def ternary(shape, density, g: torch.Generator) -> torch.Tensor:
    """Returns ternary codes (uint8) of `shape`, nonzero with probability density (broadcast over rows)."""
    nonzero = torch.rand(shape, generator=g) < density
    return torch.where(nonzero, torch.randint(1, 3, shape, generator=g), 0).to(torch.uint8)


def coded(codes: torch.Tensor, dict_bits: int, chunk: int | None = None, seed: int = 0):
    """Returns (Code, lo, hi, table) of ternary codes [..., R, K]: the encoder's layout and random levels."""
    g = torch.Generator().manual_seed(seed)
    d = build_dictionary(symbol_probabilities(codes), dict_bits)
    lo = -(torch.rand(codes.shape[:-1], generator=g) + 0.5).half()
    hi = (torch.rand(codes.shape[:-1], generator=g) + 0.5).half()
    return encode(codes, d, chunk), lo, hi, d.table


def uneven_rows(experts: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Returns ternary codes [E, R, K] whose rows differ widely in chunk count: all-zero rows, one
    dense row, a sparser expert (so experts use different parts of the shared capacity)."""
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(experts, rows, 1, generator=g) * 0.3
    density[:, ::5] = 0.0
    density[:, rows // 2] = 1.0
    density[-1] *= 0.5
    return ternary((experts, rows, cols), density, g)


def check(code, lo, hi, table, cols: int, config=None) -> None:
    """Asserts the kernel's codes and weights (each dtype) equal the PyTorch decode's."""
    device = kernel_device()
    parts = tuple(t.to(device) for t in (*code, lo, hi, table))
    ref_codes = decode(*code, table, cols)
    out = ops.code_decode_triton(*parts[:4], parts[6], cols, config=config)
    assert out.dtype == torch.uint8 and torch.equal(out.cpu(), ref_codes)
    for dtype in ops.DECODE_DTYPES:
        w = ops.code_weight_triton(*parts, cols, dtype, config=config)
        assert w.dtype == dtype
        torch.testing.assert_close(w.cpu(), ops.code_weight_reference(*code, lo, hi, table, cols, dtype),
                                   rtol=0, atol=0)


SHAPES = [(37, 300, 0.25), (16, 129, 0.05), (5, 77, 0.9)]  # (rows, cols, share of nonzeros)


@pytest.mark.parametrize("dict_bits,rows,cols,density",
                         [(bits, *shape) for bits in (8, 10) for shape in SHAPES] + [(16, *SHAPES[0])])
def test_decode_kernel_matches_decode(dict_bits, rows, cols, density):
    """8-bit (uint8) and 10/16-bit (int16 holding uint16) codewords; R not a multiple of ROW_BLOCK."""
    g = torch.Generator().manual_seed(rows)
    code, lo, hi, table = coded(ternary((rows, cols), density, g), dict_bits)
    assert code.codewords.dtype == (torch.uint8 if dict_bits == 8 else torch.int16)
    check(code, lo, hi, table, cols)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_decode_kernel_every_chunk_width(chunk):
    """Every chunk width the encoder may choose, on rows of very different chunk counts."""
    code, lo, hi, table = coded(uneven_rows(1, 21, 200, seed=chunk)[0], 8, chunk)
    assert code.codewords.shape[-1] == chunk
    check(code, lo, hi, table, 200)


# the one-row tile (a program a row: 11 s interpreted) is slow; the others tile fewer and more rows than a block
@pytest.mark.parametrize("config", [pytest.param((1, 4, 1), marks=pytest.mark.slow), (4, 32, 4), (16, 128, 4),
                                    (64, 64, 2)])
def test_decode_kernel_ragged_stacked_rows(config):
    """Stacked experts [E, ...] sharing one chunk capacity (unused capacity, all-zero rows with no
    chunks, a dense row), decoded in one launch; tiles of fewer rows than a row block and of more."""
    codes = uneven_rows(3, 50, 129, seed=1)
    code, lo, hi, table = coded(codes, 8)
    counts = code.row_chunks.to(torch.int64)
    assert int(counts.max()) > 2 * int(counts[counts > 0].min()) and int((counts == 0).sum()) > 0
    assert len(set(counts.sum(-1).tolist())) > 1  # the experts fill the capacity differently
    check(code, lo, hi, table, 129, config)
    assert torch.equal(ops.code_decode_triton(*(t.to(kernel_device()) for t in (*code, table)), 129).cpu(), codes)


@pytest.mark.slow
def test_decode_kernel_rows_longer_than_int16_starts():
    """Rows longer than 32767 columns store int32 chunk starts (and int16 chunk counts)."""
    g = torch.Generator().manual_seed(0)
    codes = ternary((3, 33000), torch.tensor([[0.1], [0.0], [1.0]]), g)
    code, lo, hi, table = coded(codes, 8, chunk=4)
    assert code.starts.dtype == torch.int32 and code.row_chunks.dtype == torch.int16
    check(code, lo, hi, table, 33000, config=(4, 256, 4))


def test_code_weight_takes_the_kernel_where_kernels_run(monkeypatch):
    """code_weight dispatches to the decode kernel (CUDA, or the interpreter with
    MOEKIT_QUANT_KERNELS=1) and keeps the PyTorch decode for other dtypes."""
    device = kernel_device()
    code, lo, hi, table = coded(uneven_rows(1, 20, 90)[0], 8)
    parts = tuple(t.to(device) for t in (*code, lo, hi, table))
    monkeypatch.setenv("MOEKIT_QUANT_KERNELS", "1")
    calls = []
    kernel = ops.code_weight_triton
    monkeypatch.setattr(ops, "code_weight_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ref = ops.code_weight_reference(*code, lo, hi, table, 90, torch.bfloat16)
    assert torch.equal(ops.code_weight(*parts, 90, torch.bfloat16).cpu(), ref)
    assert calls == [1]
    ops.code_weight(*parts, 90, torch.float64)
    assert calls == [1]


@pytest.mark.parametrize("tokens,chunked_max", [(65, 64), (128, 64), (512, 64), (100, 128)])
def test_code_linear_above_the_fused_kernel_limit(monkeypatch, tokens, chunked_max):
    """Above KERNEL_MAX_TOKENS: decode once + dense matmul (or, up to CODE_CHUNKED_MAX_TOKENS, the
    fused kernel over 64-token chunks): both equal the reference."""
    device = kernel_device()
    code, lo, hi, table = coded(uneven_rows(1, 24, 70)[0], 8)
    x = torch.randn(tokens, 70, generator=torch.Generator().manual_seed(tokens))
    ref = ops.code_linear_reference(x, *code, lo, hi, table)
    monkeypatch.setenv("MOEKIT_QUANT_KERNELS", "1")
    monkeypatch.setattr(ops, "CODE_CHUNKED_MAX_TOKENS", chunked_max)
    decoded, fused = [], []
    weight, linear = ops.code_weight_triton, ops.code_linear_triton
    monkeypatch.setattr(ops, "code_weight_triton", lambda *a, **k: decoded.append(1) or weight(*a, **k))
    monkeypatch.setattr(ops, "code_linear_triton", lambda *a, **k: fused.append(1) or linear(*a, **k))
    out = ops.code_linear(*(t.to(device) for t in (x, *code, lo, hi, table)))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    if tokens <= chunked_max:
        assert (len(decoded), len(fused)) == (0, -(-tokens // ops.KERNEL_MAX_TOKENS))
    else:
        assert (len(decoded), len(fused)) == (1, 0)


# ---- int-N ---------------------------------------------------------------------------------------

INT_SHAPES = [  # (experts, rows, cols, bits, group)
    (1, 37, 300, 4, None),  # one scale per row, last word partly used
    (2, 19, 256, 4, 128),  # a stack: rows of both experts in one launch
    (1, 45, 130, 2, 32),
    (1, 24, 200, 3, 40),  # 3-bit: 10 codes per word in 16 lanes
    (1, 11, 96, 3, 16),  # 3-bit groups that split words
]


def int_parts(experts, rows, cols, bits, group, seed=0):
    """Returns (qweight, scale, zero) [E, R, ...] of random matrices rounded to nearest."""
    w = torch.randn(experts, rows, cols, generator=torch.Generator().manual_seed(seed))
    q = rtn_quantize(w, IntGrid(bits, group))
    return pack_codes(q.codes, bits), q.params[0].half(), q.params[1].to(torch.uint8)


def assert_same_weight(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Asserts equality; bfloat16 within one step of its 8-bit mantissa (see the module docstring)."""
    assert out.dtype == ref.dtype
    if ref.dtype == torch.bfloat16:
        torch.testing.assert_close(out.cpu(), ref, rtol=2 ** -7, atol=0)
    else:
        torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("config", [None, (1, 8, 1), (16, 4, 2)])
@pytest.mark.parametrize("experts,rows,cols,bits,group", INT_SHAPES)
def test_int_decode_kernel_matches_reference(config, experts, rows, cols, bits, group):
    device = kernel_device()
    parts = int_parts(experts, rows, cols, bits, group, seed=rows)
    for dtype in ops.DECODE_DTYPES:
        out = ops.int_weight_triton(*(t.to(device) for t in parts), bits, cols, dtype, config=config)
        assert_same_weight(out, ops.int_weight_reference(*parts, bits, cols, dtype))


@pytest.mark.parametrize("tokens", [65, 200])
@pytest.mark.parametrize("bits,group", [(4, 32), (3, 16)])
def test_int_linear_above_the_fused_kernel_limit(monkeypatch, tokens, bits, group):
    """Above KERNEL_MAX_TOKENS int_linear decodes with the kernel (groups that split packed words
    keep the PyTorch path) and multiplies densely: equal to the reference."""
    device = kernel_device()
    parts = [t[0] for t in int_parts(1, 40, 96, bits, group)]
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens))
    ref = ops.int_linear_reference(x, *parts, bits)
    monkeypatch.setenv("MOEKIT_QUANT_KERNELS", "1")
    calls = []
    kernel = ops.int_weight_triton
    monkeypatch.setattr(ops, "int_weight_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    out = ops.int_linear(*(t.to(device) for t in (x, *parts)), bits)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
    assert len(calls) == (0 if ops.groups_split_words(bits, parts[1].shape[-1], 96) else 1)


# ---- on a GPU ----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("experts,rows,cols,bits,group", INT_SHAPES + [(1, 4096, 14336, 3, 128)])
def test_int_decode_on_cuda(experts, rows, cols, bits, group):
    """Compiled, the int decode kernel equals the reference exactly in every dtype, groups that
    split packed words included (ops.int_weight keeps those on the PyTorch path until this passes)."""
    parts = int_parts(experts, rows, cols, bits, group)
    for dtype in ops.DECODE_DTYPES:
        out = ops.int_weight_triton(*(t.cuda() for t in parts), bits, cols, dtype)
        torch.testing.assert_close(out.cpu(), ops.int_weight_reference(*parts, bits, cols, dtype), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [65, 128, 512])
@pytest.mark.parametrize("rows,cols", [(768, 2048), (2048, 768)])
def test_code_linear_on_cuda_above_the_limit(tokens, rows, cols):
    """On a GPU, code_linear past 64 tokens (decode kernel + bf16 matmul) equals the reference, and
    is captured whole in a CUDA graph (no host sync)."""
    g = torch.Generator().manual_seed(tokens)
    codes = ternary((rows, cols), torch.rand(rows, 1, generator=g) * 0.4, g)
    code, lo, hi, table = coded(codes, 8)
    x = torch.randn(tokens, cols, generator=g).bfloat16()
    ref = ops.code_linear_reference(x.float(), *code, lo, hi, table)
    parts = tuple(t.cuda() for t in (x, *code, lo, hi, table))
    out = ops.code_linear(*parts)
    assert out.dtype == torch.bfloat16
    assert ((out.float().cpu() - ref).norm() / ref.norm()).item() < 1e-2
    assert torch.equal(ops.code_decode_triton(*parts[1:5], parts[7], cols).cpu(), codes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops.code_linear(*parts)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, out, rtol=0, atol=0)
