"""Why the bf16 CPU expert kernel stops scaling past 8 threads on the H200 host (issue 12: a layer's
top-8 at 55 of 104 GB/s with 15 threads, where one thread reads at 80% of its stream rate).

    PYTHONPATH=src python3 benchmarks/probes/probe_cpu_threads.py --out /tmp/p --threads 1,2   # ~40 s here
    PYTHONPATH=src python3 benchmarks/probes/probe_cpu_threads.py --out $OUT                  # H200 host, ~90 s

One process per OpenMP setting (OMP_WAIT_POLICY / OMP_PROC_BIND as the host's libgomp reads them
at start: default, active, active + spread over cores). In each, by thread count:
  stream      the native stream read of 1 GiB (best of 3) and of 100 MB a call (a layer's bytes:
              what the per-call fork, barrier and stragglers cost at that size)
  layer       one token through a layer's top-8 distinct experts (OLMoE shape, the host store's
              2 MB pages), median of --calls calls back to back, and with 1 ms between calls (a
              decode step's gap: the team may fall asleep), for the kernel's variants: the
              portable loops and the AVX512-BF16 pair dot products, each at software prefetch
              distances 0 / 1 KB / 4 KB
Writes probe_cpu_threads.json with lscpu's facts and the CPU's flags that matter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

SETTINGS = {"default": {}, "active": {"OMP_WAIT_POLICY": "active"},
            "active_spread": {"OMP_WAIT_POLICY": "active", "OMP_PROC_BIND": "spread", "OMP_PLACES": "cores"}}
VARIANTS = [(pairs, pf) for pairs in (False, True) for pf in (0, 1024, 4096)]


def measure(threads: list[int], calls: int, variants: list) -> dict:
    """The rows of one process (one OpenMP setting)."""
    import torch

    from moekit.native import library
    from moekit.native import experts as ne
    from moekit.offload.layout import pinned_empty

    d, ffn, k, count = 2048, 1024, 8, 64  # 64 experts: 805 MB, past any last-level cache
    gate_up = pinned_empty((count, 2 * ffn, d), torch.bfloat16)
    gate_up.normal_()
    down = pinned_empty((count, d, ffn), torch.bfloat16)
    down.normal_()
    x = torch.randn(1, d).to(torch.bfloat16)
    layer_bytes = k * 3 * d * ffn * 2
    scratch, turn = ne.Scratch(), [0]
    chunk = torch.ones(layer_bytes // 8, dtype=torch.int64)
    has_pairs = ne.tuning()
    rows: dict = {"has_pair_dots": has_pairs}

    def layer(n: int) -> None:
        ids = [(turn[0] + i) % count for i in range(k)]
        turn[0] += k
        ne.expert_ffn(x, [(gate_up[e], down[e], [0], [1.0 / k]) for e in ids], threads=n, scratch=scratch)

    def median_rate(fn, gap: float) -> float:
        times = []
        for i in range(calls + 2):
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            fn()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return layer_bytes / statistics.median(times) / 1e9

    for n in threads:
        row = {"stream_1gib": ne.stream_read_bytes_per_s(1 << 30, n, reps=3) / 1e9,
               "stream_layer_bytes": median_rate(lambda: library().moekit_stream_read(chunk.data_ptr(), layer_bytes, n), 0)}
        for pairs, pf in variants:
            if pairs and not has_pairs:
                continue
            ne.tuning(pair_dots=pairs, prefetch_bytes=pf)
            name = f"{'pairs' if pairs else 'portable'}_pf{pf}"
            row[name] = median_rate(lambda: layer(n), 0)
            row[name + "_gap1ms"] = median_rate(lambda: layer(n), 1e-3)
        rows[str(n)] = {key: round(v, 2) if isinstance(v, float) else v for key, v in row.items()}
        print(n, rows[str(n)], flush=True)
    ne.tuning(pair_dots=has_pairs, prefetch_bytes=ne.DEFAULT_PREFETCH_BYTES)
    return rows


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--threads", default=None, help="comma-separated thread counts (default 1,4,8,12,14,15,16 "
                                                   "up to the usable cores)")
    p.add_argument("--calls", type=int, default=15)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"OpenMP settings among {','.join(SETTINGS)}")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    threads = [int(t) for t in args.threads.split(",")] if args.threads else \
        [t for t in (1, 4, 8, 12, 14, 15, 16) if t <= cores]
    if args.child:  # one OpenMP setting, rows as JSON on the last line
        variants = VARIANTS if args.child == "default" else [(True, 0), (False, 0)]
        print(json.dumps(measure(threads, args.calls, variants)))
        return 0
    result = {"meta": common.run_meta(), "host": common.host_info(),
              "cpu_flags": cpu_flags(), "threads": threads, "settings": {}}
    unknown = sorted(set(args.settings.split(",")) - set(SETTINGS))
    if unknown:
        p.error(f"--settings: unknown {', '.join(unknown)}; use some of {', '.join(SETTINGS)}")
    for name in args.settings.split(","):
        env = {**os.environ, **SETTINGS[name]}
        done = subprocess.run([sys.executable, __file__, "--child", name, "--threads", ",".join(map(str, threads)),
                               "--calls", str(args.calls)], env=env, capture_output=True, text=True, timeout=400)
        print(f"== {name} (rc {done.returncode})\n{done.stdout}{done.stderr[-2000:]}", flush=True)
        lines = done.stdout.strip().splitlines()
        result["settings"][name] = json.loads(lines[-1]) if done.returncode == 0 and lines else \
            {"error": done.stderr[-2000:]}
    out = Path(args.out) / "probe_cpu_threads.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
