"""Resident experts: every expert of a layer in device memory, stacked, in dense form.

Shapes: N = tokens, A = experts per token, E = experts, I = expert ffn width, D = hidden.
    gate_up  [E, 2I, D]   rows 0..I-1 are the gate projection, I..2I-1 the up projection
    down     [E, D, I]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_ops
from .routing import group_by_expert

# Below this many routed slots (N * A) the PyTorch path gathers the chosen experts' weights and
# runs one batched matmul: no host sync, so a decode step can be captured in a CUDA graph.
GATHER_MAX_SLOTS = 16
# GPUs use the grouped Triton kernels up to this many slots: they read expert weights in place
# with no host sync. Measured on an H200 (olmoe-1b-7b shape, benchmarks/results): at 8192 slots
# (1024-token prefill) they run 2.9x faster than cuBLAS per expert, so there is no upper limit.
TRITON_MAX_SLOTS = 1 << 62
# Up to this many slots (batch-1 decode of top-8 models) the per-slot kernels run instead: no
# sorting or block map, a third of the small launches per layer.
SLOT_KERNEL_MAX_SLOTS = 16


class ResidentExperts(nn.Module):
    """All E experts of one MoE layer, resident on the model's device."""

    def __init__(self, num_experts: int, hidden: int, ffn: int):
        super().__init__()
        self.num_experts, self.hidden, self.ffn = num_experts, hidden, ffn
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))  # [E, 2I, D]
        self.down = nn.Parameter(torch.empty(num_experts, hidden, ffn))  # [E, D, I]

    def expert_bytes(self) -> int:
        """Returns the bytes of one expert as stored."""
        return (self.gate_up[0].numel() + self.down[0].numel()) * self.gate_up.element_size()

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] for x [N, D]."""
        slots = expert_ids.numel()
        if torch.is_grad_enabled():  # training: autograd through the PyTorch path
            return self._grouped(x, expert_ids, weights)
        if x.is_cuda and slots <= TRITON_MAX_SLOTS and triton_ops.triton_usable(x):
            if slots <= SLOT_KERNEL_MAX_SLOTS:
                return triton_ops.slot_expert_ffn(x, expert_ids, weights, self.gate_up, self.down)
            return triton_ops.grouped_expert_ffn(x, expert_ids, weights, self.gate_up, self.down)
        if slots <= GATHER_MAX_SLOTS:
            return self._gathered(x, expert_ids, weights)
        return self._grouped(x, expert_ids, weights)

    def _gathered(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, top_k = expert_ids.shape
        flat = expert_ids.reshape(-1)  # [S]
        xs = x.repeat_interleave(top_k, dim=0)[:, :, None]  # [S, D, 1]
        gate, up = torch.bmm(self.gate_up[flat], xs).squeeze(-1).chunk(2, dim=-1)  # [S, I] each
        h = (F.silu(gate) * up)[:, :, None]  # [S, I, 1]
        out = torch.bmm(self.down[flat], h).view(n, top_k, self.hidden)  # [N, A, D]
        return (out * weights[:, :, None]).sum(dim=1)

    def _grouped(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        groups = group_by_expert(expert_ids, weights, self.num_experts, skip_zero=not torch.is_grad_enabled())
        xs = x[groups.token_of]  # [S, D] tokens in expert order
        out = torch.empty_like(xs)
        bounds = groups.offsets()
        for e in range(self.num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                gate, up = F.linear(xs[lo:hi], self.gate_up[e]).chunk(2, dim=-1)
                out[lo:hi] = F.linear(F.silu(gate) * up, self.down[e])
        out = out * groups.weight_of[:, None]
        return torch.zeros_like(x).index_add_(0, groups.token_of, out)
