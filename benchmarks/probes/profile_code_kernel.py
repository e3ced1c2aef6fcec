"""Where the sub-1-bit code kernel spends its time at batch 1 (mixtral gate/up, 14336 x 4096).

    PYTHONPATH=src python3 benchmarks/probes/profile_code_kernel.py --out $OUT            # H200
    PYTHONPATH=src python3 benchmarks/probes/profile_code_kernel.py --sweep --out $OUT    # every shape, 8/16-bit
    ncu --section SpeedOfLight --section Occupancy --section LaunchStats \\
        -k regex:code_matmul -c 1 python3 benchmarks/probes/profile_code_kernel.py --once

Random weights rounded to ternary (RTN) and coded with a 16-bit dictionary, as bench_compress does.
Without --once it times the kernel (do_bench, median) next to torch bf16 F.linear, and counts, on
the host, what the kernel's rounds do: nonzero symbols per codeword and rounds per step (a step
pops one nonzero of every codeword of its [BLOCK_R, words per step] tile until none is left), so
the share of lanes doing useful work is known. With --once it runs the kernel once (for ncu). With --sweep it times, at the four expert shapes of
tune_quant_kernels.py and with 8- and 16-bit dictionaries, the tuned batch-1 tile and every tile of
SWEEP next to bf16 (a 16-bit dictionary's 512 KB table is gathered from L2, an 8-bit one's 2 KB from
L1: compress picks whichever codes a matrix smaller), checking each against the reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common
import common  # noqa: E402

from moekit.quant import ops  # noqa: E402
from moekit.quant.code import build_dictionary, encode, symbol_probabilities  # noqa: E402
from moekit.quant.gptq import rtn_quantize  # noqa: E402
from moekit.quant.grids import TernaryGrid  # noqa: E402

ROWS, COLS = 14336, 4096
SHAPES = {"mixtral gate/up": (14336, 4096), "mixtral down": (4096, 14336),
          "qwen3 gate/up": (768, 2048), "qwen3 down": (2048, 768)}
SWEEP = [  # (BLOCK_R, codewords per row per step, warps): 8-bit words are read 4 to a lane, so one-warp
    # tiles of 128 words give every thread one lane
    (4, 32, 1), (2, 64, 1), (1, 128, 1), (2, 32, 1), (1, 64, 1), (8, 32, 1), (4, 64, 1), (2, 128, 1),
    (1, 256, 1), (8, 32, 2), (4, 64, 2), (2, 128, 2), (16, 32, 4), (8, 64, 4), (4, 128, 4), (8, 128, 4)]


def bench_us(fn) -> float:
    """Returns the median microseconds of one call of fn (do_bench: L2 flushed before each call)."""
    return common.do_bench_s(fn, warmup=10, rep=50) * 1e6


def build(device, rows=ROWS, cols=COLS, bits=16):
    w = torch.randn(1, rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02
    q = rtn_quantize(w.to(device), TernaryGrid())
    probs = symbol_probabilities(q.codes)
    d = build_dictionary(probs, bits)
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


def sweep(device, out: str | None) -> dict:
    """Times the tuned batch-1 tile and every SWEEP tile at each shape and dictionary width."""
    res: dict = {"meta": common.run_meta(None, device), "device": common.device_name(device),
                 "torch": torch.__version__, "shapes": {}}
    for name, (rows, cols) in SHAPES.items():
        for bits in (8, 16):
            w, parts, d, probs = build(device, rows, cols, bits)
            x = torch.randn(1, cols, device=device, dtype=torch.bfloat16)
            ref = ops.code_linear_reference(x.float(), *parts)
            tuned = ops.code_config(rows, cols, 1)
            entry = {"bits_per_param": 8 * sum(t.numel() * t.element_size() for t in parts) / (rows * cols),
                     "chunk": parts[0].shape[-1], "bf16_us": bench_us(lambda: F.linear(x, w)), "tuned": list(tuned),
                     "configs": {}}
            for cfg in [tuned] + [c for c in SWEEP if c != tuned]:
                got = ops.code_linear_triton(x, *parts, config=cfg).float()
                err = ((got - ref).norm() / ref.norm()).item()
                us = bench_us(lambda: ops.code_linear_triton(x, *parts, config=cfg)) if err < 2e-2 else None
                entry["configs"][str(cfg)] = {"us": us, "rel_err": err}
            timed = {k: v["us"] for k, v in entry["configs"].items() if v["us"] is not None}
            best = min(timed, key=timed.get)
            entry.update(best=best, best_us=timed[best], tuned_us=timed.get(str(tuned)),
                         speedup_best=entry["bf16_us"] / timed[best])
            res["shapes"][f"{name} {bits}-bit"] = entry
            print(f"{name:16s} {bits:2d}-bit {entry['bits_per_param']:.3f} b/p  bf16 {entry['bf16_us']:6.1f} us  "
                  f"tuned {tuned} {entry['tuned_us'] or float('nan'):6.1f} us  best {best} {timed[best]:6.1f} us "
                  f"(x{entry['speedup_best']:.2f})", flush=True)
            del w, parts
    if out:
        common.write_json(res, out, "profile_code_sweep")
    return res


BATCH_SWEEP = [(4, 32, 1), (2, 64, 1), (1, 128, 1), (8, 32, 2), (4, 64, 2), (2, 128, 2), (8, 64, 4), (16, 32, 4),
               (4, 128, 4), (8, 128, 4)]


def batch_sweep(device, out: str | None, batches=(2, 4, 8, 16, 64)) -> dict:
    """Times the code kernel at batch > 1 on mixtral's shapes (8-bit dictionaries) over BATCH_SWEEP,
    packed (four codewords to an int32) and byte-wise (the same codewords at an odd address), next
    to bf16."""
    res: dict = {"meta": common.run_meta(None, device), "device": common.device_name(device),
                 "torch": torch.__version__, "shapes": {}}
    for name in ("mixtral gate/up", "mixtral down"):
        rows, cols = SHAPES[name]
        w, parts, d, probs = build(device, rows, cols, 8)
        words = parts[0]
        shifted = torch.zeros(words.numel() + 1, dtype=torch.uint8, device=device)
        shifted[1:] = words.reshape(-1)
        bytewise = (shifted[1:].view(words.shape), *parts[1:])
        for b in batches:
            x = torch.randn(b, cols, device=device, dtype=torch.bfloat16)
            ref = ops.code_linear_reference(x.float(), *parts)
            entry = {"bf16_us": bench_us(lambda: F.linear(x, w)), "tuned": list(ops.code_config(rows, cols, b)),
                     "packed": {}, "bytewise": {}}
            for cfg in [tuple(entry["tuned"])] + [c for c in BATCH_SWEEP if c != tuple(entry["tuned"])]:
                for kind, ps in (("packed", parts), ("bytewise", bytewise)):
                    got = ops.code_linear_triton(x, *ps, config=cfg).float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    us = bench_us(lambda: ops.code_linear_triton(x, *ps, config=cfg)) if err < 2e-2 else None
                    entry[kind][str(cfg)] = {"us": us, "rel_err": err}
            best = {k: min((v["us"], c) for c, v in entry[k].items() if v["us"] is not None) for k in ("packed", "bytewise")}
            entry["best"] = {k: {"us": v[0], "config": v[1]} for k, v in best.items()}
            res["shapes"][f"{name} batch {b}"] = entry
            print(f"{name:16s} B={b:2d} bf16 {entry['bf16_us']:6.1f} us  packed {best['packed'][0]:6.1f} {best['packed'][1]}"
                  f"  bytewise {best['bytewise'][0]:6.1f} {best['bytewise'][1]}", flush=True)
        del w, parts, bytewise
    if out:
        common.write_json(res, out, "profile_code_batches")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--once", action="store_true", help="run the kernel once (under ncu)")
    ap.add_argument("--sweep", action="store_true", help="every shape, 8- and 16-bit dictionaries, a tile grid")
    ap.add_argument("--batches", action="store_true", help="batch 2-64 on mixtral's shapes, packed vs byte-wise")
    ap.add_argument("--bits", type=int, default=8, choices=(8, 16),
                    help="dictionary width (8: what compress picks for RTN ternary at this shape; 0.635 vs 0.799 bits)")
    args = ap.parse_args()
    device = torch.device("cuda")
    if args.sweep:
        sweep(device, args.out)
        return
    if args.batches:
        batch_sweep(device, args.out)
        return
    w, parts, d, probs = build(device, bits=args.bits)
    x = torch.randn(1, COLS, device=device, dtype=torch.bfloat16)
    ops.code_linear_triton(x, *parts)  # compile
    torch.cuda.synchronize()
    if args.once:
        ops.code_linear_triton(x, *parts)
        torch.cuda.synchronize()
        return
    config = ops.code_config(ROWS, COLS, 1)
    res = {"shape": [ROWS, COLS], "dictionary_bits": args.bits, "p_zero": probs[0], "config": list(config),
           "code_us": bench_us(lambda: ops.code_linear_triton(x, *parts)), "bf16_us": bench_us(lambda: F.linear(x, w)),
           "code_bytes": sum(t.numel() * t.element_size() for t in parts)}
    res.update(lane_stats(parts, d, config))
    print(json.dumps(res, indent=1))
    if args.out:
        common.write_json({"meta": common.run_meta(args, device), **res}, args.out, "profile_code_kernel")


if __name__ == "__main__":
    main()
