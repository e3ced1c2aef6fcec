"""Mixtral (mistralai/Mixtral-8x7B and friends): 8 experts top-2, w1/w3/w2 expert names,
router probabilities always renormalised, optional sliding-window attention."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family, common_fields, require


class Mixtral(Family):
    name = "mixtral"
    architectures = ("MixtralForCausalLM",)
    moe_prefix = "block_sparse_moe"
    expert_proj = ("w1", "w3", "w2")

    def config(self, hf: dict[str, Any]) -> ModelConfig:
        fields = common_fields(hf, self.name)
        return ModelConfig(
            **fields,
            num_experts=int(require(hf, "num_local_experts", self.name)),
            top_k=int(require(hf, "num_experts_per_tok", self.name)),
            expert_ffn=int(require(hf, "intermediate_size", self.name)),
            moe_layers=(True,) * fields["num_layers"],
            norm_topk_prob=True,
            sliding_window=hf.get("sliding_window") or None,
        )


FAMILY = Mixtral()
