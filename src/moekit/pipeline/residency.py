"""Resident experts spread over a model's MoE layers, for the HRM (moekit.pipeline.hrm) and the
batch runtime (pipeline.batch, pipeline.paged): a policy's R whole experts in all, as even as whole
experts go -- the first R mod L_moe layers hold j + 1, the rest j = R // L_moe -- or, for a policy
without R (older policies), round(r_w E) in every layer.

Shapes: L_moe MoE layers, E experts per MoE layer, R resident experts in all, j per layer.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import MoekitError
from .costs import ModelCosts
from .policy import Policy


def spread_resident(total: int, experts: list[int]) -> list[int]:
    """Returns the resident experts of each MoE layer (`experts`: each layer's count) for `total`
    over all of them, as even as whole experts go: each layer j or j + 1, the extra ones in the
    first layers (a layer with fewer experts full, its share spread over the others)."""
    if not 0 <= total <= sum(experts):
        raise MoekitError(f"resident experts: {total} asked, the MoE layers hold {sum(experts)}; "
                          f"give 0..{sum(experts)}")
    counts, left = [0] * len(experts), total
    while left:
        open_layers = [i for i, e in enumerate(experts) if counts[i] < e]
        each = left // len(open_layers)
        if each == 0:
            for i in open_layers[:left]:
                counts[i] += 1
            break
        for i in open_layers:
            add = min(each, experts[i] - counts[i])
            counts[i], left = counts[i] + add, left - add
    return counts


def resident_layers(m: ModelCosts, policy: Policy) -> list[int]:
    """Returns the resident experts of each of the model's MoE layers under `policy` (R spread by
    spread_resident; a policy without R: round(r_w E) in every layer); raises MoekitError when R
    is more than the layers hold."""
    layers, experts = m.moe_layers, round(m.experts)
    if policy.resident_experts is None:
        return [min(experts, round(policy.resident_share * experts))] * layers
    return spread_resident(policy.resident_experts, [experts] * layers)


def describe_resident(m: ModelCosts, policy: Policy) -> str:
    """Returns the policy's resident experts in words: the count in every layer, or R of the
    layers' experts and how the layers hold them."""
    counts = resident_layers(m, policy)
    experts = round(m.experts)
    if len(set(counts)) <= 1:
        return f"{counts[0] if counts else 0} of {experts} experts per layer resident"
    low, high = min(counts), max(counts)
    return (f"{sum(counts)} of {experts * len(counts)} experts resident ({high} in {counts.count(high)} MoE "
            f"layers, {low} in {counts.count(low)})")


def with_resident(m: ModelCosts, policy: Policy, total: int) -> Policy:
    """Returns `policy` holding `total` resident experts (R, and r_w = R / (L_moe E))."""
    slots = m.moe_layers * round(m.experts)
    return replace(policy, resident_experts=total, resident_share=total / slots if slots else 0.0)


def layer_groups(m: ModelCosts, policy: Policy) -> list[tuple[float, int]]:
    """Returns (layers, resident experts in each) for the groups of layers that hold the same
    count, first the group of the first MoE layer; `layers` counts the model's average layers
    (num_layers in all), as the per-layer terms do."""
    counts = resident_layers(m, policy)
    if not counts:
        return [(float(m.num_layers), 0)]
    per = m.num_layers / len(counts)
    return [(counts.count(j) * per, j) for j in dict.fromkeys(counts)]
