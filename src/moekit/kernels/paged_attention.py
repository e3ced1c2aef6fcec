"""Attention read through a paged KV cache's block tables: decode (one new token per sequence)
and packed prefill (every sequence's new tokens of a ragged step, in one launch).

Tensors of the decode kernel (B = sequences, H = query heads, Hkv = key/value heads, G = H / Hkv
query heads per kv head, Dh = head dim, NB = cache blocks, BS = positions per block, MB = blocks
per table):
    q             [B, H, Dh]        the new token's queries (rope applied)
    keys, values  [NB, BS, Hkv, Dh] one layer's block pool
    block_tables  [B, MB]           int32 block ids of each sequence, in position order
    context_lens  [B]               int32 positions each sequence attends to (its token included)
    out           [B, H, Dh]

Program (b, kvh) reads sequence b's blocks of kv head kvh once for all G query heads that share
it (GQA), with an online softmax in float32, BLOCK_N positions (each row's block id looked up on
its own) per iteration. q . K^T and p . V are tensor-core dots (tl.dot), the G heads padded to
BLOCK_G >= 16 rows with zeros (the dot's smallest M on NVIDIA): a [BLOCK_G, Dh] x [Dh, BLOCK_N]
dot an iteration in place of [G, N, Dh] float32 broadcast products, so 64 positions an iteration
whatever G is. With SLIDING, positions before context_len - WINDOW are skipped (whole blocks are
never read).

paged_decode_split_kernel and paged_decode_reduce_kernel do the same work cut into runs of
positions (flash-decoding) for steps of too few sequences to fill the GPU.

The packed prefill kernel's tensors are in its docstring.
"""

import triton
import triton.language as tl


@triton.jit
def _attend_run(q_ptr, k_ptr, v_ptr, table_ptr, b, kvh, lo, hi, lowest, scale,
                stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_tb,
                GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST: tl.constexpr):
    """Returns (m, l, acc) of the GROUP query heads of kv head kvh of sequence b over the cached
    positions [lo, hi) at or past `lowest`: the running max [G], sum of p [G] and unnormalized
    sum of p * v [G, Dh] (-1e30, 0, 0 for an empty run). Table entries past hi are never read (a
    static step leaves stale ones there).

    Both products are tensor-core dots: q [G, Dh] (G padded to BLOCK_G >= 16 with zero rows) by
    K^T [Dh, N] in the cache's dtype into float32 scores, then p cast to V's dtype by V [N, Dh]
    into a float32 accumulator (as flash attention does). UPCAST multiplies in float32 instead
    (the interpreter: its bf16 tl.dot is wrong in Triton 3.9)."""
    g = tl.arange(0, BLOCK_G)  # [G]
    d = tl.arange(0, BLOCK_D)  # [Dh]
    heads = kvh * GROUP + g
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None] & d_ok[None, :], other=0.0)  # [G, Dh]
    if UPCAST:
        q = q.to(tl.float32)
    # finite start: a chunk whose positions all fall before the window gets p = 0 there, not NaN
    m_i = tl.zeros((BLOCK_G,), dtype=tl.float32) - 1e30
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    p_in_chunk = tl.arange(0, BLOCK_N)  # [N]
    for first in range(lo, hi, BLOCK_N):
        pos = first + p_in_chunk
        pos_ok = (pos < hi) & (pos >= lowest)
        block_id = tl.load(table_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)  # [N]
        offs = (block_id[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_kp + kvh * stride_kh
                + d[None, :])
        kv_mask = pos_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)  # [N, Dh]
        v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)  # [N, Dh]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [G, N] float32
        s = tl.where(pos_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [G]
        p = tl.exp(s - m_new[:, None])  # [G, N]
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)  # [G, Dh]
        m_i = m_new
    return m_i, l_i, acc


# WINDOW (0 without a window) and the table stride (the longest table of the step, in blocks)
# change between steps: runtime values, not specialized (a value of 1 or a multiple of 16 would
# otherwise compile a variant of its own mid-run)
@triton.jit(do_not_specialize=["WINDOW", "stride_tb"])
def paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, out_ptr,
    scale, WINDOW,
    stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_tb, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[b, h] = softmax(q[b, h] . K_b^T * scale) V_b over the cached positions of sequence b."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)
    lowest = 0
    if SLIDING:
        lowest = tl.maximum(ctx - WINDOW, 0)
    m_i, l_i, acc = _attend_run(q_ptr, k_ptr, v_ptr, table_ptr, b, kvh, (lowest // BLOCK_SIZE) * BLOCK_SIZE, ctx,
                                lowest, scale, stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_tb,
                                GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, UPCAST)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None] & (d < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=["WINDOW", "stride_tb"])
def paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, ctx_ptr, part_ptr, m_ptr, l_ptr,
    scale, WINDOW,
    stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_tb, NUM_HEADS,
    SPLITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """paged_decode_kernel's work of sequence b, kv head kvh cut into SPLITS runs of positions
    (flash-decoding): program (b, kvh, split) attends its run only and leaves the unnormalized
    partial result for paged_decode_reduce_kernel. A decode step of few sequences launches B x Hkv
    programs, too few to fill the GPU, each walking its whole context; the splits walk it side by side.

    Partials (S = SPLITS): part [B, H, S, Dh] float32 (sum of p * v), m, l [B, H, S] float32 (the
    run's running max and sum of p; -1e30 and 0 for an empty run). A run is a multiple of BLOCK_N
    positions: ceil(context / S) rounded up, so short contexts leave the last splits empty."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    lowest = 0
    if SLIDING:
        lowest = tl.maximum(ctx - WINDOW, 0)
    begin = (lowest // BLOCK_SIZE) * BLOCK_SIZE
    run = tl.cdiv(tl.cdiv(ctx - begin, SPLITS), BLOCK_N) * BLOCK_N
    lo = begin + split * run
    m_i, l_i, acc = _attend_run(q_ptr, k_ptr, v_ptr, table_ptr, b, kvh, lo, tl.minimum(lo + run, ctx), lowest, scale,
                                stride_qb, stride_qh, stride_kb, stride_kp, stride_kh, stride_tb,
                                GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, DOT_PRECISION, UPCAST)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    row = (b * NUM_HEADS + kvh * GROUP + g) * SPLITS + split  # [G]
    tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None] & (d < HEAD_DIM)[None, :])
    tl.store(m_ptr + row, m_i, mask=g_ok)
    tl.store(l_ptr + row, l_i, mask=g_ok)


@triton.jit
def paged_decode_reduce_kernel(
    part_ptr, m_ptr, l_ptr, out_ptr, stride_ob, stride_oh, NUM_HEADS,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, h] from the SPLITS partials of paged_decode_split_kernel: each run's sums rescaled
    to the largest running max, then acc / l. Program (b, h)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)  # [S]
    d = tl.arange(0, BLOCK_D)  # [Dh]
    s_ok = s < SPLITS
    row = (b * NUM_HEADS + h) * SPLITS + s  # [S]
    m = tl.load(m_ptr + row, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + row, mask=s_ok, other=0.0)
    top = tl.max(m, axis=0)
    w = tl.where(l > 0, tl.exp(m - top), 0.0)  # an empty run (m = -1e30, l = 0) weighs nothing
    acc = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & (d < HEAD_DIM)[None, :],
                  other=0.0)  # [S, Dh]
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)  # [Dh]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# q and out are views of the step's packed projections: their strides may scale with its tokens
@triton.jit(do_not_specialize=["WINDOW", "stride_qn", "stride_qh", "stride_tb", "stride_on", "stride_oh"])
def paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, tile_ptr, out_ptr,
    scale, WINDOW,
    stride_qn, stride_qh, stride_kb, stride_kp, stride_kh, stride_tb, stride_on, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # multiply in float32 (the interpreter: its bf16 tl.dot is wrong in Triton 3.9)
):
    """out[n, h] = causal attention of packed query n (head h) over its own sequence's cached positions.

    Tensors (N = packed new tokens of a ragged step, T = query tiles, B = sequences, H = query heads):
        q, out        [N, H, Dh]         packed queries (rope applied) of every sequence of the step
        keys, values  [NB, BS, Hkv, Dh]  one layer's block pool, this step's keys already written
        block_tables  [B, MB]            int32 block ids of each sequence, in position order
        tiles         [T, 4]             int32 (sequence, first packed token, tokens <= BLOCK_M,
                                         position of the first token): a run of one sequence's queries
    Program (t, h) attends tile t's queries of head h over positions lo .. (last query position),
    BLOCK_N at a time, each position's block id looked up on its own; query i sees key positions
    <= its own (and, with SLIDING, > its own - WINDOW). One launch serves prefill chunks and decode
    rows of a step alike; sizes that change every step (tokens, table width, window) are runtime
    values, so the kernel compiles once per model shape.
    """
    t = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    seq = tl.load(tile_ptr + t * 4)
    first = tl.load(tile_ptr + t * 4 + 1)
    count = tl.load(tile_ptr + t * 4 + 2)
    pos0 = tl.load(tile_ptr + t * 4 + 3)
    m = tl.arange(0, BLOCK_M)  # [M]
    d = tl.arange(0, BLOCK_D)  # [Dh]
    m_ok = m < count
    d_ok = d < HEAD_DIM
    q_pos = pos0 + m  # [M]
    q = tl.load(q_ptr + (first + m)[:, None] * stride_qn + h * stride_qh + d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [M, Dh]
    if UPCAST:
        q = q.to(tl.float32)
    # finite start: a row whose first chunk is all masked (window) gets p = 0 there, not NaN
    m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) - 1e30
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = pos0 + count  # one past the tile's last query position
    lo = 0
    if SLIDING:
        lo = tl.maximum(pos0 - WINDOW + 1, 0)
    n = tl.arange(0, BLOCK_N)  # [N]
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + n
        k_ok = k_pos < hi
        block_id = tl.load(table_ptr + seq * stride_tb + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        offs = (block_id[:, None] * stride_kb + (k_pos % BLOCK_SIZE)[:, None] * stride_kp + kvh * stride_kh
                + d[None, :])
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)  # [N, Dh]
        v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)  # [N, Dh]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [M, N] float32
        allowed = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if SLIDING:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - WINDOW)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # [M]
        p = tl.exp(s - m_new[:, None])  # [M, N]
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    # a real query sees at least itself, so l_i >= 1 (its maximum adds exp(0)); rows past the
    # tile's count may see nothing and are never stored
    out = acc / tl.maximum(l_i, 1.0)[:, None]
    tl.store(out_ptr + (first + m)[:, None] * stride_on + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
