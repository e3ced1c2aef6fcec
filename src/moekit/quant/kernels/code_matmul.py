"""Decode + matmul for ternary experts in the sub-1-bit code (quant.code), in one pass.

Tensors (B = tokens, K = columns, R = rows, T = chunk capacity, W = codewords per chunk,
NB = ceil(R / ROW_BLOCK) row blocks; quant.code describes the layout):
    xt             [K, B]     activations, token dim contiguous (x transposed: one nonzero weight
                              reads its column of x for all tokens in one vector load)
    words          [T, W]     uint8, or int16 holding uint16 codewords; row after row, each row's
                              chunks contiguous
    starts         [T]        int16 / int32: the column where each chunk's first word begins
    row_chunks     [R]        uint8 / int16 / int32: chunks of each row
    block_offsets  [NB]       int32: the first chunk of each block of ROW_BLOCK rows
    lo, hi         [R]        float16 levels of the row's LO and HI symbols
    table          [2^bits]   int64: the int32 table [2^bits, 2] seen as one entry per codeword,
                              low half the nonzero bits, high half the HI bits | length << 27
    out            [B, R]     x's dtype

Why the first version was slow (H200, 14336x4096: 362 us at batch 1, 19.7 ms at batch 64):
  * each program walked its chunk one codeword at a time (W dependent steps of a table lookup
    and a 2-D gather), with two scalar table loads per word;
  * every word was expanded to 32 symbol lanes, ~3.4x the ~9 symbols a word holds on average
    and ~40x its ~0.7 nonzeros, and each lane gathered x for every token: [BLOCK_R, 32, B] loads
    from x [B, K] strided by K per token, so the work grew linearly with the batch;
  * one float32 partial per chunk [S, B, R] went through memory and a second kernel summed it.

Now: program r owns BLOCK_R rows (any power of two: rows find their first chunk from their
block's offset and the chunk counts of the rows before them in the block) and walks their
chunks CHUNKS_PER_STEP at a time, up to the most chunks of any of its rows (a bound read from
memory: rows keep their own lengths, format version 2); a row's chunks past its own count are
masked. A step loads [BLOCK_R, CHUNKS_PER_STEP, WP] codewords at once, looks each up in the
table with one 8-byte load, places every word by a cumsum of lengths inside its chunk (decoded
once, for all tokens), then visits only the nonzero symbols: each round pops the lowest set bit
of every word's nonzero mask and adds the x column under it ([B] contiguous values of xt) to the
row's HI or total sum; rounds stop when no word of the step has a nonzero left (about the most
nonzeros of one word, 2-4 for GPTQ'd experts). A row's output is
hi * sum_HI + lo * (sum_all - sum_HI). The code has no dense layout in registers (Triton has no
scatter into registers), so the cost is per nonzero weight per token, not per weight:
decode-bound at batch 1, and gather-bound (nonzeros x B x 2 bytes of xt from L1/L2) at large batch.

Four paths, chosen by constexprs (ops picks them):
  * PACKED (8-bit codewords, 4-byte aligned, W a multiple of 4; every tuned shape): each
    [BLOCK_R, CHUNKS_PER_STEP, W / 4] lane reads four consecutive codewords as one int32 and keeps
    them as four separate tensors, so the table gathers need no round trip through shared memory
    (the byte-wise tile needs one per step) and a word's column is its lane's base (one scan of four-word lengths per lane) plus the lengths before it
    in the lane; each lane keeps its own partial sums x * level (reduced once, at the end, with
    one FMA per nonzero); a step's round count is the most set bits of its words (one popcount per
    word, HW_POPC: the GPU's instruction, else bit arithmetic under the interpreter, and one
    reduction per step); the next step's codewords and chunk starts are loaded before this step's
    rounds. At batch 1 this cut a step of 128 codewords (two rounds) from 329 to 229 SASS
    instructions (benchmarks/sass_code_kernel.py) and mixtral gate/up from 24.0 to 18.9 us on the
    H200 (bf16 40.7 us); BLOCK_B > 1 keeps [BLOCK_B] partial sums per lane.
  * byte-wise at batch 1 (16-bit codewords, unaligned bytes): the same per-word sums, popcount
    and loads one step ahead, over the [BLOCK_R, CHUNKS_PER_STEP, WP] tile above.
  * byte-wise at BLOCK_B > 1: the description above, two block reductions per round.

The chunk loop is a `while` over a loaded bound, not `range`: Triton 3.6's interpreter cannot
turn a loaded scalar into a range bound (the CPU tests run there); both compile to one loop.

Per-slot variant (decode: a few routed (token, expert) slots in one launch, no host sync), with
S = slots, A = experts per token, E = experts (or cache slots) of one layer, stacked:
    x        [N, K]            token activations (gate_up) or [S, K] slot activations (down)
    ids      [S]               int64: the expert (stacked index) of each slot, read on the device
    weights  [S]               routing weight of each slot (WEIGHTED)
    words    [E, T, W]         starts [E, T], row_chunks [E, R], block_offsets [E, NB], lo, hi [E, R]
                               (any expert stride: cache slabs too)
    table    [2^bits]          the layer's table, shared by its experts
    out      [S, R_out]        SWIGLU: R_out = R / 2, out = silu(x W[:R/2]^T) * (x W[R/2:]^T);
                               else R_out = R, out = weights[s] * x W^T (WEIGHTED)
Program (s, r) decodes rows r*BLOCK_R.. of expert ids[s] with code_rows_dot at batch 1 (x's row
of token s // TOP_K plays xt [K, 1]).

Down with the top-k sum (code_slot_down_kernel, N = S / A tokens):
    h        [S, K]            slot activations silu(gate) * up
    out      [N, R]            out[t] = sum_a weights[s] * h[s] W_{ids[s]}^T, s = t*A + a
Program (t, r) decodes rows r*BLOCK_R.. of token t's A experts one after another (a loop, not
unrolled: each slot's chunk loops are whole loops of their own), each weighted and added to one
float32 sum in the order a = 0..A-1, stored once: no torch reduce after the kernel, and a row's
sum depends neither on BLOCK_R nor on the other tokens.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _popcount(v):
    """Returns the set bits of each int32 in v (0 <= v < 2^31), by halves, nibbles and bytes."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    v = v + (v >> 8)
    v = v + (v >> 16)
    return v & 0x3F


@triton.jit
def _row_spans(chunks_ptr, offsets_ptr, rows, R, ROW_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    """Returns (first chunk, chunk count) of each row [BR]: its block's offset + the chunks of the
    block's rows before it (rows >= R have no chunks)."""
    row_ok = rows < R
    block = rows // ROW_BLOCK  # [BR]
    before = (block * ROW_BLOCK)[:, None] + tl.arange(0, ROW_BLOCK)[None, :]  # [BR, RB]
    prior = tl.load(chunks_ptr + before, mask=before < tl.minimum(rows, R)[:, None], other=0).to(tl.int32)
    first = tl.load(offsets_ptr + block, mask=row_ok, other=0) + tl.sum(prior, axis=1)  # [BR]
    count = tl.load(chunks_ptr + rows, mask=row_ok, other=0).to(tl.int32)  # [BR]
    return first, count


@triton.jit
def _step_codes(words_ptr, first, count, s0, W: tl.constexpr, WP: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr):
    """Returns the codewords [BR, C, WP] of chunks s0.. of each row (0 past a row's chunks)."""
    chunk = s0 + tl.arange(0, CHUNKS_PER_STEP)  # [C]
    js = tl.arange(0, WP)
    at_chunk = first[:, None] + chunk[None, :]  # [BR, C]
    w_mask = (chunk[None, :] < count[:, None])[:, :, None] & (js < W)[None, None, :]
    return tl.load(words_ptr + at_chunk[:, :, None] * W + js[None, None, :], mask=w_mask, other=0).to(tl.int32) & 0xFFFF


@triton.jit
def _step_entries(table_ptr, code, count, s0, W: tl.constexpr, WP: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr):
    """Returns the table entries [BR, C, WP] int64 of the codewords of chunks s0.. (0 past a row's chunks)."""
    chunk = s0 + tl.arange(0, CHUNKS_PER_STEP)
    w_mask = (chunk[None, :] < count[:, None])[:, :, None] & (tl.arange(0, WP) < W)[None, None, :]
    return tl.load(table_ptr + code, mask=w_mask, other=0)


@triton.jit
def _rows_dot_one(xt_ptr, words_ptr, starts_ptr, table_ptr, first, count, lo, hi, K, stride_xk,
                  W: tl.constexpr, WP: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr, BLOCK_R: tl.constexpr,
                  HW_POPC: tl.constexpr):
    """Batch 1: returns x . W[rows]^T as float32 [BR].

    Unlike the batch path: each word keeps its own partial sum, x times its symbol's level (reduced
    once, at the end, not twice per round); a step's round count is the most nonzeros of one of its
    words (a popcount per word and one reduction per step, not one per round); and loads run ahead:
    a step's table entries are gathered one step early, its codewords two steps early, so that
    their latency hides behind the rounds of the steps before."""
    cs = tl.arange(0, CHUNKS_PER_STEP)  # [C]
    NW: tl.constexpr = CHUNKS_PER_STEP * WP
    most = tl.max(count, axis=0)
    lo_r = lo[:, None]
    hi_r = hi[:, None]
    acc = tl.zeros((BLOCK_R, NW), dtype=tl.float32)
    entry = _step_entries(table_ptr, _step_codes(words_ptr, first, count, 0, W, WP, CHUNKS_PER_STEP), count, 0,
                          W, WP, CHUNKS_PER_STEP)
    code = _step_codes(words_ptr, first, count, CHUNKS_PER_STEP, W, WP, CHUNKS_PER_STEP)
    s0 = 0
    while s0 < most:
        chunk = s0 + cs
        chunk_ok = chunk[None, :] < count[:, None]  # [BR, C]
        start = tl.load(starts_ptr + first[:, None] + chunk[None, :], mask=chunk_ok, other=0)
        cur = entry
        entry = _step_entries(table_ptr, code, count, s0 + CHUNKS_PER_STEP, W, WP, CHUNKS_PER_STEP)
        code = _step_codes(words_ptr, first, count, s0 + 2 * CHUNKS_PER_STEP, W, WP, CHUNKS_PER_STEP)
        hi_len = (cur >> 32).to(tl.int32)  # HI bits | length << 27
        length = (hi_len >> 27) & 31
        at = tl.reshape(start.to(tl.int32)[:, :, None] + tl.cumsum(length, axis=2) - length, (BLOCK_R, NW))
        nz = tl.reshape(cur.to(tl.int32), (BLOCK_R, NW))  # nonzero symbol bits (bits 0..26)
        hi_bits = tl.reshape(hi_len, (BLOCK_R, NW))
        if HW_POPC:
            rounds = tl.max(libdevice.popc(nz))
        else:
            rounds = tl.max(_popcount(nz))
        while rounds > 0:
            low = nz & -nz  # lowest nonzero symbol of each word, as a bit
            pos = (low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127  # its index
            col = at + pos
            xv = tl.load(xt_ptr + col * stride_xk, mask=(low != 0) & (col < K), other=0.0).to(tl.float32)
            acc += xv * tl.where((hi_bits & low) != 0, hi_r, lo_r)
            nz = nz ^ low
            rounds -= 1
        s0 += CHUNKS_PER_STEP
    return tl.sum(acc, axis=1)


@triton.jit
def _packed_step(packed_ptr, starts_ptr, first, count, s0, G: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr):
    """Returns (codewords four to an int32 [BR, C, G], chunk starts [BR, C] int32) of chunks s0.. of
    each row (0 past a row's chunks)."""
    chunk = s0 + tl.arange(0, CHUNKS_PER_STEP)
    gs = tl.arange(0, G)
    chunk_ok = chunk[None, :] < count[:, None]  # [BR, C]
    at_chunk = first[:, None] + chunk[None, :]
    ok = chunk_ok[:, :, None] & (gs < G)[None, None, :]
    four = tl.load(packed_ptr + at_chunk[:, :, None] * G + gs[None, None, :], mask=ok, other=0)
    start = tl.load(starts_ptr + at_chunk, mask=chunk_ok, other=0).to(tl.int32)
    return four, start


@triton.jit
def _packed_decode(table_ptr, four, start, ok, HW_POPC: tl.constexpr):
    """Decodes one step of four-codeword lanes four [BR, C, G] (chunks starting at columns start
    [BR, C], lanes outside ok hold nothing). Returns, per word i of a lane, its first column a_i,
    nonzero symbol bits n_i (bits 0..26) and HI bits | length << 27 h_i ([BR, C, G] int32 each),
    then the step's round count: the most nonzeros of one word."""
    e0 = tl.load(table_ptr + (four & 0xFF), mask=ok, other=0)
    e1 = tl.load(table_ptr + ((four >> 8) & 0xFF), mask=ok, other=0)
    e2 = tl.load(table_ptr + ((four >> 16) & 0xFF), mask=ok, other=0)
    e3 = tl.load(table_ptr + ((four >> 24) & 0xFF), mask=ok, other=0)
    h0 = (e0 >> 32).to(tl.int32)
    h1 = (e1 >> 32).to(tl.int32)
    h2 = (e2 >> 32).to(tl.int32)
    h3 = (e3 >> 32).to(tl.int32)
    l0 = (h0 >> 27) & 31
    l1 = (h1 >> 27) & 31
    l2 = (h2 >> 27) & 31
    span = l0 + l1 + l2 + ((h3 >> 27) & 31)
    a0 = start[:, :, None] + tl.cumsum(span, axis=2) - span  # column of each lane's first word
    a1 = a0 + l0
    a2 = a1 + l1
    a3 = a2 + l2
    n0 = e0.to(tl.int32)
    n1 = e1.to(tl.int32)
    n2 = e2.to(tl.int32)
    n3 = e3.to(tl.int32)
    if HW_POPC:
        most_nz = tl.maximum(tl.maximum(libdevice.popc(n0), libdevice.popc(n1)),
                             tl.maximum(libdevice.popc(n2), libdevice.popc(n3)))
    else:
        most_nz = tl.maximum(tl.maximum(_popcount(n0), _popcount(n1)), tl.maximum(_popcount(n2), _popcount(n3)))
    return a0, a1, a2, a3, n0, n1, n2, n3, h0, h1, h2, h3, tl.max(most_nz)


@triton.jit
def _rows_dot_packed(xt_ptr, words_ptr, starts_ptr, table_ptr, first, count, lo, hi, K, stride_xk,
                     W: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr, BLOCK_R: tl.constexpr, HW_POPC: tl.constexpr):
    """Batch 1, 8-bit codewords read four to an int32 (words 4-byte aligned, W a multiple of 4):
    returns x . W[rows]^T as float32 [BR].

    Each [BR, C, G] lane holds four consecutive codewords of one chunk as separate tensors (the
    table gathers take them without a shared-memory round trip), so a word's column is its
    lane's base (one scan of four-word lengths per lane) plus the lengths of the words before it
    in the lane. A step's codewords and chunk starts are loaded one step early."""
    G: tl.constexpr = W // 4  # int32 per chunk
    cs = tl.arange(0, CHUNKS_PER_STEP)  # [C]
    gs = tl.arange(0, G)  # [G]
    packed_ptr = words_ptr.to(tl.pointer_type(tl.int32))
    most = tl.max(count, axis=0)
    lo_r = lo[:, None, None]
    hi_r = hi[:, None, None]
    acc = tl.zeros((BLOCK_R, CHUNKS_PER_STEP, G), dtype=tl.float32)
    four_next, start_next = _packed_step(packed_ptr, starts_ptr, first, count, 0, G, CHUNKS_PER_STEP)
    s0 = 0
    while s0 < most:
        chunk = s0 + cs
        ok = (chunk[None, :] < count[:, None])[:, :, None] & (gs < G)[None, None, :]  # [BR, C, G]
        four = four_next
        start = start_next
        # the next step's codewords and starts: in flight while this step decodes
        four_next, start_next = _packed_step(packed_ptr, starts_ptr, first, count, s0 + CHUNKS_PER_STEP, G,
                                             CHUNKS_PER_STEP)
        a0, a1, a2, a3, n0, n1, n2, n3, h0, h1, h2, h3, rounds = _packed_decode(table_ptr, four, start, ok, HW_POPC)
        while rounds > 0:
            b0 = n0 & -n0  # lowest nonzero symbol of each word, as a bit
            b1 = n1 & -n1
            b2 = n2 & -n2
            b3 = n3 & -n3
            c0 = a0 + (b0.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127  # its column
            c1 = a1 + (b1.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
            c2 = a2 + (b2.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
            c3 = a3 + (b3.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
            x0 = tl.load(xt_ptr + c0 * stride_xk, mask=(b0 != 0) & (c0 < K), other=0.0).to(tl.float32)
            x1 = tl.load(xt_ptr + c1 * stride_xk, mask=(b1 != 0) & (c1 < K), other=0.0).to(tl.float32)
            x2 = tl.load(xt_ptr + c2 * stride_xk, mask=(b2 != 0) & (c2 < K), other=0.0).to(tl.float32)
            x3 = tl.load(xt_ptr + c3 * stride_xk, mask=(b3 != 0) & (c3 < K), other=0.0).to(tl.float32)
            acc += x0 * tl.where((h0 & b0) != 0, hi_r, lo_r)
            acc += x1 * tl.where((h1 & b1) != 0, hi_r, lo_r)
            acc += x2 * tl.where((h2 & b2) != 0, hi_r, lo_r)
            acc += x3 * tl.where((h3 & b3) != 0, hi_r, lo_r)
            n0 = n0 ^ b0
            n1 = n1 ^ b1
            n2 = n2 ^ b2
            n3 = n3 ^ b3
            rounds -= 1
        s0 += CHUNKS_PER_STEP
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _rows_dot_packed_batch(xt_ptr, words_ptr, starts_ptr, table_ptr, first, count, lo, hi, B, K, stride_xk,
                           W: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_B: tl.constexpr, HW_POPC: tl.constexpr):
    """_rows_dot_packed for BLOCK_B > 1 tokens: each nonzero reads its column of xt for all tokens
    ([BB] contiguous values) and every lane keeps [BB] partial sums. Returns [BR, BB] float32."""
    G: tl.constexpr = W // 4
    cs = tl.arange(0, CHUNKS_PER_STEP)
    gs = tl.arange(0, G)
    bs = tl.arange(0, BLOCK_B)
    b_ok = (bs < B)[None, None, None, :]
    bcol = bs[None, None, None, :]
    packed_ptr = words_ptr.to(tl.pointer_type(tl.int32))
    most = tl.max(count, axis=0)
    lo_r = lo[:, None, None, None]
    hi_r = hi[:, None, None, None]
    acc = tl.zeros((BLOCK_R, CHUNKS_PER_STEP, G, BLOCK_B), dtype=tl.float32)
    four_next, start_next = _packed_step(packed_ptr, starts_ptr, first, count, 0, G, CHUNKS_PER_STEP)
    s0 = 0
    while s0 < most:
        chunk = s0 + cs
        ok = (chunk[None, :] < count[:, None])[:, :, None] & (gs < G)[None, None, :]  # [BR, C, G]
        four = four_next
        start = start_next
        four_next, start_next = _packed_step(packed_ptr, starts_ptr, first, count, s0 + CHUNKS_PER_STEP, G,
                                             CHUNKS_PER_STEP)
        a0, a1, a2, a3, n0, n1, n2, n3, h0, h1, h2, h3, rounds = _packed_decode(table_ptr, four, start, ok, HW_POPC)
        while rounds > 0:
            b0 = n0 & -n0
            b1 = n1 & -n1
            b2 = n2 & -n2
            b3 = n3 & -n3
            c0 = a0 + (b0.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
            c1 = a1 + (b1.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
            c2 = a2 + (b2.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
            c3 = a3 + (b3.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127
            x0 = tl.load(xt_ptr + c0[:, :, :, None] * stride_xk + bcol,
                         mask=((b0 != 0) & (c0 < K))[:, :, :, None] & b_ok, other=0.0).to(tl.float32)
            x1 = tl.load(xt_ptr + c1[:, :, :, None] * stride_xk + bcol,
                         mask=((b1 != 0) & (c1 < K))[:, :, :, None] & b_ok, other=0.0).to(tl.float32)
            x2 = tl.load(xt_ptr + c2[:, :, :, None] * stride_xk + bcol,
                         mask=((b2 != 0) & (c2 < K))[:, :, :, None] & b_ok, other=0.0).to(tl.float32)
            x3 = tl.load(xt_ptr + c3[:, :, :, None] * stride_xk + bcol,
                         mask=((b3 != 0) & (c3 < K))[:, :, :, None] & b_ok, other=0.0).to(tl.float32)
            acc += x0 * tl.where(((h0 & b0) != 0)[:, :, :, None], hi_r, lo_r)
            acc += x1 * tl.where(((h1 & b1) != 0)[:, :, :, None], hi_r, lo_r)
            acc += x2 * tl.where(((h2 & b2) != 0)[:, :, :, None], hi_r, lo_r)
            acc += x3 * tl.where(((h3 & b3) != 0)[:, :, :, None], hi_r, lo_r)
            n0 = n0 ^ b0
            n1 = n1 ^ b1
            n2 = n2 ^ b2
            n3 = n3 ^ b3
            rounds -= 1
        s0 += CHUNKS_PER_STEP
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def code_rows_dot(
    xt_ptr, words_ptr, starts_ptr, chunks_ptr, offsets_ptr, lo_ptr, hi_ptr, table_ptr, rows,
    B, R, K,
    stride_xk,
    W: tl.constexpr, WP: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr, ROW_BLOCK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, HW_POPC: tl.constexpr, PACKED: tl.constexpr,
):
    """Returns x . W[rows]^T as float32 [BLOCK_R, BLOCK_B] for rows [BLOCK_R] (rows >= R count 0)."""
    row_ok = rows < R
    first, count = _row_spans(chunks_ptr, offsets_ptr, rows, R, ROW_BLOCK, BLOCK_R)
    lo = tl.load(lo_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    hi = tl.load(hi_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if BLOCK_B == 1 and PACKED:
        return _rows_dot_packed(xt_ptr, words_ptr, starts_ptr, table_ptr, first, count, lo, hi, K, stride_xk,
                                W, CHUNKS_PER_STEP, BLOCK_R, HW_POPC)[:, None]
    elif PACKED:
        return _rows_dot_packed_batch(xt_ptr, words_ptr, starts_ptr, table_ptr, first, count, lo, hi, B, K,
                                      stride_xk, W, CHUNKS_PER_STEP, BLOCK_R, BLOCK_B, HW_POPC)
    elif BLOCK_B == 1:
        return _rows_dot_one(xt_ptr, words_ptr, starts_ptr, table_ptr, first, count, lo, hi, K, stride_xk,
                             W, WP, CHUNKS_PER_STEP, BLOCK_R, HW_POPC)[:, None]
    else:
        cs = tl.arange(0, CHUNKS_PER_STEP)  # [C]
        js = tl.arange(0, WP)  # [WP]
        bs = tl.arange(0, BLOCK_B)  # [BB]
        b_ok = bs < B
        NW: tl.constexpr = CHUNKS_PER_STEP * WP  # words per row per step
        most = tl.max(count, axis=0)
        acc_all = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
        acc_hi = tl.zeros((BLOCK_R, BLOCK_B), dtype=tl.float32)
        s0 = 0
        while s0 < most:
            chunk = s0 + cs  # [C] chunk of each row
            chunk_ok = chunk[None, :] < count[:, None]  # [BR, C]
            at_chunk = first[:, None] + chunk[None, :]  # [BR, C] chunk index in the matrix
            start = tl.load(starts_ptr + at_chunk, mask=chunk_ok, other=0)
            w_mask = chunk_ok[:, :, None] & (js < W)[None, None, :]  # [BR, C, WP]
            code = tl.load(words_ptr + at_chunk[:, :, None] * W + js[None, None, :], mask=w_mask,
                           other=0).to(tl.int32) & 0xFFFF
            entry = tl.load(table_ptr + code, mask=w_mask, other=0)  # [BR, C, WP] int64
            nz = entry.to(tl.int32)  # low half: nonzero symbol bits (bits 0..26)
            hi_len = (entry >> 32).to(tl.int32)  # HI bits | length << 27
            length = (hi_len >> 27) & 31
            at = start.to(tl.int32)[:, :, None] + tl.cumsum(length, axis=2) - length  # column of each word
            nz = tl.reshape(nz, (BLOCK_R, NW))
            hi_bits = tl.reshape(hi_len, (BLOCK_R, NW))
            at = tl.reshape(at, (BLOCK_R, NW))
            while tl.max(nz) > 0:
                low = nz & -nz  # lowest nonzero symbol of each word, as a bit
                pos = (low.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127  # its index
                col = at + pos  # [BR, NW]
                live = (low != 0) & (col < K)
                xv = tl.load(xt_ptr + col[:, :, None] * stride_xk + bs[None, None, :],
                             mask=live[:, :, None] & b_ok[None, None, :], other=0.0).to(tl.float32)  # [BR, NW, BB]
                is_hi = (hi_bits & low) != 0
                acc_all += tl.sum(xv, axis=1)
                acc_hi += tl.sum(tl.where(is_hi[:, :, None], xv, 0.0), axis=1)
                nz = nz ^ low
            s0 += CHUNKS_PER_STEP
        return hi[:, None] * acc_hi + lo[:, None] * (acc_all - acc_hi)  # [BR, BB]


@triton.jit
def code_matmul_kernel(
    xt_ptr, words_ptr, starts_ptr, chunks_ptr, offsets_ptr, lo_ptr, hi_ptr, table_ptr, out_ptr,
    B, R, K,
    stride_xk, stride_ob,
    W: tl.constexpr, WP: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr, ROW_BLOCK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, HW_POPC: tl.constexpr, PACKED: tl.constexpr,
):
    """out[:, rows] = x . W[rows]^T for one block of BLOCK_R rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    out = code_rows_dot(xt_ptr, words_ptr, starts_ptr, chunks_ptr, offsets_ptr, lo_ptr, hi_ptr, table_ptr, rows,
                        B, R, K, stride_xk, W, WP, CHUNKS_PER_STEP, ROW_BLOCK, BLOCK_B, BLOCK_R, HW_POPC, PACKED)
    bs = tl.arange(0, BLOCK_B)
    tl.store(out_ptr + bs[None, :] * stride_ob + rows[:, None], out.to(out_ptr.dtype.element_ty),
             mask=(rows < R)[:, None] & (bs < B)[None, :])


@triton.jit
def code_slot_kernel(
    x_ptr, ids_ptr, weights_ptr, words_ptr, starts_ptr, chunks_ptr, offsets_ptr, lo_ptr, hi_ptr, table_ptr, out_ptr,
    R_OUT, K,
    stride_xn, stride_we, stride_se, stride_ce, stride_oe, stride_le, stride_he, stride_os,
    TOP_K: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr,
    ROW_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, SWIGLU: tl.constexpr, WEIGHTED: tl.constexpr,
    HW_POPC: tl.constexpr, PACKED: tl.constexpr,
):
    """out[s, rows] for one slot s and one block of BLOCK_R output rows (see the module docstring)."""
    s = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    e = tl.load(ids_ptr + s).to(tl.int64)  # int64: a cache slab's slots may span > 2^31 bytes
    x_row = x_ptr + (s // TOP_K) * stride_xn  # one token: xt [K, 1] with unit column stride
    words_e, starts_e = words_ptr + e * stride_we, starts_ptr + e * stride_se
    chunks_e, offsets_e = chunks_ptr + e * stride_ce, offsets_ptr + e * stride_oe
    lo_e, hi_e = lo_ptr + e * stride_le, hi_ptr + e * stride_he
    acc = code_rows_dot(x_row, words_e, starts_e, chunks_e, offsets_e, lo_e, hi_e, table_ptr, rows, 1, R_OUT, K, 1,
                        W, WP, CHUNKS_PER_STEP, ROW_BLOCK, 1, BLOCK_R, HW_POPC, PACKED)  # [BR, 1]
    if SWIGLU:  # acc holds the gate rows; the up rows are R_OUT further
        up = code_rows_dot(x_row, words_e, starts_e, chunks_e, offsets_e, lo_e, hi_e, table_ptr, rows + R_OUT, 1,
                           2 * R_OUT, K, 1, W, WP, CHUNKS_PER_STEP, ROW_BLOCK, 1, BLOCK_R, HW_POPC, PACKED)
        acc = acc * tl.sigmoid(acc) * up
    if WEIGHTED:
        acc = acc * tl.load(weights_ptr + s).to(tl.float32)
    tl.store(out_ptr + s * stride_os + rows[:, None], acc.to(out_ptr.dtype.element_ty), mask=(rows < R_OUT)[:, None])


@triton.jit
def code_slot_down_kernel(
    h_ptr, ids_ptr, weights_ptr, words_ptr, starts_ptr, chunks_ptr, offsets_ptr, lo_ptr, hi_ptr, table_ptr, out_ptr,
    R, K,
    stride_hs, stride_we, stride_se, stride_ce, stride_oe, stride_le, stride_he, stride_on,
    TOP_K: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, CHUNKS_PER_STEP: tl.constexpr,
    ROW_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, HW_POPC: tl.constexpr, PACKED: tl.constexpr,
):
    """out[t, rows] = sum_a weights[s] * h[s] . W_{ids[s]}[rows]^T over token t's slots s = t*A + a,
    added in float32 in the order a = 0..A-1 (see the module docstring)."""
    t = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    acc = tl.zeros((BLOCK_R, 1), dtype=tl.float32)
    for a in range(TOP_K):
        s = t * TOP_K + a
        e = tl.load(ids_ptr + s).to(tl.int64)  # int64: a cache slab's slots may span > 2^31 bytes
        weight = tl.load(weights_ptr + s).to(tl.float32)
        part = code_rows_dot(h_ptr + s * stride_hs, words_ptr + e * stride_we, starts_ptr + e * stride_se,
                             chunks_ptr + e * stride_ce, offsets_ptr + e * stride_oe, lo_ptr + e * stride_le,
                             hi_ptr + e * stride_he, table_ptr, rows, 1, R, K, 1,
                             W, WP, CHUNKS_PER_STEP, ROW_BLOCK, 1, BLOCK_R, HW_POPC, PACKED)  # [BR, 1]
        acc += part * weight
    tl.store(out_ptr + t * stride_on + rows[:, None], acc.to(out_ptr.dtype.element_ty), mask=(rows < R)[:, None])
