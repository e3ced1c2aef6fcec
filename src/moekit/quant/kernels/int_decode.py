"""Dequantise int-N experts into a dense matrix on the device: w[r, k] = scale[r, g(k)] * (code[r, k] - zero[r, g(k)]).

Tensors (R = rows, of every matrix of a stack one after another, K = columns, k = 32 // BITS codes
per word, P = scale groups of GROUP_COLS columns):
    qweight  [R, ceil(K / k)]  int32, code j of a word in bits j*BITS .. j*BITS + BITS - 1
    scale    [R, P]            float16
    zero     [R, P]            uint8
    out      [R, K]            bfloat16 / float16 / float32

Program (n, w) owns rows n*BLOCK_N.. and words w*BLOCK_KW..: the [BLOCK_N, BLOCK_KW] int32 tile is
loaded once (contiguous along K), unpacked in registers to [BLOCK_N, BLOCK_KW, LANES] codes
(LANES = next power of 2 of k; the 3-bit word's lanes 10..15 are masked), and each code's scale
and zero are gathered by its group (L1-resident: a tile spans one or a few groups). The
arithmetic is the reference's (float32, scale * (code - zero), one rounding to out's dtype).
Every weight is written once: no memset, no workspace but `out`.
"""

import triton
import triton.language as tl


@triton.jit
def int_decode_kernel(
    q_ptr, scale_ptr, zero_ptr, out_ptr,
    R, K, GROUP_COLS,
    stride_qr, stride_sr, stride_zr, stride_or,
    NUM_WORDS: tl.constexpr, BITS: tl.constexpr, LANES: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,
):
    """out[rows, columns of words w*BLOCK_KW..] for one tile (see the module docstring)."""
    PER_WORD: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    words = tl.program_id(1) * BLOCK_KW + tl.arange(0, BLOCK_KW)  # [BKW]
    lanes = tl.arange(0, LANES)  # [L]
    row_ok = rows < R
    rows64 = rows.to(tl.int64)  # a stack's rows x K may pass 2^31 elements
    q = tl.load(q_ptr + rows64[:, None] * stride_qr + words[None, :],
                mask=row_ok[:, None] & (words < NUM_WORDS)[None, :], other=0)  # [BN, BKW] int32
    shift = tl.minimum(lanes, PER_WORD - 1) * BITS  # lanes past k are masked; keep their shift < 32
    code = (q[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1)  # [BN, BKW, L]
    col = words[:, None] * PER_WORD + lanes[None, :]  # [BKW, L]
    ok = row_ok[:, None, None] & ((lanes < PER_WORD)[None, :] & (col < K))[None, :, :]
    group = (col // GROUP_COLS)[None, :, :]
    scale = tl.load(scale_ptr + rows64[:, None, None] * stride_sr + group, mask=ok, other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + rows64[:, None, None] * stride_zr + group, mask=ok, other=0).to(tl.float32)
    w = scale * (code.to(tl.float32) - zero)
    tl.store(out_ptr + rows64[:, None, None] * stride_or + col[None, :, :], w.to(out_ptr.dtype.element_ty), mask=ok)
