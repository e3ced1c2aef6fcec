"""Group-limited and sigmoid top-k routing in one kernel (DeepSeek-V2's group_limited_greedy,
DeepSeek-V3 and GLM-4.5's sigmoid with a selection bias); the plain softmax top-k is
moekit.kernels.fused_decode.softmax_topk_kernel. The PyTorch reference is moekit.routers.route
(~15 kernels a layer for these rules). Wrapper: moekit.fused.grouped_topk.

Tensors (N = token rows, E = experts, G = groups of E/G experts, A = top-k):
    logits   [N, E]   router logits (any float dtype), row stride stride_l
    bias     [E]      float32 selection bias (HAS_BIAS): added to the scores to choose, not to weigh
    ids      [N, A]   int64 out, best first; weights [N, A] float32 out
"""

import triton
import triton.language as tl


@triton.jit
def grouped_topk_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr,
    stride_l, skip_below, scaling,
    E: tl.constexpr, G: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
    G_PAD: tl.constexpr, EG_PAD: tl.constexpr, A_PAD: tl.constexpr,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_TOP2: tl.constexpr, RENORM: tl.constexpr,
    SKIP: tl.constexpr,
):
    """Row n: scores = sigmoid(logits) (SIGMOID) or softmax(logits), in float32; choice = scores
    + bias; with G > 1 only the TOPK_GROUP best groups stay (a group scores its best choice, or
    its two best summed with GROUP_TOP2), the rest set to -inf (sigmoid) or 0 (softmax), as the
    reference fills them; the TOP_K best choices (lowest id among ties) weighed by their scores,
    zeroed below skip_below * the best (SKIP), renormalised (RENORM; + 1e-20 with SIGMOID), times
    scaling. Experts sit in a [G_PAD, EG_PAD] tile: expert e = g * (E / G) + k."""
    n = tl.program_id(0).to(tl.int64)
    EG: tl.constexpr = E // G
    g = tl.arange(0, G_PAD)[:, None]  # [GP, 1]
    k = tl.arange(0, EG_PAD)[None, :]  # [1, EP]
    ok = (g < G) & (k < EG)
    e = g * EG + k  # [GP, EP]
    logit = tl.load(logits_ptr + n * stride_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    if SIGMOID:
        score = tl.sigmoid(logit)
    else:
        p = tl.exp(logit - tl.max(tl.max(logit, axis=1), axis=0))
        score = p / tl.sum(tl.sum(p, axis=1), axis=0)
    score = tl.where(ok, score, 0.0)
    choice = score
    if HAS_BIAS:
        choice += tl.load(bias_ptr + e, mask=ok, other=0.0).to(tl.float32)
    choice = tl.where(ok, choice, float("-inf"))
    if G > 1:
        best = tl.max(choice, axis=1)  # [GP]
        if GROUP_TOP2:
            first = tl.min(tl.where(choice == best[:, None], k, EG_PAD), axis=1)  # the best's column
            group_score = best + tl.max(tl.where(k == first[:, None], float("-inf"), choice), axis=1)
        else:
            group_score = best
        groups = tl.arange(0, G_PAD)
        group_score = tl.where(groups < G, group_score, float("-inf"))
        keep = groups < 0  # all False
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(group_score, axis=0)
            gi = tl.min(tl.where(group_score == top, groups, G_PAD), axis=0)
            keep = keep | (groups == gi)
            group_score = tl.where(groups == gi, float("-inf"), group_score)
        if SIGMOID:
            choice = tl.where(keep[:, None], choice, float("-inf"))
        else:
            choice = tl.where(keep[:, None], choice, tl.where(ok, 0.0, float("-inf")))
    slots = tl.arange(0, A_PAD)
    ids = tl.zeros((A_PAD,), dtype=tl.int64)
    weights = tl.zeros((A_PAD,), dtype=tl.float32)
    for a in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, axis=1), axis=0)
        idx = tl.min(tl.min(tl.where(choice == top, e, E), axis=1), axis=0)  # the lowest id among ties
        picked = e == idx
        ids = tl.where(slots == a, idx.to(tl.int64), ids)
        weights = tl.where(slots == a, tl.sum(tl.sum(tl.where(picked, score, 0.0), axis=1), axis=0), weights)
        choice = tl.where(picked, float("-inf"), choice)
    if SKIP:
        weights = tl.where(weights < skip_below * tl.max(weights, axis=0), 0.0, weights)
    if RENORM:
        if SIGMOID:
            weights = weights / (tl.sum(weights, axis=0) + 1e-20)
        else:
            weights = weights / tl.sum(weights, axis=0)
    keep_slot = slots < TOP_K
    tl.store(ids_ptr + n * TOP_K + slots, ids, mask=keep_slot)
    tl.store(weights_ptr + n * TOP_K + slots, weights * scaling, mask=keep_slot)
