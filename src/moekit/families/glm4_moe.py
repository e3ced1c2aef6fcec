"""GLM-4.5 / GLM-4.5-Air (zai-org, model_type glm4_moe): DeepSeek-V3's MoE (sigmoid router with a
selection bias, groups, renormalisation, routed_scaling_factor; ungated shared experts; the first
`first_k_dense_replace` layers dense) over grouped-query attention with rope on the first
`partial_rotary_factor` of each head (default half), biases on q, k, v only, and optional
per-head q/k RMSNorm (`use_qk_norm`). The multi-token-prediction layers stored after the last
decoder layer (model.layers.92 in GLM-4.5, .46 in Air) are not read."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from ..errors import UnsupportedModelError
from .base import Family, common_fields, first, require
from .deepseek_v3 import v3_routing


class Glm4Moe(Family):
    name = "glm4_moe"
    architectures = ("Glm4MoeForCausalLM",)

    def config(self, hf: dict[str, Any]) -> ModelConfig:
        fields = common_fields(hf, self.name)
        experts = int(first(hf, "n_routed_experts", "num_experts", default=0))
        if experts <= 0:
            raise UnsupportedModelError(f"config.json of this {self.name} model has no 'n_routed_experts'")
        rope_params = hf.get("rope_parameters") or {}
        factor = float(first(rope_params, "partial_rotary_factor",
                             default=first(hf, "partial_rotary_factor", default=0.5)))
        moe_ffn = int(require(hf, "moe_intermediate_size", self.name))
        first_dense = int(first(hf, "first_k_dense_replace", default=1))
        return ModelConfig(
            **fields,
            num_experts=experts,
            top_k=int(require(hf, "num_experts_per_tok", self.name)),
            expert_ffn=moe_ffn,
            moe_layers=tuple(i >= first_dense for i in range(fields["num_layers"])),
            dense_ffn=int(first(hf, "intermediate_size", default=0)),
            shared_expert_ffn=moe_ffn * int(first(hf, "n_shared_experts", default=0)),
            qkv_bias=bool(hf.get("attention_bias", False)),
            qk_norm="head" if hf.get("use_qk_norm") else "none",
            rotary_dim=int(fields["head_dim"] * factor),
            **v3_routing(hf, self.name),
        )

    def shared_expert_names(self, layer: int) -> tuple[str, str, str, str]:
        """Returns the shared experts' (gate, up, down, "") names: `shared_experts`, no gate."""
        p = f"{self.layer_prefix(layer)}.{self.moe_prefix}.shared_experts"
        return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight", ""


FAMILY = Glm4Moe()
