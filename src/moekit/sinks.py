"""Attention with sinks (gpt-oss): a learned logit per head joins every query's softmax as one
more column and is dropped after it, so a query may put weight "nowhere".

softmax with a sink s over scores z_1..z_S gives p_i = exp(z_i) / (sum_j exp(z_j) + exp(s)): the
ordinary attention output times sigmoid(logsumexp(z) - s). The scores are computed here in
PyTorch (no fused kernel takes a sink column yet), for the dense, cached, graph-captured and
ragged (paged) paths alike; moekit.model.SinkAttention calls `attend` from its own attend.

Shapes: B = batch, H = query heads, Hkv = key/value heads, T = new tokens, S = attended
positions, Dh = head dim, N = packed tokens of a ragged step.
"""

from __future__ import annotations

import torch

from .errors import MoekitError
from .kv_cache import KVCache, PagedKVCache, RaggedBatch
from .paged_attention import causal_mask, gather_sequence


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
    cache.write(attn.layer, k[0].transpose(0, 1), v[0].transpose(0, 1), batch.slots)
    qs = q[0].transpose(0, 1)  # [N, H, Dh]
    if batch.is_decode:
        return _decode_rows(attn, qs, cache, batch.block_tables, batch.context_lens)[None]
    out = qs.new_empty(qs.shape[0], attn.q_dim)  # [N, H*Dh]
    singles = one_token_rows(batch, q.device)
    if singles is not None:
        rows, tokens = singles
        out[tokens] = _decode_rows(attn, qs[tokens], cache, batch.block_tables[rows], batch.context_lens[rows])
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


def _decode_rows(attn, qs: torch.Tensor, cache: PagedKVCache, tables: torch.Tensor,
                 context_lens: torch.Tensor) -> torch.Tensor:
    """Returns [B, H*Dh]: one query per sequence qs [B, H, Dh] over its own cached positions (block
    tables [B, MB], context lengths [B]) and sliding window, padded to the table width."""
    from .mla import gather_padded

    kb, vb, mask = gather_padded(cache.keys[attn.layer], cache.values[attn.layer], tables, context_lens)
    window = attn.cfg.sliding_window
    if window is not None:  # mask [B, 1, 1, S]: the last `window` positions of each sequence
        positions = torch.arange(kb.shape[2], device=kb.device)
        mask = mask & (positions > context_lens.long()[:, None, None, None] - 1 - window)
    return sink_attention(qs[:, :, None], kb, vb, attn.sinks, mask[:, :, None]).reshape(qs.shape[0], -1)
