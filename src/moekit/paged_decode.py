"""Ragged decode steps (and, with PagedMixed below, steps that carry prefill chunks) with static
shapes, captured as CUDA graphs at bucketed sizes.

A decode step of a ragged batch (one new token per sequence, each at its own position) has
shapes that change every step: the number of sequences and the length of their block tables.
Here the batch is padded to a bucket (1, 2, 4, ... sequences) and every block table to the blocks
of the model's whole context, so one step per bucket can be captured once and replayed: the
token, position, cache slot, context length and block table of each row are copied into a
static buffer, the graph replays, and the first B rows of its logits are read. Padding rows
write their key/value into the cache's scratch block and attend to it alone; their logits are
never read. On the CPU the same static step runs eagerly (the padding logic is tested there).
A model whose experts live behind a shared runtime (offloaded) cannot be captured whole: its
step is cut at the expert calls (moekit.piecewise), the segments captured, the experts run
eagerly between them on the real rows only. A step's token column may come from a device tensor
(the previous step's sampled tokens, moekit.serve's overlap) instead of the host.

Shapes: B = sequences of the step, P = its bucket (B padded), MB = blocks of the whole context
(or of the pool, if fewer), V = vocab. The static buffer `meta` is [P, 4 + MB] int64: token,
position, slot, context length, then the block table.
"""

from __future__ import annotations

import array
import warnings
from collections.abc import Hashable

import torch

from .kv_cache import QUERY_TILE, PagedKVCache, RaggedBatch, query_tiles
from .piecewise import PiecewiseDecode, capture_stream

_TOKEN, _POSITION, _SLOT, _CONTEXT, _TABLE = 0, 1, 2, 3, 4


def bucket_for(batch: int) -> int:
    """Returns the padded batch size of a step of `batch` sequences: the next power of two."""
    return 1 << max(0, batch - 1).bit_length()


def static_decode_supported(model) -> bool:
    """Returns whether the model's decode step can run with static shapes (and be captured
    whole): resident experts (no shared expert runtime that syncs with the host or moves experts
    between steps). Every attention's ragged decode path (grouped-query, latent, sinks) reads
    block tables and context lengths on the device only."""
    return getattr(model, "expert_runtime", None) is None


def piecewise_decode_supported(model) -> bool:
    """Returns whether the model's decode step runs at static shapes cut at its expert calls
    (moekit.piecewise): experts behind a shared runtime (offloaded), which run eagerly between
    the captured segments as in `moekit generate --offload`; needs a MoE layer to cut at."""
    return not static_decode_supported(model) and any(layer.is_moe for layer in model.layers)


class _GraphedStep:
    """A step over static buffers (a subclass's `fill` and `forward`), replayed as a CUDA graph
    once `capture` ran; `run` is forward() until then."""

    @torch.inference_mode()
    def capture(self, pool) -> None:
        """Captures forward() as a CUDA graph (warm-up and capture write only the scratch block)."""
        self.fill([])
        stream = capture_stream(self.model)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            self.logits = self.forward()
        self.graph = graph

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits


def _decode_batch(meta: torch.Tensor, last_index: torch.Tensor) -> RaggedBatch:
    """Returns the RaggedBatch of a decode step over the static buffer meta [P, 4 + MB] (device
    views: captured, they stay static)."""
    bucket = meta.shape[0]
    return RaggedBatch(
        starts=(0,) * bucket, query_lens=(1,) * bucket, positions=meta[:, _POSITION],
        slots=meta[:, _SLOT], block_tables=meta[:, _TABLE:].to(torch.int32),
        context_lens=meta[:, _CONTEXT].to(torch.int32), last_index=last_index)


class _Step(_GraphedStep):
    """One bucket's step: static buffers, and its CUDA graph once captured."""

    def __init__(self, model, cache: PagedKVCache, bucket: int, width: int):
        self.model, self.cache, self.bucket = model, cache, bucket
        device = cache.device
        # two pinned host twins, used in turn: with the scheduler's overlap a step is filled while
        # the previous one (same bucket) may not have copied its buffer to the device yet
        self.hosts = [torch.zeros(bucket * (_TABLE + width), dtype=torch.long, pin_memory=device.type == "cuda")
                      for _ in range(2)]
        self.copied: list[torch.cuda.Event | None] = [None, None]  # each twin's last host-to-device copy
        self.turn = 0
        self.meta = torch.zeros(bucket, _TABLE + width, dtype=torch.long, device=device)
        self.last_index = torch.arange(bucket, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def forward(self) -> torch.Tensor:
        """Returns logits [P, V] of the step described by `meta` (writes k/v at its slots)."""
        batch = _decode_batch(self.meta, self.last_index)
        return self.model(self.meta[:, _TOKEN][None], cache=self.cache, start=batch, last_only=True)[:, -1]

    def fill(self, rows: list[tuple[int, int, list[int]]], tokens: torch.Tensor | None = None) -> None:
        """Copies (token, position, block table) rows into the static buffer; padding after them.
        With `tokens` ([B] int64 on the device, e.g. the previous step's sampled tokens, not yet
        read back) the rows' tokens come from it by a device copy and the host ones are ignored.

        Only the columns of the longest table this step are copied: the kernel never reads a
        table past a row's context, so what earlier steps left further right is never used."""
        bs, scratch = self.cache.block_size, self.cache.scratch_block
        width = max([len(table) for _, _, table in rows], default=1)
        data = []  # flat
        for token, position, table in rows:
            data += (token, position, table[position // bs] * bs + position % bs, position + 1)
            data += table
            data += [0] * (width - len(table))
        data += ([0, 0, scratch * bs, 1, scratch] + [0] * (width - 1)) * (self.bucket - len(rows))
        columns = _TABLE + width
        turn, self.turn = self.turn, self.turn ^ 1
        if self.copied[turn] is not None:
            self.copied[turn].synchronize()  # its copy two fills ago has long finished: no wait in practice
        host = self.hosts[turn][:self.bucket * columns]
        host.copy_(_longs(data))
        host = host.view(self.bucket, columns)
        self.meta[:, :columns].copy_(host, non_blocking=True)
        if self.meta.is_cuda:
            self.copied[turn] = torch.cuda.Event()
            self.copied[turn].record()
        if tokens is not None:
            self.meta[:len(rows), _TOKEN].copy_(tokens)


class _PiecewiseStep(_Step):
    """One bucket's step for a model whose experts live behind a shared runtime (offloaded): the
    static step cut at the expert calls (moekit.piecewise), its segments CUDA graphs on GPUs and
    the expert source run eagerly between them, on the step's real rows only (a padding row's
    experts would be fetched for nothing; its own rows are never read)."""

    def __init__(self, model, cache: PagedKVCache, bucket: int, width: int, graphs: bool):
        super().__init__(model, cache, bucket, width)
        super().fill([])  # every row padding: the warm-up and capture write the scratch block only
        # the pieces hold the buffers, not this step: no reference cycle, so a dropped scheduler
        # frees its graphs' pool and KV cache at once (an offload budget counts them)
        self.pieces = _PagedPieces(model, cache, self.meta, self.last_index, graphs)
        self.graph = self.pieces.graphs[0] if self.pieces.graphs else None

    def fill(self, rows, tokens=None) -> None:
        super().fill(rows, tokens)
        self.pieces.live = len(rows) or self.bucket

    def run(self) -> torch.Tensor:
        return self.pieces.run()[:, -1]


class _PagedPieces(PiecewiseDecode):
    """moekit.piecewise's segments over a ragged decode step's static buffers meta [P, 4 + MB]."""

    def __init__(self, model, cache: PagedKVCache, meta: torch.Tensor, last_index: torch.Tensor, graphs: bool):
        self.meta, self.last_index = meta, last_index
        self.live = meta.shape[0]  # the step's real rows (the rest are padding)
        # the token argument only sizes the experts' output buffer: one row per bucket row
        super().__init__(model, cache, torch.zeros(meta.shape[0], 1, dtype=torch.long, device=meta.device), 0,
                         graphs=graphs)

    def _inputs(self):
        return self.meta[:, _TOKEN][None], self.meta[:, _POSITION], _decode_batch(self.meta, self.last_index)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(x[0, self.last_index][:, None])  # [P, 1, V]

    def _experts(self, routed) -> None:
        n = self.live
        self.moe_out[:n].copy_(routed.block.experts(routed.flat[:n], routed.ids[:n], routed.weights[:n]))


def _longs(values: list[int]) -> torch.Tensor:
    """Returns an int64 CPU tensor of `values` (through array: ~3x faster than torch.tensor of a
    list, which costs ~0.25 ms a step at 128 sequences)."""
    return torch.frombuffer(array.array("q", values), dtype=torch.long)


class PagedDecode:
    """Decode steps of ragged batches over `cache` at static shapes; CUDA graphs on GPUs."""

    def __init__(self, model, cache: PagedKVCache, graphs: bool | None = None):
        """`graphs` (default: on CUDA) captures each bucket's step the first time it is used;
        without, the static step runs eagerly."""
        self.model, self.cache = model, cache
        self.use_graphs = cache.device.type == "cuda" if graphs is None else graphs
        # no sequence holds more blocks than the context, nor than the pool
        self.width = min(cache.blocks_for(model.config.max_position_embeddings), cache.num_blocks)
        self.steps: dict[int, _Step] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.piecewise = piecewise_decode_supported(model)  # offloaded experts: segments between expert calls

    @torch.inference_mode()  # its static buffers may have been made by warm(), as inference tensors
    def __call__(self, work: list[tuple[Hashable, int, int]], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Returns logits [B, V] of one decode step over (sequence, position, token) triples,
        growing each sequence's blocks to hold its position first (OutOfBlocks when short).
        `tokens` ([B] int64 on the device) replaces the triples' tokens without a host round trip.
        The logits are the step's static buffer: the next step of the same bucket overwrites them."""
        for seq, position, _ in work:
            self.cache.grow(seq, position + 1)
        step = self._step(bucket_for(len(work)))
        step.fill([(token, position, self.cache.tables[seq]) for seq, position, token in work], tokens)
        return step.run()[:len(work)]

    @torch.inference_mode()  # as every step runs: outside it autograd would record (and the capture sync)
    def warm(self, max_batch: int) -> list[int]:
        """Returns the buckets of up to `max_batch` sequences after building (and, with graphs,
        capturing) each one's step now, so that no later step pays for a capture mid-run."""
        buckets = sorted({bucket_for(b) for b in range(1, max_batch + 1)})
        for bucket in buckets:
            self._step(bucket)
        return buckets

    def _step(self, bucket: int) -> _Step:
        step = self.steps.get(bucket)
        if step is None and self.piecewise:
            try:
                step = _PiecewiseStep(self.model, self.cache, bucket, self.width, self.use_graphs)
            except RuntimeError as e:  # e.g. a layer between the expert calls that syncs with the host
                if not self.use_graphs:
                    raise
                warnings.warn(f"CUDA graph capture of the piecewise decode step failed, running it eagerly: {e}")
                torch.cuda.synchronize()
                step = _PiecewiseStep(self.model, self.cache, bucket, self.width, False)
            self.steps[bucket] = step
        if step is None:
            step = self.steps[bucket] = _Step(self.model, self.cache, bucket, self.width)
            if self.use_graphs:
                try:
                    step.capture(self.pool)
                except RuntimeError as e:  # e.g. an expert source that syncs with the host
                    warnings.warn(f"CUDA graph capture of the ragged decode step failed, running it eagerly: {e}")
                    torch.cuda.synchronize()
                    step.graph = None
        return step


# ---- mixed steps -------------------------------------------------------------------------------
#
# A step that carries prefill chunks beside decode rows runs eagerly: ~40 launches a layer from
# Python, which on a GPU cost more than the step's math up to ~1000 tokens. PagedMixed runs such
# steps at static shapes too: the packed tokens padded to a token bucket T (a power of two), the
# sequence rows to P = bucket_for(max_seqs), the query tiles to ceil(T / QUERY_TILE) + P, every
# block table to the whole context; one graph per token bucket. Padding tokens write the scratch
# block and belong to no query tile (their attention output is 0); padding rows' logits are never
# read. It needs the packed prefill kernel (moekit.paged_attention), which reads every size from
# the device, so it is for models whose every layer's attention is the grouped-query one.


def static_mixed_supported(model) -> bool:
    """Returns whether the model's mixed steps can run at static shapes (moekit.paged_decode.
    PagedMixed): resident experts, and every layer's attention the plain grouped-query one (latent
    and sink attention loop over a step's sequences on the host)."""
    # by name: moekit.model imports this module's users (an import of it here would be a cycle)
    plain = [type(layer.attn).__module__ == "moekit.model" and type(layer.attn).__name__ == "Attention"
             for layer in model.layers]
    return static_decode_supported(model) and all(plain)


class _MixedStep(_GraphedStep):
    """One token bucket's mixed step: static buffers, and its CUDA graph once captured.

    Device buffers (T = bucket tokens, P = sequence rows, Q = query tiles, MB = table width):
    head [3T + 2P + 4Q] int64 (tokens, positions, slots, context lengths, last indices, tiles
    [Q, 4]) and tables [P, MB] int64, each copied from a pinned host twin."""

    def __init__(self, model, cache: PagedKVCache, tokens: int, seqs: int, width: int):
        self.model, self.cache, self.tokens, self.seqs = model, cache, tokens, seqs
        self.tiles = -(-tokens // QUERY_TILE) + seqs
        device, pinned = cache.device, cache.device.type == "cuda"
        size = 3 * tokens + 2 * seqs + 4 * self.tiles
        self.host_head = torch.zeros(size, dtype=torch.long, pin_memory=pinned)
        self.host_tables = torch.zeros(seqs, width, dtype=torch.long, pin_memory=pinned)
        self.head = torch.zeros(size, dtype=torch.long, device=device)
        self.tables = torch.zeros(seqs, width, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.failed = False  # its capture failed: the scheduler runs this bucket's steps eagerly
        # the last host-to-device copy: a step whose rows all stay mid-prompt reads nothing back,
        # so the next fill must wait for it before rewriting the pinned buffers
        self.copied: torch.cuda.Event | None = None

    def forward(self) -> torch.Tensor:
        """Returns logits [P, V] of the step described by the buffers (writes k/v at its slots)."""
        t, p, head = self.tokens, self.seqs, self.head
        tokens, positions, slots = head[:t], head[t:2 * t], head[2 * t:3 * t]
        context, last = head[3 * t:3 * t + p], head[3 * t + p:3 * t + 2 * p]
        tiles = head[3 * t + 2 * p:].view(self.tiles, 4)
        # host fields are placeholders (one run of t - p + 1 tokens, then p - 1 single ones: t > p,
        # so never a decode step); the packed kernel reads the step from the device tensors
        batch = RaggedBatch(
            starts=(0,) * p, query_lens=(t - p + 1,) + (1,) * (p - 1), positions=positions, slots=slots,
            block_tables=self.tables.to(torch.int32), context_lens=context.to(torch.int32), last_index=last,
            query_tiles=tiles.to(torch.int32), padded=True)
        return self.model(tokens[None], cache=self.cache, start=batch, last_only=True)[:, -1]

    def fill(self, work: list[tuple[Hashable, int, list[int]]]) -> None:
        """Copies (sequence, start, new tokens) rows into the static buffers; padding after them.
        Only the table columns of the longest table are copied (none is read past a context)."""
        bs, scratch = self.cache.block_size, self.cache.scratch_block
        pad_tokens, pad_rows = self.tokens - sum(len(toks) for _, _, toks in work), self.seqs - len(work)
        tokens, positions, slots, context, last, end = [], [], [], [], [], 0
        for seq, start, toks in work:
            table = self.cache.tables[seq]
            tokens += toks
            span = range(start, start + len(toks))
            positions += span
            slots += [table[q // bs] * bs + q % bs for q in span]
            context.append(start + len(toks))
            end += len(toks)
            last.append(end - 1)
        tiles = query_tiles(tuple(start for _, start, _ in work), tuple(len(toks) for _, _, toks in work))
        if self.copied is not None:
            self.copied.synchronize()
        head = (tokens + [0] * pad_tokens + positions + [0] * pad_tokens + slots + [scratch * bs] * pad_tokens
                + context + [1] * pad_rows + last + [0] * pad_rows
                + [v for tile in tiles for v in tile] + [0] * (4 * (self.tiles - len(tiles))))
        self.host_head.copy_(_longs(head))
        self.head.copy_(self.host_head, non_blocking=True)
        width = max([len(self.cache.tables[seq]) for seq, _, _ in work], default=1)
        flat = []
        for seq, _, _ in work:
            table = self.cache.tables[seq]
            flat += table
            flat += [0] * (width - len(table))
        if work:
            host = self.host_tables[:len(work), :width]
            host.copy_(_longs(flat).view(len(work), width))
            self.tables[:len(work), :width].copy_(host, non_blocking=True)
        if self.head.is_cuda:
            self.copied = torch.cuda.Event()
            self.copied.record()


class PagedMixed:
    """Mixed steps (prefill chunks and decode rows) of up to `max_seqs` sequences and
    `max_tokens` packed tokens over `cache` at static shapes; CUDA graphs on GPUs."""

    def __init__(self, model, cache: PagedKVCache, max_seqs: int, max_tokens: int, graphs: bool | None = None,
                 pool=None):
        """`pool` shares a graph memory pool (a PagedDecode's): steps replay one at a time."""
        self.model, self.cache = model, cache
        self.use_graphs = cache.device.type == "cuda" if graphs is None else graphs
        self.width = min(cache.blocks_for(model.config.max_position_embeddings), cache.num_blocks)
        self.seqs = bucket_for(max_seqs)
        self.smallest = max(64, 2 * self.seqs)  # > the sequence rows: the placeholder runs are never all ones
        self.max_tokens = max(self.smallest, bucket_for(max_tokens))
        self.steps: dict[int, _MixedStep] = {}
        self.pool = (pool or torch.cuda.graph_pool_handle()) if self.use_graphs else None

    def bucket(self, tokens: int) -> int:
        """Returns the token bucket of a step of `tokens` packed tokens."""
        return max(self.smallest, bucket_for(tokens))

    def runs(self, work: list[tuple[Hashable, int, list[int]]]) -> bool:
        """Returns whether a step of this work runs here (within the buckets, its capture not failed)."""
        tokens = sum(len(toks) for _, _, toks in work)
        if len(work) > self.seqs or tokens > self.max_tokens:
            return False
        step = self.steps.get(self.bucket(tokens))
        return step is None or not step.failed

    @torch.inference_mode()
    def __call__(self, work: list[tuple[Hashable, int, list[int]]]) -> torch.Tensor:
        """Returns the last logits [B, V] of one step over (sequence, start, new tokens) triples,
        growing each sequence's blocks first (OutOfBlocks when short)."""
        for seq, start, toks in work:
            self.cache.grow(seq, start + len(toks))
        step = self._step(self.bucket(sum(len(toks) for _, _, toks in work)))
        step.fill(work)
        return step.run()[:len(work)]

    @torch.inference_mode()
    def warm(self) -> list[int]:
        """Returns the token buckets after building (and capturing) each one's step now."""
        buckets, b = [], self.smallest
        while b <= self.max_tokens:
            self._step(b)
            buckets.append(b)
            b *= 2
        return buckets

    def _step(self, bucket: int) -> _MixedStep:
        step = self.steps.get(bucket)
        if step is None:
            step = self.steps[bucket] = _MixedStep(self.model, self.cache, bucket, self.seqs, self.width)
            if self.use_graphs:
                try:
                    step.capture(self.pool)
                except RuntimeError as e:  # e.g. a layer that syncs with the host
                    warnings.warn(f"CUDA graph capture of the mixed step ({bucket} tokens) failed, running "
                                  f"those steps eagerly: {e}")
                    torch.cuda.synchronize()
                    step.graph, step.failed = None, True
        return step
