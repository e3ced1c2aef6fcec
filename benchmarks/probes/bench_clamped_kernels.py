"""Times one gpt-oss-20b MoE layer's experts (32 experts, top-4, hidden = ffn = 2880) on a GPU through
the Triton kernels of experts.clamped_ops, every variant side by side in one run: the per-slot MXFP4
kernels "words" (new) and "bytes" (before), the grouped kernels' MXFP4 tiles (clamped_ops.GROUPED_TILES),
each next to the HBM floor of the bytes it reads and the PyTorch path it replaces (decode + bmm:
ClampedSwigluForm.run_planned), for MXFP4 and dense bf16 experts at 4 / 128 / 1024 slots (batch 1
and 32 decode, a 256-token prefill; CUDA graph replay); then sweeps each new kernel's tiles.

    PYTHONPATH=src python3 benchmarks/probes/bench_clamped_kernels.py --out $OUT [--json] [--time-budget-s 90]

Writes bench_clamped_kernels.json to --out; the defaults to set from it are clamped_ops'
SLOT_MXFP4_KERNELS, SLOT_WORDS_CONFIG, GROUPED_TILES and grouped_config. Off the GPU (a smoke test
of the script: TRITON_INTERPRET=1 ... --device cpu --hidden 64 --experts 8) it times eagerly.
Not collected by pytest (no test_ prefix).
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

TOP_K, LAYERS = 4, 24  # gpt-oss-20b
ALPHA, LIMIT = 1.702, 7.0
SLOTS = (4, 128, 1024)
# per-slot "words" tiles (BLOCK_N, BLOCK_W, num_warps) at 4 slots: gate_up's with the default down, then down's
WORDS_GATE_UP = ((8, 128, 4), (8, 64, 2), (32, 64, 8), (16, 32, 2), (4, 128, 4), (16, 128, 8))
WORDS_DOWN = ((2, 128, 4), (4, 64, 2), (8, 128, 4), (8, 64, 4), (2, 64, 2), (4, 256, 8))
# grouped (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by slot count, of the MXFP4 "words" tiles (sm_90 builds:
# none spills but gate_up at (16, 64, 128, 4), 8 bytes)
GROUPED_CONFIGS = {128: ((16, 64, 64, 4), (16, 32, 64, 4), (16, 64, 128, 4), (16, 128, 64, 4), (16, 64, 64, 8),
                         (16, 128, 128, 8)),
                   1024: ((64, 64, 64, 8), (32, 64, 64, 4), (64, 128, 64, 8), (64, 128, 128, 8), (64, 64, 128, 4))}


def random_stack(form: ClampedSwigluForm, experts: int, device: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Returns `experts` random experts in the form's layout (MXFP4 scales near 2^-7, weights ~1e-2)."""
    out = {}
    for name, (shape, dtype) in form.specs().items():
        if name.endswith("_blocks"):
            out[name] = torch.randint(0, 256, (experts, *shape), generator=g, dtype=torch.uint8)
        elif name.endswith("_scales"):
            out[name] = torch.randint(118, 122, (experts, *shape), generator=g, dtype=torch.uint8)
        else:
            out[name] = (torch.randn((experts, *shape), generator=g) * 0.02).to(dtype)
    return {k: v.to(device) for k, v in out.items()}


def routing(tokens: int, experts: int, device: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ids, weights [tokens, TOP_K]: distinct experts per token, uniform router scores."""
    weights, ids = torch.rand(tokens, experts, generator=g).topk(TOP_K, dim=-1)
    return ids.to(device), (weights / weights.sum(-1, keepdim=True)).to(device, torch.bfloat16)


def bytes_read(form: ClampedSwigluForm, ids: torch.Tensor, hidden: int, ffn: int) -> int:
    """Returns the HBM bytes a call must move: each expert present once, x read, h written and read
    back, the [N, D] output written (bf16)."""
    tokens, slots = ids.shape[0], ids.numel()
    experts = int(torch.unique(ids).numel())
    return experts * form.expert_bytes(0) + 2 * (2 * tokens * hidden + 2 * slots * ffn)


def graphed(fn, device: str):
    """Returns a callable replaying fn captured in a CUDA graph (what a decode step runs); fn itself
    off the GPU."""
    if device != "cuda":
        return fn
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


def variants(fmt: str, slots: int) -> list[tuple[str, dict]]:
    """Returns (name, keyword arguments of clamped_ops.slot_ffn or grouped_ffn) of each path to time
    at `slots`: per-slot at <= SLOT_KERNEL_MAX_SLOTS (and "words" at 128 too: offload's mapped misses
    run it at any count), grouped above."""
    out = []
    if slots <= clamped_ops.SLOT_KERNEL_MAX_SLOTS or (fmt == "mxfp4" and slots == 128):
        out += [("slot words", {"kernels": "words"})] if fmt == "mxfp4" else []
        out += [("slot bytes", {"kernels": "bytes"})] if slots <= clamped_ops.SLOT_KERNEL_MAX_SLOTS else []
    if slots > clamped_ops.SLOT_KERNEL_MAX_SLOTS:
        out += [(f"grouped {t}", {"tiles": t}) for t in (clamped_ops.GROUPED_TILES_CHOICES if fmt == "mxfp4"
                                                         else ("dense",))]
    return out


def run_path(name: str, kwargs: dict, x, ids, w, mats, config=None):
    """Returns a callable of one path (slot_ffn or grouped_ffn) with its variant and tiles."""
    if name.startswith("slot"):
        return partial(clamped_ops.slot_ffn, x, ids, w, mats, ALPHA, LIMIT, config, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v != "dense"}
    return partial(clamped_ops.grouped_ffn, x, ids, w, mats, ALPHA, LIMIT, config, **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_output_args(ap, "bench_clamped_kernels")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--formats", default="mxfp4,dense", help="comma-separated: mxfp4, dense")
    ap.add_argument("--time-budget-s", type=float, default=90.0,
                    help="sweep entries past this many seconds of the run are skipped (listed as skipped)")
    ap.add_argument("--hidden", type=int, default=2880, help="hidden = ffn width (gpt-oss-20b: 2880)")
    ap.add_argument("--experts", type=int, default=32, help="experts in the layer (gpt-oss-20b: 32)")
    ap.add_argument("--slots", default=",".join(map(str, SLOTS)), help="comma-separated slot counts (N * 4)")
    args = ap.parse_args()
    device, hidden, experts = args.device, args.hidden, args.experts
    slot_counts = [int(s) for s in args.slots.split(",")]
    g = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    rows, sweep = [], []

    def timed(fn) -> float:
        return common.do_bench_s(graphed(fn, device), device=device)

    for fmt in args.formats.split(","):
        form = (Mxfp4ClampedForm if fmt == "mxfp4" else ClampedSwigluForm)(hidden, hidden, torch.bfloat16, ALPHA,
                                                                           LIMIT)
        stacked = random_stack(form, experts, device, g)
        mats = clamped_ops.matrices(stacked)
        for slots in slot_counts:
            ids, w = routing(slots // TOP_K, experts, device, g)
            x = torch.randn(slots // TOP_K, hidden, generator=g).to(device, torch.bfloat16)
            floor_s = bytes_read(form, ids, hidden, hidden) / common.HBM_BYTES_PER_S
            with torch.no_grad():
                want = form.run_planned(x, ids, w, stacked, grad=False)
                reference = partial(form.run_planned, x, ids, w, stacked, grad=False)
                # past the per-slot counts the reference plans with a host sync (boolean indexing): timed
                # eagerly there, as no CUDA graph can hold it
                old_s = (timed(reference) if slots <= clamped_ops.SLOT_KERNEL_MAX_SLOTS
                         else common.do_bench_s(reference, device=device))
                default = partial(clamped_ops.clamped_expert_ffn, x, ids, w, stacked, ALPHA, LIMIT)
                paths = [("default", default)] + [(name, run_path(name, kw, x, ids, w, mats))
                                                  for name, kw in variants(fmt, slots)]
                for name, fn in paths:
                    err = rel_err(fn(), want)
                    s = timed(fn)
                    rows.append({"format": fmt, "slots": slots, "path": name, "us": s * 1e6, "floor_us": floor_s * 1e6,
                                 "of_floor": floor_s / s, "torch_us": old_s * 1e6, "x_torch": old_s / s,
                                 "rel_err": err, "layers_ms": s * LAYERS * 1e3})
                    common.log(f"{fmt} {slots} slots {name}: {s * 1e6:.1f} us (floor {floor_s * 1e6:.1f}, torch "
                               f"{old_s * 1e6:.0f}), rel err {err:.1e}")
                # the new kernels' tiles: per-slot "words" at 4 slots, grouped MXFP4 tiles at 128 / 1024
                entries = []
                if fmt == "mxfp4" and slots <= clamped_ops.SLOT_KERNEL_MAX_SLOTS:
                    gate_up, down = clamped_ops.SLOT_WORDS_CONFIG
                    entries += [("slot words", {"kernels": "words"}, (c, down)) for c in WORDS_GATE_UP]
                    entries += [("slot words", {"kernels": "words"}, (gate_up, c)) for c in WORDS_DOWN]
                elif fmt == "mxfp4":  # the new tiles only ("bytes" was swept before: results/bench_clamped_kernels.log)
                    entries += [("grouped words", {"tiles": "words"}, c) for c in GROUPED_CONFIGS.get(slots, ())]
                for name, kw, config in entries:
                    entry = {"format": fmt, "slots": slots, "path": name, "config": config}
                    if time.perf_counter() - started > args.time_budget_s:
                        sweep.append({**entry, "skipped": "time budget"})
                        continue
                    fn = run_path(name, kw, x, ids, w, mats, config)
                    err = rel_err(fn(), want)
                    s = timed(fn)
                    sweep.append({**entry, "us": s * 1e6, "floor_us": floor_s * 1e6, "of_floor": floor_s / s,
                                  "rel_err": err})
        del stacked, mats
        common.free_memory(device)
    results = {"meta": common.run_meta(args, device), "hbm_bytes_per_s": common.HBM_BYTES_PER_S,
               "shape": {"experts": experts, "hidden": hidden, "ffn": hidden, "top_k": TOP_K, "layers": LAYERS},
               "defaults": {"SLOT_MXFP4_KERNELS": clamped_ops.SLOT_MXFP4_KERNELS,
                            "SLOT_WORDS_CONFIG": clamped_ops.SLOT_WORDS_CONFIG,
                            "GROUPED_TILES": clamped_ops.GROUPED_TILES},
               "layer": rows, "sweep": sweep, "seconds": time.perf_counter() - started}
    path = common.write_json(results, args.out, "bench_clamped_kernels")
    print(common.markdown_table(
        ["format", "slots", "path", "us", "floor us", "of floor", "torch us", "x torch", "24 layers ms", "rel err"],
        [(r["format"], r["slots"], r["path"], f"{r['us']:.1f}", f"{r['floor_us']:.1f}", f"{r['of_floor']:.0%}",
          f"{r['torch_us']:.0f}", f"{r['x_torch']:.1f}", f"{r['layers_ms']:.2f}", f"{r['rel_err']:.1e}")
         for r in rows]))
    print()
    print(common.markdown_table(
        ["format", "slots", "path", "config", "us", "floor us", "of floor", "rel err"],
        [(s["format"], s["slots"], s["path"], s["config"], f"{s['us']:.1f}" if "us" in s else "skipped",
          f"{s['floor_us']:.1f}" if "us" in s else "", f"{s['of_floor']:.0%}" if "us" in s else "",
          f"{s['rel_err']:.1e}" if "us" in s else "") for s in sweep]))
    if args.json:
        import json

        print(json.dumps(results, indent=1, default=str))
    common.log(f"wrote {path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
