"""Times the matmul of a compressed expert above the fused kernels' 64 tokens: the decode kernels
(ops.code_weight_triton / int_weight_triton) against their HBM floor and the PyTorch decodes they
replace, then per token count the decode path (decode + bf16 F.linear) against the fused kernel
over 64-token chunks and bf16 F.linear alone, on a GPU. The crossover sets ops.CODE_CHUNKED_MAX_TOKENS.

    PYTHONPATH=src python3 benchmarks/probes/bench_decode_path.py [--json] [--shapes mixtral]

Not collected by pytest (no test_ prefix); it belongs in benchmarks/ once measured.
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from moekit.quant import ops
from moekit.quant.code import build_dictionary, encode, symbol_probabilities
from moekit.quant.gptq import rtn_quantize
from moekit.quant.grids import IntGrid, TernaryGrid, pack_codes

SHAPES = {"mixtral gate/up": (14336, 4096), "mixtral down": (4096, 14336),
          "qwen3 gate/up": (768, 2048), "qwen3 down": (2048, 768)}
TOKENS = (64, 65, 96, 128, 192, 256, 512)
HBM_BYTES_PER_S = 4.2e12  # benchmarks/common.py: H200 device-to-device copy, read + write counted


def us(fn, rep: int = 50) -> float:
    """Returns the median microseconds of one call (L2 flushed before each)."""
    return 1e3 * do_bench(fn, warmup=5, rep=rep, return_mode="median")


def peak_bytes(fn) -> int:
    """Returns the bytes allocated at the peak of one call beyond what was held before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - held


def chunked(linear, x, *parts):
    """The fused kernel over 64-token chunks."""
    return torch.cat([linear(x[i:i + ops.KERNEL_MAX_TOKENS], *parts) for i in range(0, x.shape[0], 64)])


def decode_then_linear(weight, x, cols, *parts):
    """The decode path: the decode kernel, then one bf16 matmul."""
    return F.linear(x, weight(*parts, cols, torch.bfloat16))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--shapes", default="", help="only shapes whose name contains this")
    args = ap.parse_args()
    results = []
    for name, (rows, cols) in SHAPES.items():
        if args.shapes not in name:
            continue
        w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)) * 0.02).cuda()
        tq = rtn_quantize(w[None], TernaryGrid())
        d = build_dictionary(symbol_probabilities(tq.codes), 8)
        code = (*encode(tq.codes[0], d), tq.params[0][0, :, 0].half(), tq.params[1][0, :, 0].half(), d.table.cuda())
        q = rtn_quantize(w[None], IntGrid(4, 128))
        int4 = (pack_codes(q.codes[0], 4), q.params[0][0].half(), q.params[1][0].to(torch.uint8), 4)
        dense = rows * cols * 2
        for form, parts, weight, reference, fused, stored, writes in (
                ("code", code, ops.code_weight_triton, ops.code_weight_reference, ops.code_linear_triton,
                 sum(t.numel() * t.element_size() for t in code), 2 * dense),  # memset + nonzeros
                ("int4", int4, ops.int_weight_triton, ops.int_weight_reference, ops.int_linear_triton,
                 sum(t.numel() * t.element_size() for t in int4[:3]), dense)):
            ours, theirs = partial(weight, *parts, cols, torch.bfloat16), partial(reference, *parts, cols, torch.bfloat16)
            wt = ours()
            row = {"shape": name, "form": form, "exact": torch.equal(wt, theirs()),
                   "decode_us": us(ours), "floor_us": 1e6 * (stored + writes) / HBM_BYTES_PER_S,
                   "torch_decode_us": us(theirs, rep=1),
                   "decode_peak_MB": peak_bytes(ours) / 1e6, "torch_decode_peak_MB": peak_bytes(theirs) / 1e6,
                   "tokens": {}}
            for b in TOKENS:
                x = torch.randn(b, cols, device="cuda", dtype=torch.bfloat16)
                row["tokens"][b] = {
                    "bf16_us": us(partial(F.linear, x, wt)),
                    "decode_path_us": us(partial(decode_then_linear, weight, x, cols, *parts)),
                    "chunked_us": us(partial(chunked, fused, x, *parts))}
            results.append(row)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for r in results:
        print(f"{r['shape']:16} {r['form']:5} decode {r['decode_us']:8.1f} us (HBM floor {r['floor_us']:.1f}, "
              f"peak {r['decode_peak_MB']:.0f} MB, exact {r['exact']}); PyTorch decode {r['torch_decode_us']:9.1f} us "
              f"(peak {r['torch_decode_peak_MB']:.0f} MB)")
        for b, t in r["tokens"].items():
            print(f"    {b:4d} tokens: decode+bf16 {t['decode_path_us']:8.1f} us   64-token chunks "
                  f"{t['chunked_us']:8.1f} us   bf16 alone {t['bf16_us']:7.1f} us")


if __name__ == "__main__":
    main()
