"""Resident experts: every expert of a layer in device memory, stacked, in dense form.

Shapes: N = tokens, A = experts per token, E = experts, I = expert ffn width, D = hidden.
    gate_up  [E, 2I, D]   rows 0..I-1 are the gate projection, I..2I-1 the up projection
    down     [E, D, I]
How they multiply is the dense form's business (experts.forms); this module only holds them, as
trainable parameters (the training loop, pruning and the writer use them as such).
"""

from __future__ import annotations

import torch
from torch import nn

from .forms import DenseForm


class ResidentExperts(nn.Module):
    """All E experts of one MoE layer, resident on the model's device."""

    def __init__(self, num_experts: int, hidden: int, ffn: int):
        super().__init__()
        self.num_experts, self.hidden, self.ffn = num_experts, hidden, ffn
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * ffn, hidden))  # [E, 2I, D]
        self.down = nn.Parameter(torch.empty(num_experts, hidden, ffn))  # [E, D, I]

    @property
    def form(self) -> DenseForm:
        """The dense form in the parameters' dtype."""
        return DenseForm(self.hidden, self.ffn, self.gate_up.dtype)

    def stacked(self) -> dict[str, torch.Tensor]:
        """Returns {name: [E, ...]} as the form reads them."""
        return {"gate_up": self.gate_up, "down": self.down}

    def expert_bytes(self) -> int:
        """Returns the bytes of one expert as stored."""
        return self.form.expert_bytes(0)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D] for x [N, D]."""
        return self.form.run(x, expert_ids, weights, self.stacked())

    def _gathered(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The gathered PyTorch path (a reference for the kernels' tests)."""
        return self.form.run_planned(x, expert_ids, weights, self.stacked(), gathered=True)

    def _grouped(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The grouped PyTorch path (a reference for the kernels' tests)."""
        return self.form.run_planned(x, expert_ids, weights, self.stacked(), gathered=False)
