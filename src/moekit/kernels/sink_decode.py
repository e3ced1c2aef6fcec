"""Fused kernel for a decode step of attention with sinks (moekit.sinks, gpt-oss): the KV-cache
write and the attention over the cached positions in one launch. Without SINKS it is plain
decode attention: moekit.model.Attention's one-token steps over a KVCache (OLMoE, Qwen3, Mixtral, ...)
run it in place of a mask and torch SDPA.

The PyTorch reference of a step is ~15 small kernels a layer (the cache write by index_copy, the
mask and its negation, the score matmul, its cast and scale, the sink column concatenated, the
softmax, the weighted sum and their casts). Here a program holds the G query heads that share a kv
head (GQA) and walks that head's positions once, BLOCK_S an iteration, with an online softmax in
float32 whose running max and sum start at the head's sink logit: exp(sink) joins the denominator
and nothing the numerator, as moekit.sinks.sink_attention's extra softmax column does. q . K^T and
p . V are tensor-core dots (tl.dot; the G heads padded to >= 16 rows, the smallest M on NVIDIA).
With WINDOW, positions at or before query - window are never read (the sliding-window layers). The
scores q.k are rounded to the model dtype before the scale, where the reference's matmul rounds
them; the probabilities are rounded to it before their dot unnormalized (relative to the running
max), the reference's after normalizing, so bf16 results differ from it by about a rounding step.
Without SINKS the running max and sum start empty and the scores stay float32 before the scale,
as torch SDPA's do (that path's reference).

sink_attention_split_kernel does a dense step's work cut into SPLITS runs of positions (flash-decoding)
for steps of too few (row, kv head) programs to fill the GPU: each run leaves float32 partials and
moekit.kernels.paged_attention.paged_decode_reduce_kernel (the paged decode's combine) joins them.
Wrapper: moekit.sinks (fused_decode, paged_fused_decode).

Tensors (N = B*T token rows, token n = b*T + t; B = sequences, T = new tokens a sequence, H = query
heads, Hkv = key/value heads, G = H / Hkv, Dh = head dim, S = cache capacity, NB = cache blocks,
BS = positions per block, MB = blocks per table):
    q          [B, H, T, Dh]      queries (rope applied), any strides with unit Dh stride
    k, v       [B, Hkv, T, Dh]    the step's keys and values, likewise
    sinks      [H]                one logit per query head (not read without SINKS)
    keys       [B, Hkv, S, Dh]    dense cache (KVCache.keys[layer]); values likewise
               [NB, BS, Hkv, Dh]  with PAGED: a block pool (PagedKVCache.keys[layer])
    start      0-d int            position of the first new token (dense; on the device)
               [B] int32          with PAGED: each sequence's context length, its new token included
    tables     [B, MB] int32      with PAGED: each sequence's cache blocks in position order
    slots      [B] int64          with PAGED: the flat cache slot of each sequence's new token (any
                                  stride: a static step's is a column of its buffer)
    out        [N, H, Dh]         the attention output before o_proj
    part       [N, H, SPLITS, Dh] float32, split kernel: a run's sum of p * v (unnormalized)
    m, l       [N, H, SPLITS]     float32, split kernel: a run's running max and sum of p (-1e30, 0: empty)
"""

import triton
import triton.language as tl

from .fused_decode import _to


@triton.jit
def _store_step(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, b, kvh, t, query, S,
                sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_h, sc_s, stride_slot,
                DH: tl.constexpr, DH_PAD: tl.constexpr, PAGED: tl.constexpr):
    """Stores k[b, kvh, t], v[b, kvh, t] into the caches at `query` (dense: dropped past S;
    PAGED: at slots[b])."""
    d = tl.arange(0, DH_PAD)
    d_ok = d < DH
    if PAGED:
        dst = tl.load(slots_ptr + b * stride_slot) * sc_s + kvh * sc_h + d
        keep = d_ok
    else:
        dst = b * sc_b + kvh * sc_h + query * sc_s + d
        keep = d < tl.where(query < S, DH, 0)  # (a scalar & a vector of bools trips the interpreter)
    tl.store(kc_ptr + dst, tl.load(k_ptr + b * sk_b + kvh * sk_h + t * sk_t + d, mask=keep), mask=keep)
    tl.store(vc_ptr + dst, tl.load(v_ptr + b * sv_b + kvh * sv_h + t * sv_t + d, mask=keep), mask=keep)


@triton.jit
def _attend(q, m_i, l_i, acc, k_ptr, v_ptr, kc_ptr, vc_ptr, tables_ptr, b, kvh, start, query, cached_end,
            lowest, s_lo, s_hi, scale, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_h, sc_s, stride_tb, page,
            dt: tl.constexpr, DH: tl.constexpr, DH_PAD: tl.constexpr, BLOCK_S: tl.constexpr, PAGED: tl.constexpr,
            SINKS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Returns (m_i, l_i, acc) carried on over the positions s0 + [0, BLOCK_S) for s0 in s_lo, s_lo +
    BLOCK_S, .. < s_hi that are at or past `lowest` (the window) and at or before `query`: the
    cached ones (s < cached_end) read from the cache, the step's own (start <= s <= query) from k, v.
    A tile past s_hi is never read, so the caller's runs must be whole tiles (or end at query)."""
    d = tl.arange(0, DH_PAD)
    d_ok = d < DH
    positions = tl.arange(0, BLOCK_S)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + positions  # [BS]
        ok = s >= lowest
        cached = ok & (s < cached_end)
        new = ok & (s >= start) & (s <= query)
        if PAGED:
            block = tl.load(tables_ptr + b * stride_tb + s // page, mask=cached, other=0).to(tl.int64)
            c_off = (block * page + s % page) * sc_s + kvh * sc_h
        else:
            c_off = b * sc_b + kvh * sc_h + s * sc_s
        r = tl.where(new, s - start, 0)  # the step's row of a new position
        c_mask = cached[:, None] & d_ok[None, :]
        n_mask = new[:, None] & d_ok[None, :]
        k = (tl.load(kc_ptr + c_off[:, None] + d[None, :], mask=c_mask, other=0.0)
             + tl.load(k_ptr + b * sk_b + kvh * sk_h + r[:, None] * sk_t + d[None, :], mask=n_mask, other=0.0))
        v = (tl.load(vc_ptr + c_off[:, None] + d[None, :], mask=c_mask, other=0.0)
             + tl.load(v_ptr + b * sv_b + kvh * sv_h + r[:, None] * sv_t + d[None, :], mask=n_mask, other=0.0))
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dots = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [G, BS] float32
        if SINKS:  # sink_attention's matmul rounds the scores to the dtype; SDPA keeps them float32
            dots = _to(dots, dt).to(tl.float32)
        score = dots * scale
        score = tl.where((cached | new)[None, :], score, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(score, axis=1))
        p = tl.exp(score - m_new[:, None])  # [G, BS]
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p_v = _to(p, dt)  # V's dtype: the dot's operands share one
        if UPCAST:
            p_v = p_v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision=DOT_PRECISION)  # [G, Dh]
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _load_q(q_ptr, b, t, heads, g_ok, sq_b, sq_h, sq_t, DH: tl.constexpr, DH_PAD: tl.constexpr,
            UPCAST: tl.constexpr):
    """Returns q[b, heads, t] [G, Dh_pad], zero past the group and the head dim (float32 with UPCAST)."""
    d = tl.arange(0, DH_PAD)
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + t * sq_t + d[None, :],
                mask=g_ok[:, None] & (d < DH)[None, :], other=0.0)  # [G, Dh]
    if UPCAST:
        q = q.to(tl.float32)
    return q


@triton.jit(do_not_specialize=["window", "stride_tb", "stride_slot"])
def sink_attention_kernel(
    q_ptr, k_ptr, v_ptr, sinks_ptr, kc_ptr, vc_ptr, start_ptr, tables_ptr, slots_ptr, out_ptr,
    T, S, window, scale,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_h, sc_s, stride_tb, stride_slot, page,
    H: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, DH: tl.constexpr, DH_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, WINDOW: tl.constexpr, PAGED: tl.constexpr, STORE: tl.constexpr, SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (n, kvh): out[n, heads of kvh] for token n = b*T + t at position query = start + t.

    With STORE, it first stores k[b, kvh, t], v[b, kvh, t] into the caches at `query` (dense:
    dropped past S; PAGED: at slots[b]). Positions s < start are read from the cache (dense: row s
    of sequence b; PAGED: row tables[b, s // BS] * BS + s % BS of the pool), the step's own
    positions start..query from k, v -- never from the cache being written. Scores (q . k rounded
    to the dtype) * scale over s <= query (and s > query - window with WINDOW), softmax with the
    head's sink in the denominator, float32 throughout. Without SINKS: no sink, q . k not rounded. PAGED decodes one token a sequence (T = 1):
    start is its context length - 1, every earlier position cached.

    Both products are tensor-core dots: q [G, Dh] (G padded to BLOCK_G >= 16 with zero rows) by
    K^T [Dh, BS] into float32 scores, then p rounded to the dtype by V [BS, Dh] into the float32
    accumulator. UPCAST multiplies the same rounded operands in float32 instead (the interpreter:
    its bf16 tl.dot is wrong in Triton 3.9)."""
    n = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    b = n // T
    t = n % T
    if PAGED:
        start = tl.load(start_ptr + b).to(tl.int64) - 1
    else:
        start = tl.load(start_ptr).to(tl.int64)
    query = start + t
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, DH_PAD)
    g_ok = g < GROUP
    heads = kvh * GROUP + g  # [G]
    if STORE:
        _store_step(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, b, kvh, t, query, S, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                    sc_b, sc_h, sc_s, stride_slot, DH, DH_PAD, PAGED)
    q = _load_q(q_ptr, b, t, heads, g_ok, sq_b, sq_h, sq_t, DH, DH_PAD, UPCAST)
    if SINKS:  # the sink as the softmax's first column: running max = sink, running sum = exp(sink - sink)
        m_i = tl.load(sinks_ptr + heads, mask=g_ok, other=0.0).to(tl.float32)  # [G]
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32) + 1.0
    else:  # finite: a tile with no position to attend (past the capacity) must not give exp(-inf + inf)
        m_i = tl.zeros((BLOCK_G,), dtype=tl.float32) - 1e30
        l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, DH_PAD), dtype=tl.float32)
    lo = 0
    if WINDOW:
        lo = tl.maximum(query - window + 1, 0)
    cached_end = start
    if not PAGED:
        cached_end = tl.minimum(start, S)  # a step past the capacity: what is cached, then its own rows
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_ptr, v_ptr, kc_ptr, vc_ptr, tables_ptr, b, kvh, start, query,
                            cached_end, lo, lo, query + 1, scale, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_h,
                            sc_s, stride_tb, page, q_ptr.dtype.element_ty, DH, DH_PAD, BLOCK_S, PAGED, SINKS,
                            DOT_PRECISION, UPCAST)
    out = acc / l_i[:, None]
    tl.store(out_ptr + n * H * DH + heads[:, None] * DH + d[None, :], _to(out, out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & (d < DH)[None, :])


@triton.jit(do_not_specialize=["window"])
def sink_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, sinks_ptr, kc_ptr, vc_ptr, start_ptr, part_ptr, m_ptr, l_ptr,
    T, S, window, scale,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_h, sc_s,
    H: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, DH: tl.constexpr, DH_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, WINDOW: tl.constexpr, STORE: tl.constexpr, SINKS: tl.constexpr, SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Program (n, kvh, split): sink_attention_kernel's dense work of token n, kv head kvh over one
    run of its positions, left as float32 partials for paged_decode_reduce_kernel.

    The attended positions lo..query are cut at BLOCK_S multiples: from lo rounded down to one,
    SPLITS runs of ceil(span / SPLITS) rounded up to whole tiles, so a short context leaves the last
    runs empty (max -1e30, sum 0: the combine weighs them 0) and a window starts inside run 0. Run 0
    alone starts its running max and sum at the head's sink (as the one-pass kernel does), so the
    sink joins the combined denominator once; run 0 alone does the STORE (the runs read the step's
    own positions from k, v, never from the cache being written). The split count is a launch
    constant (shapes only) and the runs are cut on the device from the live position, so a captured
    step replays at any context."""
    n = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    b = n // T
    t = n % T
    start = tl.load(start_ptr).to(tl.int64)
    query = start + t
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, DH_PAD)
    g_ok = g < GROUP
    heads = kvh * GROUP + g  # [G]
    if STORE:  # noqa: SIM102 (a compile-time switch around a runtime branch: one `if` would mix the two)
        if split == 0:
            _store_step(k_ptr, v_ptr, kc_ptr, vc_ptr, k_ptr, b, kvh, t, query, S, sk_b, sk_h, sk_t, sv_b, sv_h,
                        sv_t, sc_b, sc_h, sc_s, 0, DH, DH_PAD, False)
    q = _load_q(q_ptr, b, t, heads, g_ok, sq_b, sq_h, sq_t, DH, DH_PAD, UPCAST)
    m_i = tl.zeros((BLOCK_G,), dtype=tl.float32) - 1e30
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    if SINKS:  # run 0 starts as the one-pass kernel does: running max = sink, running sum = 1
        sink = tl.load(sinks_ptr + heads, mask=g_ok, other=0.0).to(tl.float32)  # [G]
        m_i = tl.where(split == 0, sink, m_i)
        l_i = tl.where(split == 0, 1.0, l_i)
    acc = tl.zeros((BLOCK_G, DH_PAD), dtype=tl.float32)
    lo = 0
    if WINDOW:
        lo = tl.maximum(query - window + 1, 0)
    begin = (lo // BLOCK_S) * BLOCK_S
    run = tl.cdiv(tl.cdiv(query + 1 - begin, SPLITS), BLOCK_S) * BLOCK_S
    s_lo = begin + split * run
    m_i, l_i, acc = _attend(q, m_i, l_i, acc, k_ptr, v_ptr, kc_ptr, vc_ptr, k_ptr, b, kvh, start, query,
                            tl.minimum(start, S), lo, s_lo, tl.minimum(s_lo + run, query + 1), scale, sk_b, sk_h,
                            sk_t, sv_b, sv_h, sv_t, sc_b, sc_h, sc_s, 0, 1, q_ptr.dtype.element_ty, DH, DH_PAD,
                            BLOCK_S, False, SINKS, DOT_PRECISION, UPCAST)
    row = (n * H + heads) * SPLITS + split  # [G]
    tl.store(part_ptr + row[:, None] * DH + d[None, :], acc, mask=g_ok[:, None] & (d < DH)[None, :])
    tl.store(m_ptr + row, m_i, mask=g_ok)
    tl.store(l_ptr + row, l_i, mask=g_ok)
