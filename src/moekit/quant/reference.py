"""PyTorch references of the compressed-form matmuls: each decodes the whole matrix and calls F.linear.

The CPU path of quant.ops' dispatch, and what the Triton kernels' tests compare against. Shapes as
in quant.ops' docstring: `*_weight_reference` returns the dense [..., R, K], `*_linear_reference`
x [B, K] @ W^T as [B, R] in x's dtype, `*_slot_linear_reference` the per-slot matmul [S, R] (or
[S, I] with swiglu) of stacked [E, ...] matrices, `*_slot_down_reference` the down matmul with each
token's top-k sum [N, R].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .code import decode
from .grids import dequantize_int, dequantize_ternary, unpack_codes


def int_weight_reference(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, cols: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns the dense weight [..., R, K] of int-form matrices through the PyTorch decode."""
    return dequantize_int(unpack_codes(qweight, bits, cols), scale, zero).to(dtype)


def int_linear_reference(x, qweight, scale, zero, bits: int) -> torch.Tensor:
    """Returns x [B, K] @ W^T as [B, R] for an int-form W, through int_weight_reference."""
    return F.linear(x, int_weight_reference(qweight, scale, zero, bits, x.shape[-1], x.dtype))


def code_weight_reference(words, starts, row_chunks, block_offsets, lo, hi, table, cols: int,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns the dense weight [..., R, K] of code-form matrices through the PyTorch decode."""
    codes = decode(words, starts, row_chunks, block_offsets, table, cols)
    return dequantize_ternary(codes, lo[..., None], hi[..., None]).to(dtype)


def code_linear_reference(x, words, starts, row_chunks, block_offsets, lo, hi, table) -> torch.Tensor:
    """Returns x [B, K] @ W^T as [B, R] for a code-form W, through code_weight_reference."""
    return F.linear(x, code_weight_reference(words, starts, row_chunks, block_offsets, lo, hi, table, x.shape[-1],
                                             x.dtype))


def slot_reference(x: torch.Tensor, ids: torch.Tensor, linear, top_k: int = 1,
                   weights: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    """Returns the per-slot matmul (quant.ops' docstring) in PyTorch: `linear(e, x [1, K] float32)` is
    expert e's x @ W^T [1, R]; float32 inside, x's dtype out (as the slot kernels round)."""
    xf = x.float()
    y = torch.cat([linear(e, xf[s // top_k][None]) for s, e in enumerate(ids.tolist())])  # [S, R]
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if weights is not None:
        y = y * weights.float()[:, None]
    return y.to(x.dtype)


def int_slot_linear_reference(x, ids, qweight, scale, zero, bits: int, top_k: int = 1, weights=None,
                              swiglu: bool = False) -> torch.Tensor:
    """Returns the per-slot matmul of stacked int-form matrices through int_linear_reference."""
    linear = lambda e, xs: int_linear_reference(xs, qweight[e], scale[e], zero[e], bits)
    return slot_reference(x, ids, linear, top_k, weights, swiglu)


def code_slot_linear_reference(x, ids, words, starts, row_chunks, block_offsets, lo, hi, table, top_k: int = 1,
                               weights=None, swiglu: bool = False) -> torch.Tensor:
    """Returns the per-slot matmul of stacked code-form matrices through code_linear_reference."""
    linear = lambda e, xs: code_linear_reference(
        xs, words[e], starts[e], row_chunks[e], block_offsets[e], lo[e], hi[e], table)
    return slot_reference(x, ids, linear, top_k, weights, swiglu)


def slot_down_reference(h: torch.Tensor, ids: torch.Tensor, linear, top_k: int, weights: torch.Tensor) -> torch.Tensor:
    """Returns [N, R] in h's dtype: each token's sum over its top_k slots s = t*top_k + a of
    weights[s] * linear(ids[s], h[s]), in float32 in the order a = 0..top_k-1 (as the down kernels add)."""
    y = slot_reference(h.float(), ids, linear, 1, weights)  # [S, R] float32, weighted
    y = y.view(-1, top_k, y.shape[-1])
    out = y[:, 0]
    for a in range(1, top_k):
        out = out + y[:, a]
    return out.to(h.dtype)


def int_slot_down_reference(h, ids, qweight, scale, zero, bits: int, top_k: int, weights) -> torch.Tensor:
    """Returns the down matmul with the top-k sum of stacked int-form matrices through int_linear_reference."""
    linear = lambda e, xs: int_linear_reference(xs, qweight[e], scale[e], zero[e], bits)
    return slot_down_reference(h, ids, linear, top_k, weights)


def code_slot_down_reference(h, ids, words, starts, row_chunks, block_offsets, lo, hi, table, top_k: int,
                             weights) -> torch.Tensor:
    """Returns the down matmul with the top-k sum of stacked code-form matrices through code_linear_reference."""
    linear = lambda e, xs: code_linear_reference(
        xs, words[e], starts[e], row_chunks[e], block_offsets[e], lo[e], hi[e], table)
    return slot_down_reference(h, ids, linear, top_k, weights)
