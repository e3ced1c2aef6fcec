"""Dequantise + matmul for int-N experts: out[b, r] = sum_k x[b, k] * scale[r, g(k)] * (code[r, k] - zero[r, g(k)]).

Tensors (B = tokens, K = columns, R = rows, k = 32 // BITS codes per word, P = scale groups):
    x        [B, K]            float16 / bfloat16 / float32 activations
    qweight  [R, ceil(K / k)]  int32, code j of a word in bits j*BITS .. j*BITS + BITS - 1
    scale    [R, P]            float16
    zero     [R, P]            uint8 (same strides as scale)
    out      [B, R]            x's dtype

Program n computes rows n*BLOCK_N.. for all B tokens (padded to BLOCK_B >= 16 for tl.dot):
each weight tile is read once and unpacked in registers, never written back.
"""

import triton
import triton.language as tl


@triton.jit
def int_matmul_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr, out_ptr,
    B, R,
    stride_xb, stride_qr, stride_sr, stride_ob,
    K: tl.constexpr, BITS: tl.constexpr, GROUP_COLS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[b, rows] = x[b] . dequant(qweight[rows]) for one block of rows."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < R
    bs = tl.arange(0, BLOCK_B)  # [BB]
    b_ok = bs < B
    PER_WORD: tl.constexpr = 32 // BITS
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = ks < K
        w_mask = row_ok[:, None] & k_ok[None, :]
        words = tl.load(q_ptr + rows[:, None] * stride_qr + (ks // PER_WORD)[None, :], mask=w_mask, other=0)
        codes = (words >> ((ks % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)  # [BN, BK]
        groups = ks // GROUP_COLS
        s_off = rows[:, None] * stride_sr + groups[None, :]
        scale = tl.load(scale_ptr + s_off, mask=w_mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + s_off, mask=w_mask, other=0).to(tl.float32)
        xk = tl.load(x_ptr + bs[:, None] * stride_xb + ks[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        w = ((codes.to(tl.float32) - zero) * scale).to(xk.dtype)  # [BN, BK]
        acc += tl.dot(xk, tl.trans(w), input_precision=DOT_PRECISION)
    tl.store(out_ptr + bs[:, None] * stride_ob + rows[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=b_ok[:, None] & row_ok[None, :])
