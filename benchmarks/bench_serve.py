"""Serving benchmark (issue 13): continuous batching over the paged KV cache at concurrency
1/8/32/128 with prompts of mixed lengths, next to transformers' padded static batches and
moekit's own static-batch decode at the same batch, resident and offloaded at 25% of the bytes.

For each shape (random bf16 weights: routing is near-uniform, fine for speed):
  1. write a random checkpoint and load it resident;
  2. per concurrency C: a closed loop of `--requests-per-slot` x C requests through
     moekit.serve.Scheduler (in process, no HTTP), C in flight at once: output tok/s, time to
     first token and inter-token latency p50/p99 (from each request's token times);
  3. baselines at batch C: moekit.generate on an equal-length batch [C, T] (decode tok/s x C: the
     static-batch decode ceiling) and transformers generate on the same prompts left-padded into
     batches of C (output tok/s over the whole call, prefill included, as a server would see it);
  4. offloaded (--offload-fraction of the model's bytes): the scheduler again, with the peak
     device bytes next to the budget.
Goals printed with the table: at C=32 >= 70% of the static decode at B=32 and >= 5x transformers;
at C=1 inter-token latency within 10% of static batch-1 decode.

    PYTHONPATH=src python3 benchmarks/bench_serve.py                       # H200: olmoe + qwen3 shapes
    PYTHONPATH=src python3 benchmarks/bench_serve.py --small --device cpu  # a smoke run anywhere

Shapes: C = concurrency, T = prompt tokens, M = new tokens per request.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import common  # also puts src/ on sys.path when moekit is not importable
import torch
from common import free_memory, log, sync
from random_checkpoint import olmoe_hf_config, write_random_checkpoint

import moekit
from moekit.serve import SamplingParams, Scheduler, SchedulerConfig

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


def percentile(values: list[float], q: float) -> float | None:
    """Returns the q-th percentile (0..100) by nearest rank, None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def prompts_for(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """Returns n random prompts with lengths uniform in [lo, hi] (ids clear of the lowest, special ones)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (t,), generator=g).tolist() for t in lengths]


def serve_closed_loop(model, prompts: list[list[int]], concurrency: int, new_tokens: int,
                      config: SchedulerConfig) -> dict[str, Any]:
    """Returns throughput and latencies of `prompts` through one scheduler, `concurrency` in flight."""
    sched = Scheduler(model, config)
    params = SamplingParams(max_tokens=new_tokens)
    pending, done = list(prompts), []
    sync(model.device)
    t0 = time.perf_counter()
    running = [sched.add(pending.pop(0), params) for _ in range(min(concurrency, len(pending)))]
    while running:
        sched.step()
        for r in [r for r in running if r.finished]:
            running.remove(r)
            done.append(r)
            if pending:
                running.append(sched.add(pending.pop(0), params))
    wall = time.perf_counter() - t0
    ttft = [r.time_to_first_token_s for r in done]
    itl = [gap for r in done for gap in r.inter_token_s]
    out_tokens = sum(len(r.output) for r in done)
    return {"requests": len(done), "output_tokens": out_tokens, "wall_s": round(wall, 3),
            "output_tok_s": out_tokens / wall, "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99), "steps": sched.stats.steps,
            "preemptions": sched.stats.preemptions, "kv_blocks": sched.cache.num_blocks,
            "static_decode": sched.decode is not None, "lost": len(prompts) - len(done)}


def static_decode(model, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict[str, Any]:
    """Returns moekit's decode speed on an equal-length batch [batch, prompt_len] (CUDA graphs)."""
    ids = torch.tensor(prompts_for(batch, prompt_len, prompt_len, vocab, seed=7), device=model.device)
    model.generate(ids[:, :8], max_new_tokens=4, temperature=0, eos_token_ids=())  # capture warm-up
    stats = moekit.GenerationStats()
    model.generate(ids, max_new_tokens=new_tokens, temperature=0, eos_token_ids=(), stats=stats)
    return {"batch": batch, "decode_tok_s_per_seq": stats.decode_tok_s, "decode_tok_s": stats.decode_tok_s * batch,
            "itl_s": 1 / stats.decode_tok_s if stats.decode_tok_s else None, "cuda_graph": stats.cuda_graph}


def transformers_padded(folder: Path, prompts: list[list[int]], batch: int, new_tokens: int, device,
                        max_batches: int) -> dict[str, Any]:
    """Returns transformers' output tok/s on prompts left-padded into static batches of `batch`."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                        eos_token_id=None, pad_token_id=0)
    tokens, wall = 0, 0.0
    for b in range(0, min(len(prompts), batch * max_batches), batch):
        group = prompts[b:b + batch]
        width = max(len(p) for p in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, generation_config=gen)
        sync(device)
        wall += time.perf_counter() - t0
        tokens += (out.shape[1] - width) * len(group)
    del hf
    free_memory(device)
    return {"batch": batch, "output_tokens": tokens, "wall_s": round(wall, 3), "output_tok_s": tokens / wall}


class Bench:
    """Runs the phases of one shape under try/except and keeps every result."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, torch.device(args.device)
        self.results: dict[str, Any] = {"meta": common.run_meta(args, self.device), "shapes": {}}
        self.rows: list[list[Any]] = []

    def phase(self, store: dict, name: str, fn: Callable[[], dict]) -> dict:
        log(f"{name} ...")
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 -- one failure must not lose the other figures
            out = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
            log(f"{name} FAILED: {out['error'][:300]}")
        store[name] = out
        common.write_json(self.results, self.args.out, "bench_serve")
        return out

    def shape(self, name: str, root: Path) -> None:
        a, device = self.args, self.device
        hf = SHAPES[name](a.small)
        res = self.results["shapes"][name] = {}
        folder, cfg, nbytes = write_random_checkpoint(root / name, hf, device)
        res["checkpoint_bytes"] = nbytes
        model = moekit.load_model(folder, device=device, dtype="bfloat16")
        config = SchedulerConfig(max_seqs=max(a.concurrency), max_step_tokens=a.step_tokens,
                                 prefill_interval=a.prefill_interval)
        warm = prompts_for(2, a.min_len, a.max_len, cfg.vocab_size, seed=0)
        serve_closed_loop(model, warm, 2, 4, config)  # first calls: allocator, kernels, graph captures
        for c in a.concurrency:
            prompts = prompts_for(a.requests_per_slot * c, a.min_len, a.max_len, cfg.vocab_size, seed=c)
            row = res[f"c{c}"] = {}
            served = self.phase(row, "moekit_serve", partial(serve_closed_loop, model, prompts, c, a.new_tokens, config))
            static = self.phase(row, "moekit_static", partial(static_decode, model, c, a.static_prompt_len, a.new_tokens,
                                                              cfg.vocab_size))
            theirs = self.phase(row, "transformers", partial(transformers_padded, folder, prompts, c, a.new_tokens,
                                                             device, a.hf_batches)) \
                if c <= a.hf_max_batch else {"skipped": f"batch > --hf-max-batch {a.hf_max_batch}"}
            self.rows.append([name, "resident", c, served.get("output_tok_s"), served.get("ttft_p50_s"),
                              served.get("itl_p50_s"), served.get("itl_p99_s"), static.get("decode_tok_s"),
                              static.get("itl_s"), theirs.get("output_tok_s")])
        del model
        free_memory(device)
        if a.offload_fraction > 0:
            self.offloaded(name, folder, cfg, nbytes, res)

    def offloaded(self, name: str, folder: Path, cfg, nbytes: int, res: dict) -> None:
        from moekit.offload import OffloadConfig, load_offloaded

        a, device = self.args, self.device
        # tiny shapes are all activations and workspace: the smoke run gives a fixed 32 MB instead
        budget = 32 << 20 if a.small else int(a.offload_fraction * nbytes)
        res["offload_budget_bytes"] = budget
        model = load_offloaded(folder, device=device, dtype="bfloat16",
                               offload=OffloadConfig(device_memory=budget, context_tokens=a.max_len + a.new_tokens))
        warm = prompts_for(2, a.min_len, a.max_len, cfg.vocab_size, seed=0)
        serve_closed_loop(model, warm, 2, 4, SchedulerConfig(max_seqs=2, kv_tokens=2 * (a.max_len + a.new_tokens)))
        for c in a.offload_concurrency:
            prompts = prompts_for(a.requests_per_slot * c, a.min_len, a.max_len, cfg.vocab_size, seed=c)
            config = SchedulerConfig(max_seqs=c, max_step_tokens=a.step_tokens, kv_tokens=c * (a.max_len + a.new_tokens))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row = res[f"offload_c{c}"] = {}
            served = self.phase(row, "moekit_serve", partial(serve_closed_loop, model, prompts, c, a.new_tokens, config))
            if device.type == "cuda":
                served["peak_device_bytes"] = torch.cuda.max_memory_allocated(device)
                served["budget_bytes"] = budget
            served["expert_hit_rate"] = model.expert_runtime.stats.hit_rate
            self.rows.append([name, f"offload {a.offload_fraction:.0%}", c, served.get("output_tok_s"),
                              served.get("ttft_p50_s"), served.get("itl_p50_s"), served.get("itl_p99_s"), None, None,
                              None])
        del model
        free_memory(device)

    def table(self) -> str:
        def f(x, scale=1.0, digits=1):
            return "-" if x is None else f"{x * scale:.{digits}f}"

        header = ["shape", "placement", "C", "served tok/s", "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms",
                  "static decode tok/s", "static ITL ms", "transformers tok/s", "served / static", "served / HF"]
        body = [[*r[:3], f(r[3]), f(r[4], 1e3), f(r[5], 1e3, 2), f(r[6], 1e3, 2), f(r[7]), f(r[8], 1e3, 2), f(r[9]),
                 f(r[3] / r[7] if r[3] and r[7] else None, 100, 0) + "%", f(r[3] / r[9] if r[3] and r[9] else None, 1, 1) + "x"]
                for r in self.rows]
        return common.markdown_table(header, body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke run on any machine)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--offload-concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-slot", type=int, default=2, help="requests per concurrency slot (default 2)")
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--static-prompt-len", type=int, default=272, help="prompt of the static-batch baseline (the mean)")
    p.add_argument("--step-tokens", type=int, default=512, help="the scheduler's tokens per step")
    p.add_argument("--prefill-interval", type=int, default=1,
                   help="the scheduler's prefill_interval (1: prefill beside decode every step)")
    p.add_argument("--hf-max-batch", type=int, default=128, help="largest batch transformers runs")
    p.add_argument("--hf-batches", type=int, default=1, help="padded batches transformers runs per concurrency")
    p.add_argument("--offload-fraction", type=float, default=0.25, help="0 skips the offloaded rows")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tmpdir", default=None, help="where the random checkpoints go (default: system temp)")
    args = p.parse_args(argv)
    if args.small:  # keep a CPU smoke run to seconds
        args.concurrency = [c for c in args.concurrency if c <= 8] or [1]
        args.offload_concurrency = [c for c in args.offload_concurrency if c <= 8] or [1]
        args.min_len, args.max_len, args.new_tokens = 4, 24, 8
        args.static_prompt_len = 14
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    with tempfile.TemporaryDirectory(prefix="bench-serve-", dir=args.tmpdir) as root:
        for name in args.shapes:
            try:
                bench.shape(name, Path(root))
            except Exception as e:  # noqa: BLE001 -- the next shape still runs
                bench.results["shapes"].setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"[:2000]
                log(f"{name} FAILED: {e}")
    bench.results["table"] = bench.rows
    path = common.write_json(bench.results, args.out, "bench_serve")
    print(bench.table())
    print("goals: C=32 served >= 70% of static decode at B=32 and >= 5x transformers; C=1 ITL within 10% of static")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
