"""The sub-1-bit code for ternary experts: fixed-width codewords for variable-length runs of
ternary symbols, with a dictionary built from the weights' own symbol statistics.

The dictionary is a Tunstall code: start from the three one-symbol words and keep splitting
the most probable word w into w0, w1, w2 until 2^B words exist (words stop growing at
MAX_WORD symbols). Every ternary string parses greedily into dictionary words, and each word
is stored as its B-bit index. Zeros dominate the ternary stream of GPTQ'd experts (QMoE saw
p(0) = 0.885), so words are long and a B-bit codeword stands for many weights.

For parallel decoding each row is parsed as one stream and its codewords are cut into chunks
of W codewords (W from CHUNKS, chosen per matrix); the column where each chunk starts is stored
(int16, or int32 for rows longer than 32767), so a kernel can decode every chunk of every row
independently. A row stops at its last word holding a nonzero symbol (the columns after it decode
as zeros, so an all-zero row has no chunks), and its last chunk is filled with the all-zeros word.
A row's last word may run past its end; the parser pads rows with zeros, so those symbols are
zeros and decoding masks them.

Layout (format version 2): rows keep their own chunk counts. The chunks of one matrix are laid
end to end in row order, and rows are grouped in blocks of ROW_BLOCK rows: a block stores the
chunk where it begins, a row its chunk count, so row r's chunks begin at
block_offsets[r // ROW_BLOCK] + (chunks of the rows before r in its block). On rows whose
densities spread +-30% around 25% nonzeros (1.05 bits of entropy), padding every row to the
longest row (version 1) stored 1.59 bits/param at K=512 and 1.42 at K=4096, rows of their own
length 1.37 and 1.20. Padding each block of 16 rows to its longest row gains almost nothing there
(1.60 and 1.39): a block of random rows nearly always holds one near the densest. Matrices stacked
[E, ...] (one layer's experts) share one chunk capacity T, the most chunks of any of them, so
that each expert keeps a fixed shape (offload packs experts into fixed-size byte rows); unused
capacity holds the all-zeros word and starts of K.

Stored tensors of codes [..., R, K] (a `Code`):
    codewords      [..., T, W]  uint8 for 8-bit dictionaries, else int16 holding the uint16 value
    starts         [..., T]     int16 (int32 when K > 32767): the column of each chunk's first word
    row_chunks     [..., R]     uint8 (int16 / int32 when a row has more chunks): chunks per row
    block_offsets  [..., NB]    int32: the first chunk of each block of ROW_BLOCK rows

Dictionary entry (the decode table, int32 [2^B, 2]):
    table[c, 0]  bit i (i < MAX_WORD) set when symbol i of word c is nonzero
    table[c, 1]  bit i set when symbol i is HI (else LO); bits 27..31 hold the word's length

Shape legend:
    M = rows to code, R = rows of one matrix, K = columns, T = chunk capacity of one matrix,
    W = CHUNK codewords per chunk, NB = ceil(R / ROW_BLOCK) row blocks, L = MAX_WORD
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .grids import HI, LO, ZERO

MAX_WORD = 27  # symbols per word: 27 bits of each table word, 5 bits for the length
CHUNKS = (4, 8, 16, 32, 64)  # codewords per independently decodable chunk: encode picks one
CHUNK = 32  # the typical choice, used for size estimates
LENGTH_SHIFT = 27
CODEWORD_BITS = (8, 16)  # stored as uint8 / int16: the widths that waste no storage bits
ROW_BLOCK = 16  # rows per block offset: 4 bytes per 16 rows; the kernels take any BLOCK_R


class Code(NamedTuple):
    """The stored tensors of coded rows (module docstring), in the order the kernels take them."""

    codewords: torch.Tensor  # [..., T, W]
    starts: torch.Tensor  # [..., T]
    row_chunks: torch.Tensor  # [..., R]
    block_offsets: torch.Tensor  # [..., NB]

    def nbytes(self) -> int:
        """Returns the stored bytes of the four tensors."""
        return sum(t.numel() * t.element_size() for t in self)


@dataclass
class Dictionary:
    """A Tunstall dictionary of 2^bits words over the ternary symbols."""

    bits: int
    table: torch.Tensor  # [2^bits, 2] int32 decode table (see the module docstring)
    child: torch.Tensor  # [nodes, 3] int64 parse tree: child node per symbol, -1 at leaves
    code_of: torch.Tensor  # [nodes] int64 codeword of each leaf (-1 for inner nodes)
    depth: torch.Tensor  # [nodes] int64 word length of each node
    pad_code: int  # the all-zeros word of greatest length
    expected_length: float  # mean symbols per codeword under the statistics it was built for


def symbol_probabilities(codes: torch.Tensor) -> tuple[float, float, float]:
    """Returns (p(ZERO), p(LO), p(HI)) of ternary codes (any shape)."""
    counts = torch.bincount(codes.reshape(-1).to(torch.int64), minlength=3)[:3].double()
    probs = (counts + 1) / (counts.sum() + 3)  # never exactly 0: every symbol stays codable
    return tuple(probs.tolist())  # type: ignore[return-value]


def entropy_bits(probs: tuple[float, float, float]) -> float:
    """Returns the entropy (bits per symbol) of a memoryless ternary source: the bound for any
    code that treats symbols as independent."""
    return -sum(p * math.log2(p) for p in probs if p > 0)


def build_dictionary(probs: tuple[float, float, float], bits: int, max_word: int = MAX_WORD) -> Dictionary:
    """Returns the Tunstall dictionary of 2^bits words (at most) for symbol probabilities probs."""
    if not 2 <= bits <= 16:
        raise ValueError(f"codeword bits must be in 2..16, got {bits}")
    child: list[list[int]] = [[-1, -1, -1]]
    depth, prob, sym_path = [0], [1.0], [(0, 0)]  # sym_path: (nonzero bits, hi bits)
    heap: list[tuple[float, int]] = [(-1.0, 0)]
    leaves = 1
    while heap and leaves + 2 <= (1 << bits):
        _, node = heapq.heappop(heap)
        leaves += 2
        nz, hi = sym_path[node]
        for s in (ZERO, LO, HI):
            new = len(child)
            child.append([-1, -1, -1])
            child[node][s] = new
            depth.append(depth[node] + 1)
            prob.append(prob[node] * probs[s])
            bit = 1 << depth[node]
            sym_path.append((nz | (bit if s != ZERO else 0), hi | (bit if s == HI else 0)))
            if depth[new] < max_word:
                heapq.heappush(heap, (-prob[new], new))
    child_t = torch.tensor(child, dtype=torch.int64)
    is_leaf = child_t[:, 0] < 0
    leaf_nodes = torch.nonzero(is_leaf).flatten()
    code_of = torch.full((len(child),), -1, dtype=torch.int64)
    code_of[leaf_nodes] = torch.arange(leaf_nodes.numel())
    table = torch.zeros(1 << bits, 2, dtype=torch.int64)
    for code, node in enumerate(leaf_nodes.tolist()):
        nz, hi = sym_path[node]
        table[code, 0] = nz
        table[code, 1] = hi | (depth[node] << LENGTH_SHIFT)
    table = torch.where(table >= 1 << 31, table - (1 << 32), table).to(torch.int32)
    node = 0
    while child[node][ZERO] >= 0:
        node = child[node][ZERO]
    depth_t = torch.tensor(depth, dtype=torch.int64)
    prob_t = torch.tensor(prob, dtype=torch.float64)
    expected = float((prob_t[leaf_nodes] * depth_t[leaf_nodes]).sum())
    return Dictionary(bits, table, child_t, code_of, depth_t, int(code_of[node]), expected)


def choose_dictionary(probs: tuple[float, float, float], numel: int, rows: int,
                      widths: tuple[int, ...] = CODEWORD_BITS) -> Dictionary:
    """Returns the dictionary whose estimated stored bytes (codewords, chunk starts, half a chunk
    of padding per row, and the table) for `numel` symbols in `rows` rows are smallest."""
    best, best_bytes = None, float("inf")
    for bits in widths:
        if bits > min(widths) and (1 << bits) * 8 > numel / 64:
            continue  # its table alone would cost over 1/8 bit per parameter (and takes a while to build)
        d = build_dictionary(probs, bits)
        words = numel / d.expected_length + rows * CHUNK / 2
        nbytes = words * (bits // 8) + 2 * words / CHUNK + (1 << bits) * 8
        if nbytes < best_bytes:
            best, best_bytes = d, nbytes
    return best  # type: ignore[return-value]


def _smallest_int(limit: int) -> torch.dtype:
    """Returns the narrowest stored integer dtype (uint8, int16, int32) that holds 0..limit."""
    return torch.uint8 if limit < 256 else torch.int16 if limit < 32768 else torch.int32


def _stored_bytes(row_words: torch.Tensor, chunk: int, word_bytes: int, start_bytes: int) -> int:
    """Returns the bytes of the chunked layout at chunk width `chunk` for words per row [L, R]."""
    chunks = -(-row_words // chunk)  # [L, R]
    capacity = max(1, int(chunks.sum(dim=1).max()))
    count_bytes = torch.empty((), dtype=_smallest_int(int(chunks.max()))).element_size()
    return row_words.shape[0] * (capacity * (chunk * word_bytes + start_bytes) + row_words.shape[1] * count_bytes)


# Row positions parsed at once by encode: each of _parse_by_doubling's [rows, K] int64 intermediates
# then takes at most 256 MB, its word starts up to twice that (their width doubles past the most
# words of a row, at most K); one Mixtral expert matrix is 117M positions, a layer's gate_up ~940M.
PARSE_ELEMENTS = 1 << 25


def _parse(rows: torch.Tensor, child: torch.Tensor, code_of: torch.Tensor, depth: torch.Tensor,
           pad_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (words, starts) [n, S] int64 of ternary rows [n, K] parsed greedily: word j of a row
    and the column it starts at; past a row's last word the all-zeros word and K (S: the most words
    of any row). On a GPU by doubling (_parse_by_doubling), elsewhere a word at a time: the same
    result (tested), each the faster where it runs."""
    if rows.device.type == "cuda":
        return _parse_by_doubling(rows, child, code_of, depth, pad_code)
    return _parse_word_by_word(rows, child, code_of, depth, pad_code)


def _parse_word_by_word(rows: torch.Tensor, child: torch.Tensor, code_of: torch.Tensor, depth: torch.Tensor,
                        pad_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_parse one word a step for all rows at once: S steps of MAX_WORD walks over n rows. On a GPU
    that is ~3,000 small kernels a matrix (150 s of RTN into the code for Mixtral's 32 layers on the
    H200, launch-bound); on a CPU it reads the least memory."""
    k = rows.shape[1]
    flat = torch.nn.functional.pad(rows.to(torch.int64), (0, MAX_WORD))  # zeros past the end: words may run over
    m = flat.shape[0]
    at = torch.arange(m, device=rows.device)
    pos = torch.zeros(m, dtype=torch.int64, device=rows.device)
    words, starts = [], []
    while True:
        active = pos < k
        if not bool(active.any()):
            break
        node = torch.zeros(m, dtype=torch.int64, device=rows.device)
        for i in range(MAX_WORD):
            nxt = child[node, flat[at, (pos + i).clamp(max=flat.shape[1] - 1)]]
            node = torch.where(nxt >= 0, nxt, node)
        words.append(torch.where(active, code_of[node], torch.full_like(node, pad_code)))
        starts.append(pos.clamp(max=k))
        pos = pos + torch.where(active, depth[node], torch.zeros_like(pos))
    if not words:  # rows of no columns: no words
        return (torch.zeros(m, 0, dtype=torch.int64, device=rows.device),) * 2
    return torch.stack(words, dim=1), torch.stack(starts, dim=1)


def _parse_by_doubling(rows: torch.Tensor, child: torch.Tensor, code_of: torch.Tensor, depth: torch.Tensor,
                       pad_code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_parse with few, large kernels: the greedy walk from every column at once (the word it
    would read there and the column after it), then each row's chain of starts 0 -> next -> ...
    followed by doubling, log2(S) gathers; ~avg word length times more memory read than a word
    at a time (slower on a CPU)."""
    n, k = rows.shape
    padded = torch.nn.functional.pad(rows.to(torch.int64), (0, MAX_WORD))  # zeros past the end: words may run over
    node = torch.zeros(n, k, dtype=torch.int64, device=rows.device)
    for i in range(MAX_WORD):  # the parse tree's walk from every column
        nxt = child[node, padded[:, i:i + k]]
        node = torch.where(nxt >= 0, nxt, node)
    padded = nxt = None
    code_at = code_of[node]  # [n, K] the word read from each column
    past = torch.full((n, 1), k, dtype=torch.int64, device=rows.device)
    jump = torch.cat([(torch.arange(k, device=rows.device) + depth[node]).clamp(max=k), past], dim=1)  # [n, K + 1]
    node = None
    starts = torch.zeros(n, 1, dtype=torch.int64, device=rows.device)  # starts[:, j]: word j's column
    while not bool((starts[:, -1] >= k).all()):  # jump is the walk of starts.shape[1] words
        starts = torch.cat([starts, torch.gather(jump, 1, starts)], dim=1)
        jump = torch.gather(jump, 1, jump)
    starts = starts[:, :int((starts < k).sum(dim=1).max())]
    active = starts < k
    words = torch.where(active, torch.gather(code_at, 1, starts.clamp(max=k - 1)), torch.full_like(starts, pad_code))
    return words, starts


def encode(codes: torch.Tensor, d: Dictionary, chunk: int | None = None) -> Code:
    """Returns the stored tensors (a Code, see the module docstring) of ternary codes [..., R, K].

    Rows are parsed greedily, all rows at once; `chunk` (W) defaults to the size in CHUNKS that
    stores the result in the fewest bytes. Matrices along the leading dimensions share one chunk
    capacity T (the most any of them needs)."""
    *lead, r, k = codes.shape if codes.dim() >= 2 else (0, 0)
    if r == 0 or math.prod(lead) == 0:
        raise ValueError(f"encode takes ternary codes [..., R, K] of at least one row, got shape {list(codes.shape)}")
    device = codes.device
    flat = codes.reshape(math.prod(lead) * r, k)  # [M, K]
    m = flat.shape[0]
    child, code_of, depth = d.child.to(device), d.code_of.to(device), d.depth.to(device)
    step = max(1, PARSE_ELEMENTS // (k + MAX_WORD))  # rows parsed at once: their intermediates stay bounded
    parts = [_parse(flat[i:i + step], child, code_of, depth, d.pad_code) for i in range(0, m, step)]
    most_words = max(w.shape[1] for w, _ in parts)
    word_mat = torch.cat([torch.nn.functional.pad(w, (0, most_words - w.shape[1]), value=d.pad_code) for w, _ in parts])
    start_mat = torch.cat([torch.nn.functional.pad(t, (0, most_words - t.shape[1]), value=k) for _, t in parts])
    # words up to the last one holding a nonzero symbol
    holds_nonzero = (d.table[:, 0].to(device) != 0)[word_mat] & (start_mat < k)  # [M, words]
    number = torch.arange(1, most_words + 1, device=device)
    used = (torch.where(holds_nonzero, number, torch.zeros_like(number)).amax(dim=1) if most_words
            else torch.zeros(m, dtype=torch.int64, device=device))  # [M]
    items = m // max(r, 1)  # matrices along the leading dimensions
    word_bytes, start_bytes = (1 if d.bits <= 8 else 2), (2 if k <= 32767 else 4)
    if chunk is None:  # the chunk size that stores these matrices in the fewest bytes
        chunk = min(CHUNKS, key=lambda c: _stored_bytes(used.view(items, r), c, word_bytes, start_bytes))
    row_chunks = -(-used // chunk)  # [M]
    most = int(row_chunks.max()) if m else 0  # chunks of the longest row
    word_mat = torch.nn.functional.pad(word_mat, (0, max(0, most * chunk - word_mat.shape[1])), value=d.pad_code)
    word_mat = word_mat[:, :most * chunk].reshape(m, most, chunk)  # [M, S, W] each row's chunks
    chunk_start = start_mat[:, ::chunk][:, :most]  # [M, S]: rows are at least `used` words long
    # lay the rows' chunks end to end, row after row, within each matrix
    counts = row_chunks.view(items, r)
    first = torch.cumsum(counts, dim=1) - counts  # [L, R] first chunk of each row in its matrix
    capacity = max(1, int(counts.sum(dim=1).max()) if m else 1)
    matrix = torch.arange(items, device=device).repeat_interleave(r)  # [M]
    s = torch.arange(most, device=device)
    valid = s < row_chunks[:, None]  # [M, S]
    dest = (matrix[:, None] * capacity + first.reshape(-1)[:, None] + s)[valid]
    out = torch.full((items * capacity, chunk), d.pad_code, dtype=torch.int64, device=device)
    out[dest] = word_mat[valid]
    out_starts = torch.full((items * capacity,), k, dtype=torch.int64, device=device)
    out_starts[dest] = chunk_start[valid]
    if d.bits <= 8:
        codewords = out.to(torch.uint8)
    else:
        codewords = torch.where(out >= 1 << 15, out - (1 << 16), out).to(torch.int16)
    return Code(codewords.view(*lead, capacity, chunk),
                out_starts.to(torch.int16 if k <= 32767 else torch.int32).view(*lead, capacity),
                counts.to(_smallest_int(most)).view(*lead, r),
                first[:, ::ROW_BLOCK].to(torch.int32).clone(memory_format=torch.contiguous_format)
                .view(*lead, -(-r // ROW_BLOCK)))


# Rows decoded at once by the PyTorch decode (a multiple of ROW_BLOCK): its intermediates hold
# rows x chunks x codewords x symbols int64 values; a 2048-row matrix decoded whole took ~0.9 GB of
# GPU memory (olmoe shape, H200: the offload budget's warm-up measured it), 128 rows take 1/16th.
DECODE_ROWS = 128


def row_offsets(row_chunks: torch.Tensor, block_offsets: torch.Tensor) -> torch.Tensor:
    """Returns the first chunk of each row [..., R] (int64) from a Code's row_chunks [..., R] and
    block_offsets [..., NB]: its block's first chunk plus the chunks of the rows before it there."""
    counts = row_chunks.to(torch.int64)
    before = torch.cumsum(counts, dim=-1) - counts  # [..., R] chunks of the matrix's earlier rows
    block = torch.arange(counts.shape[-1], device=counts.device) // ROW_BLOCK  # [R]
    return block_offsets.to(torch.int64)[..., block] + before - before[..., block * ROW_BLOCK]


def decode(words: torch.Tensor, starts: torch.Tensor, row_chunks: torch.Tensor, block_offsets: torch.Tensor,
           table: torch.Tensor, cols: int) -> torch.Tensor:
    """Returns the ternary codes [..., R, cols] (uint8) of a Code's tensors (see encode): each row's
    chunks gathered into [..., R, S, W] (S = the longest row's chunks), then decoded.

    The PyTorch reference (and the CPU path): one host sync per DECODE_ROWS rows. On a GPU,
    quant.ops.code_decode_triton / code_weight_triton decode without syncs or intermediates."""
    *lead, _, w = words.shape  # [..., T, W]
    r = row_chunks.shape[-1]
    if r > DECODE_ROWS:  # bounded workspace: [R, S, W, L] int64 intermediates, a block of rows at a time
        blocks = []
        for a in range(0, r, DECODE_ROWS):
            b = min(a + DECODE_ROWS, r)
            blocks.append(decode(words, starts, row_chunks[..., a:b],
                                 block_offsets[..., a // ROW_BLOCK:-(-b // ROW_BLOCK)], table, cols))
        return torch.cat(blocks, dim=-2)
    counts = row_chunks.to(torch.int64)
    most = int(counts.max()) if counts.numel() else 0
    if most == 0:
        return torch.zeros(*lead, r, cols, dtype=torch.uint8, device=words.device)
    s = torch.arange(most, device=words.device)
    valid = s < counts[..., None]  # [..., R, S]
    index = torch.where(valid, row_offsets(row_chunks, block_offsets)[..., None] + s, 0).reshape(*lead, r * most)
    row_words = words.gather(-2, index[..., None].expand(*lead, r * most, w)).view(*lead, r, most, w)
    row_starts = torch.where(valid, starts.to(torch.int64).gather(-1, index).view(*lead, r, most), cols)
    return _decode_chunks(row_words, row_starts, table, cols)


def _decode_chunks(words: torch.Tensor, starts: torch.Tensor, table: torch.Tensor, cols: int) -> torch.Tensor:
    """Returns the ternary codes [..., cols] (uint8) of chunks words [..., S, W] starting at columns
    starts [..., S] (a chunk starting at `cols` decodes to nothing)."""
    lead = words.shape[:-2]  # [..., S, W]
    idx = words.to(torch.int64) & 0xFFFF
    entries = table.to(words.device, torch.int64)[idx] & 0xFFFFFFFF  # [..., S, W, 2]
    lengths = (entries[..., 1] >> LENGTH_SHIFT) & 31  # [..., S, W]
    at_word = starts.to(torch.int64)[..., None] + torch.cumsum(lengths, dim=-1) - lengths
    i = torch.arange(MAX_WORD, device=words.device)
    nz = (entries[..., 0:1] >> i) & 1  # [..., S, W, L]
    hi = (entries[..., 1:2] >> i) & 1
    sym = torch.where(nz == 1, torch.where(hi == 1, HI, LO), ZERO)
    at = at_word[..., None] + i  # [..., S, W, L] column of each symbol
    dump = cols  # one extra column takes every symbol past the row's end
    at = torch.where((i < lengths[..., None]) & (at < cols), at, torch.full_like(at, dump))
    dense = torch.zeros(*lead, cols + 1, dtype=torch.int64, device=words.device)
    dense.scatter_(-1, at.reshape(*lead, -1), sym.reshape(*lead, -1))
    return dense[..., :cols].to(torch.uint8)


def code_bits(code: Code, cols: int) -> float:
    """Returns the stored bits per coded parameter of a Code of rows `cols` long."""
    params = code.row_chunks.numel() * cols
    return 8 * code.nbytes() / max(params, 1)
