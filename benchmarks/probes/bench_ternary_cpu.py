"""Times the native ternary-code expert kernel (native/compressed.cpp) on one OLMoE-shaped layer at batch 1.

    PYTHONPATH=src .venv/bin/python benchmarks/probes/bench_ternary_cpu.py [--threads 1 2] [--repeats 7] [--json]

A layer's top-8 experts (gate_up [2I, D] = 2048 x 2048, down [D, I] = 2048 x 1024 each), ternary
codes drawn at random with p(0) = 0.885 (QMoE's figure for GPTQ-ternary experts), coded with the
encoder's own dictionary (8-bit, and 16-bit with --bits 16). One token. For each thread count it
prints the best of `repeats` timings (the machine is shared) as weights/s and code bytes/s (the
stored bytes one call reads), next to the int4 kernel on the same layer (the baseline in the same
run) and a stream read of as many bytes (the ceiling). The load average is printed beside them.

Shapes: D hidden, I expert ffn width, E experts of the layer (top-8 used).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from moekit import native
from moekit.native import compressed as nc
from moekit.quant.code import build_dictionary, encode, symbol_probabilities
from moekit.quant.grids import HI, LO, ZERO, pack_codes

D, I, TOP_K = 2048, 1024, 8  # OLMoE: hidden, expert ffn width, experts per token
P_ZERO = 0.885


def ternary_codes(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """Returns random ternary codes [rows, cols] (uint8) with p(ZERO) = P_ZERO, LO and HI alike."""
    u = torch.rand(rows, cols, generator=g)
    nonzero = 1 - P_ZERO
    return torch.where(u < nonzero / 2, LO, torch.where(u < nonzero, HI, ZERO)).to(torch.uint8)


def code_layer(bits: int, seed: int = 0):
    """Returns (jobs, table) of TOP_K ternary-code experts, one token routed to all."""
    g = torch.Generator().manual_seed(seed)
    mats = [(ternary_codes(2 * I, D, g), ternary_codes(D, I, g)) for _ in range(TOP_K)]
    d = build_dictionary(symbol_probabilities(torch.cat([m.flatten() for pair in mats for m in pair])), bits)
    jobs = []
    for gate_up, down in mats:
        parts = []
        for codes in (gate_up, down):
            lo = (-torch.rand(codes.shape[0], generator=g) * 0.05 - 0.01).to(torch.float16)
            hi = (torch.rand(codes.shape[0], generator=g) * 0.05 + 0.01).to(torch.float16)
            parts.append((*encode(codes, d), lo, hi))
        jobs.append((parts[0], parts[1], [0], [1.0 / TOP_K]))
    return jobs, d.table


def int4_layer(seed: int = 0):
    """Returns int4 jobs (one scale group per row) of the same shapes: the baseline kernel."""
    g = torch.Generator().manual_seed(seed)

    def matrix(rows, cols):
        codes = torch.randint(0, 16, (rows, cols), generator=g)
        return (pack_codes(codes, 4), (torch.rand(rows, 1, generator=g) * 0.01).half(),
                torch.full((rows, 1), 8, dtype=torch.uint8))

    return [(matrix(2 * I, D), matrix(D, I), [0], [1.0 / TOP_K]) for _ in range(TOP_K)]


def best_seconds(fn, repeats: int, inner: int = 20) -> float:
    """Returns the best over `repeats` of the mean seconds of `inner` calls of fn."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def stream_gbs(nbytes: int, threads: int, repeats: int) -> float:
    """Returns GB/s of the native stream read over nbytes (the memory ceiling of one call)."""
    buf = torch.ones(nbytes // 4)
    lib = native.library()
    s = best_seconds(lambda: lib.moekit_stream_read(buf.data_ptr(), buf.numel() * 4, threads), repeats)
    return nbytes / s / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bits", type=int, nargs="+", default=[8], help="codeword bits of the dictionary (8, 16)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if native.library() is None:
        raise SystemExit(f"no native library: {native.unavailable_reason()}")
    weights = TOP_K * (2 * I * D + D * I)
    x = torch.randn(1, D)
    int_jobs = int4_layer()
    int_bytes = nc.stored_bytes(int_jobs)
    rows = []
    for bits in args.bits:
        jobs, table = code_layer(bits)
        code_bytes = nc.stored_bytes(jobs)
        err = (nc.code_ffn(x, jobs, table, threads=1) - nc.code_reference(x, jobs, table)).abs().max().item()
        for t in args.threads:
            scratch = nc.Scratch()
            s = best_seconds(lambda j=jobs, tb=table, t=t, s=scratch: nc.code_ffn(x, j, tb, threads=t, scratch=s),
                             args.repeats)
            si = best_seconds(lambda t=t, s=scratch: nc.int_ffn(x, int_jobs, 4, threads=t, scratch=s), args.repeats)
            rows.append({"bits": bits, "threads": t, "us": s * 1e6, "gweights_s": weights / s / 1e9,
                         "code_gb_s": code_bytes / s / 1e9, "bits_per_weight": 8 * code_bytes / weights,
                         "int4_us": si * 1e6, "int4_gweights_s": weights / si / 1e9,
                         "stream_gb_s": stream_gbs(code_bytes, t, args.repeats), "max_abs_err": err,
                         "load_avg": os.getloadavg()[0]})
    if args.json:
        print(json.dumps({"int4_bytes": int_bytes, "rows": rows}, indent=1))
        return
    print(f"OLMoE-shaped layer, top-{TOP_K} experts, 1 token, p(0) = {P_ZERO}; best of {args.repeats}")
    print(f"{'bits':>4} {'thr':>3} {'us':>8} {'Gw/s':>6} {'code GB/s':>9} {'b/w':>5} {'int4 us':>8} {'int4 Gw/s':>9} "
          f"{'stream GB/s':>11} {'err':>8} {'load':>5}")
    for r in rows:
        print(f"{r['bits']:>4} {r['threads']:>3} {r['us']:8.0f} {r['gweights_s']:6.2f} {r['code_gb_s']:9.3f} "
              f"{r['bits_per_weight']:5.2f} {r['int4_us']:8.0f} {r['int4_gweights_s']:9.2f} {r['stream_gb_s']:11.1f} "
              f"{r['max_abs_err']:8.1e} {r['load_avg']:5.2f}")


if __name__ == "__main__":
    main()
