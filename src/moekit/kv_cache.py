"""Key/value caches. KVCache: one preallocated [B, Hkv, S, Dh] buffer pair per layer for a
static batch. PagedKVCache: a pool of fixed-size blocks with a block table per sequence, for
ragged batches whose sequences grow, end and arrive at different times (RaggedBatch: one step).

Shapes: B = batch, Hkv = key/value heads, S = capacity in positions, Dh = head dim.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import MoekitError


class KVCache:
    """Keys and values of every attention layer for up to `capacity` positions."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype):
        (hk, dk), (hv, dv) = config.kv_cache_dims()  # MLA caches its latent and rope key instead
        self.capacity = capacity
        self.keys = [torch.zeros((batch, hk, capacity, dk), device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.values = [torch.zeros((batch, hv, capacity, dv), device=device, dtype=dtype) for _ in range(config.num_layers)]

    @property
    def bytes(self) -> int:
        """Returns the device bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              start: int | torch.Tensor) -> None:
        """Stores k, v [B, Hkv, T, Dh] at positions start..start+T-1 of `layer`."""
        if isinstance(start, torch.Tensor):
            # Graph-safe path: the position lives on the device, so no host sync.
            index = start + torch.arange(k.shape[2], device=k.device)
            self.keys[layer].index_copy_(2, index, k)
            self.values[layer].index_copy_(2, index, v)
            return
        end = start + k.shape[2]
        if end > self.capacity:
            raise MoekitError(f"KV cache holds {self.capacity} positions, asked to write up to {end}; "
                              "allocate it with room for prompt + max_new_tokens")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v


# ---- paged ---------------------------------------------------------------------------------
#
# Shapes: NB = blocks in the pool, BS = positions per block, N = packed new tokens of a step
# (all sequences), B = sequences in a step, MB = blocks of the longest block table.


# Queries per program of the packed prefill attention kernel (moekit.kernels.paged_attention):
# prepare() cuts each sequence's new tokens into tiles of at most this many.
QUERY_TILE = 64


class OutOfBlocks(MoekitError):
    """The paged cache has too few free blocks for a step (a scheduler queues or preempts)."""


@dataclass(frozen=True)
class RaggedBatch:
    """One forward step over packed sequences of different lengths at different positions.

    Sequence i contributes query_lens[i] new tokens at positions starts[i].. (its earlier
    positions are already cached); its tokens sit contiguously in the packed input, in order.
    """

    starts: tuple[int, ...]  # [B] cached positions before this step (host side; a static decode step,
    # moekit.paged_decode, leaves them 0: decode attention reads context_lens on the device)
    query_lens: tuple[int, ...]  # [B] new tokens this step
    positions: torch.Tensor  # [N] int64 position of each packed token
    slots: torch.Tensor  # [N] int64 flat cache slot (block * BS + offset) of each packed token
    block_tables: torch.Tensor  # [B, MB] int32 cache blocks of each sequence (0 past its end)
    context_lens: torch.Tensor  # [B] int32 positions each sequence attends to after this step
    last_index: torch.Tensor  # [B] int64 index in the packed tokens of each sequence's last token
    # [T, 4] int32 (sequence, first packed token, tokens, first position) per run of <= QUERY_TILE
    # queries of one sequence, for the packed prefill kernel; None for a decode step
    query_tiles: torch.Tensor | None = None
    # a static-shape step (moekit.paged_decode.PagedMixed): padded past its tokens and sequences,
    # its host fields (starts, query_lens) placeholders; only the packed kernels may read it
    padded: bool = False

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """Returns whether every sequence brings exactly one token (a decode step)."""
        return all(n == 1 for n in self.query_lens)


def query_tiles(starts: tuple[int, ...], query_lens: tuple[int, ...], tile: int = QUERY_TILE) -> list[list[int]]:
    """Returns [sequence, first packed token, tokens, first position] for each run of at most
    `tile` consecutive new tokens of one sequence (a decode row is a run of one)."""
    tiles, offset = [], 0
    for i, (start, n) in enumerate(zip(starts, query_lens)):
        for j in range(0, n, tile):
            tiles.append([i, offset + j, min(tile, n - j), start + j])
        offset += n
    return tiles


def _host_tensor(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """Returns t, in pinned memory when `pin` (a non_blocking copy from it is asynchronous)."""
    return t.pin_memory() if pin else t


class PagedKVCache:
    """Keys and values of every layer in a pool of fixed-size blocks; one block table per sequence.

    Per layer, keys and values are [NB + 1, BS, Hkv, Dh] (the last block is scratch_block). A
    sequence (any hashable id) holds the blocks of its block table; `prepare` grows the tables as sequences grow, `free` returns a
    finished sequence's blocks to the pool, so memory follows the tokens actually held.
    """

    # prepare's tables go to a CUDA device through pinned memory (no wait for the stream to drain);
    # the batch pipeline's staging cache sets it (serve paths keep the pageable copies)
    pin_host_copies = False

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device | str, dtype: torch.dtype):
        if num_blocks < 1:
            raise MoekitError(f"a paged KV cache needs at least one block, got num_blocks={num_blocks}")
        if block_size < 1 or block_size & (block_size - 1):
            raise MoekitError(f"block_size must be a power of two (e.g. 16), got {block_size}")
        (hk, dk), (hv, dv) = config.kv_cache_dims()  # MLA caches its latent and rope key instead
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        # one block past the pool belongs to no sequence: padding rows of static-shape decode
        # steps (moekit.paged_decode) write and read there
        self.scratch_block = num_blocks
        self.keys = [torch.zeros((num_blocks + 1, block_size, hk, dk), device=device, dtype=dtype)
                     for _ in range(config.num_layers)]
        self.values = [torch.zeros((num_blocks + 1, block_size, hv, dv), device=device, dtype=dtype)
                       for _ in range(config.num_layers)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self.tables: dict[Hashable, list[int]] = {}

    @classmethod
    def for_tokens(cls, config: ModelConfig, tokens: int, block_size: int,
                   device: torch.device | str, dtype: torch.dtype) -> PagedKVCache:
        """Returns a cache with enough blocks for `tokens` positions held at once."""
        return cls(config, max(1, -(-tokens // block_size)), block_size, device, dtype)

    @property
    def bytes(self) -> int:
        """Returns the device bytes held by the block pool."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, positions: int) -> int:
        """Returns the blocks a sequence of `positions` positions holds."""
        return -(-positions // self.block_size)

    def blocks_needed(self, seq: Hashable, positions: int) -> int:
        """Returns how many more blocks `seq` needs to hold `positions` positions."""
        return max(0, self.blocks_for(positions) - len(self.tables.get(seq, ())))

    def grow(self, seq: Hashable, positions: int) -> None:
        """Gives `seq` blocks for `positions` positions; raises OutOfBlocks (taking none) when short."""
        need = self.blocks_needed(seq, positions)
        if need > len(self._free):
            raise OutOfBlocks(f"the paged KV cache has {len(self._free)} free blocks of {self.block_size} "
                              f"positions, a sequence needs {need} more; give the cache more blocks "
                              "(or run fewer sequences at once)")
        table = self.tables.setdefault(seq, [])
        for _ in range(need):
            table.append(self._free.pop())

    def free(self, seq: Hashable) -> None:
        """Returns the blocks of `seq` to the pool (a sequence never seen is ignored)."""
        self._free.extend(reversed(self.tables.pop(seq, [])))

    def prepare(self, seqs: list[tuple[Hashable, int, int]]) -> RaggedBatch:
        """Returns the RaggedBatch of one step over (sequence, start, new tokens) triples, growing
        each sequence's blocks to start + new tokens first (raises OutOfBlocks, growing none, when
        the pool is short)."""
        if not seqs:
            raise MoekitError("a step needs at least one sequence")
        need = sum(self.blocks_needed(seq, start + n) for seq, start, n in seqs)
        if need > len(self._free):
            raise OutOfBlocks(f"the paged KV cache has {len(self._free)} free blocks, this step needs {need}; "
                              "give the cache more blocks (or run fewer sequences at once)")
        for seq, start, n in seqs:
            if n < 1 or start < 0:
                raise MoekitError(f"each sequence of a step needs >= 1 new token at a start >= 0, got {n} at {start}")
            self.grow(seq, start + n)
        positions, slots = [], []
        for seq, start, n in seqs:
            table = self.tables[seq]
            for p in range(start, start + n):
                positions.append(p)
                slots.append(table[p // self.block_size] * self.block_size + p % self.block_size)
        width = max(len(self.tables[seq]) for seq, _, _ in seqs)
        tables = [self.tables[seq] + [0] * (width - len(self.tables[seq])) for seq, _, _ in seqs]
        query_lens = tuple(n for _, _, n in seqs)
        ends = torch.tensor(query_lens).cumsum(0)
        pin = self.pin_host_copies and self.device.type == "cuda"
        as_device = lambda x, dtype: _host_tensor(torch.tensor(x, dtype=dtype), pin).to(self.device, non_blocking=True)
        starts = tuple(start for _, start, _ in seqs)
        tiles = None
        if any(n > 1 for n in query_lens):
            tiles = as_device(query_tiles(starts, query_lens), torch.int32)
        return RaggedBatch(
            starts=starts, query_lens=query_lens,
            positions=as_device(positions, torch.long), slots=as_device(slots, torch.long),
            block_tables=as_device(tables, torch.int32),
            context_lens=as_device([start + n for _, start, n in seqs], torch.int32),
            last_index=_host_tensor(ends - 1, pin).to(self.device, non_blocking=True), query_tiles=tiles)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Stores packed k, v [N, Hkv, Dh] of `layer` at flat cache slots [N]."""
        self.keys[layer].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        self.values[layer].view(-1, *v.shape[1:]).index_copy_(0, slots, v)
