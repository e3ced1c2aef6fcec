"""Attention with sinks (gpt-oss): a learned logit per head joins every query's softmax as one
more column and is dropped after it, so a query may put weight "nowhere".

softmax with a sink s over scores z_1..z_S gives p_i = exp(z_i) / (sum_j exp(z_j) + exp(s)): the
ordinary attention output times sigmoid(logsumexp(z) - s). `sink_attention` computes it in
PyTorch: the reference, for the dense, cached, graph-captured and ragged (paged) paths alike. On
CUDA decode steps (moekit.fused.enabled: a device-tensor position over a KVCache, or a ragged
decode over a PagedKVCache) one Triton kernel (moekit.kernels.sink_decode) writes the cache and
attends in its place, sliding window and GQA included; a dense step of too few (row, kv head)
programs to fill the GPU splits its positions over more (dense_splits) and combines them in a
second launch. moekit.model.SinkAttention calls `attend` from its own attend;
moekit.model.Attention's one-token graph steps call `fused_decode` without sinks (sinks=None:
plain attention, no mask built).

Shapes: B = batch, H = query heads, Hkv = key/value heads, T = new tokens, S = attended
positions, Dh = head dim, N = packed tokens of a ragged step.
"""

from __future__ import annotations

import os

import torch

from . import fused
from .errors import MoekitError
from .kv_cache import KVCache, PagedKVCache, RaggedBatch
from .paged_attention import causal_mask, decode_launch, decode_splits, gather_sequence

try:
    import triton

    from .kernels.paged_attention import paged_decode_reduce_kernel
    from .kernels.sink_decode import sink_attention_kernel, sink_attention_split_kernel
except ImportError:  # CPU machines without triton keep the PyTorch path (fused.HAVE_TRITON is False)
    pass


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
    """Returns attention [B, H, T, Dh] of q [B, H, T, Dh] over k, v [B, Hkv, S, Dh] with one sink
    logit per head (sinks [H]) and a boolean mask [T, S] (True = may attend; None = all)."""
    b, h, t, dh = q.shape
    groups = h // k.shape[1]
    qg = q.view(b, k.shape[1], groups, t, dh)  # [B, Hkv, g, T, Dh]: heads of a kv head share its keys
    scores = (qg @ k[:, :, None].transpose(-1, -2)).float() * dh ** -0.5  # [B, Hkv, g, T, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, k.shape[1], groups, 1, 1).expand(b, -1, -1, t, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]  # the sink's share dropped
    return (probs.to(v.dtype) @ v[:, :, None]).view(b, h, t, dh)


def attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | PagedKVCache | None,
           start: int | torch.Tensor | RaggedBatch) -> torch.Tensor:
    """Returns the attention output [B, T, H*Dh] (before o_proj) of a moekit.model.Attention `attn`
    with sinks `attn.sinks` [H]; stores k, v in the cache (as Attention.attend does)."""
    if isinstance(start, RaggedBatch):
        return _attend_ragged(attn, q, k, v, cache, start)
    b, _, t, _ = q.shape
    if (type(cache) is KVCache and isinstance(start, torch.Tensor) and fused.enabled(start, q, attn.sinks)
            and fused_supported(q, k, v, cache.keys[attn.layer], cache.values[attn.layer])):
        out = fused_decode(q, k, v, attn.sinks, cache.keys[attn.layer], cache.values[attn.layer], start,
                           attn.cfg.sliding_window)  # the cache write and the attention: one kernel
        return out.view(b, t, attn.q_dim)
    if cache is not None:
        cache.write(attn.layer, k, v, start)
        if isinstance(start, torch.Tensor):  # static shapes for CUDA graphs: attend to all S
            k, v = cache.keys[attn.layer], cache.values[attn.layer]
        else:
            k = cache.keys[attn.layer][:, :, : start + t]
            v = cache.values[attn.layer][:, :, : start + t]
    s = k.shape[2]
    mask = attn._mask(t, s, start, q.device)
    if mask is None and t > 1:  # causal from position 0
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
    return sink_attention(q, k, v, attn.sinks, mask).transpose(1, 2).reshape(b, t, attn.q_dim)


def _attend_ragged(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache | None,
                   batch: RaggedBatch) -> torch.Tensor:
    """Returns attention [1, N, H*Dh] of packed q [1, H, N, Dh] (k, v written to the paged cache
    first). Sequences bringing one token (every one in a decode step) attend together, padded to
    the table width; each longer one (a prompt chunk) on its own."""
    from .mla import one_token_rows

    if not isinstance(cache, PagedKVCache):
        raise MoekitError("a ragged batch (RaggedBatch) needs a PagedKVCache to attend through")
    qs, ks, vs = (z[0].transpose(0, 1) for z in (q, k, v))  # [N, H or Hkv, Dh]
    keys, values = cache.keys[attn.layer], cache.values[attn.layer]
    if batch.is_decode and _fuse_paged(attn, qs, ks, vs, keys, values):  # the cache write inside the kernel
        return paged_fused_decode(qs, ks, vs, attn.sinks, keys, values, batch.block_tables, batch.context_lens,
                                  attn.cfg.sliding_window, batch.slots).view(1, qs.shape[0], -1)
    cache.write(attn.layer, ks, vs, batch.slots)
    if batch.is_decode:
        return _decode_rows(attn, qs, ks, vs, cache, batch.block_tables, batch.context_lens)[None]
    out = qs.new_empty(qs.shape[0], attn.q_dim)  # [N, H*Dh]
    singles = one_token_rows(batch, q.device)
    if singles is not None:
        rows, tokens = singles
        out[tokens] = _decode_rows(attn, qs[tokens], ks[tokens], vs[tokens], cache, batch.block_tables[rows],
                                   batch.context_lens[rows])
    offset = 0
    for i, (start, n) in enumerate(zip(batch.starts, batch.query_lens)):
        if n > 1 or singles is None:
            length = start + n
            ki = gather_sequence(cache.keys[attn.layer], batch.block_tables[i], length)[None]  # [1, Hkv, S, Dh]
            vi = gather_sequence(cache.values[attn.layer], batch.block_tables[i], length)[None]
            mask = causal_mask(n, length, start, attn.cfg.sliding_window, q.device)
            if mask is None and n > 1:
                mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril()
            o = sink_attention(q[:, :, offset:offset + n], ki, vi, attn.sinks, mask)  # [1, H, n, Dh]
            out[offset:offset + n] = o[0].transpose(0, 1).reshape(n, -1)
        offset += n
    return out[None]


def _decode_rows(attn, qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, cache: PagedKVCache,
                 tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """Returns [B, H*Dh]: one query per sequence qs [B, H, Dh] (its key and value ks, vs [B, Hkv, Dh],
    already in the cache) over its own cached positions (block tables [B, MB], context lengths
    [B]) and sliding window: the kernel on CUDA, else the reference padded to the table width."""
    from .mla import gather_padded

    keys, values = cache.keys[attn.layer], cache.values[attn.layer]
    if _fuse_paged(attn, qs, ks, vs, keys, values):
        return paged_fused_decode(qs, ks, vs, attn.sinks, keys, values, tables, context_lens,
                                  attn.cfg.sliding_window).view(qs.shape[0], -1)
    kb, vb, mask = gather_padded(cache.keys[attn.layer], cache.values[attn.layer], tables, context_lens)
    window = attn.cfg.sliding_window
    if window is not None:  # mask [B, 1, 1, S]: the last `window` positions of each sequence
        positions = torch.arange(kb.shape[2], device=kb.device)
        mask = mask & (positions > context_lens.long()[:, None, None, None] - 1 - window)
    return sink_attention(qs[:, :, None], kb, vb, attn.sinks, mask[:, :, None]).reshape(qs.shape[0], -1)


# ---- the fused decode kernel (moekit.kernels.sink_decode); shapes as there -------------------

def fused_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor) -> bool:
    """Returns whether fused_decode / paged_fused_decode handle these tensors: q, k, v and the
    caches of one dtype with unit head-dim strides, the caches sharing strides, whole GQA groups."""
    dt = q.dtype
    return (all(z.dtype == dt and z.stride(-1) == 1 for z in (k, v, keys, values)) and q.stride(-1) == 1
            and keys.shape == values.shape and keys.stride() == values.stride()
            and q.shape[1] % k.shape[1] == 0 and q.shape[-1] == k.shape[-1] == keys.shape[-1])


# Plain (sink-free) decode through the kernel up to this head dim; past it the K and V tiles of a
# float32 model would pass the H200's shared memory (and no sm_90 build checks them), so SDPA stays.
PLAIN_DECODE_MAX_HEAD_DIM = 256
# the most positions (cache length, or the sliding window when shorter) the one-pass plain kernel (one
# program per (row, kv head) walking the context alone) attends over in place of SDPA. H200, one-token
# graph steps (probe_sink_decode.py --plain, fd5ac8f): OLMoE B=1 6.6 vs 13.1 us/layer at 70 positions in
# a 198-long cache, 27.4 vs 17.4 at 1024 of 1152; Qwen3 B=1 27.2 vs 13.8 at 1024. On lines through those
# points (B=1: ~5 + 0.022 us a live position against SDPA's ~12.2 + 0.0045 us a cached one) the kernel is
# no slower up to 384 positions. At B=32 the kernel wins with GQA (Qwen3: 8.2 vs 14.4 at 70, 28.0 vs 30.0
# at 1024) and with MHA only while the cache is longer than the live context (OLMoE: 22.9 vs 28.6 at 70
# of 198; 104.5 vs 80.2 at 1024 of 1152). Those B=32 OLMoE steps (512 programs) still run one-pass, so
# this cap stays where it was measured.
PLAIN_DECODE_MAX_POSITIONS = 384
# a sliding window shorter than the cache: the kernel's windowed bf16 results for the tiny gpt-oss model
# are off on the H200 (benchmarks/results/README.md, "Defect found"), so plain windowed steps keep SDPA
# until that is understood (gpt-oss itself runs the sinks kernel, windows included, as before)
PLAIN_DECODE_WINDOWED = False
# the same when the step's positions are split (dense_splits > 1: B * Hkv under two programs an SM):
# each run walks ~1/SPLITS of the context, then one small combine launch. Not measured yet: expected
# from the lines above ~5 + 0.022 us a position of a run + ~2-3 us for the combine, so at B=1 ~9-12 us
# against SDPA's ~17 at 1024 and ~31 at 4096 positions. Up to the longest cache the probe times
# (probe_sink_decode.py --plain: 4096 cached + 128); past it SDPA stays until measured.
PLAIN_SPLIT_DECODE_MAX_POSITIONS = 4096 + 128
# a dense step splits only when each run gets at least this many attended positions of a full cache (two
# 64-position tiles): below it the combine's extra launch costs more than the shorter walk saves (expected
# from the lines above; the probe's splits-vs-one-pass rows at 70 of 198 and 1024 of 1152 measure it)
DENSE_SPLIT_MIN_POSITIONS = 128


# The split kernel (sink_attention_split_kernel) was written and tested under the interpreter and built
# for sm_90 without running on a GPU: off by default until a GPU run checks it (tests/test_fused_sinks.py
# on CUDA, benchmarks/probes/probe_sink_decode.py --plain); MOEKIT_DECODE_SPLITS=N turns it on (and fixes N).
DENSE_SPLITS_ON = False


def dense_splits(rows: int, kv_heads: int, positions: int, device: torch.device) -> int:
    """Returns the runs fused_decode cuts each (row, kv head)'s positions into over a dense cache:
    1 unless DENSE_SPLITS_ON or MOEKIT_DECODE_SPLITS is set; else moekit.paged_attention.decode_splits'
    count for rows x kv heads programs (two programs an SM, 1 off CUDA, MOEKIT_DECODE_SPLITS fixes
    it), at most one run per DENSE_SPLIT_MIN_POSITIONS of the `positions` a step may attend (the
    cache's S, or the window): shapes only, so a captured step keeps its launch whatever the live context."""
    if not (DENSE_SPLITS_ON or os.environ.get("MOEKIT_DECODE_SPLITS")):
        return 1
    return max(1, min(decode_splits(rows, kv_heads, device), positions // DENSE_SPLIT_MIN_POSITIONS))


def plain_decode_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor,
                           values: torch.Tensor, window: int | None = None) -> bool:
    """Returns whether fused_decode without sinks stands in for moekit.model.Attention's mask and
    SDPA over these tensors (fused_supported, head dim <= PLAIN_DECODE_MAX_HEAD_DIM, at most
    PLAIN_DECODE_MAX_POSITIONS positions to attend, the cache's S [B, Hkv, S, Dh] or the window;
    PLAIN_SPLIT_DECODE_MAX_POSITIONS when fused_decode splits them)."""
    positions = keys.shape[2] if window is None else min(keys.shape[2], window)
    if positions < keys.shape[2] and not PLAIN_DECODE_WINDOWED:
        return False
    split = dense_splits(q.shape[0] * q.shape[2], k.shape[1], positions, q.device) > 1
    limit = PLAIN_SPLIT_DECODE_MAX_POSITIONS if split else PLAIN_DECODE_MAX_POSITIONS
    return (q.shape[-1] <= PLAIN_DECODE_MAX_HEAD_DIM and positions <= limit
            and fused_supported(q, k, v, keys, values))


def _fuse_paged(attn, qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor) -> bool:
    """Returns whether a ragged decode of rows qs [B, H, Dh] runs paged_fused_decode (CUDA decode)."""
    return (fused.enabled(qs, attn.sinks) and fused_supported(qs, ks, vs, keys, values)
            and keys.stride(0) == keys.shape[1] * keys.stride(1))


def fused_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None, keys: torch.Tensor,
                 values: torch.Tensor, start: torch.Tensor, window: int | None, store: bool = True,
                 splits: int | None = None) -> torch.Tensor:
    """Returns attention with sinks [N, H, Dh] (N = B*T, row b*T + t) of q [B, H, T, Dh] at positions
    start.. (a 0-d device tensor) over the cache keys, values [B, Hkv, S, Dh], after storing k, v
    [B, Hkv, T, Dh] there (positions past S dropped): one launch (two with splits), graph-capturable.
    sinks [H], or None for plain attention (torch SDPA's); store=False when k, v are in the cache
    already (the kernel reads the step's own positions from k, v either way). `splits` runs of
    positions attended side by side, then combined (default: dense_splits; 1: the one-pass kernel)."""
    b, h, t, dh = q.shape
    hkv, capacity = keys.shape[1], keys.shape[2]
    if splits is None:
        splits = dense_splits(b * t, hkv, capacity if window is None else min(capacity, window), q.device)
    if splits < 1:
        raise MoekitError(f"fused_decode: splits must be >= 1, got {splits}")
    if splits == 1:
        return _launch(q, (q.stride(0), q.stride(1), q.stride(2)), k, (k.stride(0), k.stride(1), k.stride(2)),
                       v, (v.stride(0), v.stride(1), v.stride(2)), sinks, keys, values,
                       (keys.stride(0), keys.stride(1), keys.stride(2)), hkv, capacity, start,
                       start, start, 0, 1, window, b * t, t, paged=False, store=store)
    n = b * t
    launch = sink_launch(q.dtype, dh, h // hkv, interpreted=not q.is_cuda, sinks=sinks is not None)
    part = torch.empty(n, h, splits, dh, dtype=torch.float32, device=q.device)  # [N, H, SPLITS, Dh]
    m = torch.empty(n, h, splits, dtype=torch.float32, device=q.device)  # [N, H, SPLITS]
    lsum = torch.empty_like(m)
    sink_attention_split_kernel[(n, hkv, splits)](
        q, k, v, q if sinks is None else sinks, keys, values, start, part, m, lsum,
        t, capacity, 0 if window is None else window, dh ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        H=h, WINDOW=window is not None, STORE=store, SPLITS=splits, **launch)
    # the interpreter's cast to bf16 truncates (the compiled one rounds to nearest, as torch's .to does)
    out = torch.empty((n, h, dh), dtype=q.dtype if q.is_cuda else torch.float32, device=q.device)
    paged_decode_reduce_kernel[(n, h)](
        part, m, lsum, out, h * dh, dh, h,
        SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=dh, BLOCK_D=launch["DH_PAD"], num_warps=4)
    return out.to(q.dtype)


def paged_fused_decode(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, sinks: torch.Tensor,
                       keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor, context_lens: torch.Tensor,
                       window: int | None, slots: torch.Tensor | None = None) -> torch.Tensor:
    """Returns attention with sinks [B, H, Dh] of one query per sequence qs [B, H, Dh] (its key and
    value ks, vs [B, Hkv, Dh]) over the pools keys, values [NB, BS, Hkv, Dh] read through block
    tables [B, MB] up to context_lens [B] (the new token's position included). With `slots` [B]
    the kernel stores ks, vs there first; without, they must be in the pools already."""
    # the pools' position rows flattened over blocks: row block * BS + offset at stride(1)
    return _launch(qs, (qs.stride(0), qs.stride(1), 0), ks, (ks.stride(0), ks.stride(1), 0),
                   vs, (vs.stride(0), vs.stride(1), 0), sinks, keys, values, (0, keys.stride(2), keys.stride(1)),
                   keys.shape[2], 0, context_lens.contiguous(), tables, context_lens if slots is None else slots,
                   tables.stride(0), keys.shape[1], window, qs.shape[0], 1, paged=True, store=slots is not None)


def _launch(q, sq, k, sk, v, sv, sinks, keys, values, sc, hkv, capacity, start, tables, slots, stride_tb, page,
            window, n, t, paged: bool, store: bool) -> torch.Tensor:
    """One launch of sink_attention_kernel: N rows x Hkv programs; strides (sq, sk, sv, sc) as
    (sequence, head, position); sinks None: without them."""
    h, dh = q.shape[1], q.shape[-1]
    group = h // hkv
    out = torch.empty((n, h, dh), dtype=q.dtype, device=q.device)
    sink_attention_kernel[(n, hkv)](
        q, k, v, q if sinks is None else sinks, keys, values, start, tables, slots, out,
        t, capacity, 0 if window is None else window, dh ** -0.5, *sq, *sk, *sv, *sc, stride_tb,
        slots.stride(0) if slots.dim() else 0, page,
        H=h, WINDOW=window is not None, PAGED=paged, STORE=store,
        **sink_launch(q.dtype, dh, group, interpreted=not q.is_cuda, sinks=sinks is not None))
    return out


def sink_launch(dtype: torch.dtype, head_dim: int, group: int, interpreted: bool = False,
                sinks: bool = True) -> dict:
    """Returns sink_attention_kernel's constexprs, warps and pipeline stages for a model shape: the
    paged decode kernel's tiling (moekit.paged_attention.decode_launch: G heads padded to >= 16 rows,
    the head dim to >= 16, 64 positions an iteration, 32 from head dim 256 on) under this kernel's
    names; `sinks` False for plain attention."""
    d = decode_launch(dtype, head_dim, group, 1, interpreted)
    return {"GROUP": group, "SINKS": sinks, "BLOCK_G": d["BLOCK_G"], "DH": head_dim, "DH_PAD": d["BLOCK_D"], "BLOCK_S": d["BLOCK_N"],
            "DOT_PRECISION": d["DOT_PRECISION"], "UPCAST": d["UPCAST"], "num_warps": d["num_warps"],
            "num_stages": d["num_stages"]}