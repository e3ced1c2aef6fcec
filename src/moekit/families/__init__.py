"""The architectures moekit runs, one module each; `family_for` picks one from a config.json.

Adding a family = adding one module with a `FAMILY` object and listing it below.
"""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from . import deepseek_v2, deepseek_v3, glm4_moe, gpt_oss, granitemoe, mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe
from .base import Family

FAMILIES: dict[str, Family] = {
    m.FAMILY.name: m.FAMILY
    for m in (mixtral, qwen2_moe, qwen3_moe, olmoe, granitemoe, phimoe, deepseek_v2, deepseek_v3, glm4_moe, gpt_oss)
}


def supported() -> str:
    """Returns the supported model types as a comma-separated string."""
    return ", ".join(sorted(FAMILIES))


def family_for(hf: dict[str, Any], where: str = "config.json") -> Family:
    """Returns the Family of an HF config dict, or raises UnsupportedModelError naming the options."""
    model_type = hf.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    for arch in hf.get("architectures") or []:
        for family in FAMILIES.values():
            if arch in family.architectures:
                return family
    raise UnsupportedModelError(
        f"{where}: model_type '{model_type}' (architectures {hf.get('architectures')}) is not "
        f"supported; moekit runs: {supported()}")
