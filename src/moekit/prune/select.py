"""Which experts to keep: by hard counts, soft counts or at random; per layer or globally."""

from __future__ import annotations

import torch

from ..errors import MoekitError
from .usage import ExpertUsage

CRITERIA = ("hard", "soft", "random")
SCOPES = ("layer", "global")


def _scores(usage: ExpertUsage, criterion: str, seed: int) -> list[torch.Tensor]:
    """Returns per MoE layer a score per expert, comparable across layers (a share of that
    layer's total), higher = keep."""
    if criterion not in CRITERIA:
        raise MoekitError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        return [torch.rand(h.numel(), generator=g, dtype=torch.float64) for h in usage.hard]
    counts = usage.hard if criterion == "hard" else usage.soft
    return [c / c.sum().clamp_min(1e-30) for c in counts]


def select_experts(usage: ExpertUsage, keep: float, criterion: str = "hard", scope: str = "layer",
                   top_k: int | None = None, seed: int = 0) -> list[list[int]]:
    """Returns, per MoE layer of `usage`, the sorted ids of the experts to keep.

    `keep` is the fraction of experts kept: per layer (scope "layer"), or of all experts with
    the best ones anywhere kept (scope "global"), never leaving a layer fewer than top_k.
    """
    if not 0 < keep <= 1:
        raise MoekitError(f"--keep must be in (0, 1], got {keep}")
    if scope not in SCOPES:
        raise MoekitError(f"--scope must be layer or global, got {scope!r}")
    top_k = usage.top_k if top_k is None else top_k
    scores = _scores(usage, criterion, seed)
    sizes = [s.numel() for s in scores]
    if scope == "layer":
        kept = []
        for s, e in zip(scores, sizes):
            n = min(e, max(top_k, round(e * keep)))
            kept.append(sorted(torch.topk(s, n).indices.tolist()))
        return kept
    total = max(round(sum(sizes) * keep), top_k * len(sizes))
    # every layer first gets its top_k best, then the rest go to the best scores anywhere
    kept_sets = [set(torch.topk(s, min(top_k, s.numel())).indices.tolist()) for s in scores]
    rest = [(float(s[e]), layer, e) for layer, s in enumerate(scores) for e in range(s.numel())
            if e not in kept_sets[layer]]
    rest.sort(key=lambda t: -t[0])
    for _, layer, e in rest[: max(0, total - sum(len(k) for k in kept_sets))]:
        kept_sets[layer].add(e)
    return [sorted(k) for k in kept_sets]
