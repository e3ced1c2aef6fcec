"""The model's projections: nn.Linear, with small bf16/fp16 calls on the CPU run by the native
kernels (bf16: moekit.native.matvec; fp16: moekit.native.experts.linear).

Why: a decode step on a CPU multiplies a few rows by each weight matrix, so its time is the
weights' bytes over the host's memory bandwidth. In a profile of a bf16 decode step of the OLMoE
shape on the 2-core test machine (taken while other work shared the cores), PyTorch's bf16 matmul
took 71% of the step; the native kernel streams each row once with all cores (the 4-layer shape:
3.97 vs 1.69 tok/s). Float32, GPU tensors, calls of more than SMALL_BATCH_TOKENS rows (prefill:
compute-bound, where PyTorch's GEMMs win) and anything autograd must see take F.linear. Same
parameters and state dict as nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .native.experts import SMALL_BATCH_TOKENS, linear, usable
from .native.matvec import MAX_ROWS, matvec

_NATIVE_DTYPES = (torch.bfloat16, torch.float16)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda and x.dtype in _NATIVE_DTYPES and self.weight.dtype == x.dtype and not (
                torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            if 0 < rows <= SMALL_BATCH_TOKENS and usable(x, self.weight.dtype):
                flat = x.reshape(rows, x.shape[-1])
                if x.dtype == torch.bfloat16 and rows <= MAX_ROWS and self.weight.is_contiguous():  # AVX512-BF16
                    return matvec(flat, self.weight, self.bias).view(*x.shape[:-1], -1)
                return linear(flat, self.weight, self.bias).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)
