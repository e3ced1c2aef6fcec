"""Dequantise + matmul for int-N experts: out[b, r] = sum_k x[b, k] * scale[r, g(k)] * (code[r, k] - zero[r, g(k)]).

Tensors (B = tokens, K = columns, R = rows, k = 32 // BITS codes per word, P = scale groups):
    x        [B, K]            float16 / bfloat16 / float32 activations
    qweight  [R, ceil(K / k)]  int32, code j of a word in bits j*BITS .. j*BITS + BITS - 1
    scale    [R, P]            float16
    zero     [R, P]            uint8 (same strides as scale)
    out      [B, R]            x's dtype

Why the first version was slow (H200, 14336x4096 int4 g128: 890 us at every batch, bf16 40 us):
  * too few programs: one per 64 rows, so 224 programs at 14336 rows, 64 at 4096 rows and 12 at
    768 rows for 132 SMs, each walking all of K serially in 64-column steps;
  * the tile was indexed per column (word = k // 8), so every int32 word was loaded 8 times by
    scalar loads, and scale / zero were gathered per element: ~3 scalar loads per weight instead
    of one 16-byte load per 32 weights;
  * batch 1 was padded to 16 tokens for tl.dot, so the tensor cores did 16x the needed work on
    a layout conversion of every tile.

Now: program n owns BLOCK_N rows and walks K in tiles of BLOCK_KW words. Each tile is loaded
once as [BLOCK_N, BLOCK_KW] int32 (contiguous along K, vectorised), unpacked in registers to
[BLOCK_N, BLOCK_KW, LANES] by shifts and masks (LANES = next power of 2 of k; the 3-bit word's
lanes 10..15 meet zeroed activations), scaled, and multiplied against all B tokens: tl.dot
for USE_DOT (B padded to >= 16), else per token an elementwise product and tl.sum (B <= 8).
Weights are read once per launch whatever B is.

SCALE_MODE says how scale/zero are fetched: 0 one per row (P = 1, loaded once), 1 one per tile
(the tile lies inside one group), 2 one per word (groups are whole words), 3 one per code.

Per-slot variant (decode: a few routed (token, expert) slots in one launch, no host sync), with
S = slots, A = experts per token, E = experts (or cache slots) of one layer, stacked:
    x        [N, K]                 token activations (gate_up) or [S, K] slot activations (down)
    ids      [S]                    int64: the expert (stacked index) of each slot, read on the device
    weights  [S]                    routing weight of each slot (WEIGHTED)
    qweight  [E, R, ceil(K / k)]    scale, zero [E, R, P]  (any expert stride: cache slabs too)
    out      [S, R_out]             SWIGLU: R_out = R / 2, out = silu(x W[:R/2]^T) * (x W[R/2:]^T);
                                    else R_out = R, out = weights[s] * x W^T (WEIGHTED)
Program (s, n) computes rows n*BLOCK_N.. of slot s at batch 1 with int_rows_dot, the tile loop
int_matmul_kernel runs too: slot s reads x[s // TOP_K] and expert ids[s].

Down with the top-k sum (int_slot_down_kernel, N = S / A tokens):
    h        [S, K]                 slot activations silu(gate) * up
    ids, weights [S]                as above
    out      [N, R]                 out[t] = sum_a weights[s] * h[s] W_{ids[s]}^T, s = t*A + a
Program (t, n) computes rows n*BLOCK_N.. of token t: its A slots one after another (unrolled: no
slot's loads wait on another's sum), each weighted and added to one float32 sum in the order
a = 0..A-1, stored once. The sum of a row depends neither on BLOCK_N nor on the other tokens, and
no torch reduce runs after the kernel.
"""

import triton
import triton.language as tl

SCALE_PER_ROW, SCALE_PER_TILE, SCALE_PER_WORD, SCALE_PER_CODE = 0, 1, 2, 3


@triton.jit
def int_rows_dot(
    x_ptr, q_ptr, scale_ptr, zero_ptr, rows,
    B, R, K, GROUP_COLS,
    stride_xb, stride_qr, stride_sr, stride_zr,
    NUM_WORDS: tl.constexpr, BITS: tl.constexpr, LANES: tl.constexpr, SCALE_MODE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Returns x . dequant(qweight[rows])^T in float32 for rows [BLOCK_N] (rows >= R count 0):
    [BLOCK_B, BLOCK_N] with USE_DOT, else [BLOCK_N, BLOCK_B]."""
    PER_WORD: tl.constexpr = 32 // BITS
    row_ok = rows < R
    wi = tl.arange(0, BLOCK_KW)  # [BKW]
    lanes = tl.arange(0, LANES)  # [L]
    shifts = lanes * BITS
    bs = tl.arange(0, BLOCK_B)  # [BB]
    b_ok = bs < B
    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    if SCALE_MODE == 0:
        scale = tl.load(scale_ptr + rows * stride_sr, mask=row_ok, other=0.0).to(tl.float32)[:, None, None]
        zero = tl.load(zero_ptr + rows * stride_zr, mask=row_ok, other=0).to(tl.float32)[:, None, None]
    for kw0 in range(0, NUM_WORDS, BLOCK_KW):
        words_at = kw0 + wi  # [BKW]
        q_mask = row_ok[:, None] & (words_at < NUM_WORDS)[None, :]
        q = tl.load(q_ptr + rows[:, None] * stride_qr + words_at[None, :], mask=q_mask, other=0)  # [BN, BKW]
        codes = (q[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BN, BKW, L]
        cols = words_at[:, None] * PER_WORD + lanes[None, :]  # [BKW, L]
        col_ok = (lanes < PER_WORD)[None, :] & (cols < K)
        if SCALE_MODE == 1:
            group = (kw0 * PER_WORD) // GROUP_COLS
            scale = tl.load(scale_ptr + rows * stride_sr + group, mask=row_ok, other=0.0).to(tl.float32)[:, None, None]
            zero = tl.load(zero_ptr + rows * stride_zr + group, mask=row_ok, other=0).to(tl.float32)[:, None, None]
        elif SCALE_MODE == 2:
            group = ((words_at * PER_WORD) // GROUP_COLS)[None, :]  # [1, BKW]
            scale = tl.load(scale_ptr + rows[:, None] * stride_sr + group, mask=q_mask, other=0.0).to(tl.float32)[:, :, None]
            zero = tl.load(zero_ptr + rows[:, None] * stride_zr + group, mask=q_mask, other=0).to(tl.float32)[:, :, None]
        elif SCALE_MODE == 3:
            group = (cols // GROUP_COLS)[None, :, :]  # [1, BKW, L]
            s_mask = row_ok[:, None, None] & col_ok[None, :, :]
            scale = tl.load(scale_ptr + rows[:, None, None] * stride_sr + group, mask=s_mask, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + rows[:, None, None] * stride_zr + group, mask=s_mask, other=0).to(tl.float32)
        w = (codes.to(tl.float32) - zero) * scale  # [BN, BKW, L]
        if USE_DOT:
            cols_flat = tl.reshape(cols, (BLOCK_KW * LANES,))  # [BK]
            ok_flat = tl.reshape(col_ok, (BLOCK_KW * LANES,))
            xk = tl.load(x_ptr + bs[:, None] * stride_xb + cols_flat[None, :],
                         mask=b_ok[:, None] & ok_flat[None, :], other=0.0)  # [BB, BK]
            w_flat = tl.reshape(w, (BLOCK_N, BLOCK_KW * LANES)).to(xk.dtype)  # [BN, BK]
            acc += tl.dot(xk, tl.trans(w_flat), input_precision=DOT_PRECISION)
        elif BLOCK_B == 1 and SCALE_MODE != 3:
            # batch 1, scale and zero constant over a word: sum_k s (c_k - z) x_k = s (sum_k c_k x_k - z sum_k x_k)
            # per word, so each weight costs a shift, a mask, a convert and an FMA on a 2-D tile, and the
            # scale and zero are applied once per word (no [BN, BKW, L] tensor, one reduction per tile)
            word_ok = words_at < NUM_WORDS  # [BKW]
            dots = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)  # sum_j c_j x_j per word
            xsum = tl.zeros((BLOCK_KW,), dtype=tl.float32)  # sum_j x_j per word
            for j in tl.static_range(PER_WORD):
                col = words_at * PER_WORD + j  # [BKW]
                xj = tl.load(x_ptr + col, mask=word_ok & (col < K), other=0.0).to(tl.float32)
                cj = ((q >> (j * BITS)) & ((1 << BITS) - 1)).to(tl.float32)  # [BN, BKW]
                dots += cj * xj[None, :]
                xsum += xj
            if SCALE_MODE == 2:  # scale, zero: [BN, BKW, 1]
                s2 = tl.reshape(scale, (BLOCK_N, BLOCK_KW))
                z2 = tl.reshape(zero, (BLOCK_N, BLOCK_KW))
                part = tl.sum(s2 * (dots - z2 * xsum[None, :]), axis=1)
            else:  # [BN, 1, 1], constant over the tile
                s1 = tl.reshape(scale, (BLOCK_N,))
                z1 = tl.reshape(zero, (BLOCK_N,))
                part = s1 * (tl.sum(dots, axis=1) - z1 * tl.sum(xsum, axis=0))
            acc += part[:, None]
        else:
            for b in tl.static_range(BLOCK_B):
                # a comparison, not `col_ok & (b < B)`: Triton 3.9's interpreter rejects bool & scalar
                b_cols = tl.where(b < B, K, 0)
                xb = tl.load(x_ptr + b * stride_xb + cols, mask=col_ok & (cols < b_cols), other=0.0).to(tl.float32)  # [BKW, L]
                part = tl.sum(tl.sum(w * xb[None, :, :], axis=2), axis=1)  # [BN]
                if BLOCK_B == 1:
                    acc += part[:, None]
                else:
                    acc = tl.where(bs[None, :] == b, acc + part[:, None], acc)
    return acc


@triton.jit
def int_matmul_kernel(
    x_ptr, q_ptr, scale_ptr, zero_ptr, out_ptr,
    B, R, K, GROUP_COLS,
    stride_xb, stride_qr, stride_sr, stride_zr, stride_ob,
    NUM_WORDS: tl.constexpr, BITS: tl.constexpr, LANES: tl.constexpr, SCALE_MODE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[:, rows] = x . dequant(qweight[rows])^T for one block of BLOCK_N rows."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    acc = int_rows_dot(x_ptr, q_ptr, scale_ptr, zero_ptr, rows, B, R, K, GROUP_COLS,
                       stride_xb, stride_qr, stride_sr, stride_zr,
                       NUM_WORDS, BITS, LANES, SCALE_MODE, BLOCK_B, BLOCK_N, BLOCK_KW, USE_DOT, DOT_PRECISION)
    bs = tl.arange(0, BLOCK_B)
    row_ok = rows < R
    b_ok = bs < B
    if USE_DOT:
        tl.store(out_ptr + bs[:, None] * stride_ob + rows[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=b_ok[:, None] & row_ok[None, :])
    else:
        tl.store(out_ptr + bs[None, :] * stride_ob + rows[:, None], acc.to(out_ptr.dtype.element_ty),
                 mask=b_ok[None, :] & row_ok[:, None])


@triton.jit
def int_slot_kernel(
    x_ptr, ids_ptr, weights_ptr, q_ptr, scale_ptr, zero_ptr, out_ptr,
    R_OUT, K, GROUP_COLS,
    stride_xn, stride_qe, stride_qr, stride_se, stride_sr, stride_ze, stride_zr, stride_os,
    TOP_K: tl.constexpr, NUM_WORDS: tl.constexpr, BITS: tl.constexpr, LANES: tl.constexpr,
    SCALE_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
    SWIGLU: tl.constexpr, WEIGHTED: tl.constexpr,
):
    """out[s, rows] for one slot s and one block of BLOCK_N output rows (see the module docstring)."""
    s = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    e = tl.load(ids_ptr + s).to(tl.int64)  # int64: a cache slab's slots may span > 2^31 bytes
    x_row = x_ptr + (s // TOP_K) * stride_xn
    q_e, scale_e, zero_e = q_ptr + e * stride_qe, scale_ptr + e * stride_se, zero_ptr + e * stride_ze
    acc = int_rows_dot(x_row, q_e, scale_e, zero_e, rows, 1, R_OUT, K, GROUP_COLS, 0, stride_qr, stride_sr, stride_zr,
                       NUM_WORDS, BITS, LANES, SCALE_MODE, 1, BLOCK_N, BLOCK_KW, False, "ieee")  # [BN, 1]
    if SWIGLU:  # acc holds the gate rows; the up rows are R_OUT further
        up = int_rows_dot(x_row, q_e, scale_e, zero_e, rows + R_OUT, 1, 2 * R_OUT, K, GROUP_COLS, 0, stride_qr,
                          stride_sr, stride_zr, NUM_WORDS, BITS, LANES, SCALE_MODE, 1, BLOCK_N, BLOCK_KW, False, "ieee")
        acc = acc * tl.sigmoid(acc) * up
    if WEIGHTED:
        acc = acc * tl.load(weights_ptr + s).to(tl.float32)
    tl.store(out_ptr + s * stride_os + rows[:, None], acc.to(out_ptr.dtype.element_ty), mask=(rows < R_OUT)[:, None])


@triton.jit
def int_slot_down_kernel(
    h_ptr, ids_ptr, weights_ptr, q_ptr, scale_ptr, zero_ptr, out_ptr,
    R, K, GROUP_COLS,
    stride_hs, stride_qe, stride_qr, stride_se, stride_sr, stride_ze, stride_zr, stride_on,
    TOP_K: tl.constexpr, NUM_WORDS: tl.constexpr, BITS: tl.constexpr, LANES: tl.constexpr,
    SCALE_MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    """out[t, rows] = sum_a weights[s] * h[s] . W_{ids[s]}[rows]^T over token t's slots s = t*A + a,
    added in float32 in the order a = 0..A-1 (see the module docstring)."""
    t = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    acc = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    for a in tl.static_range(TOP_K):
        s = t * TOP_K + a
        e = tl.load(ids_ptr + s).to(tl.int64)  # int64: a cache slab's slots may span > 2^31 bytes
        weight = tl.load(weights_ptr + s).to(tl.float32)
        part = int_rows_dot(h_ptr + s * stride_hs, q_ptr + e * stride_qe, scale_ptr + e * stride_se,
                            zero_ptr + e * stride_ze, rows, 1, R, K, GROUP_COLS, 0, stride_qr, stride_sr, stride_zr,
                            NUM_WORDS, BITS, LANES, SCALE_MODE, 1, BLOCK_N, BLOCK_KW, False, "ieee")  # [BN, 1]
        acc += part * weight
    tl.store(out_ptr + t * stride_on + rows[:, None], acc.to(out_ptr.dtype.element_ty), mask=(rows < R)[:, None])
