"""The speculative predictor's weights: the next MoE layer's router, rescaled for this layer's input.

Its own module because both the predictors and the pre-gate trainer (which starts from these
weights) need it: the predictors import the pre-gates, and the pre-gates no longer import them back.

Shapes: E = experts of the next layer, D = hidden.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def speculative_weights(model, next_of: dict[int, int]) -> dict[int, torch.Tensor]:
    """Returns {layer i: W [E, D]}: layer next_of[i]'s router, scaled for layer i's normed input."""
    weights = {}
    for i, j in next_of.items():
        norm_i = model.layers[i].post_norm.weight.float()
        norm_j = model.layers[j].post_norm.weight.float()
        floor = 1e-3 * norm_i.abs().mean().clamp_min(1e-12)
        safe = torch.where(norm_i.abs() < floor, floor * torch.sign(norm_i) + (norm_i == 0) * floor, norm_i)
        router = model.layers[j].mlp.router.weight.float()
        weights[i] = (router * (norm_j / safe)[None, :]).to(model.dtype)
    return weights
