"""The compressed down kernels with the top-k sum (quant.kernels int_slot_down_kernel,
code_slot_down_kernel) equal each token's weighted sum of its experts' rows.

Routings: N = 2..3 tokens, A = 1..8 experts a token, experts shared across tokens and repeated
within one, uneven and negative routing weights. References: the sum in float64 of the decoded
experts, and (float32 under the interpreter) the old path bit for bit: the per-slot kernel's
weighted rows at the same tile, added in slot order.
"""

from __future__ import annotations

import pytest
import torch
from conftest import kernel_device
from test_kernels import (
    stacked_code,
    stacked_int,
    to,
    uneven_code,
    xfail_split_groups_on_cuda,
)

from moekit.errors import MoekitError
from moekit.quant import ops

pytestmark = pytest.mark.skipif(not ops.HAVE_TRITON, reason="needs triton")

EXPERTS = 4
ROUTINGS = [  # (tokens N, experts per token A, expert ids [N * A])
    (2, 1, [2, 2]),  # one expert shared by both tokens
    (2, 3, [0, 2, 0, 2, 1, 2]),  # repeated within the first token, shared across tokens
    (3, 2, [1, 1, 0, 3, 3, 3]),
    (2, 8, [0, 1, 2, 3, 0, 1, 2, 3, 3, 3, 1, 0, 2, 2, 1, 0]),  # top-8: 16 slots (SLOT_KERNEL_MAX_SLOTS)
    (3, 5, [3, 0, 1, 2, 0, 0, 0, 1, 1, 2, 3, 2, 1, 0, 3]),
]


def cases(configs: list[tuple]) -> list:
    """Returns (*config case, *routing) parameters, all slow: the interpreter runs a program at a time
    (the set took 3 minutes of the 2-core machine's default run), and these launches are behind
    formats.SLOT_DOWN_SUM (off); test_kernels' summing-down test keeps one in the default run."""
    return [pytest.param(*c, *r, marks=pytest.mark.slow)  # behind formats.SLOT_DOWN_SUM (off): CI's slow run
            for i, c in enumerate(configs) for j, r in enumerate(ROUTINGS)]


def down_inputs(n: int, a: int, ids: list[int], cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (h [S, cols], ids [S], weights [S]) float32: weights of both signs and very different sizes."""
    g = torch.Generator().manual_seed(n * 10 + a)
    h = torch.randn(n * a, cols, generator=g)
    weights = torch.randn(n * a, generator=g) * torch.logspace(-2, 1, n * a)[torch.randperm(n * a, generator=g)]
    return h, torch.tensor(ids), weights


def float64_sum(dense: torch.Tensor, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, a: int) -> torch.Tensor:
    """Returns [N, R] float64: sum_a weights[s] * h[s] @ dense[ids[s]]^T over each token's slots."""
    per_slot = torch.einsum("srk,sk->sr", dense.double()[ids], h.double()) * weights.double()[:, None]
    return per_slot.view(-1, a, dense.shape[1]).sum(dim=1)


def sequential_sum(per_slot: torch.Tensor, a: int) -> torch.Tensor:
    """Returns [N, R]: the per-slot rows [S, R] of each token added in slot order a = 0..A-1."""
    per_slot = per_slot.view(-1, a, per_slot.shape[-1])
    out = per_slot[:, 0]
    for j in range(1, a):
        out = out + per_slot[:, j]
    return out


def check(out: torch.Tensor, old: torch.Tensor, want64: torch.Tensor, device: str) -> None:
    """The fused sum is close to the float64 sum, and on the CPU (interpreter) equals the old path's bits."""
    out = out.cpu()
    assert out.shape == want64.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want64, rtol=2e-5, atol=2e-5)
    if device == "cpu":  # numpy float32 in the interpreter: no FMA contraction, the same roundings
        assert torch.equal(out, sequential_sum(old.cpu(), old.shape[0] // out.shape[0]))


@pytest.mark.parametrize("bits,group,rows,cols,config,n,a,ids", cases([
    (4, None, 37, 13, None),  # odd rows, a partly used word, one scale per row
    (2, 16, 22, 48, (2, 16, 1, False)),  # K in 3 tiles, one scale per tile
    (3, 8, 26, 40, (4, 64, 2, False)),  # 3-bit groups that split words: one scale per code
    (4, 16, 33, 64, (1, 32, 1, False)),  # groups of whole words, two tiles
]))
def test_int_slot_down_sums_each_tokens_slots(bits, group, rows, cols, config, n, a, ids):
    from moekit.quant.grids import dequantize_int, unpack_codes

    device = kernel_device()
    parts = stacked_int(EXPERTS, rows, cols, bits, group, seed=rows)
    xfail_split_groups_on_cuda(device, bits, parts[1].shape[-1], cols)
    h, ids, weights = down_inputs(n, a, ids, cols)
    on = to(device, (h, ids, weights, *parts))
    out = ops.int_slot_down_triton(*on[:2], *on[3:], bits, a, on[2], config=config)
    tile = config or ops.int_slot_down_config(bits, rows, cols, a)  # the old path at the same tile: the same roundings
    old = ops.int_slot_linear_triton(*on[:2], *on[3:], bits, 1, on[2], False, config=tile)  # [S, R] weighted
    dense = dequantize_int(unpack_codes(parts[0], bits, cols), *parts[1:])
    check(out, old, float64_sum(dense, h, ids, weights, a), device)
    torch.testing.assert_close(out.cpu(), ops.int_slot_down_reference(h, ids, *parts, bits, a, weights),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("uneven,dict_bits,rows,cols,config,n,a,ids", cases([
    (False, 8, 37, 13, None),
    (True, 8, 37, 100, None),  # experts of different chunk totals, all-zero and dense rows
    (False, 10, 22, 300, (2, 32, 1)),  # int16 codewords, several steps of chunks
    (True, 8, 19, 70, (4, 16, 1)),
]))
def test_code_slot_down_sums_each_tokens_slots(uneven, dict_bits, rows, cols, config, n, a, ids):
    device = kernel_device()
    parts = uneven_code(EXPERTS, rows, cols, seed=rows) if uneven else stacked_code(EXPERTS, rows, cols, dict_bits,
                                                                                     seed=rows)
    h, ids, weights = down_inputs(n, a, ids, cols)
    on = to(device, (h, ids, weights, *parts))
    out = ops.code_slot_down_triton(*on[:2], *on[3:], a, on[2], config=config)
    tile = config or ops.code_slot_down_config(rows, cols, a)  # codewords per step set the order of a row's sum
    old = ops.code_slot_linear_triton(*on[:2], *on[3:], 1, on[2], False, config=tile)
    dense = ops.code_weight_reference(*parts, cols)  # [E, R, K] float32: lo / hi at the nonzeros
    check(out, old, float64_sum(dense, h, ids, weights, a), device)
    torch.testing.assert_close(out.cpu(), ops.code_slot_down_reference(h, ids, *parts, a, weights),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_slot_down_bfloat16():
    """bfloat16 activations and weights in, bfloat16 [N, R] out (float32 sum inside, one rounding)."""
    device = kernel_device()
    h, ids, weights = down_inputs(*ROUTINGS[1], 40)
    h, weights = h.bfloat16(), weights.bfloat16()
    int_parts, code_parts = stacked_int(EXPERTS, 26, 40, 4, 8), stacked_code(EXPERTS, 26, 40, 8)
    on = to(device, (h, ids, weights))
    for out, ref in (
            (ops.int_slot_down_triton(*on[:2], *to(device, int_parts), 4, 3, on[2]),
             ops.int_slot_down_reference(h.float(), ids, *int_parts, 4, 3, weights.float())),
            (ops.code_slot_down_triton(*on[:2], *to(device, code_parts), 3, on[2]),
             ops.code_slot_down_reference(h.float(), ids, *code_parts, 3, weights.float()))):
        assert out.dtype == torch.bfloat16 and out.shape == (2, 26)
        assert ((out.cpu().float() - ref).norm() / ref.norm()).item() < 1e-2


def test_slot_down_rejects_a_slot_count_that_is_not_tokens_times_top_k():
    parts = stacked_int(EXPERTS, 8, 16, 4, None)
    h, ids, weights = down_inputs(2, 3, [0, 1, 2, 3, 0, 1], 16)
    with pytest.raises(MoekitError, match="top_k"):
        ops.int_slot_down_triton(h, ids, *parts, 4, 4, weights)  # 6 slots, top-4
    with pytest.raises(MoekitError, match="top_k"):
        ops.int_slot_down_triton(h[:5], ids, *parts, 4, 3, weights)


@pytest.mark.parametrize("rows,cols", [(2048, 768), (4096, 14336), (37, 13)])
@pytest.mark.parametrize("a", [1, 2, 6, 8])
def test_untuned_down_tiles_keep_the_per_slot_programs_work(rows, cols, a):
    """Until a GPU run measures them, the summed kernels take the per-slot down tile with 1/A of its
    rows (at least one), so a program does about a per-slot program's work; the code tile keeps its
    codewords per step (every lane of the warp busy)."""
    bn, bk, warps, dot = ops.int_slot_config(4, rows, cols)
    got = ops.int_slot_down_config(4, rows, cols, a)
    assert got[1:] == (bk, warps, dot) and got[0] * a >= bn and (got[0] == 1 or got[0] * a <= bn)
    br, words, warps = ops.code_slot_config(rows, cols)
    got = ops.code_slot_down_config(rows, cols, a)
    assert got[0] * got[1] == br * words and got[2] == warps and (got[0] == 1 or got[0] * a <= br)
