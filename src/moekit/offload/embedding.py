"""The input embedding table kept in page-locked host memory, read in place by the device.

A lookup reads one row per token (4 KB for a 2048-wide bf16 model), so an untied input table
(OLMoE-1B-7B: 50304 x 2048 bf16 = 206 MB, 1.5% of the model) need not take device memory that
the expert cache could use. The device gathers the rows itself over PCIe through unified
addressing (kernels.embedding_rows, the same in-place reads as misses "mapped"), so a decode step
stays one CUDA graph. Where the device cannot read host memory in place (checked once against
the table itself), the table goes back to the device.

Shapes: T = tokens, V = vocab, D = hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import pinned_empty

try:
    import triton

    from ..kernels.embedding_rows import embedding_rows_kernel
    HAVE_TRITON = True
except ImportError:  # without triton the table stays on the device
    HAVE_TRITON = False

BLOCK_D = 1024


class HostEmbedding(nn.Module):
    """An nn.Embedding whose weight [V, D] lives in page-locked host memory."""

    def __init__(self, weight: torch.Tensor, device: torch.device):
        """`weight` [V, D] a page-locked host tensor; `device` where lookups are returned."""
        super().__init__()
        self.weight = weight  # a plain attribute: model.to() and state_dict leave it in host memory
        self.device = device
        self.anchor = torch.empty(1, dtype=weight.dtype, device=device)  # the kernel's base pointer
        size = weight.element_size()
        delta = weight.data_ptr() - self.anchor.data_ptr()
        if delta % size:
            raise ValueError("the host embedding table is not aligned to its elements")
        self.offset = delta // size

    @classmethod
    def from_embedding(cls, embed: nn.Embedding) -> nn.Module:
        """Returns a HostEmbedding holding a page-locked copy of embed's table (the device copy
        freed), or `embed` itself where the device cannot read it in place."""
        device = embed.weight.device
        if not HAVE_TRITON or device.type != "cuda":
            return embed
        host = pinned_empty(tuple(embed.weight.shape), embed.weight.dtype)
        host.copy_(embed.weight)
        ids = torch.arange(min(64, host.shape[0]), device=device)
        try:
            moved = cls(host, device)
            ok = torch.equal(moved(ids), embed(ids))
        except (RuntimeError, ValueError):  # not readable in place, or not aligned to its elements
            ok = False
        return moved if ok else embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Returns the rows [*ids.shape, D] for input_ids (any shape) on the model's device."""
        if not (input_ids.is_cuda or _interpreting()):  # a CPU lookup reads the table directly
            return F.embedding(input_ids, self.weight)
        flat = input_ids.reshape(-1).contiguous()
        d = self.weight.shape[1]
        out = torch.empty(flat.numel(), d, dtype=self.weight.dtype, device=self.device)
        if flat.numel():
            embedding_rows_kernel[(flat.numel(), triton.cdiv(d, BLOCK_D))](
                flat, self.anchor, self.offset, out, d, self.weight.stride(0), out.stride(0), BLOCK_D=BLOCK_D)
        return out.view(*input_ids.shape, d)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, in page-locked host memory"


def _interpreting() -> bool:
    """Returns whether Triton runs CPU tensors (its interpreter: the tests)."""
    import os

    return HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1"


