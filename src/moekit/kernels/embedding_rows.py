"""Gathering embedding rows from a table the device reads in place (page-locked host memory).

Tensors (T = tokens, V = vocab, D = hidden):
    ids    [T]      int64 token ids (on the device)
    table  [V, D]   the embedding table at base_ptr + table_offset elements: through unified
                    addressing, page-locked host memory read over PCIe (offload.embedding)
    out    [T, D]   out[t] = table[ids[t]]

Program (t, db) copies columns db*BLOCK_D.. of row ids[t]: a lookup reads D elements per token,
so keeping a 50k x 2048 table in host memory costs ~4 KB of PCIe reads per token.
"""

import triton
import triton.language as tl


@triton.jit
def embedding_rows_kernel(ids_ptr, base_ptr, table_offset, out_ptr, D, stride_v, stride_ot, BLOCK_D: tl.constexpr):
    """out[t, d] = table[ids[t], d], table at base_ptr + table_offset (elements)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    row = tl.load(ids_ptr + t)
    src = base_ptr + table_offset + row * stride_v + cols
    tl.store(out_ptr + t * stride_ot + cols, tl.load(src, mask=mask), mask=mask)
