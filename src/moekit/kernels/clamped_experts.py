"""gpt-oss expert kernels (biases, clamped SwiGLU) for MXFP4 and dense weights: per-slot matvecs
for a few slots, grouped matmuls (slots sorted by expert) for many. The weight format is a
constexpr (MXFP4): the per-slot kernels multiply through `_row_products`, the grouped ones through
`_weight_tile` + `_dot_tile`, and both decode MXFP4 bytes in registers in `_mxfp4_halves` (two
e2m1 values times the E8M0 power of their 32-value group), so each format's multiply exists
once and no weight is ever stored wider. MXFP4 also has a "words" path (the block comment
above `_e2m1_word_nibble`): rows read as int32 words, e2m1 built from bits; per-slot kernels of
its own (slot_gate_up_mxfp4_kernel, slot_down_sum_mxfp4_kernel, the latter summing a token's
top-k rows) and grouped tiles (`_mxfp4_word_tile`, WORD_TILES).

Tensors (N = tokens, A = experts per token, S = N*A slots in routing order, E = experts or cache
slots, D = hidden, I = expert ffn width; K = the matrix's columns, R = its rows, G = K / 32;
P = row blocks of the grouped kernels, as moekit.kernels.moe_grouped defines them):
    x            [N, D]          token activations (gate_up)
    h            [S, I]          slot activations (down; the grouped kernels' h is in sorted order)
    rows         [S]             int64 stack row of each slot (the router's [N, A] ids, flattened)
    order        [S]             int64 slot (routing order) of each sorted position (grouped kernels)
    weights      [S]             routing weight of each slot (routing order)
    w            MXFP4: [E, R, G, 16] uint8, byte j of a group holds columns 2j (low nibble), 2j + 1
                 dense: [E, R, K], the matrix's columns contiguous
    scales       MXFP4: [E, R, G] uint8, column k's value is e2m1 * 2^(scales[.., k // 32] - 127);
                 dense: unused (any pointer)
    bias         [E, R]          the projection's bias (gate rows first, then up, for gate_up)
    out          gate_up: [S, I] the clamped SwiGLU; down: [S, D] times the routing weight, at
                 each slot's routing-order row (the wrapper sums a token's A rows)

With OFFSETS (the per-slot kernels), expert e's tensors start at w_ptr + w_off[e * stride_off],
scales_ptr + s_off[e * stride_off] and bias_ptr + b_off[e * stride_off] (int64, elements of each
tensor) instead of e rows into the stacks: the offsets table (offload.mapped) may point into a cache
slab or, through unified addressing, into page-locked host memory (an expert read in place).

The grouped kernels return at once from an unused row block (a branch on a loaded value, on the
device: CUDA graphs and TRITON_INTERPRET=1 run it alike), so unused blocks cost a launch slot,
not a pass over the weights. Accumulation is float32; float32 inputs multiply in full float32.
"""

import triton
import triton.language as tl


@triton.jit
def _e2m1(code):
    """Returns the float32 value of e2m1 codes (int32, 0..15: sign bit 3, exponent bits 2-1, mantissa
    bit 0) built from float32 bits in a few integer ops (no transcendental, no float math)."""
    magnitude = code & 7
    # magnitude m >= 2: exponent bits 2-1 and the mantissa bit land as float32 exponent + 126 and
    # mantissa bit 22, i.e. (1 + mantissa / 2) * 2^(exponent - 1); m = 0, 1 are 0 and 0.5 (2^-1)
    bits = tl.where(magnitude < 2, magnitude * (126 << 23), (magnitude << 22) + (126 << 23))
    bits = bits | ((code & 8) << 28)  # the sign bit
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_halves(w_base, scales_base, rows, row_ok, k0, stride_wr, stride_sr,
                  K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Returns the even and the odd columns [BLOCK_N, BLOCK_K / 2] (float32, zero where masked) of
    MXFP4 rows `rows`, columns k0.. (BLOCK_K a multiple of 32): the low and high nibbles of each
    byte times the E8M0 power of its 32-column group. The only place MXFP4 bytes are decoded."""
    half: tl.constexpr = BLOCK_K // 2
    groups: tl.constexpr = BLOCK_K // 32
    j = tl.arange(0, half)  # byte of this tile
    mask = row_ok[:, None] & (k0 + 2 * j < K)[None, :]
    byte = tl.load(w_base + rows[:, None] * stride_wr + (k0 // 2 + j)[None, :], mask=mask, other=0).to(tl.int32)
    gs = tl.arange(0, groups)  # the tile's 32-column groups: one scale each, loaded once
    scale = tl.load(scales_base + rows[:, None] * stride_sr + (k0 // 32 + gs)[None, :],
                    mask=row_ok[:, None] & (k0 + 32 * gs < K)[None, :], other=127)  # [BN, BK/32]
    power = tl.exp2(scale.to(tl.float32) - 127.0)
    power = tl.broadcast_to(power[:, :, None], (BLOCK_N, groups, 16)).reshape(BLOCK_N, half)  # [BN, BK/2]
    return _e2m1(byte & 15) * power, _e2m1(byte >> 4) * power


@triton.jit
def _weight_tile(w_base, scales_base, rows, row_ok, k0, stride_wr, stride_sr,
                 K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr,
                 WORD_TILES: tl.constexpr = False, BF16_TILES: tl.constexpr = False):
    """Returns the transposed tile [BLOCK_K, BLOCK_N] (tl.dot's right operand) of matrix rows `rows`,
    columns k0.. (zero where masked): MXFP4 decoded to float32 (bf16 with BF16_TILES: exact, as
    e2m1 * 2^k is), from bytes (`_mxfp4_halves`) or with WORD_TILES from int32 words
    (`_mxfp4_word_tile`); dense as stored."""
    if MXFP4:
        if WORD_TILES:
            tile = tl.trans(_mxfp4_word_tile(w_base, scales_base, rows, row_ok, k0, stride_wr, stride_sr, K, BLOCK_N,
                                             BLOCK_K))
        else:
            even, odd = _mxfp4_halves(w_base, scales_base, rows, row_ok, k0, stride_wr, stride_sr, K, BLOCK_N,
                                      BLOCK_K)
            tile = tl.trans(tl.join(even, odd).reshape(BLOCK_N, BLOCK_K))  # columns interleaved back
        if BF16_TILES:
            tile = tile.to(tl.bfloat16)
    else:  # loaded transposed (the Triton 3.9 interpreter mis-transposes bf16 tiles)
        ks = k0 + tl.arange(0, BLOCK_K)
        tile = tl.load(w_base + rows[None, :] * stride_wr + ks[:, None], mask=row_ok[None, :] & (ks < K)[:, None],
                       other=0.0)
    return tile


@triton.jit
def _row_products(x_row, w_base, scales_base, rows, row_ok, k0, stride_wr, stride_sr,
                  K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr):
    """Returns the products of rows `rows` with x_row over columns k0.., float32, for the caller to
    add up over K and reduce over columns once at the end (a reduction per step costs warp
    shuffles): [BLOCK_N, BLOCK_K / 2] for MXFP4 (even and odd columns of x met apart, nothing
    interleaved), [BLOCK_N, BLOCK_K] dense."""
    if MXFP4:
        even, odd = _mxfp4_halves(w_base, scales_base, rows, row_ok, k0, stride_wr, stride_sr, K, BLOCK_N, BLOCK_K)
        cols = k0 + 2 * tl.arange(0, BLOCK_K // 2)
        xe = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        xo = tl.load(x_row + cols + 1, mask=cols < K, other=0.0).to(tl.float32)
        out = even * xe[None, :] + odd * xo[None, :]
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
        tile = tl.load(w_base + rows[:, None] * stride_wr + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :],
                       other=0.0)
        out = tile.to(tl.float32) * xk[None, :]
    return out


@triton.jit
def _dot_tile(xt, tile, DOT_PRECISION: tl.constexpr, MXFP4: tl.constexpr, BF16_TILES: tl.constexpr = False):
    """Returns xt [BM, BK] @ tile [BK, BN] (a `_weight_tile`) as [BM, BN] float32. A decoded
    MXFP4 tile in float32 meets xt in float32: bf16 and fp16 inputs and every e2m1 value times a
    power of two are exact in tf32, so "tf32" loses nothing (and the interpreter mis-multiplies
    tiles cast to bf16 in the kernel). A bf16 MXFP4 tile (BF16_TILES: bf16 xt, on a GPU) and a
    dense tile meet xt in their shared dtype: half the tensor-core time of tf32, same bits."""
    if MXFP4 and not BF16_TILES:
        out = tl.dot(xt.to(tl.float32), tile, input_precision=DOT_PRECISION)
    else:
        out = tl.dot(xt, tile, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _clamped_swiglu(gate, up, alpha, limit):
    """Returns (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit) (biases added)."""
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    return (up + 1.0) * gate * tl.sigmoid(gate * alpha)


@triton.jit
def _expert_bases(w_ptr, scales_ptr, bias_ptr, w_off_ptr, s_off_ptr, b_off_ptr, e, stride_we, stride_se, stride_bias,
                  stride_off, OFFSETS: tl.constexpr):
    """Returns the first weight, scale and bias element of expert e: from the offsets table with
    OFFSETS, else e rows into each stack."""
    if OFFSETS:
        w_base = w_ptr + tl.load(w_off_ptr + e * stride_off)
        scales_base = scales_ptr + tl.load(s_off_ptr + e * stride_off)
        bias_base = bias_ptr + tl.load(b_off_ptr + e * stride_off)
    else:
        w_base = w_ptr + e * stride_we
        scales_base = scales_ptr + e * stride_se
        bias_base = bias_ptr + e * stride_bias
    return w_base, scales_base, bias_base


@triton.jit
def slot_gate_up_kernel(
    x_ptr, rows_ptr, w_ptr, scales_ptr, bias_ptr, w_off_ptr, s_off_ptr, b_off_ptr, out_ptr,
    FFN, alpha, limit,
    stride_xn, stride_we, stride_wr, stride_se, stride_sr, stride_bias, stride_os, stride_off,
    TOP_K: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr,
    OFFSETS: tl.constexpr,
):
    """out[s, n] = clamped SwiGLU of (x[s // A] . w[e_s, n] + b_n, x[s // A] . w[e_s, FFN + n] + b_(FFN+n)).

    Program (s, nb): rows nb*BLOCK_N.. of slot s's gate and up halves, x read once for both."""
    s = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(rows_ptr + s).to(tl.int64)
    x_row = x_ptr + (s // TOP_K) * stride_xn
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < FFN
    w_base, scales_base, bias_base = _expert_bases(w_ptr, scales_ptr, bias_ptr, w_off_ptr, s_off_ptr, b_off_ptr, e,
                                                   stride_we, stride_se, stride_bias, stride_off, OFFSETS)
    width: tl.constexpr = BLOCK_K // (1 + MXFP4)  # _row_products' columns
    acc_gate = tl.zeros((BLOCK_N, width), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, width), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc_gate += _row_products(x_row, w_base, scales_base, n, n_ok, k0, stride_wr, stride_sr, K, BLOCK_N, BLOCK_K,
                                  MXFP4)
        acc_up += _row_products(x_row, w_base, scales_base, n + FFN, n_ok, k0, stride_wr, stride_sr, K, BLOCK_N,
                                BLOCK_K, MXFP4)
    gate = tl.sum(acc_gate, axis=1)
    up = tl.sum(acc_up, axis=1)
    gate += tl.load(bias_base + n, mask=n_ok, other=0.0).to(tl.float32)
    up += tl.load(bias_base + FFN + n, mask=n_ok, other=0.0).to(tl.float32)
    h = _clamped_swiglu(gate, up, alpha, limit)
    tl.store(out_ptr + s * stride_os + n, h.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def slot_down_kernel(
    h_ptr, rows_ptr, weights_ptr, w_ptr, scales_ptr, bias_ptr, w_off_ptr, s_off_ptr, b_off_ptr, out_ptr,
    N,
    stride_hs, stride_we, stride_wr, stride_se, stride_sr, stride_bias, stride_os, stride_off,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MXFP4: tl.constexpr, OFFSETS: tl.constexpr,
):
    """out[s, n] = weights[s] * (h[s] . w[e_s, n] + bias_n): the routing weight is applied here."""
    s = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(rows_ptr + s).to(tl.int64)
    gate_weight = tl.load(weights_ptr + s).to(tl.float32)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w_base, scales_base, bias_base = _expert_bases(w_ptr, scales_ptr, bias_ptr, w_off_ptr, s_off_ptr, b_off_ptr, e,
                                                   stride_we, stride_se, stride_bias, stride_off, OFFSETS)
    width: tl.constexpr = BLOCK_K // (1 + MXFP4)
    products = tl.zeros((BLOCK_N, width), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        products += _row_products(h_ptr + s * stride_hs, w_base, scales_base, n, n_ok, k0, stride_wr, stride_sr, K,
                                  BLOCK_N, BLOCK_K, MXFP4)
    acc = tl.sum(products, axis=1)
    acc += tl.load(bias_base + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + s * stride_os + n, (acc * gate_weight).to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def grouped_gate_up_kernel(
    x_ptr, order_ptr, w_ptr, scales_ptr, bias_ptr, block_expert_ptr, block_start_ptr, block_end_ptr, out_ptr,
    FFN, NUM_EXPERTS, alpha, limit,
    stride_xn, stride_we, stride_wr, stride_se, stride_sr, stride_bias, stride_os,
    TOP_K: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MXFP4: tl.constexpr, DOT_PRECISION: tl.constexpr, WORD_TILES: tl.constexpr = False,
    BF16_TILES: tl.constexpr = False,
):
    """out[p_s, n] = clamped SwiGLU of the gate and up rows n, FFN + n of expert e_p (plus biases) on
    x[order[p_s] // A], for the sorted slots p_s of block p (each x row read in place, never gathered)."""
    p = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(block_expert_ptr + p)
    if e >= NUM_EXPERTS:  # an unused block (e == E): nothing to load or decode
        return
    e = e.to(tl.int64)
    sorted_slots = tl.load(block_start_ptr + p) + tl.arange(0, BLOCK_M)  # [BM]
    slot_ok = sorted_slots < tl.load(block_end_ptr + p)
    tokens = tl.load(order_ptr + sorted_slots, mask=slot_ok, other=0) // TOP_K  # [BM]
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < FFN
    w_base = w_ptr + e * stride_we
    scales_base = scales_ptr + e * stride_se
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + tokens[:, None] * stride_xn + ks[None, :], mask=slot_ok[:, None] & (ks < K)[None, :],
                     other=0.0)  # [BM, BK]
        wg = _weight_tile(w_base, scales_base, n, n_ok, k0, stride_wr, stride_sr, K, BLOCK_N, BLOCK_K, MXFP4,
                          WORD_TILES, BF16_TILES)
        wu = _weight_tile(w_base, scales_base, n + FFN, n_ok, k0, stride_wr, stride_sr, K, BLOCK_N, BLOCK_K, MXFP4,
                          WORD_TILES, BF16_TILES)
        acc_gate += _dot_tile(xt, wg, DOT_PRECISION, MXFP4, BF16_TILES)
        acc_up += _dot_tile(xt, wu, DOT_PRECISION, MXFP4, BF16_TILES)
    acc_gate += tl.load(bias_ptr + e * stride_bias + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc_up += tl.load(bias_ptr + e * stride_bias + FFN + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    h = _clamped_swiglu(acc_gate, acc_up, alpha, limit)
    tl.store(out_ptr + sorted_slots[:, None] * stride_os + n[None, :], h.to(out_ptr.dtype.element_ty),
             mask=slot_ok[:, None] & n_ok[None, :])


@triton.jit
def grouped_down_kernel(
    h_ptr, order_ptr, weights_ptr, w_ptr, scales_ptr, bias_ptr, block_expert_ptr, block_start_ptr, block_end_ptr,
    out_ptr,
    N, NUM_EXPERTS,
    stride_hs, stride_we, stride_wr, stride_se, stride_sr, stride_bias, stride_os,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MXFP4: tl.constexpr, DOT_PRECISION: tl.constexpr, WORD_TILES: tl.constexpr = False,
    BF16_TILES: tl.constexpr = False,
):
    """out[order[p_s], n] = weights[order[p_s]] * (h[p_s] . w[e_p, n] + bias_n) for the sorted slots
    p_s of block p: each slot's row lands at its routing-order row, so a token's A rows are adjacent."""
    p = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(block_expert_ptr + p)
    if e >= NUM_EXPERTS:  # an unused block
        return
    e = e.to(tl.int64)
    sorted_slots = tl.load(block_start_ptr + p) + tl.arange(0, BLOCK_M)
    slot_ok = sorted_slots < tl.load(block_end_ptr + p)
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w_base = w_ptr + e * stride_we
    scales_base = scales_ptr + e * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ht = tl.load(h_ptr + sorted_slots[:, None] * stride_hs + ks[None, :],
                     mask=slot_ok[:, None] & (ks < K)[None, :], other=0.0)  # [BM, BK]
        wt = _weight_tile(w_base, scales_base, n, n_ok, k0, stride_wr, stride_sr, K, BLOCK_N, BLOCK_K, MXFP4,
                          WORD_TILES, BF16_TILES)
        acc += _dot_tile(ht, wt, DOT_PRECISION, MXFP4, BF16_TILES)
    acc += tl.load(bias_ptr + e * stride_bias + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    slots = tl.load(order_ptr + sorted_slots, mask=slot_ok, other=0)  # [BM] routing-order rows
    gate_weight = tl.load(weights_ptr + slots, mask=slot_ok, other=0.0).to(tl.float32)
    y = acc * gate_weight[:, None]
    tl.store(out_ptr + slots[:, None] * stride_os + n[None, :], y.to(out_ptr.dtype.element_ty),
             mask=slot_ok[:, None] & n_ok[None, :])


# The per-slot MXFP4 kernels below read each row as int32 words (8 columns a word: byte b of word j
# holds columns 8j + 2b (low nibble) and 8j + 2b + 1) and decode nibble p of every word with two
# shifts and a mask (`_e2m1_word_nibble`): no byte unpacking, no table, no select, and the E8M0 power
# is applied once per word to that word's 8 products (`_word_power`), not per weight. Each x column
# is loaded once per program step and reused by every row a thread holds. Exactness: a nibble
# decodes to e2m1 * 2^-126 (code 1 on the float32 subnormal 2^-127; Triton's float32 math keeps
# subnormals: no .ftz), x is taken times 2^X_LOG2 and the power is 2^(s - 1 - X_LOG2), so every
# product is the exact e2m1 * x (rounded once, in the FMA) for scales s <= 228 (2^101) and
# |x| < 2^28; beyond those the products overflow or the power's bits wrap (gate_up's x is a
# normalised hidden state, down's h the clamped SwiGLU's, |h| <= (limit + 1) * limit).
X_LOG2: tl.constexpr = tl.constexpr(100)
X_SCALE: tl.constexpr = tl.constexpr(2.0 ** 100)
SIGN_AND_E2M1_BITS: tl.constexpr = tl.constexpr(-0x7E400000)  # 0x81C00000 as int32: bits 31, 24, 23, 22
TWO_POW_126: tl.constexpr = tl.constexpr(2.0 ** 126)


@triton.jit
def _e2m1_word_nibble(words, p: tl.constexpr):
    """Returns nibble p (bits 4p..4p + 3) of int32 `words` as float32 e2m1 * 2^-126: the sign bit to
    bit 31 (the arithmetic shift smears it over bits 30-25, masked off), exponent and mantissa bits
    to float bits 24-22, which makes 2^(e - 127) * (1 + m / 2), or m * 2^-127 for e = 0."""
    return (((words << (28 - 4 * p)) >> 6) & SIGN_AND_E2M1_BITS).to(tl.float32, bitcast=True)


@triton.jit
def _word_power(scale):
    """Returns 2^(s - 1 - X_LOG2) (float32 from its bits, s the uint8 E8M0 scale): what turns a word's
    sum of (e2m1 * 2^-126) * (x * 2^X_LOG2) products into e2m1 * 2^(s - 127) * x."""
    return ((scale.to(tl.int32) + (126 - X_LOG2)) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_word_tile(w_base, scales_base, rows, row_ok, k0, stride_wr, stride_sr,
                     K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Returns the MXFP4 tile [BLOCK_N, BLOCK_K] (float32, zero where masked) of rows `rows`, columns
    k0.. (BLOCK_K a multiple of 32), read as BLOCK_K / 8 int32 words a row: nibble plane p (column
    8j + p of word j) decoded by `_e2m1_word_nibble`, times 2^126 and the word's 2^(s - 127) (two
    exact multiplies: any scale), the 8 planes joined back into column order in registers."""
    words_per_row: tl.constexpr = K // 8
    j = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # [BW] words
    ok = row_ok[:, None] & (j < words_per_row)[None, :]
    words = tl.load(w_base.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_wr // 4) + j[None, :], mask=ok,
                    other=0)  # [BN, BW]
    scale = tl.load(scales_base + rows[:, None] * stride_sr + (j // 4)[None, :], mask=ok, other=127)
    power = (scale.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # 2^(s - 127), s in 1..254 (0 reads as 0)
    p0 = _e2m1_word_nibble(words, 0) * TWO_POW_126 * power
    p1 = _e2m1_word_nibble(words, 1) * TWO_POW_126 * power
    p2 = _e2m1_word_nibble(words, 2) * TWO_POW_126 * power
    p3 = _e2m1_word_nibble(words, 3) * TWO_POW_126 * power
    p4 = _e2m1_word_nibble(words, 4) * TWO_POW_126 * power
    p5 = _e2m1_word_nibble(words, 5) * TWO_POW_126 * power
    p6 = _e2m1_word_nibble(words, 6) * TWO_POW_126 * power
    p7 = _e2m1_word_nibble(words, 7) * TWO_POW_126 * power
    # join appends the new axis last: joining (p, p + 4), then (., . + 2), then (., . + 1) leaves
    # axes [.., 4's bit, 2's bit, 1's bit] = column 8j + p in order once flattened
    tile = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    return tile.reshape(BLOCK_N, BLOCK_K)


@triton.jit
def slot_gate_up_mxfp4_kernel(
    x_ptr, rows_ptr, w_ptr, scales_ptr, bias_ptr, w_off_ptr, s_off_ptr, b_off_ptr, out_ptr,
    FFN, alpha, limit,
    stride_xn, stride_we, stride_wr, stride_se, stride_sr, stride_bias, stride_os, stride_off,
    TOP_K: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, OFFSETS: tl.constexpr,
):
    """slot_gate_up_kernel for MXFP4 read as words (block comment above): program (s, nb) takes
    rows nb*BLOCK_N.. of slot s's gate and up halves, BLOCK_W words (8 * BLOCK_W columns) a step;
    each x column is loaded once a step for both halves. stride_wr: bytes (a multiple of 16)."""
    s = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(rows_ptr + s).to(tl.int64)
    x_row = x_ptr + (s // TOP_K) * stride_xn
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < FFN
    w_base, scales_base, bias_base = _expert_bases(w_ptr, scales_ptr, bias_ptr, w_off_ptr, s_off_ptr, b_off_ptr, e,
                                                   stride_we, stride_se, stride_bias, stride_off, OFFSETS)
    row_words = stride_wr // 4
    gate_rows = w_base.to(tl.pointer_type(tl.int32)) + n[:, None] * row_words  # [BN, 1]
    up_rows = gate_rows + FFN * row_words
    gate_scales = scales_base + n[:, None] * stride_sr
    up_scales = gate_scales + FFN * stride_sr
    words_per_row: tl.constexpr = K // 8
    acc_gate = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for w0 in range(0, words_per_row, BLOCK_W):
        j = w0 + tl.arange(0, BLOCK_W)  # [BW] words
        j_ok = j < words_per_row
        ok = n_ok[:, None] & j_ok[None, :]
        w_gate = tl.load(gate_rows + j[None, :], mask=ok, other=0)  # [BN, BW] int32
        w_up = tl.load(up_rows + j[None, :], mask=ok, other=0)
        sum_gate = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        sum_up = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        for p in tl.static_range(8):
            xp = tl.load(x_row + 8 * j + p, mask=j_ok, other=0.0).to(tl.float32) * X_SCALE  # [BW] column 8j + p
            sum_gate += _e2m1_word_nibble(w_gate, p) * xp[None, :]
            sum_up += _e2m1_word_nibble(w_up, p) * xp[None, :]
        acc_gate += sum_gate * _word_power(tl.load(gate_scales + (j // 4)[None, :], mask=ok, other=0))
        acc_up += sum_up * _word_power(tl.load(up_scales + (j // 4)[None, :], mask=ok, other=0))
    gate = tl.sum(acc_gate, axis=1) + tl.load(bias_base + n, mask=n_ok, other=0.0).to(tl.float32)
    up = tl.sum(acc_up, axis=1) + tl.load(bias_base + FFN + n, mask=n_ok, other=0.0).to(tl.float32)
    h = _clamped_swiglu(gate, up, alpha, limit)
    tl.store(out_ptr + s * stride_os + n, h.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def slot_down_sum_mxfp4_kernel(
    h_ptr, rows_ptr, weights_ptr, w_ptr, scales_ptr, bias_ptr, w_off_ptr, s_off_ptr, b_off_ptr, out_ptr,
    N,
    stride_hs, stride_we, stride_wr, stride_se, stride_sr, stride_bias, stride_on, stride_off,
    TOP_K: tl.constexpr, TOP_K_P2: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    OFFSETS: tl.constexpr,
):
    """out[t, n] = sum_a weights[s] * (h[s] . w[e_s, n] + bias_n), s = t*A + a: slot_down_kernel for
    MXFP4 read as words, with the top-k sum fused (out is [N_tokens, D], no [S, D] buffer, no torch
    reduce). Program (t, nb) takes rows nb*BLOCK_N.. of all A slots of token t in one K loop
    ([A, BLOCK_N, BLOCK_W] tiles: A experts' bytes in flight at once), adds the A rows weighted in
    float32 and rounds once."""
    t = tl.program_id(0)
    nb = tl.program_id(1)
    a = tl.arange(0, TOP_K_P2)  # TOP_K_P2: TOP_K rounded up to a power of two
    a_ok = a < TOP_K
    slots = t * TOP_K + a  # [A]
    e = tl.load(rows_ptr + slots, mask=a_ok, other=0).to(tl.int64)
    gate_weight = tl.load(weights_ptr + slots, mask=a_ok, other=0.0).to(tl.float32)  # [A]
    n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    w_base, scales_base, bias_base = _expert_bases(w_ptr, scales_ptr, bias_ptr, w_off_ptr, s_off_ptr, b_off_ptr, e,
                                                   stride_we, stride_se, stride_bias, stride_off, OFFSETS)  # [A]
    w_rows = w_base.to(tl.pointer_type(tl.int32))[:, None, None] + n[None, :, None] * (stride_wr // 4)  # [A, BN, 1]
    s_rows = scales_base[:, None, None] + n[None, :, None] * stride_sr
    h_rows = h_ptr + slots[:, None] * stride_hs  # [A, 1]
    row_ok = a_ok[:, None, None] & n_ok[None, :, None]
    words_per_row: tl.constexpr = K // 8
    acc = tl.zeros((TOP_K_P2, BLOCK_N, BLOCK_W), dtype=tl.float32)
    for w0 in range(0, words_per_row, BLOCK_W):
        j = w0 + tl.arange(0, BLOCK_W)
        j_ok = j < words_per_row
        ok = row_ok & j_ok[None, None, :]
        w = tl.load(w_rows + j[None, None, :], mask=ok, other=0)  # [A, BN, BW] int32
        sums = tl.zeros((TOP_K_P2, BLOCK_N, BLOCK_W), dtype=tl.float32)
        for p in tl.static_range(8):
            hp = tl.load(h_rows + 8 * j[None, :] + p, mask=a_ok[:, None] & j_ok[None, :], other=0.0)  # [A, BW]
            sums += _e2m1_word_nibble(w, p) * (hp.to(tl.float32) * X_SCALE)[:, None, :]
        acc += sums * _word_power(tl.load(s_rows + (j // 4)[None, None, :], mask=ok, other=0))
    y = tl.sum(acc, axis=2)  # [A, BN]
    y += tl.load(bias_base[:, None] + n[None, :], mask=a_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    out = tl.sum(y * gate_weight[:, None], axis=0)  # [BN]
    tl.store(out_ptr + t * stride_on + n, out.to(out_ptr.dtype.element_ty), mask=n_ok)
