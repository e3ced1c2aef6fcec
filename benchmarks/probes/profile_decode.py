"""Where a batch-1 decode step's time goes: kernels of the compiled step, by name and time.

    PYTHONPATH=src python3 benchmarks/probes/profile_decode.py --out $OUT

Random bf16 weights at the olmoe-1b-7b shape (no checkpoint: moekit's own init). Prints the
graph-replay step time, the summed kernel time of one step, the kernel count, and the top
kernels; the gap between step time and summed kernel time is launch/idle overhead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common
import common  # noqa: E402

from moekit.config import ModelConfig  # noqa: E402
from moekit.generate import _GraphedDecode  # noqa: E402
from moekit.kv_cache import KVCache  # noqa: E402
from moekit.model import MoEModel  # noqa: E402
from moekit.train import init_weights  # noqa: E402


def olmoe_config(layers: int) -> ModelConfig:
    return ModelConfig(family="olmoe", vocab_size=50304, hidden_size=2048, num_layers=layers,
                       num_heads=16, num_kv_heads=16, head_dim=128, num_experts=64, top_k=8,
                       expert_ffn=1024, moe_layers=(True,) * layers, norm_topk_prob=False,
                       qk_norm="full", rms_norm_eps=1e-5, max_position_embeddings=4096)


def step_time_ms(step, token, position, reps=200) -> float:
    for _ in range(10):
        step(token, position)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        step(token, position)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernel_table(fn, steps=5):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        r = rows.setdefault(ev.name, [0, 0.0])
        r[0] += 1
        r[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return {k: (c / steps, us / steps) for k, (c, us) in rows.items()}


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--skip-compile", action="store_true", help="only the plain CUDA-graph step (no 25 s compile)")
    p.add_argument("--name", default="profile_decode", help="the JSON's name")
    p.add_argument("--fast-init", action="store_true", help="random weights drawn on the GPU (not moekit's init)")
    args = p.parse_args()
    cfg = olmoe_config(args.layers)
    if args.fast_init:  # drawn on the GPU: seconds instead of a minute of CPU draws; timing is the same
        with torch.device("cuda"):
            model = MoEModel(cfg)
        for name, w in model.named_parameters():
            w.fill_(1.0) if "norm" in name else w.normal_(0.0, 0.02)
        model = model.to(torch.bfloat16).eval()
    else:
        model = init_weights(MoEModel(cfg), seed=0).to("cuda", torch.bfloat16).eval()
    model.inv_freq = model.inv_freq.float()
    results: dict = {"meta": common.run_meta(args, "cuda")}
    results["fused"] = os.environ.get("MOEKIT_FUSED", "1") != "0"
    for compile in (False,) if args.skip_compile else (False, True):
        cache = KVCache(cfg, 1, 512, "cuda", torch.bfloat16)
        model(torch.randint(0, 50304, (1, 128), device="cuda"), cache=cache, start=0)
        token = torch.randint(0, 50304, (1, 1), device="cuda")
        t0 = time.perf_counter()
        step = _GraphedDecode(model, cache, token, 128, compile=compile)
        capture_s = time.perf_counter() - t0
        ms = step_time_ms(step, token, 128)
        raw = step.graph  # profile the kernels by replaying the captured graph
        kernels = kernel_table(lambda: raw.replay())
        total_us = sum(us for _, us in kernels.values())
        count = sum(c for c, _ in kernels.values())
        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
        name = "compiled+graph" if compile else "graph"
        results[name] = {"step_ms": ms, "kernel_us_per_step": total_us, "kernels_per_step": count,
                         "capture_s": capture_s,
                         "top": [{"kernel": k[:120], "calls": c, "us": us} for k, (c, us) in top]}
        print(f"\n== {name}: step {ms:.3f} ms, kernels {count:.0f}/step summing to {total_us / 1e3:.3f} ms "
              f"(capture {capture_s:.1f} s)")
        for k, (c, us) in top:
            print(f"{us:9.1f} us {c:6.0f}x  {k[:110]}")
    common.write_json(results, args.out, args.name)


if __name__ == "__main__":
    main()
