"""Wrappers of the grouped expert kernels (moekit.kernels.moe_grouped) for stacked dense experts.

Shapes: N = tokens, A = experts per token, S = N*A slots, E = experts, D = hidden, I = ffn.
The PyTorch reference is ResidentExperts._grouped; tests hold the two together (on the CPU
under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch

from ..errors import MoekitError

try:
    import triton

    from ..kernels.moe_grouped import down_kernel, gate_up_swiglu_kernel
    from ..kernels.moe_slots import slot_down_kernel, slot_gate_up_swiglu_kernel
    HAVE_TRITON = True
except ImportError:  # CPU machines without triton use the PyTorch path
    HAVE_TRITON = False


def triton_usable(x: torch.Tensor) -> bool:
    """Returns whether the Triton path can run on x's device (CUDA, or CPU under the interpreter)."""
    if not HAVE_TRITON:
        return False
    if x.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def specialization_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """Returns what Triton compiles a launch `kernel[grid](*args, **kwargs)` under, as far as the
    arguments decide it: each tensor's dtype and 16-byte alignment, each int's class (1, divisible
    by 16, other, 64-bit) unless the kernel leaves it unspecialized, and the keyword constexprs
    and launch options. A launch whose key is new compiles (100s of ms on a GPU): tests hold the
    keys of ragged steps to a fixed set."""
    names = list(kernel.arg_names)
    marked = getattr(kernel, "do_not_specialize", None)
    if marked is None:  # the interpreter keeps the decorator's arguments as they were given
        marked = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    loose = {names[i] if isinstance(i, int) else i for i in marked}
    key = []
    for name, a in zip(names, args):
        if isinstance(a, torch.Tensor):
            key.append((name, str(a.dtype), a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or not isinstance(a, int):
            key.append((name, type(a).__name__ if isinstance(a, float) else a))
        elif name in loose:
            key.append((name, "i64" if abs(a) >= 2**31 else "i32"))
        else:
            key.append((name, "i64" if abs(a) >= 2**31 else 1 if a == 1 else 16 if a % 16 == 0 else "i32"))
    return tuple(key) + tuple(sorted(kwargs.items()))


def block_sizes(slots: int, num_experts: int) -> tuple[int, int, int]:
    """Returns (BLOCK_M, BLOCK_N, BLOCK_K) for `slots` routed slots over `num_experts` experts.

    Decode (a few slots per expert) is memory bound: the smallest row block tl.dot allows and
    narrow N tiles, so many programs stream weights at once. Prefill (many slots per expert)
    needs taller row blocks so each weight tile is reused across tokens.
    """
    per_expert = slots / num_experts
    if per_expert <= 16:
        return 16, 64, 128
    if per_expert <= 64:
        return 32, 64, 64
    return 64, 64, 64


# Prefill tiles of the grouped kernels (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) from this many routed
# slots per expert on: measured on an H200 by benchmarks/probes/probe_grouped_tiles.py (bf16), against
# 64 x 64 x 64 tiles with Triton's default warps and stages: 16,384 tokens Mixtral's experts 332 -> 474
# TFLOP/s, OLMoE's 302 -> 424 (a dense matmul of the same FLOPs: 697 / 740); 4096 tokens OLMoE (512
# slots an expert) 256 -> 325; 2560 tokens Mixtral (640, the pipeline's prefill micro-batch) 331 -> 443,
# OLMoE (320) 232 -> 243. Fewer slots an expert were not measured.
PREFILL_TILES = (128, 128, 64, 8, 3)
PREFILL_TILES_FROM = 320


def grouped_tiles(slots: int, num_experts: int, dtype: torch.dtype) -> tuple[int, int, int, int | None, int | None]:
    """Returns (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of grouped_expert_ffn's kernels
    (None: Triton's default): block_sizes' tiles, or PREFILL_TILES for a 16-bit prefill of many slots
    per expert (float32 tiles of that size need more shared memory than an SM has)."""
    if slots / num_experts >= PREFILL_TILES_FROM and dtype.itemsize == 2:
        return PREFILL_TILES
    return (*block_sizes(slots, num_experts), None, None)


def block_map(expert_ids: torch.Tensor, num_experts: int, block_m: int):
    """Returns (order [S], block_expert [P], block_start [P], block_end [P]) for expert_ids [N, A].

    Slots are sorted by expert; each expert's run is cut into blocks of block_m slots. P is
    ceil(S / block_m) + E, an upper bound, so shapes never depend on the routing (graph-safe).
    """
    flat = expert_ids.reshape(-1)  # [S]
    slots = flat.numel()
    order = torch.argsort(flat, stable=True)
    # counts via scatter_add: bincount would sync with the host to size its output
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, 0)  # [E] one past each expert's last slot
    blocks = (counts + block_m - 1) // block_m  # [E]
    block_ends = torch.cumsum(blocks, 0)  # [E]
    num_blocks = (slots + block_m - 1) // block_m + num_experts
    p = torch.arange(num_blocks, device=flat.device)
    block_expert = torch.searchsorted(block_ends, p, right=True)  # [P], E when unused
    e = block_expert.clamp(max=num_experts - 1)
    first_block = block_ends[e] - blocks[e]
    block_start = (ends[e] - counts[e]) + (p - first_block) * block_m
    used = block_expert < num_experts
    block_start = torch.where(used, block_start, torch.zeros_like(block_start))
    block_end = torch.where(used, ends[e], torch.zeros_like(block_start))
    as_i32 = lambda t: t.to(torch.int32)
    return order, as_i32(block_expert), as_i32(block_start), as_i32(block_end)


def grouped_expert_ffn(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                       gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D], with no host sync.

    x [N, D]; expert_ids, weights [N, A]; gate_up [E, 2I, D]; down [E, D, I].
    """
    top_k = expert_ids.shape[1]
    num_experts, two_ffn, hidden = gate_up.shape
    ffn = two_ffn // 2
    BLOCK_M, BLOCK_N, BLOCK_K, warps, stages = grouped_tiles(expert_ids.numel(), num_experts, x.dtype)
    opts = {k: v for k, v in (("num_warps", warps), ("num_stages", stages)) if v is not None}
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 only matters for float32
    order, block_expert, block_start, block_end = block_map(expert_ids, num_experts, BLOCK_M)
    token_of = order // top_k
    xs = x[token_of].contiguous()  # [S, D]
    num_blocks = block_expert.shape[0]
    h = torch.empty(xs.shape[0], ffn, dtype=x.dtype, device=x.device)  # [S, I]
    gate_up_swiglu_kernel[(num_blocks, triton.cdiv(ffn, BLOCK_N))](
        xs, gate_up, block_expert, block_start, block_end, h, ffn, num_experts,
        xs.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0), K=hidden,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=precision, **opts)
    y = torch.empty(xs.shape[0], hidden, dtype=x.dtype, device=x.device)  # [S, D]
    down_kernel[(num_blocks, triton.cdiv(hidden, BLOCK_N))](
        h, down, block_expert, block_start, block_end, y, hidden, num_experts,
        h.stride(0), down.stride(0), down.stride(1), y.stride(0), K=ffn,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=precision, **opts)
    y = y * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token_of, y)


# Per-slot tiles, keyed by (kernel, hidden, ffn) and measured on an H200 by
# benchmarks/tune_slot_kernels.py; other shapes use the default. gate_up: (BLOCK_N rows, BLOCK_K
# columns, warps); down: the same and SLOTS_PER_STEP (experts whose rows one K step reads at once;
# capped at A rounded up to a power of two).
SLOT_DEFAULT = {  # the configs that won most of the shapes below
    "gate_up": (2, 2048, 4),
    "down": (2, 1024, 4, 8),  # all of a token's slots (up to 8) in one step, two rows each
}
# measured on an H200 by benchmarks/tune_slot_kernels.py at fd5ac8f (`tune_slot_kernels_fd5ac8f.json`;
# triton.testing.do_bench, B=1, GB/s of expert weights against a 4,226 GB/s HBM copy): the gate_up
# winners are 1-5% ahead of (4, 1024, 4); the down ones, which sum the top-k slots, 3-38% ahead of
# (1, 1024, 4, 8)
SLOT_TUNED: dict[tuple[str, int, int], tuple[int, ...]] = {
    ("gate_up", 2048, 1024): (2, 2048, 4),  # olmoe-1b-7b: 2.58 TB/s
    ("down", 2048, 1024): (2, 2048, 4, 1),  # 1.95 TB/s
    ("gate_up", 2048, 1408): (4, 2048, 8),  # deepseek-v2-lite: 2.63 TB/s
    ("down", 2048, 1408): (2, 1024, 4, 8),  # 1.88 TB/s
    ("gate_up", 2048, 768): (2, 2048, 4),  # qwen3-30b-a3b: 2.39 TB/s
    ("down", 2048, 768): (2, 1024, 4, 8),  # 1.73 TB/s
    ("gate_up", 4096, 14336): (2, 2048, 4),  # mixtral-8x7b: 4.11 TB/s
    ("down", 4096, 14336): (8, 1024, 8, 1),  # 3.54 TB/s
}


def slot_config(kernel: str, hidden: int, ffn: int) -> tuple[int, ...]:
    """Returns the tile config of a per-slot kernel ("gate_up" or "down") at this expert shape."""
    return SLOT_TUNED.get((kernel, hidden, ffn), SLOT_DEFAULT[kernel])


def _check_slot_config(kernel: str, config: tuple[int, ...]) -> None:
    """Raises MoekitError unless config is a tile config the per-slot kernel `kernel` takes."""
    powers = lambda v, lo, hi: lo <= v <= hi and v & (v - 1) == 0
    size = len(SLOT_DEFAULT[kernel])
    if len(config) != size or not (powers(config[0], 1, 1024) and powers(config[1], 16, 2048)
                                   and powers(config[2], 1, 32) and (size == 3 or powers(config[3], 1, 64))):
        raise MoekitError(f"slot kernel config for {kernel} {config}: (BLOCK_N, BLOCK_K, num_warps"
                          f"{', SLOTS_PER_STEP' if size == 4 else ''}), powers of two, BLOCK_K in 16..2048 "
                          "(the K tail halves it down to 16); fix SLOT_TUNED or configs=")


def slot_expert_ffn(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                    gate_up: torch.Tensor, down: torch.Tensor,
                    configs: tuple[tuple[int, int, int], tuple[int, int, int, int]] | None = None,
                    offsets: torch.Tensor | None = None, rows: tuple[int, int] | None = None,
                    skip: bool = False) -> torch.Tensor:
    """Returns sum_a weights[n,a] * expert_{ids[n,a]}(x[n]) as [N, D]: two launches, no host sync.

    Same contract as grouped_expert_ffn; no sorting, so it suits a few slots (decode). The down
    kernel sums each token's A slots in float32, in slot order, and rounds once to x's dtype.
    `configs` overrides the tiles of the gate_up and down kernels (SLOT_DEFAULT's forms).
    `offsets` [E, >= 2] int64 (any row stride; columns past 2 unused) places expert e's gate_up at gate_up's first element +
    offsets[e, 0] and its down at down's first element + offsets[e, 1] (elements; each expert's
    matrices contiguous as in the stacked layout), instead of at index e of gate_up and down.
    `rows` (r0, r1): only ffn rows r0..r1-1 of each expert (gate and up rows, down columns): the
    device's partial output of an expert split by rows with the CPU (native.experts, rows).
    `skip` (with offsets): experts whose offsets are -1 are left out of the sum, unread (the
    CPU computes them: offload.partner)."""
    if skip and offsets is None:
        raise ValueError("skip leaves out experts by their offsets: it needs offsets")
    n, top_k = expert_ids.shape
    _, two_ffn, hidden = gate_up.shape
    width = two_ffn // 2
    r0, r1 = rows if rows is not None else (0, width)
    assert 0 <= r0 < r1 <= width, f"rows {rows} is not a non-empty range of the {width} ffn rows"
    ffn = r1 - r0
    up = width * gate_up.stride(1)  # elements from a gate row to its up row
    gu_strides, dn_strides = gate_up.stride()[:2], down.stride()[:2]
    if r0:  # the kernels take the slice's first row / column as each expert's start
        gate_up = gate_up.as_strided((1,), (1,), gate_up.storage_offset() + r0 * gate_up.stride(1))
        down = down.as_strided((1,), (1,), down.storage_offset() + r0)
    slots = n * top_k
    gate_up_config, down_config = configs or (slot_config("gate_up", hidden, ffn), slot_config("down", hidden, ffn))
    _check_slot_config("gate_up", gate_up_config)
    _check_slot_config("down", down_config)
    (gn, gk, gw), (dn, dk, dw, per_step) = gate_up_config, down_config
    per_step = min(per_step, triton.next_power_of_2(top_k))
    flat_ids = expert_ids.reshape(-1)
    flat_weights = weights.reshape(-1)
    x = x.contiguous()
    use_offsets = offsets is not None
    if use_offsets:
        assert offsets.dtype == torch.int64 and offsets.shape[1] >= 2 and offsets.stride(1) == 1, "offsets: [E, >=2] int64"
        gu_off, dn_off, stride_off = offsets, offsets[:, 1:], offsets.stride(0)
    else:
        gu_off = dn_off = flat_ids  # unused
        stride_off = 0
    h = torch.empty(slots, ffn, dtype=x.dtype, device=x.device)  # [S, I]
    slot_gate_up_swiglu_kernel[(slots, triton.cdiv(ffn, gn))](
        x, flat_ids, gate_up, gu_off, h, ffn, up, x.stride(0), gu_strides[0], gu_strides[1], h.stride(0),
        stride_off, TOP_K=top_k, K=hidden, BLOCK_N=gn, BLOCK_K=gk, OFFSETS=use_offsets, SKIP=skip, num_warps=gw)
    out = torch.empty(n, hidden, dtype=x.dtype, device=x.device)  # [N, D]
    # the token count is only in the grid: every ragged step launches under one specialization
    slot_down_kernel[(n, triton.cdiv(hidden, dn))](
        h, flat_ids, flat_weights, down, dn_off, out, hidden, h.stride(0), dn_strides[0], dn_strides[1],
        out.stride(0), stride_off, TOP_K=top_k, K=ffn, BLOCK_N=dn, BLOCK_K=dk, SLOTS_PER_STEP=per_step,
        OFFSETS=use_offsets, SKIP=skip, num_warps=dw)
    return out
