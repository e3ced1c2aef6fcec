"""The CPU expert kernel on host-store-like memory in 4 KB pages against 2 MB pages (issue 12: the
offload host store is advised into huge pages since 38d826c; CPU misses stream it).

    PYTHONPATH=src python3 benchmarks/probes/probe_store_pages.py --threads 2 --out /tmp/p   # ~20 s
    PYTHONPATH=src python3 benchmarks/probes/probe_store_pages.py --threads 15 --out $OUT  # the H200 host

Two stacks of E experts at OLMoE's shape (gate_up [E, 2I, D], down [E, D, I], bf16; E = 16 is 192 MB,
past any last-level cache), one plain, one advised with moekit.native.hugepages before it is filled;
each call runs a layer's top-8 distinct experts for one token (expert_ffn_stacked, the CPU-miss call),
rotating through the stack. Rounds alternate the two, so drift on a shared machine hits both; the
medians of the rounds and the process's AnonHugePages are written to probe_store_pages.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

from moekit.native.experts import Scratch, expert_ffn_stacked  # noqa: E402
from moekit.native.hugepages import advise_huge_pages  # noqa: E402


def stacks(experts: int, d: int, ffn: int, advise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = torch.empty(experts, 2 * ffn, d, dtype=torch.bfloat16)
    down = torch.empty(experts, d, ffn, dtype=torch.bfloat16)
    if advise:
        advise_huge_pages([gate_up, down])
    gate_up.normal_()
    down.normal_()
    return gate_up, down


def rate(weights, x, scratch, threads: int, calls: int, k: int) -> float:
    gate_up, down = weights
    experts, ffn, d = down.shape[0], down.shape[2], down.shape[1]
    times = []
    for c in range(calls):
        routes = [((c * k + i) % experts, [0], [1.0 / k]) for i in range(k)]
        t0 = time.perf_counter()
        expert_ffn_stacked(x, gate_up, down, routes, threads=threads, scratch=scratch)
        times.append(time.perf_counter() - t0)
    return k * 3 * d * ffn * 2 / statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_output_args(p, "probe_store_pages", device_default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=60)
    args = p.parse_args()
    d, ffn, k = 2048, 1024, 8
    plain, huge = stacks(args.experts, d, ffn, False), stacks(args.experts, d, ffn, True)
    x, scratch = torch.randn(1, d).to(torch.bfloat16), Scratch()
    anon = next((line.split()[1] for line in open("/proc/meminfo") if line.startswith("AnonHugePages")), None)
    rounds = []
    for r in range(args.rounds):
        rounds.append({"4k_gb_s": rate(plain, x, scratch, args.threads, args.calls, k) / 1e9,
                       "2m_gb_s": rate(huge, x, scratch, args.threads, args.calls, k) / 1e9})
        print(f"round {r}: 4 KB pages {rounds[-1]['4k_gb_s']:.1f} GB/s, 2 MB pages {rounds[-1]['2m_gb_s']:.1f} GB/s",
              flush=True)
    res = {"meta": common.run_meta(args, "cpu"), "threads": args.threads, "experts": args.experts,
           "anon_huge_pages_kb": int(anon) if anon else None, "rounds": rounds,
           "median_4k_gb_s": statistics.median(r["4k_gb_s"] for r in rounds[1:]),
           "median_2m_gb_s": statistics.median(r["2m_gb_s"] for r in rounds[1:])}
    print(f"medians after the first round: 4 KB {res['median_4k_gb_s']:.1f} GB/s, 2 MB {res['median_2m_gb_s']:.1f} GB/s "
          f"({res['median_2m_gb_s'] / res['median_4k_gb_s']:.2f}x); AnonHugePages {anon} kB")
    common.write_json(res, args.out, "probe_store_pages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
