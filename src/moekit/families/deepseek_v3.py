"""DeepSeek-V3 (V3, R1): DeepSeek-V2's structure (MLA, dense first layers, shared experts) with
the sigmoid router: `e_score_correction_bias` is added to the scores for the selection only,
groups score the sum of their two best experts, the unbiased scores of the chosen experts are
renormalised (norm_topk_prob) and multiplied by `routed_scaling_factor`. The multi-token-prediction
layers stored after the last decoder layer (model.layers.61 in V3) are not read."""

from __future__ import annotations

from typing import Any

from ..config import RouterConfig
from ..errors import UnsupportedModelError
from .base import first
from .deepseek_v2 import DeepseekV2


class DeepseekV3(DeepseekV2):
    name = "deepseek_v3"
    architectures = ("DeepseekV3ForCausalLM",)

    def rope_interleave(self, hf: dict[str, Any]) -> bool:
        return bool(first(hf, "rope_interleave", default=True))

    def _routing(self, hf: dict[str, Any]) -> dict[str, Any]:
        return v3_routing(hf, self.name)


def v3_routing(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """Returns the ModelConfig routing fields of DeepSeek-V3's router (GLM-4.5 uses it too)."""
    scoring = first(hf, "scoring_func", default="sigmoid")
    if scoring != "sigmoid":
        raise UnsupportedModelError(f"{family} scoring_func '{scoring}' is not supported (only sigmoid)")
    return dict(norm_topk_prob=bool(first(hf, "norm_topk_prob", default=True)), router=RouterConfig(
        scoring="sigmoid", n_group=int(first(hf, "n_group", default=1)),
        topk_group=int(first(hf, "topk_group", default=1)), correction_bias=True,
        scaling_factor=float(first(hf, "routed_scaling_factor", default=1.0))))


FAMILY = DeepseekV3()
