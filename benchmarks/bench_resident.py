#!/usr/bin/env python3
"""Resident engine benchmark: moekit with every weight on the GPU vs Hugging Face transformers,
on the olmoe-1b-7b shape in bf16 with random weights, next to the HBM and compute ceilings.

Run on the GPU machine from the repository root (moekit need not be installed):

    MOEKIT_GIT_COMMIT=<commit> PYTHONPATH=src python3 benchmarks/bench_resident.py --out $OUT

(the commit comes from MOEKIT_GIT_COMMIT, else `git rev-parse HEAD`, else 'unknown'). It takes
about 2.5 minutes on the H200, most of it in transformers' eager decode runs.

Smoke test on a CPU machine (tiny shape, CUDA-only parts skipped):

    PYTHONPATH=src python3 benchmarks/bench_resident.py --device cpu --small --out /tmp/bench

What it does, in order (each phase in its own try/except; the JSON is rewritten after each):
  1. HBM device-to-device copy bandwidth (4 GiB, read + write counted).
  2. Build an OlmoeForCausalLM on the device (random normal init, std 0.02), save_pretrained it
     to a temporary directory, load the same weights with moekit.load_model.
  3. Correctness: logits of moekit vs transformers on one random prompt, top-1 agreement,
     greedy tokens of moekit (graphs and eager) vs transformers.
  4. moekit: prefill tok/s (forward only), decode tok/s at batch 1 with and without CUDA graphs.
  5. transformers: the same, with its default cache and with cache_implementation="static"
     (compile off); decode at the larger batches; then moekit at the larger batches (graphs,
     after the baselines so that a failed capture cannot cost them); last, transformers' static
     cache with torch.compile, as generate does by default on CUDA, under the time budget.
  6. A short markdown table (engine, metric, measured, ceiling, % of ceiling), last.

Ceilings: decode is HBM-bound: bytes of weights read per step / 4.2e12 B/s, where a step at batch
B reads attention, norms, router and lm_head once and E*(1-(1-A/E)^B) distinct experts per layer
(uniform routing, which random weights give). Prefill: the roofline max(compute, HBM), compute =
FLOPs / 790e12 FLOP/s.

Shape legend: L = layers, D = hidden, I = expert ffn, E = experts, A = experts per token,
H = query heads, Hkv = key/value heads, Dh = head dim, V = vocab, B = batch, T = tokens.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import common  # also puts src/ on sys.path when moekit is not importable
import torch
from common import BF16_FLOP_PER_S, HBM_BYTES_PER_S, free_memory, log, sync

import moekit
from moekit.experts import resident as moekit_resident

T0 = common.T_START


# ---- shapes and ceilings ----------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    name: str
    layers: int  # L
    hidden: int  # D
    expert_ffn: int  # I
    experts: int  # E
    top_k: int  # A
    heads: int  # H
    kv_heads: int  # Hkv
    head_dim: int  # Dh
    vocab: int  # V


OLMOE_1B_7B = Shape("olmoe-1b-7b", 16, 2048, 1024, 64, 8, 16, 16, 128, 50304)
SMALL = Shape("small", 2, 256, 128, 8, 2, 4, 4, 64, 1024)
BYTES_PER_PARAM = 2  # bf16


def layer_dense_params(s: Shape) -> int:
    """Returns the params of one layer read once per step whatever the routing: qkv, o, norms, router."""
    qkv = s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim
    o = s.heads * s.head_dim * s.hidden
    norms = 2 * s.hidden + s.heads * s.head_dim + s.kv_heads * s.head_dim  # input/post + q/k (full)
    router = s.experts * s.hidden
    return qkv + o + norms + router


def expert_params(s: Shape) -> int:
    return 3 * s.hidden * s.expert_ffn  # gate, up, down


def distinct_experts(s: Shape, routed_tokens: int) -> float:
    """Returns the expected distinct experts per layer touched by `routed_tokens` tokens (uniform routing)."""
    return s.experts * (1.0 - (1.0 - s.top_k / s.experts) ** routed_tokens)


def decode_step_bytes(s: Shape, batch: int) -> float:
    """Returns the weight bytes one decode step at `batch` reads from HBM."""
    per_layer = layer_dense_params(s) + distinct_experts(s, batch) * expert_params(s)
    head = s.vocab * s.hidden + s.hidden  # lm_head + final norm
    embed_rows = batch * s.hidden
    return (s.layers * per_layer + head + embed_rows) * BYTES_PER_PARAM


def kv_bytes(s: Shape, batch: int, positions: float) -> float:
    """Returns the KV-cache bytes one decode step reads at `positions` cached positions."""
    return 2 * s.layers * batch * s.kv_heads * s.head_dim * positions * BYTES_PER_PARAM


def total_params(s: Shape) -> int:
    return s.layers * (layer_dense_params(s) + s.experts * expert_params(s)) + 2 * s.vocab * s.hidden + s.hidden


def active_params_per_token(s: Shape) -> int:
    """Returns the params each token multiplies with in the layers (lm_head excluded)."""
    return s.layers * (layer_dense_params(s) + s.top_k * expert_params(s))


def decode_ceiling(s: Shape, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    step = decode_step_bytes(s, batch)
    kv = kv_bytes(s, batch, prompt_len + new_tokens / 2)  # mean context over the decode
    return {
        "weight_bytes_per_step": step,
        "distinct_experts_per_layer": distinct_experts(s, batch),
        "hbm_bound_tok_s": batch * HBM_BYTES_PER_S / step,
        "kv_bytes_per_step_mean": kv,
        "hbm_bound_with_kv_tok_s": batch * HBM_BYTES_PER_S / (step + kv),
    }


def prefill_ceiling(s: Shape, tokens: int) -> dict[str, float]:
    # logits of the last position only (what generation needs): lm_head counts once
    linear_flops = 2 * active_params_per_token(s) * tokens + 2 * s.vocab * s.hidden
    attn_flops = s.layers * 2 * s.heads * s.head_dim * tokens * tokens  # causal QK^T + PV
    compute_s = (linear_flops + attn_flops) / BF16_FLOP_PER_S
    weight_bytes = (s.layers * (layer_dense_params(s) + distinct_experts(s, tokens) * expert_params(s))
                    + s.vocab * s.hidden) * BYTES_PER_PARAM
    hbm_s = weight_bytes / HBM_BYTES_PER_S
    return {
        "flops": linear_flops + attn_flops, "attention_flops": attn_flops,
        "compute_bound_tok_s": tokens / compute_s,
        "weight_bytes": weight_bytes, "hbm_bound_tok_s": tokens / hbm_s,
        "roofline_tok_s": tokens / max(compute_s, hbm_s),
    }


# ---- timing and memory ------------------------------------------------------------------

def time_runs(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Returns the seconds of `reps` calls of fn after `warmup` calls (CUDA events on GPUs)."""
    return common.times_s(fn, device, reps=reps, warmup=warmup)


def module_bytes(module: torch.nn.Module) -> int:
    """Returns the bytes of a module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class Deadline(Exception):
    pass


@contextmanager
def deadline(seconds: float):
    """Raises Deadline in the body after `seconds` (SIGALRM; main thread only)."""
    def on_alarm(signum, frame):
        raise Deadline(f"stopped after {seconds:.0f} s (time budget)")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---- the run ----------------------------------------------------------------------------

class Bench:
    """Holds the models, runs phases under try/except, keeps the results and the table rows."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.shape = SMALL if args.small else OLMOE_1B_7B
        self.dtype = torch.bfloat16
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.hf = None
        self.mk = None
        self.ckpt_dir: Path | None = None
        self.rows: list[dict[str, Any]] = []
        self.peak: dict[str, int] = {}
        self.results: dict[str, Any] = {"meta": self._meta(), "shape": asdict(self.shape),
                                        "constants": {"hbm_bytes_per_s": HBM_BYTES_PER_S,
                                                      "bf16_flop_per_s": BF16_FLOP_PER_S},
                                        "phases": {}, "table": self.rows}

    # -- bookkeeping
    def _meta(self) -> dict[str, Any]:
        import transformers
        a = self.args
        info = common.device_info(self.device)
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["PYTHONPATH=" + os.environ.get("PYTHONPATH", ""), "python3"] + sys.argv),
            "args": vars(a), "git_commit": common.git_commit(), "git_dirty": common.git_dirty(),
            **common.versions(), "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
            "device": str(self.device), "device_name": info["name"], "device_info": info,
        }
        if self.cuda:
            meta.update(device_memory_bytes=info["memory_bytes"], device_sm_count=info["sm_count"])
        return meta

    def save(self) -> None:
        common.write_json(self.results, self.out, "bench_resident")

    def elapsed(self) -> float:
        return time.perf_counter() - T0

    def row(self, engine: str, metric: str, measured: float | None, ceiling: float | None,
            unit: str, note: str = "") -> None:
        pct = 100.0 * measured / ceiling if measured and ceiling else None
        self.rows.append({"engine": engine, "metric": metric, "measured": measured, "ceiling": ceiling,
                          "unit": unit, "pct_of_ceiling": pct, "note": note})

    def phase(self, name: str, fn: Callable[[], dict[str, Any]], *, needs_cuda: bool = False,
              engine: str | None = None) -> dict[str, Any]:
        """Runs fn, records its dict (or its error) under results['phases'][name], saves the JSON."""
        if needs_cuda and not self.cuda:
            out: dict[str, Any] = {"skipped": "needs CUDA"}
        elif self.elapsed() > self.args.time_budget_s:
            out = {"skipped": f"over the time budget ({self.args.time_budget_s:.0f} s)"}
        else:
            log(f"{name} ...")
            t = time.perf_counter()
            own = self._engine_bytes(engine)
            other = self._start_peak(own) if engine else 0
            try:
                out = fn() or {}
            except BaseException as e:  # noqa: BLE001 -- one failure must not lose the others
                if isinstance(e, KeyboardInterrupt):
                    raise
                out = {"error": f"{type(e).__name__}: {e}"[:2000],
                       "traceback": traceback.format_exc()[-3000:]}
                log(f"{name} FAILED: {out['error'][:300]}")
            if engine and self.cuda:
                peak = torch.cuda.max_memory_allocated(self.device) - other
                out["peak_gpu_bytes"] = peak  # this engine's weights + its transient use
                self.peak[engine] = max(self.peak.get(engine, 0), peak)
            out["phase_s"] = round(time.perf_counter() - t, 3)
            free_memory(self.device)
            log(f"{name} done in {out['phase_s']:.1f} s")
        if "skipped" in out:
            log(f"{name} skipped: {out['skipped']}")
        self.results["phases"][name] = out
        self.save()
        return out

    def _engine_bytes(self, engine: str | None) -> int:
        model = {"moekit": self.mk, "transformers": self.hf}.get(engine or "")
        return module_bytes(model) if model is not None else 0

    def _start_peak(self, own_bytes: int) -> int:
        """Resets the peak counter; returns the bytes held by everything but the engine's weights."""
        if not self.cuda:
            return 0
        sync(self.device)
        free_memory(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device) - own_bytes

    def prompt(self, batch: int, length: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        # skip the lowest ids (pad) so that no prompt token is special
        return torch.randint(2, self.shape.vocab - 1, (batch, length), generator=g).to(self.device)

    # -- phases -----------------------------------------------------------------------
    def hbm_copy(self) -> dict[str, Any]:
        nbytes = 4 << 30
        src = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        times = time_runs(lambda: dst.copy_(src), self.device, warmup=2, reps=10)
        med = statistics.median(times)
        bw = 2 * nbytes / med
        del src, dst
        self.row("device", "HBM d2d copy (read+write)", bw / 1e12, HBM_BYTES_PER_S / 1e12, "TB/s",
                 "ceiling = BENCH.md figure")
        return {"bytes": nbytes, "times_s": times, "bytes_per_s": bw, "reference_bytes_per_s": HBM_BYTES_PER_S}

    def hf_config(self):
        from transformers import OlmoeConfig
        s = self.shape
        eos = 50279 if s.vocab > 50279 else s.vocab - 1  # OLMoE's own eos, when it fits
        return OlmoeConfig(
            vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.expert_ffn,
            num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
            num_experts=s.experts, num_experts_per_tok=s.top_k, max_position_embeddings=4096,
            initializer_range=0.02, norm_topk_prob=False, clip_qkv=None, tie_word_embeddings=False,
            pad_token_id=1, eos_token_id=eos, bos_token_id=None)

    def build_transformers(self) -> dict[str, Any]:
        from transformers import OlmoeForCausalLM
        torch.manual_seed(0)
        cfg = self.hf_config()
        t = time.perf_counter()
        with torch.device(self.device):
            model = OlmoeForCausalLM._from_config(cfg, dtype=self.dtype)
        model.eval()
        sync(self.device)
        build_s = time.perf_counter() - t
        self.hf = model
        gate_up = model.model.layers[0].mlp.experts.gate_up_proj
        n_params = sum(p.numel() for p in model.parameters())
        out = {"build_s": build_s, "params": n_params, "params_expected": total_params(self.shape),
               "weight_bytes": module_bytes(model), "experts_implementation": model.config._experts_implementation,
               "attn_implementation": model.config._attn_implementation,
               "expert_weight_std": float(gate_up.detach().float().std()), "dtype": str(gate_up.dtype)}
        log(f"  transformers model: {n_params / 1e9:.3f} B params, {out['weight_bytes'] / 2**30:.2f} GiB, "
            f"built in {build_s:.1f} s, experts={out['experts_implementation']} attn={out['attn_implementation']}")
        return out

    def save_checkpoint(self) -> dict[str, Any]:
        need = module_bytes(self.hf) * 1.1 + (1 << 30)
        candidates = [self.args.tmpdir] if self.args.tmpdir else [tempfile.gettempdir(), "/dev/shm", str(self.out)]
        free = {}
        root = None
        for c in candidates:
            try:
                free[c] = shutil.disk_usage(c).free
            except OSError:
                continue
            if free[c] >= need:
                root = c
                break
        if root is None:
            raise RuntimeError(f"no directory with {need / 2**30:.1f} GiB free among {free}; pass --tmpdir")
        self.ckpt_dir = Path(tempfile.mkdtemp(prefix="bench-resident-", dir=root))
        t = time.perf_counter()
        self.hf.save_pretrained(self.ckpt_dir, max_shard_size=self.args.max_shard_size)
        save_s = time.perf_counter() - t
        files = sorted(p.name for p in self.ckpt_dir.iterdir())
        size = sum(p.stat().st_size for p in self.ckpt_dir.iterdir())
        log(f"  saved {size / 2**30:.2f} GiB to {self.ckpt_dir} in {save_s:.1f} s ({size / save_s / 1e9:.2f} GB/s)")
        return {"dir": str(self.ckpt_dir), "save_s": save_s, "bytes": size, "files": files,
                "free_bytes_before": free}

    def load_moekit(self) -> dict[str, Any]:
        t = time.perf_counter()
        self.mk = moekit.load_model(self.ckpt_dir, device=self.device, dtype=self.dtype)
        sync(self.device)
        load_s = time.perf_counter() - t
        nbytes = module_bytes(self.mk)
        log(f"  moekit loaded {nbytes / 2**30:.2f} GiB in {load_s:.1f} s ({nbytes / load_s / 1e9:.2f} GB/s)")
        if not self.args.keep_checkpoint:  # the weights are on the device now; free the disk
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        return {"load_s": load_s, "weight_bytes": nbytes, "bytes_per_s": nbytes / load_s,
                "config": {k: str(v) for k, v in asdict(self.mk.config).items()},
                "expert_path": moekit_expert_path()}

    @torch.inference_mode()
    def correctness(self) -> dict[str, Any]:
        a = self.args
        ids = self.prompt(1, a.check_prompt_len, seed=1)
        mk_logits = self.mk(ids).float()  # [1, T, V]
        hf_logits = self.hf(input_ids=ids, use_cache=False).logits.float()
        diff = mk_logits - hf_logits
        rel = float(diff.norm() / hf_logits.norm())
        top1 = float((mk_logits.argmax(-1) == hf_logits.argmax(-1)).float().mean())
        # how close the top two are: agreement can only be asked for where the margin is wide
        top2 = hf_logits.topk(2, dim=-1).values
        margin = (top2[..., 0] - top2[..., 1]).flatten()
        out = {"prompt_len": a.check_prompt_len, "rel_err": rel, "max_abs_err": float(diff.abs().max()),
               "logits_norm_hf": float(hf_logits.norm()), "finite": bool(torch.isfinite(mk_logits).all()),
               "top1_agreement": top1, "hf_top1_margin_median": float(margin.median()),
               "max_abs_err_per_position_median": float(diff.abs().amax(-1).median())}
        n = a.check_new_tokens
        hf_tokens = self.hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=n, min_new_tokens=n,
                                     pad_token_id=self.hf.config.pad_token_id)[0, ids.shape[1]:]
        runs = {"hf": hf_tokens.tolist()}
        runs["moekit_eager"] = moekit.generate(self.mk, ids, max_new_tokens=n, temperature=0.0,
                                               stop_at_eos=False, cuda_graph=False)[0].tolist()
        if self.cuda:
            try:
                runs["moekit_graph"] = moekit.generate(self.mk, ids, max_new_tokens=n, temperature=0.0,
                                                       stop_at_eos=False, cuda_graph=True)[0].tolist()
            except Exception as e:  # noqa: BLE001
                out["moekit_graph_error"] = f"{type(e).__name__}: {e}"[:1000]
        out["greedy_tokens"] = runs
        for name, toks in runs.items():
            if name == "hf":
                continue
            same = [x == y for x, y in zip(toks, runs["hf"])]
            out[f"{name}_vs_hf_first_mismatch"] = same.index(False) if False in same else None
            out[f"{name}_vs_hf_agree_first8"] = sum(same[:8])
        if "moekit_graph" in runs:
            same = [x == y for x, y in zip(runs["moekit_graph"], runs["moekit_eager"])]
            out["moekit_graph_vs_eager_first_mismatch"] = same.index(False) if False in same else None
        log(f"  rel err {rel:.2e}, top-1 agreement {top1:.3f}, greedy first mismatch vs hf: "
            f"eager {out.get('moekit_eager_vs_hf_first_mismatch')}, graph {out.get('moekit_graph_vs_hf_first_mismatch')}")
        self.row("moekit vs hf", "logits rel err (bf16)", rel, None, "", "expect ~1e-2")
        self.row("moekit vs hf", f"top-1 agreement ({a.check_prompt_len} positions)", top1, 1.0, "")
        return out

    @torch.inference_mode()
    def prefill(self, engine: str, tokens: int, label: str | None = None) -> dict[str, Any]:
        ids = self.prompt(1, tokens, seed=2)
        if engine == "moekit":
            fn = lambda: self.mk(ids, last_only=True)  # noqa: E731
        else:
            fn = lambda: self.hf(input_ids=ids, use_cache=False, logits_to_keep=1)  # noqa: E731
        times = time_runs(fn, self.device, warmup=self.args.warmup, reps=self.args.reps)
        med = statistics.median(times)
        ceil = prefill_ceiling(self.shape, tokens)
        tok_s = tokens / med
        self.row(label or engine, f"prefill T={tokens} B=1", tok_s, ceil["roofline_tok_s"], "tok/s",
                 "roofline max(compute, HBM)")
        log(f"  {label or engine} prefill {tokens}: {tok_s:,.0f} tok/s ({med * 1e3:.2f} ms)")
        return {"tokens": tokens, "times_s": times, "median_s": med, "tok_s": tok_s, "ceiling": ceil,
                "timed": "forward only, no KV cache, logits of the last position"}

    @torch.inference_mode()
    def moekit_decode(self, batch: int, cuda_graph: bool, compile: bool = False) -> dict[str, Any]:
        a, s = self.args, self.shape
        out: dict[str, Any] = {"batch": batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                               "cuda_graph_asked": cuda_graph, "compile_asked": compile}
        ids = self.prompt(batch, a.prompt_len, seed=3)

        def gen(n: int, graph: bool, stats: moekit.GenerationStats | None = None) -> torch.Tensor:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                toks = moekit.generate(self.mk, ids, max_new_tokens=n, temperature=0.0, stop_at_eos=False,
                                       cuda_graph=graph, compile=compile and graph, stats=stats)
            for w in caught:  # e.g. moekit's "CUDA graph capture failed, decoding eagerly"
                out.setdefault("warnings", []).append(str(w.message)[:500])
            return toks

        try:
            gen(min(8, a.new_tokens), cuda_graph)  # warm-up: allocator, kernels, a graph capture
        except Exception as e:  # noqa: BLE001 -- a failed capture: measure eager, keep the error
            if not cuda_graph:
                raise
            out["cuda_graph_error"] = f"{type(e).__name__}: {e}"[:1500]
            log(f"  graph decode failed at B={batch}, measuring eager: {out['cuda_graph_error'][:200]}")
            sync(self.device)
            cuda_graph = False
            gen(min(8, a.new_tokens), cuda_graph)
        runs = []
        for _ in range(a.reps_decode):
            stats = moekit.GenerationStats()
            sync(self.device)
            t = time.perf_counter()
            toks = gen(a.new_tokens, cuda_graph, stats)
            sync(self.device)
            runs.append({"wall_s": time.perf_counter() - t, "prefill_s": stats.prefill_s,
                         "decode_s": stats.decode_s, "new_tokens": stats.new_tokens,
                         "cuda_graph_used": stats.cuda_graph,
                         "graph_capture_s": stats.extra.get("graph_capture_s"),
                         "compiled": bool(stats.extra.get("compiled"))})
        assert toks.shape == (batch, a.new_tokens), toks.shape
        decode_s = statistics.median(r["decode_s"] for r in runs)
        steps = runs[0]["new_tokens"] - 1
        tok_s = batch * steps / decode_s
        ceil = decode_ceiling(s, batch, a.prompt_len, a.new_tokens)
        used = all(r["cuda_graph_used"] for r in runs)
        label = "graphs" if used else "eager"
        if used and all(r["compiled"] for r in runs):
            label = "compiled+graphs"
        note = "HBM bound on weights; all sequences counted"
        if cuda_graph and not used:
            note += "; graphs asked for, moekit fell back to eager"
        self.row("moekit " + label, f"decode B={batch}", tok_s, ceil["hbm_bound_tok_s"], "tok/s", note)
        log(f"  moekit {label} decode B={batch}: {tok_s:,.1f} tok/s ({decode_s / steps * 1e3:.2f} ms/step, "
            f"{ceil['weight_bytes_per_step'] / (decode_s / steps) / 1e9:,.1f} GB/s of weights)")
        out.update(runs=runs, cuda_graph_used=used, decode_s_median=decode_s, ms_per_step=decode_s / steps * 1e3,
                   tok_s=tok_s, weight_bytes_per_s=ceil["weight_bytes_per_step"] / (decode_s / steps),
                   timed="GenerationStats.decode_s: tokens after the first, graph capture excluded",
                   ceiling=ceil)
        return out

    @torch.inference_mode()
    def hf_decode(self, batch: int, label: str, warmup_full: int = 0, **gen_kwargs) -> dict[str, Any]:
        a, s = self.args, self.shape
        ids = self.prompt(batch, a.prompt_len, seed=3)
        mask = torch.ones_like(ids)

        def gen(n: int) -> torch.Tensor:
            return self.hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                    min_new_tokens=n, pad_token_id=self.hf.config.pad_token_id, **gen_kwargs)

        gen(min(8, a.new_tokens))
        for _ in range(warmup_full):  # compiled runs: compile and record graphs before timing
            gen(a.new_tokens)
        full = time_runs(lambda: gen(a.new_tokens), self.device, warmup=0, reps=a.reps_decode)
        one = time_runs(lambda: gen(1), self.device, warmup=0, reps=a.reps_decode)
        toks = gen(a.new_tokens)
        assert toks.shape[1] - ids.shape[1] == a.new_tokens, toks.shape
        steps = a.new_tokens - 1
        decode_s = statistics.median(full) - statistics.median(one)
        if decode_s <= 0:
            raise RuntimeError(f"generate({a.new_tokens}) took no longer than generate(1): timing noise "
                               f"(medians {statistics.median(full):.4f} s, {statistics.median(one):.4f} s)")
        tok_s = batch * steps / decode_s
        ceil = decode_ceiling(s, batch, a.prompt_len, a.new_tokens)
        self.row("hf " + label, f"decode B={batch}", tok_s, ceil["hbm_bound_tok_s"], "tok/s",
                 "HBM bound on weights; all sequences counted")
        log(f"  hf {label} decode B={batch}: {tok_s:,.1f} tok/s ({decode_s / steps * 1e3:.2f} ms/step, "
            f"{ceil['weight_bytes_per_step'] / (decode_s / steps) / 1e9:,.1f} GB/s of weights)")
        return {"batch": batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                "generate_kwargs": {k: str(v) for k, v in gen_kwargs.items()},
                "full_times_s": full, "one_token_times_s": one, "decode_s": decode_s,
                "ms_per_step": decode_s / steps * 1e3, "tok_s": tok_s,
                "timed": f"(generate {a.new_tokens} - generate 1) / {steps}", "ceiling": ceil}

    def hf_static_compiled(self) -> dict[str, Any]:
        remaining = self.args.time_budget_s - self.elapsed()
        if remaining < self.args.compile_min_s:
            return {"skipped": f"{remaining:.0f} s left, need {self.args.compile_min_s:.0f} s to compile"}
        with deadline(remaining):
            return self.hf_decode(1, "static+compile", warmup_full=2, cache_implementation="static")

    # -- summary
    def table(self) -> str:
        lines = ["| engine | metric | measured | ceiling | % of ceiling |", "|---|---|---|---|---|"]
        first_seen: dict[str, int] = {}
        for i, r in enumerate(self.rows):
            first_seen.setdefault(r["metric"], i)
        # rows of one metric together (moekit next to its baseline), in the order measured
        for r in sorted(self.rows, key=lambda r: first_seen[r["metric"]]):
            def fmt(v):
                if v is None:
                    return "-"
                return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
            unit = f" {r['unit']}" if r["unit"] else ""
            pct = f"{r['pct_of_ceiling']:.1f}%" if r["pct_of_ceiling"] is not None else "-"
            lines.append(f"| {r['engine']} | {r['metric']} | {fmt(r['measured'])}{unit} | "
                         f"{fmt(r['ceiling'])}{unit if r['ceiling'] is not None else ''} | {pct} |")
        return "\n".join(lines)


def moekit_expert_path() -> dict[str, Any]:
    """Returns what moekit's resident experts will run on (read defensively: the module evolves)."""
    info: dict[str, Any] = {}
    for name in ("GATHER_MAX_SLOTS", "TRITON_MAX_SLOTS"):
        if hasattr(moekit_resident, name):
            info[name] = getattr(moekit_resident, name)
    ops = getattr(moekit_resident, "triton_ops", None)
    if ops is not None:
        info["have_triton"] = bool(getattr(ops, "HAVE_TRITON", False))
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="directory for bench_resident.json")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--small", action="store_true",
                   help="tiny shape (2 layers, hidden 256, vocab 1024, 8 experts) for smoke tests")
    p.add_argument("--prefill-lens", type=int, nargs="+", help="prompt lengths for prefill (default 128 1024)")
    p.add_argument("--prompt-len", type=int, help="prompt length before decode (default 128)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per decode run (default 128)")
    p.add_argument("--batches", type=int, nargs="+", help="decode batches beyond 1 (default 8 32)")
    p.add_argument("--reps", type=int, default=5, help="timed prefill runs (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed prefill runs first")
    p.add_argument("--reps-decode", type=int, default=3, help="timed runs of each generate")
    p.add_argument("--check-prompt-len", type=int, default=64)
    p.add_argument("--check-new-tokens", type=int, default=16)
    p.add_argument("--time-budget-s", type=float, default=330.0,
                   help="phases starting after this many seconds are skipped (compile stops at it)")
    p.add_argument("--compile-min-s", type=float, default=60.0,
                   help="skip transformers' static+compile run when fewer seconds are left")
    p.add_argument("--no-compile", action="store_true", help="skip transformers' static+compile run")
    p.add_argument("--tmpdir", help="where to write the checkpoint (default: system temp, then /dev/shm)")
    p.add_argument("--max-shard-size", default="5GB", help="save_pretrained shard size")
    p.add_argument("--keep-checkpoint", action="store_true", help="do not delete the saved checkpoint")
    args = p.parse_args(argv)
    small = args.small
    args.prefill_lens = args.prefill_lens or ([32, 128] if small else [128, 1024])
    args.prompt_len = args.prompt_len or (32 if small else 128)
    args.new_tokens = args.new_tokens or (16 if small else 128)
    args.batches = args.batches or [8, 32]
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode time is measured after the first token)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; run with --device cpu (and --small) for a smoke test", file=sys.stderr)
        return 2
    import transformers
    transformers.logging.set_verbosity_error()
    b = Bench(args)
    log(f"bench_resident: shape {b.shape.name} on {b.results['meta']['device_name']}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, commit {b.results['meta']['git_commit']}")
    try:
        b.phase("hbm_copy", b.hbm_copy, needs_cuda=True)
        b.phase("build_transformers", b.build_transformers, engine="transformers")
        b.phase("save_pretrained", b.save_checkpoint)
        b.phase("load_moekit", b.load_moekit, engine="moekit")
        b.phase("correctness", b.correctness)

        for t in args.prefill_lens:
            b.phase(f"moekit_prefill_{t}", lambda t=t: b.prefill("moekit", t), engine="moekit")
        b.phase("moekit_decode_b1_graph", lambda: b.moekit_decode(1, True), needs_cuda=True, engine="moekit")
        b.phase("moekit_decode_b1_eager", lambda: b.moekit_decode(1, False), engine="moekit")

        for t in args.prefill_lens:
            b.phase(f"hf_prefill_{t}", lambda t=t: b.prefill("transformers", t), engine="transformers")
        b.phase("hf_decode_b1_default", lambda: b.hf_decode(1, "default"), engine="transformers")
        b.phase("hf_decode_b1_static", lambda: b.hf_decode(1, "static", cache_implementation="static",
                                                           disable_compile=True), engine="transformers")
        for batch in args.batches:
            b.phase(f"hf_decode_b{batch}", lambda n=batch: b.hf_decode(n, "default"), engine="transformers")

        # after the baselines: a graph capture that fails might leave the CUDA context unusable
        for batch in args.batches:
            b.phase(f"moekit_decode_b{batch}", lambda n=batch: b.moekit_decode(n, b.cuda), engine="moekit")

        # the taller-block Triton path for long prefills too (no per-layer host sync)
        if b.cuda:
            from moekit.experts import resident

            def prefill_all_triton(t: int) -> dict[str, Any]:
                old = resident.TRITON_MAX_SLOTS
                resident.TRITON_MAX_SLOTS = 1 << 30
                try:
                    return b.prefill("moekit", t, label="moekit triton-only")
                finally:
                    resident.TRITON_MAX_SLOTS = old
            for t in args.prefill_lens:
                b.phase(f"moekit_prefill_{t}_triton", lambda t=t: prefill_all_triton(t), engine="moekit")

        # last: compiling may take long (it stops at the time budget)
        if not args.no_compile and b.cuda:
            for batch in [1, *args.batches]:
                b.phase(f"moekit_decode_b{batch}_compiled", lambda n=batch: b.moekit_decode(n, True, compile=True),
                        engine="moekit")
        if not args.no_compile:
            b.phase("hf_decode_b1_static_compile", b.hf_static_compiled, needs_cuda=True, engine="transformers")
        for engine, nbytes in b.peak.items():
            model = b.mk if engine == "moekit" else b.hf
            weights = module_bytes(model) if model is not None else None
            label = f"peak GPU memory (weights {weights / 2**30:.2f} GiB)" if weights else "peak GPU memory"
            b.row(engine, label, nbytes / 2**30, None, "GiB")
        b.results["peak_gpu_bytes"] = dict(b.peak)
    finally:
        if b.ckpt_dir is not None and not args.keep_checkpoint:
            shutil.rmtree(b.ckpt_dir, ignore_errors=True)
        b.results["total_s"] = b.elapsed()
        b.save()
    log(f"wrote {b.out / 'bench_resident.json'}")
    errors = [k for k, v in b.results["phases"].items() if "error" in v]
    if errors:
        print(f"\nphases with errors: {', '.join(errors)}", flush=True)
    print("\n" + b.table(), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # do not wait on compile worker processes at exit
