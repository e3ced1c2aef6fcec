"""One offloaded model, its CPU-bound misses split several ways, timed in interleaved rounds in one
process (issue 12): the in-place share by whole experts against the row split, against the CPU alone,
against more CPU threads - the A/B that one bench_llamacpp call per setting paid a 23.7 GB load for
each (and compared across machines whose host read rate differed by 40%).

    cd benchmarks && python3 probes/probe_split_variants.py --shape mixtral-8x7b-8l --budget 2522873856 --out $OUT
    PYTHONPATH=src python3 benchmarks/probes/probe_split_variants.py --shape tiny-mixtral --device cpu \\
        --budget 24000000 --variants cpu,cpu16 --out /tmp/p                                  # smoke test, no GPU

The checkpoint is bench_llamacpp's random bf16 one of --shape (reused while its stamp matches); the
model loads once with misses auto at --budget bytes (bench_llamacpp_mixtral_26a3a85.json: llama.cpp's
footprints 2522873856 with every expert in host memory, 13797163008 with half). A first generation
warms it up (and fixes the cache: each variant must run on the same one). Then, --rounds times, each
variant in turn (the order rotated every round) decodes --new tokens after a --prompt-token prompt:
  cpu        every miss computed on the CPU (misses cpu), the CPU team at its default size
  cpu16      the same with --threads CPU threads (default 16: a layer's top-2 read 116 GB/s at 16
             threads against 89 at 15 in the kernel sweep of bench_llamacpp_mixtral_rates_f51a719.json)
  no_share   misses auto without the in-place share (the CPU and fetches)
  whole      auto with the in-place share by whole experts (the default for experts of >= 64 MiB)
  rows       auto with the row split (MOEKIT_ROW_SPLIT=1's path)
--min-expert-bytes lowers source.IN_PLACE_MIN_EXPERT_BYTES (small shapes get the share). Off CUDA only
cpu and cpu16 run (the others need the device to read host memory). Per variant: decode tok/s of each
round, their median, and the last round's report (hit rate, bytes a token on the CPU and read in
place, CPU seconds, the cost model's scales).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common, bench_llamacpp
import common
import torch

VARIANTS = ("cpu", "cpu16", "no_share", "whole", "rows")
CUDA_ONLY = {"no_share", "whole", "rows"}
KEPT = ("hit_rate", "cpu_experts", "in_place_experts", "row_split_experts", "demand_fetches", "cpu_bytes_per_token",
        "mapped_bytes_per_token", "bytes_per_token", "cpu_s", "cpu_wait_s", "decode_tokens", "cpu_threads")


def apply(runtime, name: str, live: dict, threads: int) -> None:
    """Sets the loaded runtime to variant `name` (between generations: what each split call reads)."""
    if runtime.cache is not live["cache"]:
        raise RuntimeError("the expert cache was replaced after the warm-up: the variants would not share it")
    runtime.misses = "cpu" if name.startswith("cpu") else "auto"
    runtime.cpu.threads = threads if name == "cpu16" else live["threads"]
    runtime.in_place = live["in_place"] if name in ("whole", "rows") else None
    runtime.row_split_on = name == "rows"


def main() -> int:
    import bench_llamacpp as bl
    import moekit
    from moekit.offload import OffloadConfig, load_offloaded
    from moekit.errors import MoekitError
    from moekit.offload import source

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mixtral-8x7b-8l", choices=sorted(bl.SHAPES))
    parser.add_argument("--budget", type=int, required=True, help="--device-memory in bytes")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--threads", type=int, default=16, help="the cpu16 variant's CPU threads")
    parser.add_argument("--min-expert-bytes", type=int, default=None)
    parser.add_argument("--tmp", default="/dev/shm/moekit_llamacpp")
    parser.add_argument("--disk-tmp", default="/tmp/moekit_llamacpp")
    common.add_output_args(parser, "probe_split_variants")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    skipped = [v for v in variants if v in CUDA_ONLY and device.type != "cuda"]
    variants = [v for v in variants if v not in skipped]
    if args.min_expert_bytes is not None:
        source.IN_PLACE_MIN_EXPERT_BYTES = args.min_expert_bytes
    results: dict = {"meta": common.run_meta(args, device), "shape": args.shape, "budget_bytes": args.budget,
                     "skipped": [f"{v}: needs CUDA" for v in skipped], "variants": {}}
    path, cfg, _ = bl.bf16_checkpoint(args.shape, [Path(args.tmp), Path(args.disk_tmp)], device, results)
    t0 = time.perf_counter()
    try:
        model = load_offloaded(path, device=device, offload=OffloadConfig(
            device_memory=args.budget, misses="auto" if device.type == "cuda" else "cpu", predictor="none"))
    except MoekitError as e:
        raise SystemExit(f"error: {e}") from None
    runtime = model.offload
    results["load_s"] = time.perf_counter() - t0
    if runtime.cpu is None:
        raise SystemExit(f"misses run as {runtime.misses} here ({runtime.misses_note}): no CPU split to vary")
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)

    def generate() -> float:
        stats = moekit.GenerationStats()
        model.generate(prompt, max_new_tokens=args.new, temperature=0, eos_token_ids=(), stats=stats)
        return stats.decode_tok_s

    generate()  # warm-up: kernels, the runner's team, the KV reservation (a new cache, if any, comes here)
    live = {"cache": runtime.cache, "in_place": runtime.in_place, "threads": runtime.cpu.threads}
    results.update(in_place=live["in_place"] is not None, row_split_possible=runtime.cpu.splits_rows,
                   default_threads=live["threads"])
    if live["in_place"] is None:
        why = runtime.in_place_refused or "experts under IN_PLACE_MIN_EXPERT_BYTES, or no CUDA"
        results["skipped"] += [f"{v}: no in-place reads ({why})" for v in variants if v in ("whole", "rows")]
        variants = [v for v in variants if v not in ("whole", "rows")]
    if not runtime.cpu.splits_rows and "rows" in variants:
        results["skipped"].append("rows: the CPU path cannot compute row slices here")
        variants.remove("rows")
    for r in range(args.rounds):
        for name in variants[r % len(variants):] + variants[:r % len(variants)]:
            apply(runtime, name, live, args.threads)
            runtime.reset_stats()
            tok_s = generate()
            rep = runtime.report()
            entry = results["variants"].setdefault(name, {"tok_s": []})
            entry["tok_s"].append(tok_s)
            entry["report"] = {k: rep.get(k) for k in KEPT}
            entry["cost_model"] = rep.get("cost_model")
            common.log(f"round {r} {name}: {tok_s:.2f} tok/s")
    rows = []
    for name, entry in results["variants"].items():
        entry["median_tok_s"] = statistics.median(entry["tok_s"])
        rep = entry["report"]
        rows.append([name, f"{entry['median_tok_s']:.2f}", " / ".join(f"{t:.2f}" for t in entry["tok_s"]),
                     f"{(rep.get('cpu_bytes_per_token') or 0) / 1e9:.2f}",
                     f"{(rep.get('mapped_bytes_per_token') or 0) / 1e9:.2f}", str(rep.get("cpu_threads"))])
    results["table"] = common.markdown_table(["variant", "median tok/s", "rounds", "CPU-read GB / token",
                                              "read in place GB / token", "CPU threads"], rows)
    print(results["table"])
    for note in results["skipped"]:
        print(f"skipped: {note}")
    common.write_json(results, args.out, "probe_split_variants")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
