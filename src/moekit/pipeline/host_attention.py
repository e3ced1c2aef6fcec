"""CGOPipe's CPU attention (moekit.pipeline.cgopipe's worker thread): decode attention of a
micro-batch's q over a layer's host-resident paged KV pools, by the native kernel where it takes
the arguments (its block tables and lengths converted and checked once a step: NativeAttention),
else moekit.paged_attention's PyTorch path. gpt-oss's layers add their sink logits [H] to each
head's softmax denominator (the kernel's `sinks`; moekit.sinks' PyTorch path otherwise) and
alternate a sliding window with full attention (each layer's window is passed per call).

Shapes: mu sequences of a micro-batch, H query heads, Hkv kv heads, Dh head dim, NB blocks of BS positions.
"""

from __future__ import annotations

import torch

from ..errors import MoekitError
from ..kv_cache import PagedKVCache, RaggedBatch


def cpu_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, batch: RaggedBatch,
                  window: int | None, out: torch.Tensor | None = None, threads: int | None = None,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Returns decode attention [mu, H, Dh] of q [mu, H, Dh] over the host pools (into `out`
    when given), with sink logits `sinks` [H] float32 (None: none): the native kernel (on
    `threads` threads, default torch's) where it takes them, else the PyTorch path (same results)."""
    from ..native import attention as native_attention
    from ..paged_attention import decode_attention

    if native_attention.usable(q, keys):
        return native_attention.decode_attention(q, keys, values, batch.block_tables, batch.context_lens, window,
                                                 out=out, threads=threads, sinks=sinks)
    if sinks is None:
        result = decode_attention(q, keys, values, batch.block_tables, batch.context_lens, window)
    else:
        result = sink_decode_attention(q, keys, values, batch.block_tables, batch.context_lens, window, sinks)
    return result if out is None else out.copy_(result)


def sink_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                          context_lens: torch.Tensor, window: int | None, sinks: torch.Tensor) -> torch.Tensor:
    """Returns [mu, H, Dh]: one query per sequence q [mu, H, Dh] over its last `window` (None:
    all) cached positions, with sink logits [H] -- moekit.sinks' arithmetic over the paged pools."""
    from ..mla import gather_padded
    from ..sinks import sink_attention

    kb, vb, mask = gather_padded(keys, values, tables, context_lens)  # [mu, Hkv, S, Dh], mask [mu, 1, 1, S]
    if window is not None:
        positions = torch.arange(kb.shape[2], device=kb.device)
        mask = mask & (positions > context_lens.long()[:, None, None, None] - 1 - window)
    return sink_attention(q[:, :, None], kb, vb, sinks, mask[:, :, None])[:, :, 0]


def attention_items() -> int:
    """Returns $MOEKIT_CPU_ATTENTION_ITEMS as the CPU attention kernel's work-items code (auto when
    unset); raises MoekitError naming the choices for anything else."""
    from ..native.attention import items_code

    try:
        return items_code()
    except ValueError as e:
        raise MoekitError(str(e)) from None


class NativeAttention:
    """The native CPU attention kernel's call for one micro-batch of a decode step: its block
    tables and lengths converted and checked once for the step, not on every call as
    native.attention.decode_attention does (a dozen small tensor ops per task, each handing the
    GIL to the launch thread and back). `of` returns None where the kernel does not apply."""

    def __init__(self, lib, tables: torch.Tensor, lens: torch.Tensor, dims: tuple[int, ...], codes: tuple[int, int],
                 items: int = 0, slots: torch.Tensor | None = None):
        import ctypes

        self.lib, self.tables, self.lens, self.dims, self.codes = lib, tables, lens, dims, codes
        self.items = items  # the kernel's work items (attention_items())
        i32p = ctypes.POINTER(ctypes.c_int32)
        self.tables_ptr = ctypes.cast(tables.data_ptr(), i32p)  # the tensors stay referenced by self
        self.lens_ptr = ctypes.cast(lens.data_ptr(), i32p)
        # the step's new tokens' flat slots (int64, checked against the pool), for store_and_attend; None: none
        self.slots = slots
        self.slots_ptr = None if slots is None else ctypes.cast(slots.data_ptr(), ctypes.POINTER(ctypes.c_int64))
        self._positions: dict[int | None, int] = {}  # window -> positions a call reads (read_bytes)

    def read_bytes(self, window: int | None, element_size: int, joint: bool = False) -> int:
        """Returns the KV bytes one call reads (each sequence's last `window` positions, None: all):
        a key and a value row a position, or one joint row (MLA's latent pool, `joint`)."""
        if window not in self._positions:
            lens = self.lens.tolist()
            self._positions[window] = sum(lens) if not window else sum(min(n, window) for n in lens)
        _, _, hkv, dh, _, _ = self.dims
        return self._positions[window] * hkv * dh * element_size * (1 if joint else 2)

    @staticmethod
    def of(cache: PagedKVCache, batch: RaggedBatch, heads: int, dtype: torch.dtype,
           pools: tuple[list, list] | None = None, items: int = 0) -> NativeAttention | None:
        """Returns the prepared call of a micro-batch's attention over the cache's pools (or the
        per-layer (keys, values) pools given, which the cache's block tables index) with the
        kernel's work-items code `items` (attention_items()), or None."""
        from ..native import attention as native_attention
        from ..native import library

        all_keys, all_values = pools if pools is not None else (cache.keys, cache.values)
        keys = all_keys[0]
        nb, bs, hkv, dh = keys.shape
        if not native_attention.usable(torch.empty(0, heads, dh, dtype=dtype), keys):
            return None
        if any(not (k.is_contiguous() and v.is_contiguous() and k.shape == keys.shape and k.dtype == keys.dtype
                    and v.shape == keys.shape and v.dtype == keys.dtype)
               for k, v in zip(all_keys, all_values)):
            return None
        tables = batch.block_tables.to(torch.int32).contiguous()
        lens = batch.context_lens.to(torch.int32).contiguous()
        width = tables.shape[1]
        if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > width * bs
                             or (width and (int(tables.min()) < 0 or int(tables.max()) >= nb))):
            return None  # decode_attention names what is wrong
        codes = (native_attention.DTYPE_CODES[dtype], native_attention.DTYPE_CODES[keys.dtype])
        slots = None  # store_and_attend writes whole rows of separate key and value pools (MLA's views of one: no)
        if pools is None or all_keys is not all_values:
            slots = batch.slots.to(device="cpu", dtype=torch.int64).contiguous()
            if slots.shape != lens.shape or (slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= nb * bs)):
                slots = None
        return NativeAttention(library(), tables, lens, (lens.shape[0], heads, hkv, dh, bs, width), codes, items,
                               slots)

    def can_store(self, keys: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether store_and_attend takes these new rows k, v [mu, Hkv, Dh] for these pools
        (contiguous, the pools' dtype, and the step's slots known)."""
        b, _, hkv, dh, _, _ = self.dims
        return not (self.slots is None or k.shape != (b, hkv, dh) or v.shape != k.shape or k.dtype != keys.dtype
                    or v.dtype != keys.dtype or not (k.is_contiguous() and v.is_contiguous()))

    def __call__(self, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, out: torch.Tensor,
                 window: int | None, threads: int | None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Returns out [mu, H, Dh]: attention of contiguous q [mu, H, Dh] over one layer's pools,
        with sink logits `sinks` [H] (contiguous float32 on the CPU: native.attention.sink_logits;
        None: none) (ctypes.CDLL drops the GIL for the kernel's duration)."""
        b, h, hkv, dh, bs, width = self.dims
        code = self.lib.moekit_decode_attention(
            self.codes[0], self.codes[1], q.data_ptr(), out.data_ptr(), keys.data_ptr(), values.data_ptr(),
            self.tables_ptr, self.lens_ptr, b, h, hkv, dh, bs, width, window or 0, dh ** -0.5,
            None if sinks is None else sinks.data_ptr(), threads or torch.get_num_threads(), self.items)
        if code != 0:
            raise MoekitError(f"the CPU attention kernel refused its arguments (code {code}: see native/attention.cpp)")
        return out

    def store_and_attend(self, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, out: torch.Tensor, window: int | None, threads: int | None,
                         sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """Writes the micro-batch's new k, v at its slots of one layer's pools, as PagedKVCache.write
        does but on this thread, without waking torch's thread team (native/kv_store.cpp says why),
        then attends as __call__ does, in one foreign call (each call hands the GIL to the launch
        thread and waits to get it back); returns (out, the seconds spent inside the call). The
        caller checks can_store first."""
        import ctypes

        b, h, hkv, dh, bs, width = self.dims
        seconds = ctypes.c_double()
        code = self.lib.moekit_store_and_attend(
            self.codes[0], self.codes[1], q.data_ptr(), out.data_ptr(), keys.data_ptr(), values.data_ptr(),
            self.tables_ptr, self.lens_ptr, b, h, hkv, dh, bs, width, window or 0, dh ** -0.5,
            None if sinks is None else sinks.data_ptr(), threads or torch.get_num_threads(), self.items,
            k.data_ptr(), v.data_ptr(), self.slots_ptr, hkv * dh * k.element_size(), ctypes.byref(seconds))
        if code != 0:
            raise MoekitError(f"the CPU attention kernel refused its arguments (code {code}: see native/attention.cpp)")
        return out, seconds.value
