"""Matmuls with compressed expert matrices: Triton kernels on GPUs, PyTorch references elsewhere.

Shapes: B = tokens (1..64 for the kernels), K = input columns, R = output rows,
Wk = int32 words per row, P = scale groups per row, S = code chunks per row, W = codewords per chunk.
    int form:   qweight [R, Wk] int32, scale [R, P] float16, zero [R, P] uint8
    code form:  words [R, S, W] uint8/int16, starts [R, S] int16/int32, lo, hi [R] float16,
                table [2^bits, 2] int32
Each `*_linear` returns x @ W^T as [B, R] in x's dtype; the `*_reference` twins decode the
whole matrix and call F.linear (the CPU path, and what the kernel tests compare against).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .code import decode
from .grids import dequantize_int, dequantize_ternary, unpack_codes

try:
    import triton

    from .kernels.code_matmul import code_matmul_kernel
    from .kernels.int_matmul import int_matmul_kernel
    HAVE_TRITON = True
except ImportError:  # CPU machines without triton use the references
    HAVE_TRITON = False

KERNEL_MAX_TOKENS = 64  # above this, one expert's matrix is decoded once and multiplied densely


def use_kernels(x: torch.Tensor) -> bool:
    """Returns whether the Triton kernels run for x (CUDA, or MOEKIT_QUANT_KERNELS=1 under the
    Triton interpreter for tests)."""
    if not HAVE_TRITON:
        return False
    return x.is_cuda or os.environ.get("MOEKIT_QUANT_KERNELS") == "1"


# ---- int-N -------------------------------------------------------------------------------------

def int_weight(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, cols: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns the dense weight [R, K] of an int-form matrix."""
    return dequantize_int(unpack_codes(qweight, bits, cols), scale, zero).to(dtype)


def int_linear_reference(x, qweight, scale, zero, bits: int) -> torch.Tensor:
    return F.linear(x, int_weight(qweight, scale, zero, bits, x.shape[-1], x.dtype))


def int_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bits: int) -> torch.Tensor:
    """Returns x [B, K] @ W^T as [B, R] for an int-form W (kernel for B <= 64 where usable)."""
    if not use_kernels(x) or x.shape[0] > KERNEL_MAX_TOKENS:
        return int_linear_reference(x, qweight, scale, zero, bits)
    return int_linear_triton(x, qweight, scale, zero, bits)


def int_linear_triton(x, qweight, scale, zero, bits: int, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    b, k = x.shape
    r = qweight.shape[0]
    groups = scale.shape[1]
    group_cols = -(-k // groups)
    block_b = max(16, triton.next_power_of_2(b))  # tl.dot needs >= 16
    block_k = min(block_k, group_cols) if group_cols % 16 == 0 and groups > 1 else block_k
    x = x.contiguous()
    out = torch.empty(b, r, dtype=x.dtype, device=x.device)
    int_matmul_kernel[(triton.cdiv(r, block_n),)](
        x, qweight, scale, zero, out, b, r, x.stride(0), qweight.stride(0), scale.stride(0), out.stride(0),
        K=k, BITS=bits, GROUP_COLS=group_cols, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return out


# ---- ternary code ------------------------------------------------------------------------------

def code_weight(words, starts, lo, hi, table, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns the dense weight [R, K] of a code-form matrix."""
    return dequantize_ternary(decode(words, starts, table, cols), lo[..., None], hi[..., None]).to(dtype)


def code_linear_reference(x, words, starts, lo, hi, table) -> torch.Tensor:
    return F.linear(x, code_weight(words, starts, lo, hi, table, x.shape[-1], x.dtype))


def code_linear(x: torch.Tensor, words: torch.Tensor, starts: torch.Tensor, lo: torch.Tensor,
                hi: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Returns x [B, K] @ W^T as [B, R] for a code-form W (decode + matmul in one kernel for
    B <= 64 where usable)."""
    if not use_kernels(x) or x.shape[0] > KERNEL_MAX_TOKENS:
        return code_linear_reference(x, words, starts, lo, hi, table)
    return code_linear_triton(x, words, starts, lo, hi, table)


def code_block_rows(batch: int) -> int:
    """Returns the rows per program of the code kernel: fewer as the token tile grows (registers)."""
    return 32 if batch <= 2 else 16 if batch <= 8 else 8 if batch <= 32 else 4


def code_linear_triton(x, words, starts, lo, hi, table, block_r: int | None = None) -> torch.Tensor:
    b, k = x.shape
    r, s, w = words.shape
    block_b = triton.next_power_of_2(b)
    block_r = block_r or code_block_rows(b)
    x = x.contiguous()
    partial = torch.empty(s, b, r, dtype=torch.float32, device=x.device)  # one sum per chunk
    code_matmul_kernel[(triton.cdiv(r, block_r), s)](
        x, words, starts, lo, hi, table, partial, b, r,
        x.stride(0), words.stride(0), words.stride(1), starts.stride(0), partial.stride(0), partial.stride(1),
        K=k, W=w, BLOCK_B=block_b, BLOCK_R=block_r)
    return partial.sum(dim=0).to(x.dtype)
