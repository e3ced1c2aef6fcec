"""CPU prefill (no GPU) of the same checkpoint in moekit and llama.cpp: moekit's model.forward over a prompt
of each --lengths, the last position's logits only as llama-bench (bf16 checkpoint; its int4 copy with the experts through the native kernel, and through
the form's PyTorch path as every call past 16 tokens ran before 17c278b -- decoding each expert's
matrices to floats per call), llama-bench -p N -n 0 on the bf16 GGUF and its Q4_K_M; interleaved rounds,
best of each engine's rounds and the median, on --threads threads.

    PYTHONPATH=src python3 benchmarks/probes/cpu_prefill.py --bf16 BF16 --int4 INT4 \\
        --llama-bench /tmp/lcpp/llama.cpp/build-cpu/bin/llama-bench --gguf bf16=...,Q4_K_M=... --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

import moekit
from moekit.kv_cache import KVCache


def moekit_tok_s(model, n: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
    cache = KVCache(model.config, 1, n + 1, "cpu", torch.bfloat16)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids, cache=cache, start=0, last_only=True)  # the last position's logits, as llama-bench computes
        return n / (time.perf_counter() - t0)


def llama_tok_s(binary: str, gguf: str, n: int, threads: int) -> float | None:
    done = subprocess.run([binary, "-m", gguf, "-p", str(n), "-n", "0", "-r", "1", "-t", str(threads), "-o", "json"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        common.log(f"llama-bench {gguf} failed: {done.stderr[-300:]}")
        return None
    return float(json.loads(done.stdout)[0]["avg_ts"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bf16", required=True)
    parser.add_argument("--int4", default="")
    parser.add_argument("--llama-bench", default="")
    parser.add_argument("--gguf", default="", help="name=file,...")
    parser.add_argument("--lengths", default="64,512")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(v) for v in args.lengths.split(",")]
    engines: dict = {"moekit bf16": moekit.load_model(args.bf16, dtype=torch.bfloat16)}
    if args.int4:
        engines["moekit int4"] = moekit.load_model(args.int4, dtype=torch.bfloat16)
        engines["moekit int4, PyTorch expert path"] = engines["moekit int4"]
        if not any(hasattr(getattr(layer.mlp, "experts", None), "form") for layer in engines["moekit int4"].layers):
            raise SystemExit(f"{args.int4}: no compressed expert layers (not a moekit-compressed checkpoint?)")
    ggufs = dict(p.split("=", 1) for p in args.gguf.split(",") if p) if args.llama_bench else {}
    for name, path in ggufs.items():
        engines[f"llama.cpp {name}"] = path
    rows = {label: {n: [] for n in lengths} for label in engines}

    def run(label: str, engine, n: int) -> float | None:
        if isinstance(engine, str):
            return llama_tok_s(args.llama_bench, engine, n, args.threads)
        if "PyTorch" not in label:
            return moekit_tok_s(engine, n)
        forms = {id(layer.mlp.experts.form): layer.mlp.experts.form for layer in engine.layers
                 if hasattr(getattr(layer.mlp, "experts", None), "form")}
        for form in forms.values():
            form.cpu_ffn = lambda *a, **k: None  # the instance attribute hides the method: PyTorch's path
        try:
            return moekit_tok_s(engine, n)
        finally:
            for form in forms.values():
                del form.cpu_ffn

    for label, engine in engines.items():  # warm: pages touched, kernels built
        if not isinstance(engine, str):
            run(label, engine, 16)
    for r in range(args.rounds):
        for n in lengths:
            for label, engine in engines.items():
                if "PyTorch" in label and r > 0:
                    continue  # one round: ~10 s a call
                v = run(label, engine, n)
                rows[label][n].append(v)
                common.log(f"round {r} prefill {n}: {label} {v if v is None else round(v, 1)} tok/s")
    summary = {label: {str(n): {"tok_s": v, "best": max(x for x in v if x is not None) if any(x is not None for x in v) else None,
                                "median": statistics.median([x for x in v if x is not None]) if any(x is not None for x in v) else None}
                       for n, v in per.items()} for label, per in rows.items()}
    for label, per in summary.items():
        print(f"{label:<36} " + "  ".join(f"p{n}: {r['median']:.1f}" if r["median"] else f"p{n}: -" for n, r in per.items()))
    if args.out:
        common.write_json({"meta": common.run_meta(args), "threads": args.threads, "rows": summary}, args.out,
                          "cpu_prefill")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
