"""Wrappers of the gpt-oss expert kernels (moekit.kernels.clamped_experts) for MXFP4 and dense stacks.

`clamped_expert_ffn` picks the per-slot kernels for a few slots (decode) and the grouped ones
above (larger batches, prefill); both read each weight in its stored format, in place (a
resident layer's stack or a cache slab's rows), and neither syncs with the host, so a decode
step can be captured in a CUDA graph. The grouped path sorts the slots and cuts them into row
blocks with the dense kernels' helpers (experts.triton_ops.block_map, block_sizes).
The PyTorch reference is ClampedSwigluForm.run_planned; tests/experts/test_clamped_kernels.py
holds the two together (on the CPU under TRITON_INTERPRET=1).

Shapes: N = tokens, A = experts per token, S = N*A slots, E = stack rows (experts or cache slots),
D = hidden, I = expert ffn width; stacks as experts.clamped's forms store them:
MXFP4  gate_up_blocks [E, 2I, D/32, 16], gate_up_scales [E, 2I, D/32], down_blocks [E, D, I/32, 16],
       down_scales [E, D, I/32] (uint8), gate_up_bias [E, 2I], down_bias [E, D];
dense  gate_up [E, 2I, D], down [E, D, I], gate_up_bias [E, 2I], down_bias [E, D].

`offsets` [E, >= C] int64 (offload misses "mapped"; per-slot kernels only, for any slot count):
column columns[name] places expert e's tensor `name` at that stacked tensor's first element +
offsets[e, columns[name]] (elements of that tensor), for each of the stack's tensors above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..errors import MoekitError
from ..kernels.clamped_experts import (
    grouped_down_kernel,
    grouped_gate_up_kernel,
    slot_down_kernel,
    slot_down_sum_mxfp4_kernel,
    slot_gate_up_kernel,
    slot_gate_up_mxfp4_kernel,
)
from .forms import SLOT_KERNEL_MAX_SLOTS
from .triton_ops import block_map, block_sizes, triton_usable

# (BLOCK_N, BLOCK_K, num_warps) of the per-slot kernels by format. The MXFP4 tiles were (16, 64):
# 512 weight bytes a program per step, far too few in flight to stream HBM; these move as many
# bytes a step as the dense kernels' measured winner (4, 1024) does per row pair. Untuned on a
# GPU yet: benchmarks/probes/bench_clamped_kernels.py sweeps them.
SLOT_CONFIG = {True: (4, 512, 4), False: (4, 1024, 4)}
# Which per-slot kernels an MXFP4 stack takes: "words" (slot_gate_up_mxfp4_kernel and
# slot_down_sum_mxfp4_kernel: rows read as int32 words, e2m1 built from bits, one power a word,
# the top-k sum in the down kernel) or "bytes" (the kernels above with SLOT_CONFIG, then a torch
# sum: 82 us a gpt-oss-20b layer at 4 slots on the H200, 15% of the HBM floor). Dense stacks
# always take "bytes".
SLOT_MXFP4_KERNELS = "words"
# (BLOCK_N, BLOCK_W words, num_warps) of the "words" kernels: gate_up, down. Compiled for sm_90:
# 168 and 138 registers, no spills, a K loop of 5.9 and 7.0 instructions a weight (the "bytes"
# gate_up: 19). H200 at d3305c3 (benchmarks/probes/bench_clamped_kernels.py, gpt-oss-20b's layer at 4
# slots): 53.4 us with gate_up (8, 128, 4), 60.0 with (16, 64, 4), the floor 12.6; "bytes" 82.8.
SLOT_WORDS_CONFIG = ((8, 128, 4), (4, 128, 4))
# How the grouped kernels build an MXFP4 tile: "words" (int32 words, e2m1 from bits, planes joined
# in registers; bf16 tiles and a bf16 tl.dot for bf16 activations on a GPU, exact since e2m1 * 2^k
# is), "words-tf32" (the same decode, float32 tiles and tf32 as before) or "bytes" (the byte
# decode and float32 tiles: 827 us a gpt-oss-20b layer at 128 slots on the H200, 12% of the
# floor). Float32 activations and the interpreter (which mis-multiplies tiles cast to bf16 in a
# kernel) always take float32 tiles.
GROUPED_TILES_CHOICES = ("words", "words-tf32", "bytes")
GROUPED_TILES = "words"


@dataclass(frozen=True)
class Matrix:
    """One matrix kind of a stack as the kernels read it."""

    weights: torch.Tensor  # MXFP4: blocks [E, R, K/32, 16] uint8; dense: [E, R, K]
    scales: torch.Tensor  # MXFP4: [E, R, K/32] uint8; dense: the weights again (never read)
    bias: torch.Tensor  # [E, R]
    columns: int  # K
    mxfp4: bool

    @staticmethod
    def of(stacked: dict[str, torch.Tensor], kind: str) -> Matrix | None:
        """Returns matrix `kind` ("gate_up" or "down") of a stack, or None when its layout is not
        one the kernels read (each row's bytes contiguous, biases contiguous per expert)."""
        bias = stacked[kind + "_bias"]
        if bias.stride(1) != 1:
            return None
        if kind + "_blocks" in stacked:
            blocks, scales = stacked[kind + "_blocks"], stacked[kind + "_scales"]
            if blocks.stride(3) != 1 or blocks.stride(2) != 16 or scales.stride(2) != 1:
                return None
            return Matrix(blocks, scales, bias, blocks.shape[2] * 32, True)
        w = stacked[kind]
        if w.stride(2) != 1:
            return None
        return Matrix(w, w, bias, w.shape[2], False)

    def word_aligned(self) -> bool:
        """Returns whether the "words" kernels may read the weights as int32 words: the stack, each
        expert and each row start on a 4-byte boundary (an offsets table's entries are assumed to:
        offload.layout starts every packed tensor at ALIGN_BYTES)."""
        w = self.weights
        return w.data_ptr() % 4 == 0 and w.stride(0) % 4 == 0 and w.stride(1) % 4 == 0

    def rows(self) -> int:
        """Returns R, the matrix's rows."""
        return self.weights.shape[1]

    def offset_args(self, kind: str, offsets: torch.Tensor | None, columns: dict[str, int] | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the offsets table's (weights, scales, bias) columns of matrix `kind` as the kernels
        take them (views starting at each column; a dense matrix's scales take its weights' column),
        or the table-less kernels' unread placeholders."""
        if offsets is None:
            return self.bias, self.bias, self.bias  # never read: OFFSETS is off
        names = (kind + "_blocks", kind + "_scales") if self.mxfp4 else (kind, kind)
        return tuple(offsets[:, columns[name]:] for name in (*names, kind + "_bias"))  # type: ignore[return-value]

    def args(self) -> tuple:
        """Returns (weights, scales, bias, stride_we, stride_wr, stride_se, stride_sr, stride_bias), as
        the kernels take them."""
        w, s = self.weights, self.scales
        return w, s, self.bias, w.stride(0), w.stride(1), s.stride(0), s.stride(1), self.bias.stride(0)


def matrices(stacked: dict[str, torch.Tensor]) -> tuple[Matrix, Matrix] | None:
    """Returns the (gate_up, down) matrices of a stack, or None where the kernels cannot read it."""
    gate_up, down = Matrix.of(stacked, "gate_up"), Matrix.of(stacked, "down")
    return None if gate_up is None or down is None else (gate_up, down)


def clamped_expert_ffn(x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, stacked: dict[str, torch.Tensor],
                       alpha: float, limit: float, offsets: torch.Tensor | None = None,
                       columns: dict[str, int] | None = None) -> torch.Tensor | None:
    """Returns sum_a weights[n,a] * expert_{rows[n,a]}(x[n]) as [N, D] through the kernels (per-slot
    up to SLOT_KERNEL_MAX_SLOTS slots, as the dense form's, and for any count with `offsets`;
    grouped above), or None where the stack's layout (or a dense stack's dtype other than x's) does
    not fit them.

    x [N, D]; rows, weights [N, A]; stacked, offsets and columns as the module docstring gives them."""
    mats = matrices(stacked)
    if mats is None or any(not m.mxfp4 and m.weights.dtype != x.dtype for m in mats):
        return None  # dense tiles multiply in the inputs' dtype
    if not triton_usable(x):
        raise RuntimeError("the gpt-oss expert kernels need CUDA or TRITON_INTERPRET=1")
    if rows.numel() == 0:
        return torch.zeros_like(x)
    if offsets is not None or rows.numel() <= SLOT_KERNEL_MAX_SLOTS:
        return slot_ffn(x, rows, weights, mats, alpha, limit, offsets=offsets, columns=columns)
    return grouped_ffn(x, rows, weights, mats, alpha, limit)


def slot_ffn(x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, mats: tuple[Matrix, Matrix],
             alpha: float, limit: float, configs: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
             offsets: torch.Tensor | None = None, columns: dict[str, int] | None = None,
             kernels: str | None = None) -> torch.Tensor:
    """Returns the per-slot kernels' [N, D] (no sorting: one program row per slot). `kernels`
    picks "words" or "bytes" (default SLOT_MXFP4_KERNELS for MXFP4 stacks whose rows are
    word-aligned, else "bytes"); `configs` overrides the (BLOCK_N, BLOCK_K or BLOCK_W, num_warps)
    of the gate_up and down kernels; `offsets` and `columns` (module docstring) place each
    expert's tensors instead of its stack rows."""
    gate_up, down = mats
    kernels = kernels or (SLOT_MXFP4_KERNELS if all(m.mxfp4 and m.word_aligned() for m in mats) else "bytes")
    if kernels not in ("words", "bytes") or (kernels == "words" and not (gate_up.mxfp4 and down.mxfp4)):
        raise MoekitError(f"slot_ffn: kernels={kernels!r}: 'words' (MXFP4 stacks only) or 'bytes'")
    stride_off = 0
    if offsets is not None:
        assert offsets.dtype == torch.int64 and offsets.stride(1) == 1 and columns is not None, \
            "offsets: [E, >= C] int64, columns: {tensor name: column}"
        stride_off = offsets.stride(0)
    n, top_k = rows.shape
    slots, ffn, hidden = n * top_k, gate_up.rows() // 2, down.rows()
    if kernels == "words":
        default = SLOT_WORDS_CONFIG
        gate_up_kernel, down_kernel = slot_gate_up_mxfp4_kernel, slot_down_sum_mxfp4_kernel
    else:
        default = (SLOT_CONFIG[gate_up.mxfp4], SLOT_CONFIG[down.mxfp4])
        gate_up_kernel, down_kernel = slot_gate_up_kernel, slot_down_kernel
    (gn, gk, gw), (dn, dk, dw) = configs or default
    block = "BLOCK_W" if kernels == "words" else "BLOCK_K"
    mxfp4 = {} if kernels == "words" else {"MXFP4": gate_up.mxfp4}
    flat_rows, flat_weights = rows.reshape(-1), weights.reshape(-1)
    x = x.contiguous()
    h = torch.empty(slots, ffn, dtype=x.dtype, device=x.device)  # [S, I]
    use_offsets = offsets is not None
    w, s, b, *strides = gate_up.args()
    gate_up_kernel[(slots, triton.cdiv(ffn, gn))](
        x, flat_rows, w, s, b, *gate_up.offset_args("gate_up", offsets, columns), h, ffn, alpha, limit,
        x.stride(0), *strides, h.stride(0), stride_off,
        TOP_K=top_k, K=gate_up.columns, BLOCK_N=gn, **{block: gk}, **mxfp4, OFFSETS=use_offsets, num_warps=gw)
    w, s, b, *strides = down.args()
    if kernels == "words":  # the top-k sum in the kernel: [N, D] straight out
        y = torch.empty(n, hidden, dtype=x.dtype, device=x.device)
        down_kernel[(n, triton.cdiv(hidden, dn))](
            h, flat_rows, flat_weights, w, s, b, *down.offset_args("down", offsets, columns), y, hidden,
            h.stride(0), *strides, y.stride(0), stride_off,
            TOP_K=top_k, TOP_K_P2=triton.next_power_of_2(top_k), K=down.columns, BLOCK_N=dn, BLOCK_W=dk,
            OFFSETS=use_offsets, num_warps=dw)
        return y
    y = torch.empty(slots, hidden, dtype=x.dtype, device=x.device)  # [S, D], weighted
    down_kernel[(slots, triton.cdiv(hidden, dn))](
        h, flat_rows, flat_weights, w, s, b, *down.offset_args("down", offsets, columns), y, hidden,
        h.stride(0), *strides, y.stride(0), stride_off,
        K=down.columns, BLOCK_N=dn, BLOCK_K=dk, MXFP4=down.mxfp4, OFFSETS=use_offsets, num_warps=dw)
    return y.view(n, top_k, hidden).sum(dim=1)


def grouped_config(slots: int, count: int, mxfp4: bool, bf16_tiles: bool = False) -> tuple[int, int, int, int]:
    """Returns (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the grouped kernels for `slots` slots over
    `count` stack rows: the dense kernels' blocks (triton_ops.block_sizes). MXFP4 tiles are decoded
    to float32 in registers (gate_up holds two [BLOCK_N, BLOCK_K]): compiled for sm_90, gate_up at
    (16, 64, 128) with 4 warps spilled 888 bytes a thread, at (16, 64, 64) 56, with 8 warps none
    (185 registers); so MXFP4 takes BLOCK_K <= 64 and 8 warps (the "words" bf16 tiles take 85
    registers there: GROUPED_TILES). Untuned by timing yet:
    benchmarks/probes/bench_clamped_kernels.py sweeps them on a GPU. With `bf16_tiles` (the "words"
    tiles of bf16 activations on a GPU) the sweep's winners at d3305c3 on the H200, gpt-oss-20b's
    layer (`bench_clamped_kernels_d3305c3.json`): 128 slots (4 an expert) (16, 64, 64, 4) 618 us
    against 736 at (16, 64, 64, 8) ((16, 64, 128, 4), 614 us, spills 8 bytes a thread for sm_90);
    1024 slots (32 an expert) (64, 128, 64, 8) 670 us against 1342 at (32, 64, 64, 8). Other slot
    counts were not timed."""
    block_m, block_n, block_k = block_sizes(slots, count)
    if mxfp4 and bf16_tiles:
        return (16, 64, 64, 4) if slots / count <= 16 else (64, 128, 64, 8)
    return (block_m, block_n, min(block_k, 64), 8) if mxfp4 else (block_m, block_n, block_k, 4)


def grouped_ffn(x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, mats: tuple[Matrix, Matrix],
                alpha: float, limit: float, config: tuple[int, int, int, int] | None = None,
                tiles: str | None = None) -> torch.Tensor:
    """Returns the grouped kernels' [N, D]: slots sorted by stack row on the device (block_map),
    each row block multiplying one expert's weight tiles, decoded once per block. `config`
    overrides (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) (BLOCK_M >= 16, tl.dot's least); `tiles`
    one of GROUPED_TILES_CHOICES for MXFP4 (default GROUPED_TILES; "bytes" where the stack's
    rows are not word-aligned)."""
    gate_up, down = mats
    tiles = tiles or (GROUPED_TILES if gate_up.word_aligned() and down.word_aligned() else "bytes")
    if tiles not in GROUPED_TILES_CHOICES:
        raise MoekitError(f"grouped_ffn: tiles={tiles!r}: one of {', '.join(GROUPED_TILES_CHOICES)}")
    word_tiles = tiles != "bytes" and gate_up.mxfp4
    bf16_tiles = tiles == "words" and gate_up.mxfp4 and x.is_cuda and x.dtype == torch.bfloat16
    n, top_k = rows.shape
    count = gate_up.weights.shape[0]
    slots, ffn, hidden = n * top_k, gate_up.rows() // 2, down.rows()
    block_m, block_n, block_k, warps = config or grouped_config(slots, count, gate_up.mxfp4, bf16_tiles)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 only matters for float32
    order, block_expert, block_start, block_end = block_map(rows, count, block_m)
    # the used blocks come first and number at most ceil(S / BLOCK_M) + (rows present <= S): a cache
    # slab's hundreds of rows would otherwise launch hundreds of empty blocks
    num_blocks = min(block_expert.shape[0], triton.cdiv(slots, block_m) + min(slots, count))
    x = x.contiguous()
    h = torch.empty(slots, ffn, dtype=x.dtype, device=x.device)  # [S, I] in sorted order
    w, s, b, *strides = gate_up.args()
    grouped_gate_up_kernel[(num_blocks, triton.cdiv(ffn, block_n))](
        x, order, w, s, b, block_expert, block_start, block_end, h, ffn, count, alpha, limit,
        x.stride(0), *strides, h.stride(0), TOP_K=top_k, K=gate_up.columns,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, MXFP4=gate_up.mxfp4, DOT_PRECISION=precision,
        WORD_TILES=word_tiles, BF16_TILES=bf16_tiles, num_warps=warps)
    y = torch.empty(slots, hidden, dtype=x.dtype, device=x.device)  # [S, D] in routing order, weighted
    w, s, b, *strides = down.args()
    grouped_down_kernel[(num_blocks, triton.cdiv(hidden, block_n))](
        h, order, weights.reshape(-1), w, s, b, block_expert, block_start, block_end, y, hidden, count,
        h.stride(0), *strides, y.stride(0), K=down.columns,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, MXFP4=down.mxfp4, DOT_PRECISION=precision,
        WORD_TILES=word_tiles, BF16_TILES=bf16_tiles, num_warps=warps)
    return y.view(n, top_k, hidden).sum(dim=1)
