"""The model's projections: nn.Linear, with small bf16/fp16 calls on the CPU run by the native
kernel (moekit.native.experts.linear).

Why: a decode step on a CPU multiplies a few rows by each weight matrix, so its time is the
weights' bytes over the host's memory bandwidth. PyTorch's bf16 matmul on a CPU without AMX
reached ~2 GB/s for these shapes on the 2-core test machine (a decode step of the OLMoE shape
spent 71% of its time there); the native kernel streams each row once with all cores. Float32,
GPU tensors, calls of more than SMALL_BATCH_TOKENS rows (prefill: compute-bound, where PyTorch's
GEMMs win) and anything autograd must see take F.linear. Same parameters and state dict as nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and self.weight.dtype == x.dtype
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            if 0 < rows <= _small_batch():
                from .native.experts import linear, usable

                if usable(x, self.weight.dtype):
                    return linear(x.reshape(rows, x.shape[-1]), self.weight, self.bias).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


def _small_batch() -> int:
    from .native.experts import SMALL_BATCH_TOKENS

    return SMALL_BATCH_TOKENS
