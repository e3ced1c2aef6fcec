"""Decode attention read through a paged KV cache's block tables (one new token per sequence).

Tensors (B = sequences, H = query heads, Hkv = key/value heads, G = H / Hkv query heads per kv
head, Dh = head dim, NB = cache blocks, BS = positions per block, MB = blocks per table):
    q             [B, H, Dh]        the new token's queries (rope applied)
    keys, values  [NB, BS, Hkv, Dh] one layer's block pool
    block_tables  [B, MB]           int32 block ids of each sequence, in position order
    context_lens  [B]               int32 positions each sequence attends to (its token included)
    out           [B, H, Dh]

Program (b, kvh) reads sequence b's blocks of kv head kvh once for all G query heads that share
it (GQA), with an online softmax in float32, BLOCK_N positions (BLOCK_N / BS blocks, each row's
block id looked up on its own) per iteration: fewer dependent iterations per program, which is
what bounds a decode step of few sequences (B x Hkv programs leave most SMs idle). With SLIDING, positions before
context_len - WINDOW are skipped (whole blocks are never read).
"""

import triton
import triton.language as tl


@triton.jit
def paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, out_ptr,
    scale, WINDOW,
    stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_tb, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr,
):
    """out[b, h] = softmax(q[b, h] . K_b^T * scale) V_b over the cached positions of sequence b."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)
    g = tl.arange(0, BLOCK_G)  # [G]
    d = tl.arange(0, BLOCK_D)  # [Dh]
    heads = kvh * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale  # [G, Dh]
    m_i = tl.zeros((BLOCK_G,), dtype=tl.float32) - float("inf")
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    lowest = 0
    if SLIDING:
        lowest = tl.maximum(ctx - WINDOW, 0)
    p_in_chunk = tl.arange(0, BLOCK_N)  # [N]
    for first in range((lowest // BLOCK_SIZE) * BLOCK_SIZE, ctx, BLOCK_N):
        pos = first + p_in_chunk
        pos_ok = (pos < ctx) & (pos >= lowest)
        # table entries past the context are never read (a static step leaves stale ones there)
        block_id = tl.load(table_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)  # [N]
        offs = (block_id[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_kp + kvh * stride_kh
                + d[None, :])
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)  # [N, Dh]
        v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)  # [N, Dh]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, N]
        s = tl.where(pos_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [G]
        p = tl.exp(s - m_new[:, None])  # [G, N]
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)  # [G, Dh]
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
