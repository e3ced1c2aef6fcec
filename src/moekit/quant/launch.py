"""Triton launches of the compressed-form kernels (quant.kernels) and their launch configs.

The wrappers behind quant.ops' dispatch: each `*_triton` checks its tensors' layout, picks a launch
config (tuned per shape on an H200, else a per-batch default) and launches one kernel. Shapes and
the stored tensors are the ones quant.ops' docstring names (int form: qweight [R, Wk], scale /
zero [R, P]; code form: words [T, W], starts [T], row_chunks [R], block_offsets [NB], lo, hi [R],
table [2^bits, 2]; per-slot: stacked [E, ...]). Importable without triton (HAVE_TRITON False):
the configs still answer, the launches cannot run.
"""

from __future__ import annotations

import os

import torch

from ..errors import MoekitError
from .code import ROW_BLOCK

try:
    import triton

    from .kernels.code_decode import code_decode_kernel
    from .kernels.code_matmul import (
        code_matmul_kernel,
        code_slot_down_kernel,
        code_slot_kernel,
    )
    from .kernels.int_decode import int_decode_kernel
    from .kernels.int_matmul import (
        int_matmul_kernel,
        int_slot_down_kernel,
        int_slot_kernel,
    )
    HAVE_TRITON = True
except ImportError:  # CPU machines without triton use the references
    HAVE_TRITON = False

# ---- decode configs; int-N decode ----------------------------------------------------------------

# (BLOCK_R rows, codewords per row per step, num_warps) of the decode kernel; not tuned: 4 rows of
# 128 codewords are 512 lanes, 4 per thread of 4 warps, and 14336 rows make 3584 programs.
CODE_DECODE_CONFIG = (4, 128, 4)
# (BLOCK_N rows, BLOCK_KW words per row, num_warps) of the int decode kernel; not tuned: 8 x 64
# words are 4096 4-bit weights (16 KB of bf16 written) per program.
INT_DECODE_CONFIG = (8, 64, 4)
DECODE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what the decode kernels write


def int_weight_triton(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, cols: int,
                      dtype: torch.dtype = torch.float32,
                      config: tuple[int, int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the dense weight [..., R, cols] in dtype (DECODE_DTYPES) of int-form matrices
    through the decode kernel; `config` (BLOCK_N, BLOCK_KW, num_warps) overrides INT_DECODE_CONFIG;
    `out` (contiguous [..., R, cols] in dtype) receives it instead of a new tensor."""
    if dtype not in DECODE_DTYPES:
        raise ValueError(f"the decode kernel writes {DECODE_DTYPES}, not {dtype}; use int_weight_reference")
    *lead, r, num_words = qweight.shape
    groups = scale.shape[-1]
    q = qweight.reshape(-1, num_words)  # the stack's rows one after another: each row is independent
    scale, zero = scale.reshape(-1, groups), zero.reshape(-1, groups)
    _check_unit_stride(q, scale, zero)
    if out is None:
        out = torch.empty(q.shape[0], cols, dtype=dtype, device=qweight.device)  # every weight is written
    else:
        _check_out(out, (*lead, r, cols), dtype)
        out = out.view(q.shape[0], cols)
    if out.numel() == 0:
        return out.view(*lead, r, cols)
    bn, block_kw, warps = config or INT_DECODE_CONFIG
    int_decode_kernel[(triton.cdiv(q.shape[0], bn), triton.cdiv(num_words, block_kw))](
        q, scale, zero, out, q.shape[0], cols, -(-cols // groups),
        q.stride(0), scale.stride(0), zero.stride(0), out.stride(0),
        NUM_WORDS=num_words, BITS=bits, LANES=triton.next_power_of_2(32 // bits), BLOCK_N=bn, BLOCK_KW=block_kw,
        num_warps=warps)
    return out.view(*lead, r, cols)


# ---- launch configs ------------------------------------------------------------------------------

# Launch configs, keyed by (bits, R, K, batch bucket) / (R, K, batch bucket) and measured on an
# H200 by benchmarks/tune_quant_kernels.py; shapes not listed use the defaults. Batch buckets:
# 1 (decode), 8 (2..8 tokens), 64 (9..64 tokens).
INT_DEFAULT = {  # bucket: (BLOCK_N rows, BLOCK_K code lanes per row, num_warps, use tl.dot)
    1: (4, 1024, 4, False),  # the per-slot bf16 kernel's shape: many programs, long K tiles
    8: (8, 512, 4, False),
    64: (64, 128, 4, True),
}
# measured on an H200 by benchmarks/tune_quant_kernels.py (benchmarks/results/tune_quant_kernels.json)
INT_TUNED: dict[tuple[int, int, int, int], tuple[int, int, int, bool]] = {
    (4, 14336, 4096, 1): (8, 512, 4, False),
    (4, 14336, 4096, 8): (16, 128, 4, True),
    (4, 14336, 4096, 64): (128, 64, 8, True),
    (4, 4096, 14336, 1): (8, 512, 4, False),
    (4, 4096, 14336, 8): (16, 128, 4, True),
    (4, 4096, 14336, 64): (32, 128, 4, True),
    (4, 768, 2048, 1): (2, 1024, 4, False),
    (4, 768, 2048, 8): (4, 1024, 4, False),
    (4, 768, 2048, 64): (16, 256, 4, True),
    (4, 2048, 768, 1): (2, 1024, 4, False),
    (4, 2048, 768, 8): (16, 128, 4, True),
    (4, 2048, 768, 64): (16, 256, 4, True),
}
CODE_DEFAULT = {  # bucket: (BLOCK_R rows, codewords per row per step, num_warps)
    1: (4, 32, 1),  # one-warp tiles of 128 words: one lane of four 8-bit codewords per thread
    8: (2, 64, 1),  # one-warp tiles won at batch 2-64 too (profile_code_kernel.py --batches)
    64: (2, 64, 1),
}
# benchmarks/tune_quant_kernels.py, H200, commit 59ce0f5 (tune_quant_kernels.json; 8-bit dictionaries,
# which compress picks for these RTN matrices: 0.635 / 0.515 bits per parameter; the 8 and 64
# buckets timed at batch 8 and 64; torch bf16 ~41 us at every batch on mixtral's shapes)
CODE_TUNED: dict[tuple[int, int, int], tuple[int, int, int]] = {
    (14336, 4096, 1): (2, 64, 1),  # 18.9 us, bf16 40.7 us (was 24.0 at e33b929)
    (14336, 4096, 8): (2, 64, 1),  # 68.2 us (was 93.9)
    (14336, 4096, 64): (4, 32, 1),  # 136.0 us (was 546.2)
    (4096, 14336, 1): (1, 128, 1),  # 16.8 us, bf16 42.1 us (was 25.2)
    (4096, 14336, 8): (1, 128, 1),  # 58.8 us (was 82.3)
    (4096, 14336, 64): (1, 128, 1),  # 113.5 us (was 409.2)
    (768, 2048, 1): (1, 256, 1),  # 6.6 us, bf16 9.8 us
    (768, 2048, 8): (1, 128, 1),  # 13.4 us
    (768, 2048, 64): (1, 128, 1),  # 16.0 us
    (2048, 768, 1): (2, 128, 2),  # 6.4 us, bf16 7.8 us
    (2048, 768, 8): (1, 128, 1),  # 12.7 us
    (2048, 768, 64): (2, 64, 1),  # 15.7 us
}


def batch_bucket(batch: int) -> int:
    """Returns the tuned-table bucket (1, 8 or 64) of a batch of `batch` tokens."""
    return 1 if batch <= 1 else 8 if batch <= 8 else 64


def int_config(bits: int, rows: int, cols: int, batch: int) -> tuple[int, int, int, bool]:
    """Returns (BLOCK_N, BLOCK_K, num_warps, use_dot) of the int kernel at this shape and batch."""
    bucket = batch_bucket(batch)
    return INT_TUNED.get((bits, rows, cols, bucket), INT_DEFAULT[bucket])


def code_config(rows: int, cols: int, batch: int) -> tuple[int, int, int]:
    """Returns (BLOCK_R, words per step, num_warps) of the code kernel at this shape and batch."""
    bucket = batch_bucket(batch)
    return CODE_TUNED.get((rows, cols, bucket), CODE_DEFAULT[bucket])


# Per-slot kernels, keyed by (bits, output rows, K) / (output rows, K) of one slot's matrix (gate_up:
# the I rows of one half, each program computing them for gate and up): measured by
# benchmarks/tune_quant_kernels.py --slots (H200, 2026-11-21, commit c314307: int-N per-word path,
# ternary code format 2;
# benchmarks/results/tune_quant_slots.json); shapes not listed use the batch-1 config above.
INT_SLOT_TUNED: dict[tuple[int, int, int], tuple[int, int, int, bool]] = {
    (4, 768, 2048): (4, 1024, 4, False),  # H200, 8 slots: 23.9 us (per-word scale path, c314307)
    (4, 2048, 768): (4, 1024, 4, False),  # 15.6 us
    (4, 14336, 4096): (4, 1024, 4, False),  # mixtral, 2 slots: 156.5 us
    (4, 4096, 14336): (4, 1024, 4, False),  # 92.3 us
}
CODE_SLOT_TUNED: dict[tuple[int, int], tuple[int, int, int]] = {  # H200, bbc352f (tune_quant_slots.json)
    (768, 2048): (2, 64, 1),  # 8 slots: 14.5 us (was 18.7)
    (2048, 768): (4, 32, 1),  # 9.9 us (was 14.1)
    (14336, 4096): (4, 32, 1),  # 2 slots: 57.6 us (was 71.6)
    (4096, 14336): (1, 128, 1),  # 28.0 us (was 37.3)
}


# The down kernels with the top-k sum (int_slot_down_kernel, code_slot_down_kernel): a program takes
# one token's A slots of a row block, A times the per-slot kernel's work in 1/A of its programs, so
# the per-slot down tiles above were measured for another kernel. Keyed as the tables above and
# measured by benchmarks/tune_quant_kernels.py --slots (which times the old per-slot down + torch
# sum beside them). A shape not listed (every shape, until an H200 run) takes its per-slot down tile
# with 1/A of its rows (at least one; the code kernel reads as many more codewords per row and step):
# about the work of a per-slot program in as many programs (e.g. Qwen3-30B-A3B's ternary down,
# A = 8: 2048 programs of one row, 128 codewords a step, not 512 of 4 rows x 8 slots).
INT_SLOT_DOWN_TUNED: dict[tuple[int, int, int], tuple[int, int, int, bool]] = {}
CODE_SLOT_DOWN_TUNED: dict[tuple[int, int], tuple[int, int, int]] = {}


def int_slot_config(bits: int, rows: int, cols: int) -> tuple[int, int, int, bool]:
    """Returns (BLOCK_N, BLOCK_K, num_warps, _) of the int per-slot kernel for `rows` output rows."""
    return INT_SLOT_TUNED.get((bits, rows, cols), int_config(bits, rows, cols, 1))


def code_slot_config(rows: int, cols: int) -> tuple[int, int, int]:
    """Returns (BLOCK_R, words per step, num_warps) of the code per-slot kernel for `rows` output rows."""
    return CODE_SLOT_TUNED.get((rows, cols), code_config(rows, cols, 1))


def _rows_per_slot(block: int, top_k: int) -> int:
    """Returns a power-of-two row block `block` cut by the power of two at or above top_k, at least 1."""
    return max(1, block // (1 << max(0, top_k - 1).bit_length()))


def int_slot_down_config(bits: int, rows: int, cols: int, top_k: int) -> tuple[int, int, int, bool]:
    """Returns (BLOCK_N, BLOCK_K, num_warps, _) of the int down kernel with the top-k sum (A = top_k)."""
    if (bits, rows, cols) in INT_SLOT_DOWN_TUNED:
        return INT_SLOT_DOWN_TUNED[(bits, rows, cols)]
    bn, bk, warps, use_dot = int_slot_config(bits, rows, cols)
    return _rows_per_slot(bn, top_k), bk, warps, use_dot


def code_slot_down_config(rows: int, cols: int, top_k: int) -> tuple[int, int, int]:
    """Returns (BLOCK_R, words per step, num_warps) of the code down kernel with the top-k sum (A = top_k)."""
    if (rows, cols) in CODE_SLOT_DOWN_TUNED:
        return CODE_SLOT_DOWN_TUNED[(rows, cols)]
    br, step_words, warps = code_slot_config(rows, cols)
    rows_per_slot = _rows_per_slot(br, top_k)
    return rows_per_slot, step_words * (br // rows_per_slot), warps  # the same codewords per step: lanes busy


# ---- int-N matmul --------------------------------------------------------------------------------

def int_scale_mode(groups: int, group_cols: int, per_word: int, tile_cols: int) -> int:
    """Returns how the int kernel fetches scale/zero (kernels.int_matmul SCALE_MODE)."""
    if groups == 1:
        return 0  # one per row
    if group_cols % tile_cols == 0:
        return 1  # each K tile lies inside one group
    if group_cols % per_word == 0:
        return 2  # groups are whole words
    return 3


def int_linear_triton(x, qweight, scale, zero, bits: int, block_n: int | None = None, block_k: int | None = None,
                      config: tuple[int, int, int, bool] | None = None) -> torch.Tensor:
    """Returns x [B, K] @ W^T as [B, R] through the int kernel; `config` (BLOCK_N, BLOCK_K,
    num_warps, use_dot) overrides the tuned one, block_n / block_k override single fields."""
    b, k = x.shape
    r = qweight.shape[0]
    groups = scale.shape[1]
    group_cols = -(-k // groups)
    bn, bk, warps, use_dot = config or int_config(bits, r, k, b)
    bn, bk = block_n or bn, block_k or bk
    per_word = 32 // bits
    lanes = triton.next_power_of_2(per_word)
    block_kw = max(1, bk // lanes)
    if use_dot:
        bn, block_kw = max(bn, 16), max(block_kw, triton.cdiv(16, lanes))  # tl.dot needs >= 16
        block_b = max(16, triton.next_power_of_2(b))
    else:
        block_b = triton.next_power_of_2(b)
    mode = int_scale_mode(groups, group_cols, per_word, block_kw * per_word)
    x = x.contiguous()
    _check_unit_stride(qweight, scale, zero)
    out = torch.empty(b, r, dtype=x.dtype, device=x.device)
    int_matmul_kernel[(triton.cdiv(r, bn),)](
        x, qweight, scale, zero, out, b, r, k, group_cols,
        x.stride(0), qweight.stride(0), scale.stride(0), zero.stride(0), out.stride(0),
        NUM_WORDS=qweight.shape[1], BITS=bits, LANES=lanes, SCALE_MODE=mode, BLOCK_B=block_b, BLOCK_N=bn, BLOCK_KW=block_kw,
        USE_DOT=use_dot, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps)
    return out


# ---- ternary code --------------------------------------------------------------------------------

# The code kernel's gather tile is [BLOCK_R, words per step, BLOCK_B]. At 16 x 64 x 64 (2 warps) it made
# an illegal memory access on the H200 (tests/quant/test_kernels.py, then tests/test_quant_kernels.py, commit 317f42c; fine under the
# interpreter; root cause not found): larger tiles are cut down to this many elements. Tuned configs fit
# at 32-codeword chunks; at batch 64 with 64-codeword chunks (mixtral down) 8 rows become 4.
CODE_MAX_TILE = 16384


def _cap_code_tile(block_r: int, chunks_per_step: int, wp: int, block_b: int) -> tuple[int, int]:
    """Returns (BLOCK_R, chunks per step) halved until the gather tile holds at most CODE_MAX_TILE elements."""
    while block_r > 1 and block_r * chunks_per_step * wp * block_b > CODE_MAX_TILE:
        block_r //= 2
    while chunks_per_step > 1 and block_r * chunks_per_step * wp * block_b > CODE_MAX_TILE:
        chunks_per_step //= 2
    return block_r, chunks_per_step


def _hw_popcount(x: torch.Tensor) -> bool:
    """Returns whether the code kernel may use the GPU's popcount instruction (not under the interpreter)."""
    return x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def _packed_words(words: torch.Tensor, *strides: int) -> bool:
    """Returns whether 8-bit codewords can be read four to an int32 (kernels.code_matmul PACKED):
    uint8, chunks of a multiple of 4 words, the base and every given stride (elements) 4-byte aligned."""
    return (words.dtype == torch.uint8 and words.shape[-1] % 4 == 0 and words.data_ptr() % 4 == 0
            and all(st % 4 == 0 for st in strides))


def code_linear_triton(x, words, starts, row_chunks, block_offsets, lo, hi, table, block_r: int | None = None,
                       config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Returns x [B, K] @ W^T as [B, R] through the code kernel; `config` (BLOCK_R, words per
    step, num_warps) overrides the tuned one, block_r overrides its rows."""
    b, k = x.shape
    r, w = row_chunks.shape[0], words.shape[-1]
    br, step_words, warps = config or code_config(r, k, b)
    br = block_r or br
    wp = triton.next_power_of_2(w)
    chunks_per_step = triton.next_power_of_2(max(1, step_words // wp))
    br, chunks_per_step = _cap_code_tile(br, chunks_per_step, wp, triton.next_power_of_2(b))
    xt = x.t().contiguous()  # [K, B]: a nonzero weight reads all tokens of its column at once
    _check_code_layout(words, starts, row_chunks, block_offsets, lo, hi)
    table64 = table.contiguous().view(torch.int64).reshape(-1)  # [2^bits] one 8-byte entry per word
    out = torch.empty(b, r, dtype=x.dtype, device=x.device)
    code_matmul_kernel[(triton.cdiv(r, br),)](
        xt, words, starts, row_chunks, block_offsets, lo, hi, table64, out, b, r, k,
        xt.stride(0), out.stride(0),
        W=w, WP=wp, CHUNKS_PER_STEP=chunks_per_step, ROW_BLOCK=ROW_BLOCK, BLOCK_B=triton.next_power_of_2(b),
        BLOCK_R=br, HW_POPC=_hw_popcount(x), PACKED=_packed_words(words), num_warps=warps)
    return out


def code_decode_triton(words, starts, row_chunks, block_offsets, table, cols: int,
                       config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Returns the ternary codes [..., R, cols] (uint8) of code-form matrices through the decode
    kernel: code.decode on the device, without host syncs."""
    return _code_decode(words, starts, row_chunks, block_offsets, None, None, table, cols, torch.uint8, config)


def code_weight_triton(words, starts, row_chunks, block_offsets, lo, hi, table, cols: int,
                       dtype: torch.dtype = torch.float32, config: tuple[int, int, int] | None = None,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """Returns the dense weight [..., R, cols] in dtype (DECODE_DTYPES) of code-form matrices
    through the decode kernel; `config` (BLOCK_R, words per step, num_warps) overrides CODE_DECODE_CONFIG;
    `out` (contiguous [..., R, cols] in dtype) receives it instead of a new tensor."""
    if dtype not in DECODE_DTYPES:
        raise ValueError(f"the decode kernel writes {DECODE_DTYPES}, not {dtype}; use code_weight_reference")
    return _code_decode(words, starts, row_chunks, block_offsets, lo, hi, table, cols, dtype, config, out)


def _check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raises ValueError unless `out` is a contiguous tensor of this shape and dtype."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {list(shape)} {dtype} tensor, got {list(out.shape)} "
                         f"{out.dtype} (contiguous: {out.is_contiguous()})")


def _code_decode(words, starts, row_chunks, block_offsets, lo, hi, table, cols: int, dtype: torch.dtype,
                 config: tuple[int, int, int] | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launches the decode kernel over every matrix of the leading dimensions: levels lo / hi
    [..., R] written in dtype, or (lo None) the codes in uint8, into `out` when given. Returns [..., R, cols]."""
    *lead, r = row_chunks.shape
    count = 1
    for n in lead:
        count *= n
    if out is None:
        out = torch.zeros(count, r, cols, dtype=dtype, device=words.device)  # the kernel writes only nonzeros
    else:
        _check_out(out, (*lead, r, cols), dtype)
        out = out.view(count, r, cols).zero_()
    if out.numel() == 0:
        return out.view(*lead, r, cols)
    levels = lo is not None
    _check_code_layout(words, starts, row_chunks, block_offsets, *((lo, hi) if levels else ()))
    words, starts = words.reshape(count, *words.shape[-2:]), starts.reshape(count, -1)
    row_chunks, block_offsets = row_chunks.reshape(count, r), block_offsets.reshape(count, -1)
    if levels:  # rounded to dtype here, as dequantize_ternary + .to(dtype) round them
        lo, hi = lo.reshape(count, r).to(dtype).contiguous(), hi.reshape(count, r).to(dtype).contiguous()
    else:
        lo, hi = row_chunks, row_chunks  # not read
    w = words.shape[-1]
    br, step_words, warps = config or CODE_DECODE_CONFIG
    wp = triton.next_power_of_2(w)
    chunks_per_step = triton.next_power_of_2(max(1, step_words // wp))
    table64 = table.contiguous().view(torch.int64).reshape(-1)  # [2^bits] one 8-byte entry per word
    code_decode_kernel[(triton.cdiv(r, br), count)](
        words, starts, row_chunks, block_offsets, lo, hi, table64, out, r, cols,
        words.stride(0), starts.stride(0), row_chunks.stride(0), block_offsets.stride(0), lo.stride(0),
        hi.stride(0), out.stride(0), out.stride(1),
        W=w, WP=wp, CHUNKS_PER_STEP=chunks_per_step, ROW_BLOCK=ROW_BLOCK, BLOCK_R=br, LEVELS=levels,
        HW_POPC=_hw_popcount(words), num_warps=warps)
    return out.view(*lead, r, cols)


# ---- layout checks -------------------------------------------------------------------------------

def _check_unit_stride(*tensors: torch.Tensor) -> None:
    """Raises ValueError unless every tensor's last dimension is contiguous (the kernels assume it)."""
    for t in tensors:
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"quant kernels need a contiguous last dimension, got a tensor of shape "
                             f"{list(t.shape)} with strides {t.stride()}")


def _check_code_layout(words: torch.Tensor, *others: torch.Tensor) -> None:
    """Raises ValueError unless the code tensors are contiguous within each matrix (the kernels
    address chunk c's words at c * W)."""
    _check_unit_stride(words, *others)
    if words.stride(-2) != words.shape[-1]:
        raise ValueError(f"the code kernels need each matrix's codewords contiguous, got shape "
                         f"{list(words.shape)} with strides {words.stride()}")


# ---- per-slot (decode) ---------------------------------------------------------------------------

def int_slot_linear_triton(x, ids, qweight, scale, zero, bits: int, top_k: int = 1, weights=None,
                           swiglu: bool = False, config: tuple[int, int, int, bool] | None = None) -> torch.Tensor:
    """Returns the per-slot matmul through the int kernel; `config` (BLOCK_N, BLOCK_K, num_warps, _)
    overrides int_slot_config (output rows: one half, gate or up, of a gate_up matrix)."""
    slots, k = ids.numel(), x.shape[1]
    rows = qweight.shape[1] // 2 if swiglu else qweight.shape[1]  # output rows
    groups = scale.shape[2]
    group_cols = -(-k // groups)
    bn, bk, warps, _ = config or int_slot_config(bits, rows, k)
    per_word = 32 // bits
    lanes = triton.next_power_of_2(per_word)
    block_kw = max(1, bk // lanes)
    mode = int_scale_mode(groups, group_cols, per_word, block_kw * per_word)
    x = x.contiguous()
    _check_unit_stride(qweight, scale, zero)
    ids = ids.contiguous()
    weights = None if weights is None else weights.contiguous()
    out = torch.empty(slots, rows, dtype=x.dtype, device=x.device)
    int_slot_kernel[(slots, triton.cdiv(rows, bn))](
        x, ids, ids if weights is None else weights, qweight, scale, zero, out, rows, k, group_cols,
        x.stride(0), qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1), zero.stride(0),
        zero.stride(1), out.stride(0),
        TOP_K=top_k, NUM_WORDS=qweight.shape[2], BITS=bits, LANES=lanes, SCALE_MODE=mode, BLOCK_N=bn,
        BLOCK_KW=block_kw, SWIGLU=swiglu, WEIGHTED=weights is not None, num_warps=warps)
    return out


def code_slot_linear_triton(x, ids, words, starts, row_chunks, block_offsets, lo, hi, table, top_k: int = 1,
                            weights=None, swiglu: bool = False,
                            config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Returns the per-slot matmul through the code kernel; `config` (BLOCK_R, words per step,
    num_warps) overrides code_slot_config (output rows: one half of a gate_up matrix)."""
    slots, k = ids.numel(), x.shape[1]
    r, w = row_chunks.shape[1], words.shape[-1]
    rows = r // 2 if swiglu else r
    br, step_words, warps = config or code_slot_config(rows, k)
    wp = triton.next_power_of_2(w)
    chunks_per_step = triton.next_power_of_2(max(1, step_words // wp))
    x = x.contiguous()
    _check_code_layout(words, starts, row_chunks, block_offsets, lo, hi)
    table64 = table.contiguous().view(torch.int64).reshape(-1)  # [2^bits] one 8-byte entry per word
    ids = ids.contiguous()
    weights = None if weights is None else weights.contiguous()
    out = torch.empty(slots, rows, dtype=x.dtype, device=x.device)
    code_slot_kernel[(slots, triton.cdiv(rows, br))](
        x, ids, ids if weights is None else weights, words, starts, row_chunks, block_offsets, lo, hi, table64, out,
        rows, k,
        x.stride(0), words.stride(0), starts.stride(0), row_chunks.stride(0), block_offsets.stride(0),
        lo.stride(0), hi.stride(0), out.stride(0),
        TOP_K=top_k, W=w, WP=wp, CHUNKS_PER_STEP=chunks_per_step, ROW_BLOCK=ROW_BLOCK, BLOCK_R=br, SWIGLU=swiglu,
        WEIGHTED=weights is not None, HW_POPC=_hw_popcount(x), PACKED=_packed_words(words, words.stride(0)),
        num_warps=warps)
    return out


def _check_down_slots(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, top_k: int) -> int:
    """Returns N, the tokens of a down call with the top-k sum; raises MoekitError unless h [S, K],
    ids [S] and weights [S] agree and S is a multiple of top_k."""
    slots = ids.numel()
    if top_k < 1 or slots % top_k or h.shape[0] != slots or weights.numel() != slots:
        raise MoekitError(f"slot down with the top-k sum: h {list(h.shape)}, ids {list(ids.shape)} and weights "
                          f"{list(weights.shape)} must hold one row / value per slot, N * top_k ({top_k}) of them")
    return slots // top_k


def int_slot_down_triton(h, ids, qweight, scale, zero, bits: int, top_k: int, weights,
                         config: tuple[int, int, int, bool] | None = None) -> torch.Tensor:
    """Returns [N, R]: each token's sum over its top_k slots of weights[s] * h[s] @ W_{ids[s]}^T, by
    one launch of the int down kernel (float32 sum in slot order, rounded once to h's dtype);
    `config` (BLOCK_N, BLOCK_K, num_warps, _) overrides int_slot_down_config."""
    n = _check_down_slots(h, ids, weights, top_k)
    k, rows, groups = h.shape[1], qweight.shape[1], scale.shape[2]
    group_cols = -(-k // groups)
    bn, bk, warps, _ = config or int_slot_down_config(bits, rows, k, top_k)
    per_word = 32 // bits
    lanes = triton.next_power_of_2(per_word)
    block_kw = max(1, bk // lanes)
    h, ids, weights = h.contiguous(), ids.contiguous(), weights.contiguous()
    _check_unit_stride(qweight, scale, zero)
    out = torch.empty(n, rows, dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    int_slot_down_kernel[(n, triton.cdiv(rows, bn))](
        h, ids, weights, qweight, scale, zero, out, rows, k, group_cols,
        h.stride(0), qweight.stride(0), qweight.stride(1), scale.stride(0), scale.stride(1), zero.stride(0),
        zero.stride(1), out.stride(0),
        TOP_K=top_k, NUM_WORDS=qweight.shape[2], BITS=bits, LANES=lanes,
        SCALE_MODE=int_scale_mode(groups, group_cols, per_word, block_kw * per_word), BLOCK_N=bn, BLOCK_KW=block_kw,
        num_warps=warps)
    return out


def code_slot_down_triton(h, ids, words, starts, row_chunks, block_offsets, lo, hi, table, top_k: int, weights,
                          config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Returns [N, R]: each token's sum over its top_k slots of weights[s] * h[s] @ W_{ids[s]}^T, by
    one launch of the code down kernel (float32 sum in slot order, rounded once to h's dtype);
    `config` (BLOCK_R, words per step, num_warps) overrides code_slot_down_config."""
    n = _check_down_slots(h, ids, weights, top_k)
    k, rows, w = h.shape[1], row_chunks.shape[1], words.shape[-1]
    br, step_words, warps = config or code_slot_down_config(rows, k, top_k)
    wp = triton.next_power_of_2(w)
    chunks_per_step = triton.next_power_of_2(max(1, step_words // wp))
    h, ids, weights = h.contiguous(), ids.contiguous(), weights.contiguous()
    _check_code_layout(words, starts, row_chunks, block_offsets, lo, hi)
    table64 = table.contiguous().view(torch.int64).reshape(-1)  # [2^bits] one 8-byte entry per word
    out = torch.empty(n, rows, dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    code_slot_down_kernel[(n, triton.cdiv(rows, br))](
        h, ids, weights, words, starts, row_chunks, block_offsets, lo, hi, table64, out, rows, k,
        h.stride(0), words.stride(0), starts.stride(0), row_chunks.stride(0), block_offsets.stride(0),
        lo.stride(0), hi.stride(0), out.stride(0),
        TOP_K=top_k, W=w, WP=wp, CHUNKS_PER_STEP=chunks_per_step, ROW_BLOCK=ROW_BLOCK, BLOCK_R=br,
        HW_POPC=_hw_popcount(h), PACKED=_packed_words(words, words.stride(0)), num_warps=warps)
    return out
