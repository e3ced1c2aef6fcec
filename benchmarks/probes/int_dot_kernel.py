"""Per-expert time of the native int-N expert kernel at batch 1 (issue 12): one token through top-8
int4 g128 experts of an OLMoE layer's shapes (gate_up [2 * 1024, 2048], down [2048, 1024]) on one
thread, with int8 and with float activations (native/int_dot.h, compressed.int_ffn), the weights
read from DRAM (--experts distinct experts cycled, past the L3) or from cache (one expert eight
times). Each figure is printed next to its ceiling measured in the same run: one thread summing a
buffer of --stream-mb MB from DRAM (GB/s).

Why: on a 2-core EPYC VM (H12) the int8 kernel ran at ~12 GB/s of int4 weights from DRAM, the
ceiling's rate, and ~2x that from cache; restructurings of the kernel that did not read faster from
DRAM did not show in a layer.

    cd /work/main && PYTHONPATH=src nice python3 benchmarks/probes/int_dot_kernel.py   # ~20 s on CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from moekit.native import compressed as nc
from moekit.native.experts import Scratch
from moekit.quant.grids import pack_codes

HIDDEN, FFN, GROUP, TOP_K = 2048, 1024, 128, 8  # OLMoE-1B-7B's layer, compress's int4 g128


def int4_matrix(rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (qweight, scale, zero) of a random int4 [rows, cols] matrix in groups of GROUP columns."""
    codes = torch.randint(0, 16, (rows, cols), generator=g)
    scale = (torch.rand(rows, cols // GROUP, generator=g) * 0.02 + 0.001).to(torch.float16)
    zero = torch.randint(0, 16, (rows, cols // GROUP), generator=g).to(torch.uint8)
    return pack_codes(codes, 4).contiguous(), scale, zero


def expert_bytes(expert) -> int:
    return sum(t.numel() * t.element_size() for part in expert for t in part)


def per_expert_s(experts, x: torch.Tensor, dot: str, calls: int, repeats: int) -> float:
    """Returns the least thread CPU seconds per expert over `repeats` runs of `calls` calls of TOP_K jobs."""
    scratch, best = Scratch(), float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for call in range(calls):
            jobs = [(*experts[(call * TOP_K + a) % len(experts)], [0], [1.0 / TOP_K]) for a in range(TOP_K)]
            nc.int_ffn(x, jobs, 4, threads=1, scratch=scratch, dot=dot)
        best = min(best, (time.thread_time() - start) / calls / TOP_K)
    return best


def stream_gbs(megabytes: int, repeats: int) -> float:
    """Returns one thread's read rate (GB/s) summing a buffer of `megabytes` MB, best of `repeats`."""
    buf = torch.ones(megabytes * 2**20 // 8, dtype=torch.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return buf.numel() * 8 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=32, help="distinct experts cycled for the DRAM case (3 MB each)")
    parser.add_argument("--calls", type=int, default=40, help="layer calls per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stream-mb", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    experts = [(int4_matrix(2 * FFN, HIDDEN, g), int4_matrix(HIDDEN, FFN, g)) for _ in range(args.experts)]
    x = torch.randn(1, HIDDEN, generator=g)
    size = expert_bytes(experts[0])
    ceiling = stream_gbs(args.stream_mb, args.repeats)
    rows = []
    for where, pool in (("dram", experts), ("cache", experts[:1])):
        for dot in ("int8", "float"):
            s = per_expert_s(pool, x, dot, args.calls, args.repeats)
            rows.append({"weights_from": where, "dot": dot, "us_per_expert": s * 1e6, "weight_gbs": size / s / 1e9})
    result = {"isa": nc.int_dot_isa(), "expert_bytes": size, "one_thread_stream_gbs": ceiling, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"int-N kernel, 1 token x top-{TOP_K}, one thread, {size / 2**20:.2f} MiB per expert, isa {result['isa']}; "
          f"ceiling: one-thread DRAM read {ceiling:.1f} GB/s")
    print(f"{'weights':>8} {'dot':>6} {'us/expert':>10} {'GB/s':>6} {'of ceiling':>10}")
    for row in rows:
        print(f"{row['weights_from']:>8} {row['dot']:>6} {row['us_per_expert']:10.1f} {row['weight_gbs']:6.1f} "
              f"{row['weight_gbs'] / ceiling:10.2f}")


if __name__ == "__main__":
    main()
