"""Matmuls with compressed expert matrices: Triton kernels on GPUs, PyTorch references elsewhere.

Shapes: B = tokens (1..64 for the kernels), K = input columns, R = output rows,
Wk = int32 words per row, P = scale groups per row, T = code chunk capacity, W = codewords per
chunk, NB = row blocks (quant.code).
    int form:   qweight [R, Wk] int32, scale [R, P] float16, zero [R, P] uint8
    code form:  words [T, W] uint8/int16, starts [T] int16/int32, row_chunks [R] uint8/int16/int32,
                block_offsets [NB] int32, lo, hi [R] float16, table [2^bits, 2] int32
Each `*_linear` returns x @ W^T as [B, R] in x's dtype; the `*_reference` twins decode the
whole matrix in PyTorch and call F.linear (the CPU path, and what the kernel tests compare against).
Above KERNEL_MAX_TOKENS tokens the kernel paths decode the matrix once on the device
(`code_weight_triton`: no host sync, no workspace but the [R, K] weight) and multiply densely.
This file chooses the path; the Triton launches and their tuned configs are in quant.launch, the
PyTorch references in quant.reference (both re-exported here).

Per-slot matmuls (`*_slot_linear`, decode): S routed (token, expert) slots in one launch, the
expert of each slot read on the device, the stored tensors stacked [E, ...] (a layer's experts,
or a cache slab's slots viewed in one layer's layout):
    x [N, K] (slot s reads x[s // top_k]), ids [S] int64, weights [S] or None
    swiglu:  W [E, 2I, K] -> [S, I] = silu(x W[:I]^T) * (x W[I:]^T)      (gate_up)
    else:    W [E, R, K]  -> [S, R] = weights[s] * x W^T                   (down)
and the down matmul with each token's top-k sum (`*_slot_down`), N = S / top_k tokens:
    h [S, I], ids [S], weights [S]:  W [E, D, I] -> [N, D] = sum_a weights[s] * h[s] W_{ids[s]}^T,  s = n*top_k + a
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# The launches (quant.launch) and the references (quant.reference) are re-exported: callers and
# tests reach them, and patch them, as ops.<name>; the dispatch below looks them up here.
from .launch import (CODE_DECODE_CONFIG, CODE_DEFAULT, CODE_MAX_TILE, CODE_SLOT_DOWN_TUNED,  # noqa: F401
                     CODE_SLOT_TUNED, CODE_TUNED, DECODE_DTYPES, HAVE_TRITON, INT_DECODE_CONFIG, INT_DEFAULT,
                     INT_SLOT_DOWN_TUNED, INT_SLOT_TUNED, INT_TUNED, _cap_code_tile, _check_code_layout, _check_out,
                     _check_unit_stride, _code_decode, _hw_popcount, _packed_words, batch_bucket, code_config,
                     code_decode_triton, code_linear_triton, code_slot_config, code_slot_down_config,
                     code_slot_down_triton, code_slot_linear_triton, code_weight_triton, int_config,
                     int_linear_triton, int_scale_mode, int_slot_config, int_slot_down_config, int_slot_down_triton,
                     int_slot_linear_triton, int_weight_triton)
from .reference import (code_linear_reference, code_slot_down_reference, code_slot_linear_reference,  # noqa: F401
                        code_weight_reference, int_linear_reference, int_slot_down_reference,
                        int_slot_linear_reference, int_weight_reference, slot_down_reference, slot_reference)

KERNEL_MAX_TOKENS = 64  # above this, one expert's matrix is decoded once and multiplied densely
# Up to this many tokens a code-form matmul runs the fused kernel over 64-token chunks; above it,
# decode once (code_weight_triton) + one dense matmul. The fused kernel reads the compressed matrix
# once per chunk but its cost grows with the nonzeros x tokens it gathers: 136 us per 64 tokens on
# mixtral gate/up, 114 us on down (CODE_TUNED), so 2 chunks (65-128 tokens) cost ~250-270 us. The
# decode reads ~0.6 bits per weight and writes R*K*2 bytes twice (the memset, then the nonzeros):
# ~2 x 117 MB at ~4 TB/s, ~60 us, plus the decode work the batch-1 kernel does in ~19 us; the
# bf16 matmul after it is ~41 us up to a few hundred tokens (weight-read bound). Estimated
# ~120 us against ~155 us for 64 + 1 tokens chunked, so chunking never wins on those estimates
# and the threshold equals KERNEL_MAX_TOKENS (no chunked path). Not measured yet: raise it (to
# 65..128) if a GPU run shows the decode path slower than two fused calls.
CODE_CHUNKED_MAX_TOKENS = 64


def use_kernels(x: torch.Tensor) -> bool:
    """Returns whether the Triton kernels run for x (CUDA, or MOEKIT_QUANT_KERNELS=1 under the
    Triton interpreter for tests)."""
    if not HAVE_TRITON:
        return False
    # CPU tensors run Triton only under its interpreter (TRITON_INTERPRET=1)
    return x.is_cuda or (os.environ.get("MOEKIT_QUANT_KERNELS") == "1" and os.environ.get("TRITON_INTERPRET") == "1")


# ---- int-N -------------------------------------------------------------------------------------

# The PyTorch decode (int_weight_reference) has no host sync but goes through int64 codes and
# float32 scale, zero, code and product tensors: a peak of ~17 bytes per weight (pipeline.hrm),
# ~1 GB for one Mixtral matrix, against the 2 bytes per weight of the bf16 result. Where the
# kernels run, int_weight_triton writes the result directly; groups that split packed words keep the
# PyTorch path, as in int_linear, until test_int_decode_on_cuda has passed on a GPU (the fused
# kernel's per-code scale mode is wrong there; the decode kernel indexes groups per code, untested).
def int_weight(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, cols: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns the dense weight [..., R, K] of int-form matrices: the decode kernel where the kernels
    run (CUDA; the interpreter under MOEKIT_QUANT_KERNELS=1), else the PyTorch decode."""
    if use_kernels(qweight) and dtype in DECODE_DTYPES and not groups_split_words(bits, scale.shape[-1], cols):
        return int_weight_triton(qweight, scale, zero, bits, cols, dtype)
    return int_weight_reference(qweight, scale, zero, bits, cols, dtype)


def groups_split_words(bits: int, groups: int, cols: int) -> bool:
    """Returns whether scale groups start inside a packed word (e.g. 3-bit codes, 10 per word, in groups
    of 8, 16 or 128: the kernels' per-code scale mode). That mode gives wrong results on CUDA (H200,
    tests/quant/test_kernels.py (then tests/test_quant_kernels.py) at 11f8168; right under the interpreter), so such matrices take the
    PyTorch path until it is fixed."""
    return groups > 1 and (-(-cols // groups)) % (32 // bits) != 0


def int_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bits: int) -> torch.Tensor:
    """Returns x [B, K] @ W^T as [B, R] for an int-form W: where the kernels run, the fused kernel up
    to KERNEL_MAX_TOKENS tokens, else the decode kernel and one dense matmul; elsewhere the reference."""
    if not use_kernels(x) or groups_split_words(bits, scale.shape[-1], x.shape[-1]):
        return int_linear_reference(x, qweight, scale, zero, bits)
    if x.shape[0] <= KERNEL_MAX_TOKENS:
        return int_linear_triton(x, qweight, scale, zero, bits)
    if x.dtype not in DECODE_DTYPES:
        return int_linear_reference(x, qweight, scale, zero, bits)
    return F.linear(x, int_weight_triton(qweight, scale, zero, bits, x.shape[-1], x.dtype))


# ---- ternary code ------------------------------------------------------------------------------

def code_weight(words, starts, row_chunks, block_offsets, lo, hi, table, cols: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Returns the dense weight [..., R, K] of code-form matrices: the decode kernel where the
    kernels run (CUDA; the interpreter under MOEKIT_QUANT_KERNELS=1), else the PyTorch decode."""
    if use_kernels(words) and dtype in DECODE_DTYPES:
        return code_weight_triton(words, starts, row_chunks, block_offsets, lo, hi, table, cols, dtype)
    return code_weight_reference(words, starts, row_chunks, block_offsets, lo, hi, table, cols, dtype)


def code_linear(x: torch.Tensor, words: torch.Tensor, starts: torch.Tensor, row_chunks: torch.Tensor,
                block_offsets: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Returns x [B, K] @ W^T as [B, R] for a code-form W: where the kernels run, decode + matmul in
    one kernel up to KERNEL_MAX_TOKENS tokens (in chunks of it up to CODE_CHUNKED_MAX_TOKENS), else
    decode once with the decode kernel and one dense matmul; elsewhere the PyTorch reference."""
    parts = (words, starts, row_chunks, block_offsets, lo, hi, table)
    b = x.shape[0]
    if not use_kernels(x):
        return code_linear_reference(x, *parts)
    if b <= KERNEL_MAX_TOKENS:
        return code_linear_triton(x, *parts)
    if b <= CODE_CHUNKED_MAX_TOKENS:
        return torch.cat([code_linear_triton(x[i:i + KERNEL_MAX_TOKENS], *parts)
                          for i in range(0, b, KERNEL_MAX_TOKENS)])
    if x.dtype not in DECODE_DTYPES:
        return code_linear_reference(x, *parts)
    return F.linear(x, code_weight_triton(*parts, x.shape[-1], x.dtype))


# ---- per-slot (decode) -------------------------------------------------------------------------

def int_slot_linear(x: torch.Tensor, ids: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor, bits: int, top_k: int = 1, weights: torch.Tensor | None = None,
                    swiglu: bool = False) -> torch.Tensor:
    """Returns the per-slot matmul (module docstring) of stacked int-form matrices qweight
    [E, R, Wk], scale / zero [E, R, P]: one kernel launch where usable, else the reference."""
    if not use_kernels(x) or groups_split_words(bits, scale.shape[-1], x.shape[-1]):
        return int_slot_linear_reference(x, ids, qweight, scale, zero, bits, top_k, weights, swiglu)
    return int_slot_linear_triton(x, ids, qweight, scale, zero, bits, top_k, weights, swiglu)


def code_slot_linear(x: torch.Tensor, ids: torch.Tensor, words: torch.Tensor, starts: torch.Tensor,
                     row_chunks: torch.Tensor, block_offsets: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                     table: torch.Tensor, top_k: int = 1, weights: torch.Tensor | None = None,
                     swiglu: bool = False) -> torch.Tensor:
    """Returns the per-slot matmul (module docstring) of stacked code-form matrices words
    [E, T, W], starts [E, T], row_chunks [E, R], block_offsets [E, NB], lo / hi [E, R] and the
    layer's table: one kernel launch where usable, else the reference."""
    parts = (words, starts, row_chunks, block_offsets, lo, hi, table)
    if not use_kernels(x):
        return code_slot_linear_reference(x, ids, *parts, top_k, weights, swiglu)
    return code_slot_linear_triton(x, ids, *parts, top_k, weights, swiglu)


def int_slot_down(h: torch.Tensor, ids: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                  zero: torch.Tensor, bits: int, top_k: int, weights: torch.Tensor) -> torch.Tensor:
    """Returns the down matmul with each token's top-k sum (module docstring), [N, R], of stacked
    int-form matrices: one kernel launch where usable, else the reference."""
    if not use_kernels(h) or groups_split_words(bits, scale.shape[-1], h.shape[-1]):
        return int_slot_down_reference(h, ids, qweight, scale, zero, bits, top_k, weights)
    return int_slot_down_triton(h, ids, qweight, scale, zero, bits, top_k, weights)


def code_slot_down(h: torch.Tensor, ids: torch.Tensor, words: torch.Tensor, starts: torch.Tensor,
                   row_chunks: torch.Tensor, block_offsets: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   table: torch.Tensor, top_k: int, weights: torch.Tensor) -> torch.Tensor:
    """Returns the down matmul with each token's top-k sum (module docstring), [N, R], of stacked
    code-form matrices: one kernel launch where usable, else the reference."""
    parts = (words, starts, row_chunks, block_offsets, lo, hi, table)
    if not use_kernels(h):
        return code_slot_down_reference(h, ids, *parts, top_k, weights)
    return code_slot_down_triton(h, ids, *parts, top_k, weights)
