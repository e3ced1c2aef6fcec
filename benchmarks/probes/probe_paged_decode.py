"""Times the paged decode attention kernels (tensor-core dots, issue 13) against their HBM floor.

    PYTHONPATH=src python3 benchmarks/probes/probe_paged_decode.py --out $OUT          # H200, ~1 min
    PYTHONPATH=src python3 benchmarks/probes/probe_paged_decode.py --sweep --out $OUT  # + stages x warps

One layer of moekit.paged_attention.decode_attention_triton at the qwen3-30b-a3b (32 query heads,
4 kv heads, Dh 128) and OLMoE (16 / 16 / 128) shapes, bf16, B = 1, 8, 32, 128 sequences with
contexts uniform in 32..640 and their blocks scattered over a pool (the setup of
benchmarks/serve_measure.py attention_splits): the split count the GPU picks (decode_splits) and
the one-pass kernel (splits 1), each next to the floor of reading the keys and values once at the
HBM copy rate and to the broadcast-product kernel's time before this change (bench_serve.py on the
H200, same setup). Each row's max |error| against decode_attention_reference is printed too.
With --sweep, the auto split is also timed under num_stages 1..3 x num_warps 4, 8. Off CUDA it
says so and exits 0.

Shapes: B = sequences, H = query heads, Hkv = kv heads, Dh = head dim, BS = positions per block.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common
import common

MODELS = {"qwen3-30b-a3b": (32, 4, 128), "olmoe": (16, 16, 128)}  # (H, Hkv, Dh)
BATCHES = (1, 8, 32, 128)
CONTEXTS = (32, 640)  # uniform in [lo, hi]
BLOCK_SIZE = 16
# the [G, N, Dh] broadcast-product kernel before this change, us (one pass, split), H200
BEFORE_US = {"qwen3-30b-a3b": {1: (150.8, 23.8), 8: (259.0, 66.0), 32: (249.0, 218.0), 128: (693.0, 693.0)},
             "olmoe": {1: (47.5, 109.0), 8: (52.0, 107.0), 32: (92.6, 92.6), 128: (253.6, 253.6)}}


def setup(b: int, heads: int, kv_heads: int, head_dim: int, device: torch.device, g: torch.Generator) -> tuple:
    """Returns (q, keys, values, tables, context_lens, window) of one decode step of b sequences."""
    lo, hi = CONTEXTS
    ctx = torch.randint(lo, hi + 1, (b,), generator=g)
    width = -(-hi // BLOCK_SIZE)
    pool = b * width + 1
    keys = torch.randn(pool, BLOCK_SIZE, kv_heads, head_dim, device=device, dtype=torch.bfloat16)  # [NB, BS, Hkv, Dh]
    values = torch.randn_like(keys)
    tables = torch.randperm(pool - 1, generator=g)[:b * width].view(b, width).to(device, torch.int32) + 1  # [B, MB]
    q = torch.randn(b, heads, head_dim, device=device, dtype=torch.bfloat16)  # [B, H, Dh]
    return q, keys, values, tables, ctx.to(device, torch.int32), None


def with_launch(fn, **override):
    """Returns fn run with decode_launch's stages / warps replaced by `override`."""
    import moekit.paged_attention as pa

    def run():
        original = pa.decode_launch
        pa.decode_launch = lambda *a, **k: {**original(*a, **k), **override}
        try:
            return fn()
        finally:
            pa.decode_launch = original
    return run


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_output_args(p, "probe_paged_decode")
    p.add_argument("--sweep", action="store_true", help="also time the auto split under num_stages x num_warps")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        print("probe_paged_decode: the Triton decode kernels are timed on CUDA only; nothing to do here")
        return 0
    from moekit.paged_attention import (
        decode_attention_reference,
        decode_attention_triton,
        decode_splits,
    )

    g = torch.Generator().manual_seed(0)
    res: dict = {"meta": common.run_meta(args, device), "hbm_bytes_per_s": common.HBM_BYTES_PER_S, "rows": []}
    table = []
    for model, (h, hkv, dh) in MODELS.items():
        for b in BATCHES:
            args_ = setup(b, h, hkv, dh, device, g)
            q, keys, values, tables, ctx, window = args_
            auto = decode_splits(b, hkv, device)
            expected = decode_attention_reference(q.float(), keys.float(), values.float(), tables, ctx, window)
            error = max(float((decode_attention_triton(*args_, splits=s).float() - expected).abs().max())
                        for s in {1, auto})
            one = common.do_bench_s(partial(decode_attention_triton, *args_, splits=1))
            split = common.do_bench_s(partial(decode_attention_triton, *args_, splits=auto)) if auto > 1 else one
            floor = 2 * int(ctx.sum()) * hkv * dh * keys.element_size() / common.HBM_BYTES_PER_S  # K and V once
            row = {"model": model, "batch": b, "splits": auto, "mean_context": float(ctx.float().mean()),
                   "one_pass_us": 1e6 * one, "split_us": 1e6 * split, "floor_us": 1e6 * floor,
                   "before_one_pass_us": BEFORE_US[model][b][0], "before_split_us": BEFORE_US[model][b][1],
                   "max_abs_error": error}
            if args.sweep:
                row["sweep_us"] = {
                    f"stages{s}_warps{w}": 1e6 * common.do_bench_s(with_launch(
                        partial(decode_attention_triton, *args_, splits=auto), num_stages=s, num_warps=w))
                    for s in (1, 2, 3) for w in (4, 8)}
            res["rows"].append(row)
            table.append([model, b, auto, f"{one * 1e6:.1f}", f"{split * 1e6:.1f}", f"{floor * 1e6:.1f}",
                          f"{BEFORE_US[model][b][0]:.1f} / {BEFORE_US[model][b][1]:.1f}",
                          f"{floor / min(one, split):.0%}", f"{error:.1e}"])
            print(model, f"b{b}", {k: v for k, v in row.items() if k not in ("model", "batch")}, flush=True)
            del args_, q, keys, values, expected
            common.free_memory(device)
    print(common.markdown_table(["model", "B", "splits", "one pass us", "split us", "HBM floor us",
                                 "before us (one / split)", "floor / best", "max |err|"], table))
    print("wrote", common.write_json(res, args.out, "probe_paged_decode"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
