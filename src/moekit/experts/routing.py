"""Grouping routed tokens by expert with vectorised gather/scatter (no Python loop over tokens).

Shapes: N = tokens, A = experts per token, S = N * A routed slots, E = experts, D = hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupedTokens:
    """Routed slots sorted by expert: slot s of the sorted order belongs to expert
    `expert_of[s]` and token `token_of[s]`, with routing weight `weight_of[s]`."""

    order: torch.Tensor  # [S] permutation of the flattened [N, A] slots, sorted by expert
    token_of: torch.Tensor  # [S] token index of each sorted slot
    weight_of: torch.Tensor  # [S] routing weight of each sorted slot
    counts: torch.Tensor  # [E] slots per expert (on the device)

    def offsets(self) -> list[int]:
        """Returns the E+1 boundaries of each expert's run of slots (one host sync)."""
        bounds = [0]
        for c in self.counts.tolist():
            bounds.append(bounds[-1] + int(c))
        return bounds


def group_by_expert(expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
                    skip_zero: bool = False) -> GroupedTokens:
    """Returns the routed slots of expert_ids [N, A] / weights [N, A] grouped by expert.

    With skip_zero, slots whose weight is exactly 0 (dynamic skip) are left out (a host sync)."""
    top_k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)  # [S]
    order = torch.argsort(flat, stable=True)  # [S]
    if skip_zero:
        order = order[weights.reshape(-1)[order] != 0]
        flat_kept = flat[order]
        return GroupedTokens(order=order, token_of=order // top_k, weight_of=weights.reshape(-1)[order],
                             counts=torch.bincount(flat_kept, minlength=num_experts))
    return GroupedTokens(
        order=order,
        token_of=order // top_k,
        weight_of=weights.reshape(-1)[order],
        counts=torch.bincount(flat, minlength=num_experts),
    )
