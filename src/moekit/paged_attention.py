"""Attention over a paged KV cache for ragged batches: packed prefill and decode, each a Triton
kernel on GPUs (moekit.kernels.paged_attention) with a PyTorch reference that tests hold it to.

The packed prefill kernel serves a whole step (prefill chunks and decode rows) in one launch per
layer: no Python loop over sequences, and no SDPA call per sequence. On Hopper PyTorch prefers
cuDNN attention, which builds an execution plan for every new (query length, key length) it meets
-- a ragged step brings new ones nearly every step, and each build cost the H200 run 100-250 ms
(benchmarks/results/bench_serve.json, ITL p99). The PyTorch path asks SDPA for the backends that
need no plan.

Shapes: N = packed new tokens, B = sequences, H = query heads, Hkv = key/value heads,
Dh = head dim, NB = cache blocks, BS = positions per block, MB = blocks per table, S = positions.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import MoekitError
from .kv_cache import QUERY_TILE, RaggedBatch

try:
    import triton

    from .kernels.paged_attention import (
        paged_decode_kernel,
        paged_decode_reduce_kernel,
        paged_decode_split_kernel,
        paged_prefill_kernel,
    )
    HAVE_TRITON = True
except ImportError:  # CPU machines without triton use the PyTorch path
    HAVE_TRITON = False


def causal_mask(t: int, s: int, start: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Returns a boolean [T, S] mask (True = may attend) for T queries at start.. over S keys, or
    None when plain causal attention (or none, for one query over the whole prefix) will do."""
    if window is None and (t == 1 or s == t):
        return None
    query_pos = start + torch.arange(t, device=device)[:, None]  # [T, 1]
    key_pos = torch.arange(s, device=device)[None, :]  # [1, S]
    mask = key_pos <= query_pos
    if window is not None:
        mask = mask & (key_pos > query_pos - window)
    return mask


def gather_sequence(pool: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """Returns positions 0..length-1 of one sequence as [Hkv, S, Dh] from pool [NB, BS, Hkv, Dh]
    and its block table [MB]."""
    block_size = pool.shape[1]
    blocks = pool[table[: -(-length // block_size)].long()]  # [nb, BS, Hkv, Dh]
    return blocks.reshape(-1, *pool.shape[2:])[:length].transpose(0, 1)


# SDPA backends that need no per-shape plan (cuDNN attention builds one per new shape)
_PLANLESS_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: RaggedBatch,
                      window: int | None) -> torch.Tensor:
    """Returns attention [N, H, Dh] of packed queries q [N, H, Dh] over each sequence's cached
    positions (this step's keys already written), causal within the sequence: the packed Triton
    kernel on CUDA, else prefill_attention_reference."""
    if HAVE_TRITON and (q.is_cuda or batch.padded) and batch.query_tiles is not None:
        return prefill_attention_triton(q, keys, values, batch.block_tables, batch.query_tiles, window)
    if batch.padded:
        raise MoekitError("a padded (static-shape) ragged step needs the Triton prefill kernel: CUDA, or "
                          "TRITON_INTERPRET=1 on the CPU")
    with sdpa_kernel(_PLANLESS_BACKENDS):
        return prefill_attention_reference(q, keys, values, batch, window)


def prefill_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: RaggedBatch,
                                window: int | None) -> torch.Tensor:
    """Returns what prefill_attention does, in PyTorch: sequences bringing one token (decoding
    beside others' prefill chunks) attend together in one decode_attention call; each longer one
    attends on its own (one SDPA call per sequence)."""
    gqa = keys.shape[2] != q.shape[1]
    out = torch.empty_like(q)
    ends = list(itertools.accumulate(batch.query_lens))
    singles = [i for i, n in enumerate(batch.query_lens) if n == 1]
    if len(singles) > 1:
        rows = torch.tensor(singles).to(q.device, non_blocking=True)
        tokens = torch.tensor([ends[i] - 1 for i in singles]).to(q.device, non_blocking=True)
        out[tokens] = decode_attention(q[tokens], keys, values, batch.block_tables[rows], batch.context_lens[rows],
                                       window)
    for i, (start, n) in enumerate(zip(batch.starts, batch.query_lens)):
        if n == 1 and len(singles) > 1:
            continue
        length, offset = start + n, ends[i] - n
        k = gather_sequence(keys, batch.block_tables[i], length)[None]  # [1, Hkv, S, Dh]
        v = gather_sequence(values, batch.block_tables[i], length)[None]
        qi = q[offset:offset + n].transpose(0, 1)[None]  # [1, H, n, Dh]
        mask = causal_mask(n, length, start, window, q.device)
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, is_causal=mask is None and n > 1,
                                           enable_gqa=gqa)
        out[offset:offset + n] = o[0].transpose(0, 1)
    return out


def prefill_attention_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                             block_tables: torch.Tensor, query_tiles: torch.Tensor,
                             window: int | None) -> torch.Tensor:
    """Returns what prefill_attention_reference does, computed by the packed Triton kernel in one
    launch (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); query_tiles [T, 4] as
    RaggedBatch.query_tiles holds them (tiles of at most QUERY_TILE queries)."""
    _, h, dh = q.shape
    hkv, block_size = keys.shape[2], keys.shape[1]
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.zeros_like(q)  # tokens in no tile (a static step's padding) attend to nothing: 0
    launch = prefill_launch(q.dtype, dh, block_size, interpreted=not q.is_cuda)
    paged_prefill_kernel[(query_tiles.shape[0], h)](
        q, keys, values, block_tables, query_tiles, out,
        dh ** -0.5, window or 0,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=h // hkv, SLIDING=window is not None, **launch,
    )
    return out


def prefill_launch(dtype: torch.dtype, head_dim: int, block_size: int, interpreted: bool = False) -> dict:
    """Returns the packed prefill kernel's constexprs and warps: fixed per model shape (never
    from a step's sizes), so the kernel compiles once however ragged the steps are."""
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs >= 16 on each side
    return {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_SIZE": block_size, "BLOCK_M": QUERY_TILE,
            "BLOCK_N": 64 if block_d <= 128 else 32,  # [M, Dh] + [N, Dh] tiles within registers
            "DOT_PRECISION": "ieee" if dtype == torch.float32 or interpreted else "tf32",
            "UPCAST": interpreted,
            "num_warps": 4 if block_d <= 64 else 8}


def decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               window: int | None) -> torch.Tensor:
    """Returns attention [B, H, Dh] of one query per sequence q [B, H, Dh] over its cached
    positions: every table gathered whole, positions past context_lens (or out of the window) masked."""
    b, mb = block_tables.shape
    block_size = keys.shape[1]
    k = keys[block_tables.long()].reshape(b, mb * block_size, *keys.shape[2:]).transpose(1, 2)  # [B, Hkv, S, Dh]
    v = values[block_tables.long()].reshape(b, mb * block_size, *values.shape[2:]).transpose(1, 2)
    key_pos = torch.arange(mb * block_size, device=q.device)[None, :]  # [1, S]
    ctx = context_lens.long()[:, None]  # [B, 1]
    mask = key_pos < ctx
    if window is not None:
        mask = mask & (key_pos >= ctx - window)
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None, :],
                                         enable_gqa=k.shape[1] != q.shape[1])  # [B, H, 1, Dh]
    return out[:, :, 0]


MAX_DECODE_SPLITS = 16  # runs of positions a sequence's decode attention is cut into at most


def decode_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Returns the runs of positions each (sequence, kv head) of a decode step is cut into: enough
    programs for two per streaming multiprocessor, at most MAX_DECODE_SPLITS; 1 (the one-pass
    kernel) once batch x kv heads fills them, and off CUDA. Depends on the batch only (not the
    contexts), so a captured step keeps its launch. MOEKIT_DECODE_SPLITS=N fixes it (1: off)."""
    if _FIXED_SPLITS is not None:
        return _FIXED_SPLITS
    if device.type != "cuda":
        return 1
    return max(1, min(MAX_DECODE_SPLITS, 2 * _multiprocessors(device) // (batch * kv_heads)))


def _fixed_splits() -> int | None:
    import os

    value = os.environ.get("MOEKIT_DECODE_SPLITS")
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= MAX_DECODE_SPLITS:
        raise MoekitError(f"MOEKIT_DECODE_SPLITS must be 1..{MAX_DECODE_SPLITS}, got {value!r}")
    return int(value)


_FIXED_SPLITS = _fixed_splits()  # read once: decode_splits runs per layer per step


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_launch(dtype: torch.dtype, head_dim: int, group: int, block_size: int,
                  interpreted: bool = False) -> dict:
    """Returns the decode kernels' constexprs, warps and pipeline stages for a model shape (never
    from a step's sizes): the G query heads of a kv head padded to BLOCK_G >= 16 and the head dim
    to BLOCK_D >= 16 (tl.dot's smallest M and K on NVIDIA), 64 positions an iteration (32 from
    head dim 256 on, so the K and V tiles stay <= 32 KB each in bf16)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if block_d <= 128 else 32
    tile_bytes = 2 * block_n * block_d * dtype.itemsize  # one stage's K and V tiles in shared memory
    return {"GROUP": group, "BLOCK_G": max(16, triton.next_power_of_2(group)), "HEAD_DIM": head_dim,
            "BLOCK_D": block_d, "BLOCK_SIZE": block_size, "BLOCK_N": block_n,
            "DOT_PRECISION": "ieee" if dtype == torch.float32 or interpreted else "tf32",
            "UPCAST": interpreted,
            "num_warps": 4 if block_d <= 128 else 8,
            "num_stages": 3 if tile_bytes <= 32 * 1024 else 2}


def decode_attention_triton(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor,
                            window: int | None, splits: int | None = None) -> torch.Tensor:
    """Returns what decode_attention_reference does, computed by the Triton kernel (CUDA tensors,
    or CPU tensors under TRITON_INTERPRET=1); with `splits` > 1 (default: decode_splits) each
    sequence's positions are cut into that many runs attended side by side, then reduced."""
    b, h, dh = q.shape
    hkv = keys.shape[2]
    q = q.contiguous()
    out = torch.empty_like(q)
    launch = decode_launch(q.dtype, dh, h // hkv, keys.shape[1], interpreted=not q.is_cuda)
    splits = decode_splits(b, hkv, q.device) if splits is None else splits
    if splits > 1:
        part = torch.empty(b, h, splits, dh, dtype=torch.float32, device=q.device)  # [B, H, S, Dh]
        m = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)  # [B, H, S]
        lsum = torch.empty_like(m)
        paged_decode_split_kernel[(b, hkv, splits)](
            q, keys, values, block_tables, context_lens, part, m, lsum,
            dh ** -0.5, window or 0,
            q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), block_tables.stride(0), h,
            SPLITS=splits, SLIDING=window is not None, **launch,
        )
        paged_decode_reduce_kernel[(b, h)](
            part, m, lsum, out, out.stride(0), out.stride(1), h,
            SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=dh, BLOCK_D=launch["BLOCK_D"],
            num_warps=4,
        )
        return out
    paged_decode_kernel[(b, hkv)](
        q, keys, values, block_tables, context_lens, out,
        dh ** -0.5, window or 0,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        SLIDING=window is not None, **launch,
    )
    return out


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, window: int | None) -> torch.Tensor:
    """Returns decode attention [B, H, Dh]: the Triton kernel on CUDA, else the PyTorch reference."""
    if HAVE_TRITON and q.is_cuda:
        return decode_attention_triton(q, keys, values, block_tables, context_lens, window)
    return decode_attention_reference(q, keys, values, block_tables, context_lens, window)
