"""OLMoE (allenai/OLMoE-1B-7B): 64 experts top-8, RMSNorm on q and k over the whole projection
(not per head), optional clamping of q/k/v (`clip_qkv`)."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family, common_fields, require


class Olmoe(Family):
    name = "olmoe"
    architectures = ("OlmoeForCausalLM",)

    def config(self, hf: dict[str, Any]) -> ModelConfig:
        fields = common_fields(hf, self.name)
        bias = bool(hf.get("attention_bias", False))
        clip = hf.get("clip_qkv")
        return ModelConfig(
            **fields,
            num_experts=int(require(hf, "num_experts", self.name)),
            top_k=int(require(hf, "num_experts_per_tok", self.name)),
            expert_ffn=int(require(hf, "intermediate_size", self.name)),
            moe_layers=(True,) * fields["num_layers"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qkv_bias=bias,
            o_bias=bias,
            qk_norm="full",
            clip_qkv=float(clip) if clip is not None else None,
        )


FAMILY = Olmoe()
