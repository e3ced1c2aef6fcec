"""Decode of ternary experts in the sub-1-bit code (quant.code) into a dense matrix, on the device.

Tensors (E = matrices decoded in one launch, R = rows, K = columns, T = chunk capacity,
W = codewords per chunk, NB = ceil(R / ROW_BLOCK) row blocks; quant.code describes the layout;
each matrix at its own stride, so stacked experts and cache slabs decode in one launch):
    words          [E, T, W]  uint8, or int16 holding uint16 codewords; each row's chunks contiguous
    starts         [E, T]     int16 / int32: the column where each chunk's first word begins
    row_chunks     [E, R]     uint8 / int16 / int32: chunks of each row
    block_offsets  [E, NB]    int32: the first chunk of each block of ROW_BLOCK rows
    lo, hi         [E, R]     levels of the row's LO and HI symbols in out's dtype (read only with
                              LEVELS; rounded by the caller: the interpreter truncates to bf16)
    table          [2^bits]   int64: the int32 table [2^bits, 2] seen as one entry per codeword
    out            [E, R, K]  LEVELS: the weight (bf16 / fp16 / fp32), lo or hi at each nonzero;
                              else uint8 ternary codes (grids.LO / grids.HI at each nonzero).
                              Zeroed by the caller: the kernel writes only the nonzero symbols.

Program (r, e) owns rows r*BLOCK_R.. of matrix e. It finds each row's chunks as the matmul
kernel does (its block's offset plus the chunk counts of the rows before it in the block: no
host sync, no prefix sum over the matrix) and walks them CHUNKS_PER_STEP at a time up to the
most chunks of any of its rows (a bound read from memory). A step loads [BLOCK_R, CHUNKS_PER_STEP,
WP] codewords, looks each up in the table with one 8-byte load and places every word by a cumsum
of lengths inside its chunk; then each round pops the lowest set bit of every word's nonzero mask
and stores that symbol (its level, or its code) at its column. Rounds per step are the most
nonzeros of one word (2-4 for GPTQ'd experts), not the 27 symbols a word may hold: zeros are not
written, which is why `out` starts zeroed (one memset, at full bandwidth). Workspace: the tile in
registers; nothing in memory but `out`.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from .code_matmul import _popcount, _row_spans, _step_codes, _step_entries


@triton.jit
def code_decode_kernel(
    words_ptr, starts_ptr, chunks_ptr, offsets_ptr, lo_ptr, hi_ptr, table_ptr, out_ptr,
    R, K,
    stride_we, stride_se, stride_ce, stride_oe, stride_le, stride_he, stride_out_e, stride_out_r,
    W: tl.constexpr, WP: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr, ROW_BLOCK: tl.constexpr,
    BLOCK_R: tl.constexpr, LEVELS: tl.constexpr, HW_POPC: tl.constexpr,
):
    """out[e, rows, :] at the nonzero symbols of rows r*BLOCK_R.. of matrix e (see the module docstring)."""
    e = tl.program_id(1).to(tl.int64)  # int64: stacked matrices may span > 2^31 elements
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    row_ok = rows < R
    words_e, starts_e = words_ptr + e * stride_we, starts_ptr + e * stride_se
    first, count = _row_spans(chunks_ptr + e * stride_ce, offsets_ptr + e * stride_oe, rows, R, ROW_BLOCK, BLOCK_R)
    out_rows = out_ptr + e * stride_out_e + rows.to(tl.int64)[:, None, None] * stride_out_r  # [BR, 1, 1]
    if LEVELS:
        lo = tl.load(lo_ptr + e * stride_le + rows, mask=row_ok, other=0.0)
        hi = tl.load(hi_ptr + e * stride_he + rows, mask=row_ok, other=0.0)
        lo_r = lo[:, None, None]
        hi_r = hi[:, None, None]
    cs = tl.arange(0, CHUNKS_PER_STEP)  # [C]
    most = tl.max(count, axis=0)
    s0 = 0
    while s0 < most:
        chunk = s0 + cs
        chunk_ok = chunk[None, :] < count[:, None]  # [BR, C]
        start = tl.load(starts_e + first[:, None] + chunk[None, :], mask=chunk_ok, other=0).to(tl.int32)
        code = _step_codes(words_e, first, count, s0, W, WP, CHUNKS_PER_STEP)
        entry = _step_entries(table_ptr, code, count, s0, W, WP, CHUNKS_PER_STEP)  # [BR, C, WP] int64
        nz = entry.to(tl.int32)  # nonzero symbol bits (bits 0..26); 0 past a row's chunks
        hi_len = (entry >> 32).to(tl.int32)  # HI bits | length << 27
        length = (hi_len >> 27) & 31
        at = start[:, :, None] + tl.cumsum(length, axis=2) - length  # [BR, C, WP] column of each word
        if HW_POPC:
            rounds = tl.max(libdevice.popc(nz))
        else:
            rounds = tl.max(_popcount(nz))
        while rounds > 0:
            low = nz & -nz  # lowest nonzero symbol of each word, as a bit
            col = at + (low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127  # its column
            is_hi = (hi_len & low) != 0
            if LEVELS:
                value = tl.where(is_hi, hi_r, lo_r)
            else:
                value = tl.where(is_hi, 2, 1).to(tl.uint8)  # grids.HI, grids.LO
            tl.store(out_rows + col, value, mask=(low != 0) & (col < K))  # a last word may run past K
            nz = nz ^ low
            rounds -= 1
        s0 += CHUNKS_PER_STEP
