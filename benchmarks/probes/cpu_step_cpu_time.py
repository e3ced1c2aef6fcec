"""CPU time per decoded token on ONE thread: moekit's native decode step (bf16 / int4 checkpoints, int8 or
float activations for the int-N experts, bf16, int8 or int4 dense projections: int4 keeps the LM head int8) next to llama.cpp's llama-bench -t 1.

Why CPU time: on a shared VM whose other tenants keep the load at 5-8 on 2 cores, wall-clock tok/s of
interleaved runs swung 10x from one run to the next (bench_cpu_compressed.py); the CPU time a single
thread spends per token leaves out the time it waits for a core (not the memory bandwidth others take).
moekit: time.thread_time() over `--new` steps of CpuDecodeStep after a 64-token prefill, best of
--repeats. llama.cpp: the process's user + system CPU time of `llama-bench -t 1 -p 0 -n N -r 1` at two
N, the difference over the difference in tokens (the load and warm-up cancel), best of --repeats.
1 / (CPU s per token) is printed as "tok/CPU-s": the rate one uncontended core would reach, if memory
kept pace.

    PYTHONPATH=src python3 benchmarks/probes/cpu_step_cpu_time.py --bf16 /tmp/mk4/bf16 --int4 /tmp/mk4/int4 \\
        --llama-bench /tmp/lcpp/llama.cpp/build-cpu/bin/llama-bench --gguf bf16=/dev/shm/model4.gguf,Q4_K_M=/tmp/mk4/q4km.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

import moekit


def moekit_cpu_s(model, prompt: torch.Tensor, new: int, repeats: int, dot: str, dense: str) -> float:
    """Returns the best CPU seconds per token of the native step on one thread."""
    from moekit.kv_cache import KVCache
    from moekit.native.decode import CpuDecodeStep

    os.environ["MOEKIT_CPU_INT_DOT"] = dot
    best = float("inf")
    for _ in range(repeats):
        cache = KVCache(model.config, 1, prompt.shape[1] + new + 1, "cpu", torch.bfloat16)
        with torch.inference_mode():
            logits = model(prompt, cache=cache, start=0)[0, -1:]
            step = CpuDecodeStep(model, cache, dense=dense)
            token = int(logits.argmax())
            t0 = time.thread_time()
            for i in range(new):
                token = int(step(token, prompt.shape[1] + i).argmax())
            best = min(best, (time.thread_time() - t0) / new)
    return best


def llama_cpu_s(binary: str, gguf: str, new: int, repeats: int) -> float | None:
    """Returns the best CPU seconds per token of llama-bench -t 1 (two lengths, the difference)."""
    def cpu(n: int) -> float | None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([binary, "-m", gguf, "-p", "0", "-n", str(n), "-r", "1", "-t", "1", "-o", "json"],
                              capture_output=True, text=True, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            common.log(f"llama-bench {gguf} failed: {done.stderr[-300:]}")
            return None
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    best = float("inf")
    for _ in range(repeats):
        short, long_ = cpu(8), cpu(8 + new)
        if short is None or long_ is None:
            return None
        best = min(best, (long_ - short) / new)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bf16", required=True, help="the bf16 checkpoint folder")
    parser.add_argument("--int4", default="", help="its int4 (g128) compressed copy")
    parser.add_argument("--llama-bench", default="")
    parser.add_argument("--gguf", default="", help="name=file,... GGUFs of the same checkpoint")
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompt = None
    rows: dict[str, float | None] = {}
    configs = [("bf16", args.bf16, [("", "bf16"), ("", "int8"), ("", "int4")])]
    if args.int4:
        configs.append(("int4", args.int4, [(d, dense) for dense in ("bf16", "int8") for d in ("float", "int8")]
                        + [("int8", "int4")]))
    for name, path, variants in configs:
        model = moekit.load_model(path, dtype=torch.bfloat16)
        if prompt is None:
            prompt = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
        for dot, dense in variants:
            label = f"moekit {name}" + (f" {dot}-dot" if dot else "") + f" {dense}-dense"
            rows[label] = moekit_cpu_s(model, prompt, args.new, args.repeats, dot or "int8", dense)
            common.log(f"{label}: {rows[label] * 1e3:.2f} CPU ms/token")
        del model
    for name, gguf in (dict(p.split("=", 1) for p in args.gguf.split(",") if p) if args.llama_bench else {}).items():
        rows[f"llama.cpp {name}"] = llama_cpu_s(args.llama_bench, gguf, args.new, args.repeats)
        common.log(f"llama.cpp {name}: {rows[f'llama.cpp {name}']}")
    print(f"{'engine (1 thread)':<40} {'CPU ms/token':>12} {'tok/CPU-s':>10}")
    for label, s in rows.items():
        print(f"{label:<40} {s * 1e3 if s else float('nan'):>12.2f} {1 / s if s else float('nan'):>10.1f}")
    print(f"(load average {os.getloadavg()})")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cpu_step_cpu_time.json").write_text(json.dumps(
            {"meta": common.run_meta(args), "cpu_s_per_token": rows, "new": args.new, "repeats": args.repeats,
             "loadavg": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
