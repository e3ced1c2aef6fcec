"""Multi-head latent attention (DeepSeek-V2/V3) with a latent KV cache.

Keys and values of every head come from one compressed latent per position: c = norm(x W_kva)
[r], expanded by kv_b into per-head no-rope keys and values; rope acts only on a separate slice of
q and on one rope key shared by all heads. The KV cache therefore stores the latent c [r] and the
rope key [dr] per position and layer (r + dr values, ~16x fewer than H expanded heads):
KVCache.keys[layer] holds c as [B, 1, S, r], KVCache.values[layer] the rope key as [B, 1, S, dr]
(ModelConfig.kv_cache_dims).

Two equal forms of the same attention:
  expanded  (prefill) kv_b expands the latents into per-head k, v, then ordinary attention;
  absorbed  (decode) kv_b's key half is folded into q (q_nope W_uk: a latent-space query) and its
            value half applied after the softmax (ctx W_uv), so a step reads the cached latents
            directly and never expands S positions into H heads.
On CUDA decode (moekit.fused) a step's latent norm and ropes run as one kernel (project) and its
cache write and absorbed attention as kernels between kv_b's two batched GEMMs (attend, at a
device-tensor position with a plain KVCache, and the paged serving decode): a split kernel whose
programs each read a run of the cached latents once for 16 heads, and a combine kernel; the
PyTorch code below is their reference and runs everywhere else.

Shapes: B = batch, T = new tokens, S = cached positions, D = hidden, H = heads,
r = kv_lora_rank, rq = q_lora_rank, dn = qk_nope_head_dim, dr = qk_rope_head_dim,
dv = v_head_dim, dqk = dn + dr.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .config import ModelConfig
from .errors import MoekitError
from .kv_cache import KVCache, PagedKVCache, RaggedBatch
from .linear import Linear, load_rows
from .paged_attention import gather_sequence
from .rope import apply_rope, yarn_mscale

LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm use DeepSeek's default, not rms_norm_eps


class LatentRMSNorm(nn.Module):
    """RMSNorm of the q and kv latents (float32 statistics, HF's convention)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(x, self.weight) and x.dtype == self.weight.dtype:  # one kernel in place of eight
            return fused.rms_norm(x, self.weight, LATENT_NORM_EPS)
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + LATENT_NORM_EPS)).to(x.dtype)


def softmax_scale(cfg: ModelConfig) -> float:
    """Returns MLA's softmax scale: 1/sqrt(dqk), times yarn's mscale(factor, mscale_all_dim)^2."""
    scale = cfg.mla.qk_head_dim ** -0.5
    if cfg.rope.scaling == "yarn" and cfg.rope.mscale_all_dim:
        scale *= yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim) ** 2
    return scale


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Returns x [..., T, dr] rotated pairwise: (x0, x1), (x2, x3) ... each by one frequency (cos,
    sin [T, dr] as cat(freqs, freqs)); the output holds the rotated first members, then the
    second ones (DeepSeek-V3's layout; any fixed order works, as q and k share it)."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class LatentAttention(nn.Module):
    """MLA with the same steps as moekit.model.Attention: project (q, latent, rope key), attend
    (cache + attention, output before o_proj), o_proj."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        m = cfg.mla
        if m is None:
            raise MoekitError("LatentAttention needs a ModelConfig with mla set")
        self.cfg, self.layer, self.mla = cfg, layer, m
        d, h, bias = cfg.hidden_size, cfg.num_heads, cfg.qkv_bias
        self.q_dim = h * m.qk_head_dim
        if m.q_lora_rank:
            self.q_a_proj = Linear(d, m.q_lora_rank, bias=bias)
            self.q_a_norm = LatentRMSNorm(m.q_lora_rank)
            self.q_b_proj = Linear(m.q_lora_rank, self.q_dim, bias=False)
        else:
            self.q_proj = Linear(d, self.q_dim, bias=False)
        self.kv_a_proj = Linear(d, m.kv_lora_rank + m.qk_rope_head_dim, bias=bias)  # [r + dr, D]
        self.kv_a_norm = LatentRMSNorm(m.kv_lora_rank)
        self.kv_b_proj = Linear(m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = Linear(h * m.v_head_dim, d, bias=cfg.o_bias)
        self.scale = softmax_scale(cfg)

    # ---- steps -------------------------------------------------------------------------------
    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Returns (q [B, H, T, dqk] (no-rope part, then rope part), latent [B, 1, T, r],
        rope key [B, 1, T, dr]) for normed input x [B, T, D] and cos, sin [T, dr]."""
        m, b, t = self.mla, x.shape[0], x.shape[1]
        if m.q_lora_rank:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        kv = self.kv_a_proj(x)  # [B, T, r + dr]
        if (fused.enabled(q, self.kv_a_norm.weight) and cos.shape[0] == t
                and fused.mla_project_supported(q, kv, self.kv_a_norm.weight, cos, sin)):
            # the latent norm, both ropes and q's assembly in one kernel (CUDA decode)
            q, latent, k_rope = fused.mla_project(q, kv, self.kv_a_norm.weight, cos, sin, self.cfg.num_heads,
                                                  m.qk_nope_head_dim, m.kv_lora_rank, m.rope_interleave,
                                                  LATENT_NORM_EPS)
            return (q.view(b, t, *q.shape[1:]).transpose(1, 2), latent.view(b, 1, t, -1),
                    k_rope.view(b, 1, t, -1))
        q = q.view(b, t, self.cfg.num_heads, m.qk_head_dim).transpose(1, 2)  # [B, H, T, dqk]
        q_nope, q_rope = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent, k_rope = kv.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_norm(latent)[:, None]  # [B, 1, T, r]
        k_rope = k_rope[:, None]  # [B, 1, T, dr]
        rotate = rope_interleaved if m.rope_interleave else apply_rope
        q = torch.cat((q_nope, rotate(q_rope, cos, sin)), dim=-1)
        return q, latent, rotate(k_rope, cos, sin)

    def attend(self, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
               cache: KVCache | PagedKVCache | None, start: int | torch.Tensor | RaggedBatch,
               absorbed: bool | None = None) -> torch.Tensor:
        """Returns the attention output [B, T, H*dv] (before o_proj); stores the latent and the
        rope key in the cache. `absorbed` (default: with a cache and one new token per sequence)
        picks the absorbed form over the expanded one; both give the same output."""
        if isinstance(start, RaggedBatch):
            return self._attend_ragged(q, latent, k_rope, cache, start)
        b, _, t, _ = q.shape
        if type(cache) is KVCache and isinstance(start, torch.Tensor) and absorbed is not False:
            out = self._attend_fused(q, latent, k_rope, cache, start)
            if out is not None:
                return out
        if cache is not None:
            cache.write(self.layer, latent, k_rope, start)
            if isinstance(start, torch.Tensor):  # static shapes for CUDA graphs: attend to all S
                latent, k_rope = cache.keys[self.layer], cache.values[self.layer]
            else:
                latent = cache.keys[self.layer][:, :, : start + t]
                k_rope = cache.values[self.layer][:, :, : start + t]
        if absorbed is None:
            absorbed = cache is not None and t == 1
        mask = self._mask(t, latent.shape[2], start, q.device)
        out = (self._absorbed if absorbed else self._expanded)(q, latent, k_rope, mask)  # [B, H, T, dv]
        return out.transpose(1, 2).reshape(b, t, -1)

    def _attend_fused(self, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, cache: KVCache,
                      start: torch.Tensor) -> torch.Tensor | None:
        """Returns attend's output [B, T, H*dv] from one kernel (cache write + absorbed attention;
        CUDA decode at a device position), or None where the reference must run."""
        b, h, t, dqk = q.shape
        w = self.kv_b_proj.weight
        if not fused.enabled(start, q, w):
            return None
        rows_q = q.transpose(1, 2).reshape(b * t, h, dqk).contiguous()  # a view after mla_project
        rows_lat = latent.reshape(b * t, -1).contiguous()
        rows_rope = k_rope.reshape(b * t, -1).contiguous()
        keys, values = cache.keys[self.layer], cache.values[self.layer]
        if not fused.mla_attention_supported(rows_q, w, rows_lat, rows_rope, keys, values):
            return None
        out = fused.mla_attention(rows_q, w, rows_lat, rows_rope, keys, values, start, t, self.mla.v_head_dim,
                                  self.scale)
        return out.view(b, t, -1)

    # ---- the two forms -----------------------------------------------------------------------
    def _kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns kv_b's key half W_uk [H, dn, r] and value half W_uv [H, dv, r]."""
        m = self.mla
        w = self.kv_b_proj.weight.view(self.cfg.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        return w[:, : m.qk_nope_head_dim], w[:, m.qk_nope_head_dim:]

    def _expanded(self, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """Returns [B, H, T, dv]: the latents [B, 1, S, r] expanded into per-head keys and values."""
        m, h = self.mla, self.cfg.num_heads
        b, _, s, _ = latent.shape
        kv = self.kv_b_proj(latent[:, 0]).view(b, s, h, -1).transpose(1, 2)  # [B, H, S, dn + dv]
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(b, h, s, m.qk_rope_head_dim)), dim=-1)  # [B, H, S, dqk]
        causal = mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)

    def _absorbed(self, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """Returns [B, H, T, dv] reading the latents [B, 1, S, r] directly: scores are
        (q_nope W_uk) . c + q_rope . k_rope, the output (softmax . c) W_uv^T."""
        m = self.mla
        w_uk, w_uv = self._kv_b()
        q_nope, q_rope = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # [B, H, T, r]
        scores = (q_latent @ latent.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)).float() * self.scale
        if mask is None and q.shape[2] > 1:  # causal from position 0 (T == S)
            mask = torch.ones(q.shape[2], latent.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(latent.dtype)  # [B, H, T, S]
        ctx = probs @ latent  # [B, H, T, r]
        return torch.einsum("bhtr,hvr->bhtv", ctx, w_uv)

    def _mask(self, t: int, s: int, start: int | torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """Returns a boolean [T, S] mask (True = may attend), or None when plain causal will do."""
        if not isinstance(start, torch.Tensor) and (t == 1 or s == t):
            return None
        query_pos = start + torch.arange(t, device=device)[:, None]  # [T, 1]
        return torch.arange(s, device=device)[None, :] <= query_pos

    def _attend_ragged(self, q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                       cache: PagedKVCache | None, batch: RaggedBatch) -> torch.Tensor:
        """Returns attention [1, N, H*dv] of packed q [1, H, N, dqk]: latents [1, 1, N, r] and rope
        keys written to the paged cache first. Sequences bringing one token (every one in a decode
        step) attend together in the absorbed form; each longer one (a prompt chunk) on its own,
        expanded."""
        if not isinstance(cache, PagedKVCache):
            raise MoekitError("a ragged batch (RaggedBatch) needs a PagedKVCache to attend through")
        cache.write(self.layer, latent[0].transpose(0, 1), k_rope[0].transpose(0, 1), batch.slots)
        keys, values = cache.keys[self.layer], cache.values[self.layer]
        qs = q[0].transpose(0, 1)  # [N, H, dqk]
        if batch.is_decode:
            return self._decode_rows(qs, keys, values, batch.block_tables, batch.context_lens)[None]
        out = qs.new_empty(qs.shape[0], self.cfg.num_heads * self.mla.v_head_dim)  # [N, H*dv]
        singles = one_token_rows(batch, q.device)
        if singles is not None:
            rows, tokens = singles
            out[tokens] = self._decode_rows(qs[tokens], keys, values, batch.block_tables[rows],
                                            batch.context_lens[rows])
        offset = 0
        for i, (start, n) in enumerate(zip(batch.starts, batch.query_lens)):
            if n > 1 or singles is None:
                length = start + n
                lat = gather_sequence(keys, batch.block_tables[i], length)[None]  # [1, 1, S, r]
                rope = gather_sequence(values, batch.block_tables[i], length)[None]
                form = self._absorbed if n == 1 else self._expanded
                o = form(q[:, :, offset:offset + n], lat, rope, self._mask(n, length, start, q.device))
                out[offset:offset + n] = o[0].transpose(0, 1).reshape(n, -1)  # [1, H, n, dv] -> [n, H*dv]
            offset += n
        return out[None]

    def _decode_rows(self, qs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                     context_lens: torch.Tensor) -> torch.Tensor:
        """Returns [B, H*dv]: one query per sequence qs [B, H, dqk], each over its own cached
        latents (block tables [B, MB], context lengths [B]), in the absorbed form."""
        w = self.kv_b_proj.weight
        if fused.enabled(qs, w):  # one kernel reading the pools through the tables (CUDA decode)
            rows = qs.contiguous()
            if fused.mla_paged_decode_supported(rows, w, keys, values):
                return fused.mla_paged_decode(rows, w, keys, values, tables, context_lens, self.mla.v_head_dim,
                                              self.scale)
        lat, rope, mask = gather_padded(keys, values, tables, context_lens)
        return self._absorbed(qs[:, :, None], lat, rope, mask).reshape(qs.shape[0], -1)  # [B, H, 1, dv]


def one_token_rows(batch: RaggedBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Returns (their rows in the batch [B1], their tokens in the packed input [B1]) of the
    sequences of a ragged step that bring one token, when there are two or more, else None."""
    ends = list(itertools.accumulate(batch.query_lens))
    singles = [i for i, n in enumerate(batch.query_lens) if n == 1]
    if len(singles) < 2:
        return None
    rows = torch.tensor(singles).to(device, non_blocking=True)
    tokens = torch.tensor([ends[i] - 1 for i in singles]).to(device, non_blocking=True)
    return rows, tokens


def gather_padded(keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor, context_lens: torch.Tensor):
    """Returns (keys [B, Hkv, S, dk], values [B, Hkv, S, dv], mask [B, 1, 1, S]) of B sequences,
    read through their block tables [B, MB] from pools [NB, BS, Hkv, d] and padded to the table
    width (S = MB * BS); the mask keeps each sequence's own positions (< its context length)."""
    tables = tables.long()  # [B, MB]
    b = tables.shape[0]

    def padded(pool: torch.Tensor) -> torch.Tensor:
        return pool[tables].reshape(b, -1, *pool.shape[2:]).transpose(1, 2)  # [B, Hkv, S, d]

    k, v = padded(keys), padded(values)
    positions = torch.arange(k.shape[2], device=k.device)
    mask = positions[None, :] < context_lens.long()[:, None]  # [B, S]
    return k, v, mask[:, None, None, :]


def fill_latent_attention(attn: LatentAttention, ckpt, family, cfg: ModelConfig, layer: int) -> None:
    """Fills one layer's MLA weights (storage already on the device) from the checkpoint."""
    m = cfg.mla

    def copy(param: torch.Tensor, part: str) -> None:
        param.copy_(ckpt.read(family.attn_name(layer, part), shape=tuple(param.shape), dtype=param.dtype))

    def copy_weight(linear: torch.nn.Module, part: str) -> None:  # Linear or Int8Linear (linear.load_rows)
        shape = (linear.out_features, linear.in_features)
        load_rows(linear, 0, lambda dtype: ckpt.read(family.attn_name(layer, part), shape=shape, dtype=dtype))

    if m.q_lora_rank:
        copy_weight(attn.q_a_proj, "q_a_proj.weight")
        copy(attn.q_a_norm.weight, "q_a_layernorm.weight")
        copy_weight(attn.q_b_proj, "q_b_proj.weight")
        if attn.q_a_proj.bias is not None:
            copy(attn.q_a_proj.bias, "q_a_proj.bias")
    else:
        copy_weight(attn.q_proj, "q_proj.weight")
    copy_weight(attn.kv_a_proj, "kv_a_proj_with_mqa.weight")
    if attn.kv_a_proj.bias is not None:
        copy(attn.kv_a_proj.bias, "kv_a_proj_with_mqa.bias")
    copy(attn.kv_a_norm.weight, "kv_a_layernorm.weight")
    copy(attn.kv_b_proj.weight, "kv_b_proj.weight")
    copy_weight(attn.o_proj, "o_proj.weight")
    if attn.o_proj.bias is not None:
        copy(attn.o_proj.bias, "o_proj.bias")
