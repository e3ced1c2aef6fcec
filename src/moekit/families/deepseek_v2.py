"""DeepSeek-V2 (V2, V2-Lite): multi-head latent attention (moekit.mla), the first
`first_k_dense_replace` layers dense, always-on shared experts (`shared_experts`, ungated), and a
softmax top-k router, optionally group-limited (a group scores its best expert), whose weights
are multiplied by `routed_scaling_factor`."""

from __future__ import annotations

from typing import Any

from ..config import MLAConfig, ModelConfig, RouterConfig
from ..errors import UnsupportedModelError
from .base import Family, common_fields, first, require


def deepseek_moe_fields(hf: dict[str, Any], name: str, num_layers: int, first_dense_default: int) -> dict[str, Any]:
    """Returns the ModelConfig fields of DeepSeek's MoE layout (GLM-4.5 shares it): routed experts,
    top-k, the expert width, the first `first_k_dense_replace` layers dense, and the shared
    experts' total width; raises UnsupportedModelError without routed experts."""
    experts = int(first(hf, "n_routed_experts", "num_experts", "num_local_experts", default=0))
    if experts <= 0:
        raise UnsupportedModelError(f"config.json of this {name} model has no 'n_routed_experts'")
    first_dense = int(first(hf, "first_k_dense_replace", default=first_dense_default))
    moe_ffn = int(require(hf, "moe_intermediate_size", name))
    return {"num_experts": experts, "top_k": int(require(hf, "num_experts_per_tok", name)), "expert_ffn": moe_ffn,
            "moe_layers": tuple(i >= first_dense for i in range(num_layers)),
            "dense_ffn": int(first(hf, "intermediate_size", default=0)),
            "shared_expert_ffn": moe_ffn * int(first(hf, "n_shared_experts", default=0))}


class DeepseekV2(Family):
    name = "deepseek_v2"
    architectures = ("DeepseekV2ForCausalLM",)

    def shared_expert_names(self, layer: int) -> tuple[str, str, str, str]:
        """Returns the shared experts' (gate, up, down, "") names: `shared_experts`, no gate."""
        p = f"{self.layer_prefix(layer)}.{self.moe_prefix}.shared_experts"
        return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight", ""

    def config(self, hf: dict[str, Any]) -> ModelConfig:
        fields = common_fields(hf, self.name)
        if int(first(hf, "moe_layer_freq", default=1)) != 1:  # every released DeepSeek model has 1
            raise UnsupportedModelError(
                f"{self.name} moe_layer_freq {hf['moe_layer_freq']} is not supported (only 1: every layer "
                "from first_k_dense_replace on is MoE, as transformers runs it)")
        m = self._mla(hf)
        moe = deepseek_moe_fields(hf, self.name, fields["num_layers"], first_dense_default=0)
        fields.update(num_kv_heads=fields["num_heads"], head_dim=m.qk_head_dim)  # MLA: every head its own k, v
        bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            **fields,
            **moe,
            qkv_bias=bias,
            o_bias=bias,
            mla=m,
            **self._routing(hf),
        )

    def _mla(self, hf: dict[str, Any]) -> MLAConfig:
        return MLAConfig(
            kv_lora_rank=int(require(hf, "kv_lora_rank", self.name)),
            q_lora_rank=int(hf["q_lora_rank"]) if hf.get("q_lora_rank") else None,
            qk_nope_head_dim=int(require(hf, "qk_nope_head_dim", self.name)),
            qk_rope_head_dim=int(require(hf, "qk_rope_head_dim", self.name)),
            v_head_dim=int(require(hf, "v_head_dim", self.name)),
            rope_interleave=self.rope_interleave(hf),
        )

    def rope_interleave(self, hf: dict[str, Any]) -> bool:
        """Returns whether rope rotates interleaved pairs (always, in DeepSeek-V2)."""
        return True

    def _routing(self, hf: dict[str, Any]) -> dict[str, Any]:
        if first(hf, "scoring_func", default="softmax") != "softmax":
            raise UnsupportedModelError(f"deepseek_v2 scoring_func '{hf['scoring_func']}' is not supported "
                                        "(softmax; sigmoid routers belong to model_type deepseek_v3)")
        method = first(hf, "topk_method", default="greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(
                f"deepseek_v2 topk_method '{method}' is not supported (greedy, group_limited_greedy); "
                "a V3-style 'noaux_tc' router belongs to model_type deepseek_v3")
        groups = (int(require(hf, "n_group", self.name)), int(require(hf, "topk_group", self.name))) \
            if method == "group_limited_greedy" else (1, 1)
        # transformers' DeepSeek-V2 scales the top-k softmax weights and never renormalises them
        # (every released V2 checkpoint has norm_topk_prob false): the reference followed here
        return dict(norm_topk_prob=False, router=RouterConfig(
            scoring="softmax", n_group=groups[0], topk_group=groups[1],
            scaling_factor=float(first(hf, "routed_scaling_factor", default=1.0))))



FAMILY = DeepseekV2()
