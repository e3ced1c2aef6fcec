"""The expert seam: resident experts' two PyTorch paths against a per-token reference, and routing groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.experts import ResidentExperts, group_by_expert
from moekit.experts import forms


def _experts(num_experts=5, hidden=12, ffn=7, seed=0, dtype=torch.float32) -> ResidentExperts:
    experts = ResidentExperts(num_experts, hidden, ffn)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up.copy_(torch.randn(experts.gate_up.shape, generator=g) * 0.3)
        experts.down.copy_(torch.randn(experts.down.shape, generator=g) * 0.3)
    return experts.to(dtype)


def _routing(n, num_experts, top_k, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(n)])  # [N, A]
    weights = torch.softmax(torch.randn(n, top_k, generator=g), dim=-1)
    x = torch.randn(n, 12, generator=g)
    return x, ids, weights


def _reference(experts: ResidentExperts, x, ids, weights):
    """Returns sum_a w[n,a] * expert_{ids[n,a]}(x[n]), token by token."""
    out = torch.zeros_like(x)
    ffn = experts.ffn
    for n in range(x.shape[0]):
        for a in range(ids.shape[1]):
            e = int(ids[n, a])
            gate = experts.gate_up[e, :ffn] @ x[n]
            up = experts.gate_up[e, ffn:] @ x[n]
            out[n] += weights[n, a] * (experts.down[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("n, top_k", [(1, 1), (1, 2), (3, 2), (8, 2), (20, 3), (64, 4)])
def test_gathered_and_grouped_equal_the_reference(n, top_k):
    experts = _experts()
    x, ids, weights = _routing(n, 5, top_k, seed=n)
    with torch.no_grad():
        expected = _reference(experts, x, ids, weights)
        torch.testing.assert_close(experts._gathered(x, ids, weights), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(experts._grouped(x, ids, weights), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(experts(x, ids, weights), expected, rtol=1e-5, atol=1e-5)


def test_repeated_expert_and_unused_experts():
    """A token may list one expert twice (weights add); experts nobody picked are skipped."""
    experts = _experts()
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[1, 1], [1, 3], [3, 1], [1, 1]])
    weights = torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.2, 0.8], [0.9, 0.1]])
    with torch.no_grad():
        expected = _reference(experts, x, ids, weights)
        torch.testing.assert_close(experts._gathered(x, ids, weights), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(experts._grouped(x, ids, weights), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_paths_agree_in_low_precision(dtype, tol):
    experts = _experts(dtype=dtype)
    x, ids, weights = _routing(6, 5, 2)
    x, weights = x.to(dtype), weights.to(dtype)
    with torch.no_grad():
        a = experts._gathered(x, ids, weights).float()
        b = experts._grouped(x, ids, weights).float()
    assert ((a - b).norm() / b.norm()).item() < tol


def test_dispatch():
    """Small no-grad batches take the gather path, large or training batches the grouped one
    (the dense form's plan, the same for every placement)."""
    form = _experts().form
    small = _routing(forms.GATHER_MAX_SLOTS // 2, 5, 2)
    large = _routing(forms.GATHER_MAX_SLOTS, 5, 2)
    with torch.no_grad():
        assert form.plan(small[1], small[2], 5).gathered
        assert not form.plan(large[1], large[2], 5).gathered
    assert not form.plan(small[1], small[2], 5).gathered  # grad enabled


def test_gradients_flow_through_grouped_path():
    experts = _experts()
    x, ids, weights = _routing(10, 5, 2)
    x.requires_grad_(True)
    experts(x, ids, weights).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    used = ids.unique()
    assert experts.gate_up.grad[used].abs().sum() > 0
    unused = [e for e in range(5) if e not in used.tolist()]
    if unused:
        assert experts.gate_up.grad[unused].abs().sum() == 0


def test_expert_bytes():
    assert _experts(4, 12, 7).expert_bytes() == (2 * 7 * 12 + 12 * 7) * 4
    assert _experts(4, 12, 7, dtype=torch.bfloat16).expert_bytes() == (2 * 7 * 12 + 12 * 7) * 2


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), num_experts=st.integers(1, 9), top_k=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_group_by_expert(n, num_experts, top_k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts, (n, top_k), generator=g)  # repeats allowed
    weights = torch.rand(n, top_k, generator=g)
    groups = group_by_expert(ids, weights, num_experts)
    assert groups.counts.shape == (num_experts,)
    assert int(groups.counts.sum()) == n * top_k
    torch.testing.assert_close(groups.counts, torch.bincount(ids.reshape(-1), minlength=num_experts))
    bounds = groups.offsets()
    assert bounds[0] == 0 and bounds[-1] == n * top_k and bounds == sorted(bounds)
    sorted_ids = ids.reshape(-1)[groups.order]
    for e in range(num_experts):  # each expert's run holds exactly its slots
        assert (sorted_ids[bounds[e]:bounds[e + 1]] == e).all()
    # every slot appears once, with its own token and weight
    assert sorted(groups.order.tolist()) == list(range(n * top_k))
    assert torch.equal(groups.token_of, groups.order // top_k)
    assert torch.equal(groups.weight_of, weights.reshape(-1)[groups.order])
    # stable: within an expert, slots keep token order
    for e in range(num_experts):
        run = groups.token_of[bounds[e]:bounds[e + 1]]
        assert torch.equal(run, run.sort().values)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 4, 37, 300])
def test_cuda_forward_equals_grouped_reference(n):
    """On a GPU, forward may take the Triton kernels; it must agree with the PyTorch path."""
    experts = _experts(num_experts=8, hidden=12, ffn=7).cuda()
    x, ids, weights = _routing(n, 8, 2)
    x, ids, weights = x.cuda(), ids.cuda(), weights.cuda()
    with torch.no_grad():
        expected = experts._grouped(x, ids, weights)
        torch.testing.assert_close(experts(x, ids, weights), expected, rtol=2e-3, atol=2e-3)


def test_cpu_bf16_calls_without_bf16_hardware_run_the_kernel_in_pieces(monkeypatch):
    """forms.cpu_expert_ffn on a CPU without bf16 hardware: bf16 calls past SMALL_BATCH_TOKENS go to
    the native kernel too, past MAX_JOB_TOKENS in pieces of that many tokens (each piece the bits of
    its own call), close to float32 math; a token routed twice to one row (a job could pass 256
    tokens) and CPUs with bf16 hardware past 16 tokens keep PyTorch's path (None)."""
    from moekit.experts.forms import cpu_expert_ffn
    from moekit.native import experts as ne

    if ne.library() is None:
        pytest.skip("no C++ compiler: the native kernels are not built")
    monkeypatch.setattr(ne, "bf16_in_hardware", lambda: False)
    count, d, ffn, n, top_k = 6, 64, 32, ne.MAX_JOB_TOKENS + 44, 2
    g = torch.Generator().manual_seed(3)
    gate_up = (torch.randn(count, 2 * ffn, d, generator=g) / d ** 0.5).to(torch.bfloat16)
    down = (torch.randn(count, d, ffn, generator=g) / ffn ** 0.5).to(torch.bfloat16)
    x = torch.randn(n, d, generator=g).to(torch.bfloat16)
    rows = torch.stack([torch.randperm(count, generator=g)[:top_k] for _ in range(n)])
    weights = torch.rand(n, top_k, generator=g)
    got = cpu_expert_ffn(x, rows, weights, gate_up, down)
    gu, dn, xf = gate_up.float(), down.float(), x.float()
    expected = torch.zeros(n, d)
    for a in range(top_k):
        h = torch.einsum("nfd,nd->nf", gu[rows[:, a]], xf)
        expected += weights[:, a, None] * torch.einsum("ndf,nf->nd", dn[rows[:, a]], F.silu(h[:, :ffn]) * h[:, ffn:])
    assert got is not None and got.shape == x.shape and got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() <= 2e-2 * expected.abs().max()
    limit = ne.MAX_JOB_TOKENS
    assert torch.equal(got[limit:], cpu_expert_ffn(x[limit:], rows[limit:], weights[limit:], gate_up, down))
    twice = rows.clone()
    twice[0, 1] = twice[0, 0]
    assert cpu_expert_ffn(x, twice, weights, gate_up, down) is None
    monkeypatch.setattr(ne, "bf16_in_hardware", lambda: True)
    assert cpu_expert_ffn(x[:40], rows[:40], weights[:40], gate_up, down) is None
