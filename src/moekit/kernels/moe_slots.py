"""Per-slot expert matvecs for decode: a few routed slots, each read straight from the routing.

Tensors (N = tokens, A = experts per token, S = N*A slots in routing order, E = experts,
D = hidden, I = expert ffn width, P = matrices a K step reads at once):
    x          [N, D]       token activations (gate_up)
    h          [S, I]       slot activations silu(gate) * up (down)
    expert_ids [S]          int64 (the router's [N, A] output, flattened)
    weights    [S]          routing weights (down)
    w          [E, Nw, K]   stacked expert weights, read in place (K = D for gate_up, I for down)
    out        gate_up: [S, I], one row per slot; down: [N, D], each token's top-k sum

Program (s, nb) of gate_up computes rows nb*BLOCK_N.. of slot s (its gate and up rows read in one
step). Program (n, nb) of down takes token n's A slots SLOTS_PER_STEP at a time (each step reads
that many experts' rows at once: bytes in flight, since a program only has 1/A of the old grid's
rows) and adds their weighted rows to one float32 sum in slot order a = 0..A-1, then stores it
once: the result does not depend on the tiling's order of slots. No sorting, no block map: the
right choice when slots are few (batch-1 decode), since each slot streams its expert's rows once.

K up to BLOCK_K is one step, masked past K (one round trip to memory; K = 1408 at BLOCK_K = 2048
leaves 31% of the lanes idle). A longer K loops over BLOCK_K columns a step, unmasked; the K % BLOCK_K
columns left take one unmasked step per set bit, down to 16 columns, and the last K % 16 one masked
step (K = 1408 at BLOCK_K = 1024: 1024 + 256 + 128, not a second 1024-step 62% idle, but three
steps whose reductions wait in turn). Which is faster is the tuner's to say.

With OFFSETS, expert e's weights start at w_ptr + offsets[e * stride_off] (int64, elements) instead
of w_ptr + e * stride_we: the offset table may point into a cache slab or, through unified
addressing, into page-locked host memory (an expert read over PCIe in place; offload.mapped).
With SKIP as well, an expert whose offset is -1 is not read at all: its slots add nothing (the CPU
computes them: offload.partner). Exactly -1, not any negative offset: a host row may lie below the
slab in the address space (a negative offset, read in place by the partner's row split), but no
expert's row can start one element before the slab it is measured from (they would overlap).
"""

import triton
import triton.language as tl


@triton.jit
def _step(v_rows, w_rows, rows, stride_wn, k0, K: tl.constexpr, WIDTH: tl.constexpr, MASKED: tl.constexpr,
          live, SKIP: tl.constexpr):
    """Returns w_rows[p][rows, k0:k0+WIDTH] . v_rows[p][k0:k0+WIDTH] as [P, BN] float32
    (v_rows, w_rows: [P] pointers to vectors and matrices; rows [BN]); with SKIP, matrices p whose
    live[p] is false are not read (their products are 0)."""
    ks = k0 + tl.arange(0, WIDTH)  # [W]
    w_ptrs = w_rows[:, None, None] + (rows[:, None] * stride_wn + ks[None, :])[None, :, :]  # [P, BN, W]
    if MASKED:
        k_ok = ks < K
        v = tl.load(v_rows[:, None] + ks[None, :], mask=k_ok[None, :], other=0.0)  # [P, W]
        if SKIP:
            w = tl.load(w_ptrs, mask=k_ok[None, None, :] & live[:, None, None], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=k_ok[None, None, :], other=0.0)
    else:
        v = tl.load(v_rows[:, None] + ks[None, :])
        if SKIP:
            w = tl.load(w_ptrs, mask=live[:, None, None], other=0.0)
        else:
            w = tl.load(w_ptrs)
    return tl.sum(w.to(tl.float32) * v.to(tl.float32)[:, None, :], axis=2)


@triton.jit
def _matvec(v_rows, w_rows, rows, stride_wn, K: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, live=None, SKIP: tl.constexpr = False):
    """Returns w_rows[p][rows, :K] . v_rows[p][:K] as [P, BLOCK_N] float32 (SKIP: 0 where not live[p])."""
    acc = tl.zeros((P, BLOCK_N), dtype=tl.float32)
    if K <= BLOCK_K:  # one step, masked past K: all its loads go out before any wait
        acc += _step(v_rows, w_rows, rows, stride_wn, 0, K, BLOCK_K, K < BLOCK_K, live, SKIP)
    else:
        MIN_K: tl.constexpr = 16  # narrowest unmasked tail step; BLOCK_K is a power of two in 16..2048
        TAIL: tl.constexpr = K % BLOCK_K
        for k0 in range(0, K - TAIL, BLOCK_K):
            acc += _step(v_rows, w_rows, rows, stride_wn, k0, K, BLOCK_K, False, live, SKIP)
        # the tail's set bits, widest first: BLOCK_K / 2 .. MIN_K (2048 / 2^7 = 16); the width is
        # written out, not named: a name assigned in the loop would be a tensor, a constexpr one final
        for i in tl.static_range(7):
            if (BLOCK_K >> (i + 1)) >= MIN_K and (TAIL & (BLOCK_K >> (i + 1))) != 0:
                acc += _step(v_rows, w_rows, rows, stride_wn, K - TAIL % (BLOCK_K >> i), K, BLOCK_K >> (i + 1),
                             False, live, SKIP)
        REST: tl.constexpr = TAIL % MIN_K
        if REST != 0:
            acc += _step(v_rows, w_rows, rows, stride_wn, K - REST, K, MIN_K, True, live, SKIP)
    return acc


@triton.jit
def _row(t, p):
    """Returns row p of t [P, BN] as [BN] (exactly: the other rows add zeros)."""
    return tl.sum(tl.where((tl.arange(0, t.shape[0]) == p)[:, None], t, 0.0), axis=0)


@triton.jit
def slot_gate_up_swiglu_kernel(
    x_ptr, expert_ids_ptr, w_ptr, off_ptr, out_ptr,
    FFN, UP,
    stride_xn, stride_we, stride_wn, stride_os, stride_off,
    TOP_K: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    OFFSETS: tl.constexpr, SKIP: tl.constexpr = False,
):
    """out[s, n] = silu(x[s // A] . w[e_s, n]) * (x[s // A] . w[e_s, n] UP elements on) for the FFN rows
    n computed (UP = the expert's ffn width x stride_wn: a slice of its rows starts at w_ptr). With
    SKIP (OFFSETS only) an offset of -1 means the expert is computed elsewhere: its row is 0."""
    s = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(expert_ids_ptr + s).to(tl.int64)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rows = tl.minimum(cols, FFN - 1)  # rows past FFN re-read the last one: loads need no row mask
    half = tl.arange(0, 2)  # 0: gate rows, 1: up rows, one x
    live = half >= 0
    if OFFSETS:
        off = tl.load(off_ptr + e * stride_off)
        if SKIP:
            live = (half * 0 + off) != -1
            off = tl.where(off == -1, 0, off)
        w_base = w_ptr + off
    else:
        w_base = w_ptr + e * stride_we
    acc = _matvec(x_ptr + (s // TOP_K) * stride_xn + half * 0, w_base + half * UP, rows, stride_wn,
                  K, 2, BLOCK_N, BLOCK_K, live, SKIP)  # [2, BN]
    gate = _row(acc, 0)
    h = gate * tl.sigmoid(gate) * _row(acc, 1)
    tl.store(out_ptr + s * stride_os + cols, h.to(out_ptr.dtype.element_ty), mask=cols < FFN)


@triton.jit
def slot_down_kernel(
    h_ptr, expert_ids_ptr, weights_ptr, w_ptr, off_ptr, out_ptr,
    N,
    stride_hs, stride_we, stride_wn, stride_on, stride_off,
    TOP_K: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SLOTS_PER_STEP: tl.constexpr, OFFSETS: tl.constexpr, SKIP: tl.constexpr = False,
):
    """out[t, n] = sum_a weights[s] * (h[s] . w[e_s, n]) over token t's slots s = t*A + a, added in
    float32 in the order a = 0..A-1: the routing weights and the top-k sum are applied here. With
    SKIP (OFFSETS only) slots whose expert's offset is -1 are left out (computed elsewhere)."""
    t = tl.program_id(0)
    nb = tl.program_id(1)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    rows = tl.minimum(cols, N - 1)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for a0 in tl.static_range(0, TOP_K, SLOTS_PER_STEP):
        # slots past A re-read the last one (cached) and are not added
        s = t * TOP_K + tl.minimum(a0 + tl.arange(0, SLOTS_PER_STEP), TOP_K - 1)  # [G]
        e = tl.load(expert_ids_ptr + s).to(tl.int64)
        gate_weight = tl.load(weights_ptr + s).to(tl.float32)  # [G] loaded first: the reduction waits on it
        live = s >= 0
        if OFFSETS:
            off = tl.load(off_ptr + e * stride_off)
            if SKIP:
                live = off != -1
                off = tl.where(off == -1, 0, off)
            w_rows = w_ptr + off
        else:
            w_rows = w_ptr + e * stride_we
        part = _matvec(h_ptr + s * stride_hs, w_rows, rows, stride_wn, K, SLOTS_PER_STEP, BLOCK_N, BLOCK_K,
                       live, SKIP)
        part = part * gate_weight[:, None]  # [G, BN]
        for j in tl.static_range(SLOTS_PER_STEP):
            if a0 + j < TOP_K:
                acc += _row(part, j)
    tl.store(out_ptr + t * stride_on + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)
