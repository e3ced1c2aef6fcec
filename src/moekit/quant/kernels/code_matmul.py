"""Decode + matmul for ternary experts in the sub-1-bit code (quant.code), in one pass.

Tensors (B = tokens, K = columns, R = rows, S = chunks per row, W = codewords per chunk):
    x        [B, K]        activations (any float dtype)
    words    [R, S, W]     uint8, or int16 holding uint16 codewords
    starts   [R, S]        int16 / int32: the column where each chunk's first word begins
    lo, hi   [R]           float16 levels of the row's LO and HI symbols
    table    [2^bits, 2]   int32: [c, 0] nonzero bits of word c, [c, 1] HI bits | length << 27
    partial  [S, B, R]     float32: one partial sum per chunk (summed by the wrapper)

Program (r, s) walks chunk s of BLOCK_R rows codeword by codeword: a table lookup gives each
word's symbols as bit masks, the activations under its nonzero symbols are gathered and summed
into a LO and a HI accumulator, and the column advances by the word's length. Weights are never
materialised: a row's output is lo * (sum of x under LO) + hi * (sum of x under HI).
"""

import triton
import triton.language as tl


@triton.jit
def code_matmul_kernel(
    x_ptr, words_ptr, starts_ptr, lo_ptr, hi_ptr, table_ptr, partial_ptr,
    B, R,
    stride_xb, stride_wr, stride_ws, stride_sr, stride_ps, stride_pb,
    K: tl.constexpr, W: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """partial[s, b, rows] = sum over chunk s of row r of W[r, k] * x[b, k]."""
    rb = tl.program_id(0)
    s = tl.program_id(1)
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    row_ok = rows < R
    lanes = tl.arange(0, 32)  # symbol slots of one word (27 used)
    bs = tl.arange(0, BLOCK_B)  # [BB]
    b_ok = bs < B
    col = tl.load(starts_ptr + rows * stride_sr + s, mask=row_ok, other=K).to(tl.int32)  # [BR]
    acc_lo = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
    for j in range(W):
        word = tl.load(words_ptr + rows * stride_wr + s * stride_ws + j, mask=row_ok, other=0).to(tl.int32) & 0xFFFF
        nz_bits = tl.load(table_ptr + word * 2)  # [BR]
        hi_bits = tl.load(table_ptr + word * 2 + 1)
        length = (hi_bits >> 27) & 31
        cols = col[:, None] + lanes[None, :]  # [BR, 32]
        live = (((nz_bits[:, None] >> lanes[None, :]) & 1) != 0) & (cols < K)
        is_hi = ((hi_bits[:, None] >> lanes[None, :]) & 1) != 0
        xv = tl.load(x_ptr + bs[None, None, :] * stride_xb + cols[:, :, None],
                     mask=live[:, :, None] & b_ok[None, None, :], other=0.0).to(tl.float32)  # [BR, 32, BB]
        acc_hi += tl.sum(tl.where(is_hi[:, :, None], xv, 0.0), axis=1)
        acc_lo += tl.sum(tl.where(is_hi[:, :, None], 0.0, xv), axis=1)
        col += length
    lo = tl.load(lo_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    hi = tl.load(hi_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    out = lo[:, None] * acc_lo + hi[:, None] * acc_hi  # [BR, BB]
    tl.store(partial_ptr + s * stride_ps + bs[None, :] * stride_pb + rows[:, None], out,
             mask=row_ok[:, None] & b_ok[None, :])
