"""Per-slot expert matvecs for decode: a few routed slots, each read straight from the routing.

Tensors (N = tokens, A = experts per token, S = N*A slots in routing order, E = experts,
D = hidden, I = expert ffn width):
    x          [N, D]       token activations (gate_up)
    h          [S, I]       slot activations silu(gate) * up (down)
    expert_ids [S]          int64 (the router's [N, A] output, flattened)
    weights    [S]          routing weights (down)
    w          [E, Nw, K]   stacked expert weights, read in place (K = D for gate_up, I for down)
    out        [S, I]       gate_up: one row per slot; down: [N, D], the top-k sum, one row per token

Program (s, nb) of gate_up computes rows nb*BLOCK_N.. of slot s; program (n, nb) of down loops
over token n's A slots in order and stores their weighted sum once (float32 accumulation, so the
result does not depend on the launch). No sorting, no block map: the right choice when slots are
few (batch-1 decode), since each slot streams its expert's rows once.

The K loop reads BLOCK_K columns a step, unmasked; the K % BLOCK_K columns left take one unmasked
step per set bit, down to 16 columns, and the last K % 16 one masked step (K = 1408 at BLOCK_K = 1024:
1024 + 256 + 128, where a masked second 1024-step would leave 31% of its lanes idle).

With OFFSETS, expert e's weights start at w_ptr + offsets[e * stride_off] (int64, elements) instead
of w_ptr + e * stride_we: the offset table may point into a cache slab or, through unified
addressing, into page-locked host memory (an expert read over PCIe in place; offload.mapped).
"""

import triton
import triton.language as tl


@triton.jit
def _step(v_ptr, w_first, w_second, rows, stride_wn, k0, K: tl.constexpr, WIDTH: tl.constexpr,
          MASKED: tl.constexpr, PAIR: tl.constexpr):
    """Returns (w_first[rows, k0:k0+WIDTH] . v[k0:k0+WIDTH], the same of w_second or 0) as two [BN] float32."""
    ks = k0 + tl.arange(0, WIDTH)  # [W]
    offs = rows[:, None] * stride_wn + ks[None, :]  # [BN, W]
    if MASKED:
        k_ok = ks < K
        v = tl.load(v_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        wa = tl.load(w_first + offs, mask=k_ok[None, :], other=0.0)
    else:
        v = tl.load(v_ptr + ks).to(tl.float32)
        wa = tl.load(w_first + offs)
    first = tl.sum(wa.to(tl.float32) * v[None, :], axis=1)
    second = tl.zeros_like(first)
    if PAIR:
        if MASKED:
            wb = tl.load(w_second + offs, mask=k_ok[None, :], other=0.0)
        else:
            wb = tl.load(w_second + offs)
        second = tl.sum(wb.to(tl.float32) * v[None, :], axis=1)
    return first, second


@triton.jit
def _matvec(v_ptr, w_first, w_second, rows, stride_wn, K: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, PAIR: tl.constexpr):
    """Returns (w_first[rows, :K] . v[:K], the same of w_second or 0) as two [BLOCK_N] float32."""
    acc_first = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_second = tl.zeros((BLOCK_N,), dtype=tl.float32)
    MIN_K: tl.constexpr = 16  # narrowest unmasked tail step; BLOCK_K is a power of two in 16..2048
    TAIL: tl.constexpr = K % BLOCK_K
    for k0 in range(0, K - TAIL, BLOCK_K):
        a, b = _step(v_ptr, w_first, w_second, rows, stride_wn, k0, K, BLOCK_K, False, PAIR)
        acc_first += a
        acc_second += b
    # the tail's set bits, widest first: BLOCK_K / 2 .. MIN_K (2048 / 2^7 = 16); the width is written
    # out, not named, since a name assigned in the loop would be a tensor, and a constexpr name final
    for i in tl.static_range(7):
        if (BLOCK_K >> (i + 1)) >= MIN_K and (TAIL & (BLOCK_K >> (i + 1))) != 0:
            a, b = _step(v_ptr, w_first, w_second, rows, stride_wn, K - TAIL % (BLOCK_K >> i), K, BLOCK_K >> (i + 1),
                         False, PAIR)
            acc_first += a
            acc_second += b
    REST: tl.constexpr = TAIL % MIN_K
    if REST != 0:
        a, b = _step(v_ptr, w_first, w_second, rows, stride_wn, K - REST, K, MIN_K, True, PAIR)
        acc_first += a
        acc_second += b
    return acc_first, acc_second


@triton.jit
def slot_gate_up_swiglu_kernel(
    x_ptr, expert_ids_ptr, w_ptr, off_ptr, out_ptr,
    FFN,
    stride_xn, stride_we, stride_wn, stride_os, stride_off,
    TOP_K: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    OFFSETS: tl.constexpr,
):
    """out[s, n] = silu(x[s // A] . w[e_s, n]) * (x[s // A] . w[e_s, FFN + n])."""
    s = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(expert_ids_ptr + s).to(tl.int64)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rows = tl.minimum(cols, FFN - 1)  # rows past FFN re-read the last one: loads need no row mask
    if OFFSETS:
        w_base = w_ptr + tl.load(off_ptr + e * stride_off)
    else:
        w_base = w_ptr + e * stride_we
    gate, up = _matvec(x_ptr + (s // TOP_K) * stride_xn, w_base, w_base + FFN * stride_wn, rows, stride_wn,
                       K, BLOCK_N, BLOCK_K, True)
    h = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + s * stride_os + cols, h.to(out_ptr.dtype.element_ty), mask=cols < FFN)


@triton.jit
def slot_down_kernel(
    h_ptr, expert_ids_ptr, weights_ptr, w_ptr, off_ptr, out_ptr,
    N,
    stride_hs, stride_we, stride_wn, stride_on, stride_off,
    TOP_K: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    OFFSETS: tl.constexpr,
):
    """out[t, n] = sum_a weights[s] * (h[s] . w[e_s, n]) over token t's slots s = t*A + a, a = 0..A-1
    in that order, in float32: the routing weights and the top-k sum are applied here."""
    t = tl.program_id(0)
    nb = tl.program_id(1)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rows = tl.minimum(cols, N - 1)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for a in tl.static_range(TOP_K):  # unrolled: the slots' loads need not wait on each other
        s = t * TOP_K + a
        e = tl.load(expert_ids_ptr + s).to(tl.int64)
        gate_weight = tl.load(weights_ptr + s).to(tl.float32)
        if OFFSETS:
            w_base = w_ptr + tl.load(off_ptr + e * stride_off)
        else:
            w_base = w_ptr + e * stride_we
        part, _ = _matvec(h_ptr + s * stride_hs, w_base, w_base, rows, stride_wn, K, BLOCK_N, BLOCK_K, False)
        acc += gate_weight * part
    tl.store(out_ptr + t * stride_on + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)
