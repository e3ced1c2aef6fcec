"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): qkv bias, a shared expert behind a sigmoid
gate, dense MLP in `mlp_only_layers` and off the `decoder_sparse_step` grid."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import UnsupportedModelError
from .base import Family, common_fields, first, require


def moe_layer_flags(hf: dict[str, Any], num_layers: int, num_experts: int) -> tuple[bool, ...]:
    """Returns, per layer, whether it is an MoE layer (Qwen's mlp_only_layers / sparse step rule)."""
    mlp_only = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step") or 1)
    return tuple(
        (i not in mlp_only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))


class Qwen2Moe(Family):
    name = "qwen2_moe"
    architectures = ("Qwen2MoeForCausalLM",)

    def config(self, hf: dict[str, Any]) -> ModelConfig:
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(
                "qwen2_moe with use_sliding_window=true is not supported; set it to false in "
                "config.json (Qwen's released MoE checkpoints ship with it off)")
        fields = common_fields(hf, self.name)
        experts = int(first(hf, "num_experts", "num_local_experts", default=0))
        return ModelConfig(
            **fields,
            num_experts=experts,
            top_k=int(require(hf, "num_experts_per_tok", self.name)),
            expert_ffn=int(require(hf, "moe_intermediate_size", self.name)),
            moe_layers=moe_layer_flags(hf, fields["num_layers"], experts),
            dense_ffn=int(first(hf, "intermediate_size", default=0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            shared_expert_ffn=int(first(hf, "shared_expert_intermediate_size", default=0)),
            shared_expert_gate=True,
            qkv_bias=bool(hf.get("qkv_bias", True)),
        )


FAMILY = Qwen2Moe()
