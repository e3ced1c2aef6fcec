"""The sub-1-bit code for ternary experts: fixed-width codewords for variable-length runs of
ternary symbols, with a dictionary built from the weights' own symbol statistics.

The dictionary is a Tunstall code: start from the three one-symbol words and keep splitting
the most probable word w into w0, w1, w2 until 2^B words exist (words stop growing at
MAX_WORD symbols). Every ternary string parses greedily into dictionary words, and each word
is stored as its B-bit index. Zeros dominate the ternary stream of GPTQ'd experts (QMoE saw
p(0) = 0.885), so words are long and a B-bit codeword stands for many weights.

For parallel decoding each row is parsed as one stream and its codewords are cut into chunks
of W codewords (W from CHUNKS, chosen per matrix); the column where each chunk starts is stored ([..., S] int16, or int32
for rows longer than 32767), so a kernel can decode every chunk of every row independently.
Rows are padded to the same number of chunks S with the all-zeros word (which decodes to
nothing that counts). A row's last word may run past its end; the parser pads rows with
zeros, so those symbols are zeros and decoding masks them.

Dictionary entry (the decode table, int32 [2^B, 2]):
    table[c, 0]  bit i (i < MAX_WORD) set when symbol i of word c is nonzero
    table[c, 1]  bit i set when symbol i is HI (else LO); bits 27..31 hold the word's length

Shape legend:
    M = rows to code (E * R), K = columns, S = chunks per row (padded to the longest row),
    W = CHUNK codewords per chunk, L = MAX_WORD
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from .grids import HI, LO, ZERO

MAX_WORD = 27  # symbols per word: 27 bits of each table word, 5 bits for the length
CHUNKS = (4, 8, 16, 32, 64)  # codewords per independently decodable chunk: encode picks one
CHUNK = 32  # the typical choice, used for size estimates
LENGTH_SHIFT = 27
CODEWORD_BITS = (8, 16)  # stored as uint8 / int16: the widths that waste no storage bits


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


def encode(codes: torch.Tensor, d: Dictionary, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (codewords [..., S, W], chunk starts [..., S]) of ternary codes [..., K].

    Codewords are uint8 for 8-bit dictionaries, else int16 holding the uint16 value; starts are
    int16 (int32 when K > 32767), K for chunks past a row's end. Rows are parsed greedily,
    all rows at once; `chunk` (W) defaults to the size in CHUNKS that stores the result smallest."""
    *lead, k = codes.shape
    device = codes.device
    flat = codes.reshape(-1, k).to(torch.int64)
    flat = torch.nn.functional.pad(flat, (0, MAX_WORD))  # zeros past the end: words may run over
    child, code_of, depth = d.child.to(device), d.code_of.to(device), d.depth.to(device)
    n = flat.shape[0]
    rows = torch.arange(n, device=device)
    pos = torch.zeros(n, dtype=torch.int64, device=device)
    words: list[torch.Tensor] = []
    starts: list[torch.Tensor] = []
    while True:
        active = pos < k
        if not bool(active.any()):
            break
        node = torch.zeros(n, dtype=torch.int64, device=device)
        for i in range(MAX_WORD):
            nxt = child[node, flat[rows, (pos + i).clamp(max=flat.shape[1] - 1)]]
            node = torch.where(nxt >= 0, nxt, node)
        starts.append(pos.clamp(max=k))
        words.append(torch.where(active, code_of[node], torch.full_like(node, d.pad_code)))
        pos = pos + torch.where(active, depth[node], torch.zeros_like(pos))
    if not words:  # K = 0
        words, starts = [torch.full_like(pos, d.pad_code)], [pos]
    per_row = len(words)
    if chunk is None:  # the chunk size that stores this matrix in the fewest bytes
        word_bytes, start_bytes = (1 if d.bits <= 8 else 2), (2 if k <= 32767 else 4)
        chunk = min(CHUNKS, key=lambda c: -(-per_row // c) * (c * word_bytes + start_bytes))
    s = -(-per_row // chunk)
    for _ in range(s * chunk - per_row):
        words.append(torch.full_like(pos, d.pad_code))
        starts.append(torch.full_like(pos, k))
    out = torch.stack(words, dim=1).view(*lead, s, chunk)
    chunk_starts = torch.stack(starts[::chunk], dim=1).view(*lead, s)
    chunk_starts = chunk_starts.to(torch.int16 if k <= 32767 else torch.int32)
    if d.bits <= 8:
        return out.to(torch.uint8), chunk_starts
    return torch.where(out >= 1 << 15, out - (1 << 16), out).to(torch.int16), chunk_starts


def decode(words: torch.Tensor, starts: torch.Tensor, table: torch.Tensor, cols: int) -> torch.Tensor:
    """Returns the ternary codes [..., cols] (uint8) of codewords [..., S, W] with chunk starts
    [..., S] (see encode)."""
    *lead, s, w = words.shape
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


def code_bits(words: torch.Tensor, d_bits: int) -> int:
    """Returns the stored bits of codewords (their storage width, not d_bits, counts)."""
    return words.numel() * words.element_size() * 8
