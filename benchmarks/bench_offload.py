"""Offloaded decode (batch 1), BENCH.md: moekit's offload runtime at 25% and 10% of the model's bytes
with predictors none / speculative / oracle, next to GPU-only (all resident: the upper bound) and
transformers + accelerate device_map="auto" with max_memory at the same budget; each moekit
figure next to its ceiling max(compute time, PCIe bytes per token / measured pinned H2D bandwidth).
Pre-gate accuracy is measured on the bundled tiny MoE (trained by examples/train_tiny.py).

Rows "CPU misses" (OffloadConfig(misses="cpu"), predictor none and speculative) compute the experts
absent from the GPU cache on the CPU from host memory (offload/cpu.py); "auto" (speculative) lets
the cost model measured at load split them between PCIe and the CPU. Rows "misses read in place"
(misses="mapped", offload/mapped.py) capture each decode step whole: the slot kernels read missed
experts over PCIe from host memory, popular ones are copied in between steps; their PCIe bytes
are both (in-place reads + copies), at the same copy-rate ceiling. torch's intra-op threads
are set to the CPUs this process may use (`cpu_threads` in the JSON). Their ceiling adds the CPU
side: max(compute time, PCIe bytes per token / H2D rate, expert bytes the CPU reads per token /
host read rate), the host rate measured in the same run (the best of a bf16 matvec over the host
store's experts and a sum over them; both in the JSON).

    cd repo && PYTHONPATH=src python3 benchmarks/bench_offload.py --out $OUT            # H200
    PYTHONPATH=src python3 benchmarks/bench_offload.py --device cpu --small --out /tmp/b  # smoke test
    ... --compressed-bits ternary,4   # also: the same experts compressed, offloaded in their stored form
    ... --misses cpu,auto --skip-hf --skip-pregate   # only the CPU-miss rows (no trace: no oracle row)

The compressed phase rounds the bf16 experts to nearest (RTN: ternary per row, or 4-bit in groups
of 128) on the device, in seconds; GPTQ needs calibration Hessians per expert and takes minutes
per layer at mixtral's shape, which this speed benchmark does not need (speed and bytes moved do
not depend on how the codes were chosen; the ternary code's size does, a little: GPTQ's codes are
sparser). Its rows run at the same absolute budget as the bf16 rows (a share of the bf16 model's
bytes), next to all compressed experts resident (its compute ceiling).

Weights are random bf16 (routing is then near-uniform: hit rates are a floor). Experts are made
straight in page-locked host memory and shared by every phase (moekit's host store and the
accelerate model's CPU weights); only the non-expert weights go through a checkpoint in /tmp.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import common  # also puts src/ on sys.path when moekit is not importable
import torch
from common import free_memory, log, sync
from random_checkpoint import device_rand, non_expert_tensors

import moekit
from moekit.load import ExpertLoader, load_model
from moekit.offload import OffloadConfig, load_offloaded
from moekit.offload.layout import pinned_empty

SHAPES = {  # name -> (HF config class, kwargs)
    "mixtral": ("MixtralConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                                      num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                      num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=4096)),
    "qwen3": ("Qwen3MoeConfig", dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                                     head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=151936,
                                     norm_topk_prob=True, max_position_embeddings=4096, mlp_only_layers=[])),
}
SMALL = {
    "mixtral": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=1000),
    "qwen3": dict(hidden_size=128, moe_intermediate_size=64, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=32, vocab_size=1000),
}


MISS_ROWS = (("cpu", "none"), ("cpu", "speculative"), ("auto", "speculative"),
             ("mapped", "none"))  # (misses, predictor) rows
MISS_LABELS = {"cpu": "CPU misses", "auto": "auto", "mapped": "misses read in place"}


# ---- building the model --------------------------------------------------------------------

def hf_config(shape: str, small: bool):
    import transformers

    cls, kwargs = SHAPES[shape]
    kwargs = {**kwargs, **(SMALL[shape] if small else {})}
    cfg = getattr(transformers, cls)(**kwargs, torch_dtype="bfloat16")
    return cfg


def build(shape: str, small: bool, device: torch.device, root: Path):
    """Returns (checkpoint dir of the non-expert weights, moekit ModelConfig, {layer: host experts})."""
    from safetensors.torch import save_file

    from moekit.families import family_for

    hf = hf_config(shape, small)
    folder = root / f"{shape}{'-small' if small else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    data = hf.to_dict()
    data["architectures"] = [type(hf).__name__.replace("Config", "ForCausalLM")]
    (folder / "config.json").write_text(json.dumps(data))
    family = family_for(data, where=str(folder))
    cfg = family.config(data)
    gen = torch.Generator(device=device).manual_seed(0)  # the non-expert weights, then the experts
    save_file(non_expert_tensors(family, cfg, device_rand(device, generator=gen)), str(folder / "model.safetensors"))
    host = {}
    d, e, ffn = cfg.hidden_size, cfg.num_experts, cfg.expert_ffn
    pin = device.type == "cuda"
    for i in range(cfg.num_layers):  # made on the device, copied once into page-locked memory
        layer = {}
        for name, shp in (("gate_up", (e, 2 * ffn, d)), ("down", (e, d, ffn))):
            t = pinned_empty(shp, torch.bfloat16) if pin else torch.empty(shp, dtype=torch.bfloat16)
            for j in range(e):
                t[j].copy_(torch.randn(shp[1:], generator=gen, device=device, dtype=torch.bfloat16) * 0.02)
            layer[name] = t
        host[i] = layer
    return folder, cfg, host


class HostResident(ExpertLoader):
    """All experts resident on the device, copied from the shared host tensors (GPU-only baseline)."""

    def __init__(self, host):
        self.host = host

    def build(self, ctx, layer):
        from moekit.experts import ResidentExperts

        experts = ResidentExperts(ctx.config.num_experts, ctx.config.hidden_size, ctx.config.expert_ffn)
        experts.gate_up = torch.nn.Parameter(self.host[layer]["gate_up"].to(ctx.device), requires_grad=False)
        experts.down = torch.nn.Parameter(self.host[layer]["down"].to(ctx.device), requires_grad=False)
        return experts


# ---- measurements ----------------------------------------------------------------------------

def h2d_bandwidth(device, nbytes=2**30) -> float:
    """Returns measured pinned host-to-device bytes/s (55e9 assumed on the CPU)."""
    if device.type != "cuda":
        return 55e9
    src = pinned_empty((nbytes,), torch.uint8)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    sync(device)
    return 5 * nbytes / (time.perf_counter() - t0)


def host_read_rates(host: dict, max_bytes: int = 4 * 2**30) -> dict:
    """Returns measured host read rates (bytes/s) over the host store's experts: a bf16 matvec per
    expert matrix (what a CPU miss does) and a sum of the same tensors; both read each byte once."""
    mats = [t[e] for layer in host.values() for t in layer.values() for e in range(t.shape[0])]
    chosen, total = [], 0
    for m in mats:  # distinct matrices, more than any last-level cache, up to max_bytes
        if total >= max_bytes:
            break
        chosen.append(m)
        total += m.numel() * m.element_size()
    xs = {m.shape[1]: torch.randn(1, m.shape[1]).to(m.dtype) for m in chosen}
    out = {}
    for name, fn in (("matvec", lambda m: torch.nn.functional.linear(xs[m.shape[1]], m)), ("sum", lambda m: m.sum())):
        for m in chosen[:2]:
            fn(m)  # warm-up (library primitives)
        t0 = time.perf_counter()
        for m in chosen:
            fn(m)
        out[f"{name}_bytes_per_s"] = total / (time.perf_counter() - t0)
    out.update(bytes=total, host_bytes_per_s=max(out["matvec_bytes_per_s"], out["sum_bytes_per_s"]))
    return out


def run_generate(model, ids, new_tokens, cuda_graph=None):
    stats = moekit.GenerationStats()
    model.generate(ids, max_new_tokens=new_tokens, temperature=0, eos_token_ids=(), stats=stats,
                   cuda_graph=cuda_graph)
    return {"ttft_s": stats.prefill_s, "decode_tok_s": stats.decode_tok_s,
            "decode_s_per_token": stats.decode_s / max(stats.new_tokens - 1, 1)}


def resident_row(model, ids, tokens, device) -> dict:
    """Returns the timing row of a model with every expert on the device (a warm-up run first),
    with the allocator's peak: the compute time of the offloaded rows' ceilings."""
    run_generate(model, ids, 4)
    r = run_generate(model, ids, tokens)
    r["peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return r


def free():
    """Returns cached device memory once the caller has dropped its references (peak counter reset)."""
    free_memory(reset_peak=True)


def offload_row(r: dict, rep: dict, budget: int, bw: float, compute_s: float | None,
                host_rate: float | None = None) -> None:
    """Adds an offloaded run's report to its timing row `r`, with its ceiling: the largest of the
    GPU-only compute time, the bytes that crossed PCIe per token at the measured rate `bw`, and
    the expert bytes the CPU read per token at the measured host read rate `host_rate`."""
    pcie_bytes = rep["bytes_per_token"] + rep.get("mapped_bytes_per_token", 0)  # copies + in-place reads
    pcie_s = pcie_bytes / bw
    cpu_s = rep.get("cpu_bytes_per_token", 0) / host_rate if host_rate else 0.0
    ceiling_s = max(compute_s or 0.0, pcie_s, cpu_s)
    r.update(hit_rate=rep["hit_rate"], prefetch_precision=rep["prefetch_precision"],
             prefetch_recall=rep["prefetch_recall"], pcie_bytes_per_token=pcie_bytes,
             stall_s=rep["stall_s"], peak_bytes=rep["peak_device_bytes"], cache_slots=rep["cache_slots"],
             within_budget=rep["peak_device_bytes"] <= budget,
             ceiling_tok_s=1 / ceiling_s if ceiling_s > 0 else None, pcie_s_per_token=pcie_s, plan=rep["plan"])
    if rep.get("misses", "fetch") != "fetch":
        r.update(misses=rep["misses"], misses_used=rep["misses_used"], misses_note=rep["misses_note"],
                 cpu_bytes_per_token=rep["cpu_bytes_per_token"], cpu_s_per_token_ceiling=cpu_s,
                 cpu_experts=rep["cpu_experts"], cpu_s=rep["cpu_s"], cpu_wait_s=rep["cpu_wait_s"],
                 admissions=rep["admissions"], prefetches=rep["prefetches"], demand_fetches=rep["demand_fetches"],
                 cpu_threads=rep["cpu_threads"], cost_model=rep["cost_model"],
                 mapped_reads=rep.get("mapped_reads", 0), mapped_bytes_per_token=rep.get("mapped_bytes_per_token", 0))
    r["share_of_ceiling"] = r["decode_tok_s"] / r["ceiling_tok_s"] if r["ceiling_tok_s"] else None


def budget_bytes(share, small, cfg, model_bytes, expert_bytes_total, context, device) -> int:
    """Returns the device budget of a row: `share` of the bf16 model's bytes."""
    if not small:
        return int(model_bytes * share)
    # tiny shapes: activations dominate, so budget the share of the experts instead
    from moekit.offload.planner import plan_budget

    floor = plan_budget(cfg, torch.bfloat16, expert_bytes_total // (cfg.num_layers * cfg.num_experts),
                        OffloadConfig(context_tokens=context), device)
    return floor.planned_bytes - floor.cache_bytes + int(share * expert_bytes_total)


def bench_shape(shape, args, device, results, save):
    res = results.setdefault("shapes", {}).setdefault(shape, {})
    t0 = time.perf_counter()
    folder, cfg, host = build(shape, args.small, device, Path(args.tmp))
    expert_bytes_total = sum(t.numel() * t.element_size() for layer in host.values() for t in layer.values())
    from moekit.offload.planner import resident_bytes

    model_bytes = expert_bytes_total + resident_bytes(cfg, torch.bfloat16)
    res.update(model_bytes=model_bytes, expert_bytes_total=expert_bytes_total, build_s=time.perf_counter() - t0,
               layers=cfg.num_layers, experts=cfg.num_experts, top_k=cfg.top_k)
    log(f"{shape}: built {model_bytes / 1e9:.2f} GB in {res['build_s']:.1f} s")
    save()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g)
    context = args.prompt + args.tokens
    dtype = torch.bfloat16

    # GPU-only: every expert resident (the upper bound, and the compute time of the ceiling)
    compute_s = None
    try:
        model = load_model(folder, device=device, dtype=dtype, experts=HostResident(host))
        r = resident_row(model, ids, args.tokens, device)
        compute_s = r["decode_s_per_token"]
        eager = run_generate(model, ids, min(8, args.tokens), cuda_graph=False) if device.type == "cuda" else r
        r["eager_decode_tok_s"] = eager["decode_tok_s"]
        res["gpu_only"] = r
        log(f"{shape}: GPU-only {r['decode_tok_s']:.1f} tok/s (eager {r['eager_decode_tok_s']:.1f}), ttft {r['ttft_s'] * 1e3:.0f} ms")
        model = None
        free()
    except Exception as e:
        res["gpu_only"] = {"error": repr(e)}
        traceback.print_exc()
    save()

    bw = results["h2d_bytes_per_s"]
    host_rate = None
    if set(args.misses) & {"cpu", "auto"}:
        res["host_read"] = host_read_rates(host)
        host_rate = res["host_read"]["host_bytes_per_s"]
        log(f"{shape}: host read {host_rate / 1e9:.1f} GB/s (bf16 matvec {res['host_read']['matvec_bytes_per_s'] / 1e9:.1f}, "
            f"sum {res['host_read']['sum_bytes_per_s'] / 1e9:.1f}) over {res['host_read']['bytes'] / 1e9:.2f} GB, "
            f"{torch.get_num_threads()} threads")
        save()
    for share in args.budgets:
        budget = budget_bytes(share, args.small, cfg, model_bytes, expert_bytes_total, context, device)
        key = f"budget_{int(share * 100)}pct"
        out = res.setdefault(key, {"budget_bytes": budget})
        trace = None
        rows = [(name, "fetch", name) for name in args.fetch_predictors if "fetch" in args.misses]
        rows += [(f"{misses}_{predictor}", misses, predictor) for misses, predictor in MISS_ROWS if misses in args.misses]
        for name, misses, predictor in rows:
            try:
                if predictor == "oracle" and trace is None:
                    raise RuntimeError("no routing trace from the 'none' run")
                free()  # start from nothing: the previous phase (accelerate's too) must not count here
                record = name == "none"
                config = OffloadConfig(device_memory=budget, predictor=predictor, cache_policy=args.policy,
                                       context_tokens=context, record_routing=record, misses=misses,
                                       host_embedding=args.host_embedding == "on")
                model = load_offloaded(folder, device=device, dtype=dtype, offload=config, host_layers=host,
                                       trace=trace)
                runtime = model.offload
                run_generate(model, ids, 2)  # kernels compiled, then a fresh cache and counters
                if record:
                    runtime.trace.clear()
                runtime.calls.clear()
                model.offload.cache.synchronize()
                runtime.reset_stats()
                r = run_generate(model, ids, args.tokens)
                rep = runtime.report()
                if record:
                    trace = {k: list(v) for k, v in runtime.trace.items()}
                offload_row(r, rep, budget, bw, compute_s, host_rate)
                out[name] = r
                cpu = (f", CPU {r['cpu_experts']} experts {r['cpu_bytes_per_token'] / 1e6:.0f} MB/token"
                       f" (waited {r['cpu_wait_s'] * 1e3:.0f} of {r['cpu_s'] * 1e3:.0f} ms)" if "cpu_experts" in r else "")
                log(f"{shape} {key} {name}: {r['decode_tok_s']:.2f} tok/s (ceiling {r['ceiling_tok_s'] or 0:.2f}), "
                    f"hit {r['hit_rate']:.2f}, P/R {r['prefetch_precision']:.2f}/{r['prefetch_recall']:.2f}, "
                    f"{r['pcie_bytes_per_token'] / 1e6:.0f} MB/token{cpu}, peak {r['peak_bytes'] / 1e9:.2f} of {budget / 1e9:.2f} GB")
                model = runtime = None
                free()
            except Exception as e:
                out[name] = {"error": repr(e)}
                traceback.print_exc()
            save()
        if not args.skip_hf:
            try:
                free()
                out["hf_accelerate"] = bench_hf(shape, args, device, host, folder, budget, ids)
                h = out["hf_accelerate"]
                log(f"{shape} {key} transformers+accelerate: {h.get('decode_tok_s', 0):.3f} tok/s, ttft {h.get('ttft_s', 0):.1f} s")
            except Exception as e:
                out["hf_accelerate"] = {"error": repr(e)}
                traceback.print_exc()
            save()
    for bits in args.compressed_bits:
        try:
            bench_compressed(shape, bits, args, device, res, folder, cfg, host, ids, context, save)
        except Exception as e:
            res.setdefault(f"compressed_{bits}", {})["error"] = repr(e)
            traceback.print_exc()
        save()
    host = None
    free()


class HostCompressedResident(ExpertLoader):
    """All compressed experts resident on the device in their stored form (the compressed ceiling)."""

    def __init__(self, stored, quant):
        self.stored, self.quant = stored, quant

    def build(self, ctx, layer):
        from moekit.quant.formats import build_experts

        cfg = ctx.config
        return build_experts(self.quant.form, cfg.num_experts, cfg.hidden_size, cfg.expert_ffn,
                             {k: v.to(ctx.device) for k, v in self.stored[layer].items()}, self.quant.bits)


def bench_compressed(shape, bits, args, device, res, folder, cfg, host, ids, context, save):
    """The same experts rounded to `bits` (ternary code or int-4), offloaded compressed at the bf16
    rows' budgets: tok/s, bytes moved per token, hit rate; next to all compressed experts resident."""
    from moekit.quant.compress import round_layer
    from moekit.quant.config import QuantConfig

    quant = QuantConfig(bits=bits, group_size=None if bits == "ternary" else 128, method="rtn")
    out = res.setdefault(f"compressed_{bits}", {})
    t0 = time.perf_counter()
    stored = {}
    for i, layer in host.items():  # rounded on the device, stored tensors back in host memory
        tensors = round_layer(layer["gate_up"].to(device), layer["down"].to(device), quant)
        stored[i] = {k: v.cpu() for k, v in tensors.items()}
        free()
    expert_bytes = sum(t.numel() * t.element_size() for layer in stored.values() for t in layer.values())
    params = sum(t.numel() for layer in host.values() for t in layer.values())
    folder_c = folder.parent / f"{folder.name}-{bits}"
    folder_c.mkdir(parents=True, exist_ok=True)
    data = json.loads((folder / "config.json").read_text())
    data["quantization_config"] = {**quant.to_dict(), "calibration_tokens": 0}
    (folder_c / "config.json").write_text(json.dumps(data))
    link = folder_c / "model.safetensors"  # the non-expert weights, shared with the bf16 rows
    if not link.exists():
        link.symlink_to((folder / "model.safetensors").resolve())
    out.update(quant=quant.to_dict(), quantize_s=time.perf_counter() - t0, expert_bytes_total=expert_bytes,
               bits_per_expert_param=8 * expert_bytes / params, method_note="RTN: GPTQ at this shape takes too long")
    log(f"{shape} {bits}: rounded in {out['quantize_s']:.1f} s, {out['bits_per_expert_param']:.3f} bits/param, "
        f"{expert_bytes / 1e9:.2f} GB of experts")
    save()
    dtype = torch.bfloat16
    compute_s = None
    try:
        free()
        model = load_model(folder_c, device=device, dtype=dtype, experts=HostCompressedResident(stored, quant))
        r = resident_row(model, ids, args.tokens, device)  # whole-step graphs: per-slot kernels need no sync
        compute_s = r["decode_s_per_token"]
        out["gpu_only"] = r
        log(f"{shape} {bits}: all resident {r['decode_tok_s']:.1f} tok/s")
        model = None
        free()
    except Exception as e:
        out["gpu_only"] = {"error": repr(e)}
        traceback.print_exc()
    save()
    bw = getattr(args, "h2d", 55e9)
    for share in args.compressed_budgets:
        key = f"budget_{int(share * 100)}pct"
        budget = res.get(key, {}).get("budget_bytes") or budget_bytes(
            share, args.small, cfg, res["model_bytes"], res["expert_bytes_total"], context, device)
        row = out.setdefault(key, {"budget_bytes": budget})
        for predictor in ("none", "speculative"):
            try:
                free()
                config = OffloadConfig(device_memory=budget, predictor=predictor, cache_policy=args.policy,
                                       context_tokens=context, misses="fetch")  # the predictors' rows fetch
                model = load_offloaded(folder_c, device=device, dtype=dtype, offload=config, host_layers=stored)
                runtime = model.offload
                run_generate(model, ids, 2)
                runtime.calls.clear()
                runtime.cache.synchronize()
                runtime.reset_stats()
                r = run_generate(model, ids, args.tokens)
                rep = runtime.report()
                offload_row(r, rep, budget, bw, compute_s)
                r["slot_layout"] = runtime.layout.describe()
                row[predictor] = r
                log(f"{shape} {bits} {key} {predictor}: {r['decode_tok_s']:.2f} tok/s (ceiling {r['ceiling_tok_s'] or 0:.2f}), "
                    f"{r['cache_slots']} of {rep['plan']['total_experts']} experts cached, hit {r['hit_rate']:.2f}, "
                    f"{r['pcie_bytes_per_token'] / 1e6:.1f} MB/token, peak {r['peak_bytes'] / 1e9:.2f} of {budget / 1e9:.2f} GB")
                model = runtime = None
                free()
            except Exception as e:
                row[predictor] = {"error": repr(e)}
                traceback.print_exc()
            save()


def hf_model_over_host(hf_cfg, folder: Path, host: list) -> "torch.nn.Module":
    """Returns a transformers model of `hf_cfg` whose experts are the page-locked host stacks `host`
    (shared, not copied) and whose other weights come from folder/model.safetensors (random where
    a name or shape does not match); rope buffers rebuilt; eval mode."""
    import transformers
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    state = load_file(str(folder / "model.safetensors"))  # moekit names = HF v4 names
    named = dict(model.named_parameters())
    values = {}
    for name, p in named.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            layer = int(name.split(".")[2])
            t = host[layer]["gate_up" if name.endswith("gate_up_proj") else "down"]
            values[name] = t if tuple(t.shape) == tuple(p.shape) else torch.zeros(p.shape, dtype=torch.bfloat16)
        else:
            src = state.get(name)
            if src is None:
                src = state.get(name.replace(".mlp.gate.", ".block_sparse_moe.gate."))
            values[name] = src if src is not None and tuple(src.shape) == tuple(p.shape) else (
                torch.randn(p.shape, dtype=torch.bfloat16) * 0.02)
    model.load_state_dict(values, assign=True, strict=False)
    for name, module in list(model.named_modules()):  # buffers (rope frequencies) are still meta
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(config=hf_cfg))
    model.tie_weights()
    model.eval()
    return model


def bench_hf(shape, args, device, host, folder, budget, ids, hf_cfg=None):
    """transformers + accelerate device_map='auto' with max_memory={gpu: budget}: a few tokens, time-boxed
    (`hf_cfg`: the transformers config, default this file's SHAPES[shape])."""
    import transformers

    hf_cfg = hf_cfg if hf_cfg is not None else hf_config(shape, args.small)
    model = hf_model_over_host(hf_cfg, folder, host)
    result = {}
    if device.type == "cuda":
        from accelerate import dispatch_model, infer_auto_device_map

        max_memory = {0: budget, "cpu": 200 * 2**30}
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=[type(model.model.layers[0]).__name__])
        model = dispatch_model(model, device_map=device_map)
        result["layers_on_gpu"] = sum(1 for k, v in device_map.items() if v == 0 and ".layers." in k)
        torch.cuda.reset_peak_memory_stats()
    ids = ids.to(device)
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=1, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))
        sync(device)
        ttft = time.perf_counter() - t0
        n = args.hf_tokens if ttft < 2 / 0.5 else 2  # slower than ~0.5 tok/s: a few tokens only
        gen.max_new_tokens, gen.min_new_tokens = n, n
        t0 = time.perf_counter()
        model.generate(ids, generation_config=gen, attention_mask=torch.ones_like(ids))
        sync(device)
        total = time.perf_counter() - t0
    result.update(ttft_s=ttft, tokens=n, total_s=total,
                  peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None)
    if total > ttft:  # decode time = the n-token run minus the 1-token run (two separate runs)
        result["decode_tok_s"] = max(n - 1, 1) / (total - ttft)
    else:  # on a noisy machine the longer run can take less time: no figure rather than a wrong one
        result["error"] = f"timing noise: {n} tokens took {total:.3f} s, 1 token {ttft:.3f} s"
    model = None
    free()
    return result


def table(results) -> str:
    rows = ["| shape | budget | engine | tok/s | ceiling tok/s | % of ceiling | TTFT ms | hit rate | prefetch P/R | MB/token (PCIe + CPU) | peak GB / budget GB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    names = ["none", "speculative", "oracle", *(f"{m}_{p}" for m, p in MISS_ROWS), "hf_accelerate"]
    for shape, res in results.get("shapes", {}).items():
        g = res.get("gpu_only", {})
        if "decode_tok_s" in g:
            rows.append(f"| {shape} | all resident | GPU-only | {g['decode_tok_s']:.1f} | | | {g['ttft_s'] * 1e3:.0f} | | | | "
                        f"{(g.get('peak_bytes') or 0) / 1e9:.1f} |")
        for key, out in res.items():
            if not key.startswith("budget_"):
                continue
            b = out["budget_bytes"] / 1e9
            for name in names:
                r = out.get(name)
                if r is None:  # not run (--skip-hf, --misses)
                    continue
                if "decode_tok_s" not in r:
                    rows.append(f"| {shape} | {key[7:]} | {name} | error | | | | | | | |")
                    continue
                if name == "hf_accelerate":
                    rows.append(f"| {shape} | {key[7:]} | transformers+accelerate | {r['decode_tok_s']:.3f} | | | "
                                f"{r['ttft_s'] * 1e3:.0f} | | | | {(r.get('peak_bytes') or 0) / 1e9:.1f} / {b:.1f} |")
                    continue
                ceil = r.get("ceiling_tok_s") or 0
                engine, mb = f"moekit {name}", f"{r['pcie_bytes_per_token'] / 1e6:.0f}"
                if "misses" in r:  # "PCIe MB + CPU MB" per token; the label says what actually ran
                    misses, predictor = name.split("_", 1)
                    used = "" if r["misses_used"] == r["misses"] else f", ran {r['misses_used']}"
                    engine = f"moekit {MISS_LABELS[misses]} ({predictor}{used})"
                    if misses != "mapped":
                        mb += f" + {r['cpu_bytes_per_token'] / 1e6:.0f} CPU"
                rows.append(f"| {shape} | {key[7:]} | {engine} | {r['decode_tok_s']:.2f} | {ceil:.2f} | "
                            f"{100 * (r.get('share_of_ceiling') or 0):.0f}% | {r['ttft_s'] * 1e3:.0f} | {r['hit_rate']:.2f} | "
                            f"{r['prefetch_precision']:.2f}/{r['prefetch_recall']:.2f} | {mb} | "
                            f"{r['peak_bytes'] / 1e9:.2f} / {b:.2f} |")
    for shape, res in results.get("shapes", {}).items():  # compressed experts, offloaded as stored
        for ckey, cres in res.items():
            if not ckey.startswith("compressed_"):
                continue
            bits = ckey[len("compressed_"):]
            label = f"{bits} RTN, {cres.get('bits_per_expert_param', 0):.2f} bits/param"
            g = cres.get("gpu_only", {})
            if "decode_tok_s" in g:
                rows.append(f"| {shape} | all resident | GPU-only ({label}) | {g['decode_tok_s']:.1f} | | | "
                            f"{g['ttft_s'] * 1e3:.0f} | | | | {(g.get('peak_bytes') or 0) / 1e9:.1f} |")
            for key, out in cres.items():
                if not key.startswith("budget_"):
                    continue
                b = out["budget_bytes"] / 1e9
                for name in ("none", "speculative"):
                    r = out.get(name)
                    if r is None:
                        continue
                    if "decode_tok_s" not in r:
                        rows.append(f"| {shape} | {key[7:]} | moekit {name} ({label}) | error | | | | | | | |")
                        continue
                    rows.append(f"| {shape} | {key[7:]} | moekit {name} ({label}, {r['cache_slots']} slots) | "
                                f"{r['decode_tok_s']:.2f} | {r.get('ceiling_tok_s') or 0:.2f} | "
                                f"{100 * (r.get('share_of_ceiling') or 0):.0f}% | {r['ttft_s'] * 1e3:.0f} | {r['hit_rate']:.2f} | "
                                f"{r['prefetch_precision']:.2f}/{r['prefetch_recall']:.2f} | {r['pcie_bytes_per_token'] / 1e6:.1f} | "
                                f"{r['peak_bytes'] / 1e9:.2f} / {b:.2f} |")
    p = results.get("pregate_bundled")
    if p and "recall" in p:
        rows.append("")
        rows.append("prefetch recall on the bundled tiny MoE (held-out text, offloaded decode): " +
                    ", ".join(f"{k} {v:.2f}" for k, v in p["recall"].items()))
    return "\n".join(rows)


def bench_pregate(device, results, save, max_tokens=32768, steps=300):
    """Predictor accuracy on a model trained by the project's own code (the bundled tiny MoE)."""
    import sysconfig

    from moekit.offload.pregate import save_pregates, train_pregates

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = moekit.load_tokenizer()
    train_text = "\n".join((stdlib / n).read_text() for n in ("json/decoder.py", "textwrap.py", "shlex.py", "argparse.py"))
    test_ids = torch.tensor(tok.encode((stdlib / "string.py").read_text(), add_special_tokens=False)[:64])[None]
    model = moekit.load_model(device=device)
    t0 = time.perf_counter()
    weights, report = train_pregates(model, torch.tensor(tok.encode(train_text, add_special_tokens=False)[:max_tokens]),
                                     steps=steps)
    folder = save_pregates(weights, model.config, Path(results["tmp"]) / "pregate", report, overwrite=True)
    out = {"train_s": time.perf_counter() - t0, "tokens": report.tokens, "layers": report.layers, "recall": {},
           "hit_rate": {}}
    trace = None
    for predictor in ("none", "speculative", "pregate", "oracle"):
        config = OffloadConfig(device_memory=None if device.type == "cuda" else 10**7, predictor=predictor,
                               context_tokens=128, pregate_path=str(folder), record_routing=predictor == "none",
                               misses="fetch")  # prediction quality as fetched prefetches see it
        m = load_offloaded(device=device, dtype=torch.bfloat16, offload=OffloadConfig(
            **{**config.to_dict(), "device_memory": model_bytes_share(model, 0.5, device)}), trace=trace)
        m.generate(test_ids, max_new_tokens=48, temperature=0, eos_token_ids=())
        rep = m.offload.report()
        if predictor == "none":
            trace = m.offload.trace
        out["recall"][predictor] = rep["prefetch_recall"]
        out["hit_rate"][predictor] = rep["hit_rate"]
    results["pregate_bundled"] = out
    log(f"bundled tiny MoE prefetch recall: {out['recall']}, hit rate {out['hit_rate']}")
    save()


def model_bytes_share(model, share, device) -> int:
    """Returns a budget of the non-expert weights + KV + reserve + `share` of the expert bytes."""
    from moekit.experts.forms import DenseForm
    from moekit.offload.planner import CUDA_RESERVE_BYTES, activation_bytes, kv_cache_bytes, resident_bytes

    cfg = model.config
    expert = DenseForm(cfg.hidden_size, cfg.expert_ffn, torch.bfloat16).expert_bytes(0)
    fixed = (resident_bytes(cfg, torch.bfloat16) + kv_cache_bytes(cfg, torch.bfloat16, 1, 128)
             + activation_bytes(cfg, torch.bfloat16, 128, 1) + (CUDA_RESERVE_BYTES if device.type == "cuda" else expert))
    return fixed + int(share * sum(cfg.moe_layers) * cfg.num_experts) * expert


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_output_args(parser, "bench_offload")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke test)")
    parser.add_argument("--shape", default="all", choices=("all", *SHAPES))
    parser.add_argument("--budgets", default="0.25,0.10", help="shares of the model's bytes (\"\" for none: e.g. compressed rows only)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="tokens generated per moekit run")
    parser.add_argument("--hf-tokens", type=int, default=4, help="tokens for transformers+accelerate")
    parser.add_argument("--policy", default="lfu", choices=("lru", "lfu"))
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--host-embedding", default="on", choices=("on", "off"),
                        help="keep an untied input embedding table in host memory (OffloadConfig.host_embedding)")
    parser.add_argument("--skip-pregate", action="store_true")
    parser.add_argument("--tmp", default="/tmp/moekit_bench_offload")
    parser.add_argument("--compressed-bits", default="",
                        help="also offload the experts compressed (RTN): ternary, 4 or both ('ternary,4'); default off")
    parser.add_argument("--compressed-budgets", default="0.10", help="shares of the bf16 model's bytes for those rows")
    parser.add_argument("--misses", default="fetch,cpu,auto",
                        help="which offloaded rows run: fetch (none/speculative/oracle), cpu, auto, mapped "
                             "(default: fetch,cpu,auto)")
    parser.add_argument("--fetch-predictors", default="none,speculative,oracle",
                        help="the fetch rows' predictors (oracle replays the none row's routing: it needs none)")
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="torch intra-op threads (default: the CPUs this process may use)")
    args = parser.parse_args()
    args.misses = [m for m in args.misses.split(",") if m]
    args.fetch_predictors = [f for f in args.fetch_predictors.split(",") if f]
    for f in args.fetch_predictors:
        if f not in ("none", "speculative", "oracle"):
            parser.error(f"--fetch-predictors: {f!r} is not one of none, speculative, oracle")
    if "oracle" in args.fetch_predictors and "none" not in args.fetch_predictors:
        parser.error("--fetch-predictors: oracle replays the routing the none row records; add none")
    for m in args.misses:
        if m not in ("fetch", "cpu", "auto", "mapped"):
            parser.error(f"--misses: {m!r} is not one of fetch, cpu, auto, mapped")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.cpu_threads or cores)
    args.budgets = [float(b) for b in args.budgets.split(",") if b]  # "" runs no bf16 budget rows
    args.compressed_bits = [b for b in args.compressed_bits.split(",") if b]
    args.compressed_budgets = [float(b) for b in args.compressed_budgets.split(",")]
    for bits in args.compressed_bits:
        if bits not in ("ternary", "2", "3", "4"):
            parser.error(f"--compressed-bits: {bits!r} is not one of ternary, 2, 3, 4")
    device = torch.device(args.device)
    meta = common.run_meta(args, device)
    results = {"device": common.device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "args": {k: v for k, v in vars(args).items()},
               "command": meta["command"], "tmp": args.tmp, "started": meta["date"],
               "cpu_threads": torch.get_num_threads(), "cpus_usable": cores, "cpu_count": os.cpu_count(),
               "commit": meta["commit"], "dirty": meta["dirty"], "meta": meta}

    def save():
        common.write_json(results, args.out, "bench_offload")

    results["h2d_bytes_per_s"] = args.h2d = h2d_bandwidth(device)
    log(f"pinned host-to-device: {results['h2d_bytes_per_s'] / 1e9:.1f} GB/s")
    save()
    if not args.skip_pregate:
        try:
            bench_pregate(device, results, save, *((4096, 60) if args.small else ()))
        except Exception as e:
            results["pregate_bundled"] = {"error": repr(e)}
            traceback.print_exc()
            save()
    for shape in (SHAPES if args.shape == "all" else [args.shape]):
        try:
            bench_shape(shape, args, device, results, save)
        except Exception as e:
            results.setdefault("shapes", {}).setdefault(shape, {})["error"] = repr(e)
            traceback.print_exc()
        save()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
