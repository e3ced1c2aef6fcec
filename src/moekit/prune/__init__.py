"""Pruning (SEER-MoE): count expert use, drop the least-used experts, shrink top-k by
entropy-regularised router fine-tuning."""

from .select import select_experts
from .usage import ExpertUsage, count_usage

__all__ = ["ExpertUsage", "count_usage", "select_experts"]
