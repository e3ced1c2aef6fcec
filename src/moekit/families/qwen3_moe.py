"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): RMSNorm on q and k per head, no shared expert,
optional top-k renormalisation (`norm_topk_prob`)."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import UnsupportedModelError
from .base import Family, common_fields, first, require
from .qwen2_moe import moe_layer_flags


class Qwen3Moe(Family):
    name = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM",)

    def config(self, hf: dict[str, Any]) -> ModelConfig:
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(
                "qwen3_moe with use_sliding_window=true is not supported; set it to false")
        fields = common_fields(hf, self.name)
        experts = int(first(hf, "num_experts", "num_local_experts", default=0))
        bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            **fields,
            num_experts=experts,
            top_k=int(require(hf, "num_experts_per_tok", self.name)),
            expert_ffn=int(require(hf, "moe_intermediate_size", self.name)),
            moe_layers=moe_layer_flags(hf, fields["num_layers"], experts),
            dense_ffn=int(first(hf, "intermediate_size", default=0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="head",
        )


FAMILY = Qwen3Moe()
