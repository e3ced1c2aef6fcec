"""Which tiles should the grouped expert kernels use for prefill? (issue 14: the pipeline's prefill)

    PYTHONPATH=src python3 benchmarks/probes/probe_grouped_tiles.py --out $OUT      # H200, ~40 s
    TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/probes/probe_grouped_tiles.py --device cpu --small

The H200 run of ef150b8 put the pipeline's prefill at 203.7 TFLOP/s in its device layers (Mixtral
shape, ~40k prompt tokens, top-2 of 8 experts: ~10k routed slots per expert) against the 785 TFLOP/s
GEMM rate the HRM assumes; moekit.experts.triton_ops.block_sizes gives such steps 64 x 64 x 64 tiles
with Triton's default warps and stages. This probe runs grouped_expert_ffn's two kernels (gate_up +
SwiGLU, down) at the Mixtral and OLMoE expert shapes for several (BLOCK_M, BLOCK_N, BLOCK_K, warps,
stages), checks each against the default tiles' output, and reports TFLOP/s next to torch's dense
bf16 matmul of the same FLOPs (the ceiling a grouped kernel can reach on this device).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common
import common  # noqa: E402

from moekit.experts.triton_ops import block_map, grouped_tiles  # noqa: E402
from moekit.kernels.moe_grouped import down_kernel, gate_up_swiglu_kernel  # noqa: E402

SHAPES = {  # name: (hidden, expert ffn, experts, top-k)
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
    "tiny": (64, 32, 4, 2),  # --small: the interpreter's smoke run
}
TILES = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); None: Triton's default
    (64, 64, 64, None, None),  # the prefill tiles before PREFILL_TILES (8667d98)
    (64, 64, 64, 4, 3),
    (128, 64, 64, 4, 3),
    (128, 64, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 128, 64, 4, 3),
    (128, 256, 64, 8, 3),
]


def run(x, ids, gate_up, down, tile):
    """grouped_expert_ffn's launches before the combine (the combine is the same for every tile)."""
    bm, bn, bk, warps, stages = tile
    opts = {k: v for k, v in (("num_warps", warps), ("num_stages", stages)) if v is not None}
    top_k = ids.shape[1]
    num_experts, two_ffn, hidden = gate_up.shape
    ffn = two_ffn // 2
    order, block_expert, block_start, block_end = block_map(ids, num_experts, bm)
    xs = x[order // top_k].contiguous()
    h = torch.empty(xs.shape[0], ffn, dtype=x.dtype, device=x.device)
    gate_up_swiglu_kernel[(block_expert.shape[0], triton.cdiv(ffn, bn))](
        xs, gate_up, block_expert, block_start, block_end, h, ffn, num_experts,
        xs.stride(0), gate_up.stride(0), gate_up.stride(1), h.stride(0), K=hidden,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION="tf32", **opts)
    y = torch.empty(xs.shape[0], hidden, dtype=x.dtype, device=x.device)
    down_kernel[(block_expert.shape[0], triton.cdiv(hidden, bn))](
        h, down, block_expert, block_start, block_end, y, hidden, num_experts,
        h.stride(0), down.stride(0), down.stride(1), y.stride(0), K=ffn,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_PRECISION="tf32", **opts)
    return y


def probe(name: str, tokens: int, device: str, dtype: torch.dtype) -> dict:
    hidden, ffn, experts, top_k = SHAPES[name]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(tokens, hidden, generator=g) * 0.5).to(device, dtype)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).to(device)
    gate_up = (torch.randn(experts, 2 * ffn, hidden, generator=g) * hidden ** -0.5).to(device, dtype)
    down = (torch.randn(experts, hidden, ffn, generator=g) * ffn ** -0.5).to(device, dtype)
    slots = ids.numel()
    flops = 6 * slots * hidden * ffn
    default = grouped_tiles(slots, experts, dtype)
    want = run(x, ids, gate_up, down, default).float()
    # the ceiling: one dense matmul of the same FLOPs (slots x hidden by hidden x 3 ffn)
    a = torch.randn(slots, hidden, device=device, dtype=dtype)
    b = torch.randn(hidden, 3 * ffn, device=device, dtype=dtype)
    dense_s = common.do_bench_s(lambda: a @ b, device=device)
    rows = []
    for tile in TILES:
        try:
            got = run(x, ids, gate_up, down, tile).float()
            err = float((got - want).norm() / want.norm())
            s = common.do_bench_s(lambda: run(x, ids, gate_up, down, tile), device=device)
            rows.append({"tile": list(tile), "ms": s * 1e3, "tflops": flops / s / 1e12, "rel_err": err})
        except Exception as exc:  # a tile that does not compile (shared memory) is a row, not a crash
            rows.append({"tile": list(tile), "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
        print(f"{name} {tokens} tokens {tile}: {rows[-1]}", flush=True)
    return {"tokens": tokens, "slots": slots, "default_tiles": list(default), "flops": flops,
            "dense_matmul_tflops": flops / dense_s / 1e12, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_output_args(p, "probe_grouped_tiles", device_default="cuda")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--small", action="store_true", help="16 tokens of a tiny shape (a CPU smoke run)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this probe times GPU kernels (give --device cpu --small under TRITON_INTERPRET=1)")
        return 0
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    shapes = ["tiny"] if args.small else [n for n in SHAPES if n != "tiny"]
    tokens = [16] if args.small else args.tokens
    if args.small:
        TILES[:] = TILES[:2]
    out = {"meta": common.run_meta(args, args.device), "shapes": {n: [probe(n, t, args.device, dtype) for t in tokens] for n in shapes}}
    for n, runs in out["shapes"].items():
        for r in runs:
            best = max((row for row in r["rows"] if "tflops" in row), key=lambda row: row["tflops"], default=None)
            print(f"{n} {r['tokens']} tokens: default {r['default_tiles']}, dense matmul {r['dense_matmul_tflops']:.0f} "
                  f"TFLOP/s, best {best['tile'] if best else '-'} {best['tflops'] if best else 0:.0f} TFLOP/s")
    print(f"wrote {common.write_json(out, args.out, 'probe_grouped_tiles')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
