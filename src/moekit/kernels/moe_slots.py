"""Per-slot expert matvecs for decode: a few routed slots, each read straight from the routing.

Tensors (N = tokens, A = experts per token, S = N*A slots in routing order, E = experts,
D = hidden, I = expert ffn width):
    x          [N, K]       token activations (K = D for gate_up) or [S, K] slot activations (down)
    expert_ids [S]          int64 (the router's [N, A] output, flattened)
    w          [E, Nw, K]   stacked expert weights, read in place
    out        [S, N_out]   N_out = I for the fused gate_up + SwiGLU kernel, D for down

Program (s, nb) computes rows nb*BLOCK_N.. of slot s. No sorting, no block map: the right
choice when slots are few (batch-1 decode), since each slot streams its expert's rows once.

With OFFSETS, expert e's weights start at w_ptr + offsets[e * stride_off] (int64, elements) instead
of w_ptr + e * stride_we: the offset table may point into a cache slab or, through unified
addressing, into page-locked host memory (an expert read over PCIe in place; offload.mapped).
"""

import triton
import triton.language as tl


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
    x_row = x_ptr + (s // TOP_K) * stride_xn
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = cols < FFN
    if OFFSETS:
        w_base = w_ptr + tl.load(off_ptr + e * stride_off)
    else:
        w_base = w_ptr + e * stride_we
    acc_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xk = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)  # [BK]
        mask = col_ok[:, None] & k_ok[None, :]
        wg = tl.load(w_base + cols[:, None] * stride_wn + ks[None, :], mask=mask, other=0.0)  # [BN, BK]
        wu = tl.load(w_base + (cols[:, None] + FFN) * stride_wn + ks[None, :], mask=mask, other=0.0)
        acc_gate += tl.sum(wg.to(tl.float32) * xk[None, :], axis=1)
        acc_up += tl.sum(wu.to(tl.float32) * xk[None, :], axis=1)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(out_ptr + s * stride_os + cols, h.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def slot_down_kernel(
    h_ptr, expert_ids_ptr, weights_ptr, w_ptr, off_ptr, out_ptr,
    N,
    stride_hs, stride_we, stride_wn, stride_os, stride_off,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OFFSETS: tl.constexpr,
):
    """out[s, n] = weights[s] * (h[s] . w[e_s, n]): the routing weight is applied here."""
    s = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(expert_ids_ptr + s).to(tl.int64)
    gate_weight = tl.load(weights_ptr + s).to(tl.float32)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if OFFSETS:
        w_base = w_ptr + tl.load(off_ptr + e * stride_off)
    else:
        w_base = w_ptr + e * stride_we
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        hk = tl.load(h_ptr + s * stride_hs + ks, mask=k_ok, other=0.0).to(tl.float32)
        wt = tl.load(w_base + cols[:, None] * stride_wn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(wt.to(tl.float32) * hk[None, :], axis=1)
    tl.store(out_ptr + s * stride_os + cols, (acc * gate_weight).to(out_ptr.dtype.element_ty), mask=col_ok)
