"""Fused kernels for the small elementwise and reduction steps of a decode step.

A batch-1 decode step of a small MoE spends about half its GPU time in ~60 tiny PyTorch kernels
per layer (RMSNorm alone is 8: cast, pow, mean, add, rsqrt, mul, cast, mul). Each kernel here
does one such step in one launch, rounding every intermediate to the model dtype exactly where
the PyTorch reference (moekit.model, moekit.rope, moekit.routers) rounds, so bf16 results match
it to the last bit except where a reduction sums in another order. Wrappers: moekit.fused.

Tensors (N = token rows, D = hidden, H = query heads, Hkv = key/value heads, Dh = head dim,
R = rotated width of a head (<= Dh), T = positions of cos/sin, E = experts, A = top-k,
B = batch, S = cache capacity in positions):
    x, r, h, y   [N, D]                  rms_norm_kernel: h = x + r * r_scale, y = norm(h) * w
    qkv          [N, H*Dh + 2*Hkv*Dh]    qk_norm_rope_kernel input (the fused projection)
    q, k, v      [N, H|Hkv, Dh]          its outputs (v only when clipping)
    cos, sin     [T, R]                  row n uses cos[n % T]
    logits       [N, E]                  softmax_topk_kernel input; ids, weights [N, A] out
    k, v         [B, Hkv, T, Dh]         kv_write_kernel: into cache [B, Hkv, S, Dh] at start..
    mask         [T, S] bool             decode_mask_kernel (or kv_write_kernel with MASK): key <=
                                         start + t (and in the window)
    x, y         [N, 2I], [N, I]         swiglu_kernel: y = silu(gate half) * up half
"""

import triton
import triton.language as tl


@triton.jit
def _to(x, dt: tl.constexpr):
    """Returns float32 x rounded to dt, to nearest even. For bfloat16 the rounding is done on the
    bits first: the compiled cast already rounds so, but the interpreter's truncates."""
    if dt == tl.bfloat16:
        raw = x.to(tl.uint32, bitcast=True)
        bits = ((raw + 0x7FFF + ((raw >> 16) & 1)) >> 16) << 16
        x = tl.where((raw & 0x7FFFFFFF) > 0x7F800000, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(dt)


@triton.jit
def rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, h_ptr, y_ptr,
    D, stride_x, stride_r, stride_h, stride_y, eps, r_scale,
    HAS_RESIDUAL: tl.constexpr, SCALE_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """h[n] = x[n] + r[n] * r_scale (stored); y[n] = w * (h[n] * rsqrt(mean(h[n]^2) + eps)).

    Without HAS_RESIDUAL, h is x and nothing is stored to h. Statistics in float32; the normed
    row is rounded to h's dtype before the weight multiply (Hugging Face's convention)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    dt = x.dtype
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        dt = h_ptr.dtype.element_ty
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        if SCALE_RESIDUAL:
            r = _to(r * r_scale, r_ptr.dtype.element_ty).to(tl.float32)
        h = _to(x + r, dt)
        tl.store(h_ptr + row * stride_h + cols, h, mask=ok)
        x = h.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    normed = _to(x * rstd, dt).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, _to(w * normed, y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _norm_pair(x, xp, qw_ptr, kw_ptr, q_ok, k_ok, w_offs, wp_offs, eps, count, PER_HEAD: tl.constexpr):
    """Returns (x, xp) [HP, DP] RMS-normed with the statistics of x (whole tile, or per head row
    with PER_HEAD), weights from qw (q_ok) or kw (k_ok) at w_offs / wp_offs, rounded as torch rounds."""
    dt = x.dtype
    xf = x.to(tl.float32)
    if PER_HEAD:
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / count + eps)[:, None]  # [HP, 1]
    else:
        rstd = tl.math.rsqrt(tl.sum(tl.sum(xf * xf, axis=1), axis=0) / count + eps)
    w = (tl.load(qw_ptr + w_offs, mask=q_ok, other=0.0)
         + tl.load(kw_ptr + w_offs, mask=k_ok, other=0.0)).to(tl.float32)
    wp = (tl.load(qw_ptr + wp_offs, mask=q_ok, other=0.0)
          + tl.load(kw_ptr + wp_offs, mask=k_ok, other=0.0)).to(tl.float32)
    x = _to(w * _to(xf * rstd, dt).to(tl.float32), dt)
    xp = _to(wp * _to(xp.to(tl.float32) * rstd, dt).to(tl.float32), dt)
    return x, xp


@triton.jit
def qk_norm_rope_kernel(
    qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
    T, stride_qkv, stride_cos, stride_sin, eps, clip, q_scale,
    H: tl.constexpr, HKV: tl.constexpr, DH: tl.constexpr, R: tl.constexpr,
    NORM: tl.constexpr, CLIP: tl.constexpr, HEADS_PAD: tl.constexpr, DH_PAD: tl.constexpr,
):
    """Program (n, 0) writes q[n], (n, 1) k[n], (n, 2) v[n] (launched only with CLIP).

    q and k: RMSNorm over the whole row (NORM == 2, weights [H*Dh] / [Hkv*Dh]) -> clamp to
    +-clip (CLIP) -> RMSNorm per head (NORM == 1, weights [Dh]) -> times q_scale (q only) ->
    rotate-half rope on the first R dims of each head with cos/sin[n % T]. v: the clamp only.
    Each step rounds to the output dtype, as moekit.model.Attention.project does."""
    n = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    heads = tl.arange(0, HEADS_PAD)[:, None]  # [HP, 1]
    d = tl.arange(0, DH_PAD)[None, :]  # [1, DP]
    row = qkv_ptr + n * stride_qkv
    if which == 2:
        ok = (heads < HKV) & (d < DH)
        offs = heads * DH + d
        v = tl.load(row + (H + HKV) * DH + offs, mask=ok, other=0.0)
        v = _to(tl.minimum(tl.maximum(v.to(tl.float32), -clip), clip), v.dtype)
        tl.store(v_ptr + n * HKV * DH + offs, v, mask=ok)
    else:
        # q and k programs differ in head count, source columns, weights and destination; masked
        # loads and stores pick between them (no divergent pointer types)
        is_q = which == 0
        nheads = tl.where(is_q, H, HKV)
        scale = tl.where(is_q, q_scale, 1.0)
        ok = (heads < nheads) & (d < DH)
        q_ok = (heads < tl.where(is_q, H, 0)) & (d < DH)  # ok in the q program, else none
        k_ok = (heads < tl.where(is_q, 0, HKV)) & (d < DH)
        rotated = d < R
        partner = tl.where(rotated, tl.where(d < R // 2, d + R // 2, d - R // 2), d)  # [1, DP]
        offs = heads * DH + d
        poffs = heads * DH + partner
        src = row + tl.where(is_q, 0, H * DH)
        x = tl.load(src + offs, mask=ok, other=0.0)
        xp = tl.load(src + poffs, mask=ok, other=0.0)  # each element's rotate-half partner
        dt = x.dtype
        if NORM == 2:
            x, xp = _norm_pair(x, xp, qw_ptr, kw_ptr, q_ok, k_ok, offs, poffs, eps, nheads * DH, False)
        if CLIP:
            x = _to(tl.minimum(tl.maximum(x.to(tl.float32), -clip), clip), dt)
            xp = _to(tl.minimum(tl.maximum(xp.to(tl.float32), -clip), clip), dt)
        if NORM == 1:
            x, xp = _norm_pair(x, xp, qw_ptr, kw_ptr, q_ok, k_ok, d, partner, eps, DH, True)
        x = _to(x.to(tl.float32) * scale, dt).to(tl.float32)
        xp = _to(xp.to(tl.float32) * scale, dt).to(tl.float32)
        t = n % T
        rok = rotated & (heads >= 0)  # [HP, DP]
        c = tl.load(cos_ptr + t * stride_cos + d + heads * 0, mask=rok, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_sin + d + heads * 0, mask=rok, other=0.0).to(tl.float32)
        rot = tl.where(d < R // 2, -xp, xp)
        roped = _to(_to(x * c, dt).to(tl.float32) + _to(rot * s, dt).to(tl.float32), dt)
        out = tl.where(rok, roped, x.to(dt))
        tl.store(q_ptr + n * H * DH + offs, out, mask=q_ok)
        tl.store(k_ptr + n * HKV * DH + offs, out, mask=k_ok)


@triton.jit
def softmax_topk_kernel(
    logits_ptr, ids_ptr, weights_ptr,
    E, stride_l, skip_below, scaling,
    TOP_K: tl.constexpr, E_PAD: tl.constexpr, A_PAD: tl.constexpr,
    RENORM: tl.constexpr, SKIP: tl.constexpr,
):
    """ids[n], weights[n] = the top-k of softmax(logits[n]) in float32, best first: weights below
    skip_below * the best set to 0 (SKIP), renormalised to sum 1 (RENORM), times scaling."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, E_PAD)
    ok = cols < E
    logit = tl.load(logits_ptr + n * stride_l + cols, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(logit - tl.max(logit, axis=0))
    p = p / tl.sum(p, axis=0)
    left = tl.where(ok, p, -1.0)
    slots = tl.arange(0, A_PAD)
    ids = tl.zeros((A_PAD,), dtype=tl.int64)
    weights = tl.zeros((A_PAD,), dtype=tl.float32)
    for a in tl.static_range(TOP_K):
        best = tl.max(left, axis=0)
        idx = tl.min(tl.where(left == best, cols, E_PAD), axis=0)  # the lowest id among ties
        ids = tl.where(slots == a, idx.to(tl.int64), ids)
        weights = tl.where(slots == a, best, weights)
        left = tl.where(cols == idx, -1.0, left)
    if SKIP:
        top = tl.max(weights, axis=0)
        weights = tl.where(weights < skip_below * top, 0.0, weights)
    if RENORM:
        weights = weights / tl.sum(weights, axis=0)
    weights = weights * scaling
    keep = slots < TOP_K
    tl.store(ids_ptr + n * TOP_K + slots, ids, mask=keep)
    tl.store(weights_ptr + n * TOP_K + slots, _to(weights, weights_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _mask_block(start_ptr, mask_ptr, t, sb, S, window, WINDOW: tl.constexpr, BLOCK_S: tl.constexpr):
    """mask[t, s] = s <= start + t (and s > start + t - window with WINDOW) for s in block sb."""
    s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    query = tl.load(start_ptr).to(tl.int64) + t
    keep = s <= query
    if WINDOW:
        keep = keep & (s > query - window)
    tl.store(mask_ptr + t * S + s, keep, mask=s < S)


@triton.jit
def kv_write_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, start_ptr, mask_ptr,
    HKV, T, S, KV_PROGRAMS, window,
    sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_h, sc_s,
    DH: tl.constexpr, DH_PAD: tl.constexpr, MASK: tl.constexpr, WINDOW: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """kc[b, h, start + t] = k[b, h, t] and vc likewise, start read on the device (graph-safe);
    rows past the capacity S are dropped. Program (b*Hkv + h)*T + t; the two caches share strides.
    With MASK, programs KV_PROGRAMS + t*cdiv(S, BLOCK_S) + sb also write the decode mask [T, S]
    (as decode_mask_kernel): the layer's cache write and mask in one launch."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < KV_PROGRAMS:
        t = pid % T
        bh = pid // T
        h = bh % HKV
        b = bh // HKV
        pos = tl.load(start_ptr).to(tl.int64) + t
        d = tl.arange(0, DH_PAD)
        ok = d < tl.where(pos < S, DH, 0)  # (a scalar & a vector of bools trips the interpreter)
        k = tl.load(k_ptr + b * sk_b + h * sk_h + t * sk_t + d, mask=ok)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + t * sv_t + d, mask=ok)
        dst = b * sc_b + h * sc_h + pos * sc_s + d
        tl.store(kc_ptr + dst, k, mask=ok)
        tl.store(vc_ptr + dst, v, mask=ok)
    elif MASK:
        blocks = tl.cdiv(S, BLOCK_S)
        m = pid - KV_PROGRAMS
        _mask_block(start_ptr, mask_ptr, m // blocks, m % blocks, S, window, WINDOW, BLOCK_S)


@triton.jit
def decode_mask_kernel(start_ptr, mask_ptr, S, window, WINDOW: tl.constexpr, BLOCK_S: tl.constexpr):
    """mask[t, s] = s <= start + t (and s > start + t - window with WINDOW). Program (t, sb)."""
    _mask_block(start_ptr, mask_ptr, tl.program_id(0).to(tl.int64), tl.program_id(1), S, window, WINDOW, BLOCK_S)


@triton.jit
def swiglu_kernel(x_ptr, y_ptr, FFN, stride_x, stride_y, BLOCK: tl.constexpr):
    """y[n, i] = silu(x[n, i]) * x[n, FFN + i] for x [N, 2*FFN] (gate half, then up half), y [N, FFN];
    silu rounded to the dtype before the product (moekit.model.DenseMLP's rounding). Program (n, block)."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < FFN
    gate = tl.load(x_ptr + n * stride_x + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + n * stride_x + FFN + cols, mask=ok, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    act = _to(g * tl.sigmoid(g), gate.dtype).to(tl.float32)
    tl.store(y_ptr + n * stride_y + cols, _to(act * up, y_ptr.dtype.element_ty), mask=ok)
