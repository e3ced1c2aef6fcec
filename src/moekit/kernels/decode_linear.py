"""Decode matvec: y = x @ W^T (+ bias) for a few rows of x, streaming W once at the HBM bound.

Tensors (M = rows of x, 1..4, int8 weights 1..8; N = output features; K = input features; S = SPLIT_K):
    x     [M, K]      bf16 / fp16 activations (row stride stride_xm, columns contiguous)
    w     [N, K]      the Linear's weight, row-major (row stride stride_wn, columns contiguous): x's
                      dtype, or int8 codes with a float32 scale per row (HAS_SCALE: w[n] = scale[n] * codes[n])
    scale [N]         float32, the int8 rows' scales (HAS_SCALE)
    bias  [N]         optional (HAS_BIAS)
    y     [M, N]      the output, x's dtype (row stride stride_ym)
    part  [S, M, N]   float32 partial sums of the split-K kernel, contiguous

Program (nb, s) reads rows nb*BLOCK_N.. of w over columns s*CHUNK .. (s+1)*CHUNK (CHUNK = K / S)
and multiplies them with every row of x in float32: the weights are read once, whatever M.
With S = 1 it adds the bias and stores y; otherwise it stores its float32 partial, and
decode_linear_reduce_kernel sums the S partials in order s = 0..S-1 (no atomics: the result does
not depend on which program finishes first), adds the bias and stores y. Split-K is for small N
over large K (a router's [64, 2048]: N / BLOCK_N programs alone leave most SMs idle).

A CHUNK of at most BLOCK_K columns is one step, masked past CHUNK (all its loads in flight at once).
A longer CHUNK loops over BLOCK_K columns a step, unmasked; CHUNK % BLOCK_K takes one unmasked step
per set bit down to 16 columns (each waits on the last one's reduction), and CHUNK % 16 one masked
step (as moekit.kernels.moe_slots); which BLOCK_K is faster is the probe's to say. STAGES > 1
pipelines the BLOCK_K loop (cp.async into shared memory, STAGES - 1 steps' loads ahead of the
reduction): more bytes in flight for a program with many steps, at the cost of shared memory
(fewer programs an SM); STAGES = 1 loads each step in registers after the last one's reduction.
An int8 row's scale multiplies its float32 sum once, after the column loop (and before the bias;
with SPLIT_K > 1 each partial is scaled, so their sum is too). Rows past N re-read the last row (loads need no row mask); the accumulator's rows past M (M is padded
to the power of two M_PAD) stay zero and are not stored.
"""

import triton
import triton.language as tl


@triton.jit
def _step(acc, x_ptr, w_rows, k0, stride_xm, CHUNK: tl.constexpr, M: tl.constexpr, WIDTH: tl.constexpr,
          MASKED: tl.constexpr):
    """Returns acc [M_PAD, BN] plus w[rows, k0:k0+WIDTH] . x[m, k0:k0+WIDTH] for each m < M
    (w_rows [BN] pointers to the rows' column 0; k0 and the mask relative to the chunk's start)."""
    ks = k0 + tl.arange(0, WIDTH)  # [W], columns of the chunk (x_ptr and w_rows start there)
    if MASKED:
        k_ok = ks < CHUNK
        w = tl.load(w_rows[:, None] + ks[None, :], mask=k_ok[None, :], other=0.0).to(tl.float32)  # [BN, W]
    else:
        w = tl.load(w_rows[:, None] + ks[None, :]).to(tl.float32)
    m_idx = tl.arange(0, acc.shape[0])[:, None]  # [M_PAD, 1]
    for m in tl.static_range(M):
        if MASKED:
            xm = tl.load(x_ptr + m * stride_xm + ks, mask=k_ok, other=0.0).to(tl.float32)  # [W]
        else:
            xm = tl.load(x_ptr + m * stride_xm + ks).to(tl.float32)
        part = tl.sum(w * xm[None, :], axis=1)  # [BN]
        acc = tl.where(m_idx == m, acc + part[None, :], acc)
    return acc


@triton.jit
def decode_linear_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, part_ptr,
    N,
    stride_xm, stride_wn, stride_ym,
    M: tl.constexpr, M_PAD: tl.constexpr, CHUNK: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    """SPLIT_K = 1: y[m, n] = x[m] . w[n] (* scale[n]) (+ bias[n]); else part[s, m, n] = the same over
    chunk s, without the bias."""
    nb = tl.program_id(0)
    s = tl.program_id(1)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rows = tl.minimum(cols, N - 1)
    k_start = s * CHUNK
    x_chunk = x_ptr + k_start
    w_rows = w_ptr + rows.to(tl.int64) * stride_wn + k_start  # [BN]
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    if CHUNK <= BLOCK_K:  # one step, masked past CHUNK: all its loads go out before any wait
        acc = _step(acc, x_chunk, w_rows, 0, stride_xm, CHUNK, M, BLOCK_K, CHUNK < BLOCK_K)
    else:
        MIN_K: tl.constexpr = 16  # narrowest unmasked tail step; BLOCK_K is a power of two in 16..2048
        TAIL: tl.constexpr = CHUNK % BLOCK_K
        for k0 in tl.range(0, CHUNK - TAIL, BLOCK_K, num_stages=STAGES):
            acc = _step(acc, x_chunk, w_rows, k0, stride_xm, CHUNK, M, BLOCK_K, False)
        # the tail's set bits, widest first (BLOCK_K / 2 .. 16); widths written out, not named: a
        # name assigned in a static loop becomes a tensor
        for i in tl.static_range(7):
            if (BLOCK_K >> (i + 1)) >= MIN_K and (TAIL & (BLOCK_K >> (i + 1))) != 0:
                acc = _step(acc, x_chunk, w_rows, CHUNK - TAIL % (BLOCK_K >> i), stride_xm, CHUNK, M,
                            BLOCK_K >> (i + 1), False)
        REST: tl.constexpr = TAIL % MIN_K
        if REST != 0:
            acc = _step(acc, x_chunk, w_rows, CHUNK - REST, stride_xm, CHUNK, M, MIN_K, True)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + rows)[None, :]
    m_idx = tl.arange(0, M_PAD)[:, None]  # [M_PAD, 1]
    keep = (m_idx < M) & (cols < N)[None, :]  # [M_PAD, BN]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows).to(tl.float32)[None, :]
        tl.store(y_ptr + m_idx * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=keep)
    else:
        tl.store(part_ptr + (s * M + m_idx) * N + cols[None, :], acc, mask=keep)


@triton.jit
def decode_linear_reduce_kernel(
    part_ptr, bias_ptr, y_ptr,
    N,
    stride_ym,
    M: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """y[m, n] = sum_s part[s, m, n] (s = 0..SPLIT_K-1 in order, float32) (+ bias[n])."""
    nb = tl.program_id(0)
    m = tl.program_id(1)
    cols = nb * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + m) * N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=ok)
