"""Tile sizes for the per-slot decode kernels (moekit.kernels.moe_slots), measured per shape.

    PYTHONPATH=src python3 benchmarks/tune_slot_kernels.py --out $OUT [--shapes new] [--time-budget-s 75]

For each expert shape (batch-1 decode: N = 1 token, A slots), times gate_up (a row of programs per
slot; configs (BLOCK_N, BLOCK_K, num_warps)) and down (one row of programs, each summing the A
slots; the same and SLOTS_PER_STEP: 1, or all A at once) with triton.testing.do_bench (median),
rotating over 8 routings so the chosen experts are not served from L2, and reports achieved GB/s
of expert weights next to the HBM copy rate measured in the same run (the ceiling) and next to
SLOT_DEFAULT (the baseline). Prints the SLOT_TUNED table to paste into experts/triton_ops.py.
`--shapes new` sweeps only the (shape, kernel) pairs SLOT_TUNED lacks (~200 configs). Each pair
gets its share of `--time-budget-s` (default 75, so the run with imports and CUDA start stays
under 90 s; 0: no bound) by its number of configs: a config costs a compile (0.2-0.9 s for sm_90
on a 2-core VM) and ~40 ms of timing; those past the share are skipped (listed in the JSON;
SLOT_DEFAULT goes first).
"""

from __future__ import annotations

import argparse
import itertools
import time

import common  # also puts src/ on sys.path when moekit is not importable
import torch
import triton

from moekit.experts import triton_ops
from moekit.kernels.moe_slots import slot_down_kernel, slot_gate_up_swiglu_kernel

SHAPES = {  # name: (experts, hidden, ffn, top_k); gpt-oss runs the clamped kernels, not these
    "olmoe-1b-7b": (64, 2048, 1024, 8),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "deepseek-v2-lite": (64, 2048, 1408, 6),  # also Qwen1.5-MoE-A2.7B's (2048, 1408) experts, 60 top-4
    "glm-4.5-air": (128, 4096, 1408, 8),
    "qwen2-57b-a14b": (64, 3584, 2560, 8),
    "phi-3.5-moe": (16, 4096, 6400, 2),
    "granite-3.0-3b-a800m": (40, 1536, 512, 8),
}
BLOCK_N = {"gate_up": (2, 4, 8, 16), "down": (1, 2, 4, 8)}  # down has A x fewer programs: narrower rows
WARPS = (4, 8)
PER_THREAD = (32, 128)  # weights a thread loads per K step and matrix (gate_up: 2), fewest and most


def block_ks(k: int) -> tuple[int, ...]:
    """Returns the BLOCK_K to try at K columns: 1024 and 2048 (128 and 256 never won), 512 for K < 1024."""
    return (512, 1024, 2048) if k < 1024 else (1024, 2048)


def grid(kernel: str, hidden: int, ffn: int, top_k: int) -> list[tuple[int, ...]]:
    """Returns the configs to time, SLOT_DEFAULT first (the baseline), then BLOCK_K 1024 before 2048
    before 512, 4 warps before 8, so a budget cuts the least likely. down takes one slot a step or
    all of them (A rounded up to a power of two)."""
    default = triton_ops.SLOT_DEFAULT[kernel]
    if kernel == "gate_up":
        configs = [(bn, bk, w) for bn, bk, w in itertools.product(BLOCK_N[kernel], block_ks(hidden), WARPS)
                   if PER_THREAD[0] <= bn * bk / (32 * w) <= PER_THREAD[1]]
    else:
        all_slots = triton.next_power_of_2(top_k)
        default = (*default[:3], min(default[3], all_slots))
        configs = [(bn, bk, w, g) for bn, bk, w, g in itertools.product(BLOCK_N[kernel], block_ks(ffn), WARPS,
                                                                       sorted({1, all_slots}))
                   if PER_THREAD[0] <= g * bn * bk / (32 * w) <= PER_THREAD[1]]
    configs.sort(key=lambda c: ({1024: 0, 2048: 1}.get(c[1], 2), c[2], c[0]))
    return [default, *(c for c in configs if c != default)]


def torch_reference(x, ids, weights, gate_up, down) -> torch.Tensor:
    """Returns sum_a weights[0,a] * expert_{ids[0,a]}(x[0]) as [1, D] in float32 (one token)."""
    out = torch.zeros(1, x.shape[1], device=x.device)
    for e, wt in zip(ids[0].tolist(), weights[0].float().tolist()):
        gate, up = (gate_up[e].float() @ x[0].float()).chunk(2)
        out[0] += wt * (down[e].float() @ (torch.nn.functional.silu(gate) * up))
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Returns ||got - want|| / ||want|| in float32."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def hbm_copy_bytes_per_s() -> float:
    """Returns the device-to-device copy rate of 1 GiB (read + write counted): the ceiling."""
    src = torch.empty(2**29, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * 2**30 / common.do_bench_s(lambda: dst.copy_(src), warmup=10, rep=50)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    p.add_argument("--shapes", default="all",
                   help="all, new (those SLOT_TUNED lacks) or comma-separated names: " + ", ".join(SHAPES))
    p.add_argument("--time-budget-s", type=float, default=75.0,
                   help="seconds for the whole sweep, shared by (shape, kernel) by number of configs (0: no bound)")
    args = p.parse_args()
    if args.shapes == "all":
        names = list(SHAPES)
    elif args.shapes == "new":
        names = [n for n, (_, d, i, _) in SHAPES.items()
                 if any((k, d, i) not in triton_ops.SLOT_TUNED for k in ("gate_up", "down"))]
    else:
        names = args.shapes.split(",")
        unknown = [n for n in names if n not in SHAPES]
        if unknown:
            p.error(f"--shapes: unknown {unknown}; one of all, new, {', '.join(SHAPES)}")
    # (shape, kernel, its configs); with --shapes new only the kernels SLOT_TUNED lacks at a shape
    plan = [(name, kernel, grid(kernel, *SHAPES[name][1:])) for name in names for kernel in ("gate_up", "down")
            if args.shapes != "new" or (kernel, *SHAPES[name][1:3]) not in triton_ops.SLOT_TUNED]
    total = sum(len(configs) for _, _, configs in plan)
    start = time.perf_counter()
    torch.manual_seed(0)
    ceiling = hbm_copy_bytes_per_s()
    common.log(f"HBM copy {ceiling / 1e9:,.0f} GB/s (the ceiling); {total} configs over {', '.join(names)}")
    results, tuned, skipped, planned = {}, {}, [], 0
    for name in names:
        e, d, i, a = SHAPES[name]
        gate_up = torch.randn(e, 2 * i, d, device="cuda", dtype=torch.bfloat16) * 0.02
        down = torch.randn(e, d, i, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
        routings = [torch.randperm(e, device="cuda")[:a].view(1, a) for _ in range(8)]
        w = torch.rand(1, a, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(a, i, device="cuda", dtype=torch.bfloat16)
        outs = {"gate_up": torch.empty(a, i, device="cuda", dtype=torch.bfloat16),
                "down": torch.empty(1, d, device="cuda", dtype=torch.bfloat16)}
        defaults = (triton_ops.SLOT_DEFAULT["gate_up"], triton_ops.SLOT_DEFAULT["down"])
        ref = triton_ops.slot_expert_ffn(x, routings[0], w, gate_up, down, configs=defaults)
        rel_torch = relative_error(ref, torch_reference(x, routings[0], w, gate_up, down))
        print(f"{name:21s} default vs float32 PyTorch rel err {rel_torch:.2e}", flush=True)
        results.setdefault(name, {})["default_vs_torch_rel_err"] = rel_torch
        for _, kernel, configs in (step for step in plan if step[0] == name):
            planned += len(configs)  # this kernel's share of the budget ends where its configs do
            deadline = start + args.time_budget_s * planned / total if args.time_budget_s else float("inf")
            nbytes = a * (2 if kernel == "gate_up" else 1) * i * d * 2
            best = None
            rows = results.setdefault(name, {}).setdefault(kernel, [])
            for cfg in configs:
                if time.perf_counter() > deadline:
                    skipped.append(f"{name} {kernel} {cfg}")
                    continue
                counter = itertools.count()

                def run():
                    ids = routings[next(counter) % 8].reshape(-1)
                    if kernel == "gate_up":
                        bn, bk, warps = cfg
                        slot_gate_up_swiglu_kernel[(a, triton.cdiv(i, bn))](
                            x, ids, gate_up, ids, outs["gate_up"], i, i * gate_up.stride(1), x.stride(0),
                            gate_up.stride(0), gate_up.stride(1), i, 0, TOP_K=a, K=d, BLOCK_N=bn, BLOCK_K=bk, OFFSETS=False,
                            num_warps=warps)
                    else:
                        bn, bk, warps, per_step = cfg
                        slot_down_kernel[(1, triton.cdiv(d, bn))](
                            h, ids, w.reshape(-1), down, ids, outs["down"], d, i, down.stride(0), down.stride(1), d,
                            0, TOP_K=a, K=i, BLOCK_N=bn, BLOCK_K=bk, SLOTS_PER_STEP=per_step, OFFSETS=False,
                            num_warps=warps)
                try:
                    ms = common.do_bench_s(run, warmup=5, rep=20) * 1e3
                except Exception as err:  # a config that does not compile (registers, shared memory)
                    rows.append({"cfg": list(cfg), "error": str(err)[:200]})
                    continue
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append({"cfg": list(cfg), "us": ms * 1e3, "GB/s": gbs})
                if best is None or ms < best[0]:
                    best = (ms, cfg, gbs)
            if best is None:
                continue
            default = next((r for r in rows if tuple(r["cfg"]) == configs[0] and "us" in r), None)
            base = (f"default {configs[0]} {default['us']:6.1f} us {default['GB/s']:5.0f} GB/s"
                    if default else "default did not run")
            floor_us = nbytes / ceiling * 1e6
            print(f"{name:21s} {kernel:8s} best {str(best[1]):18s} {best[0] * 1e3:6.1f} us {best[2]:5.0f} GB/s "
                  f"({best[2] * 1e9 / ceiling:4.0%} of HBM copy, floor {floor_us:5.1f} us)   {base}", flush=True)
            tuned[(kernel, d, i)] = best[1]
        if ("gate_up", d, i) in tuned or ("down", d, i) in tuned:
            # the tuned pair must compute what the defaults do (both sum the slots in float32, in order)
            pair = tuple(tuned.get((k, d, i)) or triton_ops.slot_config(k, d, i) for k in ("gate_up", "down"))
            out = triton_ops.slot_expert_ffn(x, routings[0], w, gate_up, down, configs=pair)
            rel = relative_error(out, ref)
            print(f"{name:21s} tuned vs default rel err {rel:.2e}", flush=True)
            results[name]["tuned_vs_default_rel_err"] = rel
        gate_up = down = None  # this shape's experts go before the next one's are made
        torch.cuda.empty_cache()
    elapsed = time.perf_counter() - start
    common.log(f"swept in {elapsed:.0f} s" + (f"; {len(skipped)} configs skipped past the budget" if skipped else ""))
    print("\nSLOT_TUNED = {")
    for (kernel, d, i), cfg in tuned.items():
        print(f'    ("{kernel}", {d}, {i}): {cfg},')
    print("}")
    common.write_json({"meta": common.run_meta(args, "cuda"), "hbm_copy_bytes_per_s": ceiling, "results": results,
                       "elapsed_s": elapsed, "skipped": skipped,
                       "tuned": {f"{k}:{d}x{i}": v for (k, d, i), v in tuned.items()}}, args.out, "tune_slot_kernels")


if __name__ == "__main__":
    main()
