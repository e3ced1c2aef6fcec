"""What bench_serve times: a closed serving loop through moekit's Scheduler (throughput, time to
first token, inter-token latency, step wall times by kind, and what the timed loop paid that
warm-up should have), moekit's static-batch decode (the ceiling), and the paged decode attention
kernel alone against its HBM floor; with the counters they read (Triton compiles, graph captures).

Shapes: C = concurrency, T = prompt tokens, M = new tokens per request.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from functools import partial
from typing import Any

import common
import torch
from common import sync

import moekit
from moekit.serve import SamplingParams, Scheduler, SchedulerConfig


def percentile(values: list[float], q: float) -> float | None:
    """Returns the q-th percentile (0..100) by nearest rank, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def triton_variants() -> dict[str, int]:
    """Returns {kernel: compiled variants held} over the Triton kernels of moekit's modules (their
    JIT caches on every device; empty without triton or under the interpreter, which compiles
    nothing). The difference across a phase is the compiles it paid for."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return {}
    out: dict[str, int] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("moekit") or module is None:
            continue
        for obj in list(vars(module).values()):
            fn = obj
            for _ in range(3):  # autotuners and heuristics wrap the JITFunction as .fn
                if isinstance(fn, JITFunction) or fn is None:
                    break
                fn = getattr(fn, "fn", None) if not isinstance(fn, type(sys)) else None
            if isinstance(fn, JITFunction):
                caches = getattr(fn, "device_caches", None) or {}
                # device_caches[device][0] is the kernel cache (Triton 3.x)
                out[f"{fn.fn.__module__}.{fn.fn.__name__}"] = sum(len(entry[0]) for entry in caches.values())
    return out


def compiles_since(before: dict[str, int]) -> dict[str, int]:
    """Returns {kernel: new compiled variants} since `before` (triton_variants()), nonzero only."""
    now = triton_variants()
    return {k: n - before.get(k, 0) for k, n in sorted(now.items()) if n != before.get(k, 0)}


def step_times(times: dict[str, list[float]]) -> dict[str, dict[str, float | int]]:
    """Returns per step kind (static: decode-only, graph-replayed; static_mixed: with prefill,
    graph-replayed at a token bucket; mixed: eager, with prefill) the
    count and the p50 / p99 / max / mean wall milliseconds of a step (each step reads its tokens
    back, so its wall time is its device time too)."""
    return {kind: {"steps": len(t), "p50_ms": 1e3 * percentile(t, 50), "p99_ms": 1e3 * percentile(t, 99),
                   "max_ms": 1e3 * max(t), "mean_ms": 1e3 * sum(t) / len(t)} for kind, t in times.items() if t}


def attention_backends() -> dict[str, Any]:
    """Returns SDPA's backend priority and the cuDNN version (cuDNN first means a plan per new shape)."""
    try:
        order = [torch.nn.attention.SDPBackend(i).name for i in torch._C._get_sdp_priority_order()]
    except (AttributeError, ValueError):
        order = None
    return {"sdp_priority_order": order, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}


def prompts_for(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """Returns n random prompts with lengths uniform in [lo, hi] (ids clear of the lowest, special ones)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (t,), generator=g).tolist() for t in lengths]


def serve_closed_loop(sched: Scheduler, prompts: list[list[int]], concurrency: int, new_tokens: int,
                      deadline: float = float("inf")) -> dict[str, Any]:
    """Returns throughput and latencies of `prompts` through `sched`, `concurrency` in flight (a new
    request joins as one leaves); past `deadline` (perf_counter) the rest are aborted, marked truncated."""
    params = SamplingParams(max_tokens=new_tokens)
    pending, done, aborted = list(prompts), [], []
    steps0, preempt0 = sched.stats.steps, sched.stats.preemptions
    stats0 = dataclasses.replace(sched.stats)
    graphs0 = _graphs(sched)
    variants0 = triton_variants()
    times: dict[str, list[float]] = {"static": [], "static_mixed": [], "mixed": [], "land": []}
    waits: list[float] = []  # per static step: host time blocked reading the previous step's tokens (overlap)
    sync(sched.model.device)
    t0 = time.perf_counter()
    running = [sched.add(pending.pop(0), params) for _ in range(min(concurrency, len(pending)))]
    produced, full, drained = 0, None, None  # (perf_counter, tokens so far) at the steady window's ends
    while running:
        s = sched.stats
        before, t_step = (s.static_steps, s.static_mixed_steps, s.mixed_steps, s.device_wait_s_sum), time.perf_counter()
        produced += len(sched.step())
        # land: a call that launched nothing and only read an overlapped step's tokens back
        kind = ("static" if s.static_steps > before[0] else "static_mixed" if s.static_mixed_steps > before[1]
                else "mixed" if s.mixed_steps > before[2] else "land")
        times[kind].append(time.perf_counter() - t_step)
        if kind == "static":
            waits.append(s.device_wait_s_sum - before[3])
        for r in [r for r in running if r.finished]:
            running.remove(r)
            done.append(r)
            if pending:
                running.append(sched.add(pending.pop(0), params))
        if full is None and len(sched.running) == concurrency and not sched.waiting:
            full = (time.perf_counter(), produced, sched.stats.steps)  # every slot admitted
        if drained is None and not pending:
            drained = (time.perf_counter(), produced, sched.stats.steps)  # from here the batch only shrinks
        if time.perf_counter() > deadline and running:
            for r in running:
                sched.abort(r)
            aborted, running = running, []
    wall = time.perf_counter() - t0
    ttft = [r.time_to_first_token_s for r in done]
    itl = [gap for r in done for gap in r.inter_token_s]
    out_tokens = sum(len(r.output) for r in done + aborted)
    # steady state: all C slots busy, between the ramp-up (admitting the first C) and the drain
    steady = full is not None and drained is not None and drained[2] - full[2] >= 16
    return {"requests": len(done), "output_tokens": out_tokens, "wall_s": round(wall, 3),
            "output_tok_s": out_tokens / wall,
            "steady_tok_s": (drained[1] - full[1]) / (drained[0] - full[0]) if steady else None,
            "steady_steps": drained[2] - full[2] if steady else None, "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "itl_mean_s": sum(itl) / len(itl) if itl else None, "steps": sched.stats.steps - steps0,
            "preemptions": sched.stats.preemptions - preempt0, "kv_blocks": sched.cache.num_blocks,
            "static_decode": sched.decode is not None,
            "graph_buckets": sorted(b for b, s in sched.decode.steps.items() if s.graph is not None)
            if sched.decode is not None else [],
            "step_times": step_times(times),
            # decode-only steps launched while the previous one ran (SchedulerConfig.overlap), and the
            # split of a static step's wall time: waiting for the device vs host work (wall - wait;
            # without overlap the wait hides inside the read-back, so host = wall there)
            "overlapped_steps": sched.stats.overlapped_steps - stats0.overlapped_steps,
            "static_wait_p50_ms": 1e3 * percentile(waits, 50) if waits else None,
            "static_host_p50_ms": 1e3 * percentile([t - w for t, w in zip(times["static"], waits)], 50)
            if waits else None,
            "overlap": sched.config.overlap, "static_mixed": sched.static_mixed,
            "max_prefill_tokens": sched.config.max_prefill_tokens,
            "prefill_tokens": sched.stats.prefill_tokens - stats0.prefill_tokens,
            # what the timed loop paid for that warm-up should have: both 0 when warm() covered it
            "triton_compiles": compiles_since(variants0), "graph_captures": _graphs(sched) - graphs0,
            "prefill_interval": sched.config.prefill_interval,
            "truncated": {"aborted": len(aborted), "never_sent": len(pending)} if aborted or pending else None}


def base_static_mixed(sched: Scheduler, base: SchedulerConfig) -> bool:
    """Returns whether `base` (the config warm() ran under) had static mixed steps on."""
    return sched._auto_static_mixed if base.static_mixed is None else base.static_mixed


def _graphs(sched: Scheduler) -> int:
    """Returns the decode steps the scheduler has captured as CUDA graphs."""
    return 0 if sched.decode is None else sum(s.graph is not None for s in sched.decode.steps.values())


def static_decode(model, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict[str, Any]:
    """Returns moekit's decode speed on an equal-length batch [batch, prompt_len] (CUDA graphs)."""
    ids = torch.tensor(prompts_for(batch, prompt_len, prompt_len, vocab, seed=7), device=model.device)
    # warm-up at the timed shape: its prefill's kernel configuration (and attention plan) and the
    # decode capture are paid here, not in the timed prefill_s
    model.generate(ids, max_new_tokens=4, temperature=0, eos_token_ids=())
    variants0 = triton_variants()
    stats = moekit.GenerationStats()
    model.generate(ids, max_new_tokens=new_tokens, temperature=0, eos_token_ids=(), stats=stats)
    return {"batch": batch, "prompt_len": prompt_len, "decode_tok_s_per_seq": stats.decode_tok_s,
            "decode_tok_s": stats.decode_tok_s * batch, "itl_s": 1 / stats.decode_tok_s if stats.decode_tok_s else None,
            "prefill_s": stats.prefill_s, "prefill_tok_s": batch * prompt_len / stats.prefill_s if stats.prefill_s else None,
            "graph_capture_s": stats.extra.get("graph_capture_s"), "triton_compiles": compiles_since(variants0),
            "cuda_graph": stats.cuda_graph, "compiled": bool(stats.extra.get("compiled"))}


HBM_BYTES_PER_S = 4.2e12  # the H200's device-to-device copy rate (BENCH.md): the floor of a read


def attention_splits(cfg, device: torch.device, batches: list[int], lo: int, hi: int,
                     block_size: int) -> dict[str, Any]:
    """Returns per batch the paged decode attention of one layer (the model's heads, contexts
    uniform in [lo, hi], blocks scattered over a pool) in microseconds: the one-pass kernel
    (splits 1) against the flash-decoding split the GPU picks (moekit.paged_attention.decode_splits),
    next to the floor of reading its keys and values once at the HBM copy rate."""
    from moekit.paged_attention import decode_attention_triton, decode_splits

    if device.type != "cuda":
        return {"skipped": "the Triton decode kernels are timed on CUDA only"}
    h, hkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    out = {}
    for b in batches:
        ctx = torch.randint(lo, hi + 1, (b,), generator=g)
        width = -(-hi // block_size)
        pool = b * width + 1
        keys = torch.randn(pool, block_size, hkv, dh, device=device, dtype=torch.bfloat16)
        values = torch.randn_like(keys)
        tables = torch.randperm(pool - 1, generator=g)[:b * width].view(b, width).to(device, torch.int32) + 1
        q = torch.randn(b, h, dh, device=device, dtype=torch.bfloat16)
        args = (q, keys, values, tables, ctx.to(device, torch.int32), None)
        auto = decode_splits(b, hkv, device)
        one = common.do_bench_s(partial(decode_attention_triton, *args, splits=1))
        split = common.do_bench_s(partial(decode_attention_triton, *args, splits=auto)) if auto > 1 else one
        floor = 2 * int(ctx.sum()) * hkv * dh * 2 / HBM_BYTES_PER_S
        out[f"b{b}"] = {"splits": auto, "one_pass_us": 1e6 * one, "split_us": 1e6 * split,
                        "floor_us": 1e6 * floor, "mean_context": float(ctx.float().mean())}
        del keys, values
    return out
