"""Fused decode steps on CUDA: RMSNorm (with the residual add), q/k norm + rope, softmax top-k
routing, the KV-cache write and the decode mask, each one Triton kernel (moekit.kernels.fused_decode);
for latent attention (moekit.mla) its projection's norm + ropes and its absorbed attention with the
cache write, two kernels (moekit.kernels.mla_decode).

The model calls these in place of its PyTorch code (the reference, kept for the CPU, autograd
and torch.compile, which fuses the same steps itself) when `enabled` says so: on CUDA tensors
of at most MAX_TOKENS rows, outside autograd and compilation, unless MOEKIT_FUSED=0 (for A/B
runs). Every function is graph-capturable: no host syncs, shapes fixed by the inputs.

Shapes: N = token rows, D = hidden, H = query heads, Hkv = key/value heads, Dh = head dim,
R = rotated dims per head, T = positions, S = cache positions, E = experts, A = top-k, B = batch.
"""

from __future__ import annotations

import os

import torch

from .errors import MoekitError

try:
    import triton

    from .kernels.fused_decode import (
        decode_mask_kernel,
        kv_write_kernel,
        qk_norm_rope_kernel,
        rms_norm_kernel,
        softmax_topk_kernel,
        swiglu_kernel,
    )
    from .kernels.mla_decode import (
        mla_attention_kernel,
        mla_combine_kernel,
        mla_project_kernel,
        mla_split_kernel,
    )
    from .kernels.router_topk import grouped_topk_kernel
    HAVE_TRITON = True
except ImportError:  # CPU machines without triton keep the PyTorch path
    HAVE_TRITON = False

# Decode and small batched steps; longer prefill keeps the PyTorch path (its kernels were taken not to be
# launch-bound there, but the H200 profile of a 512-token OLMoE forward at 0284941 had 18.2 ms of kernels in
# 33 ms: MOEKIT_FUSED_MAX_TOKENS raises the bound to A/B it; bench_llamacpp --prefill-fused-rows measures both)
def _max_tokens(default: int = 256) -> int:
    """Returns MOEKIT_FUSED_MAX_TOKENS (a positive integer), else `default`; raises MoekitError otherwise."""
    raw = os.environ.get("MOEKIT_FUSED_MAX_TOKENS", "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise MoekitError(f"MOEKIT_FUSED_MAX_TOKENS must be a positive integer (token rows), got {raw!r}")
    return int(raw)


MAX_TOKENS = _max_tokens()
# Tests set this to run the model's fused path on CPU tensors under TRITON_INTERPRET=1.
ALLOW_INTERPRETER = False
# The largest q/k tile (heads x head dim, padded) one program holds: 128 heads of 128.
_MAX_TILE = 16384


def enabled(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Returns whether the fused kernels should run for activations x [..., D] (or a 0-d position)
    and the parameters that go with them."""
    # the device first: every CPU norm and router call asks, and must not pay an environment lookup
    if not HAVE_TRITON or not (x.is_cuda or (ALLOW_INTERPRETER and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    if os.environ.get("MOEKIT_FUSED") == "0":
        return False
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 1
    if rows > MAX_TOKENS or torch.compiler.is_compiling():
        return False
    # the kernels have no backward: anything that trains keeps the reference path
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)))


def _warps(elements: int) -> int:
    return max(1, min(16, triton.next_power_of_2(elements) // 256))


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """Returns x as [N, D] rows with unit column stride (a view), or None when it is not one."""
    if x.stride(-1) != 1:
        return None
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Returns RMSNorm(x) * weight [..., D] for x [..., D] (moekit.model.RMSNorm's rounding)."""
    rows = _rows(x)
    if rows is None:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
    d = rows.shape[1]
    y = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(d)
    rms_norm_kernel[(rows.shape[0],)](
        rows, rows, weight, rows, y, d, rows.stride(0), 0, 0, y.stride(0), eps, 1.0,
        HAS_RESIDUAL=False, SCALE_RESIDUAL=False, BLOCK_D=block, num_warps=_warps(block))
    return y.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (h = x + residual * residual_scale, RMSNorm(h) * weight), both [..., D], for x and
    residual [..., D] of one dtype: the residual-stream add and the next norm in one kernel."""
    xr, rr = _rows(x), _rows(residual)
    if xr is None:
        xr = x.reshape(-1, x.shape[-1]).contiguous()
    if rr is None:
        rr = residual.reshape(-1, residual.shape[-1]).contiguous()
    d = xr.shape[1]
    h = torch.empty(xr.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(xr.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(d)
    rms_norm_kernel[(xr.shape[0],)](
        xr, rr, weight, h, y, d, xr.stride(0), rr.stride(0), h.stride(0), y.stride(0), eps, residual_scale,
        HAS_RESIDUAL=True, SCALE_RESIDUAL=residual_scale != 1.0, BLOCK_D=block, num_warps=_warps(block))
    return h.view(x.shape), y.view(x.shape)


def qk_norm_rope_supported(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                           head_dim: int, norm_weights: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    """Returns whether qk_norm_rope can stand in for the reference with these tensors."""
    dt = qkv.dtype
    if qkv.stride(-1) != 1 or cos.dtype != dt or sin.dtype != dt or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        return False
    if norm_weights is not None and any(w.dtype != dt for w in norm_weights):
        return False
    heads_pad = triton.next_power_of_2(max(heads, kv_heads))
    return heads_pad * triton.next_power_of_2(head_dim) <= _MAX_TILE


def qk_norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                 head_dim: int, norm: str = "none", norm_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
                 eps: float = 1e-6, clip: float | None = None, q_scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (q [N, H, Dh], k [N, Hkv, Dh], v [N, Hkv, Dh]) from qkv [..., H*Dh + 2*Hkv*Dh]
    (N rows): q/k RMSNorm ("full" over the row, "head" per head; weights (q, k)), clamp to +-clip,
    q times q_scale, rotate-half rope on the first R dims with cos, sin [T, R] (row n uses
    position row n % T). v is a view of qkv, or a clamped copy with clip."""
    rows = _rows(qkv)
    if rows is None:
        rows = qkv.reshape(-1, qkv.shape[-1]).contiguous()
    n = rows.shape[0]
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    q = torch.empty((n, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((n, kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if clip is not None:
        v = torch.empty((n, kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    else:
        v = rows[:, q_dim + kv_dim:].view(n, kv_heads, head_dim)
    qw, kw = norm_weights if norm_weights is not None else (rows, rows)
    heads_pad, dh_pad = triton.next_power_of_2(max(heads, kv_heads)), triton.next_power_of_2(head_dim)
    qk_norm_rope_kernel[(n, 3 if clip is not None else 2)](
        rows, qw, kw, cos, sin, q, k, v,
        cos.shape[0], rows.stride(0), cos.stride(0), sin.stride(0), eps,
        0.0 if clip is None else clip, q_scale,
        H=heads, HKV=kv_heads, DH=head_dim, R=cos.shape[-1], NORM={"none": 0, "head": 1, "full": 2}[norm],
        CLIP=clip is not None, HEADS_PAD=heads_pad, DH_PAD=dh_pad, num_warps=_warps(heads_pad * dh_pad))
    return q, k, v


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool, skip_below: float = 0.0,
                 scaling: float = 1.0, out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (expert ids [N, A] int64 best first, weights [N, A] in out_dtype) of softmax routing
    over logits [N, E] (moekit.routers.route's "softmax" rule without groups)."""
    n, e = logits.shape
    ids = torch.empty((n, top_k), dtype=torch.int64, device=logits.device)
    weights = torch.empty((n, top_k), dtype=out_dtype, device=logits.device)
    e_pad = triton.next_power_of_2(e)
    softmax_topk_kernel[(n,)](
        logits, ids, weights, e, logits.stride(0), skip_below, scaling,
        TOP_K=top_k, E_PAD=e_pad, A_PAD=triton.next_power_of_2(top_k), RENORM=renormalize,
        SKIP=skip_below > 0, num_warps=_warps(e_pad) if e_pad > 256 else 1)
    return ids, weights


def softmax_topk_supported(logits: torch.Tensor, top_k: int) -> bool:
    """Returns whether softmax_topk handles these logits [N, E] (E <= 1024, A <= 16)."""
    return logits.dim() == 2 and logits.stride(-1) == 1 and logits.shape[1] <= 1024 and top_k <= 16


def write_kv(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor,
             mask: bool = False, window: int | None = None) -> torch.Tensor | None:
    """Stores k, v [B, Hkv, T, Dh] into keys, values [B, Hkv, S, Dh] at positions start.. (start a
    0-d device tensor); positions past S are dropped (KVCache.write raises for them on the host).
    With `mask`, the same launch also returns decode_mask(start, T, S, window)."""
    b, hkv, t, dh = k.shape
    s = keys.shape[2]
    kv_programs = b * hkv * t
    block = min(1024, triton.next_power_of_2(s))
    out = torch.empty((t, s), dtype=torch.bool, device=k.device) if mask else keys
    mask_programs = t * triton.cdiv(s, block) if mask else 0
    kv_write_kernel[(kv_programs + mask_programs,)](
        k, v, keys, values, start, out, hkv, t, s, kv_programs, 0 if window is None else window,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        DH=dh, DH_PAD=triton.next_power_of_2(dh), MASK=mask, WINDOW=window is not None, BLOCK_S=block,
        num_warps=max(1, block // 512) if mask else 1)
    return out if mask else None


def write_kv_supported(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Returns whether write_kv can store k, v into these caches (same shapes, strides and dtype)."""
    return (k.shape == v.shape and keys.shape == values.shape and keys.stride() == values.stride()
            and k.stride(-1) == 1 and v.stride(-1) == 1 and keys.stride(-1) == 1
            and k.dtype == keys.dtype == v.dtype == values.dtype and k.shape[-1] == keys.shape[-1])


def decode_mask(start: torch.Tensor, t: int, s: int, window: int | None = None) -> torch.Tensor:
    """Returns the boolean attention mask [T, S] (True = may attend) of T queries at positions
    start.. (start a 0-d device tensor) over S cached positions, within `window` if given."""
    mask = torch.empty((t, s), dtype=torch.bool, device=start.device)
    block = min(1024, triton.next_power_of_2(s))
    decode_mask_kernel[(t, triton.cdiv(s, block))](
        start, mask, s, 0 if window is None else window, WINDOW=window is not None, BLOCK_S=block,
        num_warps=max(1, block // 256))
    return mask


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """Returns silu(gate) * up [..., I] for x [..., 2I] holding gate, then up (DenseMLP's halves)."""
    rows = _rows(x)
    rows = x.reshape(-1, x.shape[-1]).contiguous() if rows is None else rows
    ffn = rows.shape[1] // 2
    y = torch.empty((rows.shape[0], ffn), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(ffn))
    swiglu_kernel[(rows.shape[0], triton.cdiv(ffn, block))](
        rows, y, ffn, rows.stride(0), y.stride(0), BLOCK=block, num_warps=max(1, block // 256))
    return y.view(*x.shape[:-1], ffn)


def grouped_topk(logits: torch.Tensor, top_k: int, sigmoid: bool, groups: int, topk_group: int, group_top2: bool,
                 bias: torch.Tensor | None, renormalize: bool, skip_below: float = 0.0,
                 scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (expert ids [N, A] int64 best first, float32 weights [N, A]) of moekit.routers.route's
    sigmoid rule (with a selection bias [E]) or group-limited softmax over logits [N, E]."""
    n, e = logits.shape
    ids = torch.empty((n, top_k), dtype=torch.int64, device=logits.device)
    weights = torch.empty((n, top_k), dtype=torch.float32, device=logits.device)
    g_pad, eg_pad = triton.next_power_of_2(groups), triton.next_power_of_2(e // groups)
    grouped_topk_kernel[(n,)](
        logits, logits if bias is None else bias, ids, weights, logits.stride(0), skip_below, scaling,
        E=e, G=groups, TOPK_GROUP=topk_group, TOP_K=top_k, G_PAD=g_pad, EG_PAD=eg_pad,
        A_PAD=triton.next_power_of_2(top_k), SIGMOID=sigmoid, HAS_BIAS=bias is not None, GROUP_TOP2=group_top2,
        RENORM=renormalize, SKIP=skip_below > 0, num_warps=_warps(g_pad * eg_pad) if g_pad * eg_pad > 256 else 1)
    return ids, weights


def grouped_topk_supported(logits: torch.Tensor, top_k: int, groups: int, topk_group: int,
                           bias: torch.Tensor | None) -> bool:
    """Returns whether grouped_topk handles these logits [N, E] (E <= 1024 in equal groups, A <= 16,
    at least A experts in the kept groups, a contiguous bias)."""
    e = logits.shape[-1] if logits.dim() == 2 else 0
    return (logits.dim() == 2 and logits.stride(-1) == 1 and 0 < e <= 1024 and e % groups == 0
            and top_k <= min(16, topk_group * (e // groups)) and (bias is None or bias.is_contiguous()))


# ---- latent attention (moekit.mla); shapes as in moekit.kernels.mla_decode ---------------------

def mla_project(q: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                heads: int, nope_dim: int, kv_rank: int, interleave: bool, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (q [N, H, dqk] with each head's rope slice rotated, latent [N, r] = RMSNorm(kv[:, :r])
    * norm_weight, rope key [N, dr] rotated) from q_proj's q [..., H*dqk] and kv_a_proj's kv
    [..., r + dr] (N rows); cos, sin [T, dr] (row n uses n % T)."""
    q_rows, kv_rows = _rows(q), _rows(kv)
    q_rows = q.reshape(-1, q.shape[-1]).contiguous() if q_rows is None else q_rows
    kv_rows = kv.reshape(-1, kv.shape[-1]).contiguous() if kv_rows is None else kv_rows
    n, dr = q_rows.shape[0], cos.shape[-1]
    dqk = nope_dim + dr
    q_out = torch.empty((n, heads, dqk), dtype=q.dtype, device=q.device)
    latent = torch.empty((n, kv_rank), dtype=torch.promote_types(kv.dtype, norm_weight.dtype), device=kv.device)
    rope = torch.empty((n, dr), dtype=kv.dtype, device=kv.device)
    dqk_pad = triton.next_power_of_2(dqk)
    heads_block = max(1, min(triton.next_power_of_2(heads), 4096 // dqk_pad))
    mla_project_kernel[(n, triton.cdiv(heads, heads_block))](
        q_rows, kv_rows, norm_weight, cos, sin, q_out, latent, rope,
        cos.shape[0], q_rows.stride(0), kv_rows.stride(0), cos.stride(0), sin.stride(0), eps,
        H=heads, DN=nope_dim, DR=dr, R=kv_rank, INTERLEAVE=interleave, HEADS_BLOCK=heads_block, DQK_PAD=dqk_pad,
        R_PAD=triton.next_power_of_2(kv_rank), DR_PAD=triton.next_power_of_2(dr), num_warps=4)
    return q_out, latent, rope


def mla_project_supported(q: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> bool:
    """Returns whether mla_project stands in for the reference with these tensors (one dtype,
    unit column strides, rope width even)."""
    dt = q.dtype
    return (kv.dtype == dt and norm_weight.dtype == dt and cos.dtype == dt and sin.dtype == dt
            and cos.stride(-1) == 1 and sin.stride(-1) == 1 and cos.shape[-1] % 2 == 0 and norm_weight.is_contiguous())


# mla_attention_kernel runs one program per (token, head). Up to this many token rows each program also
# applies its head's kv_b halves (W_uk, W_uv: 256 KB a head at V2-Lite's widths): at batch 1 one
# launch, H programs. Past it, every row's programs would re-read the same weights (B*H reads of
# 4 MB a layer), so two batched GEMMs outside read them once instead (two launches more).
# Measured on the H200 at b928407 (DeepSeek-V2-Lite shape, B=1, 27 layers, graph step,
# profile_mla_gemms.json vs profile_decode_families.json): the GEMMs outside won at batch 1 too,
# step 4.07 vs 4.33 ms (the kernel 45 vs 62 us a layer: 16 programs walking 256 KB each are
# latency-bound), so no row count takes the weights inside by default.
MLA_WEIGHTS_IN_KERNEL_MAX_ROWS = 0


# With kv_b outside, the attention runs as mla_split_kernel + mla_combine_kernel: programs (row, block
# of MLA_HEADS_BLOCK heads, run of positions), each reading its run of the latent cache once for its
# heads, in place of mla_attention_kernel's one program per (row, head) walking the whole cache twice.
# MOEKIT_MLA_SPLIT=0 keeps mla_attention_kernel (A/B runs); it stays the reference the tests hold the
# split kernels to, and runs whenever kv_b is applied inside the kernel, and for float32 models on
# CUDA: tl.dot on float32 without tf32 wants 405 KB of shared memory at r = 512 (an sm_90 build), past
# the H200's 228 KB.
MLA_SPLIT_ATTENTION = os.environ.get("MOEKIT_MLA_SPLIT") != "0"
MLA_HEADS_BLOCK = 16  # tl.dot's smallest M; [16, r] float32 accumulators (32 KB at r = 512)
MLA_BLOCK_S = 32  # cached positions a tile


def mla_splits(rows: int, head_blocks: int, device: torch.device) -> int:
    """Returns the runs of positions each (row, head block) of mla_split_kernel is cut into:
    moekit.paged_attention.decode_splits (enough programs for the SMs, fixed by the row count so a
    captured step keeps its launch; MOEKIT_DECODE_SPLITS=N fixes it)."""
    from .paged_attention import decode_splits

    return decode_splits(rows, head_blocks, device)


def mla_attention(q: torch.Tensor, kv_b_weight: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor,
                  keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor, t: int, value_dim: int,
                  scale: float) -> torch.Tensor:
    """Returns the absorbed attention output [N, H*dv] of q [N, H, dqk] (N = B*T rows, token t of a
    sequence at position start + t) over the cached latents keys [B, 1, S, r] and rope keys values
    [B, 1, S, dr], after storing the step's latent [N, r] and rope [N, dr] there (start a 0-d
    device tensor; positions past S are dropped). kv_b_weight [H*(dn + dv), r]."""
    return _mla_attend(q, kv_b_weight, latent, rope, keys, values, start, None, t, value_dim, scale)


def mla_paged_decode(q: torch.Tensor, kv_b_weight: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     tables: torch.Tensor, context_lens: torch.Tensor, value_dim: int, scale: float) -> torch.Tensor:
    """Returns the absorbed attention output [B, H*dv] of one query per sequence q [B, H, dqk] over
    its cached latents in the pools keys [NB, page, 1, r], values [NB, page, 1, dr] (written
    already), read through block tables [B, MB] up to context_lens [B] (moekit.mla's ragged decode)."""
    return _mla_attend(q, kv_b_weight, q, q, keys, values, context_lens, tables, 1, value_dim, scale)


def _mla_attend(q, kv_b_weight, latent, rope, keys, values, start, tables, t, value_dim, scale) -> torch.Tensor:
    """One launch of mla_attention_kernel (dense cache, or PAGED with block tables), kv_b inside it
    or as batched GEMMs around it (MLA_WEIGHTS_IN_KERNEL_MAX_ROWS)."""
    n, heads, dqk = q.shape
    kv_rank, dr = keys.shape[-1], values.shape[-1]
    nope = dqk - dr
    in_kernel = n <= MLA_WEIGHTS_IN_KERNEL_MAX_ROWS
    w = kv_b_weight.view(heads, nope + value_dim, kv_rank)  # [H, dn + dv, r]
    if in_kernel:
        q_lat = q  # unused
        out = torch.empty((n, heads * value_dim), dtype=q.dtype, device=q.device)
    else:
        q_lat = torch.bmm(q[:, :, :nope].transpose(0, 1), w[:, :nope])  # [H, N, r]
        out = torch.empty((heads, n, kv_rank), dtype=q.dtype, device=q.device)  # ctx
    paged = tables is not None
    if paged:  # pools [NB, page, 1, d]: position rows of stride(1)
        strides = (0, keys.stride(1), 0, values.stride(1), tables.stride(0), keys.shape[1])
    else:  # caches [B, 1, S, d]
        strides = (keys.stride(0), keys.stride(2), values.stride(0), values.stride(2), 0, 1)
    if not in_kernel and MLA_SPLIT_ATTENTION and (q.dtype != torch.float32 or not q.is_cuda):
        _mla_split_attend(q, q_lat, latent, rope, keys, values, start, tables, out, t, scale, strides)
        out = torch.bmm(out, w[:, nope:].transpose(1, 2))  # [H, N, dv]
        return out.transpose(0, 1).reshape(n, heads * value_dim)
    mla_attention_kernel[(n, heads)](
        q, kv_b_weight, q_lat, latent, rope, keys, values, start, out, tables if paged else start,
        n, t, 0 if paged else keys.shape[2], scale, *strides,
        H=heads, DN=nope, DR=dr, DV=value_dim, R=kv_rank, R_PAD=triton.next_power_of_2(kv_rank),
        DR_PAD=triton.next_power_of_2(dr), BLOCK_S=32, BLOCK_W=32, WEIGHTS=in_kernel, PAGED=paged, num_warps=8)
    if in_kernel:
        return out
    out = torch.bmm(out, w[:, nope:].transpose(1, 2))  # [H, N, dv]
    return out.transpose(0, 1).reshape(n, heads * value_dim)


def _mla_split_attend(q, q_lat, latent, rope, keys, values, start, tables, ctx, t, scale, strides) -> None:
    """Stores into ctx [H, N, r] the attended latents of q_lat [H, N, r] and q's rope slices
    (q [N, H, dqk]): mla_split_kernel over (row, head block, run), then mla_combine_kernel."""
    n, heads, dqk = q.shape
    kv_rank, dr = keys.shape[-1], values.shape[-1]
    head_blocks = triton.cdiv(heads, MLA_HEADS_BLOCK)
    splits = mla_splits(n, head_blocks, q.device)
    part = torch.empty((n, splits, heads, kv_rank), dtype=torch.float32, device=q.device)
    run_max = torch.empty((n, splits, heads), dtype=torch.float32, device=q.device)
    run_sum = torch.empty_like(run_max)
    paged = tables is not None
    r_pad = triton.next_power_of_2(kv_rank)
    mla_split_kernel[(n, head_blocks, splits)](
        q_lat, q, latent, rope, keys, values, start, tables if paged else start, part, run_max, run_sum,
        n, t, 0 if paged else keys.shape[2], scale, *strides,
        H=heads, DN=dqk - dr, DR=dr, R=kv_rank, R_PAD=max(16, r_pad), DR_PAD=max(16, triton.next_power_of_2(dr)),
        HEADS_BLOCK=MLA_HEADS_BLOCK, BLOCK_S=MLA_BLOCK_S, SPLITS=splits, PAGED=paged,
        DOT_FP32=not q.is_cuda, num_warps=4)  # (the interpreter's dot multiplies bf16's raw bits)
    mla_combine_kernel[(n, heads)](
        part, run_max, run_sum, ctx, n, H=heads, R=kv_rank, R_PAD=r_pad, SPLITS=splits,
        SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4)


def mla_paged_decode_supported(q: torch.Tensor, kv_b_weight: torch.Tensor, keys: torch.Tensor,
                               values: torch.Tensor) -> bool:
    """Returns whether mla_paged_decode handles these tensors (one dtype, contiguous q and weight,
    pools whose positions are rows of unit column stride)."""
    dt = q.dtype
    return (q.is_contiguous() and kv_b_weight.is_contiguous() and kv_b_weight.dtype == dt and keys.dtype == dt
            and values.dtype == dt and keys.dim() == 4 and keys.shape[2] == 1 and values.shape[2] == 1
            and keys.stride(-1) == 1 and values.stride(-1) == 1
            and keys.stride(1) == keys.stride(0) // keys.shape[1] and values.stride(1) == values.stride(0) // values.shape[1])


def mla_attention_supported(q: torch.Tensor, kv_b_weight: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor,
                            keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Returns whether mla_attention handles these tensors: contiguous rows of one dtype, caches
    of it with unit column strides."""
    dt = q.dtype
    return (all(z.dtype == dt and z.is_contiguous() for z in (q, kv_b_weight, latent, rope))
            and keys.dtype == dt and values.dtype == dt and keys.stride(-1) == 1 and values.stride(-1) == 1)
