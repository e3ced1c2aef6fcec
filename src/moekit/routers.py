"""Routers: how an MoE layer's router logits become each token's experts and their weights.

One function per scoring rule of the supported families, all behind `route`:
  softmax      softmax over all experts, top-k (Mixtral, Qwen, OLMoE, Granite; DeepSeek-V2, with
               optional group-limited selection: the best expert of a group scores the group);
  sigmoid      per-expert sigmoid; a correction bias steers the selection only; groups score the
               sum of their two best experts (DeepSeek-V3, GLM-4.5);
  sparsemixer  Phi-3.5-MoE at inference: two rounds of argmax, each weighted by a softmax over the
               experts within a relative gap of that round's best.
Every rule returns float32 weights; renormalisation (norm_topk_prob) and routed_scaling_factor
apply after selection.

Shapes: N = tokens, E = experts, A = experts per token (top-k), G = groups.
"""

from __future__ import annotations

import torch

from . import fused
from .config import RouterConfig
from .errors import MoekitError


def route(logits: torch.Tensor, router: RouterConfig, top_k: int, norm_topk_prob: bool,
          correction_bias: torch.Tensor | None = None, skip_below: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (expert ids [N, A], float32 weights [N, A]) for router logits [N, E].

    `skip_below` f > 0 sets to 0 every weight below f times the token's top weight (before
    renormalisation): the expert sources skip those slots."""
    if (router.scoring == "sigmoid" or router.scoring == "softmax" and router.group_limited) and fused.enabled(logits):
        bias = correction_bias if router.scoring == "sigmoid" else None
        groups, kept = (router.n_group, router.topk_group) if router.group_limited else (1, 1)
        if fused.grouped_topk_supported(logits, top_k, groups, kept, bias):
            # one kernel in place of ~15 (CUDA decode); plain softmax top-k is the MoE block's own kernel
            sigmoid = router.scoring == "sigmoid"
            return fused.grouped_topk(logits, top_k, sigmoid, groups, kept, sigmoid, bias, norm_topk_prob,
                                      skip_below, router.scaling_factor)
    if router.scoring == "sparsemixer":
        weights, ids = sparsemixer(logits.float(), router.jitter_eps)
        weights, ids = weights[:, :top_k], ids[:, :top_k]
    elif router.scoring == "sigmoid":
        scores = torch.sigmoid(logits.float())  # [N, E]
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if router.group_limited:
            choice = _keep_groups(choice, router, group_score="top2", fill=float("-inf"))
        ids = torch.topk(choice, top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)  # the unbiased scores: the bias only chooses
    else:
        probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
        if router.group_limited:
            probs = _keep_groups(probs, router, group_score="max", fill=0.0)
        weights, ids = torch.topk(probs, top_k, dim=-1, sorted=False)  # order is irrelevant; skips a sort kernel
    if skip_below > 0:  # a zero weight tells the expert source to skip that slot
        weights = weights.masked_fill(weights < skip_below * weights.amax(-1, keepdim=True), 0.0)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if router.scoring == "sigmoid" else 0.0))
    if router.scaling_factor != 1.0:
        weights = weights * router.scaling_factor
    return ids, weights


def weights_of(logits: torch.Tensor, ids: torch.Tensor, router: RouterConfig,
               norm_topk_prob: bool) -> torch.Tensor:
    """Returns the float32 weights [N, A] the router's rule gives experts `ids` [N, A] chosen
    elsewhere (offload's strict mode runs the predicted experts) for logits [N, E]."""
    if router.scoring == "sparsemixer":
        raise MoekitError("sparsemixer routing weighs only the experts it picks itself; strict offload "
                          "(running predicted experts) cannot weigh others: run without strict")
    if router.scoring == "sigmoid":
        weights = torch.sigmoid(logits.float()).gather(1, ids)
    else:
        weights = torch.softmax(logits.float(), dim=-1).gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.scaling_factor


def _keep_groups(scores: torch.Tensor, router: RouterConfig, group_score: str, fill: float) -> torch.Tensor:
    """Returns scores [N, E] with every expert outside each token's `topk_group` best groups set
    to `fill`; a group scores its best expert ("max") or its two best summed ("top2")."""
    n, e = scores.shape
    grouped = scores.view(n, router.n_group, e // router.n_group)  # [N, G, E/G]
    if group_score == "max":
        per_group = grouped.amax(dim=-1)  # [N, G]
    else:
        per_group = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
    best = torch.topk(per_group, router.topk_group, dim=-1, sorted=False).indices  # [N, topk_group]
    keep = torch.zeros_like(per_group, dtype=torch.bool).scatter_(1, best, True)  # [N, G]
    return grouped.masked_fill(~keep[:, :, None], fill).view(n, e)


def sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weights [N, 2], expert ids [N, 2]) of Phi-3.5-MoE's sparsemixer at inference.

    Round one picks the argmax and weights it by its softmax over the experts whose logit is
    within a relative gap 2 * jitter_eps of the max (the others are masked out); round two does the
    same with the first pick removed. The gap is measured against max(|logit|, round's max)."""
    weights, ids = [], []
    masked = logits
    for _ in range(2):
        best, best_id = masked.max(dim=-1, keepdim=True)  # [N, 1]
        factor = logits.abs().clamp(min=best)
        far = (best - logits) / factor > 2 * jitter_eps  # [N, E]
        gates = torch.softmax(masked.masked_fill(far, float("-inf")), dim=-1)
        weights.append(gates.gather(1, best_id))
        ids.append(best_id)
        masked = masked.scatter(1, best_id, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)
