"""Grouped expert matmuls for routed tokens sorted by expert (one launch for all experts).

Tensors (S = routed slots sorted by expert, E = experts, D = hidden, I = expert ffn width,
P = row blocks, an upper bound fixed by S, so launches have static shapes):
    x            [S, K]      activations of the sorted slots (K = D for gate_up, I for down)
    block_expert [P]         int32; expert of row block p, or E when p is unused
    block_start  [P]         int32; first sorted slot of block p
    block_end    [P]         int32; one past the last slot that block p may touch (its expert's end)
    w            [E, N, K]   stacked expert weights, read in place (never gathered or copied)
    out          [S, N_out]  N_out = I for the fused gate_up + SwiGLU kernel, D for down

Program (p, nb) multiplies block p's slots (at most BLOCK_M, all of one expert) by rows
nb*BLOCK_N.. of that expert's weights. Unused blocks mask every load, so they move no bytes.
(Masks are plain comparisons: the Triton 3.9 interpreter rejects a bool tensor combined with
a loaded scalar.)
No control flow depends on loaded values: the same code runs in a CUDA graph and under
TRITON_INTERPRET=1. Accumulation is float32; float32 inputs multiply in full float32.
"""

import triton
import triton.language as tl


@triton.jit
def gate_up_swiglu_kernel(
    x_ptr, w_ptr, block_expert_ptr, block_start_ptr, block_end_ptr, out_ptr,
    FFN, NUM_EXPERTS,  # I, E
    stride_xs, stride_we, stride_wn, stride_os,
    K: tl.constexpr,  # reduction length (D or I): a compile-time constant (the interpreter needs constant loop bounds)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no silent tf32), "tf32" otherwise
):
    """out[s, n] = silu(x[s] . w[e, n]) * (x[s] . w[e, FFN + n]) for the slots s of block p."""
    p = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(block_expert_ptr + p)
    # an unused block (e == E) has start == end == 0 and a column limit of 0: every load masked
    col_limit = tl.where(e < NUM_EXPERTS, FFN, 0)
    e = tl.minimum(e, NUM_EXPERTS - 1)  # keep pointers in bounds
    rows = tl.load(block_start_ptr + p) + tl.arange(0, BLOCK_M)  # [BM] sorted slots
    row_ok = rows < tl.load(block_end_ptr + p)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] ffn rows of w
    col_ok = cols < col_limit
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xs + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)  # [BK, BN]
        wu = tl.load(w_base + (cols[None, :] + FFN) * stride_wn + ks[:, None], mask=w_mask, other=0.0)
        acc_gate += tl.dot(xt, wg, input_precision=DOT_PRECISION)
        acc_up += tl.dot(xt, wu, input_precision=DOT_PRECISION)
    h = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(out_ptr + rows[:, None] * stride_os + cols[None, :], h.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down_kernel(
    x_ptr, w_ptr, block_expert_ptr, block_start_ptr, block_end_ptr, out_ptr,
    N, NUM_EXPERTS,  # D, E
    stride_xs, stride_we, stride_wn, stride_os,
    K: tl.constexpr,  # reduction length (D or I): a compile-time constant (the interpreter needs constant loop bounds)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no silent tf32), "tf32" otherwise
):
    """out[s, n] = x[s] . w[e, n] for the slots s of block p."""
    p = tl.program_id(0)
    nb = tl.program_id(1)
    e = tl.load(block_expert_ptr + p)
    col_limit = tl.where(e < NUM_EXPERTS, N, 0)  # unused block: every load masked
    e = tl.minimum(e, NUM_EXPERTS - 1)
    rows = tl.load(block_start_ptr + p) + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(block_end_ptr + p)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < col_limit
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xs + ks[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_base + cols[None, :] * stride_wn + ks[:, None],
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(xt, wt, input_precision=DOT_PRECISION)
    tl.store(out_ptr + rows[:, None] * stride_os + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
