"""The shapes bench_families runs and what it computes about them: transformers configs of the
DeepSeek-V2-Lite and gpt-oss-20b shapes (real or tiny), MXFP4 rounding (gpt-oss's released expert
format), the weight bytes a decode step reads (the HBM bound), and KV-cache byte counts.

Shape legend: E = routed experts, A = experts per token, B = batch, S = cached positions,
H = heads, r = MLA latent rank, dn / dr / dv = MLA's no-rope key, rope key and value head dims,
R = rows of a Linear weight, K = its columns.
"""

from __future__ import annotations

import torch

from moekit.offload import OffloadConfig

SHAPES = ("deepseek-v2-lite", "gpt-oss-20b")


# ---- shapes ---------------------------------------------------------------------------------

def hf_config(shape: str, small: bool, layers: int | None = None, vocab: int | None = None):
    """Returns the transformers config of `shape` (real dimensions, or tiny ones when small; `layers`
    and `vocab` replace those two); no eos: generation runs to max_new_tokens."""
    import transformers

    ids = dict(eos_token_id=None, bos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    if shape == "deepseek-v2-lite":  # deepseek-ai/DeepSeek-V2-Lite's config.json
        dims = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                    n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
                    q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                    max_position_embeddings=163840)
        if small:
            dims.update(vocab_size=1000, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                        num_experts_per_tok=2, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                        v_head_dim=16, max_position_embeddings=4096)
        dims.update({k: v for k, v in (("num_hidden_layers", layers), ("vocab_size", vocab)) if v})
        rope = {"rope_type": "yarn", "factor": 40.0 if not small else 4.0, "rope_theta": 10000.0,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                "original_max_position_embeddings": 4096 if not small else 1024}
        return transformers.DeepseekV2Config(**dims, **ids, topk_method="greedy", routed_scaling_factor=1.0,
                                             norm_topk_prob=False, rms_norm_eps=1e-6, rope_parameters=rope)
    if shape == "gpt-oss-20b":  # openai/gpt-oss-20b: GptOssConfig's defaults are its dimensions
        dims = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                    num_experts_per_tok=4, sliding_window=128)
        if small:  # widths multiples of 32 (one MXFP4 scale per 32 values)
            dims.update(vocab_size=1000, hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                        num_experts_per_tok=2, sliding_window=8)
        dims.update({k: v for k, v in (("num_hidden_layers", layers), ("vocab_size", vocab)) if v})
        layers = dims["num_hidden_layers"]
        return transformers.GptOssConfig(**dims, **ids, layer_types=[
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def is_routed_expert(name: str) -> bool:
    """Returns whether a transformers tensor name is a routed experts' stacked matrix (not a bias)."""
    return name.endswith(("experts.gate_up_proj", "experts.down_proj"))


# ---- MXFP4 ------------------------------------------------------------------------------------

FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between e2m1 magnitudes 0 .5 1 1.5 2 3 4 6


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (blocks [..., R, K/32, 16] uint8, scales [..., R, K/32] uint8) of w [..., R, K]: per
    32 values the power of two that brings the largest within e2m1's 6, then the nearest e2m1 code,
    two codes a byte, low nibble first (the OCP MX layout gpt-oss ships)."""
    *lead, rows, cols = w.shape
    groups = w.float().reshape(*lead, rows, cols // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    mids = torch.tensor(FP4_MIDPOINTS, device=w.device)
    codes = torch.bucketize(scaled.abs().contiguous(), mids).to(torch.uint8) | ((scaled < 0).to(torch.uint8) << 3)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


# ---- bytes and ceilings -------------------------------------------------------------------------

def tensor_groups(module: torch.nn.Module) -> dict[str, int]:
    """Returns the bytes of a model's tensors (each storage once) by kind: 'embed', 'experts:<layer
    prefix>' per MoE layer's routed experts, 'other'."""
    out: dict[str, int] = {}
    seen = set()
    named = list(module.named_parameters()) + list(module.named_buffers())
    for name, t in named:
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if ".experts." in name:  # moekit "layers.3.mlp.experts.gate_up", transformers "...mlp.experts.down_proj"
            key = "experts:" + name.split(".experts.")[0]
        elif name.endswith(("embed.weight", "embed_tokens.weight")):
            key = "embed"
        else:
            key = "other"
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def decode_step_bytes(groups: dict[str, int], experts: int, top_k: int, batch: int, hidden: int) -> float:
    """Returns the weight bytes one decode step at `batch` reads: the non-expert weights once, B
    embedding rows, and per MoE layer the expected distinct experts of uniform routing."""
    distinct = experts * (1.0 - (1.0 - top_k / experts) ** batch)
    moe = sum(v for k, v in groups.items() if k.startswith("experts:"))
    return groups.get("other", 0) + 2 * batch * hidden + moe * distinct / experts


def expanded_bytes(attn, latent: torch.Tensor, k_rope: torch.Tensor) -> int:
    """Returns the bytes of one layer's cached latents [B, 1, S, r] and rope keys [B, 1, S, dr] expanded
    into keys [B, H, S, dn + dr] and values [B, H, S, dv] (what moekit.mla's expanded form attends over)."""
    m, h = attn.mla, attn.cfg.num_heads
    b, _, s, _ = latent.shape
    kv = attn.kv_b_proj(latent[:, 0]).view(b, s, h, -1).transpose(1, 2)  # [B, H, S, dn + dv]
    k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
    k = torch.cat((k_nope, k_rope.expand(b, h, s, m.qk_rope_head_dim)), dim=-1)  # [B, H, S, dqk]
    return k.numel() * k.element_size() + v.numel() * v.element_size()


def small_budget(share: float, cfg, expert_bytes: int, context: int, device: torch.device) -> int:
    """Returns a tiny shape's budget: what the planner needs with no experts (OffloadConfig() as the
    rows run it), the KV cache of `context` positions, and `share` of the experts, at least a
    token's (activations dominate tiny shapes: a share of their bytes would hold no expert)."""
    from moekit.offload.planner import kv_cache_bytes, plan_budget

    plan = plan_budget(cfg, torch.bfloat16, expert_bytes, OffloadConfig(), device)
    total = sum(cfg.experts_in(i) for i, m in enumerate(cfg.moe_layers) if m)
    # + a token's experts of slack: generate sizes its activations for the prompt it is given
    return (plan.planned_bytes - plan.cache_bytes + kv_cache_bytes(cfg, torch.bfloat16, 1, context)
            + (cfg.top_k + max(cfg.top_k, int(share * total))) * expert_bytes)


def hf_cache_layer_bytes(cache) -> list[int]:
    """Returns the bytes each layer of a transformers cache holds (DynamicCache, any 5.x layout)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [sum(t.numel() * t.element_size() for t in (getattr(l, "keys", None), getattr(l, "values", None))
                    if isinstance(t, torch.Tensor)) for l in layers]
    return [k.numel() * k.element_size() + v.numel() * v.element_size()
            for k, v in zip(cache.key_cache, cache.value_cache)]


def prompt(vocab: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab - 1, (batch, length), generator=g).to(device)
