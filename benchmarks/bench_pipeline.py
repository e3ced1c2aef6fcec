"""Batch throughput of the MoE-Lightning pipeline (issue 14), BENCH.md's "batch throughput" row.

    PYTHONPATH=src python3 benchmarks/bench_pipeline.py --out $OUT                          # H200, <= 9 min
    PYTHONPATH=src python3 benchmarks/bench_pipeline.py --small --device cpu --out /tmp/bp  # CPU, 20-45 s

(both from the repository root; --out defaults to $OUT, else benchmarks/results)

A Mixtral-8x7B-shaped model (hidden 4096, expert ffn 14336, 8 experts top-2, 32/8 heads, vocab
32000; random bf16 weights) cut to `--layers` layers (default 8: 22.5 GB of experts, more than the
16 GiB budget, so experts must stream) runs under a 16 GiB device budget. The experts are made in
page-locked host memory (no checkpoint; only the 1.2 GB of non-expert weights go through one in
--tmp) and shared by every row. Prompts are MTBench-like: lengths drawn from a log-normal clipped
to [4, 418], mean ~77 (80 over the first 512) and one prompt of 418 (the JSON records the drawn mean
and max; the HRM plans for that mean).

Rows, each with the allocator's peak (torch.cuda.max_memory_allocated) next to the budget:

- pipeline gen 32 / 128 / 256: the HRM's policy (moekit.pipeline.hrm.search on this machine's
  measured levels, planned within 16 GiB less --plan-margin-gib 0.5, N at most --max-sequences,
  attention on the CPU) run by moekit.pipeline.batch.
  run_plan (paged experts, CGOPipe decode, zig-zag prefill): generated tok/s over prefill + decode,
  next to the HRM's prediction for the same policy and machine, the PCIe ceiling N * measured
  H2D / streamed expert bytes per step, and the CPU-attention ceiling (the native kernel's
  measured KV bytes/s / KV bytes a token reads at the mean context s + n / 2).
  Each pipeline row also records `step_breakdown` (run_plan(profile=True), the first decode step
  left out): ms per step of the launch thread blocked on CPU-attention results and issuing, the
  attention worker attending and waiting for q/k/v; on CUDA the compute stream's step and
  per-layer times, each MoE layer's weight-page span on the weight stream and its GB/s (near the
  measured H2D: the pages stream back to back), and the attention-output loads' ms (LoadH: a mean
  well above ~0.02 ms means they queue behind weight pages on the copy engine); next to the HRM's
  per-layer h2d/cpu/gpu terms and the PCIe step (streamed bytes / measured H2D). And
  `prefill_breakdown` (logged per row, the warm-up's with its Triton builds): the prefill's host
  parts (pool allocation, setup, issue, KV wait / store) and on CUDA the device's per-layer spans,
  their achieved TFLOP/s next to the GEMM rate the HRM assumes, and the time outside them.
- offload engine: moekit.offload.load_offloaded(OffloadConfig(device_memory=16 GiB, batch=B)) and
  model.generate on a list of B prompts, gen --offload-gen, at each B of --offload-batches; the
  best B is marked.
- transformers + accelerate at each batch of --hf-batches (default 8 and 32; device_map from
  infer_auto_device_map with max_memory 16 GiB, left-padded prompts), a few tokens, each time-capped
  (--hf-cap-s); skipped with a reason
  when the time left is short.
- pipeline ternary / int4 (--compressed, default "ternary,4"; gen --compressed-gen, default 32, or a
  comma-separated list, one row each): the
  same bf16 experts rounded to nearest on the device (RTN as bench_offload's --compressed-bits:
  the ternary code per row, int4 in groups of 128; seconds), their stored tensors back in host
  memory, then paged in that stored form (moekit.pipeline.paged: pages carry the packed bytes,
  the form's kernels compute from the slab) under the HRM's policy for that form
  (hrm.form_costs: the form's bytes per expert for PCIe and memory, its kernels' GPU cost), N at
  most --compressed-max-sequences. Each row records the form's bits per weight, the HRM's
  prediction, the PCIe ceiling (N * H2D / the form's streamed bytes per step), the CPU-attention
  ceiling, and its tok/s over the bf16 rows' (issue 14: ternary >= 3x bf16). A warm-up (the
  plan's micro-batches, two tokens) builds each form's kernels first. Past the per-slot kernels
  (more than 16 routed slots: every prefill micro-batch and these decode micro-batches) the paged
  runtime decodes a layer's experts once into a dense bf16 workspace (2.8 GB at this shape) and
  runs each micro-batch through the grouped dense kernels, with no host sync. The HRM's plans
  with the H200 levels of the last run (f472762's machine, 15.5 GiB, N <= 512; no expert-kernel
  or shared-host level measured then): bf16 N=512 mu=32 R=4, 2463 tok/s at gen 32 on the PCIe
  roof; ternary and int4 N=490 mu=245 (two micro-batches, so CPU attention overlaps the GPU),
  13.4k tok/s at gen 32, bound by the GPU's reads of the decoded workspace.

Order and expected seconds on the H200 (--time-budget-s 520 from the start; one call of the device
tool, which allows 600 s): build ~25 (22.5 GB of pinned experts), machine profile ~20 (host levels,
GPU levels, the shared host rate -- a pinned copy and 14 CPU threads reading host memory at once --
the grouped expert kernels' weight bytes/s at 16..256 tokens and their prefill FLOP/s at 1024..16384;
the HRM plans with them; after
each warm-up, timeline.launch_task_seconds: the launch thread's host seconds per (layer,
micro-batch) task with the device idle, which the later plans of that form count too),
pipeline warm-up ~10 (Triton builds), gen 32 ~20, gen 128 ~55 (the last run's N=512, mu=32, 4 of 8
experts resident: ~0.38 s a decode step), ternary ~45 (RTN ~33, warm-up, gen 32) and int4 ~20 (RTN
~7), each skipped when fewer than --compressed-min-s seconds are left, transformers+accelerate ~40
(before the offload rows: it was skipped for them twice), offload engine batch 64 ~40 and 256 ~60,
pipeline gen 256 ~105 last: ~440 s in all. Every row's exception is recorded with its traceback
tail; rows not started within --time-budget-s (or predicted not to finish within it) are recorded as
skipped with the reason; the JSON (bench_pipeline.json) is rewritten after every row and the short
table is printed last, with each pipeline row's decode step breakdown: the launch thread's issuing
split into PreAttn+D2H / LoadH / pages / PostAttn, and the expert calls' own GPU time next to the
HRM's GPU term.

CGOPipe's tasks run as CUDA graphs by default (moekit.pipeline.graphs: PreAttn and PostAttn one
replay each; MOEKIT_PIPELINE_GRAPHS=0 for eager); --graphs both runs each pipeline row twice, with
graphs and eager (marked [graphs off]), same plan, so the launch thread's issuing is compared in
one run. A short check of the graphs (bf16 gen 32 and ternary gen 32, ~150 s):

    PYTHONPATH=src python3 benchmarks/bench_pipeline.py --out $OUT --gen 32 --compressed ternary \
        --offload-batches '' --skip-hf --graphs both --time-budget-s 140

All 32 layers of Mixtral-8x7B (the issue's goal is counted there): 90 GB of bf16 experts pinned in
the H200 machine's 128 GiB (126 GB) of host memory, plus the KV cache (N=512 at ~210 positions:
14 GB) -- it fits with the compressed rows and the baselines left out (the rounded forms and the
transformers model would hold more copies of the experts). One call, ~500 s:

    PYTHONPATH=src python3 benchmarks/bench_pipeline.py --out $OUT --layers 32 --gen 32,128 \
        --compressed '' --offload-batches '' --skip-hf --time-budget-s 540

Every plan holds the host memory available when it is made (plus the expert store it counts,
allocated already) less max(4 GiB, 5%) -- machine.free_host_budget, as `moekit batch` plans -- so
with --max-sequences 1024 the bf16 rows may take N past 512 where the KV fits.

(build ~100 s, gen 32 ~60 s and gen 128 ~4 x the 8-layer step: ~200 s). The script refuses a
--layers whose experts would not fit in 85% of host memory. The compressed forms of all 32 layers
(ternary ~6 GB, int4 ~24 GB) fit where the bf16 experts would not beside them: --forms-only draws
each layer's bf16 experts on the device and rounds them there, and --bf16-from names the earlier
run whose bf16 rows the forms are compared with (issue 14: ternary >= 3x bf16 at gen 128):

    PYTHONPATH=src python3 benchmarks/bench_pipeline.py --out $OUT --layers 32 --forms-only \
        --bf16-from benchmarks/results/bench_pipeline_32l_c8f8092.json --compressed ternary,4 \
        --compressed-gen 128 --compressed-max-sequences 1024 --time-budget-s 540
 Shape legend: L layers, D hidden, I expert ffn, E experts, N sequences, mu micro-batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import common  # also puts src/ on sys.path when moekit is not importable
import torch
from common import free_memory, log, sync
from random_checkpoint import device_rand, non_expert_tensors
from tables import policy_label

NAME_OF = {"ternary": "ternary code", "4": "int4", "3": "int3", "2": "int2"}

NAME = "bench_pipeline"
GiB = 2**30
SHAPES = {  # BENCH.md's mixtral-8x7b, and a toy of it for the CPU
    "mixtral-8x7b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000},
    "small": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
              "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 1000},
}
MTBENCH_MEAN, MTBENCH_MAX = 77, 418  # MoE-Lightning Tab. 3


# ---- the model: non-expert weights in a checkpoint, experts in pinned host memory ----------------

class DrawnExperts:
    """{layer: {gate_up, down}} of random bf16 experts drawn on the device when asked for (each layer
    from its own seed, so every form rounds the same weights), never held in host memory:
    --forms-only's stand-in for the pinned bf16 experts."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device

    def __len__(self) -> int:
        return self.cfg.num_layers

    def __getitem__(self, i: int) -> dict:
        d, e, ffn = self.cfg.hidden_size, self.cfg.num_experts, self.cfg.expert_ffn
        gen = torch.Generator(device=self.device).manual_seed(1000 + i)
        return {name: torch.randn(shp, generator=gen, device=self.device, dtype=torch.bfloat16) * 0.02
                for name, shp in (("gate_up", (e, 2 * ffn, d)), ("down", (e, d, ffn)))}

    def items(self):
        return ((i, self[i]) for i in range(len(self)))


def build(shape: str, layers: int, device: torch.device, root: Path, pinned: bool = True):
    """Returns (checkpoint folder of the non-expert weights, moekit ModelConfig, {layer: {gate_up
    [E, 2I, D], down [E, D, I]}} in page-locked host memory on a GPU machine, or, with `pinned`
    False, a DrawnExperts that draws them on the device when asked)."""
    import transformers
    from safetensors.torch import save_file

    from moekit.families import family_for
    from moekit.offload.layout import pinned_empty

    sizes = SHAPES[shape]
    expert_bytes = layers * sizes["num_local_experts"] * 3 * sizes["hidden_size"] * sizes["intermediate_size"] * 2
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if pinned and expert_bytes > 0.85 * host_bytes:
        raise SystemExit(f"--layers {layers}: {expert_bytes / 1e9:.1f} GB of bf16 experts would not fit in 85% of this "
                         f"machine's {host_bytes / 1e9:.1f} GB of host memory beside the KV cache; use fewer layers")
    hf = transformers.MixtralConfig(**SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=4096,
                                    torch_dtype="bfloat16")
    folder = root / f"{shape}-{layers}l"
    folder.mkdir(parents=True, exist_ok=True)
    data = hf.to_dict()
    data["architectures"] = ["MixtralForCausalLM"]
    (folder / "config.json").write_text(json.dumps(data))
    family = family_for(data, where=str(folder))
    cfg = family.config(data)
    gen = torch.Generator(device=device).manual_seed(0)
    save_file(non_expert_tensors(family, cfg, device_rand(device, generator=gen)), str(folder / "model.safetensors"))
    if not pinned:
        return folder, cfg, DrawnExperts(cfg, device), hf
    host = {}
    d, e, ffn = cfg.hidden_size, cfg.num_experts, cfg.expert_ffn
    for i in range(cfg.num_layers):  # drawn on the device, copied once into page-locked memory
        layer = {}
        for name, shp in (("gate_up", (e, 2 * ffn, d)), ("down", (e, d, ffn))):
            t = pinned_empty(shp, torch.bfloat16) if device.type == "cuda" else torch.empty(shp, dtype=torch.bfloat16)
            for j in range(e):
                t[j].copy_(torch.randn(shp[1:], generator=gen, device=device, dtype=torch.bfloat16) * 0.02)
            layer[name] = t
        host[i] = layer
    return folder, cfg, host, hf


def mtbench_lengths(count: int, seed: int = 0) -> list[int]:
    """Returns `count` prompt lengths like MTBench's (mean ~77, max 418): a log-normal clipped to
    [4, 418], the first one 418."""
    g = torch.Generator().manual_seed(seed)
    sigma = 0.75
    mu = math.log(MTBENCH_MEAN) - sigma ** 2 / 2
    lengths = torch.exp(mu + sigma * torch.randn(count, generator=g)).round().clamp(4, MTBENCH_MAX).int().tolist()
    lengths[0] = MTBENCH_MAX
    return lengths


def prompts_of(lengths: list[int], vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- the machine and the HRM ----------------------------------------------------------------------

CALIBRATION_TOKENS = 5  # the attention calibration run's tokens: 4 decode steps, the first left out of the profile
EXPERT_PROBE_TOKENS = (16, 32, 64, 128, 256)  # micro-batch sizes the grouped expert kernels are timed at
# prefill micro-batches' packed tokens the grouped kernels' FLOP/s is timed at; the HRM takes 2560:
# 32 prompts of ~80 tokens, the prefill micro-batch of its bf16 plans on the H200 (N=512, mu=32)
# -- 640 slots an expert, which takes triton_ops.PREFILL_TILES (from 320 slots an expert on)
PREFILL_PROBE_TOKENS, PREFILL_LEVEL_TOKENS = (1024, 2560, 4096, 16384), 2560


def measure_machine(device: torch.device, small: bool, cfg, probes: dict):
    """Returns the HRM's Machine: host levels measured here; GPU levels measured on CUDA (with the
    shared host rate -- the DMA and the CPU reading at once -- and the grouped expert kernels' weight
    bytes/s at this shape, 32 tokens a call, and their prefill FLOP/s at PREFILL_LEVEL_TOKENS tokens),
    else the H200 preset (a CPU run only checks that the script works). `probes` receives the
    shared-rate parts, the expert rate at each of EXPERT_PROBE_TOKENS and the prefill rate at each
    of PREFILL_PROBE_TOKENS."""
    from moekit.pipeline.machine import (
        PRESETS,
        Machine,
        profile_experts,
        profile_gpu,
        profile_host,
        profile_prefill_experts,
        profile_shared,
    )

    levels = profile_host(quick=small)
    if device.type == "cuda":
        levels.update(profile_gpu(str(device)))
        try:
            shared = profile_shared(str(device))
            probes["shared"] = shared
            levels["host_shared_bandwidth"] = shared["host_shared_bandwidth"]
        except Exception as e:  # noqa: BLE001 -- the HRM falls back to the CPU's own read rate
            probes["shared_error"] = f"{type(e).__name__}: {e}"
        try:
            rates = {t: profile_experts(cfg.hidden_size, cfg.expert_ffn, cfg.num_experts, cfg.top_k, t, str(device))
                     for t in EXPERT_PROBE_TOKENS}
            probes["expert_bytes_per_s"] = rates
            levels["expert_bandwidth"] = rates[32]
        except Exception as e:  # noqa: BLE001
            probes["expert_error"] = f"{type(e).__name__}: {e}"
        try:  # without it the HRM prices the prefill's experts at the GEMM peak (3.5x short on ef150b8)
            flops = {t: profile_prefill_experts(cfg.hidden_size, cfg.expert_ffn, cfg.num_experts, cfg.top_k, t,
                                                str(device)) for t in PREFILL_PROBE_TOKENS}
            probes["prefill_expert_flops"] = flops
            levels["prefill_expert_flops"] = flops[PREFILL_LEVEL_TOKENS]
        except Exception as e:  # noqa: BLE001
            probes["prefill_expert_error"] = f"{type(e).__name__}: {e}"
        free_memory(device)
        return Machine(name=common.device_name(device), **levels)
    return PRESETS["h200"].merged(Machine(name="cpu", **levels))


def plan_for(costs, machine, gen_len: int, prompt_len: int, budget: int, max_sequences: int, held: int):
    """Returns the HRM's plan with CPU attention within the device budget and the host memory
    available now (plus `held`: the part of the expert store the plan counts that is allocated
    already) less a reserve, as `moekit batch` plans (machine.free_host_budget)."""
    from moekit.pipeline.hrm import Workload, search
    from moekit.pipeline.machine import free_host_budget

    return search(costs, machine, Workload(prompt_len, gen_len, num_prompts=max_sequences), device_budget=budget,
                  host_budget=free_host_budget(held=held), attention=("cpu",))


def held_store_bytes(costs, form: dict | None) -> int:
    """Returns the bytes of the store the HRM counts that exist already when a row is planned: the
    bf16 rows page the pinned host experts as they are (TensorLayout keeps them); a compressed
    form's rows pack its stored tensors into a new pinned store when the model loads, after the
    plan (the stored tensors stay allocated beside it), so none of theirs."""
    return 0 if form else int(costs.total_expert_bytes)


def roofline_picture(out: str, label: str, gen_len: int, machine, costs, plan, workload) -> str | None:
    """Writes the plan's hierarchical roofline (moekit plan --plot's SVG) as OUT/roofline_<label>_gen<N>.svg
    and returns its file name (None where it could not be written: the row is kept either way)."""
    from moekit.pipeline.cli import write_plot

    name = f"roofline_{label.replace(' ', '_')}_gen{gen_len}.svg"
    try:
        write_plot(Path(out) / name, machine, costs, plan, workload,
                   f"{label}, gen {gen_len}: {plan.tok_s:.0f} tok/s predicted ({plan.bound})")
    except Exception as e:  # noqa: BLE001 -- a picture must not cost the row
        log(f"{name}: not written ({type(e).__name__}: {e})")
        return None
    return name


def attention_ceiling(costs, machine, prompt_len: float, gen_len: int) -> float | None:
    """Returns the CPU-attention ceiling (tok/s): the kernel's KV bytes/s (the host's read bytes/s
    where the native kernel is missing) over the KV bytes one token reads at s + n / 2."""
    rate = machine.cpu_attention_bandwidth or machine.host_bandwidth
    per_token = costs.kv_bytes_per_token * costs.num_layers * costs.attended(prompt_len + gen_len / 2)
    return rate / per_token if rate and per_token else None


# ---- rows ----------------------------------------------------------------------------------------

def peak_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def error_row(row: dict, e: BaseException) -> dict:
    row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:])
    return row


class PagedModels:
    """One paged model at a time, reloaded only when a plan keeps another resident count."""

    def __init__(self, folder, host, device, dtype):
        self.folder, self.host, self.device, self.dtype = folder, host, device, dtype
        self.model, self.resident = None, None

    def get(self, resident: int):
        from moekit.pipeline.batch import load_paged

        if self.resident != resident:
            self.model = None
            free_memory(self.device)
            self.model = load_paged(self.folder, resident, self.device, self.dtype, self.host)
            self.resident = resident
        return self.model

    def drop(self) -> None:
        self.model, self.resident = None, None
        free_memory(self.device)


class OutOfTime(Exception):
    """A row stopped by the time guard (after the prefill or a decode step)."""


def pipeline_row(models: PagedModels, plan, prompts, gen_len, h2d, budget, device, deadline: float,
                 attention_threads: int | None = None, graphs: bool | None = None) -> dict:
    """Runs the plan with run_plan and returns its row: tok/s next to the HRM, PCIe and CPU-attention
    ceilings, the allocator's peak next to the budget. `graphs`: the tasks as CUDA graphs or eager
    (None: the engine's default, MOEKIT_PIPELINE_GRAPHS)."""
    from moekit.pipeline.batch import resident_experts, run_plan

    resident = resident_experts(models.folder, plan)
    reset_peak(device)
    model = models.get(resident)
    t0 = time.perf_counter()

    def guard(tokens: int) -> None:
        if time.perf_counter() > deadline:
            raise OutOfTime(f"stopped at {tokens} of {gen_len} tokens after {time.perf_counter() - t0:.0f} s: "
                            "past --time-budget-s")

    r = run_plan(models.folder, plan, prompts, gen_len, device=str(device), dtype=models.dtype, h2d_bandwidth=h2d,
                 model=model, on_step=guard, profile=True, attention_threads=attention_threads, graphs=graphs)
    out = r.to_dict()
    out.pop("tokens")
    out["step_breakdown"] = step_breakdown(r.step_profile, plan, r.streamed_bytes_per_step, h2d)
    out.update(status="ok", seconds=time.perf_counter() - t0, peak_bytes=peak_bytes(device),
               decode_step_s=r.decode_s / max(gen_len - 1, 1), prompt_lengths_mean=r.prompt_tokens / r.sequences,
               report=model.expert_runtime.report())
    return out


def step_breakdown(profile: dict | None, plan, streamed_bytes: int, h2d: float) -> dict | None:
    """Returns where a decode step went (run_plan's step profile, first step left out) next to the
    HRM's per-layer terms: the launch thread's time blocked on CPU-attention results and issuing,
    the worker's attention time, and on CUDA the compute stream's step and per-layer times, each
    MoE layer's weight-page span (first page start to last page end on the weight stream) and its
    GB/s next to the measured H2D, and the attention-output loads (a mean far above ~0.02 ms
    means they queue behind weight pages on the copy engine)."""
    if not profile or not profile.get("steps"):
        return None
    layers = len(profile.get("layer_ms") or [])
    out = dict(profile)
    out.pop("last_step_copies", None)
    hrm = plan.layer
    out["hrm_layer_ms"] = {"h2d": 1e3 * hrm.h2d, "cpu": 1e3 * hrm.cpu, "gpu": 1e3 * hrm.gpu, "launch": 1e3 * hrm.launch,
                           "max": 1e3 * hrm.time}
    out["hrm_step_ms"] = 1e3 * plan.decode_step_s
    out["hrm_gpu_step_ms"] = 1e3 * hrm.gpu * len(profile.get("layer_ms") or []) if profile.get("layer_ms") else None
    out["pcie_step_ms"] = 1e3 * streamed_bytes / h2d if h2d else None  # the streamed bytes at the measured H2D
    if layers:
        out["layer_ms_mean"] = sum(profile["layer_ms"]) / layers
    out["last_step_copies"] = profile.get("last_step_copies")
    return out


def prefill_breakdown(prefill: dict | None, plan, costs, tokens: int, gpu_flops: float) -> dict | None:
    """Returns where a row's prefill went (run_plan's profile.prefill, prefill.prefill_timings)
    next to the HRM's: the host pool's allocation (its pages are first touched by the per-layer
    stores, overlapped), the host's setup, issue, KV wait and store seconds; on CUDA the device's
    per-layer spans, the part of the prefill outside them, the layers' achieved FLOP/s (the
    experts' and the other matmuls' FLOPs of every prompt token) next to the measured GEMM rate
    the HRM assumes (Machine.gpu_flops), and the KV D2H copies."""
    if not prefill:
        return None
    out = {k: prefill.get(k) for k in ("total_s", "host_cache_s", "setup_s", "issue_s", "kv_wait_s", "kv_store_s")}
    out["hrm_s"] = plan.prefill_s
    layer_ms = prefill.get("layer_ms")
    if layer_ms:
        layers_s = sum(layer_ms) / 1e3
        flops = tokens * (costs.top_k * costs.expert_flops * costs.moe_fraction + costs.other_flops) * costs.num_layers
        out.update(layer_ms=layer_ms, layers_s=layers_s, outside_layers_s=prefill["total_s"] - layers_s,
                   layers_tflop_s=flops / layers_s / 1e12 if layers_s > 0 else None,
                   hrm_gpu_tflop_s=gpu_flops / 1e12, kv_d2h_ms=sum(prefill.get("kv_d2h_ms") or []))
    return out


def prefill_log(label: str, b: dict | None) -> str:
    """Returns the one log line of a row's prefill_breakdown."""
    if not b:
        return f"  {label} prefill: no profile"
    line = (f"  {label} prefill {fmt(b['total_s'], 3)} s (HRM {fmt(b['hrm_s'], 3)}): host pool {fmt(b['host_cache_s'], 3)}, "
            f"setup {fmt(b['setup_s'], 3)}, issue {fmt(b['issue_s'], 3)}, KV wait {fmt(b['kv_wait_s'], 3)} / store "
            f"{fmt(b['kv_store_s'], 3)}")
    if "layers_s" in b:
        line += (f"; device layers {fmt(b['layers_s'], 3)} s at {fmt(b['layers_tflop_s'])} TFLOP/s (HRM's GEMM rate "
                 f"{fmt(b['hrm_gpu_tflop_s'])}), outside them {fmt(b['outside_layers_s'], 3)} s, KV D2H "
                 f"{fmt(b['kv_d2h_ms'])} ms, per layer " + "/".join(fmt(x, 0) for x in b["layer_ms"]) + " ms")
    return line


def offload_row(folder, host, prompts, gen_len, budget, device, dtype) -> dict:
    """moekit's own offload engine: a ragged batch of `prompts` through model.generate at the budget."""
    import moekit
    from moekit.offload import OffloadConfig, load_offloaded

    free_memory(device, reset_peak=True)
    context = max(len(p) for p in prompts) + gen_len
    t0 = time.perf_counter()
    config = OffloadConfig(device_memory=budget, batch=len(prompts), context_tokens=context, predictor="none")
    model = load_offloaded(folder, device=device, dtype=dtype, offload=config, host_layers=host)
    load_s = time.perf_counter() - t0
    model.generate([prompts[0][:8]], max_new_tokens=2, temperature=0, eos_token_ids=())  # kernels built
    stats = moekit.GenerationStats()
    sync(device)
    t0 = time.perf_counter()
    outs = model.generate(prompts, max_new_tokens=gen_len, temperature=0, eos_token_ids=(), stop_at_eos=False,
                          stats=stats)
    sync(device)
    wall = time.perf_counter() - t0
    generated = sum(len(o) for o in outs)
    rep = model.offload.report()
    row = {"status": "ok", "batch": len(prompts), "new_tokens": gen_len, "load_s": load_s, "wall_s": wall,
           "tok_s": generated / wall, "prefill_s": stats.prefill_s, "decode_s": stats.decode_s,
           "peak_bytes": peak_bytes(device) if device.type == "cuda" else rep.get("peak_device_bytes"),
           "peak_source": "allocator" if device.type == "cuda" else "plan (CPU: no allocator peak)",
           "hit_rate": rep.get("hit_rate"), "cache_slots": rep.get("cache_slots"),
           "pcie_bytes_per_token": rep.get("bytes_per_token")}
    model = None
    free_memory(device)
    return row


HF_PLACEMENTS = 3  # transformers+accelerate: placements tried to keep its peak within the budget


def hf_row(hf_cfg, folder, host, prompts, gen_len_cap, budget, device, cap_s, deadline: float) -> dict:
    """transformers + accelerate: device_map with max_memory {gpu: budget}, batch of `prompts`
    left-padded, greedy: a 2-token run (the prefill and a decode step: the allocator's peak), then
    as many tokens as fit `cap_s` (at most gen_len_cap). accelerate's max_memory bounds the weights
    it places, not the activations on top: while the 2-token run's peak passes the budget, the
    model is placed again with the weights' share cut by the overshoot, up to HF_PLACEMENTS times
    and only while the time to `deadline` (perf_counter) allows another placement and the timed run
    (the row lists each placement; at 73d62b2 a 1-token run peaked below the timed run, so the
    probe now takes a decode step too)."""
    import transformers

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    row: dict = {"batch": len(prompts), "placements": []}
    weights_limit = budget
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=2, min_new_tokens=2, eos_token_id=None,
                                        pad_token_id=0)
    for attempt in range(HF_PLACEMENTS):
        t_place = time.perf_counter()
        model = hf_placed(hf_cfg, folder, host, device, weights_limit, row)
        with torch.no_grad():
            sync(device)
            t0 = time.perf_counter()
            model.generate(ids, generation_config=gen, attention_mask=mask)
            sync(device)
            probe = time.perf_counter() - t0
        peak = peak_bytes(device)
        row["placements"].append({"weights_limit_bytes": weights_limit, "layers_on_gpu": row.get("layers_on_gpu"),
                                  "probe_peak_bytes": peak, "probe_s": probe})
        cut = weights_limit - ((peak or 0) - budget) - GiB // 2
        again = time.perf_counter() - t_place  # another placement and its probe, then the timed run
        if (device.type != "cuda" or peak is None or peak <= budget or cut <= 0 or attempt == HF_PLACEMENTS - 1
                or time.perf_counter() + again + cap_s > deadline):
            break  # within the budget, or no room (or time) to cut more: measured as it is
        model = None
        free_memory(device, reset_peak=True)
        weights_limit = cut
    with torch.no_grad():
        step = probe / 2  # a decode step costs about a prefill here (every layer's weights cross)
        n = int(max(2, min(gen_len_cap, max(0.0, min(cap_s, deadline - time.perf_counter())) / max(step, 1e-3))))
        gen.max_new_tokens = gen.min_new_tokens = n
        t0 = time.perf_counter()
        model.generate(ids, generation_config=gen, attention_mask=mask)
        sync(device)
        total = time.perf_counter() - t0
    model = None
    row.update(status="ok", probe_s=probe, new_tokens=n, wall_s=total, tok_s=len(prompts) * n / total,
               peak_bytes=peak_bytes(device), weights_limit_bytes=weights_limit,
               note="padded to the batch's longest prompt (left); end-to-end tok/s")
    return row


def hf_placed(hf_cfg, folder, host, device, weights_limit: int, row: dict):
    """Returns the transformers model over the host experts, dispatched by accelerate with at most
    `weights_limit` bytes of weights on the GPU (CUDA); records how many layers went there."""
    from bench_offload import hf_model_over_host

    model = hf_model_over_host(hf_cfg, folder, host)
    if device.type == "cuda":
        from accelerate import dispatch_model, infer_auto_device_map

        device_map = infer_auto_device_map(model, max_memory={0: weights_limit, "cpu": 200 * GiB},
                                           no_split_module_classes=[type(model.model.layers[0]).__name__])
        model = dispatch_model(model, device_map=device_map)
        row["layers_on_gpu"] = sum(1 for k, v in device_map.items() if v == 0 and ".layers." in k)
        free_memory(device, reset_peak=True)
    return model


# ---- compressed experts -------------------------------------------------------------------------

def compress_experts(folder: Path, host: dict, bits: str, device: torch.device):
    """Returns (folder of the compressed checkpoint's config beside the shared non-expert weights,
    {layer: stored tensors in host memory}, QuantConfig, seconds): the bf16 experts rounded to
    nearest on the device, as bench_offload's --compressed-bits phase does."""
    from moekit.quant.compress import round_layer
    from moekit.quant.config import QuantConfig

    quant = QuantConfig(bits=bits, group_size=None if bits == "ternary" else 128, method="rtn")
    t0 = time.perf_counter()
    stored = {}
    for i, layer in host.items():  # rounded on the device, stored tensors back in host memory
        tensors = round_layer(layer["gate_up"].to(device), layer["down"].to(device), quant)
        stored[i] = {k: v.cpu() for k, v in tensors.items()}
        tensors = None
        free_memory(device)
    seconds = time.perf_counter() - t0
    out = folder.parent / f"{folder.name}-{bits}"
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads((folder / "config.json").read_text())
    data["quantization_config"] = {**quant.to_dict(), "calibration_tokens": 0}
    (out / "config.json").write_text(json.dumps(data))
    link = out / "model.safetensors"  # the non-expert weights, shared with the bf16 rows
    if not link.exists():
        link.symlink_to((folder / "model.safetensors").resolve())
    return out, stored, quant, seconds


def compressed_costs(cfg, stored: dict, quant):
    """Returns (the HRM's ModelCosts of experts in this stored form, as the paged runtime lays them
    out, the layout's description)."""
    from moekit.offload.layout import layout_for
    from moekit.pipeline.hrm import form_costs
    from moekit.quant.formats import form_from_tensors

    form = form_from_tensors(quant, cfg, stored, "cpu")
    layout = layout_for(form, [i for i, moe in enumerate(cfg.moe_layers) if moe])
    return form_costs(cfg, layout, act_dtype_bytes=2), layout.describe()


# ---- the run -------------------------------------------------------------------------------------

def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def table(results: dict) -> str:
    budget = results.get("budget_bytes") or 0
    rows = []
    for r in results.get("rows", []):
        peak = r.get("peak_bytes")
        peak_s = f"{peak / GiB:.2f} / {budget / GiB:.2f} GiB" if peak and budget else "-"
        if r.get("peak_source", "allocator") != "allocator" and peak:
            peak_s += " (plan)"
        status = r.get("status", "")
        if status not in ("ok",):
            status = (status + ": " + (r.get("reason") or r.get("error") or ""))[:90]
        policy = policy_label(r)
        vs = r.get("vs_bf16") or {}
        rows.append([r["row"], r.get("new_tokens") or r.get("gen_len"), fmt(r.get("bits_per_weight", 16.0), 2), policy,
                     fmt(r.get("tok_s")), fmt(r.get("predicted_tok_s")), fmt(r.get("pcie_ceiling_decode_tok_s")),
                     fmt(r.get("cpu_attention_ceiling_tok_s")),
                     " / ".join(f"{v:.2f}x ({k})" for k, v in vs.items()) or "-", peak_s, status])
    source = ("bf16 experts (the compressed rows: RTN of them)" if not results.get("forms_only") else
              "the compressed rows only (RTN of bf16 experts drawn on the device)"
              + (f", vs bf16 from {results['bf16_from']['file']}" if results.get("bf16_from") else ""))
    head = (f"{results.get('shape')} x {results.get('layers')} layers, {source}, budget {budget / GiB:.2f} GiB, H2D {results.get('h2d_bytes_per_s', 0) / 1e9:.1f} GB/s measured\n")
    return head + common.markdown_table(
        ["row", "gen", "bits/weight", "policy", "tok/s (prefill+decode)", "HRM tok/s", "PCIe ceiling (decode)",
         "CPU-attn ceiling", "vs bf16 pipeline", "peak / budget", "status"], rows)


def breakdown_table(results: dict) -> str:
    """Returns the pipeline rows' step breakdowns as a short table (ms per decode step)."""
    rows = []
    for r in results.get("rows", []):
        b = r.get("step_breakdown")
        if not b:
            continue
        issue = " / ".join(fmt(b.get(f"issue_{part}_ms")) for part in ("pre", "loadh", "pages", "post"))
        rows.append([r.get("row", "").replace(" (CGOPipe, HRM policy)", ""), r.get("gen_len"), fmt(b.get("step_ms")),
                     fmt(b.get("hrm_step_ms")), fmt(b.get("pcie_step_ms")),
                     fmt(b.get("gpu_step_ms")), fmt(b.get("launch_blocked_ms")), fmt(b.get("launch_issuing_ms")), issue,
                     fmt(b.get("experts_gpu_ms")), fmt(b.get("hrm_gpu_step_ms")),
                     fmt(b.get("worker_attention_ms")), fmt(b.get("worker_kernel_ms")), fmt(b.get("worker_wait_ms")),
                     fmt(b.get("layer_ms_mean")),
                     fmt(b.get("copy_span_ms_mean")), fmt(b.get("copy_gb_s_mean")), fmt(b.get("loadh_ms_mean"), 3)])
    if not rows:
        return ""
    return "\n\ndecode step breakdown (ms per step unless noted; the first step left out)\n" + common.markdown_table(
        ["row", "gen", "step", "HRM step", "PCIe step", "GPU stream", "launch blocked", "launch issuing",
         "issuing: pre / loadh / pages / post", "experts on GPU", "HRM GPU", "worker attention",
         "of which in the kernel call", "worker waiting", "layer (GPU)", "page span / layer", "page GB/s", "LoadH ms"], rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_output_args(p, NAME)
    p.add_argument("--small", action="store_true", help="a toy Mixtral (hidden 256, 4 layers) for a CPU run")
    p.add_argument("--layers", type=int, default=None, help="layers of the Mixtral shape (default 8; small: 4)")
    p.add_argument("--gen", default="32,128,256", help="generated tokens per sequence, one pipeline row each")
    p.add_argument("--budget-gib", type=float, default=16.0, help="device budget (small: scaled to the toy model)")
    p.add_argument("--max-sequences", type=int, default=None, help="N at most (default 512; small: 8)")
    p.add_argument("--plan-margin-gib", type=float, default=0.5,
                   help="the HRM plans within the budget less this (what its memory model leaves out: the "
                        "prefill's residual streams of all N prompts, the longest prompt's micro-batch)")
    p.add_argument("--offload-batches", default=None, help="offload engine batches (default 64,256; small: 4; '' none)")
    p.add_argument("--offload-gen", type=int, default=32)
    p.add_argument("--hf-cap-s", type=float, default=20.0, help="transformers+accelerate: seconds its run may take")
    p.add_argument("--hf-batches", default="8,32", help="transformers+accelerate batches, comma-separated")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--reserve-s", type=float, default=60.0,
                   help="seconds the first pipeline rows leave for the baselines (the longest gen runs last)")
    p.add_argument("--time-budget-s", type=float, default=520.0,
                   help="rows not started (or predicted not to end) by then are recorded as skipped")
    p.add_argument("--compressed", default="ternary,4",
                   help="stored forms of the compressed pipeline rows: ternary, 4 (int4), 3, 2, comma-separated "
                        "('' for none)")
    p.add_argument("--compressed-gen", default="32",
                   help="generated tokens of the compressed rows, comma-separated: one row each per form")
    p.add_argument("--compressed-max-sequences", type=int, default=None,
                   help="N at most in the compressed rows (default: --max-sequences)")
    p.add_argument("--compressed-min-s", type=float, default=30.0,
                   help="a compressed form is skipped when fewer seconds than this are left")
    p.add_argument("--graphs", choices=("default", "on", "off", "both"), default="default",
                   help="CGOPipe's tasks as CUDA graphs (moekit.pipeline.graphs): on, off (eager), both (each "
                        "pipeline row twice, the eager one marked [graphs off]), default (MOEKIT_PIPELINE_GRAPHS)")
    p.add_argument("--attention-threads", type=int, default=None,
                   help="threads of the pipeline's CPU attention kernel (default: usable cores - 2 on CUDA): fewer "
                        "leave the launch thread and the CUDA driver cores of their own")
    p.add_argument("--switch-interval-us", type=float, default=None,
                   help="Python's GIL switch interval for the whole run (default: Python's, 5000): the attention "
                        "worker, back from each kernel call, waits for the GIL the launch thread holds while it "
                        "issues (probes/cpu_attention_calls.py times that)")
    p.add_argument("--calibrate-attention", action=argparse.BooleanOptionalAction, default=None,
                   help="after each warm-up, a short run of the plan measures the CPU attention kernel's rate "
                        "inside the pipeline, and the HRM plans the rows with it (default: on CUDA)")
    p.add_argument("--forms-only", action="store_true",
                   help="only the compressed rows: each layer's bf16 experts are drawn on the device and rounded, "
                        "never held in host memory (all 32 layers' forms fit where their 90 GB of bf16 would not "
                        "beside them); no bf16 row, no baselines")
    p.add_argument("--bf16-from", default=None,
                   help="a bench_pipeline JSON whose bf16 pipeline rows the compressed rows are compared with "
                        "(with --forms-only; the comparison names that file)")
    p.add_argument("--tmp", default="/tmp/moekit_bench_pipeline")
    args = p.parse_args()
    if args.switch_interval_us is not None:
        if not args.switch_interval_us > 0:
            p.error(f"--switch-interval-us must be > 0, got {args.switch_interval_us}")
        sys.setswitchinterval(args.switch_interval_us / 1e6)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run with --device cpu --small")
    if args.calibrate_attention is None:
        args.calibrate_attention = device.type == "cuda"
    shape = "small" if args.small else "mixtral-8x7b"
    layers = args.layers or (4 if args.small else 8)
    max_n = args.max_sequences or (8 if args.small else 512)
    gens = [int(g) for g in args.gen.split(",") if g]
    try:
        form_gens = sorted(int(g) for g in args.compressed_gen.split(",") if g)
        hf_batches = [int(b) for b in args.hf_batches.split(",") if b]
    except ValueError as e:
        p.error(f"--compressed-gen / --hf-batches take comma-separated integers: {e}")
    if args.compressed and not form_gens:
        p.error("--compressed-gen names no generation length")
    offload_batches = args.offload_batches if args.offload_batches is not None else ("4" if args.small else "64,256")
    batches = [int(b) for b in offload_batches.split(",") if b]  # '' runs none
    dtype = "bfloat16"
    results: dict = {"meta": common.run_meta(args, device), "shape": shape, "layers": layers, "dtype": dtype,
                     "rows": []}
    deadline = common.T_START + args.time_budget_s
    bf16_rows: list[dict] = []  # --bf16-from: the earlier run's bf16 pipeline rows (checked before the build)
    if args.bf16_from:
        try:
            earlier = json.loads(Path(args.bf16_from).read_text())
        except (OSError, ValueError) as e:
            p.error(f"--bf16-from {args.bf16_from}: {e}")
        if earlier.get("layers") != layers or earlier.get("shape") != shape:
            p.error(f"--bf16-from {args.bf16_from}: {earlier.get('shape')} x {earlier.get('layers')} layers, "
                    f"this run is {shape} x {layers}")
        bf16_rows = [r for r in earlier.get("rows", []) if r.get("row") == "pipeline (CGOPipe, HRM policy)"
                     and r.get("status") == "ok" and r.get("tok_s")]
        results["bf16_from"] = {"file": Path(args.bf16_from).name, "rows": [
            {k: r.get(k) for k in ("gen_len", "tok_s", "predicted_tok_s", "pcie_ceiling_decode_tok_s", "plan")}
            for r in bf16_rows]}

    def save() -> None:
        common.write_json(results, args.out, NAME)

    def left() -> float:
        return deadline - time.perf_counter()

    def record(row: dict) -> None:
        # the host side of the plan's memory: the process's peak resident set so far (pinned pages
        # included) and what the kernel says is still available, beside the plan's host bytes
        import resource

        from moekit.pipeline.machine import host_memory_available

        row["host_rss_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        row["host_available_after_bytes"] = host_memory_available()
        results["rows"].append(row)
        log(f"{row['row']} gen {row.get('new_tokens') or row.get('gen_len')}: {row.get('status')}, "
            f"{fmt(row.get('tok_s'))} tok/s (HRM {fmt(row.get('predicted_tok_s'))}), peak "
            f"{fmt((row.get('peak_bytes') or 0) / GiB, 2)} GiB"
            + (f" -- {row.get('reason') or row.get('error')}" if row.get("status") != "ok" else ""))
        save()

    torch.set_num_threads(common.device_info(device)["cpus_usable"] or 1)
    from moekit.pipeline.hrm import model_costs

    t0 = time.perf_counter()
    folder, cfg, host, hf_cfg = build(shape, layers, device, Path(args.tmp), pinned=not args.forms_only)
    expert_bytes = 3 * cfg.hidden_size * cfg.expert_ffn * 2
    costs = model_costs(cfg, expert_bytes, act_dtype_bytes=2)
    budget = int(args.budget_gib * GiB)
    if args.small:  # the toy's non-expert weights + the planner's reserve + half its experts
        from moekit.pipeline.hrm import CUDA_RESERVE_BYTES

        budget = int(costs.resident_bytes + CUDA_RESERVE_BYTES + 0.75 * costs.total_expert_bytes)
    plan_budget = int(budget - (0 if args.small else args.plan_margin_gib * GiB))
    results.update(build_s=time.perf_counter() - t0, budget_bytes=budget, plan_budget_bytes=plan_budget,
                   costs=costs.to_dict(),
                   expert_bytes_total=costs.total_expert_bytes, max_sequences=max_n,
                   model_bytes=costs.total_expert_bytes + costs.resident_bytes)
    results["forms_only"] = args.forms_only
    log(f"{shape} x {layers} layers: {results['model_bytes'] / 1e9:.2f} GB ({costs.total_expert_bytes / 1e9:.2f} "
        f"GB experts, {'drawn on the device per form' if args.forms_only else 'pinned on the host'}) in "
        f"{results['build_s']:.1f} s; budget {budget / GiB:.2f} GiB")
    save()

    t0 = time.perf_counter()
    probes: dict = {}
    machine = measure_machine(device, args.small, cfg, probes)
    h2d = machine.h2d_bandwidth if device.type == "cuda" else common.H2D_PINNED_BYTES_PER_S
    results.update(machine=machine.to_dict(), machine_probes=probes, machine_s=time.perf_counter() - t0,
                   h2d_bytes_per_s=h2d)
    shared = probes.get("shared") or {}
    log(f"machine: H2D {h2d / 1e9:.1f} GB/s, host {machine.host_bandwidth / 1e9:.1f} GB/s, CPU attention "
        f"{(machine.cpu_attention_bandwidth or 0) / 1e9:.1f} GB/s over {(machine.cpu_attention_kv_bytes or 0) / 2**20:.0f} "
        f"MiB of KV, {machine.host_flops / 1e12:.2f} host TFLOP/s; "
        f"shared host {fmt((machine.host_shared_bandwidth or 0) / 1e9)} GB/s (DMA "
        f"{fmt((shared.get('h2d_shared') or 0) / 1e9)} + CPU {fmt((shared.get('cpu_read_shared') or 0) / 1e9)}), "
        f"grouped experts {fmt((machine.expert_bandwidth or 0) / 1e12, 2)} TB/s at 32 tokens "
        f"({' '.join(f'{t}:{r / 1e12:.2f}' for t, r in (probes.get('expert_bytes_per_s') or {}).items())}), "
        f"prefill {fmt((machine.prefill_expert_flops or 0) / 1e12)} TFLOP/s at {PREFILL_LEVEL_TOKENS} tokens "
        f"({' '.join(f'{t}:{r / 1e12:.0f}' for t, r in (probes.get('prefill_expert_flops') or {}).items())}; "
        f"GEMM {machine.gpu_flops / 1e12:.0f}) ({results['machine_s']:.1f} s)")
    save()

    lengths_all = mtbench_lengths(max(max_n, *batches, *hf_batches, 8))
    # the compressed rows' N cap may be larger: their own draw (a longer draw is not a prefix of a
    # shorter one, so the bf16 rows keep theirs)
    lengths_forms = mtbench_lengths(max(max_n, args.compressed_max_sequences or 0, *batches, 8))
    plan_prompt_len = round(sum(lengths_all[:max_n]) / max_n)  # the HRM plans for the drawn mean
    results["plan_prompt_len"] = plan_prompt_len
    models = None if args.forms_only else PagedModels(folder, host, device, dtype)
    launch_of: dict[str, float] = {}  # pipeline label -> host seconds per task (measured after its warm-up, CUDA)
    results["launch_task_s"] = launch_of
    attention_of: dict[str, float] = {}  # pipeline label -> the worker's kernel GB/s in its calibration run
    results["attention_calibration"] = {}
    steps: list[tuple[int, float, float]] = []  # (N, mean context, decode step s) of the rows run

    def predict_s(n: int, context: float, gen_len: int) -> float | None:
        """Returns a pipeline row's predicted seconds from the rows run: the decode step linear in the
        mean context (two rows of this N), else proportional to N x context; plus the last prefill."""
        if not steps:
            return None
        same = [(c, t) for k, c, t in steps if k == n]
        if len(same) >= 2 and same[-1][0] != same[0][0]:
            (c0, t0), (c1, t1) = same[0], same[-1]
            slope = max(0.0, (t1 - t0) / (c1 - c0))
            step = t1 + slope * (context - c1)
        else:
            k, c, t = steps[-1]
            step = t * (n * context) / (k * c)
        return (gen_len - 1) * step + results.get("last_prefill_s", 0.0)

    def calibrate_attention(label: str, row_costs, row_models, row_machine, gen_len: int, form: dict | None) -> None:
        """Runs the plan for gen_len (with the launch thread's measured cost) for CALIBRATION_TOKENS
        tokens and keeps the rate the worker's kernel calls read the host KV pool at, for the plans of
        this label's rows: the isolated probe (Machine.cpu_attention_bandwidth) reads faster than the
        worker does beside the running pipeline (061be12, 32 layers: 67.7 GB/s against ~40)."""
        from dataclasses import replace

        plan = plan_for(row_costs, replace(row_machine, launch_task_s=launch_of.get(label)), gen_len,
                        plan_prompt_len, plan_budget, form["max_n"] if form else max_n, held_store_bytes(row_costs, form))
        n = plan.policy.batch
        lengths = (lengths_forms if form else lengths_all)[:n]
        entry = {"probe_gb_s": (machine.cpu_attention_bandwidth or 0) / 1e9, "plan": plan.to_dict(),
                 "tokens": CALIBRATION_TOKENS}
        try:
            r = pipeline_row(row_models, plan, prompts_of(lengths, cfg.vocab_size), CALIBRATION_TOKENS, h2d, budget,
                             device, deadline, args.attention_threads)
            b = r.get("step_breakdown") or {}
            entry.update(seconds=r["seconds"], worker_kernel_gb_s=b.get("worker_kernel_gb_s"),
                         worker_attention_ms=b.get("worker_attention_ms"), step_ms=b.get("step_ms"))
            if b.get("worker_kernel_gb_s"):
                attention_of[label] = b["worker_kernel_gb_s"] * 1e9
        except OutOfTime as e:
            entry.update(status="stopped", reason=str(e))
        except Exception as e:  # noqa: BLE001 -- the plans then keep the probe's rate
            entry.update(error=f"{type(e).__name__}: {e}")
        results["attention_calibration"][label] = entry
        log(f"{label}: CPU attention in the pipeline (N={n} mu={plan.policy.micro_batch}, {CALIBRATION_TOKENS} tokens): "
            f"{fmt(entry.get('worker_kernel_gb_s'))} GB/s against the probe's {entry['probe_gb_s']:.1f}; the plans "
            f"use {'it' if label in attention_of else 'the probe' + chr(39) + 's'}"
            + (f" -- {entry.get('error') or entry.get('reason')}" if label not in attention_of else ""))

    def pipeline_rows(gen_lens: list, reserve_s: float, form: dict | None = None) -> None:
        """The pipeline rows (a "warm-up" entry builds the kernels): each skipped when predicted to
        end later than `reserve_s` before the deadline. `form` (compressed rows): its label, costs,
        models, N cap and extra fields."""
        from dataclasses import replace

        from moekit.pipeline.hrm import Workload
        from moekit.pipeline.machine import free_host_budget
        from moekit.pipeline.timeline import launch_task_seconds

        label = f"pipeline {form['label']}" if form else "pipeline"
        row_costs, row_models, row_max = (form["costs"], form["models"], form["max_n"]) if form else (costs, models, max_n)
        # --graphs both: every row with the tasks as CUDA graphs, then eager (the warm-up builds both)
        variants = {"on": [True], "off": [False], "default": [None], "both": [True, False]}[args.graphs]
        for gen_len, graphs in [(g, v) for g in gen_lens for v in (variants if g != "warm-up" else [None])]:
            warm = gen_len == "warm-up"
            g = 2 if warm else gen_len
            row: dict = {"row": f"{label} warm-up" if warm else f"{label} (CGOPipe, HRM policy)"
                         + (" [graphs off]" if graphs is False and args.graphs == "both" else ""), "gen_len": g,
                         "graphs": graphs}
            if form:
                row.update(form["fields"])
            try:
                first = (form["gen"] if form else gens[0]) if warm else g
                # the launch thread's cost per task, measured after this label's warm-up, joins the plan
                row_machine = replace(machine, launch_task_s=launch_of[label]) if label in launch_of else machine
                # and the CPU attention kernel's rate as the pipeline's worker read it (--calibrate-attention)
                if label in attention_of:
                    row_machine = replace(row_machine, pipeline_attention_bandwidth=attention_of[label])
                plan = plan_for(row_costs, row_machine, first, plan_prompt_len, plan_budget, row_max,
                                held_store_bytes(row_costs, form))
                if warm:  # the plan's micro-batch and resident count, two micro-batches, two tokens
                    mu = plan.policy.micro_batch
                    plan = replace(plan, policy=replace(plan.policy, batch=min(plan.policy.batch, 2 * mu)))
                n = plan.policy.batch
                lengths = (lengths_forms if form else lengths_all)[:n]
                prompt_mean = sum(lengths) / n
                row["host_budget_bytes"] = free_host_budget(held=held_store_bytes(row_costs, form))
                row.update(plan=plan.to_dict(), hrm_bound=plan.bound, prompt_len_mean=prompt_mean,
                           prompt_len_max=max(lengths),
                           cpu_attention_ceiling_tok_s=attention_ceiling(row_costs, machine, prompt_mean, g))
                est = None if warm or form else predict_s(n, prompt_mean + g / 2, g)
                row["predicted_seconds"] = est
                if left() <= 0 or (est is not None and est > left() - reserve_s):
                    row.update(status="skipped", reason=f"predicted {est or 0:.0f} s, {left():.0f} s left, "
                                                        f"{reserve_s:.0f} s kept for later rows (--time-budget-s)")
                    record(row)
                    continue
                row.update(pipeline_row(row_models, plan, prompts_of(lengths, cfg.vocab_size), g, h2d, budget, device,
                                        deadline, args.attention_threads, graphs))
                row["prefill_breakdown"] = prefill_breakdown((row.get("step_profile") or {}).get("prefill"), plan,
                                                             row_costs, row["prompt_tokens"], machine.gpu_flops)
                log(prefill_log(row["row"], row["prefill_breakdown"]))
                if warm and device.type == "cuda":  # host seconds to issue one (layer, micro-batch) task
                    try:
                        launch_of[label] = row["launch_task_s"] = launch_task_seconds(row_models.model, mu)
                        row["launch_task_s_eager"] = launch_task_seconds(row_models.model, mu, graphs=False)
                        log(f"{label}: eager, a task is issued in {1e3 * row['launch_task_s_eager']:.2f} ms")
                        log(f"{label}: the launch thread issues a task (mu={mu}) in {1e3 * launch_of[label]:.2f} ms")
                    except Exception as e:  # noqa: BLE001 -- the plans then leave the launch thread out
                        row["launch_error"] = f"{type(e).__name__}: {e}"
                if warm and args.calibrate_attention:
                    calibrate_attention(label, row_costs, row_models, row_machine, first, form)
                row["plan_machine"] = {"launch_task_s": row_machine.launch_task_s,
                                       "pipeline_attention_bandwidth": row_machine.pipeline_attention_bandwidth,
                                       "expert_bandwidth": row_machine.expert_bandwidth,
                                       "prefill_expert_flops": row_machine.prefill_expert_flops,
                                       "host_shared_bandwidth": row_machine.host_shared_bandwidth}
                row["attention_threads"] = args.attention_threads or "default (usable cores - 2 on CUDA)"
                if device.type == "cuda":
                    row["within_budget"] = row["peak_bytes"] <= budget
                if form and not warm:
                    same = [r for r in results["rows"] if r.get("row") == "pipeline (CGOPipe, HRM policy)"
                            and r.get("status") == "ok"] or bf16_rows
                    row["vs_bf16"] = {f"gen {r['gen_len']}": row["tok_s"] / r["tok_s"] for r in same if r.get("tok_s")}
                if not warm:  # the plan's roofline picture (moekit plan --plot), beside the JSON
                    row["roofline_svg"] = roofline_picture(args.out, label, g, row_machine, row_costs, plan,
                                                           Workload(plan_prompt_len, g, n))
                if not warm and not form:
                    steps.append((n, prompt_mean + g / 2, row["decode_step_s"]))
                    results["last_prefill_s"] = row["prefill_s"]
                if not warm:
                    b = row.get("step_breakdown") or {}
                    log(f"  decode step {fmt(b.get('step_ms'))} ms (HRM {fmt(b.get('hrm_step_ms'))}, PCIe "
                        f"{fmt(b.get('pcie_step_ms'))}): launch thread blocked {fmt(b.get('launch_blocked_ms'))} / "
                        f"issuing {fmt(b.get('launch_issuing_ms'))} (pre/loadh/pages/post "
                        + "/".join(fmt(b.get(f"issue_{part}_ms")) for part in ("pre", "loadh", "pages", "post"))
                        + f"), experts on the GPU {fmt(b.get('experts_gpu_ms'))} (HRM {fmt(b.get('hrm_gpu_step_ms'))}), "
                        f"worker attention {fmt(b.get('worker_attention_ms'))} (in the kernel call "
                        f"{fmt(b.get('worker_kernel_ms'))}), GPU stream {fmt(b.get('gpu_step_ms'))}, "
                        f"page span {fmt(b.get('copy_span_ms_mean'))} ms/layer at {fmt(b.get('copy_gb_s_mean'))} GB/s, "
                        f"LoadH {fmt(b.get('loadh_ms_mean'), 3)} ms; CUDA graphs {b.get('graphs')}")
            except OutOfTime as e:
                row.update(status="stopped", reason=str(e), peak_bytes=peak_bytes(device))
            except Exception as e:  # noqa: BLE001 -- one row failing must not lose the others
                error_row(row, e)
            if warm:
                results["warm_up" if not form else f"warm_up_{form['bits']}"] = row
                log(f"{label} warm-up: {row.get('status')}, {row.get('seconds', 0):.1f} s"
                    + (f" -- {row.get('error')}" if row.get("status") != "ok" else ""))
                save()
            else:
                record(row)

    # ---- the pipeline rows but the longest first, then the baselines, then the longest ----
    ordered = sorted(gens)
    if not args.forms_only:
        pipeline_rows(["warm-up", *ordered[:-1]], reserve_s=args.reserve_s)
        models.drop()

    # ---- the same experts compressed (RTN), paged in their stored form: short rows ----
    for bits in [b for b in args.compressed.split(",") if b]:
        label = NAME_OF.get(bits, bits)
        if left() < args.compressed_min_s:
            record({"row": f"pipeline {label} (CGOPipe, HRM policy)", "gen_len": args.compressed_gen,
                    "status": "skipped", "reason": f"{left():.0f} s left, a compressed form needs "
                                                   f"--compressed-min-s {args.compressed_min_s:.0f}"})
            continue
        try:
            folder_c, stored, quant, quantize_s = compress_experts(folder, host, bits, device)
            costs_c, layout_c = compressed_costs(cfg, stored, quant)
        except Exception as e:  # noqa: BLE001
            record(error_row({"row": f"pipeline {label} (CGOPipe, HRM policy)", "gen_len": args.compressed_gen}, e))
            free_memory(device)
            continue
        fields = {"form": costs_c.form, "bits_per_weight": costs_c.bits_per_weight, "quantize_s": quantize_s,
                  "quant": quant.to_dict(), "costs": costs_c.to_dict(), "slot_layout": layout_c,
                  "expert_bytes_total": costs_c.total_expert_bytes}
        log(f"{label}: rounded in {quantize_s:.1f} s, {costs_c.bits_per_weight:.3f} bits per weight, "
            f"{costs_c.total_expert_bytes / 1e9:.2f} GB of experts")
        form = {"label": label, "bits": bits, "costs": costs_c, "gen": form_gens[0], "fields": fields,
                "models": PagedModels(folder_c, stored, device, dtype),
                "max_n": args.compressed_max_sequences or max_n}
        pipeline_rows(["warm-up", *form_gens], reserve_s=0.0, form=form)
        form["models"].drop()
        form = stored = None
        free_memory(device)

    # ---- transformers + accelerate, --hf-batches ----
    # before the offload rows and the longest pipeline row, which keep no time for it (it was skipped
    # for them in two H200 runs)
    if args.forms_only:
        return finish(results, args, save)
    for b in hf_batches:
        row = {"row": "transformers+accelerate", "batch": b}
        if args.skip_hf:
            row.update(status="skipped", reason="--skip-hf")
        elif left() < args.hf_cap_s + 20:
            row.update(status="skipped", reason=f"{left():.0f} s left: less than its cap {args.hf_cap_s:.0f} s + "
                                                "20 s to load (--time-budget-s)")
        else:
            try:
                free_memory(device, reset_peak=True)
                row.update(hf_row(hf_cfg, folder, host, prompts_of(lengths_all[:b], cfg.vocab_size, seed=3),
                                  args.offload_gen, budget, device, min(args.hf_cap_s, left() - 10),
                                  deadline - 10))
                if device.type == "cuda":
                    row["within_budget"] = row["peak_bytes"] <= budget
            except Exception as e:  # noqa: BLE001
                error_row(row, e)
            free_memory(device)
        record(row)

    # ---- moekit's offload engine, ragged batches ----
    best = None
    last = ordered[-1]
    for at, b in enumerate(batches):
        row = {"row": "moekit offload engine (generate, ragged)", "batch": b, "new_tokens": args.offload_gen}
        # the first batch always (the baseline), later ones only beside the time kept for the last pipeline row
        keep = 0.0 if at == 0 else predict_s(steps[-1][0] if steps else max_n, plan_prompt_len + last / 2, last) or 0.0
        if left() - keep < 25:
            row.update(status="skipped", reason=f"{left():.0f} s left, {keep:.0f} s kept for the gen-{last} "
                                                "pipeline row (--time-budget-s)")
            record(row)
            continue
        try:
            row.update(offload_row(folder, host, prompts_of(lengths_all[:b], cfg.vocab_size, seed=2),
                                   args.offload_gen, budget, device, torch.bfloat16))
            if device.type == "cuda":
                row["within_budget"] = row["peak_bytes"] <= budget
            if best is None or row["tok_s"] > best["tok_s"]:
                best = row
        except Exception as e:  # noqa: BLE001
            error_row(row, e)
            free_memory(device)
        record(row)
    if best is not None:
        best["best_batch"] = True
        save()

    pipeline_rows(ordered[-1:], reserve_s=0.0)
    models.drop()
    return finish(results, args, save)


def finish(results: dict, args, save) -> int:
    results["total_s"] = time.perf_counter() - common.T_START
    save()
    print("\n" + table(results) + breakdown_table(results), flush=True)
    log(f"wrote {Path(args.out) / (NAME + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
