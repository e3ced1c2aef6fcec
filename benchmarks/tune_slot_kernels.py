"""Tile sizes for the per-slot decode kernels (moekit.kernels.moe_slots), measured per shape.

    PYTHONPATH=src python3 benchmarks/tune_slot_kernels.py --out $OUT

For each expert shape (batch-1 decode: N = 1 token, A slots), times gate_up and down over
(BLOCK_N, BLOCK_K, num_warps) with triton.testing.do_bench (median), rotating over 8 routings
so the chosen experts are not served from L2, and reports achieved GB/s of expert weights
against the HBM copy rate. Prints the SLOT_TUNED table to paste into experts/triton_ops.py.
"""

from __future__ import annotations

import argparse
import itertools

import common  # also puts src/ on sys.path when moekit is not importable
import torch
import triton

from moekit.experts import triton_ops
from moekit.kernels.moe_slots import slot_down_kernel, slot_gate_up_swiglu_kernel

SHAPES = {  # name: (experts, hidden, ffn, top_k)
    "olmoe-1b-7b": (64, 2048, 1024, 8),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
}
BLOCK_N = (2, 4, 8, 16)
BLOCK_K = (128, 256, 512, 1024)
WARPS = (4, 8)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    args = p.parse_args()
    torch.manual_seed(0)
    results, tuned = {}, {}
    for name, (e, d, i, a) in SHAPES.items():
        gate_up = torch.randn(e, 2 * i, d, device="cuda", dtype=torch.bfloat16) * 0.02
        down = torch.randn(e, d, i, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
        routings = [torch.randperm(e, device="cuda")[:a].view(1, a) for _ in range(8)]
        w = torch.full((1, a), 1.0 / a, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(a, i, device="cuda", dtype=torch.bfloat16)
        outs = {"gate_up": torch.empty(a, i, device="cuda", dtype=torch.bfloat16),
                "down": torch.empty(a, d, device="cuda", dtype=torch.bfloat16)}
        ref = triton_ops.slot_expert_ffn(x, routings[0], w, gate_up, down, configs=(triton_ops.SLOT_DEFAULT,) * 2)
        for kernel, nbytes in (("gate_up", a * 2 * i * d * 2), ("down", a * d * i * 2)):
            best = None
            grid = list(itertools.product(BLOCK_N, BLOCK_K, WARPS))
            if triton_ops.SLOT_DEFAULT not in grid:  # always measured: it is the baseline
                grid.append(triton_ops.SLOT_DEFAULT)
            for bn, bk, warps in grid:
                counter = itertools.count()

                def run():
                    ids = routings[next(counter) % 8].reshape(-1)
                    if kernel == "gate_up":
                        slot_gate_up_swiglu_kernel[(a, triton.cdiv(i, bn))](
                            x, ids, gate_up, ids, outs["gate_up"], i, x.stride(0), gate_up.stride(0),
                            gate_up.stride(1), i, 0, TOP_K=a, K=d, BLOCK_N=bn, BLOCK_K=bk, OFFSETS=False,
                            num_warps=warps)
                    else:
                        slot_down_kernel[(a, triton.cdiv(d, bn))](
                            h, ids, w.reshape(-1), down, ids, outs["down"], d, i, down.stride(0), down.stride(1), d,
                            0, K=i, BLOCK_N=bn, BLOCK_K=bk, OFFSETS=False, num_warps=warps)
                try:
                    ms = common.do_bench_s(run, warmup=10, rep=40) * 1e3
                except Exception as err:  # a config that does not compile (registers, shared memory)
                    results.setdefault(name, {}).setdefault(kernel, []).append(
                        {"cfg": [bn, bk, warps], "error": str(err)[:200]})
                    continue
                gbs = nbytes / (ms * 1e-3) / 1e9
                results.setdefault(name, {}).setdefault(kernel, []).append({"cfg": [bn, bk, warps], "us": ms * 1e3, "GB/s": gbs})
                if best is None or ms < best[0]:
                    best = (ms, (bn, bk, warps), gbs)
            default = next(r for r in results[name][kernel] if tuple(r["cfg"]) == triton_ops.SLOT_DEFAULT)
            print(f"{name:15s} {kernel:8s} best {best[1]} {best[0] * 1e3:7.1f} us {best[2]:7.0f} GB/s"
                  f"   default {tuple(default['cfg'])} {default['us']:7.1f} us {default['GB/s']:7.0f} GB/s", flush=True)
            tuned[(kernel, d, i)] = best[1]
        # the tuned pair must compute the same thing as the default
        out = triton_ops.slot_expert_ffn(x, routings[0], w, gate_up, down,
                                         configs=(tuned[("gate_up", d, i)], tuned[("down", d, i)]))
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"{name:15s} tuned vs default rel err {rel:.2e}", flush=True)
        results[name]["tuned_vs_default_rel_err"] = rel
        del gate_up, down
        torch.cuda.empty_cache()
    print("\nSLOT_TUNED = {")
    for (kernel, d, i), cfg in tuned.items():
        print(f'    ("{kernel}", {d}, {i}): {cfg},')
    print("}")
    common.write_json({"meta": common.run_meta(args, "cuda"), "results": results,
                       "tuned": {f"{k}:{d}x{i}": v for (k, d, i), v in tuned.items()}}, args.out, "tune_slot_kernels")


if __name__ == "__main__":
    main()
