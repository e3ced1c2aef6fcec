#!/usr/bin/env python3
"""Multi-GPU benchmark (issue 16): one GPU vs two (expert, tensor, and both), over NVLink.

Run on a 2-GPU machine from the repository root, in one call (budgeted at 500 s: rows that would
start later are skipped with the reason, ranks still running 30 s after it are killed; never run on
GPUs yet, so the minutes it takes there are unmeasured):

    NCCL_NVLS_ENABLE=0 MOEKIT_GIT_COMMIT=<commit> PYTHONPATH=src python3 benchmarks/bench_parallel.py --out $OUT

Smoke test on the CPU (2 gloo processes, tiny shapes, every row's code path, ~35 s):

    PYTHONPATH=src python3 benchmarks/bench_parallel.py --small --device cpu --out /tmp/bench

The script spawns 2 rank processes (torch.multiprocessing; NCCL on cuda:{rank}, gloo on the CPU),
plus a gloo control group over which rank 0 decides each row and gathers both ranks' results; rank
0 rewrites bench_parallel.json after every row, and skips (with the reason) rows that would start
past --time-budget-s. Ranks that die or hang in a row (no row written for --row-timeout-s) are
killed and a fresh pair resumes at that row (a parallel row is retried once without CUDA graphs,
and so are the parallel rows after it), so one failed NCCL capture does not cost the rest of the
call; `rank_deaths` lists them. Rows, in order:

  1. bandwidth  all_reduce and all_to_all of decode- and prefill-sized messages (N x D bf16, N = 1,
                32, 1024 tokens, D of each shape) and of 256 MB (the link's peak): seconds per call
                and GB/s (algorithm bytes; bus bytes = 2(R-1)/R and (R-1)/R of them).
  2. per shape (qwen3-30b-a3b: 48 layers, ~61 GB; mixtral-8x7b: 32 layers, ~93 GB; random bf16
     weights drawn on the GPUs, random_weights.RandomCheckpoint, no disk), per mode:
        1gpu    the model whole on cuda:0 (the single-GPU engine, whole-step CUDA graph)
        ep2     ep=2: each GPU holds half the routed experts, tokens go to them by all-to-all
        tp2     tp=2: heads, MLP and each expert's ffn split, all_reduce after o_proj and experts
        ep2tp2  tp=2,ep=tp: the 2 GPUs split the heads (tp) and the experts by id (ep), the only
                EP+TP that 2 ranks can hold (a 2 x 2 grid needs 4)
     prefill tok/s (a 1024-token prompt through generate), decode tok/s at B=1 and B=32 (generate, greedy,
     CUDA graphs as the engine chooses: `graph` says whole / piecewise / eager), the HBM ceiling
     of rank 0 (the ranks hold equal shares), speedup and scaling efficiency (speedup / 2) over 1gpu, greedy tokens
     vs 1gpu, and the GPU time per layer in collectives (NCCL kernels in a profiled forward of
     N = 1, 32, 1024 tokens) next to the same collectives measured alone in row 1.
  3. fit24: mixtral-8x7b cut to --fit-layers layers (12: ~35 GB, more than one 24 GB GPU holds),
     every GPU capped at 24 GB (torch.cuda.set_per_process_memory_fraction): tp2 and ep2 across
     both vs load_offloaded on one GPU at a 24 GB budget (experts in pinned host memory); and
     ep2off: each GPU offloads its own half of the experts at 12 GB (the same 24 GB in all, two
     PCIe links; parallel.offload; not capped, its peak is reported against the budget).

Shape legend: L = layers, D = hidden, E = experts, A = experts per token, B = batch, N = tokens,
R = ranks (2).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import common  # also puts src/ on sys.path when moekit is not importable
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_parallel_report import NOTES, bandwidth_table, summarize, table
from common import (
    BF16_FLOP_PER_S,
    HBM_BYTES_PER_S,
    log,
    median_s,
    run_meta,
    sync,
    write_json,
)
from random_checkpoint import mixtral_hf_config, qwen3_moe_hf_config

NAME = "bench_parallel"
RANKS = 2
GB = 1e9
SMALL_BUDGET_BYTES = 1_000_000  # --small fit24 rows: the tiny model's activations need ~0.9 MB

# (config factory, full shape, tiny shape for --small)
SHAPES = {
    "qwen3-30b-a3b": (qwen3_moe_hf_config,
                      {"layers": 48, "hidden": 2048, "expert_ffn": 768, "experts": 128, "top_k": 8, "heads": 32,
                       "kv_heads": 4, "vocab": 151936},
                      {"layers": 2, "hidden": 64, "expert_ffn": 32, "experts": 8, "top_k": 2, "heads": 4,
                       "kv_heads": 2, "vocab": 128}),
    "mixtral-8x7b": (mixtral_hf_config,
                     {"layers": 32, "hidden": 4096, "expert_ffn": 14336, "experts": 8, "top_k": 2, "heads": 32,
                      "kv_heads": 8, "vocab": 32000},
                     {"layers": 2, "hidden": 64, "expert_ffn": 64, "experts": 4, "top_k": 2, "heads": 4,
                      "kv_heads": 2, "vocab": 128}),
}
MODES = {  # mode -> (ep, tp, ep_over_tp); None: one GPU, no process group
    "1gpu": None, "ep2": (2, 1, False), "tp2": (1, 2, False), "ep2tp2": (2, 2, True)}


def hf_config(shape: str, small: bool, layers: int | None = None) -> dict:
    """Returns the config.json dict of a shape (full or tiny), cut to `layers` when given."""
    factory, full, tiny = SHAPES[shape]
    dims = dict(tiny if small else full)
    if layers:
        dims["layers"] = layers
    return factory(**dims, max_positions=4096)


# ---- one rank ---------------------------------------------------------------------------------------

class Rank:
    """This process's rank: its device, world comm (NCCL or gloo) and gloo control group."""

    def __init__(self, rank: int, port: int, args: argparse.Namespace):
        from moekit.parallel import ExpertComm

        self.rank, self.args = rank, args
        cuda = args.device == "cuda"
        self.device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(1)
        timeout = timedelta(seconds=args.collective_timeout_s)
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=RANKS, timeout=timeout)
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.time_budget_s + 120))
        self.comm = ExpertComm(rank, RANKS, self.device, args.collective_timeout_s)
        self.dtype = torch.bfloat16 if cuda else torch.float32
        self.groups: dict = {}

    def agree(self, value):
        """Returns rank 0's `value` on both ranks (over the gloo control group)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather(self, value) -> list:
        """Returns both ranks' `value`, in rank order (over the control group)."""
        out = [None] * RANKS
        dist.all_gather_object(out, value, group=self.control)
        return out

    def group(self, ep: int, tp: int, over: bool):
        from moekit.parallel.tensor import ParallelGroups

        if (ep, tp, over) not in self.groups:  # every rank creates every group, in the same order
            self.groups[(ep, tp, over)] = ParallelGroups.create(self.comm, ep, tp, over)
        return self.groups[(ep, tp, over)]

    def release(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


def time_collective(fn, device: torch.device, reps: int) -> float:
    """Returns the median seconds of one call of fn (a collective) over `reps` calls."""
    return median_s(fn, device, reps=reps, warmup=3)


def bandwidth_row(rk: Rank, shapes: list[str]) -> dict:
    """Returns all_reduce and all_to_all seconds and GB/s per message size (row 1)."""
    args, dev = rk.args, rk.device
    sizes = {}
    for shape in shapes:
        d = hf_config(shape, args.small)["hidden_size"]
        for n in (1, 32 if not args.small else 4, args.prefill_tokens):
            sizes[f"{shape} N={n}"] = n * d * 2
    sizes["peak 256 MB" if not args.small else "peak 1 MB"] = 256 << 20 if not args.small else 1 << 20
    out = {}
    for label, nbytes in sizes.items():
        numel = max(nbytes // 2, RANKS)
        numel -= numel % RANKS
        x = torch.ones(numel, dtype=torch.bfloat16, device=dev)
        y = torch.empty_like(x)
        reps = 20 if nbytes < 64 << 20 else 8
        ar = time_collective(lambda x=x: dist.all_reduce(x), dev, reps)
        a2a = time_collective(lambda x=x, y=y: dist.all_to_all_single(y, x), dev, reps)
        b = numel * 2
        out[label] = {"bytes": b, "all_reduce_s": ar, "all_reduce_algbw_gb_s": b / ar / GB,
                      "all_reduce_busbw_gb_s": b / ar / GB * 2 * (RANKS - 1) / RANKS,
                      "all_to_all_s": a2a, "all_to_all_busbw_gb_s": b / a2a / GB * (RANKS - 1) / RANKS}
    return out


def held_bytes(model) -> dict:
    """Returns the bytes this rank holds: total, the input embedding, and routed experts."""
    from moekit.model import MoEBlock

    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    experts = sum(t.numel() * t.element_size() for layer in model.layers if isinstance(layer.mlp, MoEBlock)
                  for t in [*layer.mlp.experts.parameters(), *layer.mlp.experts.buffers()])
    embed = model.embed.weight.numel() * model.embed.weight.element_size() if hasattr(model.embed, "weight") else 0
    return {"total": total, "embed": embed, "experts": experts}


def decode_bytes(held: dict, cfg, batch: int) -> float:
    """Returns the bytes a decode step at `batch` reads on this rank: everything but the input
    embedding, and of the routed experts the share uniform routing touches, 1 - (1 - A/E)^B."""
    touched = 1 - (1 - cfg.top_k / cfg.num_experts) ** batch
    return held["total"] - held["embed"] - held["experts"] * (1 - touched)


def collective_profile(model, ids: torch.Tensor, device: torch.device, layers: int) -> dict:
    """Returns the time per layer in collectives of one forward of ids [B, T]: NCCL kernels' GPU
    time (CUDA), or gloo/c10d ops' host time (CPU: enqueue only, the wait is not counted)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    reps = 3
    with torch.inference_mode():
        model(ids, last_only=True)
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                model(ids, last_only=True)
            sync(device)
    coll_us = kernels_us = 0.0
    calls = 0
    from torch.autograd import DeviceType

    for ev in prof.key_averages():
        key = ev.key.lower()
        if cuda and getattr(ev, "device_type", None) != DeviceType.CUDA:
            continue  # CPU ops: their kernels are counted once, as kernels
        t = (getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)) if cuda \
            else ev.self_cpu_time_total
        kernels_us += t
        if ("nccl" in key) if cuda else any(k in key for k in ("gloo", "c10d::", "all_reduce", "all_to_all",
                                                                  "allgather", "all_gather")):
            coll_us += t
            calls += ev.count
    if kernels_us == 0:  # e.g. CUPTI refused: say so rather than report 0 s in collectives
        return {"collective_s_per_layer": None, "what": "the profiler saw no kernels (CUPTI unavailable?)"}
    return {"collective_s_per_layer": coll_us / 1e6 / reps / layers, "collective_calls_per_layer": calls / reps / layers,
            "timed_s_per_forward": kernels_us / 1e6 / reps, "what": "NCCL kernel GPU time" if cuda else
            "gloo host time (enqueue only)"}


def measure(rk: Rank, model, cfg, label: str) -> dict:
    """Returns one model's prefill and decode figures on this rank (every participating rank
    calls it alike: the parallel model's collectives need them all)."""
    from moekit.generate import GenerationStats

    args, dev = rk.args, rk.device
    gen = torch.Generator().manual_seed(7)
    held = held_bytes(model)
    out: dict = {"held_gb": held["total"] / GB, "expert_gb": held["experts"] / GB}
    # prefill through generate (one new token): the engine's own path, chunked where the placement
    # asks (offload), so every mode pays the same KV-cache writes
    ids = torch.randint(0, cfg.vocab_size, (1, args.prefill_tokens), generator=gen).to(dev)
    times = []
    for _ in range(1 + args.reps):
        stats = GenerationStats()
        model.generate(ids, max_new_tokens=1, temperature=0, eos_token_ids=(), stats=stats)
        times.append(stats.prefill_s)
    t = statistics.median(times[1:])
    out["prefill_tok_s"] = args.prefill_tokens / t
    out["prefill_s"] = t
    out["decode"] = {}
    for b in args.batches:
        prompt = torch.randint(0, cfg.vocab_size, (b, args.prompt_tokens), generator=gen).to(dev)
        stats = GenerationStats()
        eager = args.eager_parallel and label not in ("1gpu", "offload")
        tokens = model.generate(prompt, max_new_tokens=args.decode_tokens, temperature=0, eos_token_ids=(),
                                stats=stats, cuda_graph=False if eager else None)
        step_bytes = decode_bytes(held, cfg, b)
        out["decode"][str(b)] = {
            "tok_s": b * stats.decode_tok_s, "tok_s_per_seq": stats.decode_tok_s,
            "graph": stats.extra.get("graph", "whole" if stats.cuda_graph else "eager"),
            "graph_capture_s": stats.extra.get("graph_capture_s"), "bytes_per_step": step_bytes,
            # offloaded experts stream over PCIe: no HBM ceiling (the offload benchmarks give its bounds)
            "hbm_ceiling_tok_s": None if label in ("offload", "ep2off") else b * HBM_BYTES_PER_S / step_bytes,
            "tokens": tokens[0].tolist()}
    active = held["total"] - held["embed"] - held["experts"] * (1 - min(1.0, cfg.top_k / cfg.num_experts))
    out["prefill_ceiling_tok_s"] = BF16_FLOP_PER_S / (2 * active / rk.dtype.itemsize)
    out["collectives"] = {}
    if label != "1gpu" and label != "offload":
        for n in (1, 32 if not args.small else 4, args.prefill_tokens):
            shape = (n, 1) if n <= 32 else (1, n)  # decode-shaped: n sequences of one token
            x = torch.randint(0, cfg.vocab_size, shape, generator=gen).to(dev)
            out["collectives"][f"N={n}"] = collective_profile(model, x, dev, cfg.num_layers)
    if dev.type == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated(dev) / GB
    runtime = getattr(model, "expert_runtime", None)
    if runtime is not None and hasattr(runtime, "report"):
        rep = runtime.report()
        out["runtime"] = {k: v for k, v in rep.items() if isinstance(v, (int, float, str, bool))}
    return out


def load(rk: Rank, mode: str, hf: dict, budget_bytes: int | None = None):
    """Returns this rank's model for `mode` (None where the rank sits the row out)."""
    from random_weights import RandomCheckpoint

    from moekit.load import load_model
    from moekit.parallel.tensor import load_parallel

    ckpt = RandomCheckpoint(hf, rk.device)
    if mode == "1gpu":
        return load_model(ckpt, device=rk.device, dtype=rk.dtype, progress=False) if rk.rank == 0 else None
    if mode == "offload":
        from moekit.offload.config import OffloadConfig
        from moekit.offload.loader import load_offloaded

        if rk.rank != 0:
            return None
        # KV caches come out of the budget at each generate (context_tokens unset), as a user's run does
        config = OffloadConfig(device_memory=budget_bytes, store="host", misses="fetch")  # as the ranks do
        return load_offloaded(ckpt, device=rk.device, dtype=rk.dtype, offload=config)
    if mode == "ep2off":  # each rank offloads its own half of the experts under its own budget
        from moekit.offload.config import OffloadConfig
        from moekit.parallel.offload import load_offloaded_parallel

        return load_offloaded_parallel(ckpt, rk.comm, OffloadConfig(device_memory=budget_bytes, store="host"),
                                       dtype=rk.dtype)
    return load_parallel(ckpt, rk.group(*MODES[mode]), dtype=rk.dtype, progress=False)


def model_row(rk: Rank, mode: str, hf: dict, budget_bytes: int | None = None) -> dict:
    """Returns this rank's figures of one (shape, mode) row, or {"error"} / {"idle"}."""
    from moekit.families import family_for

    cfg = family_for(hf, where="bench").config(hf)
    t0 = time.perf_counter()
    # the allocator is capped at the budget, except for offloaded ranks: their cache is sized from the
    # plan's estimate (no measured warm-up, parallel.offload), so their peak is reported against it
    cap = rk.device.type == "cuda" and budget_bytes is not None and mode != "ep2off"
    if cap:  # the allocator refuses to hold more than the budget on this GPU
        total = torch.cuda.get_device_properties(rk.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_bytes / total), rk.device)
    model = None
    try:
        model = load(rk, mode, hf, budget_bytes)
        if model is None:
            return {"idle": True}
        load_s = time.perf_counter() - t0
        out = measure(rk, model, cfg, mode)
        out.update(load_s=load_s, row_s=time.perf_counter() - t0)
        return out
    except Exception as e:  # noqa: BLE001 - the row records it; the next row still runs
        return {"error": f"{type(e).__name__}: {str(e)[:400]}", "traceback": traceback.format_exc()[-2000:]}
    finally:
        del model
        rk.release()
        if cap:
            torch.cuda.set_per_process_memory_fraction(1.0, rk.device)


def row_plan(args: argparse.Namespace) -> list[tuple[str, str | None, float | None]]:
    """Returns the rows in order: (shape or "bandwidth" / "fit24", mode, GB per GPU or None)."""
    rows = [("bandwidth", None, None)] + [(shape, mode, None) for shape in args.shapes for mode in args.modes]
    if args.fit_layers:
        rows += [("fit24", mode, args.budget_gb) for mode in ("offload", "tp2", "ep2")]
        rows.append(("fit24", "ep2off", args.budget_gb / RANKS))  # the same total budget, offloaded on both
    return rows


def row_name(shape: str, mode: str | None) -> str:
    return shape if mode is None else f"{shape} {mode}"


def rank_main(rank: int, port: int, args: argparse.Namespace, deadline: float, first_row: int) -> None:
    """Runs the rows from `first_row` on this rank; rank 0 writes the JSON after each (appending to
    the one an earlier pair of ranks left when first_row > 0)."""
    rk = Rank(rank, port, args)
    path = Path(args.out) / f"{NAME}.json"
    if first_row > 0 and path.exists():
        results = json.loads(path.read_text())
    else:
        results = {"meta": run_meta(args, rk.device) if rank == 0 else None, "rows": [], "notes": NOTES}
        if rank == 0:
            results["meta"]["ranks"] = RANKS
            results["meta"]["ceilings"] = {"hbm_bytes_per_s": HBM_BYTES_PER_S, "bf16_flop_per_s": BF16_FLOP_PER_S}
            write_json(results, args.out, NAME)  # before any row: a death in the first one is resumed too
    estimate: dict[str, float] = {}
    for shape, mode, budget in row_plan(args)[first_row:]:
        name = row_name(shape, mode)
        left = deadline - time.time()
        guess = estimate.get(shape, 10.0 if args.small else 30.0)
        skip = rk.agree(None if left > guess else f"skipped: {left:.0f} s of the time budget left, the row "
                                                    f"needs ~{guess:.0f} s")
        if skip:
            row = {"row": name, "skipped": skip}
        else:
            if rank == 0:
                log(f"row {name}")
            if args.die_in_row == name and rank == 1 and not args.eager_parallel:
                os._exit(3)  # the launcher's restart path, tested on the CPU
            t0 = time.perf_counter()
            if shape == "bandwidth":
                try:
                    mine = bandwidth_row(rk, args.shapes)
                except Exception as e:  # noqa: BLE001
                    mine = {"error": f"{type(e).__name__}: {e}"}
            else:
                hf = hf_config("mixtral-8x7b", args.small, args.fit_layers) if shape == "fit24" else \
                    hf_config(shape, args.small, args.layers.get(shape))
                gb = None if budget is None else int(budget * GB)
                if gb is not None and args.small:  # tiny shapes: the least the offload planner accepts
                    gb = SMALL_BUDGET_BYTES
                mine = model_row(rk, mode, hf, gb)
            spent = time.perf_counter() - t0
            estimate[shape] = max(estimate.get(shape, 0.0), spent * 1.2)
            both = rk.gather(mine)
            row = {"row": name, "shape": shape, "mode": mode, "seconds": spent, "ranks": both}
            if args.eager_parallel and mode not in (None, "1gpu", "offload"):
                row["note"] = "decoded without CUDA graphs: an earlier pair of ranks died in a parallel row"
            if budget is not None:
                row["budget_gb_per_gpu"] = budget
        if rank == 0:
            results["rows"].append(row)
            summarize(results)
            write_json(results, args.out, NAME)
    if rank == 0:
        log(f"wrote {Path(args.out) / (NAME + '.json')}")
    dist.barrier(group=rk.control)
    dist.destroy_process_group()


# ---- the launcher -------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_output_args(p, NAME)
    p.add_argument("--small", action="store_true", help="tiny shapes (the CPU smoke test)")
    p.add_argument("--time-budget-s", type=float, default=500.0,
                   help="rows that would start past it are skipped; the ranks are killed 30 s after it")
    p.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--layers", default="", help="cut shapes, e.g. mixtral-8x7b=16 (default: full depth)")
    p.add_argument("--fit-layers", type=int, default=12, help="mixtral layers of the fit24 rows (0: no such rows)")
    p.add_argument("--budget-gb", type=float, default=24.0, help="memory per GPU in the fit24 rows")
    p.add_argument("--prefill-tokens", type=int, default=1024)
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt of the decode runs")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per decode run")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--reps", type=int, default=3, help="timed prefill forwards")
    p.add_argument("--collective-timeout-s", type=float, default=60.0,
                   help="a collective that does not finish in this long ends its rank (NCCL watchdog)")
    p.add_argument("--row-timeout-s", type=float, default=200.0,
                   help="ranks that write no row for this long are killed and restarted from the next row")
    p.add_argument("--eager-parallel", action="store_true", help="decode the parallel rows without CUDA graphs")
    p.add_argument("--die-in-row", default=None, help=argparse.SUPPRESS)  # rank 1 exits there (a test)
    args = p.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [s for s in args.shapes if s not in SHAPES] + [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown shape or mode {bad}: shapes {list(SHAPES)}, modes {list(MODES)}")
    args.layers = {k: int(v) for k, v in (kv.split("=") for kv in args.layers.split(",") if kv)}
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.small:
        args.prefill_tokens = min(args.prefill_tokens, 16)
        args.decode_tokens = min(args.decode_tokens, 6)
        args.batches = [1, 4]
        args.reps = 1
        args.fit_layers = args.fit_layers and 2
    if args.device == "cuda" and torch.cuda.device_count() < RANKS:
        p.error(f"--device cuda needs {RANKS} GPUs, found {torch.cuda.device_count()}")
    return args


def run_pair(args: argparse.Namespace, deadline: float, first_row: int, path: Path) -> tuple[list, str | None]:
    """Returns the exit codes of one pair of rank processes run from `first_row`, and why they were
    killed (None: they ended): past the deadline, or no row written for --row-timeout-s (a hang)."""
    ctx = mp.get_context("spawn")
    port = common_free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, args, deadline, first_row)) for r in range(RANKS)]
    for p in procs:
        p.start()
    last = time.time()
    seen = path.stat().st_mtime if path.exists() else None
    why = None
    while any(p.is_alive() for p in procs):
        procs[0].join(2.0)
        mtime = path.stat().st_mtime if path.exists() else None
        if mtime != seen:
            seen, last = mtime, time.time()
        if time.time() > deadline + 30:
            why = "past the time budget"
        elif time.time() - last > args.row_timeout_s:
            why = f"no row finished in {args.row_timeout_s:g} s (hung)"
        if why:
            for r, p in enumerate(procs):
                if p.is_alive():
                    log(f"rank {r}: {why}: killing it")
                    p.kill()
            break
    for p in procs:
        p.join()
    return [p.exitcode for p in procs], why


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
    deadline = time.time() + args.time_budget_s
    path = Path(args.out) / f"{NAME}.json"
    if path.exists():
        path.unlink()  # a resumed pair appends to this run's file only
    plan = row_plan(args)
    first, codes, deaths = 0, [], []
    while True:
        codes, why = run_pair(args, deadline, first, path)
        if all(c == 0 for c in codes) or not path.exists():
            break
        # a pair died or hung in a row: record it, and go on from the next row with fresh ranks (a
        # parallel row is first retried once without CUDA graphs)
        results = json.loads(path.read_text())
        failed = len(results["rows"])
        if failed >= len(plan) or time.time() > deadline - 30:
            break
        shape, mode, _ = plan[failed]
        death = {"row": row_name(shape, mode), "exit_codes": codes, "killed": why, "eager": args.eager_parallel}
        deaths.append(death)
        log(f"ranks died in row {death['row']} ({why or f'exit codes {codes}'})")
        if not args.eager_parallel and mode not in (None, "1gpu", "offload"):
            args.eager_parallel = True  # retry this row, and decode every later parallel row, eagerly
        else:
            results["rows"].append({"row": death["row"], "shape": shape, "mode": mode,
                                    "ranks": [{"error": f"ranks died ({why or f'exit codes {codes}'})"}] * RANKS})
            write_json(results, args.out, NAME)
            failed += 1
        first = failed
    if not path.exists():
        log(f"no {path}: rank 0 failed before its first row (exit codes {codes})")
        return 1
    results = json.loads(path.read_text())
    results["exit_codes"], results["rank_deaths"] = codes, deaths
    write_json(results, args.out, NAME)
    print(bandwidth_table(results))
    print()
    print(table(results))
    return 0 if all(c == 0 for c in codes) and not deaths else 1


def common_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
