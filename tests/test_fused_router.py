"""The group-limited / sigmoid routing kernel (moekit.fused.grouped_topk, reached through
moekit.routers.route on the fused path) against route's PyTorch rules.

On CPU machines the kernel runs under TRITON_INTERPRET=1 (set in conftest.py); on a GPU, for real.
"""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_device

from moekit import fused
from moekit.config import RouterConfig
from moekit.routers import route

pytestmark = pytest.mark.skipif(not fused.HAVE_TRITON, reason="triton not installed")

# (tokens, experts, top-k, scoring, groups, kept groups, bias, renormalise, scaling, skip_below):
# DeepSeek-V3 (256 experts, best 4 of 8 groups by their two best), GLM-4.5 (no groups), V3
# shrunk with odd sizes, DeepSeek-V2's group_limited_greedy (a group scores its best), a skip
ROUTE_CASES = [
    (2, 256, 8, "sigmoid", 8, 4, True, True, 2.5, 0.0),
    (3, 128, 8, "sigmoid", 1, 1, True, True, 1.0, 0.0),
    (4, 12, 3, "sigmoid", 4, 2, True, False, 1.5, 0.0),
    (2, 160, 6, "softmax", 8, 3, False, False, 16.0, 0.0),
    (3, 64, 6, "sigmoid", 4, 2, False, True, 1.0, 0.999),
]


def _sorted(ids: torch.Tensor, weights: torch.Tensor):
    order = ids.argsort(dim=-1)
    return ids.gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize("case", ROUTE_CASES)
def test_grouped_topk_matches_route(case, monkeypatch):
    n, e, top_k, scoring, groups, kept, has_bias, renorm, scaling, skip = case
    device = kernel_device()
    g = torch.Generator().manual_seed(e + top_k)
    logits = (3 * torch.randn(n, e, generator=g)).to(device, torch.bfloat16)
    bias = (0.1 * torch.randn(e, generator=g)).to(device) if has_bias else None
    rule = RouterConfig(scoring=scoring, n_group=groups, topk_group=kept, scaling_factor=scaling)
    monkeypatch.setenv("MOEKIT_FUSED", "0")
    ids_ref, w_ref = route(logits, rule, top_k, renorm, bias, skip)
    monkeypatch.setenv("MOEKIT_FUSED", "1")
    monkeypatch.setattr(fused, "ALLOW_INTERPRETER", True)
    calls = []
    real = fused.grouped_topk
    monkeypatch.setattr(fused, "grouped_topk", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, w = route(logits, rule, top_k, renorm, bias, skip)
    assert calls == [1] and ids.dtype == torch.int64 and w.dtype == torch.float32
    (ids, w), (ids_ref, w_ref) = _sorted(ids, w), _sorted(ids_ref, w_ref)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    if skip:
        assert (w == 0).any()  # the case exercises the skip
