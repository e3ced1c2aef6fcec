"""Launch configs for the compressed-expert kernels (moekit.quant.kernels), measured per shape.

    PYTHONPATH=src python3 benchmarks/tune_quant_kernels.py --out $OUT
    PYTHONPATH=src python3 benchmarks/tune_quant_kernels.py --dry-run      (lists what it would time)
    PYTHONPATH=src python3 benchmarks/tune_quant_kernels.py --slots --out $OUT   (the per-slot kernels)

At the mixtral-8x7b and qwen3-30b-a3b expert matrices (x [B, K] @ W^T, W [R, K]) and batch
1, 8, 64, times the int4 (group 128) dequant+matmul kernel and the sub-1-bit code kernel over a
small grid of launch configs with triton.testing.do_bench (median; it flushes L2 before every
call), next to torch bf16 F.linear at the same shape and the HBM floor (stored bytes / 4.2 TB/s).
Every config's output is checked against its PyTorch reference (relative error) on the GPU;
a config over REL_ERR_MAX is reported and never chosen. Prints a short table and the
INT_TUNED / CODE_TUNED entries to paste into moekit/quant/ops.py; writes tune_quant_kernels.json.
The grid is small (4-16 configs per kernel and shape) so the run, compiles included, stays
under 5 minutes on an H200.

--slots times the per-slot decode kernels instead (one launch for A routed slots, gate_up with
SwiGLU and down with routing weights) at the qwen3-30b-a3b (128 experts, A = 8) and mixtral-8x7b
(8 experts, A = 2) layers over the batch-1 grids, rotating over 8 routings so that experts are not
served from L2, and prints INT_SLOT_TUNED / CODE_SLOT_TUNED (tune_quant_slots.json). GB/s counts
the stored bytes of the A experts read. The down kernels that sum each token's A slots in one
launch (int_slot_down_triton, code_slot_down_triton: a program takes A slots of a row block, so
their tiles are their own) are timed over *_SLOT_DOWN_GRID next to the old path measured in the
same run (per-slot down at its tile + the torch top-k sum), and printed as INT_SLOT_DOWN_TUNED /
CODE_SLOT_DOWN_TUNED.
"""

from __future__ import annotations

import argparse
import time

import common  # also puts src/ on sys.path when moekit is not importable
import torch
import torch.nn.functional as F
from common import HBM_BYTES_PER_S, nbytes

from moekit.quant import ops
from moekit.quant.code import build_dictionary, encode, symbol_probabilities
from moekit.quant.gptq import rtn_quantize
from moekit.quant.grids import IntGrid, TernaryGrid, pack_codes

SHAPES = {  # name: (rows R, columns K)
    "mixtral gate/up": (14336, 4096),
    "mixtral down": (4096, 14336),
    "qwen3 gate/up": (768, 2048),
    "qwen3 down": (2048, 768),
}
BATCHES = (1, 8, 64)
INT_BITS, INT_GROUP = 4, 128
INT_GRID = {  # batch bucket: (BLOCK_N, BLOCK_K code lanes, num_warps, use tl.dot)
    1: [(4, 1024, 4, False), (2, 1024, 4, False), (8, 1024, 8, False), (8, 512, 4, False),
        (4, 512, 4, False), (16, 256, 4, False)],
    8: [(8, 512, 4, False), (4, 512, 4, False), (4, 1024, 4, False), (16, 128, 4, True)],
    64: [(64, 128, 4, True), (32, 128, 4, True), (16, 256, 4, True), (128, 64, 8, True)],
}
CODE_GRID = {  # batch bucket: (BLOCK_R, codewords per row per step, num_warps)
    # batch 1: 8-bit codewords are read four to a lane, so tiles of 128 words per warp give every
    # thread one lane (probes/profile_code_kernel.py --sweep); a few larger ones for 16-bit words
    1: [(4, 32, 1), (2, 64, 1), (1, 128, 1), (2, 32, 1), (1, 64, 1), (8, 32, 1), (4, 64, 1), (2, 128, 1),
        (1, 256, 1), (8, 32, 2), (4, 64, 2), (2, 128, 2), (16, 32, 4), (8, 64, 4), (4, 128, 4), (8, 256, 4)],
    # batch 2-64 (probes/profile_code_kernel.py --batches): one-warp tiles won at every batch on mixtral's shapes
    8: [(2, 64, 1), (1, 128, 1), (4, 32, 1), (8, 32, 2), (4, 64, 2), (8, 128, 4)],
    64: [(2, 64, 1), (1, 128, 1), (4, 32, 1), (8, 32, 2), (4, 64, 2), (8, 128, 4)],
}
# the down kernels with the top-k sum: one program per (token, row block) runs A slots, so 1/A of the
# per-slot grid's programs; narrower row blocks (more programs) and fewer warps are in the grid
INT_SLOT_DOWN_GRID = [(4, 1024, 4, False), (2, 1024, 4, False), (1, 1024, 4, False), (1, 1024, 2, False),
                      (2, 512, 2, False), (1, 512, 1, False), (4, 512, 4, False), (8, 512, 4, False),
                      (8, 1024, 8, False)]
CODE_SLOT_DOWN_GRID = [(4, 32, 1), (2, 64, 1), (1, 128, 1), (2, 32, 1), (1, 64, 1), (1, 32, 1), (1, 256, 1),
                       (2, 128, 2), (4, 64, 2), (8, 32, 2)]
REL_ERR_MAX = 2e-2  # bf16 outputs of a K <= 14336 dot product
TIME_BUDGET_S = 280  # past this, only the defaults are timed (the run must stay under 5 minutes)


def grid_with_default(grid: dict, default: dict, bucket: int) -> list:
    """Returns the configs of a bucket with the default first (always measured: the baseline)."""
    return [default[bucket]] + [c for c in grid[bucket] if c != default[bucket]]


def plan() -> list[tuple[str, int, str, tuple]]:
    """Returns every (shape, batch, kernel, config) the run times, in order."""
    out = []
    for name in SHAPES:
        for b in BATCHES:
            bucket = ops.batch_bucket(b)
            out += [(name, b, "int4", c) for c in grid_with_default(INT_GRID, ops.INT_DEFAULT, bucket)]
            out += [(name, b, "code", c) for c in grid_with_default(CODE_GRID, ops.CODE_DEFAULT, bucket)]
    return out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def time_config(cfg: tuple, check, timed, ref: torch.Tensor, bench, stored_bytes: int) -> dict:
    """Returns one config's run: seconds of timed() (bench), relative error of check() against
    ref, and GB/s of stored_bytes; or the error of a config that does not compile."""
    try:
        err = rel_err(check(), ref)
        seconds = bench(timed)
    except Exception as e:  # a config that does not compile (registers, shared memory)
        return {"cfg": list(cfg), "error": str(e)[:200]}
    return {"cfg": list(cfg), "s": seconds, "rel_err": err, "GBps": stored_bytes / seconds / 1e9}


def pick(runs: list[dict], default: tuple) -> tuple[dict | None, dict | None]:
    """Returns (fastest run within REL_ERR_MAX, the default config's run); None where there is none."""
    ok = [r for r in runs if "s" in r and r["rel_err"] <= REL_ERR_MAX]
    best = min(ok, key=lambda r: r["s"]) if ok else None
    return best, next((r for r in runs if r["cfg"] == list(default) and "s" in r), None)


def make_matrices(rows: int, cols: int) -> dict:
    """Returns the bf16 matrix and its int4-g128 and sub-1-bit code forms, on the GPU."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=g) * 0.02).cuda()
    q = rtn_quantize(w[None], IntGrid(INT_BITS, INT_GROUP))
    int_parts = (pack_codes(q.codes[0], INT_BITS), q.params[0][0].half(), q.params[1][0].to(torch.uint8))
    tq = rtn_quantize(w[None], TernaryGrid())
    d = build_dictionary(symbol_probabilities(tq.codes), 8)
    code_parts = (*encode(tq.codes[0], d), tq.params[0][0, :, 0].half(), tq.params[1][0, :, 0].half(), d.table.cuda())
    return {"bf16": w.bfloat16(), "int4": int_parts, "code": code_parts}


SLOT_SHAPES = {  # name: (experts E, hidden D, ffn I, experts per token A)
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
}


def make_layer(experts: int, hidden: int, ffn: int, device: str = "cuda") -> dict:
    """Returns one layer's stacked int4-g128 and code forms {kind: parts} on the device."""
    g = torch.Generator().manual_seed(0)
    out: dict = {"int4": {}, "code": {}}
    for kind, (rows, cols) in (("gate_up", (2 * ffn, hidden)), ("down", (hidden, ffn))):
        w = (torch.randn(experts, rows, cols, generator=g) * 0.02).to(device)
        q = rtn_quantize(w, IntGrid(INT_BITS, INT_GROUP))
        out["int4"][kind] = (pack_codes(q.codes, INT_BITS), q.params[0].half(), q.params[1].to(torch.uint8))
        del q
        tq = rtn_quantize(w, TernaryGrid())
        d = build_dictionary(symbol_probabilities(tq.codes), 8)
        out["code"][kind] = (*encode(tq.codes, d), tq.params[0][..., 0].half(), tq.params[1][..., 0].half(),
                             d.table.to(device))
        del w, tq
    return out


def tune_slots(out_dir: str, shapes: dict = SLOT_SHAPES, device: str = "cuda", bench=None) -> dict:
    """Times the per-slot kernels over the batch-1 grids; prints the *_SLOT_TUNED tables and
    returns the results (`device` and `bench` other than the defaults: a CPU smoke test)."""
    if bench is None:
        bench = lambda fn: common.do_bench_s(fn, warmup=5, rep=20)  # noqa: E731
    results: dict = {"meta": common.run_meta(None, device), "device": common.device_name(device),
                     "int": f"int{INT_BITS} group {INT_GROUP}", "shapes": {}}
    int_tuned, code_tuned, int_down_tuned, code_down_tuned = {}, {}, {}, {}
    for name, (e, d, i, a) in shapes.items():
        layer = make_layer(e, d, i, device)
        routings = [torch.randperm(e, generator=torch.Generator().manual_seed(r))[:a].to(device) for r in range(8)]
        weights = torch.full((a,), 1.0 / a, device=device, dtype=torch.bfloat16)
        entry = results["shapes"][name] = {}
        for kernel, grid, default in (("int4", INT_GRID[1], ops.INT_DEFAULT[1]), ("code", CODE_GRID[1], ops.CODE_DEFAULT[1])):
            for kind, (rows, cols) in (("gate_up", (i, d)), ("down", (d, i))):
                parts = layer[kernel][kind]
                swiglu = kind == "gate_up"
                x = torch.randn(1 if swiglu else a, cols, device=device, dtype=torch.bfloat16)
                args = dict(top_k=a if swiglu else 1, weights=None if swiglu else weights, swiglu=swiglu)
                per_expert = parts[:6 if kernel == "code" else 3]  # the stored tensors, not the table
                stored = sum(t[0].numel() * t.element_size() for t in per_expert)
                if kernel == "int4":
                    run = lambda ids, cfg: ops.int_slot_linear_triton(x, ids, *parts, INT_BITS, config=cfg, **args)  # noqa: E731
                    ref = ops.int_slot_linear_reference(x.float(), routings[0], *parts, INT_BITS, **{
                        **args, "weights": None if swiglu else weights.float()})
                else:
                    run = lambda ids, cfg: ops.code_slot_linear_triton(x, ids, *parts, config=cfg, **args)  # noqa: E731
                    ref = ops.code_slot_linear_reference(x.float(), routings[0], *parts, **{
                        **args, "weights": None if swiglu else weights.float()})
                runs = []
                for cfg in [default] + [c for c in grid if c != default]:
                    counter = iter(range(1 << 30))
                    runs.append(time_config(cfg, lambda: run(routings[0], cfg),
                                            lambda: run(routings[next(counter) % 8], cfg), ref, bench, a * stored))
                best, base = pick(runs, default)
                entry[f"{kernel} {kind}"] = {"runs": runs, "best": best, "default": base,
                                             "floor_s": a * stored / HBM_BYTES_PER_S}
                if best:
                    if kernel == "int4":
                        int_tuned[(INT_BITS, rows, cols)] = tuple(best["cfg"])
                    else:
                        code_tuned[(rows, cols)] = tuple(best["cfg"])
                    print(f"{name:14s} {kernel:5s} {kind:8s} best {str(tuple(best['cfg'])):24s} {best['s'] * 1e6:7.1f} us "
                          f"(default {base['s'] * 1e6 if base else float('nan'):7.1f}) floor "
                          f"{a * stored / HBM_BYTES_PER_S * 1e6:6.1f} us {best['GBps']:6.0f} GB/s err {best['rel_err']:.1e}",
                          flush=True)
                else:
                    print(f"{name:14s} {kernel:5s} {kind:8s} no valid config: {runs}", flush=True)
                if kind == "down":
                    entry[f"{kernel} down+sum"] = tune_down_sum(kernel, parts, x, routings, weights, rows, cols,
                                                                a * stored, bench, name,
                                                                int_down_tuned if kernel == "int4" else code_down_tuned)
        del layer
        if device == "cuda":
            torch.cuda.empty_cache()
    results["int_slot_tuned"] = {str(k): v for k, v in int_tuned.items()}
    results["code_slot_tuned"] = {str(k): v for k, v in code_tuned.items()}
    print("\nINT_SLOT_TUNED = {  # (bits, output rows, K): (BLOCK_N, BLOCK_K, num_warps, use_dot)")
    for k, v in int_tuned.items():
        print(f"    {k}: {v},")
    print("}\nCODE_SLOT_TUNED = {  # (output rows, K): (BLOCK_R, words per step, num_warps)")
    for k, v in code_tuned.items():
        print(f"    {k}: {v},")
    print("}\nINT_SLOT_DOWN_TUNED = {  # (bits, output rows, K): (BLOCK_N, BLOCK_K, num_warps, use_dot)")
    for k, v in int_down_tuned.items():
        print(f"    {k}: {v},")
    print("}\nCODE_SLOT_DOWN_TUNED = {  # (output rows, K): (BLOCK_R, words per step, num_warps)")
    for k, v in code_down_tuned.items():
        print(f"    {k}: {v},")
    print("}")
    results["int_slot_down_tuned"] = {str(k): v for k, v in int_down_tuned.items()}
    results["code_slot_down_tuned"] = {str(k): v for k, v in code_down_tuned.items()}
    common.write_json(results, out_dir, "tune_quant_slots")
    return results


def tune_down_sum(kernel: str, parts: tuple, h: torch.Tensor, routings: list, weights: torch.Tensor, rows: int,
                  cols: int, stored_bytes: int, bench, name: str, tuned: dict) -> dict:
    """Times the down kernel with the top-k sum (one token, A slots) over its grid, and the old path
    (per-slot down at its tile, then the torch sum) as the baseline; records the winner in `tuned`
    and returns the runs."""
    a = h.shape[0]
    if kernel == "int4":
        fused = lambda ids, cfg: ops.int_slot_down_triton(h, ids, *parts, INT_BITS, a, weights, config=cfg)  # noqa: E731
        old = lambda ids: ops.int_slot_linear_triton(h, ids, *parts, INT_BITS, 1, weights).sum(dim=0)  # noqa: E731
        ref = ops.int_slot_down_reference(h.float(), routings[0], *parts, INT_BITS, a, weights.float())
        grid, default, key = INT_SLOT_DOWN_GRID, ops.int_slot_down_config(INT_BITS, rows, cols, a), (INT_BITS, rows, cols)
    else:
        fused = lambda ids, cfg: ops.code_slot_down_triton(h, ids, *parts, a, weights, config=cfg)  # noqa: E731
        old = lambda ids: ops.code_slot_linear_triton(h, ids, *parts, 1, weights).sum(dim=0)  # noqa: E731
        ref = ops.code_slot_down_reference(h.float(), routings[0], *parts, a, weights.float())
        grid, default, key = CODE_SLOT_DOWN_GRID, ops.code_slot_down_config(rows, cols, a), (rows, cols)
    counter = iter(range(1 << 30))
    base = time_config(("per-slot + sum",), lambda: old(routings[0])[None], lambda: old(routings[next(counter) % 8]),
                       ref, bench, stored_bytes)
    runs = []
    for cfg in [default] + [c for c in grid if c != default]:
        counter = iter(range(1 << 30))
        runs.append(time_config(cfg, lambda: fused(routings[0], cfg), lambda: fused(routings[next(counter) % 8], cfg),
                                ref, bench, stored_bytes))
    best, first = pick(runs, default)
    if best:
        tuned[key] = tuple(best["cfg"])
        print(f"{name:14s} {kernel:5s} down+sum best {str(tuple(best['cfg'])):24s} {best['s'] * 1e6:7.1f} us "
              f"(default {first['s'] * 1e6 if first else float('nan'):7.1f}, per-slot + torch sum "
              f"{base['s'] * 1e6 if 's' in base else float('nan'):7.1f}) floor "
              f"{stored_bytes / HBM_BYTES_PER_S * 1e6:6.1f} us {best['GBps']:6.0f} GB/s err {best['rel_err']:.1e}",
              flush=True)
    else:
        print(f"{name:14s} {kernel:5s} down+sum no valid config: {runs}", flush=True)
    return {"runs": runs, "best": best, "default": first, "per_slot_plus_sum": base,
            "floor_s": stored_bytes / HBM_BYTES_PER_S}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    p.add_argument("--dry-run", action="store_true", help="list what would be timed and exit")
    p.add_argument("--slots", action="store_true", help="tune the per-slot (decode) kernels instead")
    args = p.parse_args()
    if args.slots and not args.dry_run:
        tune_slots(args.out)
        return
    todo = plan()
    if args.dry_run:
        for name, b, kernel, cfg in todo:
            print(f"{name:16s} {SHAPES[name]} batch {b:2d} {kernel:5s} {cfg}")
        counts = {k: sum(1 for t in todo if t[2] == k) for k in ("int4", "code")}
        print(f"{len(todo)} timings ({counts}); per kernel and shape: "
              f"{ {k: v // len(SHAPES) for k, v in counts.items()} }")
        return
    t_start = time.perf_counter()
    torch.manual_seed(0)
    results: dict = {"meta": common.run_meta(args, "cuda"), "device": common.device_name("cuda"),
                     "torch": torch.__version__,
                     "hbm_bytes_per_s": HBM_BYTES_PER_S, "int": f"int{INT_BITS} group {INT_GROUP}", "shapes": {}}
    int_tuned, code_tuned = {}, {}
    summary = []
    bench = lambda fn: common.do_bench_s(fn, warmup=5, rep=20)  # noqa: E731
    for name, (rows, cols) in SHAPES.items():
        mats = make_matrices(rows, cols)
        stored = {"bf16": nbytes(mats["bf16"]), "int4": nbytes(*mats["int4"]), "code": nbytes(*mats["code"])}
        entry = {"rows": rows, "cols": cols, "bytes": stored, "chunk": mats["code"][0].shape[-1], "batches": {}}
        for b in BATCHES:
            bucket = ops.batch_bucket(b)
            x = torch.randn(b, cols, device="cuda", dtype=torch.bfloat16)
            row = {"bf16_s": bench(lambda: F.linear(x, mats["bf16"]))}
            refs = {"int4": ops.int_linear_reference(x.float(), *mats["int4"], INT_BITS),
                    "code": ops.code_linear_reference(x.float(), *mats["code"])}
            for kernel, default in (("int4", ops.INT_DEFAULT[bucket]), ("code", ops.CODE_DEFAULT[bucket])):
                runs = []
                for n, b_, k_, cfg in todo:
                    if (n, b_, k_) != (name, b, kernel):
                        continue
                    if cfg != default and time.perf_counter() - t_start > TIME_BUDGET_S:
                        runs.append({"cfg": list(cfg), "skipped": "time budget"})
                        continue
                    if kernel == "int4":
                        fn = lambda cfg=cfg: ops.int_linear_triton(x, *mats["int4"], INT_BITS, config=cfg)  # noqa: E731
                    else:
                        fn = lambda cfg=cfg: ops.code_linear_triton(x, *mats["code"], config=cfg)  # noqa: E731
                    runs.append(time_config(cfg, fn, fn, refs[kernel], bench, stored[kernel]))
                best, base = pick(runs, default)
                row[kernel] = {"runs": runs, "best": best, "default": base,
                               "floor_s": stored[kernel] / HBM_BYTES_PER_S}
                if best:
                    key = (INT_BITS, rows, cols, bucket) if kernel == "int4" else (rows, cols, bucket)
                    (int_tuned if kernel == "int4" else code_tuned)[key] = tuple(best["cfg"])
                    summary.append((name, b, kernel, best, base, row[kernel]["floor_s"], row["bf16_s"]))
                    print(f"{name:16s} B={b:2d} {kernel:5s} best {str(tuple(best['cfg'])):24s} "
                          f"{best['s'] * 1e6:8.1f} us (default {base['s'] * 1e6 if base else float('nan'):8.1f}) "
                          f"floor {row[kernel]['floor_s'] * 1e6:6.1f} us  bf16 {row['bf16_s'] * 1e6:6.1f} us  "
                          f"x{row['bf16_s'] / best['s']:5.2f} vs bf16  {best['GBps']:6.0f} GB/s  "
                          f"err {best['rel_err']:.1e}", flush=True)
                else:
                    print(f"{name:16s} B={b:2d} {kernel:5s} no valid config: {runs}", flush=True)
            entry["batches"][b] = row
        results["shapes"][name] = entry
        del mats
        torch.cuda.empty_cache()
    results["elapsed_s"] = time.perf_counter() - t_start
    results["int_tuned"] = {str(k): v for k, v in int_tuned.items()}
    results["code_tuned"] = {str(k): v for k, v in code_tuned.items()}
    print(f"\n{'shape':16s} {'B':>3s} {'kernel':6s} {'us':>8s} {'floor':>7s} {'bf16':>7s} {'vs bf16':>8s}")
    for name, b, kernel, best, _, floor, bf16 in summary:
        print(f"{name:16s} {b:3d} {kernel:6s} {best['s'] * 1e6:8.1f} {floor * 1e6:7.1f} {bf16 * 1e6:7.1f} "
              f"{bf16 / best['s']:7.2f}x")
    print("\nINT_TUNED = {  # (bits, R, K, batch bucket): (BLOCK_N, BLOCK_K, num_warps, use_dot)")
    for k, v in int_tuned.items():
        print(f"    {k}: {v},")
    print("}\nCODE_TUNED = {  # (R, K, batch bucket): (BLOCK_R, words per step, num_warps)")
    for k, v in code_tuned.items():
        print(f"    {k}: {v},")
    print(f"}}\nelapsed {results['elapsed_s']:.0f} s")
    common.write_json(results, args.out, "tune_quant_kernels")


if __name__ == "__main__":
    main()
