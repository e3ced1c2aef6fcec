"""Where the sub-1-bit code kernel spends its time at batch 1 (mixtral gate/up, 14336 x 4096).

    PYTHONPATH=src python3 benchmarks/profile_code_kernel.py --out $OUT            # H200
    ncu --section SpeedOfLight --section Occupancy --section LaunchStats \\
        -k regex:code_matmul -c 1 python3 benchmarks/profile_code_kernel.py --once

Random weights rounded to ternary (RTN) and coded with a 16-bit dictionary, as bench_compress does.
Without --once it times the kernel (do_bench, median) next to torch bf16 F.linear, and counts, on
the host, what the kernel's rounds do: nonzero symbols per codeword and rounds per step (a step
pops one nonzero of every codeword of its [BLOCK_R, words per step] tile until none is left), so
the share of lanes doing useful work is known. With --once it runs the kernel once (for ncu).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.quant import ops
from moekit.quant.code import build_dictionary, encode, symbol_probabilities
from moekit.quant.gptq import rtn_quantize
from moekit.quant.grids import TernaryGrid

ROWS, COLS = 14336, 4096


def build(device):
    w = torch.randn(1, ROWS, COLS, generator=torch.Generator().manual_seed(0)) * 0.02
    q = rtn_quantize(w.to(device), TernaryGrid())
    probs = symbol_probabilities(q.codes)
    d = build_dictionary(probs, 16)
    code = encode(q.codes[0], d)
    parts = (*code, q.params[0][0, :, 0].half(), q.params[1][0, :, 0].half(), d.table.to(device))
    return w[0].to(device, torch.bfloat16), parts, d, probs


def lane_stats(parts, d, config) -> dict:
    """Returns nonzeros per codeword and the kernel's rounds per step on this matrix (host count)."""
    words = parts[0].to(torch.int64).cpu() & 0xFFFF  # [T, W]
    nz_bits = d.table[words.reshape(-1), 0].to(torch.int64) & ((1 << 27) - 1)
    counts = torch.zeros_like(nz_bits)
    for i in range(27):
        counts += (nz_bits >> i) & 1
    block_r, step_words, _ = config
    tile = block_r * step_words
    n = counts.numel() // tile * tile
    tiles = counts[:n].view(-1, tile).float()
    rounds = tiles.max(dim=1).values
    return {"codewords": int(counts.numel()), "nonzeros_per_codeword": counts.float().mean().item(),
            "tile_codewords": tile, "rounds_per_step": rounds.mean().item(),
            "lane_efficiency": (tiles.mean(dim=1) / rounds.clamp(min=1)).mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--once", action="store_true", help="run the kernel once (under ncu)")
    args = ap.parse_args()
    device = torch.device("cuda")
    w, parts, d, probs = build(device)
    x = torch.randn(1, COLS, device=device, dtype=torch.bfloat16)
    ops.code_linear_triton(x, *parts)  # compile
    torch.cuda.synchronize()
    if args.once:
        ops.code_linear_triton(x, *parts)
        torch.cuda.synchronize()
        return
    import triton

    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3  # noqa: E731
    config = ops.code_config(ROWS, COLS, 1)
    res = {"shape": [ROWS, COLS], "p_zero": probs[0], "config": list(config),
           "code_us": bench(lambda: ops.code_linear_triton(x, *parts)), "bf16_us": bench(lambda: F.linear(x, w)),
           "code_bytes": sum(t.numel() * t.element_size() for t in parts)}
    res.update(lane_stats(parts, d, config))
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_code_kernel.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
