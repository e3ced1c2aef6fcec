"""Where a decode step's time goes when every routed expert runs on the CPU (issue 12: OLMoE-1B-7B
shape, `--misses cpu` 23.5 tok/s and `auto` 33.5 where llama.cpp --n-cpu-moe does 44.5, while the
native kernel alone reads a layer's top-8 experts at 83 GB/s: ~1.2 ms of the ~2.6 ms a layer takes).

    cd /work/main && PYTHONPATH=src python3 benchmarks/probes/profile_cpu_misses.py --out $OUT       # H200, ~80 s
    PYTHONPATH=src python3 benchmarks/probes/profile_cpu_misses.py --small --device cpu --out /tmp/p  # smoke test

One random bf16 OLMoE-shaped checkpoint (default 8 layers: per-layer numbers are what this probe is
for; --layers 16 for the issue's whole model, ~25 s more) is written once to --ckpt (reused when its
config matches) and loaded offloaded with a budget of --slots expert slots (45: the issue's run at
llama.cpp's 1.68 GB footprint; 8 = the least the planner takes) and misses "auto" (its rates are
measured at load). Then, on the one loaded model, each mode (misses cpu / auto x predictor
speculative / none; cpu with the least cache; cpu and auto with the CPU rate measured as before
(one expert alone per call: ~2x slower than its share of a layer call, which pushed misses to the
link)) decodes --tokens tokens with
MOEKIT_PROFILE_CPU_MISSES=1 (offload.cpu.MissProfile: host perf_counter marks on the CPU-miss path)
and CUDA events around every graph segment's replay (monkeypatched here) and the sum's H2D copy.

Per layer call it reports milliseconds (mean over the decode tokens after the first two):
    launch        the segment graph's replay call on the host
    to_run        replay return -> the expert source's run() (piecewise Python)
    stage         run() -> the routing sync (predictor launch, x / weights D2H queued)
    sync_wait     (b) the routing's .tolist(): the host waits for the GPU segment and the D2H
    decide        Python after the sync: hits, split
    device_part   device experts, prefetch, admissions queued
    jobs          the CPU part's routes built in Python
    (runner thread, MOEKIT_CPU_ASYNC unset on CUDA: jobs come before the kernel's start and the device
    part after it, inside the kernel window; `wait` is what the host then waited for the call)
    kernel        (c) the native call (wrapper + OpenMP kernel), wall time
    h2d_host      (d) queuing the sum's H2D copy (host)
    post          the add and the rest of run()
    after_run     run() -> the next replay (moe_out copy in piecewise)
    period        one replay start to the next (the layer's share of a step)
    segment_gpu   (a) the segment graph on the GPU (events around the replay)
    h2d_gpu       (d) the sum's H2D on the GPU, from the compute stream reaching it to its end:
                  large means it queued behind prefetch / admission copies on the copy engine
    other         (e) period - sync_wait - kernel - h2d_host
plus per token: decode ms, experts on the CPU / device, bytes over the link and read on the CPU.

Beside them, in the same process: the kernel alone on that layer's experts at 14/15/16 threads
(the same 8 back to back; 8 different each call, as decode reads them; with a 0.3 ms spin gap
between calls, as the GPU segment leaves the team idle; on an unpinned copy), the stream-read
ceiling, and in child processes the rotating and gap cases under OMP_WAIT_POLICY unset / active /
passive (libgomp reads it at load). torch.profiler's CPU+CUDA top 25 ops of a few decode tokens.

Reading it: kernel ~ kernel alone (rotate, gap) -> the kernel is fine in the step and the loss is
in the other columns; kernel >> kernel alone -> threads / memory (compare the gap and policy rows:
wake-up; unpinned: pinned memory; link bytes: DMA contention). h2d_gpu >> 0.02 ms -> head-of-line
blocking behind prefetch copies (compare predictor none). sync_wait >> segment_gpu -> the GPU was
busy with something else first (h2d_gpu, the add) or the sync itself is slow.

Shapes: L layers, D = 2048 hidden, I = 1024 expert ffn, E = 64 experts, A = 8 per token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common
import common
import torch

NAME = "profile_cpu_misses"
PROFILE_ENV = "MOEKIT_PROFILE_CPU_MISSES"
SHAPES = {
    "olmoe": {"hidden": 2048, "expert_ffn": 1024, "experts": 64, "top_k": 8, "heads": 16, "kv_heads": 16,
              "vocab": 50304},
    "small": {"hidden": 128, "expert_ffn": 64, "experts": 8, "top_k": 2, "heads": 4, "kv_heads": 4, "vocab": 512},
}
GAP_S = 3e-4  # the idle time between two layers' kernels the gap rows imitate (a GPU segment)
COLUMNS = ["launch", "to_run", "stage", "sync_wait", "decide", "device_part", "jobs", "kernel", "wait", "h2d_host",
           "post", "after_run", "period", "segment_gpu", "h2d_gpu", "other"]


# ---- the in-step timeline ------------------------------------------------------------------------

class ReplayTimer:
    """Wraps torch.cuda.CUDAGraph.replay while active: host perf_counter before / after and CUDA
    events around each replay (the piecewise step's segments)."""

    def __init__(self):
        self.records: list[dict] = []
        self.original = None

    def __enter__(self):
        self.original = original = torch.cuda.CUDAGraph.replay
        records = self.records

        def replay(graph):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            original(graph)
            end.record()
            records.append({"before": t0, "after": time.perf_counter(), "events": (start, end)})

        torch.cuda.CUDAGraph.replay = replay
        return self

    def __exit__(self, *exc):
        torch.cuda.CUDAGraph.replay = self.original


def _span(call: dict, a: str, b: str) -> float:
    """Returns call[b] - call[a] in ms, 0 where a mark is missing (a call with no CPU part)."""
    return (call[b] - call[a]) * 1e3 if a in call and b in call else 0.0


def layer_rows(calls: list[dict], replays: list[dict], moe_layers: list[int]) -> list[dict]:
    """Returns one dict of COLUMNS (ms) per profiled layer call, each with the replay before it
    (matched by host time) and the replay after it; calls are grouped into tokens by layer order."""
    rows, token = [], -1
    replays = sorted(replays, key=lambda r: r["before"])
    r = 0
    for i, c in enumerate(calls):
        if c["layer"] == moe_layers[0]:
            token += 1
        while r + 1 < len(replays) and replays[r + 1]["before"] < c["enter"]:
            r += 1
        before = replays[r] if replays and replays[r]["before"] < c["enter"] else None
        after = replays[r + 1] if before is not None and r + 1 < len(replays) else None
        row = {"token": token, "layer": c["layer"], "cpu_experts": c.get("cpu_experts", 0),
               "device_experts": c.get("device_experts", 0),
               "stage": _span(c, "enter", "sync_start"), "sync_wait": _span(c, "sync_start", "sync_end"),
               "decide": _span(c, "sync_end", "split"), "device_part": _span(c, "split", "device_launched"),
               "jobs": _span(c, "device_launched", "kernel_start"), "kernel": _span(c, "kernel_start", "kernel_end"),
               "h2d_host": _span(c, "h2d_start", "h2d_end")}
        if "kernel_wait" in c:  # the runner thread: split, jobs, kernel_start (posted), device part, wait, kernel_end
            row.update(jobs=_span(c, "split", "kernel_start"), device_part=_span(c, "kernel_start", "device_launched"),
                       wait=_span(c, "kernel_wait", "kernel_end"))
        end = c.get("h2d_end", c.get("kernel_end", c.get("split", c["enter"])))
        row["post"] = (c.get("exit", end) - end) * 1e3
        if "h2d_events" in c:
            row["h2d_gpu"] = c["h2d_events"][0].elapsed_time(c["h2d_events"][1])
        if before is not None:
            row["launch"] = (before["after"] - before["before"]) * 1e3
            row["to_run"] = (c["enter"] - before["after"]) * 1e3
            row["segment_gpu"] = before["events"][0].elapsed_time(before["events"][1])
        if after is not None and after["before"] > c.get("exit", c["enter"]):
            row["after_run"] = (after["before"] - c["exit"]) * 1e3
            row["period"] = (after["before"] - before["before"]) * 1e3
        elif i + 1 < len(calls):  # no graphs (the CPU): up to the next call
            row["period"] = (calls[i + 1]["enter"] - c["enter"]) * 1e3
        row["other"] = row.get("period", 0.0) - row["sync_wait"] - row["kernel"] - row["h2d_host"]
        rows.append(row)
    return rows


def summarize(rows: list[dict], skip_tokens: int) -> dict:
    """Returns the mean of each column over the rows of tokens >= skip_tokens (and per layer)."""
    kept = [r for r in rows if r["token"] >= skip_tokens] or rows

    def means(rs):
        return {k: round(statistics.fmean([r[k] for r in rs if k in r]), 4) for k in COLUMNS + ["cpu_experts",
                                                                                                "device_experts"]
                if any(k in r for r in rs)}

    by_layer, by_token = {}, {}
    for r in kept:
        by_layer.setdefault(r["layer"], []).append(r)
    for r in rows:
        by_token[r["token"]] = by_token.get(r["token"], 0.0) + r.get("period", 0.0)
    return {"rows": len(kept), "mean_ms": means(kept), "per_layer_ms": {k: means(v) for k, v in by_layer.items()},
            "token_layer_periods_ms": [round(v, 3) for v in by_token.values()]}


# ---- the kernel alone --------------------------------------------------------------------------

def spin(seconds: float) -> None:
    """Busy-waits (as the main thread spins in cudaStreamSynchronize while a segment runs)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def kernel_alone(gate_up: torch.Tensor, down: torch.Tensor, experts: list[int], top_k: int, threads: list[int],
                 reps: int, expert_bytes: int) -> dict:
    """Returns GB/s and ms of the native call on `top_k` experts of the stacks gate_up [E, 2I, D],
    down [E, D, I] for each thread count: 'hot' (the same experts back to back), 'rotate' (the
    next top_k experts each call), 'gap' (rotate with GAP_S of spinning before each call),
    'unpinned' (hot on a copy in ordinary memory)."""
    from moekit.native.experts import Scratch, expert_ffn_stacked

    x = (torch.randn(1, gate_up.shape[2]) * 0.1).to(gate_up.dtype)
    out = torch.empty_like(x)
    count = gate_up.shape[0]
    groups = [[(e + k) % count for k in range(top_k)] for e in range(0, count, top_k)]
    unpinned_gu, unpinned_dn = gate_up[experts].clone(), down[experts].clone()
    nbytes = top_k * expert_bytes
    results = {}
    for t in threads:
        scratch = Scratch()  # the worker's kind: reused by every call

        def call(gu, dn, rows, threads=t, scratch=scratch):
            t0 = time.perf_counter()
            expert_ffn_stacked(x, gu, dn, [(r, [0], [1.0 / top_k]) for r in rows], out=out, threads=threads,
                               scratch=scratch)
            return time.perf_counter() - t0

        row = {}
        for case in ("hot", "rotate", "gap", "unpinned"):
            times = []
            for i in range(reps + 2):
                if case == "gap":
                    spin(GAP_S)
                if case == "hot":
                    s = call(gate_up, down, experts)
                elif case == "unpinned":
                    s = call(unpinned_gu, unpinned_dn, list(range(top_k)))
                else:
                    s = call(gate_up, down, groups[i % len(groups)])
                if i >= 2:
                    times.append(s)
            med = statistics.median(times)
            row[case] = {"ms": round(med * 1e3, 4), "gb_s": round(nbytes / med / 1e9, 2),
                         "min_ms": round(min(times) * 1e3, 4)}
        results[t] = row
    return results


def child_kernel(args) -> None:
    """--kernel-only: the rotate / gap cases on random experts in this process (its OMP env)."""
    shape = SHAPES["small" if args.small else "olmoe"]
    d, ffn, e, k = shape["hidden"], shape["expert_ffn"], shape["experts"], shape["top_k"]
    with torch.inference_mode():
        gate_up = torch.full((e, 2 * ffn, d), 0.01, dtype=torch.bfloat16)
        down = torch.full((e, d, ffn), 0.01, dtype=torch.bfloat16)
        res = kernel_alone(gate_up, down, list(range(k)), k, [args.threads[0]], args.reps, 3 * ffn * d * 2)
    print("RESULT " + json.dumps(res))


def omp_policies(args) -> dict:
    """Returns kernel_alone's rows in child processes with OMP_WAIT_POLICY unset / active / passive."""
    out = {}
    for policy in ("unset", "active", "passive"):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        if policy != "unset":
            env["OMP_WAIT_POLICY"] = policy.upper()
        cmd = [sys.executable, __file__, "--kernel-only", "--threads", str(args.omp_threads), "--reps", str(args.reps)]
        if args.small:
            cmd.append("--small")
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=120)
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            out[policy] = json.loads(line[7:]) if line else {"error": (r.stderr or r.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            out[policy] = {"error": "timed out"}
        common.log(f"OMP_WAIT_POLICY={policy}: {json.dumps(out[policy])[:300]} ({time.perf_counter() - t0:.1f} s)")
    return out


# ---- the offloaded model -------------------------------------------------------------------------

def checkpoint(args, device: torch.device) -> tuple[Path, dict]:
    """Returns (folder, hf config) of the random checkpoint, written unless one with this config is there."""
    from random_checkpoint import olmoe_hf_config, write_random_checkpoint

    hf = olmoe_hf_config(args.layers, **SHAPES["small" if args.small else "olmoe"], max_positions=1024)
    folder = Path(args.ckpt)
    done = folder / "probe_done.json"
    if done.exists() and json.loads(done.read_text()) == hf:
        common.log(f"checkpoint: reusing {folder}")
        return folder, hf
    t0 = time.perf_counter()
    _, _, total = write_random_checkpoint(folder, hf, device=device if device.type == "cuda" else "cpu")
    done.write_text(json.dumps(hf))
    common.log(f"checkpoint: {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s")
    return folder, hf


def load(path: Path, device: torch.device, hf: dict, slots: int, misses: str):
    """Returns (model, budget bytes): loaded offloaded (every expert in host memory, the issue's
    setup) at the planner's least budget (its refusal of 1 MB says it; it holds top_k experts)
    plus (slots - top_k) experts; refused after the load's measured fit, at the budget it asks."""
    from bench_llamacpp import least_budget

    from moekit.errors import MoekitError
    from moekit.offload import OffloadConfig, load_offloaded

    def attempt(budget):
        return load_offloaded(path, device=device, dtype=torch.bfloat16,
                              offload=OffloadConfig(device_memory=budget, misses=misses, store="host"))

    try:
        attempt(10**6)
        raise RuntimeError("a 1 MB budget was accepted: cannot find the least budget")
    except MoekitError as e:
        least = least_budget(str(e))
        if least is None:
            raise
    expert_bytes = 3 * hf["intermediate_size"] * hf["hidden_size"] * 2  # bf16 gate, up, down
    budget = least + max(slots - hf["num_experts_per_tok"], 0) * expert_bytes
    try:
        return attempt(budget), budget
    except MoekitError as e:  # the measured fit wants more (libraries' workspaces)
        budget = least_budget(str(e))
        if budget is None:
            raise
        common.free_memory(device)
        return attempt(budget), budget


def one_expert_costs(runtime, reps: int = 5):
    """Returns the cost model as measured before (CPU rate from one expert alone per call), beside
    the runtime's own (an expert's share of a top_k call): the 'one_expert_costs' modes."""
    from moekit.offload.cpu import CostModel

    cfg, cpu, top_k = runtime.model_config, runtime.cpu, runtime.model_config.top_k
    keys = [(i, e) for i in reversed(runtime.moe_layers) for e in range(cfg.experts_in(i))]
    measured = {}
    for tokens in dict.fromkeys((1, cpu.max_tokens)):
        x = torch.randn(tokens, cfg.hidden_size).to(torch.bfloat16)
        w = torch.full((tokens, top_k), 1.0 / top_k, dtype=torch.bfloat16)
        runs = []
        for i in range(reps + 1):
            layer, e = keys[(i * 7) % len(keys)]
            _, seconds, _ = cpu.join(cpu.submit(layer, [(e, [t * top_k for t in range(tokens)])], x, w))
            runs.append(seconds)
        measured[tokens] = statistics.median(runs[1:])
    h2d = runtime.costs.h2d_bytes_per_s if runtime.costs else 0.0  # none on the CPU (smoke test)
    return CostModel(h2d, measured[1], measured[cpu.max_tokens], cpu.max_tokens)


def run_mode(model, runtime, device, prompt, tokens: int, skip: int, profile: bool) -> dict:
    """Returns the decode tok/s, per-token stats and (profile) the per-layer timeline of one generate."""
    import moekit

    runtime.forget_calls()
    runtime.reset_stats()
    if runtime.cpu.profile is not None:
        runtime.cpu.profile.clear()
    saved = runtime.cpu.profile
    if not profile:
        runtime.cpu.profile = None
    stats = moekit.GenerationStats()
    timer = ReplayTimer() if device.type == "cuda" and profile else None
    try:
        if timer is not None:
            with timer:
                model.generate(prompt, max_new_tokens=tokens, temperature=0, eos_token_ids=(), stats=stats)
        else:
            model.generate(prompt, max_new_tokens=tokens, temperature=0, eos_token_ids=(), stats=stats)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        runtime.cpu.profile = saved
    rep = runtime.report()
    decode = max(rep.get("decode_tokens", 0), 1)
    out = {"decode_tok_s": round(stats.decode_tok_s, 2), "prefill_s": round(stats.prefill_s, 4),
           "decode_ms_per_token": round(stats.decode_s / max(stats.new_tokens - 1, 1) * 1e3, 3),
           "per_decode_token": {"link_mb": round(rep.get("decode_bytes_moved", 0) / decode / 1e6, 1),
                                "cpu_read_mb": round(rep.get("decode_cpu_bytes", 0) / decode / 1e6, 1)},
           "report": {k: rep.get(k) for k in ("hit_rate", "cpu_experts", "lookups", "hits", "demand_fetches",
                                              "prefetches", "prefetch_hits", "prefetch_precision", "admissions", "cpu_s",
                                              "cpu_wait_s", "stall_s", "bytes_per_token", "cpu_bytes_per_token",
                                              "decode_tokens", "cache_slots", "cpu_threads", "misses_used")}}
    if profile and saved is not None:
        calls = list(saved.calls)
        replays = timer.records if timer is not None else []
        if calls:
            prefill = [c for c in calls if c["layer"] == runtime.moe_layers[0]]
            out["profiled_calls"] = len(calls)
            rows = layer_rows(calls, replays, runtime.moe_layers)
            out["timeline"] = summarize(rows, skip)
            out["first_prefill_like_calls"] = len(prefill)
    return out


def profiler_table(model, prompt, device, tokens: int) -> dict:
    """Returns torch.profiler's top 25 ops (by self CPU time and by device time) of a short decode."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        model.generate(prompt, max_new_tokens=tokens, temperature=0, eos_token_ids=())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    avg = prof.key_averages()

    def dev(e, attr):
        return getattr(e, attr.replace("cuda", "device"), None) or getattr(e, attr, 0) or 0

    def rows(key):
        top = sorted(avg, key=key, reverse=True)[:25]
        return [{"name": e.key, "count": e.count, "self_cpu_us": round(e.self_cpu_time_total, 1),
                 "cpu_total_us": round(e.cpu_time_total, 1), "self_device_us": round(dev(e, "self_cuda_time_total"), 1),
                 "device_total_us": round(dev(e, "cuda_time_total"), 1)} for e in top]

    return {"tokens": tokens, "by_self_cpu": rows(lambda e: e.self_cpu_time_total),
            "by_self_device": rows(lambda e: dev(e, "self_cuda_time_total"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_output_args(p, NAME)
    p.add_argument("--layers", type=int, default=8, help="MoE layers of the random checkpoint (issue: 16)")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per mode")
    p.add_argument("--skip", type=int, default=2, help="decode tokens left out of the means (capture, warm-up)")
    p.add_argument("--slots", type=int, default=45, help="expert cache slots (45: the issue's run; 8: the least)")
    p.add_argument("--ckpt", default="/tmp/moekit_profile_cpu_misses_ckpt", help="where the checkpoint is written")
    p.add_argument("--threads", type=int, nargs="+", default=[14, 15, 16], help="kernel-alone thread counts")
    p.add_argument("--omp-threads", type=int, default=15, help="threads of the OMP_WAIT_POLICY child runs")
    p.add_argument("--reps", type=int, default=16, help="kernel-alone calls per case")
    p.add_argument("--small", action="store_true", help="a tiny shape (a CPU smoke test of this script)")
    p.add_argument("--skip-omp", action="store_true", help="no OMP_WAIT_POLICY child processes")
    p.add_argument("--skip-profiler", action="store_true")
    p.add_argument("--kernel-only", action="store_true", help=argparse.SUPPRESS)  # the child mode
    args = p.parse_args()
    if args.kernel_only:
        child_kernel(args)
        return 0
    os.environ[PROFILE_ENV] = "1"  # read when the CPU worker is made, at load
    device = torch.device(args.device)
    cores = os.cpu_count()
    results: dict = {"meta": common.run_meta(args, device), "cores": cores, "torch_threads": torch.get_num_threads(),
                     "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS",
                                                            "OMP_PROC_BIND")}}

    def save() -> None:
        path = common.write_json(results, args.out, NAME)
        common.log(f"wrote {path}")

    from moekit.native import experts as native_experts
    from moekit.native import library

    results["native_library"] = library() is not None
    path, hf = checkpoint(args, device)
    results["checkpoint"] = {"path": str(path), "hf": hf}
    t0 = time.perf_counter()
    misses = "auto" if device.type == "cuda" else "cpu"
    with torch.inference_mode():
        model, budget = load(path, device, hf, args.slots, misses)
    runtime = model.offload
    expert_bytes = runtime.plan.expert_bytes
    results["load"] = {"seconds": round(time.perf_counter() - t0, 1), "budget_bytes": budget,
                       "cache_slots": runtime.cache.num_slots, "expert_bytes": expert_bytes,
                       "cpu_threads": runtime.cpu.threads if runtime.cpu else None,
                       "costs": runtime.costs.to_dict() if runtime.costs else None, "misses_note": runtime.misses_note}
    common.log(f"loaded in {results['load']['seconds']} s: {json.dumps(results['load'])}")
    save()
    if runtime.cpu is None or runtime.cpu.profile is None:
        results["error"] = "no CPU worker with a profile (misses fell back?)"
        save()
        return 1
    prompt = torch.randint(0, hf["vocab_size"], (1, 16), device=device)  # > cpu_max_tokens: prefill fetches
    speculative = runtime.predictor
    from moekit.offload.predictors import Predictor

    # (misses, predictor, variant): "least_cache" = the planner's least slots (top_k); "one_expert_costs"
    # = the CPU rate measured as before this probe's commit (one expert alone per call)
    modes = [("cpu", "speculative", None), ("cpu", "none", None), ("cpu", "none", "least_cache")]
    if device.type == "cuda":
        modes += [("auto", "speculative", None), ("auto", "none", None), ("cpu", "speculative", "one_expert_costs"),
                  ("auto", "speculative", "one_expert_costs")]
    slots = runtime.cache.num_slots
    least_slots = runtime.plan.min_slots
    costs = runtime.costs
    results["modes"] = {}
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=4, temperature=0, eos_token_ids=())  # warm-up: compiles, pages
        old = one_expert_costs(runtime)
        results["load"]["one_expert_costs"] = old.to_dict()
        common.log(f"costs: top_k share {costs.to_dict() if costs else None}; one expert alone {old.to_dict()}")
        for misses_, pred, variant in modes:
            name = f"{misses_}/{pred}" + (f"/{variant}" if variant else "")
            runtime.misses = misses_
            runtime.predictor = speculative if pred == "speculative" else Predictor()
            runtime.costs = old if variant == "one_expert_costs" else costs
            runtime.new_cache(least_slots if variant == "least_cache" else slots)
            t1 = time.perf_counter()
            row = run_mode(model, runtime, device, prompt, args.tokens, args.skip, profile=True)
            if (misses_, pred, variant) == modes[0]:  # the same mode, instrumentation off: what it costs
                row["unprofiled"] = run_mode(model, runtime, device, prompt, args.tokens, args.skip, profile=False)
            row["cache_slots"] = runtime.cache.num_slots
            results["modes"][name] = row
            mean = row.get("timeline", {}).get("mean_ms", {})
            common.log(f"{name}: {row['decode_tok_s']} tok/s, {row['decode_ms_per_token']} ms/token, "
                       f"per layer {json.dumps(mean)} ({time.perf_counter() - t1:.1f} s)")
            save()
        runtime.misses, runtime.predictor, runtime.costs = "cpu", speculative, costs
        runtime.new_cache(slots)
        if not args.skip_profiler:
            t1 = time.perf_counter()
            results["torch_profiler"] = profiler_table(model, prompt, device, 6)
            common.log(f"torch.profiler: {time.perf_counter() - t1:.1f} s; top self-CPU: "
                       f"{[r['name'] for r in results['torch_profiler']['by_self_cpu'][:8]]}")
            save()

        # the kernel alone on one layer's experts, in this process
        layer = runtime.moe_layers[len(runtime.moe_layers) // 2]
        stacked = runtime.layout.view(runtime.store.host_rows(layer, 0)[0], layer)
        top_k = hf["num_experts_per_tok"]
        t1 = time.perf_counter()
        alone = kernel_alone(stacked["gate_up"], stacked["down"], list(range(top_k)), top_k,
                             sorted(set(args.threads + [runtime.cpu.threads])), args.reps, expert_bytes)
        ceilings = {}
        for t in sorted(set(args.threads + [runtime.cpu.threads])):
            ceilings[t] = round(native_experts.stream_read_bytes_per_s(1 << 30, threads=t, reps=3) / 1e9, 1)
        in_step = results["modes"]["cpu/none"].get("timeline", {}).get("mean_ms", {})
        results["kernel_alone"] = {
            "layer": layer, "experts": top_k, "bytes": top_k * expert_bytes, "gap_s": GAP_S, "by_threads": alone,
            "stream_read_gb_s": ceilings, "store_pinned": bool(runtime.store.host_rows(layer, 0)[0]["gate_up"].is_pinned()),
            "in_step_kernel_ms_cpu_none": in_step.get("kernel"),
            "in_step_gb_s_cpu_none": (round(in_step["cpu_experts"] * expert_bytes / (in_step["kernel"] * 1e-3) / 1e9, 2)
                                      if in_step.get("kernel") else None)}
        common.log(f"kernel alone ({time.perf_counter() - t1:.1f} s): {json.dumps(results['kernel_alone'])}")
        save()
    if not args.skip_omp:
        model = runtime = None
        common.free_memory(device)
        results["omp_wait_policy"] = omp_policies(args)
        save()
    common.log(common.markdown_table(
        ["mode", "tok/s", "ms/token", "link MB/tok", "cpu MB/tok"] + COLUMNS,
        [[name, r["decode_tok_s"], r["decode_ms_per_token"], r["per_decode_token"]["link_mb"],
          r["per_decode_token"]["cpu_read_mb"]] + [r.get("timeline", {}).get("mean_ms", {}).get(c) for c in COLUMNS]
         for name, r in results["modes"].items()]))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
