"""Grouped-query decode attention on the CPU over a host-resident paged KV cache, in one native
call (attention.cpp), and its PyTorch reference.

    out = decode_attention(q, keys, values, block_tables, context_lens, window, sinks=sinks)

is what moekit.paged_attention.decode_attention computes -- one query token per sequence over its
cached positions, sequences of different lengths in one call -- for KV pools in host memory
(and, with `sinks` [H], what moekit.sinks computes: one more logit per head in each softmax's
denominator, gpt-oss's attention sinks):
MoE-Lightning's CPU attention (the KV cache stays next to the CPU; only q and the attention
output cross PCIe). Work items are (sequence, kv head), spread over threads; each reads its K and
V rows once for all of its query heads, in float32, with an online softmax. Its time is the KV
bytes over host memory bandwidth (`kv_bytes` says how many a call reads).

Shapes: B sequences, H query heads, Hkv kv heads, Dh head dim, NB pool blocks, BS positions per
block, MB blocks per table.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F

from . import library, register_declarations

DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
MAX_GROUP = 128  # query heads per kv head (attention.cpp; MLA runs all heads over one latent)
MAX_HEAD_DIM = 1024  # MLA: latent + rope key, 576 for DeepSeek


def _declare(lib: ctypes.CDLL) -> None:
    i64, vp, i32p = ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32)
    lib.moekit_decode_attention.argtypes = [ctypes.c_int, ctypes.c_int, vp, vp, vp, vp, i32p, i32p, i64, i64, i64,
                                            i64, i64, i64, i64, ctypes.c_float, vp, ctypes.c_int, ctypes.c_int]
    lib.moekit_decode_attention.restype = ctypes.c_int
    lib.moekit_decode_attention_items.argtypes = [i64, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.moekit_decode_attention_items.restype = ctypes.c_int
    lib.moekit_store_and_attend.argtypes = [*lib.moekit_decode_attention.argtypes, vp, vp,
                                            ctypes.POINTER(ctypes.c_int64), i64, ctypes.POINTER(ctypes.c_double)]
    lib.moekit_store_and_attend.restype = ctypes.c_int


register_declarations(_declare)


# How the kernel spreads work over threads (attention.cpp's run): by (sequence, kv head), or by
# sequence, reading each position's whole row (every kv head) from the pool, contiguous; "auto"
# takes the second from 4 sequences a thread on. Memory order only: the results are bit-identical.
ITEMS = {"auto": 0, "head": 1, "sequence": 2}
ITEMS_ENV = "MOEKIT_CPU_ATTENTION_ITEMS"
# Each thread asks for the first rows of the item it takes next (by sequence: the next sequence; by
# head: the next (sequence, kv head)) while it computes the current one (attention.cpp's Ahead);
# MOEKIT_ATTENTION_PREFETCH=0, read once a process, turns that off to measure it (same bits either way).


def items_code(items: str | None = None) -> int:
    """Returns the kernel's code of `items` (None: $MOEKIT_CPU_ATTENTION_ITEMS, default auto);
    raises ValueError naming the choices for anything else."""
    name = items if items is not None else (os.environ.get(ITEMS_ENV) or "auto")
    if name not in ITEMS:
        where = "items" if items is not None else ITEMS_ENV
        raise ValueError(f"{where}={name!r}: the CPU attention kernel's work items are one of {', '.join(ITEMS)}")
    return ITEMS[name]


def chosen_items(batch: int, kv_heads: int, head_dim: int, threads: int, items: str | None = None) -> str:
    """Returns the work items ("head" or "sequence") the kernel takes for a call of `batch`
    sequences over pools of `kv_heads` x `head_dim` on `threads` threads with `items` asked for
    (by sequence only where the head dim is whole vectors)."""
    code = library().moekit_decode_attention_items(batch, kv_heads, head_dim, threads, items_code(items))
    return "sequence" if code == 2 else "head"


def usable(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Returns whether decode_attention takes q [B, H, Dh] over pools like `keys` on this machine."""
    return (q.device.type == "cpu" and keys.device.type == "cpu" and q.dtype in DTYPE_CODES
            and keys.dtype in DTYPE_CODES and q.shape[1] % keys.shape[2] == 0
            and q.shape[1] // keys.shape[2] <= MAX_GROUP and q.shape[2] <= MAX_HEAD_DIM and library() is not None)


def kv_bytes(keys: torch.Tensor, context_lens: torch.Tensor, window: int | None = None) -> int:
    """Returns the bytes of K and V one decode_attention call reads (every kv head of the
    positions each sequence attends to)."""
    lens = context_lens.long().clamp(max=window) if window else context_lens.long()
    return int(lens.sum()) * 2 * keys.shape[2] * keys.shape[3] * keys.element_size()


def sink_logits(sinks: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """Returns sinks [H] as the kernel takes them (contiguous float32 on the CPU), or None;
    raises ValueError for a tensor that is not one logit per query head."""
    if sinks is None:
        return None
    if sinks.shape != (heads,):
        raise ValueError(f"sinks must hold one logit per query head, [{heads}]; got {list(sinks.shape)}")
    return sinks.detach().to("cpu", torch.float32).contiguous()


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, window: int | None = None, scale: float | None = None,
                     out: torch.Tensor | None = None, threads: int | None = None,
                     sinks: torch.Tensor | None = None, items: str | None = None) -> torch.Tensor:
    """Returns attention [B, H, Dh] (q's dtype) of one query per sequence q [B, H, Dh] over
    positions max(0, ctx - window)..ctx-1 of its cached keys and values.

    keys, values [NB, BS, Hkv, Dh]: contiguous CPU pools of one dtype (bf16, fp16, fp32);
    block_tables [B, MB] int32 blocks of each sequence; context_lens [B] int32 positions each
    sequence attends to (0 gives zeros); scale defaults to Dh ** -0.5; sinks [H] (None: none) one
    logit per query head added to its softmax's denominator (unscaled, as gpt-oss's); items: the
    work items (ITEMS; None: $MOEKIT_CPU_ATTENTION_ITEMS or auto), which change no result. Raises
    ValueError for arguments the kernel cannot take (check `usable` first)."""
    lib = library()
    if lib is None:
        from . import unavailable_reason

        raise ValueError(f"the CPU attention kernel is unavailable: {unavailable_reason()}")
    b, h, dh = q.shape
    nb, bs, hkv, dk = keys.shape
    if values.shape != keys.shape or values.dtype != keys.dtype:
        raise ValueError(f"keys and values must be pools of one shape and dtype; got {list(keys.shape)} "
                         f"{keys.dtype} and {list(values.shape)} {values.dtype}")
    if dk != dh or h % hkv or h // hkv > MAX_GROUP or dh > MAX_HEAD_DIM:
        raise ValueError(f"q [B, H, Dh] = {list(q.shape)} does not fit pools [NB, BS, Hkv, Dh] = {list(keys.shape)}: "
                         f"H must be a multiple of Hkv (at most {MAX_GROUP}x), Dh equal and at most {MAX_HEAD_DIM}")
    if q.dtype not in DTYPE_CODES or keys.dtype not in DTYPE_CODES:
        raise ValueError(f"the CPU attention kernel takes bf16/fp16/fp32; got q {q.dtype}, kv {keys.dtype}")
    if any(t.device.type != "cpu" for t in (q, keys, values, block_tables, context_lens)):
        raise ValueError("the CPU attention kernel takes CPU tensors only")
    if not keys.is_contiguous() or not values.is_contiguous():
        raise ValueError("keys and values must be contiguous pools")
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    if tables.shape[0] != b or lens.shape != (b,):
        raise ValueError(f"block_tables [B, MB] and context_lens [B] must have B = {b} rows; got "
                         f"{list(block_tables.shape)} and {list(context_lens.shape)}")
    mb = tables.shape[1]
    if b and (int(lens.min()) < 0 or int(lens.max()) > mb * bs):
        raise ValueError(f"a context length is outside 0..{mb * bs} (the block tables' {mb} blocks of {bs})")
    if b and mb and (int(tables.min()) < 0 or int(tables.max()) >= nb):
        raise ValueError(f"a block table names a block outside the pool's {nb}")
    q = q.contiguous()
    out = torch.empty_like(q) if out is None else out
    if not out.is_contiguous() or out.shape != q.shape or out.dtype != q.dtype:
        raise ValueError(f"out must be a contiguous {list(q.shape)} {q.dtype} tensor")
    threads = threads or torch.get_num_threads()
    sinks = sink_logits(sinks, h)
    code_items = items_code(items)
    code = lib.moekit_decode_attention(
        DTYPE_CODES[q.dtype], DTYPE_CODES[keys.dtype], q.data_ptr(), out.data_ptr(), keys.data_ptr(),
        values.data_ptr(), ctypes.cast(tables.data_ptr(), ctypes.POINTER(ctypes.c_int32)),
        ctypes.cast(lens.data_ptr(), ctypes.POINTER(ctypes.c_int32)), b, h, hkv, dh, bs, mb, window or 0,
        dh ** -0.5 if scale is None else scale, None if sinks is None else sinks.data_ptr(), threads, code_items)
    if code != 0:
        raise ValueError(f"the CPU attention kernel refused its arguments (code {code}: see attention.cpp)")
    return out


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, block_tables: torch.Tensor,
              context_lens: torch.Tensor, window: int | None = None, scale: float | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Returns what decode_attention computes, in PyTorch with float32 arithmetic, as [B, H, Dh]
    float32: each sequence's positions gathered through its block table, one softmax per head
    (with sinks [H]: over the scores and the head's sink logit, the sink's weight then dropped)."""
    b, h, dh = q.shape
    bs, hkv = keys.shape[1], keys.shape[2]
    out = torch.zeros(b, h, dh, dtype=torch.float32)
    for i in range(b):
        ctx = int(context_lens[i])
        lo = max(0, ctx - window) if window else 0
        if ctx == lo:
            continue
        blocks = block_tables[i, : -(-ctx // bs)].long()
        k = keys[blocks].reshape(-1, hkv, dh)[lo:ctx].float().transpose(0, 1)  # [Hkv, S, Dh]
        v = values[blocks].reshape(-1, hkv, dh)[lo:ctx].float().transpose(0, 1)
        k, v = k.repeat_interleave(h // hkv, 0), v.repeat_interleave(h // hkv, 0)  # [H, S, Dh]
        scores = torch.einsum("hd,hsd->hs", q[i].float(), k) * (dh ** -0.5 if scale is None else scale)  # [H, S]
        if sinks is not None:
            probs = F.softmax(torch.cat((scores, sinks.float().view(h, 1)), dim=-1), dim=-1)[:, :-1]
        else:
            probs = F.softmax(scores, dim=-1)
        out[i] = torch.einsum("hs,hsd->hd", probs, v)
    return out
