"""Times one gpt-oss-20b MoE layer's experts (32 experts, top-4, hidden = ffn = 2880) on a GPU through
the Triton kernels of experts.clamped_ops (per-slot <= 16 slots, grouped above; CUDA graph replay)
against the HBM floor of the bytes they read and the PyTorch path they replace (decode + bmm:
ClampedSwigluForm.run_planned), for MXFP4 and dense bf16 experts at 4 / 128 / 1024 slots (batch 1
and 32 decode, a 256-token prefill); then sweeps the per-slot kernels' tiles at 4 slots.

    PYTHONPATH=src python3 benchmarks/probes/bench_clamped_kernels.py --out $OUT [--json]

Writes bench_clamped_kernels.json to --out. Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common
import common

from moekit.experts import clamped_ops
from moekit.experts.clamped import ClampedSwigluForm, Mxfp4ClampedForm

EXPERTS, HIDDEN, FFN, TOP_K, LAYERS = 32, 2880, 2880, 4, 24  # gpt-oss-20b
ALPHA, LIMIT = 1.702, 7.0
SLOTS = (4, 128, 1024)
# (BLOCK_N, BLOCK_K, num_warps) of both per-slot kernels, at 4 slots; (16, 64, 4) was the MXFP4 kernels' before
SLOT_CONFIGS = ((16, 64, 4), (16, 256, 4), (8, 256, 4), (8, 512, 4), (4, 512, 4), (4, 1024, 4), (2, 1024, 4),
                (8, 512, 8))
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of both grouped kernels, by slot count
GROUPED_CONFIGS = {128: ((16, 64, 64, 8), (16, 64, 64, 4), (16, 32, 64, 4), (16, 32, 128, 4), (16, 64, 32, 4),
                         (16, 128, 64, 8), (16, 64, 128, 4)),
                   1024: ((32, 64, 64, 8), (32, 64, 64, 4), (64, 64, 64, 8), (64, 128, 64, 8), (32, 128, 64, 8))}


def random_stack(form: ClampedSwigluForm, device: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Returns EXPERTS random experts in the form's layout (MXFP4 scales near 2^-7, weights ~1e-2)."""
    out = {}
    for name, (shape, dtype) in form.specs().items():
        if name.endswith("_blocks"):
            out[name] = torch.randint(0, 256, (EXPERTS, *shape), generator=g, dtype=torch.uint8)
        elif name.endswith("_scales"):
            out[name] = torch.randint(118, 122, (EXPERTS, *shape), generator=g, dtype=torch.uint8)
        else:
            out[name] = (torch.randn((EXPERTS, *shape), generator=g) * 0.02).to(dtype)
    return {k: v.to(device) for k, v in out.items()}


def routing(tokens: int, device: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ids, weights [tokens, TOP_K]: distinct experts per token, uniform router scores."""
    weights, ids = torch.rand(tokens, EXPERTS, generator=g).topk(TOP_K, dim=-1)
    return ids.to(device), (weights / weights.sum(-1, keepdim=True)).to(device, torch.bfloat16)


def bytes_read(form: ClampedSwigluForm, ids: torch.Tensor) -> int:
    """Returns the HBM bytes a call must move: each expert present once, x read, h and the per-slot
    outputs written and read back (bf16)."""
    tokens, slots = ids.shape[0], ids.numel()
    experts = int(torch.unique(ids).numel())
    return experts * form.expert_bytes(0) + 2 * (tokens * HIDDEN + 2 * slots * FFN + 2 * slots * HIDDEN)


def graphed(fn):
    """Returns a callable replaying fn captured in a CUDA graph (what a decode step runs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile, then a clean run
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_output_args(ap, "bench_clamped_kernels")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--formats", default="mxfp4,dense", help="comma-separated: mxfp4, dense")
    ap.add_argument("--time-budget-s", type=float, default=200.0,
                    help="sweep entries past this many seconds of the run are skipped (listed as skipped)")
    args = ap.parse_args()
    device = args.device
    assert device == "cuda", "the kernels' timings need a GPU"
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    rows, sweep = [], []
    for fmt in args.formats.split(","):
        form = (Mxfp4ClampedForm if fmt == "mxfp4" else ClampedSwigluForm)(HIDDEN, FFN, torch.bfloat16, ALPHA, LIMIT)
        stacked = random_stack(form, device, g)
        for slots in SLOTS:
            ids, w = routing(slots // TOP_K, device, g)
            x = torch.randn(slots // TOP_K, HIDDEN, generator=g).to(device, torch.bfloat16)
            with torch.no_grad():
                kernels = partial(clamped_ops.clamped_expert_ffn, x, ids, w, stacked, ALPHA, LIMIT)
                old = partial(form.run_planned, x, ids, w, stacked, grad=False)
                err = rel_err(kernels(), old())
                kernels_s = common.do_bench_s(graphed(kernels))
                eager_s = common.do_bench_s(kernels)
                old_s = common.do_bench_s(old)
            moved = bytes_read(form, ids)
            floor_s = moved / common.HBM_BYTES_PER_S
            rows.append({"format": fmt, "slots": slots, "path": "slot" if slots <= clamped_ops.SLOT_KERNEL_MAX_SLOTS
                         else "grouped", "kernels_us": kernels_s * 1e6, "kernels_eager_us": eager_s * 1e6,
                         "old_us": old_s * 1e6, "floor_us": floor_s * 1e6, "bytes": moved,
                         "gb_per_s": moved / kernels_s / 1e9, "of_floor": floor_s / kernels_s,
                         "speedup_vs_old": old_s / kernels_s, "rel_err_vs_old": err,
                         "layers_ms": kernels_s * LAYERS * 1e3})
            common.log(f"{fmt} {slots} slots: {kernels_s * 1e6:.0f} us (floor {floor_s * 1e6:.0f}, old "
                       f"{old_s * 1e6:.0f}), rel err {err:.1e}")
        mats = clamped_ops.matrices(stacked)
        for slots, configs in ((4, SLOT_CONFIGS), *GROUPED_CONFIGS.items()):
            ids, w = routing(slots // TOP_K, device, g)
            x = torch.randn(slots // TOP_K, HIDDEN, generator=g).to(device, torch.bfloat16)
            floor_s = bytes_read(form, ids) / common.HBM_BYTES_PER_S
            per_slot = slots <= clamped_ops.SLOT_KERNEL_MAX_SLOTS
            default = (clamped_ops.SLOT_CONFIG[fmt == "mxfp4"] if per_slot
                       else clamped_ops.grouped_config(slots, EXPERTS, fmt == "mxfp4"))
            with torch.no_grad():
                want = form.run_planned(x, ids, w, stacked, grad=False)
                for config in dict.fromkeys((default, *configs)):  # the default first, once
                    if time.perf_counter() - started > args.time_budget_s:
                        sweep.append({"format": fmt, "slots": slots, "config": config, "skipped": "time budget"})
                        continue
                    fn = partial(clamped_ops.slot_ffn if per_slot else clamped_ops.grouped_ffn, x, ids, w, mats,
                                 ALPHA, LIMIT, (config, config) if per_slot else config)
                    err = rel_err(fn(), want)
                    s = common.do_bench_s(graphed(fn))
                    sweep.append({"format": fmt, "slots": slots, "config": config, "us": s * 1e6,
                                  "floor_us": floor_s * 1e6, "of_floor": floor_s / s, "rel_err": err,
                                  "default": config == default})
        del stacked
        common.free_memory(device)
    results = {"meta": common.run_meta(args, device), "hbm_bytes_per_s": common.HBM_BYTES_PER_S,
               "shape": {"experts": EXPERTS, "hidden": HIDDEN, "ffn": FFN, "top_k": TOP_K, "layers": LAYERS},
               "layer": rows, "slot_sweep": sweep}
    path = common.write_json(results, args.out, "bench_clamped_kernels")
    print(common.markdown_table(
        ["format", "slots", "path", "kernels us", "floor us", "of floor", "old us", "x old", "24 layers ms", "rel err"],
        [(r["format"], r["slots"], r["path"], f"{r['kernels_us']:.0f}", f"{r['floor_us']:.0f}", f"{r['of_floor']:.0%}",
          f"{r['old_us']:.0f}", f"{r['speedup_vs_old']:.1f}", f"{r['layers_ms']:.2f}", f"{r['rel_err_vs_old']:.1e}")
         for r in rows]))
    print()
    print(common.markdown_table(
        ["format", "slots", "config", "us", "floor us", "of floor", "rel err", "default"],
        [(s["format"], s["slots"], s["config"], f"{s['us']:.1f}", f"{s['floor_us']:.1f}", f"{s['of_floor']:.0%}",
          f"{s['rel_err']:.1e}", "*" if s["default"] else "") for s in sweep if "us" in s]))
    if args.json:
        import json

        print(json.dumps(results, indent=1, default=str))
    common.log(f"wrote {path}")


if __name__ == "__main__":
    main()
