"""The moekit decoder: a Mixture-of-Experts transformer, readable top to bottom.

One class per part: RMSNorm, Attention, DenseMLP, MoEBlock, DecoderLayer, MoEModel. Each layer
exposes its steps -- pre_attn (norm, qkv, rope), attend (cache + softmax attention), post_attn
(o-proj, residual, norm, router, experts) -- so that other engines can run them separately.
Experts sit behind the expert seam (moekit.experts): the MoE block only routes.

Shape legend:
    B = batch, T = new tokens, S = cached positions, D = hidden, V = vocab,
    H = query heads, Hkv = key/value heads, Dh = head dim,
    N = B*T tokens, E = experts, A = experts per token (top-k), I = expert ffn width
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fused, sinks
from .config import ModelConfig
from .errors import MoekitError
from .experts import ResidentExperts
from .kv_cache import KVCache, PagedKVCache, RaggedBatch
from .linear import Int8Linear, Linear
from .paged_attention import causal_mask, decode_attention, prefill_attention
from .rope import apply_rope, cos_sin, inverse_frequencies
from .routers import route

# Eager decode attends over a prefix one longer every step. PyTorch prefers cuDNN attention on
# Hopper, which builds a plan per new key length: 2.4 ms of host time per layer call, measured on
# the H200 (benchmarks/profile_offload.py), 30x the attention itself. Flash (else memory-
# efficient, else math) attention needs no plan, so eager decode steps ask for them.
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(x, self.weight):  # one kernel in place of eight (CUDA decode)
            return fused.rms_norm(x, self.weight, self.eps)
        # float32 statistics, then back to the input dtype before the weight (HF's convention)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """Returns the model's norm over `dim` features: RMSNorm, or LayerNorm with a bias (cfg.norm)."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(dim, eps=cfg.rms_norm_eps)
    return RMSNorm(dim, cfg.rms_norm_eps)


class Attention(nn.Module):
    """Grouped-query attention with fused qkv, optional q/k RMSNorm, rope and clipping."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q_dim = cfg.num_heads * cfg.head_dim
        self.kv_dim = cfg.num_kv_heads * cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, self.q_dim + 2 * self.kv_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_dim, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.q_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_dim, cfg.rms_norm_eps)
        # a softmax scale other than 1/sqrt(Dh) (Granite's attention_multiplier) is folded into q,
        # so every attention path (dense, paged, captured) applies it
        self.q_scale = 1.0 if cfg.attention_scale is None else cfg.attention_scale * cfg.head_dim ** 0.5

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Returns q [B, H, T, Dh], k, v [B, Hkv, T, Dh] for normed input x [B, T, D]."""
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = self.qkv(x)
        if self._fuse_project(qkv, cos, sin):  # norms, clamp, scale and rope in one kernel
            weights = None if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
            q, k, v = fused.qk_norm_rope(qkv, cos, sin, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qk_norm,
                                         weights, cfg.rms_norm_eps, cfg.clip_qkv, self.q_scale)
            return tuple(z.view(b, t, -1, cfg.head_dim).transpose(1, 2) for z in (q, k, v))
        q, k, v = qkv.split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (z.clamp(-cfg.clip_qkv, cfg.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, cfg.num_heads, cfg.head_dim)
        k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        r = cfg.rope_dim
        if r < cfg.head_dim:  # partial rotary: rope on the first r dims of each head only
            q = torch.cat((apply_rope(q[..., :r], cos, sin), q[..., r:]), dim=-1)
            k = torch.cat((apply_rope(k[..., :r], cos, sin), k[..., r:]), dim=-1)
            return q, k, v
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _fuse_project(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        """Returns whether project runs fused.qk_norm_rope on qkv [B, T, ...] (CUDA decode)."""
        weights = () if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
        return (fused.enabled(qkv, *weights) and cos.shape[0] == qkv.shape[1] and cos.shape[-1] % 2 == 0
                and fused.qk_norm_rope_supported(qkv, cos, sin, self.cfg.num_heads, self.cfg.num_kv_heads,
                                                 self.cfg.head_dim, weights or None))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: KVCache | PagedKVCache | None, start: int | torch.Tensor | RaggedBatch) -> torch.Tensor:
        """Returns the attention output [B, T, H*Dh] (before o_proj); stores k, v in the cache.

        With a RaggedBatch for `start` (and a PagedKVCache), B is 1 and T the packed tokens of
        every sequence of the step: each attends to its own cached positions only."""
        if isinstance(start, RaggedBatch):
            return self._attend_ragged(q, k, v, cache, start)
        b, _, t, _ = q.shape
        fused_mask = None
        if cache is not None:
            keys, values = cache.keys[self.layer], cache.values[self.layer]
            graph_step = isinstance(start, torch.Tensor) and type(cache) is KVCache and fused.enabled(start, q, k, v)
            # one token a sequence: the attention is one kernel (moekit.sinks' without sinks) and no mask is built
            direct = graph_step and t == 1 and sinks.plain_decode_supported(q, k, v, keys, values,
                                                                            self.cfg.sliding_window)
            if graph_step and fused.write_kv_supported(keys, values, k, v):
                # the cache write (and the mask) in one kernel, in place of eight
                fused_mask = fused.write_kv(keys, values, k, v, start, mask=not direct, window=self.cfg.sliding_window)
            else:
                cache.write(self.layer, k, v, start)
            if direct:
                out = sinks.fused_decode(q, k, v, None, keys, values, start, self.cfg.sliding_window, store=False)
                return out.view(b, t, self.q_dim)
            if isinstance(start, torch.Tensor):  # static shapes for CUDA graphs: attend to all S
                k, v = cache.keys[self.layer], cache.values[self.layer]
            else:
                k = cache.keys[self.layer][:, :, : start + t]
                v = cache.values[self.layer][:, :, : start + t]
        mask = self._mask(t, k.shape[2], start, q.device) if fused_mask is None else fused_mask
        gqa = self.cfg.num_kv_heads != self.cfg.num_heads
        if t == 1 and q.is_cuda and not isinstance(start, torch.Tensor):
            with sdpa_kernel(_DECODE_BACKENDS):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1,
                                                 enable_gqa=gqa)
        return out.transpose(1, 2).reshape(b, t, self.q_dim)

    def _attend_ragged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKVCache | None,
                       batch: RaggedBatch) -> torch.Tensor:
        """Returns attention [1, N, H*Dh] of packed q [1, H, N, Dh] (k, v [1, Hkv, N, Dh] written
        to the paged cache first)."""
        if not isinstance(cache, PagedKVCache):
            raise MoekitError("a ragged batch (RaggedBatch) needs a PagedKVCache to attend through")
        n = q.shape[2]
        q, k, v = (z[0].transpose(0, 1) for z in (q, k, v))  # [N, heads, Dh]
        cache.write(self.layer, k, v, batch.slots)
        keys, values = cache.keys[self.layer], cache.values[self.layer]
        window = self.cfg.sliding_window
        if batch.is_decode:
            out = decode_attention(q, keys, values, batch.block_tables, batch.context_lens, window)
        else:
            out = prefill_attention(q, keys, values, batch, window)
        return out.reshape(1, n, self.q_dim)

    def _mask(self, t: int, s: int, start: int | torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """Returns a boolean [T, S] mask (True = may attend), or None when plain causal will do."""
        if not isinstance(start, torch.Tensor):
            return causal_mask(t, s, start, self.cfg.sliding_window, device)
        if fused.enabled(start):
            return fused.decode_mask(start, t, s, self.cfg.sliding_window)
        query_pos = start + torch.arange(t, device=device)[:, None]  # [T, 1]
        key_pos = torch.arange(s, device=device)[None, :]  # [1, S]
        mask = key_pos <= query_pos
        if self.cfg.sliding_window is not None:
            mask = mask & (key_pos > query_pos - self.cfg.sliding_window)
        return mask


class SinkAttention(Attention):
    """Attention whose softmax has a learned sink logit per head (gpt-oss; moekit.sinks)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.sinks = nn.Parameter(torch.zeros(cfg.num_heads))  # [H]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cache: KVCache | PagedKVCache | None, start: int | torch.Tensor | RaggedBatch) -> torch.Tensor:
        """Returns the attention output [B, T, H*Dh] (before o_proj); stores k, v in the cache."""
        return sinks.attend(self, q, k, v, cache, start)


class DenseMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), gate and up fused into one projection."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_up = Linear(hidden, 2 * ffn, bias=False)
        self.down = Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        if fused.enabled(h) and h.shape[-1] % 2 == 0:  # silu and the product in one kernel (CUDA decode)
            return self.down(fused.swiglu(h))
        gate, up = h.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class MoEBlock(nn.Module):
    """Router + routed experts (behind the expert seam) + optional gated shared expert."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.top_k = cfg.top_k  # may be lowered after loading (top-k reduction)
        self.skip_below = 0.0  # dynamic skip: drop experts whose weight < skip_below * the top weight
        num_experts = cfg.experts_in(layer)
        self.router = Linear(cfg.hidden_size, num_experts, bias=cfg.router_bias)
        self.experts: nn.Module = ResidentExperts(num_experts, cfg.hidden_size, cfg.expert_ffn)
        self.shared = DenseMLP(cfg.hidden_size, cfg.shared_expert_ffn) if cfg.shared_expert_ffn else None
        self.shared_gate = (Linear(cfg.hidden_size, 1, bias=False)
                            if self.shared is not None and cfg.shared_expert_gate else None)
        # DeepSeek-V3's e_score_correction_bias [E], float32: added to the scores for selection only
        self.score_bias = nn.Buffer(torch.zeros(num_experts)) if cfg.router.correction_bias else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (router logits [N, E], expert ids [N, A], weights [N, A]) for x [N, D]."""
        logits = self.router(x)
        rule = self.cfg.router
        if (rule.scoring == "softmax" and not rule.group_limited and fused.enabled(logits)
                and fused.softmax_topk_supported(logits, self.top_k)):  # softmax, top-k, renorm: one kernel
            ids, weights = fused.softmax_topk(logits, self.top_k, self.cfg.norm_topk_prob, self.skip_below,
                                              rule.scaling_factor, x.dtype)
            return logits, ids, weights
        ids, weights = route(logits, self.cfg.router, self.top_k, self.cfg.norm_topk_prob,
                             self.score_bias, self.skip_below)
        return logits, ids, weights.to(x.dtype)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """Returns the (gated) shared expert's output [N, D] for x [N, D], or None without one."""
        if self.shared is None:
            return None
        out = self.shared(x)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x)) * out
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the block's output [B, T, D] for normed x [B, T, D] (DecoderLayer.route and
        combine are the same steps cut at the expert call)."""
        b, t, d = x.shape
        flat = x.reshape(-1, d)  # [N, D]
        _, ids, weights = self.route(flat)
        out = self.experts(flat, ids, weights)
        shared = self.shared_output(flat)
        if shared is not None:
            out = out + shared
        return out.view(b, t, d)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_norm = make_norm(cfg, cfg.hidden_size)
        self.attn = _attention(cfg.attention_config(layer), layer)
        self.post_norm = make_norm(cfg, cfg.hidden_size)
        self.residual_multiplier = cfg.residual_multiplier  # Granite scales each block's output
        self.mlp: nn.Module = MoEBlock(cfg, layer) if cfg.moe_layers[layer] else DenseMLP(cfg.hidden_size, cfg.dense_ffn)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoEBlock)

    def pre_attn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Returns (q, k, v) for residual stream x [B, T, D]."""
        return self.attn.project(self.input_norm(x), cos, sin)

    def route(self, x: torch.Tensor, attn_out: torch.Tensor):
        """Returns what an MoE layer hands its experts after attention: (residual stream [B, T, D],
        expert input [N, D], expert ids [N, A], weights [N, A], shared-expert output [N, D] or None)."""
        x, normed = self.add_attention_norm(x, attn_out)
        flat = normed.reshape(-1, x.shape[-1])
        _, ids, weights = self.mlp.route(flat)
        return x, flat, ids, weights, self.mlp.shared_output(flat)

    def combine(self, resid: torch.Tensor, experts_out: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        """Returns the residual stream after an MoE layer from its routed experts' output [N, D]."""
        out = experts_out if shared is None else experts_out + shared
        return self.add_mlp(resid, out.view_as(resid))

    def add_attention(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Returns the residual stream x [B, T, D] plus the o-projected attention output."""
        out = self.attn.o_proj(attn_out)
        return x + (out if self.residual_multiplier == 1.0 else out * self.residual_multiplier)

    def add_attention_norm(self, x: torch.Tensor, attn_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (add_attention(x, attn_out), post_norm of it), both [B, T, D]: on CUDA decode
        the residual add and the norm run as one kernel."""
        out = self.attn.o_proj(attn_out)
        norm = self.post_norm
        if (isinstance(norm, RMSNorm) and out.dtype == x.dtype and not (norm._forward_hooks or norm._forward_pre_hooks)
                and fused.enabled(x, norm.weight, out)):
            return fused.add_rms_norm(x, out, norm.weight, norm.eps, self.residual_multiplier)
        x = x + (out if self.residual_multiplier == 1.0 else out * self.residual_multiplier)
        return x, norm(x)

    def add_mlp(self, x: torch.Tensor, mlp_out: torch.Tensor) -> torch.Tensor:
        """Returns the residual stream x [B, T, D] plus the MLP/MoE block's output [B, T, D]."""
        return x + (mlp_out if self.residual_multiplier == 1.0 else mlp_out * self.residual_multiplier)

    def post_attn(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Returns the residual stream after o-proj and the MLP/MoE block (route + experts +
        combine, run as one call of the block so hooks on it see every token)."""
        x, normed = self.add_attention_norm(x, attn_out)
        return self.add_mlp(x, self.mlp(normed))

    def forward(self, x, cos, sin, cache: KVCache | PagedKVCache | None = None,
                start: int | torch.Tensor | RaggedBatch = 0):
        q, k, v = self.pre_attn(x, cos, sin)
        return self.post_attn(x, self.attn.attend(q, k, v, cache, start))


class MoEModel(nn.Module):
    """A decoder-only MoE language model: `model(input_ids)` returns logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        inv_freq, self.rope_scale = inverse_frequencies(cfg.rope, cfg.rope_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.generation_defaults: dict = {}  # filled from generation_config.json by the loader
        self.expert_runtime = None  # a placement the layers' expert sources share (experts.runtime), or None

    @property
    def offload(self):
        """The offload runtime of an offloaded model (its expert runtime), else None."""
        return self.expert_runtime

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device  # the input embedding table may live in host memory

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def embed_input(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Returns the residual stream's input [B, T, D] for input_ids [B, T]."""
        x = self.embed(input_ids)
        return x if self.config.embedding_multiplier == 1.0 else x * self.config.embedding_multiplier

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Returns logits [B, T, V] of the last layer's residual stream x [B, T, D]."""
        logits = self.lm_head(self.norm(x))
        return logits if self.config.logits_scaling == 1.0 else logits / self.config.logits_scaling

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (cos, sin) [T, Dh] for positions [T]."""
        return cos_sin(self.inv_freq, self.rope_scale, positions, self.dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | PagedKVCache | None = None,
                start: int | torch.Tensor | RaggedBatch = 0, last_only: bool = False) -> torch.Tensor:
        """Returns logits [B, T, V] (or [B, 1, V] with last_only) for input_ids [B, T].

        `start` is the position of input_ids[:, 0]: a Python int, or a 0-d device tensor for
        graph-captured decode steps (then the cache must be given). For a ragged step it is a
        RaggedBatch (with a PagedKVCache): input_ids [1, N] are the packed new tokens of its
        sequences, each at its own positions; last_only then gives each sequence's last logits [B, 1, V].
        """
        t = input_ids.shape[1]
        if isinstance(start, RaggedBatch):
            if input_ids.shape[0] != 1 or t != start.num_tokens:
                raise MoekitError(f"a ragged step takes input_ids [1, {start.num_tokens}] (its packed tokens), "
                                  f"got {list(input_ids.shape)}")
            positions = start.positions
        else:
            positions = start + torch.arange(t, device=input_ids.device)
        cos, sin = self.rope(positions)
        x = self.embed_input(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, start)
        if last_only:
            x = x[0, start.last_index][:, None] if isinstance(start, RaggedBatch) else x[:, -1:]
        return self.head(x)

    def generate(self, input_ids: torch.Tensor | list, max_new_tokens: int = 16, **kwargs):
        """Returns the new token ids [B, max_new_tokens] (greedy at temperature 0); for a list of
        prompts of any lengths, a list of each one's new tokens (1-D tensors).

        See moekit.generate.generate for the sampling options."""
        from .generate import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)


def _attention(cfg: ModelConfig, layer: int) -> nn.Module:
    """Returns a layer's attention: grouped-query, with sinks (gpt-oss), or latent (moekit.mla:
    DeepSeek; imported here, as only DeepSeek needs it)."""
    if cfg.mla is not None:
        from .mla import LatentAttention

        return LatentAttention(cfg, layer)
    return SinkAttention(cfg, layer) if cfg.attention_sinks else Attention(cfg, layer)


def int8_dense_modules(model: MoEModel) -> list[tuple[nn.Module, str]]:
    """Returns (parent, name) of every projection `--quantize-dense int8` holds as Int8Linear: each
    grouped-query attention's qkv and o_proj, the dense layers' and shared experts' MLPs, and the LM
    head unless it is tied to the input embeddings; MLA attention's (DeepSeek) q, kv_a and o projections.
    Routers (and shared-expert gates) stay as loaded: they decide which experts run; so does MLA's
    kv_b, which its absorbed decode reads as a weight."""
    found: list[tuple[nn.Module, str]] = []
    for layer in model.layers:
        if isinstance(layer.attn, Attention):
            found += [(layer.attn, "qkv"), (layer.attn, "o_proj")]
        elif hasattr(layer.attn, "kv_b_proj"):  # mla.LatentAttention
            found += [(layer.attn, name) for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj", "o_proj")
                      if hasattr(layer.attn, name)]
        mlps = [layer.mlp] if isinstance(layer.mlp, DenseMLP) else [getattr(layer.mlp, "shared", None)]
        found += [(mlp, name) for mlp in mlps if mlp is not None for name in ("gate_up", "down")]
    if not model.config.tie_word_embeddings:
        found.append((model, "lm_head"))
    return [(parent, name) for parent, name in found if type(getattr(parent, name)) is Linear]


def use_int8_dense(model: MoEModel) -> MoEModel:
    """Replaces the projections int8_dense_modules lists by unfilled Int8Linear modules of the same
    shape, dtype and device (meta on a model being loaded: load.py fills them row by row); returns model."""
    for parent, name in int8_dense_modules(model):
        setattr(parent, name, Int8Linear.like(getattr(parent, name)))
    return model
