"""GLM-4.5 / GLM-4.5-Air (zai-org, model_type glm4_moe): DeepSeek-V3's MoE (sigmoid router with a
selection bias, groups, renormalisation, routed_scaling_factor; ungated shared experts; the first
`first_k_dense_replace` layers dense) over grouped-query attention with rope on the first
`partial_rotary_factor` of each head (default half), biases on q, k, v only, and optional
per-head q/k RMSNorm (`use_qk_norm`). The multi-token-prediction layers stored after the last
decoder layer (model.layers.92 in GLM-4.5, .46 in Air) are not read."""

from __future__ import annotations

from typing import Any

from ..config import ModelConfig
from .base import Family, common_fields, first
from .deepseek_v2 import deepseek_moe_fields
from .deepseek_v3 import v3_routing


class Glm4Moe(Family):
    name = "glm4_moe"
    architectures = ("Glm4MoeForCausalLM",)

    def config(self, hf: dict[str, Any]) -> ModelConfig:
        fields = common_fields(hf, self.name)
        rope_params = hf.get("rope_parameters") or {}
        factor = float(first(rope_params, "partial_rotary_factor",
                             default=first(hf, "partial_rotary_factor", default=0.5)))
        return ModelConfig(
            **fields,
            **deepseek_moe_fields(hf, self.name, fields["num_layers"], first_dense_default=1),
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
