"""moekit vs llama.cpp on the same checkpoint in one run (issue 12), with the ceilings and the bars beside them.

One random bf16 checkpoint of a shape (OLMoE-1B-7B, Mixtral-8x7B cut to 8 layers, Qwen3-30B-A3B cut
to 24) is written once per machine (reused while its stamp matches); llama.cpp is built from the
trimmed source in ../shared/anchors/llamacpp (copy that folder into the git-ignored
`.anchors/llamacpp` and carry it), converts the checkpoint to GGUF bf16, and llama-bench measures
decode (64 tokens, -fa 1) while nvidia-smi samples the GPU's used memory every 50 ms: the peak minus
the idle figure is llama.cpp's footprint. moekit then runs the same checkpoint at that footprint as
`--device-memory` (its own allocator-enforced budget), with the missed experts computed on the CPU
(`cpu`), split by the cost model (`auto`) or fetched (`fetch`). On a GPU `cpu` / `auto` with experts
under 64 MiB (compressed ones of any size, since c7b72b2) run their decode steps with the CPU as partner (offload.partner); `--misses auto-graph` /
`cpu+graph` force that off / on for one row (MOEKIT_CPU_GRAPH), `auto-rows` turns the row split off
(MOEKIT_ROW_SPLIT=0; on by default since 2ef1e0c's Mixtral host row: experts of 64 MiB and up cut by rows
between the CPU and in-place reads, inside the partner's step; `auto+rows` forces it on), `auto+omp` runs the CPU's compressed calls on OpenMP, not the runner's own team
(MOEKIT_RUNNER_TEAM=omp, native/team.h), `auto+team` its bf16 calls on the team too, `auto::16` sets 16 CPU threads.

Rows (--rows, a comma list; each call writes its own --name.json):
  resident    decode B=1 and prefill 512, all on the GPU (llama.cpp -ngl 99; moekit resident)
  host        decode, every MoE layer's experts in host memory (llama.cpp -ncmoe all), bf16
  half        decode, half of the MoE layers' experts on the CPU (-ncmoe half), bf16
  compressed  llama-quantize Q4_K_M and Q2_K of the bf16 GGUF at -ncmoe all / half, next to moekit's
              int4 / int2 (RTN, group 128) at those footprints, and moekit's ternary (RTN, sub-1-bit
              code) at llama.cpp's bf16 footprints (--compressed-modes, --compressed-misses); each moekit
              checkpoint is written while llama.cpp builds, and deleted after its rows (without a GPU:
              the copies resident on the CPU next to llama.cpp's CPU decode of Q4_K_M / Q2_K / bf16)
  cpu         no GPU: llama.cpp's decode with the GPU hidden (-dev none -ngl 0; the CPU build without
              CUDA) interleaved with `moekit --device cpu` bf16 on all the host's cores (16 on the H200)
  rates       the CPU kernel against the host's read rate (one expert, a layer's top-k; the compressed
              kernels only beside the compressed row: at the Mixtral shape they took 373 s, f51a719)
The ceilings (host read, pinned H2D, both at once) are measured whenever offloaded rows run. With E
bytes of missed experts per token the decode ceiling is (cpu_rate + h2d_rate) / E (the issue's
"combined ceiling"), capped by moekit's all-on-GPU figure when that row ran.

The H200 machine: six calls in this order, each <= 560 s under `timeout_s=600`. A call that builds
llama.cpp (llama-bench, then llama-quantize from the same build folder) spends ~300 s on it (the
21:00 run's "built and converted in 325 s", the conversion beside it); the machine is given back 30 s
after a call, so the next call starts bare. Hence the first call exports the build (--export-build:
$OUT/lcpp-bin.txz.NN, 15 MiB parts of an xz tar, skipped over 48 MiB: the CUDA build's 87 MB
were 44 MiB gzipped, 40.4 MiB xz'd at -6; the working tree travels too: beside the parts and the
anchor, run from the checkout itself with the tiny model's weights out of the index for the call,
`git rm --cached examples/tiny-moe/model-00001-of-00001.safetensors`, `git reset` after; a `.clean`
copy of the tree on top no longer fits 64 MiB)
and the later ones carry it back (--import-build: run.sh unpacks it instead of building, a few seconds): copy the parts that come back
(a call brings back at most 8 files: write the JSON and logs under a subfolder and tar them into one)
into the git-ignored .anchors/lcpp-bin and carry it beside .anchors/llamacpp. Without the parts each
call builds (~300 s more: then three calls a session, each with fewer rows). The checkpoint is written
and moekit's compressed copies made while llama.cpp compiles or converts. Expected seconds from the
21:00 OLMoE run (a llama-bench row ~4 s, a moekit offloaded row ~22 s, 18 s of it loading 13.8 GB,
rates 20 s, convert ~70 s at the 2-core VM's 200 MB/s) and bench_budget's Qwen3 run (31 GB written in
53 s, a row ~55 s), by bytes for the rest; moekit rows stop starting at --time-budget-s (520 s), so a
long call loses its last rows, not its JSON:

    R="PYTHONPATH=src python3 benchmarks/bench_llamacpp.py --out $OUT"   # carry [.anchors/llamacpp, .anchors/lcpp-bin]
    $R --rows resident,host,half,rates,cpu --export-build --name bench_llamacpp_olmoe                       # ~500 s (builds)
    I="--import-build .anchors/lcpp-bin"
    $R $I --rows compressed --name bench_llamacpp_olmoe_compressed                                          # ~330 s
    $R $I --shape mixtral-8x7b-8l --rows resident,host,half --name bench_llamacpp_mixtral                   # ~400 s
    $R $I --shape mixtral-8x7b-8l --rows compressed --name bench_llamacpp_mixtral_compressed                # ~550 s
    $R $I --shape qwen3-30b-a3b-24l --rows resident,host,half --name bench_llamacpp_qwen3                   # ~510 s
    $R $I --shape qwen3-30b-a3b-24l --rows compressed --forms int4 --compressed-modes host --dense int8 \
       --time-budget-s 520 --name bench_llamacpp_qwen3_compressed_int8                                      # ~490 s
(Qwen3's and likely Mixtral's compressed rows need --dense int8 to fit llama.cpp's Q4_K_M / Q2_K footprints:
llama.cpp quantizes attention and the LM head too; at 4310d1d Qwen3's bf16 ones alone, 1.54 GB, passed its
1.35 GB. A Qwen3 compressed call fits one form: its GGUF conversion ~220 s and llama-quantize ~110-130 s
leave ~60 s for moekit's row.)
(the last rows to go when time runs short: misses `cpu` after `auto`, the `half` footprint's compressed
rows after `host`'s, Qwen3's ternary copy when memory holds only one copy at a time.) With the import,
a call's first 100-210 s are the checkpoint (34-53 s) and the GGUF conversion (70-155 s) or moekit's
compressed copies (100-210 s), whichever ends last, instead of the build's 300; six calls ~46 min, two
sessions. Without the parts add ~100-200 s to each call and drop rows (--misses auto).

Then `python3 benchmarks/lcpp_bars.py $OUT/bench_llamacpp_*.json` prints every call's table under its
command. What takes the time, per call: build ~300; llama-bench rows 4-10 each; llama-quantize of
the bf16 GGUF ~30-70 per type (16 threads; a guess: never timed here); moekit rows 22 (OLMoE), ~38
(Mixtral-8l), ~50 (Qwen3-24l) bf16, less for compressed; the cpu row ~50 (OLMoE, 16 cores).

Without a GPU (the 2-core VM; smoke tests of every row at the tiny shapes, each under a minute):

    PYTHONPATH=src python3 benchmarks/bench_llamacpp.py --device cpu --shape olmoe-4-layers --rows cpu --out /tmp/l
    PYTHONPATH=src python3 benchmarks/bench_llamacpp.py --device cpu --shape tiny --rows cpu,compressed,rates --skip-llamacpp --out /tmp/l
    LCPP_ROOT=/tmp/lcpp PYTHONPATH=src python3 benchmarks/bench_llamacpp.py --device cpu --shape tiny-qwen3 --rows cpu,compressed --out /tmp/l
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import statistics
import subprocess
import time
import traceback
from pathlib import Path
from unittest import mock

import common
import torch
from cpu_rates import compressed_kernel_rates, cpu_and_link_rates, kernel_rates
from lcpp import QUANT_TYPES, GpuMemorySampler, LlamaCpp, Nothing, free_bytes
from lcpp_bars import table
from random_checkpoint import (
    mixtral_hf_config,
    olmoe_hf_config,
    qwen3_moe_hf_config,
    write_random_checkpoint,
)

import moekit
from moekit.errors import MoekitError

NAME = "bench_llamacpp"
OLMOE = dict(hidden=2048, expert_ffn=1024, experts=64, top_k=8, heads=16, kv_heads=16, vocab=50304)
SHAPES = {  # name -> (HF config maker, its arguments); BENCH.md's shapes
    "olmoe-1b-7b": (olmoe_hf_config, dict(layers=16, **OLMOE)),
    "olmoe-4-layers": (olmoe_hf_config, dict(layers=4, **OLMOE)),  # issue 12's no-GPU comparison
    # Mixtral-8x7B cut to 8 of its 32 layers (23.7 GB), Qwen3-30B-A3B to 24 of its 48 (30.5 GB): the H200
    # machine's memory holds the checkpoint, its GGUF and moekit's host copy of the experts at once
    "mixtral-8x7b-8l": (mixtral_hf_config, dict(layers=8, hidden=4096, expert_ffn=14336, experts=8, top_k=2, heads=32,
                                                kv_heads=8, vocab=32000)),
    "qwen3-30b-a3b-24l": (qwen3_moe_hf_config, dict(layers=24, hidden=2048, expert_ffn=768, experts=128, top_k=8,
                                                    heads=32, kv_heads=4, vocab=151936)),
    # toys of the three families for the CPU (converter and quantize paths included)
    "tiny": (olmoe_hf_config, dict(layers=2, hidden=128, expert_ffn=256, experts=16, top_k=4, heads=4, kv_heads=4,
                                   vocab=4096)),
    "tiny-mixtral": (mixtral_hf_config, dict(layers=2, hidden=256, expert_ffn=512, experts=8, top_k=2, heads=4,
                                             kv_heads=2, vocab=4096)),
    "tiny-qwen3": (qwen3_moe_hf_config, dict(layers=2, hidden=256, expert_ffn=128, experts=16, top_k=4, heads=4,
                                             kv_heads=2, vocab=4096)),
}
ROWS = ("resident", "host", "half", "compressed", "cpu", "rates")
DENSE = "bf16"  # moekit's dense projections on a GPU (--dense; moekit.linear.Int8Linear for int8)
# a misses mode's suffix -> the environment switch it sets for its row: the CPU partner forced on / off,
# the row split (offload.cpu; with it the partner splits experts of 64 MiB and up by rows), the partner's
# gather off / on with one scratch slot (-gather / +gather; by default on for compressed experts of 64 MiB and
# up, offload.mapped), the runner's
# calls all on OpenMP (+omp) or all on its own team (+team; by default only the compressed forms': native/team.h)
ROW_ENV = {"+graph": ("MOEKIT_CPU_GRAPH", "1"), "-graph": ("MOEKIT_CPU_GRAPH", "0"), "+rows": ("MOEKIT_ROW_SPLIT", "1"),
           "-rows": ("MOEKIT_ROW_SPLIT", "0"), "+omp": ("MOEKIT_RUNNER_TEAM", "omp"),
           "+team": ("MOEKIT_RUNNER_TEAM", "own"), "-gather": ("MOEKIT_PARTNER_GATHER", "0"),
           "+gather": ("MOEKIT_PARTNER_GATHER", "1")}
MODES = {"host": "decode_cpu_experts", "half": "decode_half_experts"}  # row -> setting (llama.cpp's row name)
FORMS = {"int4": dict(bits="4", group_size=128), "int2": dict(bits="2", group_size=128), "ternary": dict(bits="ternary")}
PROMPT, NEW = 64, 64


# ---- moekit ---------------------------------------------------------------------------------------

def probe_fit(ckpt: Path, tensor_bytes: int, shares: list[float], out: Path) -> dict:
    """Runs `moekit generate --offload` at each budget share with MOEKIT_DEBUG_FIT=1 as a
    subprocess (memory only, no timing: it may overlap the llama.cpp build); returns each run's
    refusal or plan, and keeps the warm-up's debug lines in fit_probe.log."""
    import sys

    env = {**os.environ, "MOEKIT_DEBUG_FIT": "1"}
    res, logs = {}, []
    for share in shares:
        budget = int(share * tensor_bytes)
        cmd = [sys.executable, "-m", "moekit.cli", "generate", "hello", "--model", str(ckpt), "--offload",
               "--device-memory", str(budget), "--max-new-tokens", "8", "--json", "--stats"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=240)
        lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
        row: dict = {"budget_bytes": budget, "returncode": p.returncode}
        if lines:
            rep = json.loads(lines[-1]).get("offload") or {}
            row.update(peak_bytes=rep.get("peak_device_bytes"), plan=rep.get("plan"))
        else:
            row["stderr_tail"] = p.stderr[-1500:]
        res[f"{share:.2f}"] = row
        logs.append(f"=== share {share} budget {budget}\n{p.stderr[-20000:]}")
        common.log(f"fit probe {share:.0%}: rc {p.returncode}, peak {row.get('peak_bytes')}")
    (out / "fit_probe.log").write_text("\n".join(logs))
    return res


def prefill_profile(model, ids: torch.Tensor, rows: int = 15) -> dict:
    """Returns where a resident prefill's time goes: the model's forward alone over ids [1, T] (median
    of 3, synchronized), generate's prefill beside it, and torch.profiler's top CUDA kernels of one
    forward (device ms) with the host's total: is the prefill kernel-bound or host-bound?"""
    from torch.profiler import ProfilerActivity, profile

    from moekit.kv_cache import KVCache

    def forward() -> None:
        cache = KVCache(model.config, 1, ids.shape[1], ids.device, model.dtype)
        with torch.inference_mode():
            model(ids, cache=cache, start=0, last_only=True)

    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    forward()
    times = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        forward()
        sync()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])) as prof:
        forward()
        sync()
    events = prof.key_averages()

    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    top = sorted(events, key=lambda e: -device_us(e))[:rows]
    return {"forward_s": statistics.median(times), "forward_runs_s": times,
            "kernels_device_ms": sum(device_us(e) for e in events) / 1e3,
            "top": [{"name": e.key[:120], "calls": e.count, "device_ms": device_us(e) / 1e3,
                     "cpu_ms": e.cpu_time_total / 1e3} for e in top]}


def prefill_fused_rows(model, ids: torch.Tensor, rows: int) -> dict:
    """Returns the prefill of ids [1, T] with moekit.fused's kernels allowed up to `rows` token rows
    (MAX_TOKENS; default 256 keeps a 512-token prefill on the PyTorch path): tok/s (second of two
    generate calls, as the default's figure) and the last logits' relative error against the default."""
    from moekit import fused

    def last_logits() -> torch.Tensor:
        with torch.inference_mode():
            return model(ids)[0, -1].float()

    before, old = last_logits(), fused.MAX_TOKENS
    fused.MAX_TOKENS = rows
    try:
        for _ in range(2):
            stats = moekit.GenerationStats()
            model.generate(ids, max_new_tokens=1, temperature=0, eos_token_ids=(), stats=stats)
        after = last_logits()
    finally:
        fused.MAX_TOKENS = old
    return {f"prefill_{ids.shape[1]}_fused{rows}_tok_s": ids.shape[1] / stats.prefill_s,
            "prefill_fused_logits_rel_error": float((after - before).norm() / before.norm())}


def moekit_row(path: Path, device: torch.device, budget: int | None, misses: str | None, prompt_ids,
               idle_mib: int | None = None, dtype: torch.dtype | None = None, prefill_tokens: int = 512,
               rounds: int = 1, between=None, profile_prefill: bool = False, fused_rows: int = 0) -> dict:
    """Returns decode tok/s (second of two generate calls), the allocator peak and the GPU memory
    nvidia-smi saw in use (minus `idle_mib`: this process's CUDA context counts, as llama.cpp's does).

    With rounds > 1 (the CPU mode on shared cores), the warm call runs `rounds` times with
    between(i) before each (llama.cpp's decode, interleaved); decode_tok_s is then their median."""
    from moekit.offload import OffloadConfig, load_offloaded

    mode = (misses or "").split(":")[0]
    suffix = next((s for s in ROW_ENV if mode.endswith(s)), None)
    if suffix:  # "cpu+graph" / "auto-graph" / "auto+rows": the switch's environment for this row only
        with mock.patch.dict(os.environ, dict([ROW_ENV[suffix]])):
            row = moekit_row(path, device, budget, misses.replace(mode, mode[:-len(suffix)], 1), prompt_ids,
                             idle_mib, dtype, prefill_tokens, rounds, between, profile_prefill, fused_rows)
        return {**row, "misses": misses}
    common.free_memory(device, reset_peak=True)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    dense = DENSE if device.type == "cuda" else "bf16"  # --dense: the CPU's decode step has its own int8 switch
    row: dict = {"budget_bytes": budget, "misses": misses, "status": "ok", "dense": dense}
    t0 = time.perf_counter()
    model = None
    try:
        if budget is None:
            model = moekit.load_model(path, device=device, dtype=dtype, dense=dense)
        else:
            # "auto:none": misses auto, predictor none; "cpu::12": misses cpu, 12 CPU expert threads
            mode, predictor, threads = (misses.split(":") + ["", ""])[:3]
            model = load_offloaded(path, device=device, dtype=dtype, offload=OffloadConfig(
                device_memory=budget, misses=mode, dense=dense, **({"predictor": predictor} if predictor else {}),
                **({"cpu_threads": int(threads)} if threads else {})))
        row["load_s"] = time.perf_counter() - t0
        warm = []
        for call in ["first"] + ["warm"] * rounds:
            if call == "warm" and between is not None:
                between(len(warm))
            stats = moekit.GenerationStats()
            with GpuMemorySampler() if device.type == "cuda" else Nothing() as sampler:
                model.generate(prompt_ids, max_new_tokens=NEW, temperature=0, eos_token_ids=(), stats=stats)
            row[f"{call}_decode_tok_s"] = stats.decode_tok_s
            if call == "warm":
                warm.append(stats.decode_tok_s)
        if rounds > 1:
            row["warm_rounds_tok_s"] = warm
            row["warm_decode_tok_s"] = statistics.median(warm)
        if device.type == "cpu":  # the native bf16 step (moekit.native.decode) or model.forward
            row["native_cpu_step"] = stats.extra.get("native_cpu_step")
        if getattr(sampler, "peak_mib", None) and idle_mib is not None:  # the process's whole use, context included
            row["gpu_used_bytes"] = (sampler.peak_mib - idle_mib) * 2**20
        row["decode_tok_s"] = row["warm_decode_tok_s"]
        if budget is None:  # prefill all resident (llama.cpp's pp512 on a GPU)
            ids = torch.randint(0, model.config.vocab_size, (1, prefill_tokens), device=device)
            stats = moekit.GenerationStats()
            model.generate(ids, max_new_tokens=1, temperature=0, eos_token_ids=(), stats=stats)
            stats = moekit.GenerationStats()
            model.generate(ids, max_new_tokens=1, temperature=0, eos_token_ids=(), stats=stats)
            row[f"prefill_{prefill_tokens}_tok_s"] = prefill_tokens / stats.prefill_s
            if fused_rows and device.type == "cuda":
                row.update(prefill_fused_rows(model, ids, fused_rows))
            if profile_prefill and device.type == "cuda":  # opt-in: CUPTI may stay hooked for the later rows
                row["prefill_profile"] = prefill_profile(model, ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            row["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        runtime = getattr(model, "offload", None)
        if runtime is not None:
            rep = runtime.report()
            # cost_model: the rates "auto" splits misses by (measured at load); the counts say where misses went
            row["report"] = {k: rep.get(k) for k in ("hit_rate", "cpu_experts", "demand_fetches", "prefetches",
                                                     "admissions", "cpu_s", "cpu_wait_s", "tokens", "decode_tokens",
                                                     "bytes_per_token", "cpu_bytes_per_token", "cache_slots",
                                                     "misses_used", "misses_note", "cpu_threads", "native_cpu_kernel",
                                                     "cost_model", "plan", "predictor", "predictor_in_split_calls",
                                                     "mapped_reads", "mapped_bytes", "decode_mapped_bytes", "in_place_share",
                                                     "in_place_experts", "in_place_refused", "mapped_bytes_per_token",
                                                     "cpu_partner", "row_split", "row_split_experts",
                                                     "cpu_partner_rows", "partner_layer_us", "gather_slots",
                                                     "gathered_experts", "gather_refused")}  # the split's three: missing at 2ef1e0c
    except MoekitError as e:
        row.update(status="refused", refusal=str(e))
    except Exception as e:  # noqa: BLE001 -- one row failing must not lose the others
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:])
    row["seconds"] = time.perf_counter() - t0
    model = None
    common.free_memory(device)
    return row


def interleaved(results: dict, row: dict, rounds: int) -> dict:
    """Returns both engines' decode tok/s of the interleaved CPU rounds, their medians, bests and
    the ratio of the medians (moekit / llama.cpp)."""
    rows = results["llamacpp"]["rows"]
    theirs = [rows.get(f"decode_cpu_only_round{i}", {}).get("tok_s") for i in range(rounds + 1)]
    theirs = [t for t in theirs if t]
    ours = row.get("warm_rounds_tok_s") or []
    out = {"llamacpp_tok_s": theirs, "moekit_tok_s": ours}
    if theirs and ours:
        out.update(llamacpp_median=statistics.median(theirs), moekit_median=statistics.median(ours),
                   llamacpp_best=max(theirs), moekit_best=max(ours),
                   ratio_of_medians=statistics.median(ours) / statistics.median(theirs))
    return out


def least_budget(refusal: str) -> int | None:
    """Returns the budget (bytes) a refusal asks for ('give at least 1123.19MB', 'give
    --device-memory 1.18GB or more'), or None."""
    import re

    from moekit.offload.config import parse_size

    m = re.search(r"give (?:at least|--device-memory) ([0-9.]+\s*[KMGT]B)", refusal)
    return parse_size(m.group(1)) + 2 * 10**6 if m else None


# ---- checkpoints ----------------------------------------------------------------------------------

def estimated_bytes(cfg) -> int:
    """Returns about the bf16 bytes of a checkpoint of `cfg` (untied embeddings; norms left out)."""
    d, qd, kvd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    experts = sum(cfg.experts_in(i) for i, m in enumerate(cfg.moe_layers) if m)
    per_layer = d * (2 * qd + 2 * kvd) + cfg.num_experts * d
    return 2 * (2 * cfg.vocab_size * d + cfg.num_layers * per_layer + experts * 3 * d * cfg.expert_ffn)


def bf16_checkpoint(shape: str, places: list[Path], device: torch.device, results: dict) -> tuple[Path, object, int]:
    """Returns (folder, moekit config, tensor bytes) of the shape's random bf16 checkpoint under
    place/shape (the first of `places` with room for it: memory, then disk), reused when its stamp
    (the HF config) matches; other shapes' folders there go first (the machine holds one)."""
    from moekit.families import family_for

    make, kwargs = SHAPES[shape]
    hf = make(**kwargs)
    need = estimated_bytes(family_for(hf, where=shape).config(hf))
    for place in places:
        place.mkdir(parents=True, exist_ok=True)
        for other in place.iterdir():
            if other.name in SHAPES and other.name != shape:
                shutil.rmtree(other, ignore_errors=True)
    tmp = next((p for p in places if (p / shape / "bf16.stamp").exists() or free_bytes(p) > 1.05 * need), places[-1])
    folder, stamp = tmp / shape / "bf16", tmp / shape / "bf16.stamp"
    t0 = time.perf_counter()
    if stamp.exists() and (folder / "config.json").exists() and json.loads(stamp.read_text())["hf"] == hf:
        cfg, tensor_bytes = family_for(hf, where=str(folder)).config(hf), json.loads(stamp.read_text())["tensor_bytes"]
        reused = True
    else:
        stamp.unlink(missing_ok=True)
        folder, cfg, tensor_bytes = write_random_checkpoint(folder, hf, device, tokenizer_from=moekit.default_model_path())
        stamp.write_text(json.dumps({"hf": hf, "tensor_bytes": tensor_bytes}))
        reused = False
    results["checkpoint"] = {"path": str(folder), "tensor_bytes": tensor_bytes, "write_s": time.perf_counter() - t0,
                             "reused": reused}
    common.log(f"checkpoint {shape}: {tensor_bytes / 1e9:.2f} GB {'reused' if reused else 'written'} in "
               f"{results['checkpoint']['write_s']:.0f} s")
    return folder, cfg, tensor_bytes


def compressed_bytes(tensor_bytes: int, form: str) -> float:
    """Returns a bound on the bytes of moekit's `form` copy of a bf16 checkpoint of tensor_bytes."""
    return tensor_bytes * {"int4": 4.2, "int2": 2.2, "ternary": 1.0}[form] / 16  # stored bits per weight, scales in


def compressed_checkpoint(bf16: Path, form: str, places: list[Path], device: torch.device, results: dict,
                          reserve_bytes: float) -> Path | None:
    """Returns the folder of moekit's RTN `form` copy of `bf16` (the first of `places` with room
    beside `reserve_bytes`), its report in results['compressed'][form]; None after a failure."""
    from moekit.quant.compress import compress
    from moekit.quant.config import QuantConfig

    need = compressed_bytes(results["checkpoint"]["tensor_bytes"], form)
    place = next((p for p in places if free_bytes(p) > need + reserve_bytes), places[-1])
    out = place / bf16.parent.name / form
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = results.setdefault("compressed", {})[form] = {"path": str(out)}
    try:
        rep = compress(bf16, out, QuantConfig(method="rtn", **FORMS[form]), None, device=device, progress=False)
    except Exception as e:  # noqa: BLE001 -- one form failing must not lose the others
        info["error"] = f"{type(e).__name__}: {e}"[:2000]
        common.log(f"compress {form} failed: {info['error']}")
        return None
    info.update(seconds=time.perf_counter() - t0, bits_per_expert_param=rep.bits_per_expert_param,
                expert_bytes=rep.expert_bytes, other_bytes=rep.other_bytes,
                method=f"RTN {form} (moekit.quant.compress, no calibration)")
    common.log(f"compressed {form}: {rep.expert_bytes / 1e9:.2f} GB of experts, {rep.bits_per_expert_param:.3f} "
               f"bits/expert param, {info['seconds']:.0f} s, in {out}")
    return out


# ---- the rows ---------------------------------------------------------------------------------------

def llamacpp_gpu_rows(lcpp: LlamaCpp, rows: set, cfg, forms: list[str], modes: list[str], cores: int) -> None:
    """Runs llama.cpp's rows the selected moekit rows are set against (the CUDA build): bf16 all on
    the GPU, -ncmoe all / half, and per int form its llama-quantize type at the chosen modes."""
    moe_layers = sum(cfg.moe_layers)
    ncmoe = {"host": moe_layers, "half": (moe_layers + 1) // 2}
    decode = ["-p", "0", "-n", str(NEW), "-ngl", "99"]
    if "resident" in rows:
        lcpp.bench("decode_gpu", decode)
        lcpp.bench("prefill_gpu", ["-p", "512", "-n", "0", "-ngl", "99"])
    bf16_modes = [m for m in MODES if m in rows or ("compressed" in rows and "ternary" in forms and m in modes)]
    for mode in bf16_modes:
        lcpp.bench(MODES[mode], decode + ["-ncmoe", str(ncmoe[mode])])
    if "compressed" in rows:
        for form in forms:
            if form in QUANT_TYPES and lcpp.quantize(QUANT_TYPES[form], cores):
                for mode in modes:
                    lcpp.bench(f"{MODES[mode]}_{QUANT_TYPES[form]}", decode + ["-ncmoe", str(ncmoe[mode])],
                               gguf=QUANT_TYPES[form])
                lcpp.drop(QUANT_TYPES[form])


def offloaded_rows(path: Path, form: str, settings: list[str], misses_list: list[str], results: dict, cfg,
                   device: torch.device, prompt, idle_mib, expert_stored_bytes: float, record, deadline: float) -> None:
    """Runs moekit offloaded at llama.cpp's footprint of each setting (the row's name for bf16 and
    ternary, the llama-quantize type's for int forms), with each misses mode, and the combined ceiling."""
    from lcpp_bars import llama_row_name

    lc = (results.get("llamacpp") or {}).get("rows", {})
    rates, gpu = results.get("rates") or {}, next((r for r in results["moekit"] if r["setting"] == "decode_gpu"), {})
    combined = rates.get("cpu_read_concurrent_bytes_per_s", 0) + rates.get("h2d_concurrent_bytes_per_s", 0)
    per_token = sum(cfg.moe_layers) * cfg.top_k * expert_stored_bytes
    total = sum(cfg.experts_in(i) for i, m in enumerate(cfg.moe_layers) if m)

    def with_ceiling(row: dict) -> dict:  # every uncached expert missed (batch 1: none reused), both links at once
        cached = (row.get("report") or {}).get("cache_slots") or 0
        row["missed_bytes_per_token_uniform"] = missed = per_token * max(0.0, 1 - cached / total)
        if missed and combined:
            row["ceiling_tok_s"] = min(combined / missed, gpu.get("decode_tok_s") or float("inf"))
        return row

    for misses in misses_list:  # the first mode at every footprint before the next: the time budget drops the last
        for setting in settings:
            ref = llama_row_name(setting, form)
            budget = (lc.get(ref) or {}).get("gpu_used_bytes") or results["footprints"].get(setting)
            if not budget:
                common.log(f"moekit {form} {setting}: no footprint (llama.cpp row {ref} missing): skipped")
                continue
            if time.perf_counter() > deadline:  # logged too: the 2ef1e0c Qwen3 call lost its row silently
                results.setdefault("skipped", []).append(f"{form} {setting} {misses}: past --time-budget-s")
                common.log(f"moekit {form} {setting} {misses}: skipped, past --time-budget-s {deadline - common.T_START:.0f} s")
                continue
            common.log(f"moekit {form} {setting} {misses} at {budget / 1e9:.2f} GB: starting")  # a crash's last line
            row = with_ceiling(moekit_row(path, device, int(budget), misses, prompt, idle_mib))
            row.update(setting=setting, form=form, footprint_of=ref)
            record(row, f"{form} {setting} {misses} at {budget / 1e9:.2f} GB")
            least = least_budget(row.get("refusal") or "")
            if least:  # refused at llama.cpp's footprint: the same row at the least budget moekit takes
                again = with_ceiling(moekit_row(path, device, least, misses, prompt, idle_mib))
                again.update(setting=setting + "_at_least", form=form, footprint_of=ref)
                record(again, f"{form} {setting} {misses} at {least / 1e9:.2f} GB")


def cpu_rows(ckpt: Path, lcpp: LlamaCpp | None, results: dict, cfg, rounds: int, dtypes: list[torch.dtype],
             record, deadline: float = float("inf")) -> None:
    """The no-GPU comparison: moekit on the CPU (all this process's cores), its warm bf16 decode
    `rounds` times, each after a llama.cpp CPU decode run (and one more after the last), so both
    engines sample the same drifting host; float32 once."""
    cores = len(os.sched_getaffinity(0))
    cpu = torch.device("cpu")
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT))
    decode_args = ["-p", "0", "-n", str(NEW), "-t", str(cores)]
    if lcpp is not None and lcpp.ok:
        lcpp.bench("prefill_cpu_only", ["-p", str(PROMPT), "-n", "0", "-t", str(cores)], no_gpu=True)
    for dtype in dtypes:
        if time.perf_counter() > deadline:
            results.setdefault("skipped", []).append(f"cpu row {dtype}: past --time-budget-s")
            common.log(f"moekit cpu row {dtype}: skipped, past --time-budget-s")
            continue
        load_before = os.getloadavg()  # the cores may be shared: a figure taken under load is not the engine's
        between = None
        if dtype == torch.bfloat16 and lcpp is not None and lcpp.ok:
            def between(i: int) -> None:
                lcpp.bench(f"decode_cpu_only_round{i}", decode_args, no_gpu=True)
        row = moekit_row(ckpt, cpu, None, None, prompt, dtype=dtype, prefill_tokens=PROMPT,
                         rounds=rounds if dtype == torch.bfloat16 else 1, between=between)
        row.update(setting="decode_cpu_only", dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(),
                   loadavg_before=load_before, loadavg_after=os.getloadavg())
        record(row, f"--device cpu {row['dtype']} (prefill {row.get(f'prefill_{PROMPT}_tok_s')} tok/s)")
        if between is not None:
            lcpp.bench(f"decode_cpu_only_round{rounds}", decode_args, no_gpu=True)  # brackets the last moekit call
            results["cpu_interleaved"] = interleaved(results, row, rounds)
            common.log(f"interleaved: {results['cpu_interleaved']}")


def compressed_cpu_rows(paths: dict, lcpp: LlamaCpp | None, results: dict, cfg, record) -> None:
    """No GPU: moekit's compressed checkpoints resident on the CPU next to llama.cpp's CPU decode of
    the llama-quantize type of the same bits (ternary: next to the bf16 GGUF's decode)."""
    cores = len(os.sched_getaffinity(0))
    decode_args = ["-p", "0", "-n", str(NEW), "-t", str(cores)]
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT))
    if lcpp is not None and lcpp.ok and "ternary" in paths and "decode_cpu_only" not in results["llamacpp"]["rows"]:
        lcpp.bench("decode_cpu_only", decode_args, no_gpu=True)
    for form, path in paths.items():
        if lcpp is not None and lcpp.ok and form in QUANT_TYPES and lcpp.quantize(QUANT_TYPES[form], cores):
            lcpp.bench(f"decode_cpu_only_{QUANT_TYPES[form]}", decode_args, gguf=QUANT_TYPES[form], no_gpu=True)
            lcpp.drop(QUANT_TYPES[form])
        row = moekit_row(path, torch.device("cpu"), None, None, prompt, dtype=torch.bfloat16, prefill_tokens=PROMPT)
        row.update(setting="decode_cpu_only", form=form, threads=torch.get_num_threads())
        record(row, f"--device cpu {form} (prefill {row.get(f'prefill_{PROMPT}_tok_s')} tok/s)")
        shutil.rmtree(path, ignore_errors=True)


# ---- main -------------------------------------------------------------------------------------------

def parse_rows(text: str, device: torch.device) -> set:
    rows = {r.strip().replace("cpu16", "cpu") for r in text.split(",") if r.strip()}
    bad = rows - set(ROWS)
    if bad:
        raise SystemExit(f"--rows: unknown {sorted(bad)}; pick from {', '.join(ROWS)}")
    if device.type != "cuda" and rows & {"resident", "host", "half"}:
        common.log(f"no GPU: rows {sorted(rows & {'resident', 'host', 'half'})} skipped (they need one)")
        rows -= {"resident", "host", "half"}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_output_args(parser, NAME)
    parser.add_argument("--name", default=NAME, help="the JSON's name in --out (one per call)")
    parser.add_argument("--shape", default="olmoe-1b-7b", choices=tuple(SHAPES))
    parser.add_argument("--rows", default=None, help=f"comma list of {', '.join(ROWS)} (cpu16 = cpu); "
                        "default resident,host,half,rates with a GPU, cpu without")
    parser.add_argument("--anchor", default=str(common.REPO / ".anchors" / "llamacpp"))
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--tmp", default="/dev/shm/moekit_llamacpp", help="the checkpoints (one shape at a time)")
    parser.add_argument("--disk-tmp", default="/tmp/moekit_llamacpp",
                        help="compressed checkpoints when memory is short, and llama.cpp's build and convert logs")
    parser.add_argument("--gguf-dir", default="/dev/shm/moekit_gguf",
                        help="the GGUFs, when memory holds them beside the run (else $LCPP_ROOT/gguf on disk)")
    parser.add_argument("--export-build", action="store_true",
                        help="write llama.cpp's built bin/ into --out as lcpp-bin.tgz.NN (15 MiB parts) for --import-build")
    parser.add_argument("--import-build", default="",
                        help="a folder holding lcpp-bin.tgz.NN (an earlier call's --export-build): no build")
    parser.add_argument("--reserve-gb", type=float, default=None,
                        help="memory left free beside files in /dev/shm (default: the bf16 tensor bytes + 8 GB "
                             "with a GPU, for moekit's host copy of the experts; 1 GB without)")
    parser.add_argument("--prefill-fused-rows", type=int, default=0,
                        help="also time the resident prefill with moekit.fused's kernels allowed up to this many "
                             "token rows (e.g. 4096; the default bound 256 leaves a 512-token prefill to PyTorch)")
    parser.add_argument("--profile-prefill", action="store_true",
                        help="profile the resident row's 512-token forward (torch.profiler; run it last or alone: "
                             "the offload rows after it measured ~2x slower in the same process)")
    parser.add_argument("--misses", default="auto,cpu", help="misses modes of the bf16 host / half rows (in this order: "
                        "the time budget drops the last); MODE:PREDICTOR sets the predictor too (auto:none: "
                        "the H200's CPU-miss profile at 0284941 had speculative prefetch 13-24%% slower than none), "
                        "MODE:PREDICTOR:THREADS the CPU expert threads (cpu::12; default: torch's threads - 1)")
    parser.add_argument("--forms", default="int4,int2,ternary", help="moekit's compressed forms (compressed rows)")
    parser.add_argument("--dense", choices=("bf16", "int8"), default="bf16",
                        help="moekit's attention projections and LM head on the GPU: bf16, or int8 rows "
                             "(--quantize-dense int8; llama.cpp's Q4_K_M / Q2_K quantize them too)")
    parser.add_argument("--compressed-modes", default="host,half", help="footprints of the compressed rows")
    parser.add_argument("--compressed-misses", default="auto", help="misses modes of the compressed rows")
    parser.add_argument("--cpu-rounds", type=int, default=None, help="interleaved rounds of the cpu row "
                        "(default 5 without a GPU, on shared cores; 2 on the H200 host)")
    parser.add_argument("--time-budget-s", type=float, default=520.0,
                        help="moekit's offloaded rows and the cpu row stop starting after this many seconds "
                             "(a row started just before may take ~50 s: the device call's limit is 600 s)")
    parser.add_argument("--probe-fit", default="", help="budget shares to run with MOEKIT_DEBUG_FIT=1 while llama.cpp builds")
    parser.add_argument("--footprints", default="", help="GPU bytes 'host,half' to use when llama.cpp is skipped")
    args = parser.parse_args()
    global DENSE
    DENSE = args.dense
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rows = parse_rows(args.rows or ("resident,host,half,rates" if cuda else "cpu"), device)
    forms = [f for f in args.forms.split(",") if f]
    modes = [m for m in args.compressed_modes.split(",") if m]
    if set(forms) - set(FORMS) or set(modes) - set(MODES):
        raise SystemExit(f"--forms picks from {', '.join(FORMS)}; --compressed-modes from {', '.join(MODES)}")
    idle_before_cuda = GpuMemorySampler.used_mib() if cuda else None  # before this process's context
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a row that kills the process (a segfault, an abort) leaves every thread's stack here, in --out:
    # the H200 run at 14980b7 died in a row and only the tail of its output came back
    faults = open(out / f"{args.name}_faults.log", "w")  # noqa: SIM115 -- open for the process's life
    faulthandler.enable(file=faults, all_threads=True)
    results: dict = {"meta": common.run_meta(args, device), "host": common.host_info(), "shape": args.shape,
                     "rows": sorted(rows), "cores": cores,
                     "moekit": []}
    deadline = common.T_START + args.time_budget_s

    def save() -> None:
        results["table"] = table(results)
        common.write_json(results, out, args.name)

    def record(row: dict, what: str) -> None:
        results["moekit"].append(row)
        common.log(f"moekit {what}: {row.get('decode_tok_s')} tok/s ({row['status']}) {row.get('refusal', '')[:200]}")
        save()

    lcpp = None
    if not args.skip_llamacpp:  # the build first: the checkpoint is written while it compiles
        lcpp = LlamaCpp(Path(args.anchor), args.shape, Path(args.disk_tmp) / f"llamacpp_{args.name}",
                        out / f"{args.name}_llamacpp.log", cuda, results, save)
        if args.import_build:
            lcpp.import_build(Path(args.import_build))
        lcpp.start_build()
    ckpt, cfg, tensor_bytes = bf16_checkpoint(args.shape, [Path(args.tmp), Path(args.disk_tmp)], device, results)
    tmp = ckpt.parent.parent
    if lcpp is not None:  # the GGUF in memory when it leaves room for moekit's host copy of the experts
        shm = Path(args.gguf_dir)
        roomy = free_bytes(shm) > 1.1 * tensor_bytes + (tensor_bytes + 8e9 if cuda else 1e9)
        lcpp.start_convert(ckpt, shm if roomy else lcpp.root / "gguf")
    if args.probe_fit:  # memory only: may overlap the build
        results["fit_probe"] = probe_fit(ckpt, tensor_bytes, [float(v) for v in args.probe_fit.split(",")], out)
        save()
    compressed: dict[str, Path] = {}
    places = [tmp, Path(args.disk_tmp)]
    reserve = args.reserve_gb * 1e9 if args.reserve_gb is not None else (tensor_bytes + 8e9 if cuda else 1e9)
    lazy: list[str] = []
    if "compressed" in rows:  # written while llama.cpp builds (GPU work, no timing) when all fit at once
        need = sum(compressed_bytes(tensor_bytes, f) for f in forms) + 2 * 0.3 * tensor_bytes  # + the quantized GGUFs
        if any(free_bytes(p) > need + (reserve if p == tmp else 10e9) for p in places):
            for form in forms:
                path = compressed_checkpoint(ckpt, form, places, device, results, reserve)
                if path is not None:
                    compressed[form] = path
        else:  # each written just before its rows and deleted after (the 64 GB disk, a 30 GB checkpoint)
            lazy = list(forms)
            common.log(f"compressed checkpoints: {need / 1e9:.1f} GB do not fit beside the run; one at a time")
        save()
    if lcpp is not None and lcpp.wait():
        if args.export_build and "import_build" not in results["llamacpp"]:
            lcpp.export_build(out)
        if cuda:
            llamacpp_gpu_rows(lcpp, rows, cfg, forms, modes, cores)
    from moekit.native import library, unavailable_reason

    results["native_library"] = bool(library()) or unavailable_reason()
    if cuda and rows & {"host", "half", "compressed"} or "rates" in rows:
        rates = results["rates"] = cpu_and_link_rates(device, max(1, cores - 1))
        if "rates" in rows:
            rates.update(kernel_rates(cfg, max(1, cores - 1)))
            if "compressed" in rows:  # they encode experts of the shape: 373 s at Mixtral's (f51a719)
                rates.update(compressed_kernel_rates(cfg, max(1, cores - 1)))
        common.log("rates (GB/s): " + ", ".join(f"{k}={v / 1e9:.1f}" for k, v in rates.items() if k.endswith("_per_s")))
        save()
    given = [int(float(v)) for v in args.footprints.split(",") if v]
    results["footprints"] = dict(zip(MODES.values(), given))
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT), device=device)
    idle_mib = results["idle_used_mib_before_cuda"] = idle_before_cuda
    bf16_expert_bytes = 3 * cfg.hidden_size * cfg.expert_ffn * 2
    if cuda and "resident" in rows:
        gpu = moekit_row(ckpt, device, None, None, prompt, idle_mib, profile_prefill=args.profile_prefill,
                         fused_rows=args.prefill_fused_rows)
        gpu.update(setting="decode_gpu", form="bf16")
        record(gpu, f"all on GPU (prefill {gpu.get('prefill_512_tok_s')} tok/s)")
    if cuda:
        settings = [MODES[m] for m in MODES if m in rows]
        offloaded_rows(ckpt, "bf16", settings, args.misses.split(","), results, cfg, device, prompt, idle_mib,
                       bf16_expert_bytes, record, deadline)
        experts = sum(cfg.experts_in(i) for i, m in enumerate(cfg.moe_layers) if m)
        # every form at the first footprint before any at the next (what a cut-short call keeps); a form
        # written only now (lazy) runs all its footprints and goes
        order = [(f, modes) for f in lazy] if lazy else [(f, [m]) for m in modes for f in forms]
        for form, its_modes in order:
            path = compressed.get(form)
            # a copy written now must leave time for its rows: ~4 s per GB of bf16 read (RTN on the GPU), ~60 s a row
            if path is None and form in lazy and time.perf_counter() + 4e-9 * tensor_bytes + 60 < deadline:
                path = compressed_checkpoint(ckpt, form, places, device, results, reserve)
            if path is None:
                continue
            stored = results["compressed"][form]["expert_bytes"] / experts
            offloaded_rows(path, form, [MODES[m] for m in its_modes], args.compressed_misses.split(","), results,
                           cfg, device, prompt, idle_mib, stored, record, deadline)
            if form in lazy:
                shutil.rmtree(path, ignore_errors=True)
    elif compressed:
        compressed_cpu_rows(compressed, lcpp, results, cfg, record)
    if "cpu" in rows:
        rounds = args.cpu_rounds or (2 if cuda else 5)
        cpu_rows(ckpt, lcpp, results, cfg, rounds, [torch.bfloat16] if cuda else [torch.bfloat16, torch.float32], record,
                 deadline)
    for path in compressed.values():
        shutil.rmtree(path, ignore_errors=True)
    save()
    print(results["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
