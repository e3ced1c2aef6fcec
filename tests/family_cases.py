"""The tiny checkpoints of issue 15's families that tests/families runs (built in conftest.VARIANTS),
grouped by what each test needs, and a budget helper for offloaded runs."""

from __future__ import annotations

import dataclasses

from moekit.offload import OffloadConfig, load_offloaded

LOGITS_RTOL = 1e-4
VARIANTS = ["granitemoe", "granitemoe_tied", "phimoe", "phimoe_plain", "phimoe_longrope", "deepseek_v2",
            "deepseek_v2_group", "deepseek_v3", "deepseek_v3_plain", "glm4_moe", "glm4_moe_plain", "gpt_oss",
            "gpt_oss_full"]
FAMILY_OF = {v: next(f for f in ("granitemoe", "phimoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss")
                     if v.startswith(f)) for v in VARIANTS}
# one variant per family for the heavier pillars
ONE_PER_FAMILY = ["granitemoe", "phimoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss"]
# yarn variants: prompts run past original_max_position_embeddings (32)
PROMPT = {"deepseek_v2_group": 40, "deepseek_v3_plain": 40, "phimoe_longrope": 40}


def budget_for(path, config: OffloadConfig, slots: int, device: str = "cpu") -> int:
    """Returns the budget on `device` that leaves exactly `slots` experts of cache (a CUDA plan
    also keeps the allocator's workspace reserve, so the plan is made on the device it runs on)."""
    plan = load_offloaded(path, device=device, offload=dataclasses.replace(config, device_memory=None)).offload.plan
    return plan.planned_bytes - plan.cache_bytes + slots * plan.expert_bytes
