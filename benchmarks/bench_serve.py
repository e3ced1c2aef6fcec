"""Serving benchmark (issue 13): continuous batching over the paged KV cache at concurrency
1/8/32/128 with prompts of mixed lengths, next to transformers' padded static batches and
moekit's own static-batch decode at the same batch, resident and offloaded at 25% of the bytes.

The H200 run (from the repository root; ~175 s expected: the f472762 run took 161 s with two
alternative rows, this one has five). Past --time-budget-s (225 s after the imports, less
--reserve-s 8 for the loops) no phase starts, a serving loop aborts what is in flight and
transformers' generate stops (its max_time), so it ends inside a 240 s call:

    MOEKIT_GIT_COMMIT=<commit> PYTHONPATH=src python3 benchmarks/bench_serve.py --out $OUT --time-budget-s 215

    (equivalently: --shapes olmoe-1b-7b --concurrency 1 8 32 128 --offload-concurrency 1
     --new-tokens 128 --min-len 32 --max-len 512 --step-tokens 2048 --alt-no-overlap 1 32
     --alt-eager-mixed 32 --alt-prefill-cap 512 --alt-prefill-cap-at 32 128 --alt-prefill-interval 0)

H200 seconds per phase (OLMoE-1B-7B shape, 13.8 GB bf16) in the f472762 run: imports + CUDA
init + checkpoint write 24; load + warm-up (Triton compiles, 8 decode buckets) 21; served C=1 1.0,
C=8 1.3, C=32 2.2, C=128 4.1 (static rows 1-2 each); an alternative row at C=32 ~2.7 (warm-up
included); transformers: load ~6, C=1 9, C=8 11, C=32 11, C=128 20 (each generate stops at
--hf-max-s 20 s, so C=128 may report a partial batch: `stopped_by_max_time`); offloaded 25%:
load + warm-up 22, C=1 (2 requests) 9. This run adds static mixed warm-up (~1, mixed buckets
captured) and the alternative rows: no overlap at C=1 and 32 (~1 + 2.5), eager mixed at C=32
(~2.5), prefill cap 512 at C=32 and 128 (~3 + 5), and the decode attention kernel alone at
B=1/8/32/128, one pass against flash-decoding splits (~3; `decode_attention`, its own table).
Whatever is left when the budget runs out is written as {"skipped": why}; the JSON is rewritten
after every phase, so a killed run still leaves every finished row.

The qwen3-30b-a3b shape (48 layers, 128 experts top-8, hidden 2048, expert ffn 768; 61.06 GB bf16)
is not written: 61 GB on a 64 GB disk, read by moekit and again by transformers, would overrun a
600 s call. --weights auto (the default) draws every shape over --disk-max-gb 20 on the GPU instead
(serve_weights.py: moekit reads a RandomCheckpoint, resident and offloaded; transformers is built
by from_config with its own random init; the JSON's `weights` says which). Its H200 run, alone,
alternative rows off (~220 s expected; a 330 s call):

    MOEKIT_GIT_COMMIT=<commit> PYTHONPATH=src python3 benchmarks/bench_serve.py --out $OUT \
        --shapes qwen3-30b-a3b --time-budget-s 280 --hf-max-s 12 \
        --alt-no-overlap --alt-eager-mixed --alt-prefill-cap 0

Expected H200 seconds per phase, scaled from the OLMoE run above by what bounds each one (B=1
decode steps by the layer count: bench_offload's qwen3 GPU-only step 3.8 ms against OLMoE's 1.43,
x2.7; full batches by the expert bytes a step reads, 58 / 12.9 GB, x4.5): imports + CUDA init 3;
load (drawn: ~55k tensors drawn on the GPU, no read) ~5 + warm-up (captures x3 the layers) ~30;
served C=1 3, C=8 4, C=32 7, C=128 18; static rows 4 + 3 + 5 + 10; decode attention 3;
transformers: from_config ~1 (5.17 built a 31 GB DeepSeek shape in 0.7 s), each of the 4 batches
at most --hf-max-s 12 + its prefill, ~56; offloaded 25% (15.3 GB): setup ~55
(offload_setup_estimate_s: the 58 GB pinned host store, drawn on the GPU and copied expert by
expert, then the fit and warm-up), C=1 (2 requests, bench_offload's 77.6 tok/s at 25%) ~10. The
pinned store fits the H200 host's 128 GB (bench_offload pinned the same 58 GB there); a host with
less available memory skips the offloaded rows with the reason in the JSON.

For each shape (random bf16 weights: routing is near-uniform, fine for speed):
  1. write a random checkpoint (or draw the weights, see above) and load it resident; one
     Scheduler for every row (its KV cache holds max(C) whole requests, its decode buckets are
     captured before anything is timed);
  2. per concurrency C: a closed loop of max(--min-requests, --requests-per-slot x C) requests
     through moekit.serve.Scheduler (in process, no HTTP), C in flight at once: output tok/s,
     time to first token and inter-token latency p50/p99 (from each request's token times);
     then moekit.generate on an equal-length batch [C, T] (decode tok/s x C: the static-batch
     decode ceiling, CUDA graphs, not compiled);
  3. transformers generate (one load) on the same prompts left-padded into a batch of C
     (output tok/s over the whole call, prefill included, as a server would see it);
  4. offloaded (--offload-fraction of the model's bytes): the scheduler again, with the allocator
     peak (torch.cuda.max_memory_allocated) next to the budget.
Per serve row the JSON also holds what the timed loop paid that warm-up should have: Triton
compiles by kernel (`triton_compiles`, from the JIT caches) and decode graph captures, both 0
when Scheduler.warm() covered every size class; step wall times split into decode-only (static,
graph-replayed), static_mixed (with prompt tokens, graph-replayed at a token bucket), mixed (eager,
with prompt tokens) and land (a call that only read an overlapped step's tokens back); for
decode-only steps the p50 host work and device wait (`static_host_p50_ms`, `static_wait_p50_ms`:
with overlap on, a wait > 0 means the host ran ahead of the device, so the step is device-bound);
`resident_setup` names SDPA's backend order (cuDNN first on Hopper builds a plan per new shape).
Alternative policies at some concurrencies (their own rows in both tables): overlapped decode
steps off (what the overlap saves), eager mixed steps (what static mixed steps save), a cap of
--alt-prefill-cap prompt tokens per step while sequences decode (ITL p99 against throughput).
Goals printed under the table: at C=32 >= 70% of the static decode at B=32 and >= 5x
transformers; at C=1 inter-token latency within 10% of static batch-1 decode.

    PYTHONPATH=src python3 benchmarks/bench_serve.py --small --device cpu --out /tmp/bs  # a smoke run anywhere
    (add --weights drawn for the no-disk path; tests/test_bench_serve.py runs both)

The timed loops are in serve_measure.py, the weights and the transformers baseline in
serve_weights.py.

Shapes: C = concurrency, T = prompt tokens, M = new tokens per request.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import common  # also puts src/ on sys.path when moekit is not importable
import torch
from common import free_memory, log
from random_checkpoint import olmoe_hf_config
from serve_measure import (
    attention_backends,
    attention_splits,
    base_static_mixed,
    compiles_since,
    prompts_for,
    serve_closed_loop,
    static_decode,
    triton_variants,
)
from serve_weights import (
    HOST_SHARE,
    WEIGHT_MODES,
    ServeWeights,
    available_host_bytes,
    offload_setup_estimate_s,
    prepare_weights,
    routed_expert_bytes,
    shape_bytes,
    transformers_padded,
    transformers_setup,
    weights_mode,
)

import moekit
from moekit.serve import Scheduler, SchedulerConfig

T_START = time.perf_counter()  # the budget counts from here (imports included)

QWEN3 = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
         "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
         "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
         "num_experts_per_tok": 8, "norm_topk_prob": True, "max_position_embeddings": 4096,
         "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False, "mlp_only_layers": [],
         "decoder_sparse_step": 1, "hidden_act": "silu", "torch_dtype": "bfloat16", "eos_token_id": None}
SHAPES: dict[str, Callable[[bool], dict]] = {
    "olmoe-1b-7b": lambda small: olmoe_hf_config(2, 256, 128, 8, 2, 4, 4, 1024) if small else
    olmoe_hf_config(16, 2048, 1024, 64, 8, 16, 16, 50304),
    "qwen3-30b-a3b": lambda small: {**QWEN3, **({"hidden_size": 128, "moe_intermediate_size": 64,
                                                 "num_hidden_layers": 2, "num_experts": 16, "head_dim": 32,
                                                 "num_attention_heads": 4, "num_key_value_heads": 2,
                                                 "vocab_size": 1024} if small else {})},
}


class Bench:
    """Runs the phases of each shape under try/except and a wall-clock budget; keeps every result
    and rewrites the JSON after each phase (a kill still leaves what was measured)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, torch.device(args.device)
        self.results: dict[str, Any] = {"meta": common.run_meta(args, self.device), "shapes": {}}
        self.rows: list[list[Any]] = []
        self.deadline = T_START + args.time_budget_s

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def phase(self, store: dict, name: str, fn: Callable[[], dict], min_s: float = 1.0) -> dict:
        """Returns fn()'s figures (or its error, or why it was skipped), stored under `name` and
        written out; skipped when less than min_s of the budget is left."""
        if self.left_s() < min_s:
            out = {"skipped": f"--time-budget-s {self.args.time_budget_s:.0f} spent ({min_s:.0f} s wanted, "
                              f"{max(0.0, self.left_s()):.0f} s left)"}
            log(f"{name} skipped: {out['skipped']}")
        else:
            log(f"{name} ...")
            t0 = time.perf_counter()
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 -- one failure must not lose the other figures
                out = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
                log(f"{name} FAILED: {out['error'][:300]}")
                free_memory(self.device)
            out["phase_s"] = round(time.perf_counter() - t0, 2)
        store[name] = out
        common.write_json(self.results, self.args.out, "bench_serve")
        return out

    def shape(self, name: str, root: Path) -> None:
        a, device = self.args, self.device
        hf = SHAPES[name](a.small)
        res = self.results["shapes"][name] = {}
        mode = weights_mode(a.weights, shape_bytes(hf), a.disk_max_gb)
        weights = prepare_weights(hf, mode, root, name, device)
        cfg, nbytes = weights.cfg, weights.nbytes
        res["weights"] = weights.describe()
        res["checkpoint_bytes"] = nbytes
        if mode == "disk":
            res["checkpoint_write_s"] = weights.write_s
            log(f"{name}: wrote {nbytes / 1e9:.2f} GB in {weights.write_s} s")
        else:
            log(f"{name}: {nbytes / 1e9:.2f} GB drawn on {device} by each engine, nothing written")
        requests = {c: max(a.min_requests, a.requests_per_slot * c) for c in a.concurrency}
        prompts = {c: prompts_for(requests[c], a.min_len, a.max_len, cfg.vocab_size, seed=c) for c in a.concurrency}
        for c in a.concurrency:
            res[f"c{c}"] = {}
        self.resident(name, weights, res, prompts)
        self.transformers(weights, res, prompts)
        for c in a.concurrency:
            r = res[f"c{c}"]
            served, static, theirs = (r.get(k, {}) for k in ("moekit_serve", "moekit_static", "transformers"))
            self.rows.append([name, "resident", c, served.get("output_tok_s"), served.get("ttft_p50_s"),
                              served.get("itl_p50_s"), served.get("itl_p99_s"), static.get("decode_tok_s"),
                              static.get("itl_s"), theirs.get("output_tok_s"), served.get("steady_tok_s")])
        for c in a.concurrency:  # the other policies' rows, next to the same static baseline
            r = res[f"c{c}"]
            for label, alt in r.items():
                if label.startswith("moekit_serve_") and "output_tok_s" in alt:
                    self.rows.append([name, label.removeprefix("moekit_serve_"), c, alt["output_tok_s"],
                                      alt["ttft_p50_s"], alt["itl_p50_s"], alt["itl_p99_s"],
                                      r.get("moekit_static", {}).get("decode_tok_s"),
                                      r.get("moekit_static", {}).get("itl_s"), None, alt.get("steady_tok_s")])
        if a.offload_fraction > 0:
            self.offloaded(name, weights, res)

    def resident(self, name: str, weights: ServeWeights, res: dict, prompts: dict[int, list[list[int]]]) -> None:
        """The scheduler and the static-batch decode at each concurrency, all weights resident."""
        a, device, cfg = self.args, self.device, weights.cfg
        t0 = time.perf_counter()
        model = moekit.load_model(weights.moekit_source(), device=device, dtype="bfloat16")
        load_s = time.perf_counter() - t0
        # one scheduler for every row: its KV cache holds max(C) full requests (no preemption) and
        # its decode buckets are captured once, before any timed step
        top = max(a.concurrency)
        sched = Scheduler(model, SchedulerConfig(max_seqs=top, max_step_tokens=a.step_tokens,
                                                 kv_tokens=top * (a.max_len + a.new_tokens + 16),
                                                 prefill_interval=a.prefill_interval,
                                                 static_decode=True if a.small else None))  # the smoke run: eagerly
        variants0 = triton_variants()
        warmed = sched.warm()  # every step size class the kernels compile for, then the decode buckets
        buckets = warmed["buckets"]
        warm = prompts_for(2, a.min_len, a.max_len, cfg.vocab_size, seed=0)
        serve_closed_loop(sched, warm, 2, 4)  # first calls of the rest: sampling, the allocator
        res["resident_setup"] = {"load_and_warm_s": round(time.perf_counter() - t0, 1), "load_s": round(load_s, 1),
                                 "buckets": buckets,
                                 "warm_step_tokens": warmed["step_tokens"], "kv_cache_bytes": sched.cache.bytes,
                                 "warm_triton_compiles": compiles_since(variants0), **attention_backends()}
        log(f"{name}: loaded, warmed and captured {buckets} in {res['resident_setup']['load_and_warm_s']} s")
        for c in a.concurrency:
            row = res[f"c{c}"]
            self.phase(row, "moekit_serve", partial(serve_closed_loop, sched, prompts[c], c, a.new_tokens,
                                                    self.deadline - a.reserve_s))
            self.phase(row, "moekit_static", partial(static_decode, model, c, a.static_prompt_len, a.new_tokens,
                                                     cfg.vocab_size), min_s=a.reserve_s)
        # the same loads under other policies: prefill batched into every Nth step while sequences
        # decode (fewer eager mixed steps, a later first token); mixed steps at static shapes
        # (token buckets, CUDA graphs: no eager launches at all)
        alternatives = []  # (label, scheduler overrides, concurrencies)
        if a.alt_no_overlap:  # what overlapped decode steps save (the host's work per step, unhidden)
            alternatives.append(("moekit_serve_no_overlap", {"overlap": False}, a.alt_no_overlap))
        if a.alt_eager_mixed:  # what static mixed steps save over eager ones
            alternatives.append(("moekit_serve_eager_mixed", {"static_mixed": False}, a.alt_eager_mixed))
        if a.alt_prefill_cap:  # shorter steps that carry prompts, more of them
            alternatives.append((f"moekit_serve_prefill_cap_{a.alt_prefill_cap}",
                                 {"max_prefill_tokens": a.alt_prefill_cap}, a.alt_prefill_cap_at))
        if a.alt_prefill_interval:
            alternatives.append((f"moekit_serve_prefill_interval_{a.alt_prefill_interval}",
                                 {"prefill_interval": a.alt_prefill_interval}, a.alt_concurrency))
        base = sched.config
        for label, overrides, at in alternatives:
            for c in [c for c in at if c in a.concurrency]:
                try:
                    self.phase(res[f"c{c}"], label, partial(self.alternative, sched, base, overrides, prompts[c], c),
                               min_s=a.reserve_s + 60)  # transformers' rows still to come
                finally:
                    sched.config = base
        # the decode attention kernel alone, one pass against split runs (flash-decoding)
        self.phase(res, "decode_attention", partial(attention_splits, model.config, device, [1, 8, 32, 128],
                                                    a.min_len, a.max_len + a.new_tokens, sched.cache.block_size),
                   min_s=a.reserve_s + 60)
        del sched, model
        free_memory(device)

    def alternative(self, sched: Scheduler, base: SchedulerConfig, overrides: dict, prompts: list[list[int]],
                    concurrency: int) -> dict:
        """Returns the serve figures of `prompts` under `base` with `overrides` (warmed first: the
        static mixed steps' captures); the caller restores the scheduler's config."""
        a = self.args
        sched.config = dataclasses.replace(base, **overrides)
        t_warm = time.perf_counter()
        # only a policy that turns static mixed steps on has captures to pay before timing
        warmed = sched.warm() if sched.static_mixed and not base_static_mixed(sched, base) else None
        warm_s = time.perf_counter() - t_warm
        out = serve_closed_loop(sched, prompts, concurrency, a.new_tokens, self.deadline - a.reserve_s)
        return {**out, "warm_s": round(warm_s, 2), "mixed_buckets": warmed["mixed_buckets"] if warmed else None}

    def transformers(self, weights: ServeWeights, res: dict, prompts: dict[int, list[list[int]]]) -> None:
        """transformers generate at each concurrency (one model load, or build from the config, for all)."""
        a, device = self.args, self.device
        batches = [c for c in a.concurrency if c <= a.hf_max_batch]
        for c in a.concurrency:
            if c > a.hf_max_batch:
                res[f"c{c}"]["transformers"] = {"skipped": f"batch > --hf-max-batch {a.hf_max_batch}"}
        if not batches:
            return
        holder: dict[str, Any] = {}

        def load() -> dict:
            holder["hf"] = weights.transformers_model()
            return {"ok": True, "source": "from_pretrained" if weights.mode == "disk" else "from_config",
                    **transformers_setup(holder["hf"])}

        self.phase(res, "transformers_load", load, min_s=a.reserve_s + 10)
        for c in batches:
            row = res[f"c{c}"]
            if "hf" not in holder:
                row["transformers"] = {"skipped": "the transformers model did not load (transformers_load)"}
                continue
            # each generate stops at its max_time: what is left of the budget, at most --hf-max-s
            cap = max(1.0, min(a.hf_max_s, self.left_s() - a.reserve_s))
            self.phase(row, "transformers", partial(transformers_padded, holder["hf"], prompts[c], c, a.new_tokens,
                                                    device, a.hf_batches, cap), min_s=a.reserve_s + 3)
        holder.clear()
        free_memory(device)

    def offloaded(self, name: str, weights: ServeWeights, res: dict) -> None:
        from moekit.offload import OffloadConfig, load_offloaded

        a, device, cfg, nbytes = self.args, self.device, weights.cfg, weights.nbytes
        experts_bytes = routed_expert_bytes(cfg)
        setup_s = offload_setup_estimate_s(experts_bytes)
        host_free = available_host_bytes()
        why = None
        if self.left_s() < a.reserve_s + max(30.0, setup_s):
            why = f"--time-budget-s {a.time_budget_s:.0f}: {self.left_s():.0f} s left, its setup ~{setup_s:.0f} s"
        elif device.type == "cuda" and host_free is not None and experts_bytes > HOST_SHARE * host_free:
            # on a GPU the store pins every expert in host memory (offload.store.HostStore)
            why = (f"the pinned host store needs {experts_bytes / 1e9:.1f} GB, over {HOST_SHARE:.0%} of the "
                   f"{host_free / 1e9:.1f} GB of host memory available")
        if why:
            res["offload"] = {"skipped": why}
            log(f"offloaded rows skipped: {why}")
            return
        res["offload_setup_estimate_s"] = round(setup_s, 1)
        # tiny shapes are all activations and workspace: the smoke run gives a fixed 32 MB instead
        budget = 32 << 20 if a.small else int(a.offload_fraction * nbytes)
        res["offload_budget_bytes"] = budget
        if device.type == "cuda":  # what earlier phases left allocated counts in the peak below: name it
            res["allocated_before_offload_load_bytes"] = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        model = load_offloaded(weights.moekit_source(), device=device, dtype="bfloat16",
                               offload=OffloadConfig(device_memory=budget, context_tokens=a.max_len + a.new_tokens))
        warm = prompts_for(2, a.min_len, a.max_len, cfg.vocab_size, seed=0)
        serve_closed_loop(Scheduler(model, SchedulerConfig(max_seqs=2, kv_tokens=2 * (a.max_len + a.new_tokens),
                                                            static_decode=True if a.small else None)),
                          warm, 2, 4)
        res["offload_setup_s"] = round(time.perf_counter() - t0, 1)
        for c in a.offload_concurrency:
            # fewer requests than resident: each token waits on PCIe for the missed experts
            prompts = prompts_for(max(2, a.requests_per_slot * c), a.min_len, a.max_len, cfg.vocab_size, seed=c)
            sched = Scheduler(model, SchedulerConfig(max_seqs=c, max_step_tokens=a.offload_step_tokens,
                                                     kv_tokens=c * (a.max_len + a.new_tokens + 16),
                                                     static_decode=True if a.small else None))
            if sched.decode is not None:  # decode steps cut at the expert calls: captured before timing
                sched.decode.warm(c)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            model.expert_runtime.reset_stats()
            row = res[f"offload_c{c}"] = {}
            served = self.phase(row, "moekit_serve", partial(serve_closed_loop, sched, prompts, c, a.new_tokens,
                                                             self.deadline - a.reserve_s))
            served["piecewise_decode"] = sched.decode is not None and sched.decode.piecewise
            if device.type == "cuda":
                served["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
                served["budget_bytes"] = budget
                served["peak_over_budget"] = served["peak_device_bytes"] / budget
            stats = model.expert_runtime.stats
            served["runtime_peak_device_bytes"] = stats.peak_device_bytes
            served["expert_hit_rate"] = stats.hit_rate
            served["pcie_bytes_per_token"] = stats.bytes_moved / max(1, served.get("output_tokens") or 1)
            common.write_json(self.results, a.out, "bench_serve")
            self.rows.append([name, f"offload {a.offload_fraction:.0%}", c, served.get("output_tok_s"),
                              served.get("ttft_p50_s"), served.get("itl_p50_s"), served.get("itl_p99_s"), None, None,
                              None, served.get("steady_tok_s")])
            del sched
        del model
        free_memory(device)

    def table(self) -> str:
        def f(x, scale=1.0, digits=1):
            return "-" if x is None else f"{x * scale:.{digits}f}"

        header = ["shape", "placement", "C", "served tok/s", "steady tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms",
                  "static decode tok/s", "static ITL ms", "transformers tok/s", "served / static", "steady / static",
                  "served / HF"]

        def ratio(x, y, scale, digits, unit):
            return f(x / y if x and y else None, scale, digits) + unit

        body = [[*r[:3], f(r[3]), f(r[10]), f(r[4], 1e3), f(r[5], 1e3, 2), f(r[6], 1e3, 2), f(r[7]), f(r[8], 1e3, 2),
                 f(r[9]), ratio(r[3], r[7], 100, 0, "%"), ratio(r[10], r[7], 100, 0, "%"), ratio(r[3], r[9], 1, 1, "x")]
                for r in self.rows]
        return common.markdown_table(header, body)

    def step_table(self) -> str:
        """Returns a table of each serve row's steps: decode-only (static) wall p50 split into
        host work and device wait, steps launched overlapped, and the steps with prompts."""
        def f(x, digits=2):
            return "-" if x is None else f"{x:.{digits}f}"

        body = []
        for name, res in self.results["shapes"].items():
            for key, row in res.items():
                if not key.startswith(("c", "offload_c")) or not isinstance(row, dict):
                    continue
                for label, out in row.items():
                    if not label.startswith("moekit_serve") or "step_times" not in out:
                        continue
                    t = out["step_times"]
                    static = t.get("static", {})
                    prompt = [t[k] for k in ("static_mixed", "mixed") if k in t]
                    steps = sum(k["steps"] for k in prompt)
                    mean = sum(k["mean_ms"] * k["steps"] for k in prompt) / steps if steps else None
                    body.append([name, label.removeprefix("moekit_serve").lstrip("_") or "default",
                                 key.removeprefix("offload_").removeprefix("c") + (" (offload)" if "offload" in key else ""),
                                 static.get("steps", 0), f(static.get("p50_ms")), f(out.get("static_host_p50_ms")),
                                 f(out.get("static_wait_p50_ms")), out.get("overlapped_steps", 0),
                                 "+".join(k for k in ("static_mixed", "mixed") if k in t) or "-", steps, f(mean, 1),
                                 f(max((k["max_ms"] for k in prompt), default=None), 1)])
        header = ["shape", "policy", "C", "decode steps", "decode p50 ms", "host p50 ms", "wait p50 ms", "overlapped",
                  "prompt step kind", "prompt steps", "prompt mean ms", "prompt max ms"]
        return common.markdown_table(header, body)

    def goals(self) -> list[str]:
        """Returns one line per goal and shape: the measured ratio against its bar, PASS/FAIL (or why unknown)."""
        lines = []
        for r in self.rows:
            if r[1] != "resident":
                continue
            name, c, served, itl, static, static_itl, hf = r[0], r[2], r[3], r[5], r[7], r[8], r[9]

            def verdict(ok: bool | None) -> str:
                return "n/a" if ok is None else "PASS" if ok else "FAIL"

            if c == 32:
                for label, ours in (("served (whole run)", served), ("served (steady state)", r[10])):
                    ratio = ours / static if ours and static else None
                    lines.append(f"{name} C=32 {label} / static decode B=32 >= 70%: "
                                 f"{'-' if ratio is None else f'{ratio:.0%}'} {verdict(None if ratio is None else ratio >= 0.7)}")
                ratio = served / hf if served and hf else None
                lines.append(f"{name} C=32 served / transformers >= 5x: "
                             f"{'-' if ratio is None else f'{ratio:.1f}x'} {verdict(None if ratio is None else ratio >= 5)}")
            if c == 1:
                ratio = itl / static_itl if itl and static_itl else None
                lines.append(f"{name} C=1 ITL p50 / static batch-1 ITL <= 1.10: "
                             f"{'-' if ratio is None else f'{ratio:.2f}'} {verdict(None if ratio is None else ratio <= 1.1)}")
        return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_output_args(p, "bench_serve", device_default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke run on any machine)")
    p.add_argument("--shapes", nargs="+", default=["olmoe-1b-7b"], choices=list(SHAPES))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--offload-concurrency", type=int, nargs="+", default=[1])
    p.add_argument("--requests-per-slot", type=int, default=2, help="requests per concurrency slot (default 2)")
    p.add_argument("--min-requests", type=int, default=4, help="requests at least, at any concurrency (default 4)")
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--static-prompt-len", type=int, default=272, help="prompt of the static-batch baseline (the mean)")
    # an eager step costs about the same from 128 to 1024 tokens on the H200 (its launches, not its
    # math: bench_resident prefill 128 tokens 17.6 ms, 1024 tokens 19.0 ms), so a wave of prompts
    # prefills in fewer, fuller steps
    p.add_argument("--step-tokens", type=int, default=2048, help="the scheduler's tokens per step (resident)")
    p.add_argument("--offload-step-tokens", type=int, default=512,
                   help="the scheduler's tokens per step, offloaded (activations count in its budget)")
    p.add_argument("--prefill-interval", type=int, default=1,
                   help="the scheduler's prefill_interval (1: prefill beside decode every step)")
    p.add_argument("--alt-prefill-interval", type=int, default=0,
                   help="a second serve row at --alt-concurrency with this prefill_interval (0: none; the "
                        "f472762 H200 run measured 8 at C=32: 3,805 tok/s against 3,776)")
    p.add_argument("--alt-concurrency", type=int, nargs="*", default=[32])
    p.add_argument("--alt-no-overlap", type=int, nargs="*", default=[1, 32], metavar="C",
                   help="serve rows with overlapped decode steps off at these concurrencies")
    p.add_argument("--alt-eager-mixed", type=int, nargs="*", default=[32], metavar="C",
                   help="serve rows with eager (not static) mixed steps at these concurrencies")
    p.add_argument("--alt-prefill-cap", type=int, default=512,
                   help="serve rows with max_prefill_tokens at this cap (0: none), at --alt-prefill-cap-at")
    p.add_argument("--alt-prefill-cap-at", type=int, nargs="*", default=[32, 128], metavar="C")
    p.add_argument("--hf-max-batch", type=int, default=128, help="largest batch transformers runs")
    p.add_argument("--hf-batches", type=int, default=1, help="padded batches transformers runs per concurrency")
    p.add_argument("--hf-max-s", type=float, default=20.0,
                   help="transformers generate stops after this many seconds (its max_time; tok/s counts what it made)")
    p.add_argument("--offload-fraction", type=float, default=0.25, help="0 skips the offloaded rows")
    p.add_argument("--time-budget-s", type=float, default=225.0,
                   help="wall seconds from start after which the remaining rows are recorded as skipped")
    p.add_argument("--reserve-s", type=float, default=8.0,
                   help="seconds kept back from the budget for freeing memory, the table and the JSON")
    p.add_argument("--tmpdir", default=None, help="where the random checkpoints go (default: system temp)")
    p.add_argument("--weights", choices=WEIGHT_MODES, default="auto",
                   help="disk: write a random checkpoint, read by moekit and transformers; drawn: nothing written, "
                        "moekit draws its weights on the device (RandomCheckpoint), transformers builds its own "
                        "(from_config); auto (default): drawn for shapes over --disk-max-gb")
    p.add_argument("--disk-max-gb", type=float, default=20.0,
                   help="the largest shape (bf16 GB) --weights auto writes to disk (default 20: OLMoE's 13.8 is "
                        "written, qwen3-30b-a3b's 61 is drawn)")
    args = p.parse_args(argv)
    if args.small:  # keep a CPU smoke run to seconds
        args.concurrency = [c for c in args.concurrency if c <= 8] or [1]
        args.offload_concurrency = [c for c in args.offload_concurrency if c <= 8] or [1]
        args.min_len, args.max_len, args.new_tokens = 4, 24, 8
        args.static_prompt_len = 14
        # an empty list (no such rows) stays empty; one whose concurrencies are all too large gets a small one
        args.alt_concurrency = [c for c in args.alt_concurrency if c <= 8] or [8][:len(args.alt_concurrency)]
        args.alt_no_overlap = [c for c in args.alt_no_overlap if c <= 8] or [1][:len(args.alt_no_overlap)]
        args.alt_eager_mixed = [c for c in args.alt_eager_mixed if c <= 8] or [8][:len(args.alt_eager_mixed)]
        args.alt_prefill_cap_at = [c for c in args.alt_prefill_cap_at if c <= 8] or [8][:len(args.alt_prefill_cap_at)]
        args.alt_prefill_cap = min(args.alt_prefill_cap, 8)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; give --device cpu (with --small for a smoke run)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    with tempfile.TemporaryDirectory(prefix="bench-serve-", dir=args.tmpdir) as root:
        for name in args.shapes:
            if bench.left_s() < args.reserve_s + (1 if args.small else 30):  # a checkpoint, a load and a row
                bench.results["shapes"][name] = {"skipped": f"--time-budget-s {args.time_budget_s:.0f} spent"}
                continue
            try:
                bench.shape(name, Path(root))
            except Exception as e:  # noqa: BLE001 -- the next shape still runs
                bench.results["shapes"].setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"[:2000]
                bench.results["shapes"][name]["traceback"] = traceback.format_exc()[-3000:]
                log(f"{name} FAILED: {e}")
                free_memory(bench.device)
    bench.results["table"] = bench.rows
    bench.results["goals"] = bench.goals()
    bench.results["wall_s"] = round(time.perf_counter() - T_START, 1)
    path = common.write_json(bench.results, args.out, "bench_serve")
    print(bench.table())
    print(bench.step_table())
    for name, res in bench.results["shapes"].items():
        rows = [[name, b, r["splits"], f"{r['one_pass_us']:.1f}", f"{r['split_us']:.1f}", f"{r['floor_us']:.1f}"]
                for b, r in res.get("decode_attention", {}).items() if isinstance(r, dict)]
        if rows:
            print(common.markdown_table(["shape", "batch", "splits", "one pass us", "split us", "HBM floor us"], rows))
    print("\n".join(["goals:", *bench.goals()]))
    log(f"wrote {path} ({bench.results['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
