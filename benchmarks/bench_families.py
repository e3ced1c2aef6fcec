#!/usr/bin/env python3
"""Issue 15's benchmark rows for the new families: the DeepSeek-V2-Lite shape (MLA, 2 shared + 64
routed experts, top-6) and the gpt-oss-20b shape (sinks, alternating sliding window, 32 experts top-4,
MXFP4 experts), bf16 random weights, each figure next to its ceiling and its transformers baseline.

    MOEKIT_GIT_COMMIT=<commit> PYTHONPATH=src python3 benchmarks/bench_families.py --out $OUT   # H200
    PYTHONPATH=src python3 benchmarks/bench_families.py --device cpu --small --out /tmp/bf      # smoke

One script (its shapes and byte counts in family_shapes.py) rather than new shapes in
bench_resident / bench_offload: those build llama-style attention (OLMoE through save_pretrained,
or random_checkpoint.non_expert_tensors) and hold a whole checkpoint per shape; here one transformers model per shape, built on the GPU, is the
source of every weight: its non-expert tensors go to a small checkpoint in --tmp (with gpt-oss's
experts as MXFP4 blocks and scales beside them), DeepSeek's routed experts are shared with moekit
in place (no disk: 29 GB), and both shapes run resident, KV and offloaded rows in one call.

Per shape, in order (each row under try/except, skipped with its reason once --time-budget-s is
spent; the JSON is rewritten after each row):
  1. build: transformers' model on the device (random N(0, 0.02), norms 1); gpt-oss's experts are
     rounded to MXFP4 and written back dequantized, so both engines run the same weights.
  2. correctness: moekit's logits vs transformers' on one prompt (relative error, top-1 agreement).
  3. resident decode at B=1 and B=32: transformers' default experts implementation, moekit (CUDA
     graphs, as generate uses them), then transformers' other implementations (eager, grouped_mm,
     batched_mm; batched_mm only where its prefill's gathered weights fit) and a row of moekit over
     the fastest one measured; each next to the HBM bound: weight bytes one step reads / 4.2e12
     B/s, where a step at batch B reads every non-expert weight once and E*(1-(1-A/E)^B) distinct
     experts per MoE layer (uniform routing, which random weights give), counted from each engine's
     own tensors (moekit's gpt-oss experts are MXFP4: 4.25 bits a weight; transformers' are bf16).
  4. KV bytes per token, per layer and in total, after a prefill: moekit's KVCache (MLA: the latent
     and the rope key) vs the same cache's latents expanded into per-head keys and values by the
     layer's own kv_b_proj (the expanded cache), and transformers' DynamicCache (5.24 keeps MLA's
     latents too; sliding layers only their window).
  5. offloaded decode (batch 1) at shares of the model's bytes: moekit load_offloaded with only
     device_memory, next to its ceiling max(GPU-only step time, PCIe bytes per token / measured
     pinned H2D rate) (bench_offload.offload_row), and transformers + accelerate (device_map with
     max_memory at the same budget, a few tokens, capped at --hf-offload-cap-s). gpt-oss's budgets
     are shares of its bf16 bytes (what transformers holds; as bench_offload's compressed rows),
     plus moekit-only rows at shares of its stored (MXFP4) bytes; 10% of those is below its
     non-expert weights, and the planner's refusal is the row.

On the H200 (never run there yet; an estimate): 2-3 minutes for DeepSeek-V2-Lite, 3-4 for gpt-oss-20b.
Each shape gets an equal share of --time-budget-s (540 s) left when it starts, the last all that is
left; rows past it are skipped, not cut. --shapes runs one shape, --layers/--vocab shrink them.

Shape legend: L = layers, D = hidden, I = expert ffn, E = routed experts, A = experts per token,
B = batch, T = tokens, R = rows of a Linear weight, K = its columns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common  # also puts src/ on sys.path when moekit is not importable
import torch
from bench_offload import (
    HostResident,
    bench_hf,
    h2d_bandwidth,
    offload_row,
    run_generate,
)
from bench_resident import Deadline, deadline
from common import HBM_BYTES_PER_S, free_memory, log, sync
from family_shapes import (
    SHAPES,
    decode_step_bytes,
    expanded_bytes,
    hf_cache_layer_bytes,
    hf_config,
    is_routed_expert,
    prompt,
    quantize_mxfp4,
    small_budget,
    tensor_groups,
)

import moekit
from moekit.offload import OffloadConfig, load_offloaded
from moekit.offload.layout import pinned_empty

HF_IMPLS = ("default", "eager", "grouped_mm", "batched_mm")


# ---- the run ----------------------------------------------------------------------------------

class Run:
    """Keeps the results, the table rows and the time budget; runs each row under try/except."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.rows: list[dict[str, Any]] = []
        self.budget_s = args.time_budget_s  # the current shape's deadline, seconds from the start
        self.results: dict[str, Any] = {"meta": common.run_meta(args, self.device),
                                        "constants": {"hbm_bytes_per_s": HBM_BYTES_PER_S}, "shapes": {},
                                        "table": self.rows}

    def save(self) -> None:
        common.write_json(self.results, self.args.out, "bench_families")

    def left_s(self) -> float:
        """Returns the seconds left to the current shape (its share of --time-budget-s, see main)."""
        return self.budget_s - (time.perf_counter() - common.T_START)

    def step(self, res: dict, name: str, fn: Callable[[], dict | None], need_s: float = 0.0) -> dict:
        """Runs fn and stores its dict (or its error, or why it was skipped) as res['phases'][name]."""
        phases = res.setdefault("phases", {})
        if self.left_s() < need_s:
            out: dict[str, Any] = {"skipped": f"time budget: {max(self.left_s(), 0):.0f} s left of this shape's "
                                              f"{self.budget_s:.0f} (of --time-budget-s "
                                              f"{self.args.time_budget_s:.0f}), this row needs ~{need_s:.0f}"}
            log(f"{name} skipped: {out['skipped']}")
        else:
            log(f"{name} ...")
            t = time.perf_counter()
            try:
                out = fn() or {}
            except (Exception, Deadline) as e:  # noqa: BLE001 -- one failure must not lose the other rows
                out = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
                log(f"{name} FAILED: {out['error'][:300]}")
            out["phase_s"] = round(time.perf_counter() - t, 3)
        phases[name] = out
        self.save()
        return out

    def row(self, shape: str, engine: str, metric: str, measured: float | None, ceiling: float | None,
            unit: str, note: str = "", **extra) -> None:
        pct = 100.0 * measured / ceiling if measured and ceiling else None
        self.rows.append({"shape": shape, "engine": engine, "metric": metric, "measured": measured,
                          "ceiling": ceiling, "unit": unit, "pct_of_ceiling": pct, "note": note, **extra})
        self.save()


class Shape:
    """One shape's models, checkpoint and rows."""

    def __init__(self, run: Run, name: str):
        self.run, self.name, self.args, self.device = run, name, run.args, run.device
        self.hf_cfg = hf_config(name, self.args.small, self.args.layers, self.args.vocab)
        self.mxfp4 = name.startswith("gpt-oss")
        self.folder = Path(self.args.tmp) / (name + ("-small" if self.args.small else ""))
        self.res: dict[str, Any] = run.results["shapes"].setdefault(name, {})
        self.hf = self.mk = self.cfg = None
        self.gpu_experts: dict[int, dict[str, torch.Tensor]] = {}  # DeepSeek's, shared by both engines
        self.compute_s: float | None = None
        self.hf_default_tok_s: dict[int, float] = {}

    # -- build
    def build(self) -> dict:
        """transformers' model on the device, and a checkpoint of its non-expert tensors (+ MXFP4 experts)."""
        import transformers
        from safetensors.torch import save_file

        from moekit.families import family_for

        torch.manual_seed(0)
        t = time.perf_counter()
        with torch.device(self.device):
            hf = transformers.AutoModelForCausalLM.from_config(self.hf_cfg, dtype=torch.bfloat16)
        hf.eval()
        sync(self.device)
        build_s = time.perf_counter() - t
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.safetensors"):
            old.unlink()
        data = self.hf_cfg.to_dict()
        data["architectures"] = [type(hf).__name__]
        data["torch_dtype"] = "bfloat16"
        state = {n: p for n, p in hf.state_dict().items()}
        rest = {n: p.detach().cpu().contiguous() for n, p in state.items() if not is_routed_expert(n)}
        mx: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, p in state.items():
                if not is_routed_expert(name):
                    continue
                layer = int(name.split(".")[2])
                if self.mxfp4:  # [E, D, 2I] / [E, I, D] -> Linear layout [E, R, K], rounded, written back
                    from moekit.experts.clamped import decode_mxfp4

                    blocks, scales = [], []
                    for e in range(p.shape[0]):  # one expert at a time: the rounding holds 32 floats a value
                        b, s = quantize_mxfp4(p[e].transpose(0, 1))
                        p[e].copy_(decode_mxfp4(b, s, torch.bfloat16).transpose(0, 1))
                        blocks.append(b.cpu())
                        scales.append(s.cpu())
                    mx[name + "_blocks"], mx[name + "_scales"] = torch.stack(blocks), torch.stack(scales)
                else:
                    self.gpu_experts.setdefault(layer, {})["gate_up" if name.endswith("gate_up_proj") else "down"] = p
        t_write = time.perf_counter()
        save_file(rest, str(self.folder / "model.safetensors"))
        if mx:
            save_file(mx, str(self.folder / "experts-mxfp4.safetensors"))
            data["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
                "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
        (self.folder / "config.json").write_text(json.dumps(data))
        write_s = time.perf_counter() - t_write
        self.cfg = family_for(data).config(data)
        self.hf = hf
        groups = tensor_groups(hf)
        disk = sum(f.stat().st_size for f in self.folder.glob("*.safetensors"))
        out = {"build_s": build_s, "write_s": write_s, "params": sum(p.numel() for p in hf.parameters()),
               "hf_weight_bytes": sum(groups.values()), "hf_expert_bytes": sum(v for k, v in groups.items()
                                                                             if k.startswith("experts:")),
               "checkpoint_bytes_on_disk": disk, "experts_on_disk": "MXFP4" if self.mxfp4 else "none (shared in place)",
               "experts_implementation_default": getattr(hf.config, "_experts_implementation", None),
               "attn_implementation": getattr(hf.config, "_attn_implementation", None),
               "hf_config": {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool, list, dict))
                             or v is None}}
        log(f"{self.name}: {out['params'] / 1e9:.2f} B params built in {build_s:.1f} s, "
            f"checkpoint {disk / 1e9:.2f} GB written in {write_s:.1f} s")
        return out

    def load_moekit(self) -> dict:
        from moekit.load import load_model

        t = time.perf_counter()
        moe = [i for i, m in enumerate(self.cfg.moe_layers) if m]
        if not self.mxfp4 and sorted(self.gpu_experts) != moe:
            import transformers

            raise RuntimeError(f"transformers {transformers.__version__}: no stacked 'mlp.experts.gate_up_proj' / "
                               f"'down_proj' in layers {sorted(set(moe) - set(self.gpu_experts))} of its "
                               f"{type(self.hf).__name__}; this script shares those stacks with moekit")
        experts = HostResident(self.gpu_experts) if not self.mxfp4 else None
        self.mk = load_model(self.folder, device=self.device, dtype=torch.bfloat16, experts=experts)
        sync(self.device)
        groups = tensor_groups(self.mk)
        return {"load_s": time.perf_counter() - t, "moekit_weight_bytes": sum(groups.values()),
                "moekit_expert_bytes": sum(v for k, v in groups.items() if k.startswith("experts:")),
                "moekit_experts_shared_with_transformers": not self.mxfp4}

    @torch.no_grad()
    def correctness(self) -> dict:
        ids = prompt(self.cfg.vocab_size, 1, 32, 7, self.device)
        ours = self.mk(ids).float()
        theirs = self.hf(ids).logits.float()
        rel = ((ours - theirs).norm() / theirs.norm()).item()
        agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
        log(f"  {self.name}: logits relative error {rel:.2e}, top-1 agreement {agree:.3f}")
        return {"logits_rel_error": rel, "top1_agreement": agree, "prompt_len": 32}

    # -- resident decode
    def ceiling(self, model, batch: int) -> dict:
        step = decode_step_bytes(tensor_groups(model), self.cfg.num_experts, self.cfg.top_k, batch,
                                 self.cfg.hidden_size)
        return {"weight_bytes_per_step": step, "hbm_bound_tok_s": batch * HBM_BYTES_PER_S / step}

    @torch.inference_mode()
    def moekit_decode(self, batch: int) -> dict:
        a = self.args
        ids = prompt(self.cfg.vocab_size, batch, a.prompt_len, 3, self.device)
        out: dict[str, Any] = {"batch": batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens}

        def gen(n: int, stats=None):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                toks = moekit.generate(self.mk, ids, max_new_tokens=n, temperature=0.0, stop_at_eos=False,
                                       cuda_graph=self.run.cuda, stats=stats)
            for w in caught:  # e.g. "CUDA graph capture failed, decoding eagerly"
                out.setdefault("warnings", []).append(str(w.message)[:500])
            return toks

        gen(min(8, a.new_tokens))  # warm-up: kernels, allocator, a graph capture
        runs = []
        for _ in range(a.reps):
            stats = moekit.GenerationStats()
            gen(a.new_tokens, stats)
            runs.append({"decode_s": stats.decode_s, "prefill_s": stats.prefill_s, "new_tokens": stats.new_tokens,
                         "cuda_graph_used": stats.cuda_graph})
        decode_s = statistics.median(r["decode_s"] for r in runs)
        steps = runs[0]["new_tokens"] - 1
        tok_s = batch * steps / decode_s
        ceil = self.ceiling(self.mk, batch)
        graphs = all(r["cuda_graph_used"] for r in runs)
        if batch == 1:
            self.compute_s = decode_s / steps
        base = self.hf_default_tok_s.get(batch)
        self.run.row(self.name, "moekit " + ("graphs" if graphs else "eager"), f"resident decode B={batch}", tok_s,
                     ceil["hbm_bound_tok_s"], "tok/s", "HBM bound on moekit's stored weights" +
                     ("; MXFP4 experts" if self.mxfp4 else ""),
                     baseline="transformers default", baseline_tok_s=base, x_baseline=tok_s / base if base else None)
        log(f"  moekit B={batch}: {tok_s:,.1f} tok/s ({decode_s / steps * 1e3:.2f} ms/step, "
            f"{ceil['weight_bytes_per_step'] / (decode_s / steps) / 1e9:,.0f} GB/s of weights)")
        out.update(runs=runs, cuda_graph_used=graphs, ms_per_step=decode_s / steps * 1e3, tok_s=tok_s, ceiling=ceil,
                   timed="GenerationStats.decode_s: tokens after the first, graph capture excluded")
        return out

    def batched_mm_bytes(self, batch: int) -> int:
        """Returns the expert weight bytes transformers' batched_mm gathers for the largest MoE call
        of a decode run at `batch` (its prefill: every (token, chosen expert) pair's matrices)."""
        cfg = self.cfg
        return batch * self.args.prompt_len * cfg.top_k * 3 * cfg.hidden_size * cfg.expert_ffn * 2

    def free_device_bytes(self) -> int:
        if not self.run.cuda:
            return 1 << 62
        return torch.cuda.mem_get_info(self.device)[0] + torch.cuda.memory_reserved(self.device) - \
            torch.cuda.memory_allocated(self.device)

    def set_hf_impl(self, impl: str) -> str:
        """Returns the experts implementation transformers runs after asking for `impl`."""
        if impl == "default":
            impl = self.res["phases"]["build"].get("experts_implementation_default") or "eager"
        setter = getattr(self.hf, "set_experts_implementation", None)
        if setter is not None:
            setter(impl)
        else:  # older transformers: the experts read the shared config at each call
            self.hf.config._experts_implementation = impl
        return getattr(self.hf.config, "_experts_implementation", impl)

    @torch.inference_mode()
    def hf_decode(self, batch: int, impl: str) -> dict:
        a = self.args
        used = self.set_hf_impl(impl)
        ids = prompt(self.cfg.vocab_size, batch, a.prompt_len, 3, self.device)
        mask = torch.ones_like(ids)

        def gen(n: int):
            return self.hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                    min_new_tokens=n, pad_token_id=0)

        gen(min(8, a.new_tokens))
        full = common.times_s(lambda: gen(a.new_tokens), self.device, reps=a.reps, warmup=0)
        one = common.times_s(lambda: gen(1), self.device, reps=a.reps, warmup=0)
        steps = a.new_tokens - 1
        decode_s = statistics.median(full) - statistics.median(one)
        if decode_s <= 0:
            raise RuntimeError(f"generate({a.new_tokens}) took no longer than generate(1): timing noise")
        tok_s = batch * steps / decode_s
        ceil = self.ceiling(self.hf, batch)
        if impl == "default":
            self.hf_default_tok_s[batch] = tok_s
        self.run.row(self.name, f"transformers {impl} ({used})", f"resident decode B={batch}", tok_s,
                     ceil["hbm_bound_tok_s"], "tok/s", "HBM bound on transformers' bf16 weights")
        log(f"  transformers {impl} ({used}) B={batch}: {tok_s:,.1f} tok/s ({decode_s / steps * 1e3:.2f} ms/step)")
        return {"batch": batch, "asked": impl, "experts_implementation": used, "full_times_s": full,
                "one_token_times_s": one, "ms_per_step": decode_s / steps * 1e3, "tok_s": tok_s, "ceiling": ceil,
                "timed": f"(generate {a.new_tokens} - generate 1) / {steps}"}

    # -- KV bytes per token
    @torch.inference_mode()
    def kv_bytes(self) -> dict:
        """KV bytes per token from the caches after an n-token prefill: moekit's KVCache; for MLA its
        latents expanded into per-head keys and values as kv_b_proj makes them (the expanded cache);
        transformers' own cache (whatever its version keeps: heads, or latents)."""
        from moekit.kv_cache import KVCache

        n = self.args.kv_tokens
        cache = KVCache(self.cfg, batch=1, capacity=n, device=self.device, dtype=torch.bfloat16)
        ids = prompt(self.cfg.vocab_size, 1, n, 11, self.device)
        self.mk(ids, cache=cache, start=0)  # the cache as a prefill fills it
        ours = [(k.numel() * k.element_size() + v.numel() * v.element_size()) / n
                for k, v in zip(cache.keys, cache.values)]
        m = self.cfg.mla
        expanded = [expanded_bytes(layer.attn, k, v) / n for layer, k, v in
                    zip(self.mk.layers, cache.keys, cache.values)] if m is not None else None
        out = self.hf(ids, use_cache=True)
        theirs = [b / n for b in hf_cache_layer_bytes(out.past_key_values)]
        del cache, out
        total_ours, total_theirs = sum(ours), sum(theirs)
        span = lambda xs: f"per layer {min(xs):,.0f}-{max(xs):,.0f} B"
        if m is not None:
            total_expanded = sum(expanded)
            self.run.row(self.name, "moekit latent (MLA)", f"KV bytes/token, {len(ours)} layers", total_ours,
                         None, "B", f"{span(ours)}; vs the same cache expanded to heads: {total_expanded:,.0f} B "
                         f"({span(expanded)}); {n}-token prefill", baseline="the expanded cache", baseline_bytes=total_expanded,
                         x_baseline=total_expanded / total_ours)
        else:
            self.run.row(self.name, "moekit", f"KV bytes/token, {len(ours)} layers", total_ours, None, "B",
                         f"{span(ours)}; {n}-token prefill")
        holds = ("latents" if m is not None and abs(total_theirs - total_ours) < 1e-6 * total_ours else
                 "heads" if m is not None else "keys + values")
        self.run.row(self.name, "transformers", f"KV bytes/token, {len(theirs)} layers", total_theirs, None, "B",
                     f"{span(theirs)}; its DynamicCache holds {holds}" +
                     ("; sliding layers keep their window only" if self.cfg.sliding_window else ""))
        log(f"  KV bytes/token: moekit {total_ours:,.0f}" + (f" (expanded {sum(expanded):,.0f})" if expanded else "") +
            f", transformers {total_theirs:,.0f}, over {n} tokens")
        formula = {"latent": (m.kv_lora_rank + m.qk_rope_head_dim) * 2,
                   "expanded": self.cfg.num_heads * (m.qk_head_dim + m.v_head_dim) * 2} if m is not None else None
        return {"tokens": n, "moekit_per_layer_bytes_per_token": ours, "moekit_expanded_per_layer": expanded,
                "transformers_per_layer_bytes_per_token": theirs, "moekit_total": total_ours,
                "moekit_expanded_total": sum(expanded) if expanded else None, "transformers_total": total_theirs,
                "transformers_cache_holds": holds, "formula_per_layer_bf16": formula}

    # -- offload
    def to_host(self) -> dict:
        """Copies the routed experts (transformers' layout) into page-locked host memory, then frees both
        resident models: the offloaded rows start from an empty device."""
        t = time.perf_counter()
        host: dict[int, dict[str, torch.Tensor]] = {}
        for name, p in self.hf.state_dict().items():
            if is_routed_expert(name):
                layer = int(name.split(".")[2])
                h = pinned_empty(tuple(p.shape), p.dtype) if self.run.cuda else torch.empty(p.shape, dtype=p.dtype)
                h.copy_(p)
                host.setdefault(layer, {})["gate_up" if name.endswith("gate_up_proj") else "down"] = h
        self.host = host
        self.hf = self.mk = None
        self.gpu_experts = {}
        free_memory(self.device, reset_peak=True)
        bytes_ = sum(t.numel() * t.element_size() for layer in host.values() for t in layer.values())
        return {"host_expert_bytes": bytes_, "copy_s": time.perf_counter() - t, "pinned": self.run.cuda}

    def budgets(self) -> list[tuple[str, int, bool]]:
        """Returns the offloaded rows: (label, device budget bytes, with transformers + accelerate)."""
        from moekit.experts.forms import DenseForm
        from moekit.offload.planner import resident_bytes

        cfg, a = self.cfg, self.args
        moe = [i for i, m in enumerate(cfg.moe_layers) if m]
        bf16_experts = len(moe) * cfg.num_experts * DenseForm(cfg.hidden_size, cfg.expert_ffn, torch.bfloat16).expert_bytes(0)
        bf16_bytes = resident_bytes(cfg, torch.bfloat16) + bf16_experts
        slot = DenseForm(cfg.hidden_size, cfg.expert_ffn, torch.bfloat16).expert_bytes(0)
        if self.mxfp4:
            from moekit.experts.clamped import Mxfp4ClampedForm

            slot = Mxfp4ClampedForm.of(cfg, torch.bfloat16).expert_bytes(0)
            mx_experts = len(moe) * cfg.num_experts * slot
            stored = resident_bytes(cfg, torch.bfloat16) + mx_experts

        def share_of(total: int, s: float) -> int:
            return small_budget(s, cfg, slot, a.prompt_len + a.offload_tokens, self.device) if a.small \
                else int(s * total)

        out = [(f"{int(s * 100)}% of bf16 bytes", share_of(bf16_bytes, s), True) for s in a.budgets]
        if self.mxfp4:
            out += [(f"{int(s * 100)}% of stored bytes", share_of(stored, s), False) for s in a.budgets]
        self.res["model_bytes"] = {"bf16": bf16_bytes, "bf16_experts": bf16_experts,
                                   **({"stored": stored, "stored_experts": mx_experts} if self.mxfp4 else {})}
        return out

    def moekit_offloaded(self, label: str, budget: int, misses: str = "fetch") -> dict:
        a = self.args
        config = OffloadConfig(device_memory=budget, misses=misses)
        free_memory(self.device, reset_peak=True)
        t = time.perf_counter()
        model = load_offloaded(self.folder, device=self.device, dtype=torch.bfloat16, offload=config,
                               host_layers=None if self.mxfp4 else self.host)
        load_s = time.perf_counter() - t
        ids = prompt(self.cfg.vocab_size, 1, a.prompt_len, 1, torch.device("cpu"))
        runtime = model.offload
        run_generate(model, ids, 2)  # kernels compiled, then fresh counters
        runtime.calls.clear()
        runtime.cache.synchronize()
        runtime.reset_stats()
        r = run_generate(model, ids, a.offload_tokens)
        rep = runtime.report()
        offload_row(r, rep, budget, self.run.results["h2d_bytes_per_s"], self.compute_s)
        r.update(budget_bytes=budget, load_s=load_s, offload_config=config.to_dict(),
                 source="host stacks shared with transformers (pinned)" if not self.mxfp4 else "MXFP4 checkpoint",
                 misses=misses, misses_used=rep.get("misses_used", misses), mapped_reads=rep.get("mapped_reads"))
        if misses != "fetch":  # --misses: which mode the row asked for and which ran
            label = f"{label}, misses {misses} (ran {r['misses_used']})"
        self.run.row(self.name, "moekit offloaded", f"decode B=1 at {label}", r["decode_tok_s"], r["ceiling_tok_s"],
                     "tok/s", f"ceiling max(GPU-only step, PCIe {r['pcie_bytes_per_token'] / 1e6:.0f} MB/token); "
                     f"hit {r['hit_rate']:.2f}, peak {r['peak_bytes'] / 1e9:.2f} of {budget / 1e9:.2f} GB",
                     budget_bytes=budget)
        log(f"  moekit {label}: {r['decode_tok_s']:.2f} tok/s (ceiling {r['ceiling_tok_s'] or 0:.2f}), "
            f"hit {r['hit_rate']:.2f}, {r['pcie_bytes_per_token'] / 1e6:.0f} MB/token")
        model = runtime = None
        free_memory(self.device, reset_peak=True)
        return r

    def hf_offloaded(self, label: str, budget: int) -> dict:
        a = self.args
        ids = prompt(self.cfg.vocab_size, 1, a.prompt_len, 1, torch.device("cpu"))
        with deadline(min(a.hf_offload_cap_s, max(self.run.left_s(), 1.0))):
            r = bench_hf(self.name, a, self.device, self.host, self.folder, budget, ids, hf_cfg=self.hf_cfg)
        hf_tok_s = r.get("decode_tok_s")
        self.run.row(self.name, "transformers + accelerate", f"decode B=1 at {label}", hf_tok_s, None,
                     "tok/s", f"device_map from max_memory {budget / 1e9:.2f} GB, {r.get('layers_on_gpu', '?')} layers "
                     f"on the GPU, {r.get('tokens')} tokens, host weights pinned" +
                     (f"; {r['error']}" if "error" in r else ""), budget_bytes=budget)
        ours = next((row for row in self.run.rows if row["shape"] == self.name and row["engine"] == "moekit offloaded"
                     and row["metric"] == f"decode B=1 at {label}"), None)
        if ours is not None and ours["measured"] and hf_tok_s:
            ours.update(baseline="transformers + accelerate", baseline_tok_s=hf_tok_s,
                        x_baseline=ours["measured"] / hf_tok_s)
            self.run.save()
        return r


def bench_shape(run: Run, name: str) -> None:
    s = Shape(run, name)
    a = run.args
    big = not a.small
    s.res["shape"] = name
    if not done(run.step(s.res, "build", s.build, need_s=60 if big else 0)):
        return
    if not done(run.step(s.res, "load_moekit", s.load_moekit, need_s=20 if big else 0)):
        return
    run.step(s.res, "correctness", s.correctness)
    default = s.res["phases"]["build"].get("experts_implementation_default")
    impls = [i for i in a.hf_impls if i != "default"]

    def hf_rows(impl: str) -> None:
        if impl == default and "default" in a.hf_impls:
            s.res["phases"][f"hf_decode_{impl}"] = {"skipped": f"transformers' default is {impl}: the default rows"}
            return
        for batch in a.batches:
            name = f"hf_decode_{impl}_b{batch}"
            gathered = s.batched_mm_bytes(batch) if impl == "batched_mm" else 0
            if gathered > 0.5 * s.free_device_bytes():  # an out-of-memory error would cost the time, not a row
                s.res["phases"][name] = {"skipped": f"batched_mm copies each (token, expert) pair's weights: the "
                                                    f"{batch}x{a.prompt_len} prefill would gather {gathered / 1e9:.0f} GB"}
                continue
            run.step(s.res, name, lambda b=batch: s.hf_decode(b, impl), need_s=15 if big else 0)

    if "default" in a.hf_impls:  # first: the moekit rows report their speed-up over it
        hf_rows("default")
    for batch in a.batches:  # before transformers' other implementations: the rows the goals are about
        run.step(s.res, f"moekit_decode_b{batch}", lambda b=batch: s.moekit_decode(b), need_s=10 if big else 0)
    run.step(s.res, "kv_bytes", s.kv_bytes)
    for impl in impls:
        hf_rows(impl)
    if s.hf is not None:
        s.set_hf_impl("default")
    best_rows(run, s)
    if not a.budgets:
        return
    if not done(run.step(s.res, "to_host", s.to_host, need_s=30 if big else 0)):
        return
    s.res["budgets"] = [{"label": lb, "bytes": b, "with_transformers": hf} for lb, b, hf in s.budgets()]
    for label, budget, with_hf in [(d["label"], d["bytes"], d["with_transformers"]) for d in s.res["budgets"]]:
        key = label.replace("% of ", "pct_").replace(" ", "_")
        for misses in a.misses:  # fetch keeps the row's original key
            run.step(s.res, f"moekit_offload_{key}" + ("" if misses == "fetch" else f"_{misses}"),
                     lambda lb=label, b=budget, m=misses: s.moekit_offloaded(lb, b, m), need_s=20 if big else 0)
        if with_hf and not a.skip_hf_offload:
            run.step(s.res, f"hf_offload_{key}", lambda lb=label, b=budget: s.hf_offloaded(lb, b),
                   need_s=30 if big else 0)
    s.host = None
    free_memory(run.device, reset_peak=True)


def best_rows(run: Run, s: Shape) -> None:
    """Adds, per batch, moekit's decode over transformers' fastest experts implementation measured."""
    ph = s.res["phases"]
    best = {}
    for batch in run.args.batches:
        got = [(p["tok_s"], p["asked"], p["experts_implementation"]) for k, p in ph.items()
               if k.startswith("hf_decode_") and p.get("batch") == batch and "tok_s" in p]
        ours = ph.get(f"moekit_decode_b{batch}", {}).get("tok_s")
        if not got:
            continue
        tok_s, asked, used = max(got)
        best[batch] = {"asked": asked, "experts_implementation": used, "tok_s": tok_s}
        if ours:
            run.row(s.name, "moekit vs transformers' best", f"resident decode B={batch}", ours / tok_s, None, "x",
                    f"transformers' fastest measured: {asked} ({used}) at {tok_s:,.1f} tok/s",
                    baseline=f"transformers {asked}", baseline_tok_s=tok_s)
    s.res["hf_best_impl"] = best


def done(phase: dict) -> bool:
    """Returns whether a row ran through (neither failed nor skipped)."""
    return "error" not in phase and "skipped" not in phase


def table(rows: list[dict]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"

    body = []
    for r in rows:
        unit = f" {r['unit']}" if r["unit"] else ""
        pct = f"{r['pct_of_ceiling']:.0f}%" if r["pct_of_ceiling"] is not None else "-"
        vs = r.get("x_baseline")
        body.append((r["shape"], r["engine"], r["metric"], fmt(r["measured"]) + unit,
                     fmt(r["ceiling"]) + (unit if r["ceiling"] is not None else ""), pct,
                     f"{vs:.1f}x" if vs else "", r["note"]))
    return common.markdown_table(("shape", "engine", "metric", "measured", "ceiling", "% of ceiling",
                                  "x baseline", "note"), body)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_output_args(p, "bench_families")
    p.add_argument("--small", action="store_true", help="tiny versions of both shapes (a CPU smoke test)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--batches", default="1,32", help="resident decode batches")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per resident decode run")
    p.add_argument("--reps", type=int, default=2, help="timed runs of each resident generate (median)")
    p.add_argument("--hf-impls", default=",".join(HF_IMPLS),
                   help="transformers experts implementations to time ('default' = what it picks itself)")
    p.add_argument("--kv-tokens", type=int, default=256, help="prefill length of the KV rows")
    p.add_argument("--budgets", default="0.25,0.10", help="offloaded rows: shares of the model's bytes ('' for none)")
    p.add_argument("--offload-tokens", type=int, default=32, help="tokens per moekit offloaded run")
    p.add_argument("--misses", default="fetch", help="offloaded rows: comma-separated misses modes, each a row "
                   "(fetch, cpu, auto, mapped)")
    p.add_argument("--hf-tokens", type=int, default=4, help="tokens per transformers + accelerate run")
    p.add_argument("--hf-offload-cap-s", type=float, default=45.0, help="seconds one accelerate row may take")
    p.add_argument("--skip-hf-offload", action="store_true")
    p.add_argument("--time-budget-s", type=float, default=540.0,
                   help="rows that would start past this many seconds are skipped (the call limit is 600)")
    p.add_argument("--layers", type=int, help="replace the shapes' layer count (a quicker check of real widths)")
    p.add_argument("--vocab", type=int, help="replace the shapes' vocabulary size (idem)")
    p.add_argument("--tmp", default="/tmp/moekit_bench_families", help="where the checkpoints go")
    a = p.parse_args(argv)
    a.shapes = [s for s in a.shapes.split(",") if s]
    for s in a.shapes:
        if s not in SHAPES:
            p.error(f"--shapes: {s!r} is not one of {', '.join(SHAPES)}")
    a.batches = [int(b) for b in a.batches.split(",") if b]
    a.hf_impls = [i for i in a.hf_impls.split(",") if i]
    a.budgets = [float(b) for b in a.budgets.split(",") if b]
    a.misses = [m for m in a.misses.split(",") if m]
    for m in a.misses:
        if m not in ("fetch", "cpu", "auto", "mapped"):
            p.error(f"--misses: {m!r} is not one of fetch, cpu, auto, mapped")
    if a.small:
        a.kv_tokens = min(a.kv_tokens, 24)
        a.new_tokens = min(a.new_tokens, 8)
        a.offload_tokens = min(a.offload_tokens, 8)
        a.prompt_len = min(a.prompt_len, 16)
    if a.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode is timed after the first token)")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; run with --device cpu --small for a smoke test", file=sys.stderr)
        return 2
    import transformers

    transformers.logging.set_verbosity_error()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores)
    run = Run(args)
    run.results["meta"]["transformers"] = transformers.__version__
    run.results["h2d_bytes_per_s"] = h2d_bandwidth(run.device)
    log(f"bench_families on {common.device_name(run.device)}: pinned H2D {run.results['h2d_bytes_per_s'] / 1e9:.1f} GB/s, "
        f"transformers {transformers.__version__}")
    start = time.perf_counter() - common.T_START
    for i, name in enumerate(args.shapes):
        # each shape gets an equal share of what is left (the last all of it): one slow shape cannot
        # leave the next without its resident rows
        run.budget_s = start + (args.time_budget_s - start) * (i + 1) / len(args.shapes) if i + 1 < len(args.shapes) \
            else args.time_budget_s
        start = max(start, time.perf_counter() - common.T_START)
        try:
            bench_shape(run, name)
        except Exception as e:  # noqa: BLE001 -- a shape's failure outside its rows must not cost the next
            run.results["shapes"].setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        free_memory(run.device, reset_peak=True)
        for f in (Path(args.tmp) / (name + ("-small" if args.small else ""))).glob("*.safetensors"):
            f.unlink()  # the disk holds one shape's checkpoint at a time
        run.save()
    run.results["total_s"] = time.perf_counter() - common.T_START
    run.save()
    errors = [f"{n}/{k}" for n, r in run.results["shapes"].items() for k, v in r.get("phases", {}).items()
              if "error" in v]
    if errors:
        print(f"\nrows with errors: {', '.join(errors)}", flush=True)
    print("\n" + table(run.rows), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # do not wait on compile worker processes at exit
