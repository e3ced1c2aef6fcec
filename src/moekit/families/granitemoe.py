"""Granite-MoE (ibm-granite/granite-3.0-1b-a400m, -3b-a800m): experts stored fused and stacked
(`input_linear` [E, 2I, D], `output_linear` [E, D, I]), a top-k-then-softmax router, and the muP
scalars: embeddings times `embedding_multiplier`, each block's output times `residual_multiplier`,
softmax scale `attention_multiplier` (not 1/sqrt(Dh)), logits divided by `logits_scaling`."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family, common_fields, first, require


class GraniteMoe(Family):
    name = "granitemoe"
    architectures = ("GraniteMoeForCausalLM",)
    moe_prefix = "block_sparse_moe"
    router_module = "router.layer"

    def config(self, hf: dict[str, Any]) -> ModelConfig:
        fields = common_fields(hf, self.name)
        bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            **fields,
            num_experts=int(require(hf, "num_local_experts", self.name)),
            top_k=int(require(hf, "num_experts_per_tok", self.name)),
            expert_ffn=int(require(hf, "intermediate_size", self.name)),
            moe_layers=(True,) * fields["num_layers"],
            norm_topk_prob=True,  # softmax over the k best logits == top-k of the softmax, renormalised
            qkv_bias=bias,
            o_bias=bias,
            attention_scale=float(first(hf, "attention_multiplier", default=fields["head_dim"] ** -0.5)),
            embedding_multiplier=float(first(hf, "embedding_multiplier", default=1.0)),
            residual_multiplier=float(first(hf, "residual_multiplier", default=1.0)),
            logits_scaling=float(first(hf, "logits_scaling", default=1.0)),
        )

    def stacked_expert_names(self, layer: int) -> tuple[str, str]:
        p = f"{self.layer_prefix(layer)}.{self.moe_prefix}"
        return f"{p}.input_linear.weight", f"{p}.output_linear.weight"


FAMILY = GraniteMoe()
