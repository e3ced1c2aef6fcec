"""Where an offloaded batch-1 decode step's time goes when the cache hits (host-side overhead).

    PYTHONPATH=src python3 benchmarks/probes/profile_offload.py --out $OUT              # H200, ~1 minute
    PYTHONPATH=src python3 benchmarks/probes/profile_offload.py --device cpu --small --out /tmp/p

Random bf16 weights at the qwen3-30b-a3b shape with fewer layers (--layers). Decodes of the
same model: resident with CUDA graphs, resident eager, and offloaded with a budget that holds
every expert (so nothing is fetched and the gap to resident is the runtime's own cost), with
piecewise graphs (the default) and eager. Prints ms per token of each and, for the eager runs,
the top host-side operators by self CPU time (torch.profiler), written to profile_offload.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common, bench_offload
import bench_offload  # noqa: E402  (build, HostResident, run_generate)
import common  # noqa: E402

from moekit.load import load_model  # noqa: E402
from moekit.offload import OffloadConfig, load_offloaded  # noqa: E402


def profile_generate(model, ids, tokens, rows=25) -> tuple[list[dict], float]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        bench_offload.run_generate(model, ids, tokens, cuda_graph=False)
    table = []
    for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:rows]:
        table.append({"name": ev.key, "calls": ev.count, "self_cpu_ms": ev.self_cpu_time_total / 1e3,
                      "cpu_total_ms": ev.cpu_time_total / 1e3})
    total_ms = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    return table, total_ms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--tmp", default="/tmp/moekit_profile_offload")
    args = p.parse_args()
    device = torch.device(args.device)
    bench_offload.SHAPES["qwen3"][1]["num_hidden_layers"] = args.layers
    bench_offload.SMALL["qwen3"]["num_hidden_layers"] = args.layers
    folder, cfg, host = bench_offload.build("qwen3", args.small, device, Path(args.tmp))
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    out: dict = {"meta": common.run_meta(args, device), "device": common.device_name(device),
                 "torch": torch.__version__, "layers": args.layers, "tokens": args.tokens}

    model = load_model(folder, device=device, dtype=torch.bfloat16, experts=bench_offload.HostResident(host))
    for name, graph in (("resident_graphs", None), ("resident_eager", False)):
        if device.type != "cuda" and graph is None:
            continue
        bench_offload.run_generate(model, ids, 4, cuda_graph=graph)
        r = bench_offload.run_generate(model, ids, args.tokens, cuda_graph=graph)
        out[name] = {"ms_per_token": r["decode_s_per_token"] * 1e3}
        print(f"{name}: {r['decode_s_per_token'] * 1e3:.2f} ms/token", flush=True)
    out["resident_eager"]["top_ops"], out["resident_eager"]["cpu_ms"] = profile_generate(model, ids, 8)
    model = None
    common.free_memory(device)

    config = OffloadConfig(device_memory=None, predictor="none", context_tokens=64)
    model = load_offloaded(folder, device=device, dtype=torch.bfloat16, offload=config, host_layers=host)
    bench_offload.run_generate(model, ids, 4)
    model.offload.reset_stats()
    r = bench_offload.run_generate(model, ids, args.tokens)
    rep = model.offload.report()
    out["offloaded_all_cached"] = {"ms_per_token": r["decode_s_per_token"] * 1e3, "hit_rate": rep["hit_rate"],
                                   "cache_slots": rep["cache_slots"]}
    print(f"offloaded (all cached): {r['decode_s_per_token'] * 1e3:.2f} ms/token, hit {rep['hit_rate']:.3f}",
          flush=True)
    r = bench_offload.run_generate(model, ids, args.tokens, cuda_graph=False)
    out["offloaded_all_cached"]["eager_ms_per_token"] = r["decode_s_per_token"] * 1e3
    print(f"offloaded (all cached), eager: {r['decode_s_per_token'] * 1e3:.2f} ms/token", flush=True)
    out["offloaded_all_cached"]["top_ops"], out["offloaded_all_cached"]["cpu_ms"] = profile_generate(model, ids, 8)
    for name in ("resident_eager", "offloaded_all_cached"):
        print(f"\n{name}: top host ops over 8 tokens (self CPU ms; total {out[name]['cpu_ms']:.1f})")
        for row in out[name]["top_ops"]:
            print(f"  {row['self_cpu_ms']:9.2f}  {row['calls']:6d}  {row['name'][:90]}")
    common.write_json(out, args.out, "profile_offload")
    return 0


if __name__ == "__main__":
    sys.exit(main())
