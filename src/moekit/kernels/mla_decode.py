"""Fused kernels for a decode step of multi-head latent attention (moekit.mla, DeepSeek-V2/V3).

The PyTorch reference of a step is ~45 small kernels per layer (the latent RMSNorm: 8; rope of q's
and the key's rope slices with their concatenations: 15; the cache write, the mask and the absorbed
attention: 20). Here they are two launches: mla_project_kernel (latent norm, both ropes, q
assembled) and mla_attention_kernel (cache write, kv_b's key half folded into q, softmax over the
cached latents, kv_b's value half applied). Every intermediate is rounded to the model dtype where
LatentAttention's reference rounds it, so bf16 results match it up to the order of float32 sums.

With kv_b outside (batched GEMMs around the attention), mla_split_kernel + mla_combine_kernel
replace mla_attention_kernel (flash-decoding): the latent is shared by every head, so one program
holds a block of heads' absorbed queries and multiplies them against a tile of cached latents with
tl.dot, reading each cached position once for all those heads; a row's positions are cut into
SPLITS runs, each program keeping an online softmax (running max, sum, weighted latents) over its
run; the combine kernel merges the runs. Rounding as the reference, except the probabilities:
rounded before the normalisation (exp(s - m_run), multiplied into the latents by tl.dot in the
model dtype), not after it.
Wrappers: moekit.fused (mla_project, mla_attention).

Tensors (N = B*T token rows, T = new tokens a sequence, B = batch, H = heads, r = kv_lora_rank,
dn / dr / dv = no-rope key, rope key, value head dims, dqk = dn + dr, S = cache capacity):
    q          [N, H*dqk]     q_proj's output (no-rope part, then rope part of each head)
    kv         [N, r + dr]    kv_a_proj's output (the latent, then the rope key)
    w_norm     [r]            kv_a_layernorm's weight
    cos, sin   [T, dr]        cat(freqs, freqs); row n uses cos[n % T]
    q_out      [N, H, dqk]    q with its rope slice rotated
    latent     [N, r]         the normed latent; rope [N, dr] the rotated rope key
    w_kv       [H, dn + dv, r]  kv_b_proj's weight: rows 0..dn-1 of a head W_uk, the rest W_uv
    q_lat, ctx [H, N, r]      q_nope W_uk and the attended latents, when kv_b runs outside (WEIGHTS off)
    part       [N, SPLITS, H, r] float32  a run's unnormalised weighted latents; run_max, run_sum [N, SPLITS, H]
    keys       [B, S, r]      the latent cache (KVCache.keys[layer] [B, 1, S, r]); values [B, S, dr]
    start      0-d int        position of the first new token (on the device)
    out        [N, H*dv]      the attention output before o_proj
"""

import triton
import triton.language as tl

from .fused_decode import _to


@triton.jit
def _rope_slice(src, j, c_ptr, s_ptr, DR: tl.constexpr, INTERLEAVE: tl.constexpr, ok):
    """Returns the rope slice of width DR starting at src, rotated, at output positions j (any
    shape, masked by ok): interleaved pairs (x0, x1), (x2, x3) ... written as all first members,
    then all second ones (moekit.mla.rope_interleaved), or rotate-half (moekit.rope.apply_rope).
    c_ptr, s_ptr point at the row's cos, sin. Each product and the sum rounded to src's dtype."""
    half: tl.constexpr = DR // 2
    j = tl.where(ok, j, 0)  # positions broadcast to the mask's shape: every pointer below full-shaped
    second = j >= half
    i = tl.where(second, j - half, j)
    if INTERLEAVE:
        a = 2 * i + tl.where(second, 1, 0)
        b = 2 * i + tl.where(second, 0, 1)
        freq = i
    else:
        a = j
        b = tl.where(second, j - half, j + half)
        freq = j
    xa = tl.load(src + a, mask=ok, other=0.0)
    dt = xa.dtype
    xb = tl.load(src + b, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + freq, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + freq, mask=ok, other=0.0).to(tl.float32)
    first = _to(xa.to(tl.float32) * c, dt).to(tl.float32)
    other = _to(xb * s, dt).to(tl.float32)
    return _to(first + tl.where(second, other, -other), dt)


@triton.jit
def mla_project_kernel(
    q_ptr, kv_ptr, w_ptr, cos_ptr, sin_ptr, q_out_ptr, latent_ptr, rope_ptr,
    T, stride_q, stride_kv, stride_cos, stride_sin, eps,
    H: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, R: tl.constexpr, INTERLEAVE: tl.constexpr,
    HEADS_BLOCK: tl.constexpr, DQK_PAD: tl.constexpr, R_PAD: tl.constexpr, DR_PAD: tl.constexpr,
):
    """Program (n, hb) writes q_out[n] of heads hb*HEADS_BLOCK.. (the no-rope part copied, the rope
    part rotated); program (n, 0) also writes latent[n] = w_norm * RMSNorm(kv[n, :r]) (float32
    statistics, the normed row rounded before the weight) and rope[n] = rotated kv[n, r:]."""
    n = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    DQK: tl.constexpr = DN + DR
    t = n % T
    c_row = cos_ptr + t * stride_cos
    s_row = sin_ptr + t * stride_sin
    heads = hb * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)[:, None]  # [HB, 1]
    d = tl.arange(0, DQK_PAD)[None, :]  # [1, DQK_PAD]
    ok = (heads < H) & (d < DQK)
    src = q_ptr + n * stride_q + heads * DQK
    x = tl.load(src + d, mask=ok & (d < DN), other=0.0)
    j = tl.where(d >= DN, d - DN, 0)
    roped = _rope_slice(src + DN, j, c_row, s_row, DR, INTERLEAVE, ok & (d >= DN))
    tl.store(q_out_ptr + n * H * DQK + heads * DQK + d, tl.where(d >= DN, roped, x), mask=ok)
    if hb == 0:
        cols = tl.arange(0, R_PAD)
        c_ok = cols < R
        lat = tl.load(kv_ptr + n * stride_kv + cols, mask=c_ok, other=0.0)
        lat32 = lat.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(lat32 * lat32, axis=0) / R + eps)
        normed = _to(lat32 * rstd, lat.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(latent_ptr + n * R + cols, _to(w * normed, latent_ptr.dtype.element_ty), mask=c_ok)
        jr = tl.arange(0, DR_PAD)
        r_ok = jr < DR
        k_rope = _rope_slice(kv_ptr + n * stride_kv + R, jr, c_row, s_row, DR, INTERLEAVE, r_ok)
        tl.store(rope_ptr + n * DR + jr, k_rope, mask=r_ok)


@triton.jit
def _latent_tile(kc_ptr, rc_ptr, lat_ptr, rope_ptr, b, s, start, last, first_row, stride_kc_b, stride_kc_s,
                 stride_rc_b, stride_rc_s, tables_ptr, stride_tb, page, rr, r_ok, dd, d_ok,
                 R: tl.constexpr, DR: tl.constexpr, PAGED: tl.constexpr):
    """Returns (latents [BS, R_PAD], rope keys [BS, DR_PAD]) of positions s [BS], zero past `last`:
    cached ones (< start) from the cache (PAGED: row tables[b, s // page] * page + s % page of the
    pools), new ones from the step's rows (never from the cache they are being written to)."""
    cached = ((s < start) & (s <= last))[:, None]  # (a split's run ends before start)
    new = ((s >= start) & (s <= last))[:, None]
    new_row = first_row + s - start  # [BS]
    if PAGED:
        block = tl.load(tables_ptr + b * stride_tb + s // page, mask=s <= last, other=0).to(tl.int64)
        k_off = (block * page + s % page) * stride_kc_s
        r_off = (block * page + s % page) * stride_rc_s
    else:
        k_off = b * stride_kc_b + s * stride_kc_s
        r_off = b * stride_rc_b + s * stride_rc_s
    lat = (tl.load(kc_ptr + k_off[:, None] + rr[None, :], mask=cached & r_ok[None, :], other=0.0)
           + tl.load(lat_ptr + new_row[:, None] * R + rr[None, :], mask=new & r_ok[None, :], other=0.0))
    rope = (tl.load(rc_ptr + r_off[:, None] + dd[None, :], mask=cached & d_ok[None, :], other=0.0)
            + tl.load(rope_ptr + new_row[:, None] * DR + dd[None, :], mask=new & d_ok[None, :], other=0.0))
    return lat, rope


@triton.jit
def _scores(q_lat, q_rope, kc_ptr, rc_ptr, lat_ptr, rope_ptr, b, s, start, last, first_row,
            stride_kc_b, stride_kc_s, stride_rc_b, stride_rc_s, tables_ptr, stride_tb, page, rr, r_ok, dd, d_ok,
            dt, scale, R: tl.constexpr, DR: tl.constexpr, PAGED: tl.constexpr):
    """Returns (scores [BS] float32, masked to -inf past `last`; latents [BS, R_PAD] float32) of
    positions s [BS]: cached ones (< start) from the cache (PAGED: row tables[b, s // page] * page
    + s % page of the pools), new ones from the step's rows."""
    lat, rope = _latent_tile(kc_ptr, rc_ptr, lat_ptr, rope_ptr, b, s, start, last, first_row, stride_kc_b,
                             stride_kc_s, stride_rc_b, stride_rc_s, tables_ptr, stride_tb, page, rr, r_ok, dd, d_ok,
                             R, DR, PAGED)
    lat = lat.to(tl.float32)
    s_lat = _to(tl.sum(lat * q_lat[None, :], axis=1), dt).to(tl.float32)
    s_rope = _to(tl.sum(rope.to(tl.float32) * q_rope[None, :], axis=1), dt).to(tl.float32)
    score = _to(s_lat + s_rope, dt).to(tl.float32) * scale
    return tl.where(s <= last, score, float("-inf")), lat


@triton.jit
def _row_start(start_ptr, kc_ptr, rc_ptr, lat_ptr, rope_ptr, n, b, t, writer, rr, dd, S, stride_kc_b, stride_kc_s,
               stride_rc_b, stride_rc_s, R: tl.constexpr, DR: tl.constexpr, PAGED: tl.constexpr):
    """Returns (start, last) of token row n (sequence b, token t of the step): PAGED, start is b's
    context length and every position it attends to is cached (last = start - 1); dense, start is
    the step's first position and last = start + t, and the row's `writer` program stores its
    latent and rope key at `last` (dropped past S) for the later steps to read."""
    if PAGED:
        start = tl.load(start_ptr + b).to(tl.int64)
        last = start - 1
    else:
        start = tl.load(start_ptr).to(tl.int64)
        last = start + t
        if writer:
            keep_r = rr < tl.where(last < S, R, 0)  # (a scalar & a vector of bools trips the interpreter)
            keep_d = dd < tl.where(last < S, DR, 0)
            tl.store(kc_ptr + b * stride_kc_b + last * stride_kc_s + rr,
                     tl.load(lat_ptr + n * R + rr, mask=keep_r), mask=keep_r)
            tl.store(rc_ptr + b * stride_rc_b + last * stride_rc_s + dd,
                     tl.load(rope_ptr + n * DR + dd, mask=keep_d), mask=keep_d)
    return start, last


@triton.jit
def mla_attention_kernel(
    q_ptr, w_ptr, qlat_ptr, lat_ptr, rope_ptr, kc_ptr, rc_ptr, start_ptr, out_ptr, tables_ptr,
    N, T, S, scale, stride_kc_b, stride_kc_s, stride_rc_b, stride_rc_s, stride_tb, page,
    H: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, R: tl.constexpr,
    R_PAD: tl.constexpr, DR_PAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr,
    WEIGHTS: tl.constexpr, PAGED: tl.constexpr,
):
    """Program (n, h): out[n, h*dv:] of token n = b*T + t at position start + t, head h, absorbed:
    q_lat = q_nope W_uk[h] (rounded), scores = (q_lat . c_s + q_rope . k_s) * scale over positions
    s <= start + t, softmax (float32; max and sum first, then the probabilities rounded as the
    reference rounds them), ctx = sum p_s c_s (rounded), out = W_uv[h] ctx. Programs (n, 0) also
    store latent[n], rope[n] into the caches at start + t (dropped past S); every program reads
    the step's new positions from latent / rope, never from the cache it is being written to.
    Without WEIGHTS, kv_b stays outside (batched GEMMs that read it once for all rows): q_lat is
    read from qlat [H, N, r] and ctx stored to out as [H, N, r].
    PAGED (a ragged decode step over moekit.kv_cache.PagedKVCache; T = 1, so n = b): the step's
    latents are already in the pools keys [NB*page, r], values [NB*page, dr]; start_ptr holds each
    sequence's context length [B] (it attends to positions < it), tables [B, MB] its blocks; nothing
    is written."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    b = n // T
    t = n % T
    DQK: tl.constexpr = DN + DR
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    dd = tl.arange(0, DR_PAD)
    d_ok = dd < DR
    start, last = _row_start(start_ptr, kc_ptr, rc_ptr, lat_ptr, rope_ptr, n, b, t, h == 0, rr, dd, S,
                             stride_kc_b, stride_kc_s, stride_rc_b, stride_rc_s, R, DR, PAGED)
    q_row = q_ptr + n * H * DQK + h * DQK
    w_head = w_ptr + h * (DN + DV) * R
    dt = q_ptr.dtype.element_ty
    if WEIGHTS:
        acc = tl.zeros((R_PAD,), dtype=tl.float32)
        for k0 in range(0, DN, BLOCK_W):  # q_lat = q_nope W_uk[h]
            ks = k0 + tl.arange(0, BLOCK_W)
            k_ok = ks < DN
            qn = tl.load(q_row + ks, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_head + ks[:, None] * R + rr[None, :], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * qn[:, None], axis=0)
        q_lat = _to(acc, dt).to(tl.float32)
    else:
        q_lat = tl.load(qlat_ptr + (h * N + n) * R + rr, mask=r_ok, other=0.0).to(tl.float32)
    q_rope = tl.load(q_row + DN + dd, mask=d_ok, other=0.0).to(tl.float32)
    first_row = b * T
    positions = tl.arange(0, BLOCK_S)
    m = tl.max(tl.full((BLOCK_S,), float("-inf"), tl.float32), axis=0)
    total = tl.sum(tl.zeros((BLOCK_S,), tl.float32), axis=0)
    for s0 in range(0, last + 1, BLOCK_S):  # pass 1: the softmax's max and sum
        score, _ = _scores(q_lat, q_rope, kc_ptr, rc_ptr, lat_ptr, rope_ptr, b, s0 + positions, start, last,
                           first_row, stride_kc_b, stride_kc_s, stride_rc_b, stride_rc_s, tables_ptr, stride_tb, page,
                           rr, r_ok, dd, d_ok, dt, scale, R, DR, PAGED)
        m_new = tl.maximum(m, tl.max(score, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(score - m_new), axis=0)
        m = m_new
    ctx = tl.zeros((R_PAD,), dtype=tl.float32)
    for s0 in range(0, last + 1, BLOCK_S):  # pass 2: the rounded probabilities times the latents
        score, lat = _scores(q_lat, q_rope, kc_ptr, rc_ptr, lat_ptr, rope_ptr, b, s0 + positions, start, last,
                             first_row, stride_kc_b, stride_kc_s, stride_rc_b, stride_rc_s, tables_ptr, stride_tb,
                             page, rr, r_ok, dd, d_ok, dt, scale, R, DR, PAGED)
        p = _to(tl.exp(score - m) / total, dt).to(tl.float32)
        ctx += tl.sum(p[:, None] * lat, axis=0)
    ctx = _to(ctx, dt)
    if WEIGHTS:
        ctx = ctx.to(tl.float32)
        for v0 in range(0, DV, BLOCK_W):  # out = W_uv[h] ctx
            vs = v0 + tl.arange(0, BLOCK_W)
            v_ok = vs < DV
            w = tl.load(w_head + (DN + vs[:, None]) * R + rr[None, :], mask=v_ok[:, None] & r_ok[None, :],
                        other=0.0)
            o = tl.sum(w.to(tl.float32) * ctx[None, :], axis=1)
            tl.store(out_ptr + n * H * DV + h * DV + vs, _to(o, out_ptr.dtype.element_ty), mask=v_ok)
    else:
        tl.store(out_ptr + (h * N + n) * R + rr, ctx, mask=r_ok)


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """Returns a @ b in float32: operands as they are (bf16 tensor cores), or widened to float32
    (exact) and multiplied without tf32."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def mla_split_kernel(
    qlat_ptr, q_ptr, lat_ptr, rope_ptr, kc_ptr, rc_ptr, start_ptr, tables_ptr, part_ptr, max_ptr, sum_ptr,
    N, T, S, scale, stride_kc_b, stride_kc_s, stride_rc_b, stride_rc_s, stride_tb, page,
    H: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr,
    DR_PAD: tl.constexpr, HEADS_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
    PAGED: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Program (n, hb, j): run j of the positions token n = b*T + t attends to (as in
    mla_attention_kernel: s <= start + t; PAGED: s < context length), for heads hb*HEADS_BLOCK..:
    scores [HB, BS] = (q_lat . c_s (rounded) + q_rope . k_s (rounded), rounded) * scale, both tl.dot
    over a tile of latents shared by the heads; an online softmax keeps the run's max, sum and
    sum_s exp(score_s - max) c_s (the probabilities rounded to the model dtype for the dot), stored
    to run_max, run_sum, part (float32; an empty run stores -inf, 0 and no part). A run is ceil(positions /
    SPLITS) rounded up to whole tiles. Program (n, 0, 0) of a dense step also stores latent[n],
    rope[n] into the caches at start + t (dropped past S). DOT_FP32: tl.dot on float32 operands
    without tf32 (float32 models; the interpreter, whose dot multiplies bf16's raw bits)."""
    n = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    j = tl.program_id(2)
    b = n // T
    t = n % T
    DQK: tl.constexpr = DN + DR
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    dd = tl.arange(0, DR_PAD)
    d_ok = dd < DR
    start, last = _row_start(start_ptr, kc_ptr, rc_ptr, lat_ptr, rope_ptr, n, b, t, hb + j == 0, rr, dd, S,
                             stride_kc_b, stride_kc_s, stride_rc_b, stride_rc_s, R, DR, PAGED)
    heads = hb * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)  # [HB]
    h_ok = heads < H
    dt = q_ptr.dtype.element_ty
    q_lat = tl.load(qlat_ptr + (heads[:, None] * N + n) * R + rr[None, :], mask=h_ok[:, None] & r_ok[None, :],
                    other=0.0)  # [HB, R_PAD]
    q_rope = tl.load(q_ptr + n * H * DQK + heads[:, None] * DQK + DN + dd[None, :],
                     mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # [HB, DR_PAD]
    positions = last + 1
    run = tl.cdiv(tl.cdiv(positions, SPLITS), BLOCK_S) * BLOCK_S
    lo = j * run
    hi = tl.minimum(lo + run, positions)
    m = tl.full((HEADS_BLOCK,), float("-inf"), tl.float32)
    total = tl.zeros((HEADS_BLOCK,), tl.float32)
    acc = tl.zeros((HEADS_BLOCK, R_PAD), tl.float32)
    tile = tl.arange(0, BLOCK_S)
    for s0 in range(lo, hi, BLOCK_S):  # every tile holds at least one position of the run
        s = s0 + tile
        lat, rope = _latent_tile(kc_ptr, rc_ptr, lat_ptr, rope_ptr, b, s, start, hi - 1, b * T,
                                 stride_kc_b, stride_kc_s, stride_rc_b, stride_rc_s, tables_ptr, stride_tb, page,
                                 rr, r_ok, dd, d_ok, R, DR, PAGED)  # [BS, R_PAD], [BS, DR_PAD]; 0 past the run
        s_lat = _to(_dot(q_lat, tl.trans(lat), DOT_FP32), dt).to(tl.float32)  # [HB, BS]
        s_rope = _to(_dot(q_rope, tl.trans(rope), DOT_FP32), dt).to(tl.float32)
        score = _to(s_lat + s_rope, dt).to(tl.float32) * scale
        score = tl.where((s < hi)[None, :], score, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(score - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(_to(p, dt), lat, DOT_FP32)
        m = m_new
    row = (n * SPLITS + j) * H + heads  # [HB]
    keep = rr < tl.where(lo < hi, R, 0)  # an empty run's part is never read (a scalar & a vector trips the interpreter)
    tl.store(part_ptr + row[:, None] * R + rr[None, :], acc, mask=h_ok[:, None] & keep[None, :])
    tl.store(max_ptr + row, m, mask=h_ok)
    tl.store(sum_ptr + row, total, mask=h_ok)


@triton.jit
def mla_combine_kernel(part_ptr, max_ptr, sum_ptr, ctx_ptr, N, H: tl.constexpr, R: tl.constexpr,
                       R_PAD: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """Program (n, h): ctx[h, n] = sum_j exp(run_max_j - M) part_j / sum_j exp(run_max_j - M)
    run_sum_j (M the largest run max; empty runs, run_max -inf, weigh 0 and their part is not
    read), rounded to ctx's dtype."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    js = tl.arange(0, SPLITS_PAD)
    j_ok = js < SPLITS
    row = (n * SPLITS + js) * H + h  # [SPLITS_PAD]
    m = tl.load(max_ptr + row, mask=j_ok, other=float("-inf"))
    total = tl.load(sum_ptr + row, mask=j_ok, other=0.0)
    top = tl.max(m, axis=0)
    filled = j_ok & (m > float("-inf"))
    weight = tl.where(filled, tl.exp(m - top), 0.0)
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    part = tl.load(part_ptr + row[:, None] * R + rr[None, :], mask=filled[:, None] & r_ok[None, :], other=0.0)
    ctx = tl.sum(part * weight[:, None], axis=0) / tl.sum(weight * total, axis=0)
    tl.store(ctx_ptr + (h * N + n) * R + rr, _to(ctx, ctx_ptr.dtype.element_ty), mask=r_ok)
