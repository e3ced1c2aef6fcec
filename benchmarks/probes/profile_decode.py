"""Where a decode step's time goes: kernels of the graph-captured (and compiled) step, by name and time.

    PYTHONPATH=src python3 benchmarks/probes/profile_decode.py --out $OUT
    PYTHONPATH=src python3 benchmarks/probes/profile_decode.py --shape deepseek-v2-lite,gpt-oss-20b \
        --batch 1 --skip-compile --fast-init --out $OUT

Random bf16 weights (no checkpoint): by default the olmoe-1b-7b shape with moekit's own init;
--shape takes olmoe-1b-7b, deepseek-v2-lite and gpt-oss-20b (widths from
benchmarks/family_shapes.py; gpt-oss's experts in MXFP4 as it ships them), one or several.
Prints per shape the graph-replay step time next to its HBM bound (the weight bytes a step reads,
as bench_families counts them, / common.HBM_BYTES_PER_S), the summed kernel time of one step, the
kernel count, and the top kernels; the gap between step time and summed kernel time is launch/idle
overhead.
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
from family_shapes import decode_step_bytes, hf_config, tensor_groups  # noqa: E402

from moekit.config import ModelConfig  # noqa: E402
from moekit.families import family_for  # noqa: E402
from moekit.generate import _GraphedDecode  # noqa: E402
from moekit.kv_cache import KVCache  # noqa: E402
from moekit.model import MoEModel  # noqa: E402
from moekit.train import init_weights  # noqa: E402


def olmoe_config(layers: int) -> ModelConfig:
    return ModelConfig(family="olmoe", vocab_size=50304, hidden_size=2048, num_layers=layers,
                       num_heads=16, num_kv_heads=16, head_dim=128, num_experts=64, top_k=8,
                       expert_ffn=1024, moe_layers=(True,) * layers, norm_topk_prob=False,
                       qk_norm="full", rms_norm_eps=1e-5, max_position_embeddings=4096)


SHAPES = ("olmoe-1b-7b", "deepseek-v2-lite", "gpt-oss-20b")


def shape_config(shape: str, layers: int | None) -> ModelConfig:
    """Returns moekit's config of `shape` at its real widths (`layers` replaces the layer count)."""
    if shape == "olmoe-1b-7b":
        return olmoe_config(layers or 16)
    data = hf_config(shape, small=False, layers=layers).to_dict()
    return family_for(data).config(data)


def random_model(cfg: ModelConfig, device: str = "cuda") -> MoEModel:
    """Returns a bf16 MoEModel of cfg on `device` with weights drawn there (norms 1, the rest
    normal(0, 0.02)); gpt-oss's experts in MXFP4 (random codes, scales near 1)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no float32 copy of 20 GB of experts first
    try:
        with torch.device(device):
            model = MoEModel(cfg)
            if cfg.family == "gpt_oss":
                from moekit.experts.clamped import ClampedExperts, Mxfp4ClampedForm

                form = Mxfp4ClampedForm.of(cfg, torch.bfloat16)
                for layer in model.layers:
                    if layer.is_moe:
                        layer.mlp.experts = ClampedExperts(layer.mlp.experts.num_experts, form)
    finally:
        torch.set_default_dtype(dtype)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.dtype == torch.uint8:  # MXFP4: any codes; scales 2^-4..2^-1 (127 is 2^0)
                w.random_(123, 127) if name.endswith("scales") else w.random_(0, 256)
            elif "norm" in name:
                w.fill_(1.0)
            else:
                w.normal_(0.0, 0.02)
    return model.eval()


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
def profile_shape(model: MoEModel, batch: int, compile: bool) -> dict:
    """Returns {step_ms, kernel_us_per_step, kernels_per_step, capture_s, top} of a decode step of
    `batch` sequences after a 128-token prefill, captured as generate captures it; prints them."""
    cfg = model.config
    cache = KVCache(cfg, batch, 512, "cuda", torch.bfloat16)
    model(torch.randint(0, cfg.vocab_size, (batch, 128), device="cuda"), cache=cache, start=0)
    token = torch.randint(0, cfg.vocab_size, (batch, 1), device="cuda")
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
    weight_bytes = decode_step_bytes(tensor_groups(model), cfg.num_experts, cfg.top_k, batch, cfg.hidden_size)
    bound_ms = weight_bytes / common.HBM_BYTES_PER_S * 1e3
    print(f"\n== {name}: step {ms:.3f} ms (HBM bound {bound_ms:.3f} ms: {weight_bytes / 1e9:.2f} GB of weights), "
          f"kernels {count:.0f}/step summing to {total_us / 1e3:.3f} ms (capture {capture_s:.1f} s)")
    for k, (c, us) in top:
        print(f"{us:9.1f} us {c:6.0f}x  {k[:110]}")
    return {"step_ms": ms, "hbm_bound_ms": bound_ms, "weight_bytes_per_step": weight_bytes,
            "kernel_us_per_step": total_us, "kernels_per_step": count, "capture_s": capture_s,
            "top": [{"kernel": k[:120], "calls": c, "us": us} for k, (c, us) in top]}


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    p.add_argument("--shape", default=None,
                   help=f"comma-separated, of {', '.join(SHAPES)} (default: olmoe-1b-7b, --layers of it)")
    p.add_argument("--batch", type=int, default=1, help="sequences a step decodes")
    p.add_argument("--layers", type=int, default=None, help="layers (default: the shape's; olmoe 16)")
    p.add_argument("--skip-compile", action="store_true", help="only the plain CUDA-graph step (no 25 s compile)")
    p.add_argument("--name", default="profile_decode", help="the JSON's name")
    p.add_argument("--fast-init", action="store_true", help="random weights drawn on the GPU (not moekit's init)")
    p.add_argument("--mla-in-kernel-rows", type=int, default=None,
                   help="set fused.MLA_WEIGHTS_IN_KERNEL_MAX_ROWS (0: kv_b as batched GEMMs around the MLA kernel)")
    args = p.parse_args()
    if args.mla_in_kernel_rows is not None:
        from moekit import fused

        fused.MLA_WEIGHTS_IN_KERNEL_MAX_ROWS = args.mla_in_kernel_rows
    shapes = args.shape.split(",") if args.shape else ["olmoe-1b-7b"]
    unknown = set(shapes) - set(SHAPES)
    if unknown:
        p.error(f"unknown --shape {', '.join(sorted(unknown))}; one of {', '.join(SHAPES)}")
    results: dict = {"meta": common.run_meta(args, "cuda")}
    results["fused"] = os.environ.get("MOEKIT_FUSED", "1") != "0"
    for shape in shapes:
        cfg = shape_config(shape, args.layers)
        if args.fast_init or shape != "olmoe-1b-7b":  # moekit's CPU init knows neither MLA nor MXFP4 experts
            model = random_model(cfg)
        else:
            model = init_weights(MoEModel(cfg), seed=0).to("cuda", torch.bfloat16).eval()
        model.inv_freq = model.inv_freq.float()
        print(f"\n#### {shape}: {cfg.num_layers} layers, batch {args.batch}")
        out = {}
        for compile in (False,) if args.skip_compile else (False, True):
            out["compiled+graph" if compile else "graph"] = profile_shape(model, args.batch, compile)
        # the default run keeps its JSON layout (one shape at the top level)
        results.update(out) if args.shape is None else results.setdefault("shapes", {}).update(
            {shape: {"batch": args.batch, "layers": cfg.num_layers, **out}})
        del model
        torch.cuda.empty_cache()
    common.write_json(results, args.out, args.name)

if __name__ == "__main__":
    main()
