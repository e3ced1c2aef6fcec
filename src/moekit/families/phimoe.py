"""Phi-3.5-MoE (microsoft/Phi-3.5-MoE-instruct): 16 experts top-2 with Mixtral's expert names,
LayerNorm with a bias instead of RMSNorm, biases on attention and optionally the LM head, and the
sparsemixer router (moekit.routers.sparsemixer: two argmax rounds, each weighted by a softmax
over the experts within a relative gap of `router_jitter_noise`)."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig, RouterConfig
from .base import Family, common_fields, first, require


class Phimoe(Family):
    name = "phimoe"
    architectures = ("PhimoeForCausalLM",)
    moe_prefix = "block_sparse_moe"
    expert_proj = ("w1", "w3", "w2")

    def config(self, hf: dict[str, Any]) -> ModelConfig:
        fields = common_fields(hf, self.name)
        fields["rms_norm_eps"] = float(first(hf, "rms_norm_eps", default=1e-5))  # the LayerNorms' eps
        bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            **fields,
            num_experts=int(require(hf, "num_local_experts", self.name)),
            top_k=int(require(hf, "num_experts_per_tok", self.name)),
            expert_ffn=int(require(hf, "intermediate_size", self.name)),
            moe_layers=(True,) * fields["num_layers"],
            norm_topk_prob=False,
            router=RouterConfig(scoring="sparsemixer",
                                jitter_eps=float(first(hf, "router_jitter_noise", default=0.01))),
            norm="layernorm",
            qkv_bias=bias,
            o_bias=bias,
            lm_head_bias=bool(hf.get("lm_head_bias", False)),
            sliding_window=hf.get("sliding_window") or None,
        )


FAMILY = Phimoe()
