"""Multi-head latent attention (DeepSeek-V2/V3, moekit.mla) in CGOPipe: the host pool holds each
position's latent and rope key side by side, the CPU attends over them in the absorbed form, and
kv_b's two halves run on the model's device around it.

MLA's absorbed decode attention is grouped-query attention with one kv head:

    scores_h = (q_nope_h W_uk_h) . c + q_rope_h . k_rope = [q_nope_h W_uk_h | q_rope_h] . [c | k_rope]
    ctx_h    = softmax(scale * scores_h) @ c,       output_h = ctx_h W_uv_h^T

so with a joint pool row [c | k_rope] (r + dr values) as both the key and the value, the native
kernel's output over it is [ctx_h | softmax @ k_rope]: its first r values are ctx_h (the last dr,
10% of a row for DeepSeek's 512 + 64, are dropped on the device). PreAttn (the device) makes the
absorbed query [q_nope W_uk | q_rope], scaled so that the kernel's 1/sqrt(r + dr) gives MLA's
softmax scale; PostAttn applies W_uv to ctx before o_proj. The CPU moves r + dr values per
position and head group instead of H expanded heads, and nothing of kv_b crosses to the host.

Shapes: mu sequences of a micro-batch, H heads, r = kv_lora_rank, dr = qk_rope_head_dim,
dn = qk_nope_head_dim, dv = v_head_dim, NB blocks of BS positions.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kv_cache import PagedKVCache


class LatentHostCache(PagedKVCache):
    """A host PagedKVCache of an MLA model whose latent and rope key of a position lie in one row:
    per layer `joint` [NB + 1, BS, 1, r + dr]; `keys` [.., r] and `values` [.., dr] are views of
    it (what PagedKVCache.write and the prefill's copies fill), `joint` what the kernel reads."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, device, dtype: torch.dtype):
        super().__init__(config, num_blocks, block_size, "meta", dtype)  # checks and block lists; no storage
        (_, r), (_, dr) = config.kv_cache_dims()
        self.device = torch.device(device)
        self.joint = [torch.zeros((num_blocks + 1, block_size, 1, r + dr), device=device, dtype=dtype)
                      for _ in range(config.num_layers)]
        self.keys = [pool[..., :r] for pool in self.joint]
        self.values = [pool[..., r:] for pool in self.joint]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.joint)


def host_cache(config: ModelConfig, tokens: int, block_size: int, dtype: torch.dtype) -> PagedKVCache:
    """Returns the host KV cache CGOPipe decodes over for `tokens` positions: a LatentHostCache for
    an MLA model, else a PagedKVCache on the CPU."""
    cls = LatentHostCache if config.mla is not None else PagedKVCache
    return cls.for_tokens(config, tokens, block_size, "cpu", dtype)


def query_width(config: ModelConfig) -> int:
    """Returns the width of one head's query in CGOPipe's packet (and of its attention output):
    r + dr for MLA (the absorbed query), else the head dim."""
    if config.mla is None:
        return config.head_dim
    return config.mla.kv_lora_rank + config.mla.qk_rope_head_dim


def absorbed_query(attn, q: torch.Tensor) -> torch.Tensor:
    """Returns the absorbed query [1, H, mu, r + dr] of an MLA layer's q [1, H, mu, dn + dr]
    (moekit.mla.LatentAttention `attn`): [q_nope W_uk | q_rope], times scale * sqrt(r + dr), so that
    an attention scaled by 1/sqrt(r + dr) applies MLA's softmax scale."""
    m = attn.mla
    w_uk = kv_b_halves(attn)[0]  # [H, dn, r]
    q_nope, q_rope = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
    q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # [1, H, mu, r]
    width = m.kv_lora_rank + m.qk_rope_head_dim
    return torch.cat((q_latent, q_rope), dim=-1) * (attn.scale * width ** 0.5)


def latent_output(attn, out: torch.Tensor) -> torch.Tensor:
    """Returns an MLA layer's attention output [1, mu, H * dv] (before o_proj) from the CPU's
    output over the joint pool out [mu, H, r + dr]: its first r values (ctx) times W_uv."""
    w_uv = kv_b_halves(attn)[1]  # [H, dv, r]
    ctx = out[..., : attn.mla.kv_lora_rank]  # [mu, H, r]
    return torch.einsum("thr,hvr->thv", ctx, w_uv).reshape(1, out.shape[0], -1)


def kv_b_halves(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns kv_b's key half W_uk [H, dn, r] and value half W_uv [H, dv, r] (views of its weight)."""
    m = attn.mla
    w = attn.kv_b_proj.weight.view(attn.cfg.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    return w[:, : m.qk_nope_head_dim], w[:, m.qk_nope_head_dim:]
