"""Rewrites the benchmark tables of README.md and benchmarks/results/README.md from the results JSON,
so that no figure is copied by hand.

A table is the text between `<!-- table:NAME -->` and `<!-- /table:NAME -->` (each marker on a line
of its own); NAME is a key of TABLES, whose function renders the table from the JSON files it
names in benchmarks/results/. Text outside the markers is never touched.

    python3 benchmarks/tables.py            # rewrite every marked table
    python3 benchmarks/tables.py --check    # print the differences, exit 1 if a table is stale

A marker whose JSON is missing is left as it is (and named on stderr).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from functools import partial
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DOCS = (BENCH_DIR.parent / "README.md", RESULTS_DIR / "README.md")


def load(name: str) -> dict:
    return json.loads((RESULTS_DIR / name).read_text())


def num(v: float) -> str:
    """Returns a rate as the tables write it: thousands separated and whole from 1,000 up, one
    decimal below."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Returns a markdown table; an empty cell is written `| |`."""
    def line(cells: list[str]) -> str:
        return re.sub(r"\|  (?=\|)", "| ", "| " + " | ".join(cells) + " |")

    return "\n".join([line(header), "|" + "---|" * len(header)] + [line(r) for r in rows])


# ---- bench_resident.json ----------------------------------------------------------------------------

RESIDENT_ROWS = [  # (metric, engine in the JSON, label in the table)
    ("decode B=1", "moekit compiled+graphs", "moekit compiled + CUDA graph (`--compile`)"),
    ("decode B=1", "moekit graphs", "moekit CUDA graph (default on GPU)"),
    ("decode B=1", "moekit eager", "moekit eager (`--no-cuda-graph`)"),
    ("decode B=1", "hf default", "transformers `generate` (default cache)"),
    ("decode B=1", "hf static", "transformers static cache"),
    ("decode B=1", "hf static+compile", "transformers static cache + torch.compile"),
    ("decode B=8", "moekit compiled+graphs", "moekit compiled + CUDA graph"),
    ("decode B=8", "moekit graphs", "moekit CUDA graph"),
    ("decode B=8", "hf default", "transformers default"),
    ("decode B=32", "moekit compiled+graphs", "moekit compiled + CUDA graph"),
    ("decode B=32", "moekit graphs", "moekit CUDA graph"),
    ("decode B=32", "hf default", "transformers default"),
    ("prefill T=128 B=1", "moekit", "moekit"),
    ("prefill T=128 B=1", "transformers", "transformers"),
    ("prefill T=1024 B=1", "moekit", "moekit"),
    ("prefill T=1024 B=1", "transformers", "transformers"),
    ("peak GPU memory", "moekit", "moekit"),
    ("peak GPU memory", "transformers", "transformers"),
]


def resident_rows(res: dict) -> dict[tuple[str, str], dict]:
    """Returns bench_resident's table rows keyed by (metric, engine); peak rows under 'peak GPU memory'."""
    out = {}
    for r in res["table"]:
        metric = "peak GPU memory" if r["metric"].startswith("peak GPU memory") else r["metric"]
        out[(metric, r["engine"])] = r
    return out


def resident(files: dict) -> str:
    """The resident engine table of benchmarks/results/README.md: every decode, prefill and peak row,
    the fastest decode of each batch in bold."""
    rows_by = resident_rows(files["bench_resident.json"])
    best = {}
    for (metric, _), r in rows_by.items():
        if metric.startswith("decode"):
            best[metric] = max(best.get(metric, 0), r["measured"])
    rows = []
    for metric, engine, label in RESIDENT_ROWS:
        r = rows_by.get((metric, engine))
        if r is None:
            continue
        if metric == "peak GPU memory":
            rows.append([label, r["metric"], f"{r['measured']:.1f} {r['unit']}", "-", "-"])
            continue
        measured = f"{num(r['measured'])} {r['unit']}"
        if metric.startswith("decode") and r["measured"] == best[metric]:
            measured = f"**{measured}**"
        rows.append([label, metric, measured, f"{num(r['ceiling'])} {r['unit']}", f"{r['pct_of_ceiling']:.1f}%"])
    return table(["engine", "metric", "measured", "ceiling", "% of ceiling"], rows)


def headline(files: dict) -> str:
    """The project README's headline table: moekit next to transformers and the ceiling."""
    rows_by = resident_rows(files["bench_resident.json"])

    def cell(metric: str, engine: str, bold: bool = False) -> str:
        r = rows_by[(metric, engine)]
        v = f"{r['measured']:,.0f} {r['unit']}"
        return f"{f'**{v}**' if bold else v} ({r['pct_of_ceiling']:.0f}%)"

    def value(metric: str, engine: str) -> str:
        return f"{rows_by[(metric, engine)]['measured']:,.0f}"

    def ceiling(metric: str) -> str:
        return f"{rows_by[(metric, 'moekit' if metric.startswith('prefill') else 'moekit graphs')]['ceiling']:,.0f}"

    peak_m, peak_t = rows_by[("peak GPU memory", "moekit")], rows_by[("peak GPU memory", "transformers")]
    weights = re.search(r"weights ([0-9.]+) GiB", peak_m["metric"])
    weights_label = f" ({float(weights.group(1)):.1f} GiB of weights)" if weights else ""
    return table(["", "moekit", "transformers", "ceiling"], [
        ["decode B=1, `--compile`", cell("decode B=1", "moekit compiled+graphs", True),
         f"{value('decode B=1', 'hf default')} default, {value('decode B=1', 'hf static+compile')} static cache + compile",
         ceiling("decode B=1")],
        ["decode B=1, default CUDA graph", cell("decode B=1", "moekit graphs"), "", ceiling("decode B=1")],
        ["decode B=32, `--compile`", cell("decode B=32", "moekit compiled+graphs", True),
         value("decode B=32", "hf default"), ceiling("decode B=32")],
        ["prefill 1024 tokens", cell("prefill T=1024 B=1", "moekit"), value("prefill T=1024 B=1", "transformers"),
         f"{ceiling('prefill T=1024 B=1')} (roofline)"],
        [f"peak GPU memory{weights_label}", f"{peak_m['measured']:.1f} GiB", f"{peak_t['measured']:.1f} GiB", ""],
    ])


# ---- tune_slot_kernels.json ---------------------------------------------------------------------------

SLOT_FIRST_GUESS = [32, 128, 4]  # the tile before tuning (rows, columns, warps)


def slot_tiles(files: dict) -> str:
    """The per-slot kernel tiles: tuned tile and its GB/s against the first guess, per shape."""
    res = files["tune_slot_kernels.json"]
    rows = []
    for shape, kernels in res["results"].items():
        for kernel, label in (("gate_up", "gate_up+SwiGLU"), ("down", "down")):
            runs = [r for r in kernels.get(kernel, []) if "us" in r]
            if not runs:
                continue
            best = min(runs, key=lambda r: r["us"])
            first = next((r for r in runs if r["cfg"] == SLOT_FIRST_GUESS), None)
            bn, bk, warps = best["cfg"]
            rows.append([shape, label, f"{bn} x {bk}, {warps} warps", f"{best['GB/s']:,.0f}",
                         f"{first['GB/s']:,.0f}" if first else "-"])
    return table(["shape", "kernel", "tuned", "GB/s", "first guess GB/s"], rows)


# ---- bench_budget.json (issue 11) ---------------------------------------------------------------------

# later partial runs, rendered beside the whole runs' tables (2026-12-01, b928407)
FAMILIES_RERUN = "bench_families_resident_b928407.json"
FAMILIES_LATEST = "bench_families_d3305c3.json"  # 2026-12-01: decode matvec, fused-sum and MXFP4 words kernels
SERVE_RERUN = "bench_serve_c1_c32_b928407.json"
PIPELINE_RERUN = "bench_pipeline_graphs_b928407.json"
PIPELINE_PREFILL = "bench_pipeline_prefill_ef150b8.json"  # 2026-12-01: after the untouched host KV pool (355cb27)
PIPELINE_32L = "bench_pipeline_32l_c8f8092.json"  # 2026-12-01: all 32 layers of the Mixtral shape
PIPELINE_32L_FORMS = "bench_pipeline_32l_forms_13a0b14.json"  # 2026-12-04: the same, ternary and int4 experts
PIPELINE_32L_FORMS_2M = "bench_pipeline_32l_forms_fdc2c8a.json"  # 2026-12-04 (session 25): ternary, 2 MB KV pages
PIPELINE_32L_FORMS_CAL = "bench_pipeline_32l_forms_b96ebbe.json"  # 2026-12-04 (session 25): HRM calibrated in the pipeline
ATTENTION_FAMILIES = "probe_cpu_attention_families_fdc2c8a.json"
PIPELINE_8L_PREFETCH = "bench_pipeline_8l_ternary_prefetch_7d50fba.json"  # the kernel asking for its next sequence's rows
# 2026-12-04 (session 27): issue 14's rows at all 32 layers after the kernel's prefetch (4af8576): the forms at
# gen 32/128/256, then bf16 gen 32 with the baselines (gen 128: c8f8092's run; gen 256 not run)
PIPELINE_32L_ALL = ("bench_pipeline_32l_baselines_73d62b2.json", PIPELINE_32L, "bench_pipeline_32l_ternary_gens_a676493.json",
                    "bench_pipeline_32l_int4_gens_a676493.json")
ATTENTION_FAMILIES_FMA = "probe_cpu_attention_families_f1807f2.json"  # the kernel at the FMAs' rate (77074d4)  # the CPU attention kernel by family, pages, items
BUDGET_RERUNS = ("bench_budget_rerun.json",  # rows run again later (bench_budget.py --name ...), first found wins
                 "bench_budget_rerun8.json",  # 2026-12-01: the command line's 8% row
                 "bench_budget_rerun_ternary.json",  # 2026-12-01 (703262a): the command line's ternary rows
                 "bench_budget_rerun_ternary8.json")  # 2026-12-01 (de88543): the command line's ternary 8% row
BUDGET_SHAPES = {  # bench_budget.py --shape S: the other shapes of issue 11, files in the order they ran
    "mixtral-8x7b-8l": ("bench_budget_mixtral.json", "bench_budget_mixtral2.json", "bench_budget_mixtral3.json",
                        "bench_budget_mixtral_ternary.json"),
    "qwen3-30b-a3b-24l": ("bench_budget_qwen3.json", "bench_budget_qwen3_8.json", "bench_budget_qwen3_ternary.json"),
}


def budget_rows(res: dict) -> dict[tuple[str, str, float], dict]:
    """Returns bench_budget's rows keyed by (path, form, share); the JSON repeats each refused row
    once, the first is kept. A row that bench_budget.json lacks or skipped is taken from the first
    of BUDGET_RERUNS that ran it, marked with the rerun's commit ('rerun_commit')."""
    out: dict[tuple[str, str, float], dict] = {}
    for r in res["rows"]:
        out.setdefault((r["path"], r["form"], r["share"]), r)
    for name in BUDGET_RERUNS:
        if not (RESULTS_DIR / name).exists():
            continue
        rerun = load(name)
        for r in rerun["rows"]:
            key = (r["path"], r["form"], r["share"])
            if key not in out or out[key]["status"].startswith("skipped"):
                out[key] = {**r, "rerun_commit": rerun["meta"]["commit"]}
    return out


def budget_peak(r: dict) -> str:
    """Returns 'peak / budget GB (share)' of a row that ran, saying by how much a peak went over."""
    peak, budget = r["peak_bytes"], r["budget_bytes"]
    cell = f"{peak / 1e9:.3f} / {budget / 1e9:.3f} GB ({peak / budget:.1%})"
    return cell if peak <= budget else f"{cell}, **{(peak - budget) / 1e6:.1f} MB over**"


def budget_outcome(r: dict) -> str:
    """Returns a refused or skipped row as a short cell: what the warm-up measured and what it asked for."""
    if r["status"].startswith("skipped"):  # 'skipped (time budget)'
        return f"not run ({r['status'].removeprefix('skipped (').rstrip(')')})"
    if r["status"] != "refused":
        return r["status"]
    if r["refusal"].startswith("could not fit"):
        return "refused: the measured warm-up did not converge (each measurement held ~36 MB more; fixed in 0153646, not re-measured)"
    m = re.search(r"measured ([0-9.]+)MB with (\d+) experts cached.*give at least ([0-9.]+)MB", r["refusal"])
    if not m:
        return f"refused: {r['refusal']}"
    measured_gb, experts, needs_gb = float(m.group(1)) / 1e3, m.group(2), float(m.group(3)) / 1e3
    return f"refused: needs {needs_gb:.3f} GB (measured {measured_gb:.3f} with {experts} experts)"


def budget_cached(r: dict) -> str:
    """Returns 'S of E': expert-cache slots after the warm-up, of the model's experts."""
    return f"{r['report']['cache_slots']} of {r['report']['plan']['total_experts']}"


def budget(files: dict) -> str:
    """The offload budget table of benchmarks/results/README.md: every budget, form and path (API
    or CLI) with decode speed, allocator peak against the budget and experts cached, or the refusal."""
    res = files["bench_budget.json"]
    rows = [["all resident (GPU-only)", form, "api", f"{g['decode_tok_s']:.1f}", f"{g['peak_bytes'] / 1e9:.2f} GB peak",
             "-", "all", "ok"] for form, g in res["gpu_only"].items()]
    by = budget_rows(res)
    for path in ("api", "cli"):
        for share in sorted({k[2] for k in by}, reverse=True):
            for form in res["gpu_only"]:
                r = by.get((path, form, share))
                if r is None:
                    continue
                label = f"{share:.0%} ({r['budget_bytes'] / 1e9:.3f} GB)"
                if r["status"] == "ok":
                    plan = r["report"]["plan"]
                    planned = f"{plan['planned_bytes'] / 1e9:.3f} / {plan['measured_peak_bytes'] / 1e9:.3f}"
                    status = f"ok (at {r['rerun_commit']})" if "rerun_commit" in r else "ok"
                    rows.append([label, form, path, f"{r['decode_tok_s']:.1f}", budget_peak(r), planned,
                                 budget_cached(r), status])
                else:
                    rows.append([label, form, path, "-", "-", "-", "-", budget_outcome(r)])
    return table(["budget", "experts", "via", "decode tok/s", "peak / budget", "planned / warm-up peak GB",
                  "experts cached", "status"], rows)


def budget_headline(files: dict) -> str:
    """The project README's offload budget table: per budget and form, the API and the CLI side by side."""
    res = files["bench_budget.json"]
    by = budget_rows(res)

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        if r["status"] != "ok":
            return budget_outcome(r).split(" (measured")[0]
        at = f" (at {r['rerun_commit']})" if "rerun_commit" in r else ""
        return f"{r['decode_tok_s']:.1f}, {budget_peak(r)}{at}"

    rows = [["GPU-only", form, f"{g['decode_tok_s']:.0f}, {g['peak_bytes'] / 1e9:.2f} GB peak", ""]
            for form, g in res["gpu_only"].items()]
    for share in sorted({k[2] for k in by}, reverse=True):
        for form in res["gpu_only"]:
            api, cli = by.get(("api", form, share)), by.get(("cli", form, share))
            budget_bytes = (api or cli)["budget_bytes"]
            rows.append([f"{share:.0%} ({budget_bytes / 1e9:.2f} GB)", form, cell(api), cell(cli)])
    return table(["budget", "experts", "`load_offloaded`: tok/s, peak / budget", "`moekit generate --offload`"], rows)


def budget_shapes(files: dict) -> str:
    """The other shapes' budget rows (bench_budget.py --shape): per shape, form, budget and path,
    decode speed and allocator peak against the budget, or the refusal; the commit of each run."""
    rows = []
    for shape, names in BUDGET_SHAPES.items():
        by: dict[tuple[str, str, float], tuple[dict, str]] = {}
        for name in names:  # a later run's row replaces an earlier one
            res = files[name]
            for r in res["rows"]:
                if not r["status"].startswith("skipped"):
                    by[(r["form"], r["path"], r["share"])] = (r, res["meta"]["commit"])
        for (form, path, share), (r, commit) in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
            label = f"{share:.0%} ({r['budget_bytes'] / 1e9:.2f} GB)"
            if r["status"] == "ok":
                rows.append([shape, form, label, path, f"{r['decode_tok_s']:.1f}", budget_peak(r), "ok", commit])
            else:
                rows.append([shape, form, label, path, "-", "-", budget_outcome(r), commit])
    return table(["shape", "experts", "budget", "via", "decode tok/s", "peak / budget", "status", "commit"], rows)


# ---- bench_llamacpp*.json: moekit vs llama.cpp on one checkpoint (issue 12) ---------------------------

LLAMA_FILES = ("bench_llamacpp.json", "bench_llamacpp_cpu_rows.json")
LLAMA_SETTINGS = [  # (moekit setting, llama.cpp row, label)
    ("decode_gpu", "decode_gpu", "decode, everything on the GPU"),
    ("decode_cpu_experts", "decode_cpu_experts", "decode, all experts in host memory (`-ncmoe 16`)"),
    ("decode_half_experts", "decode_half_experts", "decode, half the layers' experts on the CPU (`-ncmoe 8`)"),
]


def vs_llamacpp(files: dict) -> str:
    """The project README's table: llama.cpp's figure and GPU footprint (nvidia-smi, its CUDA context
    included) next to moekit at that footprint as --device-memory (its allocator-enforced budget;
    nvidia-smi's figure for moekit beside it), with the combined ceiling of the same run."""
    full = files["bench_llamacpp.json"]
    lc = full["llamacpp"]["rows"]
    rows = []
    for run in (full, files["bench_llamacpp_cpu_rows.json"]):
        commit = run["meta"]["commit"]
        for r in run["moekit"]:
            setting = r["setting"].removesuffix("_at_least")  # a refused row re-run at the budget moekit asked for
            label, theirs = next((lbl, lc[row]) for name, row, lbl in LLAMA_SETTINGS if name == setting)
            if setting != r["setting"]:
                label += ", at the least budget moekit takes"
            ours = r.get("decode_tok_s")
            smi = f", {r['gpu_used_bytes'] / 1e9:.2f} GB in nvidia-smi" if r.get("gpu_used_bytes") else ""
            budget = f"{r['budget_bytes'] / 1e9:.2f} GB budget{smi}" if r.get("budget_bytes") else f"all resident{smi}"
            rows.append([label, f"{theirs['tok_s']:.1f} ({theirs['gpu_used_bytes'] / 1e9:.2f} GB)",
                         r.get("misses") or "-", budget,
                         f"{ours:.1f}" if ours else (r["status"] if r["status"] != "refused" else "refused (warm-up did not converge)"),
                         f"{ours / theirs['tok_s']:.2f}x" if ours else "-",
                         f"{r['ceiling_tok_s']:.1f}" if r.get("ceiling_tok_s") else "-", commit])
    pre = next(r for r in full["moekit"] if r["setting"] == "decode_gpu")
    rows.append(["prefill 512 tokens, everything on the GPU", f"{lc['prefill_gpu']['tok_s']:,.0f}", "-", "all resident",
                 f"{pre['prefill_512_tok_s']:,.0f}", f"{pre['prefill_512_tok_s'] / lc['prefill_gpu']['tok_s']:.2f}x", "-",
                 full["meta"]["commit"]])
    return table(["setting (OLMoE-1B-7B shape, bf16, H200)", "llama.cpp tok/s (GPU used)", "moekit misses",
                  "moekit footprint", "moekit tok/s", "moekit / llama.cpp", "ceiling tok/s", "moekit commit"], rows)


LLAMA_LATEST = "bench_llamacpp_olmoe_37f80b6.json"  # 2026-12-01 (session 13): both engines, one run, the bars
LLAMA_BEFORE = "bench_llamacpp_olmoe_a9a7ba5.json"  # 2026-12-01 (session 12), the same command
CPU_THREADS = "probe_cpu_threads_2a19960.json"  # the bf16 kernel's variants by thread count, H200 host


def vs_llamacpp_latest(files: dict, name: str = LLAMA_LATEST) -> str:
    """A same-run comparison with issue 12's bars (lcpp_bars.table: ratio, bar, ceiling)."""
    from lcpp_bars import table as bars_table

    return bars_table(files[name])


MISSES_RUN = "bench_llamacpp_olmoe_misses_ab07f17.json"  # every misses mode at llama.cpp's two offload footprints


def misses_modes(files: dict) -> str:
    """Each misses mode at the host-memory and half footprints of one run (moekit only): tok/s with
    the traffic behind it (hit rate, bytes a token read by the CPU and copied over PCIe)."""
    rows = []
    for r in files[MISSES_RUN]["moekit"]:
        rep = r.get("report") or {}
        rows.append([r["setting"].removeprefix("decode_"), r["misses"], f"{r['budget_bytes'] / 1e9:.2f}",
                     f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else r["status"],
                     f"{rep['hit_rate']:.2f}" if "hit_rate" in rep else "-",
                     f"{rep.get('cpu_bytes_per_token', 0) / 1e9:.3f}",
                     f"{rep.get('bytes_per_token', 0) / 1e9:.3f}" + (" + in-place reads, not recorded"
                                                                     if rep.get("misses_used") == "mapped" else ""),
                     str(rep.get("cpu_threads", "-"))])
    return table(["footprint", "misses", "budget GB", "tok/s", "hit rate", "CPU-read GB / token",
                  "PCIe GB / token", "CPU threads"], rows)


CPU_2CORE_RUNS = ("bench_llamacpp_cpu_2core_628d2af.json", "bench_llamacpp_cpu_2core_ec6074d.json",
                  "bench_llamacpp_cpu_2core_25f9323.json",  # before, the kernel for bf16 prefill, two rows at a time
                  "bench_llamacpp_cpu_2core_17374f2_avx2off.json",  # the AVX2 decode dot switched off, then on,
                  "bench_llamacpp_cpu_2core_17374f2.json",          # in consecutive minutes
                  "bench_llamacpp_cpu_2core_zen4_b8e3834.json",  # a Zen 4 VM: before and after the two-sum
                  "bench_llamacpp_cpu_2core_zen4_eb3dddb.json",  # AVX512-BF16 dots (8be205b), consecutive minutes
                  "bench_llamacpp_cpu_2core_zen4_rates_c2a367f.json")  # with the rates rows (a same-run read)
# the setting of a run its JSON does not record (environment switches), shown beside its commit
CPU_2CORE_NOTES = {"bench_llamacpp_cpu_2core_17374f2_avx2off.json": "MOEKIT_AVX2_DOT=0"}


def cpu_2core(files: dict) -> str:
    """No GPU, the 2-core machine: llama.cpp's CPU build and moekit bf16 interleaved (medians of the
    rounds), prefill of 64 tokens beside, one row per run."""
    rows = []
    for name in CPU_2CORE_RUNS:
        run = files[name]
        mixed, lc = run["cpu_interleaved"], run["llamacpp"]["rows"]
        bf16 = next(r for r in run["moekit"] if r.get("dtype") == "bfloat16")
        lp, mp = lc["prefill_cpu_only"]["tok_s"], bf16["prefill_64_tok_s"]
        commit = run["meta"]["commit"][:7] + (f" ({CPU_2CORE_NOTES[name]})" if name in CPU_2CORE_NOTES else "")
        device = run["meta"]["device"]
        vector = device.get("cpu_vector")
        cpu = "not recorded" if vector is None else f"{device.get('cpu_model') or '?'}, {vector[0] if vector else 'no AVX2'}"
        rows.append([commit, run["meta"]["date"][:16], cpu, f"{mixed['llamacpp_median']:.1f}",
                     f"{mixed['moekit_median']:.1f}", f"{mixed['ratio_of_medians']:.2f}x", f"{lp:.1f}", f"{mp:.1f}",
                     f"{mp / lp:.2f}x"])
    return table(["commit", "date", "CPU", "llama.cpp decode", "moekit bf16 decode", "ratio", "llama.cpp prefill 64",
                  "moekit prefill 64", "ratio"], rows)


def same_class_base(label: str) -> str | None:
    """Returns the llama.cpp row a moekit CPU row compares with: int4 experts with int8 activations and
    quantized dense weights against Q4_K_M (all quantized, as theirs), bf16 experts with bf16 dense
    weights against the bf16 GGUF; None for the mixed rows (bf16 experts with quantized attention, or
    int4 experts beside bf16 attention), which no llama.cpp file matches."""
    if label.startswith("moekit int4") and "int8-dot" in label and ("int8-dense" in label or "int4-dense" in label):
        return "llama.cpp Q4_K_M"
    if label.startswith("moekit bf16") and "int8-dense" not in label and "int4-dense" not in label:
        return "llama.cpp bf16"
    return None


# One thread's CPU time per token (probes/cpu_step_cpu_time.py), OLMoE shape cut to 4 layers; runs whose
# JSON has no provenance block name their commit and CPU here
CPU_ONE_THREAD_RUNS = ("cpu_step_cpu_time_zen4_int4_17946b6.json", "cpu_step_cpu_time_zen4_int4_bb17489.json")
CPU_ONE_THREAD_UNRECORDED = {"cpu_step_cpu_time_zen4_int4_17946b6.json": ("17946b6", "AMD EPYC (Zen 4), avx512-bf16")}


def cpu_one_thread(files: dict) -> str:
    """moekit's native decode step and llama.cpp's CPU build on one thread: CPU ms a token, a column per
    run; a moekit row's ratio where llama.cpp ran the same class (same_class_base): >1x is moekit faster."""
    runs, labels = [], []
    for name in CPU_ONE_THREAD_RUNS:
        run = files[name]
        if "meta" in run:
            device = run["meta"]["device"]
            vector = device.get("cpu_vector") or ["no AVX2"]
            head = f"{run['meta']['commit'][:7]} ({device.get('cpu_model') or '?'}, {vector[0]})"
        else:
            commit, cpu = CPU_ONE_THREAD_UNRECORDED[name]
            head = f"{commit} ({cpu})"
        runs.append((head, run["cpu_s_per_token"]))
        labels += [k for k in run["cpu_s_per_token"] if k not in labels]
    rows = []
    for label in labels:
        base = same_class_base(label)
        cells = [label]
        for _, values in runs:
            s, ref = values.get(label), values.get(base)
            if s is None:
                cells.append("")
            elif base and ref:
                cells.append(f"{s * 1e3:.1f} ({ref / s:.2f}x)")
            else:
                cells.append(f"{s * 1e3:.1f}")
        rows.append(cells)
    return table(["engine, 1 thread: CPU ms a token (vs llama.cpp)"] + [h for h, _ in runs], rows)


CPU_COMPRESSED_2CORE = "bench_cpu_compressed_zen4_int4dense_bb17489.json"


def cpu_compressed_2core(files: dict) -> str:
    """probes/bench_cpu_compressed.py on the 2-core VM: each engine's decode tok/s, medians of interleaved
    rounds; a moekit row against llama.cpp where it ran the same class (same_class_base), as the range and
    median of the per-round ratios and the ratio of the two medians."""
    run = files[CPU_COMPRESSED_2CORE]
    rows_in = run["rows"]
    rows = []
    for label, r in rows_in.items():
        base = same_class_base(label.replace(" native", ""))
        ratio, per_round = "", ""
        if base in rows_in:
            ratio = f"{r['median'] / rows_in[base]['median']:.2f}x"
            each = sorted(a / b for a, b in zip(r["tok_s"], rows_in[base]["tok_s"]))
            per_round = f"{each[0]:.2f}-{each[-1]:.2f}x (median {each[len(each) // 2]:.2f}x)"
        rows.append([label, f"{r['median']:.1f}", ", ".join(f"{v:.1f}" for v in r["tok_s"]), ratio, per_round])
    return table(["engine (2 threads)", "median tok/s", "rounds", "ratio of medians", "per-round ratios"], rows)


CPU_PREFILL = "cpu_prefill_zen4_daaf95b.json"  # (9b1c6ec: every position's logits, not comparable)


def cpu_prefill(files: dict) -> str:
    """probes/cpu_prefill.py on the 2-core VM: prompt tok/s of each engine by prompt length, the median of
    its interleaved rounds (the PyTorch expert path, one round); moekit's int4 rows against Q4_K_M, bf16
    against llama.cpp's bf16 GGUF."""
    run = files[CPU_PREFILL]
    rows_in = run["rows"]
    lengths = list(next(iter(rows_in.values())))
    rows = []
    for label, per in rows_in.items():
        base = "llama.cpp Q4_K_M" if label.startswith("moekit int4") else "llama.cpp bf16" if label.startswith("moekit") else None
        cells = [label]
        for n in lengths:
            v = per[n]["median"]
            ref = rows_in.get(base, {}).get(n, {}).get("median") if base else None
            cells.append("" if v is None else f"{v:.1f}" + (f" ({v / ref:.2f}x)" if ref else ""))
        rows.append(cells)
    return table(["engine (2 threads)"] + [f"prefill {n} tokens, tok/s" for n in lengths], rows)


def cpu_threads(files: dict) -> str:
    """The bf16 CPU expert kernel by thread count (OpenMP defaults): the portable loops against the
    AVX512-BF16 pair dot products, without and with a 4 KB software prefetch, next to the stream read."""
    rows = []
    for t, r in files[CPU_THREADS]["settings"]["default"].items():
        if not isinstance(r, dict):
            continue
        rows.append([t, f"{r['stream_1gib']:.1f}", f"{r['portable_pf0']:.1f}", f"{r['pairs_pf0']:.1f}",
                     f"{r['pairs_pf4096']:.1f}", f"{r['pairs_pf4096'] / r['stream_1gib']:.0%}"])
    return table(["threads", "stream read GB/s (1 GiB)", "portable loops", "pair dot products",
                  "pairs + 4 KB prefetch (default)", "default / stream"], rows)


def cpu_kernel(files: dict, name: str = "bench_llamacpp_cpu_rows.json") -> str:
    """The CPU expert kernel's read rate against the host's stream read, by thread count (H200 host);
    the plain-page row (cpu_rates.kernel_rates: the same call on experts outside the host store's
    pinned memory) where the run measured it."""
    rates = files[name]["rates"]
    threads = rates.get("threads", 15)
    read = rates["cpu_read_alone_bytes_per_s"]
    rows = []
    for t in (1, 4, 8, 15, 16):
        k, s = rates.get(f"native_layer_top_k_threads{t}_bytes_per_s"), rates.get(f"stream_read_threads{t}_bytes_per_s")
        if k and s:
            rows.append([str(t), f"{k / 1e9:.1f}", f"{s / 1e9:.1f}", f"{k / s:.0%}"])
    rows.append([f"{threads}, median of 5", f"{rates['native_layer_top_k_bytes_per_s'] / 1e9:.1f}",
                 f"{read / 1e9:.1f} (2 s of reads)", f"{rates['native_layer_top_k_bytes_per_s'] / read:.0%}"])
    if rates.get("native_layer_top_k_plain_pages_bytes_per_s"):
        plain = rates["native_layer_top_k_plain_pages_bytes_per_s"]
        rows.append([f"{threads}, median of 5, plain pages (not the pinned store)", f"{plain / 1e9:.1f}", "",
                     f"{plain / read:.0%}"])
    rows.append([f"{threads}, PyTorch (F.linear per expert)", f"{rates['pytorch_layer_top_k_bytes_per_s'] / 1e9:.1f}", "", ""])
    return table(["threads", "native kernel GB/s (a layer's top-8 bf16 experts, 1 token)", "stream read GB/s",
                  "share"], rows)


# ---- bench_offload*.json: the offload rows re-measured after the expert seam (issue 11) ---------------

BEFORE = ("bench_offload.json", "bench_offload_mapped_{shape}.json")  # 2026-11-21, the README's figures until then
NOW = "bench_offload_seam_{shape}.json"  # 2026-11-30, after the seam and the memory plan
NOW_NO_EMBED = "bench_offload_seam_qwen3_noembed.json"  # 2026-11-30, input embeddings on the device
OFFLOAD_ROWS = [  # (shape key, model label, budget key, engine key in the JSON, what misses do)
    ("mixtral", "mixtral-8x7b, 8 layers, bf16", "budget_25pct", "none", "fetch"),
    ("mixtral", "", "budget_25pct", "auto_speculative", "auto (CPU + PCIe), speculative"),
    ("mixtral", "", "budget_25pct", "mapped_none", "read in place (mapped)"),
    ("mixtral", "", "budget_10pct", "none", "fetch"),
    ("mixtral", "", "budget_10pct", "auto_speculative", "auto (CPU + PCIe), speculative"),
    ("mixtral", "", "budget_10pct", "mapped_none", "read in place (mapped)"),
    ("qwen3", "qwen3-30b-a3b, bf16", "budget_25pct", "none", "fetch"),
    ("qwen3", "", "budget_25pct", "oracle", "fetch, oracle"),
    ("qwen3", "", "budget_25pct", "mapped_none", "read in place (mapped)"),
    ("qwen3", "", "budget_10pct", "none", "fetch"),
    ("qwen3", "", "budget_10pct", "oracle", "fetch, oracle"),
    ("qwen3", "", "budget_10pct", "mapped_none", "read in place (mapped)"),
]
LATEST = "bench_offload_budget_{shape}.json"  # 2026-11-30 at 7e43795: 25 / 10 / 8%, peak against each budget
LATEST_ROWS = [  # rows only the latest run measured
    ("mixtral", "mixtral-8x7b, 8 layers, bf16", "budget_8pct", "none", "fetch"),
    ("qwen3", "qwen3-30b-a3b, bf16", "budget_8pct", "none", "fetch"),
]
RERUN = "bench_offload_rerun_mixtral.json"  # 2026-12-01 at f472762: mixtral auto / mapped at 25 / 10% again
OFFLOAD_FILES = ("bench_offload.json", "bench_offload_mapped_mixtral.json", "bench_offload_mapped_qwen3.json",
                 "bench_offload_seam_mixtral.json", "bench_offload_seam_qwen3.json", NOW_NO_EMBED,
                 "bench_offload_budget_mixtral.json", "bench_offload_budget_qwen3.json", RERUN)


def offload_row(files: dict, name: str, shape: str, budget_key: str, engine: str) -> dict | None:
    """Returns one engine's result of one bench_offload run, or None when that run did not measure it."""
    return files[name.format(shape=shape)]["shapes"].get(shape, {}).get(budget_key, {}).get(engine)


def offload_peak(r: dict, budget_bytes: int) -> str:
    """Returns 'peak / budget' in GB, saying by how much a peak went over."""
    cell = f"{r['peak_bytes'] / 1e9:.2f} / {budget_bytes / 1e9:.2f}"
    over = r["peak_bytes"] - budget_bytes
    return cell if over <= 0 else f"{cell}, **{over / 1e6:.1f} MB over**"


def offload_rerun(files: dict) -> str:
    """The offload rows measured on 2026-11-21 next to the same rows measured after the seam: tok/s of
    each run, and the new run's hit rate, traffic and peak."""
    rows = []
    for shape, model, budget_key, engine, misses in OFFLOAD_ROWS:
        before = [offload_row(files, n, shape, budget_key, engine) for n in BEFORE]
        now = offload_row(files, NOW, shape, budget_key, engine)
        no_embed = offload_row(files, NOW_NO_EMBED, shape, budget_key, engine) if shape == "qwen3" else None
        budget_bytes = files[NOW.format(shape=shape)]["shapes"][shape][budget_key]["budget_bytes"]
        tok = [f"{r['decode_tok_s']:.2f}" if r else "-" for r in before]
        if now:
            cpu = now.get("cpu_bytes_per_token") or 0
            traffic = f"{now['pcie_bytes_per_token'] / 1e6:.0f}" + (f" + {cpu / 1e6:.0f} CPU" if cpu else "")
            detail = [f"**{now['decode_tok_s']:.2f}**", f"{now['share_of_ceiling']:.0%}", f"{now['hit_rate']:.2f}",
                      traffic, offload_peak(now, budget_bytes)]
        else:
            detail = ["not run (the run stopped)", "", "", "", ""]
        rows.append([model, budget_key.removeprefix("budget_").replace("pct", "%"), misses, *tok, detail[0],
                     f"{no_embed['decode_tok_s']:.2f}" if no_embed else "-", *detail[1:]])
    return table(["model", "budget", "misses", "11-21 `bench_offload`", "11-21 `bench_offload_mapped_*`",
                  "11-30 `bench_offload_seam_*`", "11-30, input embeddings on the GPU", "% of ceiling (11-30)",
                  "hit rate", "MB/token PCIe + CPU", "peak / budget GB"], rows)


def offload_headline(files: dict) -> str:
    """The project README's offload table: each row's tok/s before the seam (both runs), after it, in
    the 25/10/8% run (7e43795) and where measured again (f472762, mixtral auto / mapped), with the
    7e43795 run's peak against its budget (the earlier run's where it did not measure the row)."""
    rows = []
    for shape, model, budget_key, engine, misses in OFFLOAD_ROWS + LATEST_ROWS:
        before = [r for r in (offload_row(files, n, shape, budget_key, engine) for n in BEFORE) if r]
        now = offload_row(files, NOW, shape, budget_key, engine)
        latest = offload_row(files, LATEST, shape, budget_key, engine)
        no_embed = offload_row(files, NOW_NO_EMBED, shape, budget_key, engine) if shape == "qwen3" else None
        now_cell = f"{now['decode_tok_s']:.2f}" if now else "not measured"
        if no_embed:
            now_cell += f"; {no_embed['decode_tok_s']:.2f} with input embeddings on the GPU"
        rerun = files[RERUN]["shapes"].get(shape, {}).get(budget_key, {}).get(engine)
        shown, run = (latest, LATEST) if latest else (now, NOW)
        budget_bytes = files[run.format(shape=shape)]["shapes"][shape].get(budget_key, {}).get("budget_bytes")
        rows.append([model, budget_key.removeprefix("budget_").replace("pct", "%"), misses,
                     " / ".join(f"{r['decode_tok_s']:.2f}" for r in before) or "-", now_cell,
                     f"{latest['decode_tok_s']:.2f}" if latest else "not in this run",
                     f"{rerun['decode_tok_s']:.2f}" if rerun else "",
                     offload_peak(shown, budget_bytes) + ("" if latest else " (11-30 seam run)") if shown else "-"])
    return table(["model", "budget", "misses", "tok/s 2026-11-21", "tok/s 2026-11-30 after the seam",
                  "tok/s 2026-11-30 at 7e43795", "tok/s 2026-12-01 at f472762", "peak / budget GB"], rows)


def offload_latest(files: dict) -> str:
    """Every row of the latest bench_offload run (bench_offload_budget_*.json): tok/s, share of the
    ceiling, hit rate, traffic and peak against the budget."""
    rows = []
    for shape in ("mixtral", "qwen3"):
        res = files[LATEST.format(shape=shape)]["shapes"][shape]
        rows.append([shape, "all resident", "GPU-only", f"{res['gpu_only']['decode_tok_s']:.2f}", "", "", "", ""])
        for budget_key in ("budget_25pct", "budget_10pct", "budget_8pct"):
            for engine, r in res.get(budget_key, {}).items():
                if engine == "budget_bytes" or not isinstance(r, dict) or "decode_tok_s" not in r:
                    continue
                cpu = r.get("cpu_bytes_per_token") or 0
                traffic = f"{r['pcie_bytes_per_token'] / 1e6:.0f}" + (f" + {cpu / 1e6:.0f} CPU" if cpu else "")
                rows.append([shape, budget_key.removeprefix("budget_").replace("pct", "%"), engine,
                             f"{r['decode_tok_s']:.2f}", f"{r['ceiling_tok_s']:.2f}", f"{r['share_of_ceiling']:.0%}",
                             f"{r['hit_rate']:.2f}, {traffic}", offload_peak(r, res[budget_key]["budget_bytes"])])
    return table(["shape", "budget", "engine", "tok/s", "ceiling tok/s", "share", "hit rate, MB/token PCIe + CPU",
                  "peak / budget GB"], rows)


# ---- bench_serve.json (issue 13) and bench_pipeline.json (issue 14) -----------------------------------

SERVE_FILES = ("bench_serve_olmoe_de88543.json", "bench_serve_qwen3_ef150b8.json")  # the whole runs of 2026-12-01
SERVE_QWEN3_RERUN = "bench_serve_qwen3_c32_8667d98.json"  # C=1/32 after the tensor-core paged decode (0d88a54)


def serve(files: dict, name: str = "bench_serve.json", names: tuple[str, ...] | None = None) -> str:
    """The serving benchmark: per shape and concurrency, moekit's scheduler against its own static
    batch decode (the ceiling) and transformers' padded static batches (the baseline); the
    offloaded rows with their allocator peak against the budget; the commit of each run."""
    rows = []
    for res in (files[n] for n in (names or (name,))):
        commit = res["meta"].get("commit") or "-"
        for shape, by_c in res["shapes"].items():
            keys = sorted((k for k in by_c if k.startswith("c") and k[1:].isdigit()), key=lambda k: int(k[1:]))
            keys += sorted(k for k in by_c if k.startswith("offload_c") and k[9:].isdigit())
            for key in keys:
                c = by_c[key]
                mk, st, hf = c.get("moekit_serve"), c.get("moekit_static"), c.get("transformers")
                label = key[1:] if key.startswith("c") else f"{key[9:]} (offloaded)"
                if not mk or "output_tok_s" not in mk:
                    rows.append([shape, label, "not run", "", "", "", "", "", "", "", commit])
                    continue
                static = st.get("decode_tok_s") if st else None
                hf_tok = hf.get("output_tok_s") if hf else None
                vs_static = f"{mk['output_tok_s'] / static:.0%}" if static else "-"
                if mk.get("budget_bytes"):  # an offloaded row: its peak against the budget instead
                    vs_static = f"peak {mk['peak_device_bytes'] / 1e9:.2f} / {mk['budget_bytes'] / 1e9:.2f} GB"
                rows.append([shape, label, f"{mk['output_tok_s']:,.0f}", f"{mk['steady_tok_s']:,.0f}",
                             f"{mk['ttft_p50_s'] * 1e3:.0f}",
                             f"{mk['itl_p50_s'] * 1e3:.2f} / {mk['itl_p99_s'] * 1e3:.1f}",
                             f"{static:,.0f}" if static else "-", vs_static,
                             f"{hf_tok:,.1f}" if hf_tok else "-", f"{mk['output_tok_s'] / hf_tok:.1f}x" if hf_tok else "-",
                             commit])
    return table(["shape", "C", "served tok/s", "steady tok/s", "TTFT p50 ms", "ITL p50 / p99 ms",
                  "static decode tok/s (ceiling)", "served / static", "transformers tok/s", "served / transformers",
                  "commit"], rows)


def families(files: dict, name: str = "bench_families.json") -> str:
    """The new families' shapes (bench_families.py): moekit against transformers' experts
    implementations and each row's bound, as the run's own table lists them."""
    res = files[name]

    def num(v, unit):
        if v is None:
            return "-"
        text = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
        return f"{text} {unit}".rstrip()

    rows = []
    for r in res["table"]:
        pct = r.get("pct_of_ceiling")
        rows.append([r["shape"], r["engine"], r["metric"], num(r.get("measured"), r.get("unit", "")),
                     num(r.get("ceiling"), r.get("unit", "")), f"{pct:.0f}%" if pct is not None else "-",
                     f"{r['x_baseline']:.1f}x" if r.get("x_baseline") else "", r.get("note", "")])
    return table(["shape", "engine", "metric", "measured", "ceiling", "% of ceiling", "x baseline", "note"], rows)


def policy_label(r: dict) -> str:
    """Returns a pipeline row's policy as "N=.. mu=.. R=..": R the resident experts of every MoE layer,
    or their total and spread when layers differ (hrm.Policy.resident_experts); "batch B" for a
    baseline row."""
    if "sequences" not in r:
        return f"batch {r['batch']}" if "batch" in r else ""
    per = r["resident_per_layer"]
    resident = per if isinstance(per, int) else f"{sum(per)} ({min(per)}-{max(per)} a layer)"
    return f"N={r['sequences']} mu={r['micro_batch']} R={resident}"


def pipeline(files: dict, name: str = "bench_pipeline.json") -> str:
    """The batch pipeline benchmark: each row's end-to-end tok/s next to the HRM's prediction, the
    PCIe and CPU-attention ceilings and the allocator peak against the budget."""
    res = files[name]
    rows = []
    for r in res["rows"]:
        policy = policy_label(r)
        ok = r.get("status") == "ok"
        peak = f"{r['peak_bytes'] / 2**30:.2f} / {res['budget_bytes'] / 2**30:.2f} GiB" if ok and "peak_bytes" in r else "-"
        rows.append([r["row"], str(r.get("gen_len") or r.get("new_tokens") or ""), policy,
                     f"{r['tok_s']:,.1f}" if ok else "-",
                     f"{r['decode_tok_s']:,.0f}" if ok and r.get("decode_tok_s") else "-",
                     f"{r['predicted_tok_s']:,.0f}" if ok and r.get("predicted_tok_s") else "-",
                     f"{r['pcie_ceiling_decode_tok_s']:,.0f}" if ok and r.get("pcie_ceiling_decode_tok_s") else "-",
                     f"{r['decode_step_s'] * 1e3:.0f}" if ok and r.get("decode_step_s") else "-",
                     peak, r["status"] + (f": {r['reason']}" if r.get("reason") else "")])
    return table(["row", "gen", "policy", "tok/s end to end", "decode tok/s", "HRM tok/s", "PCIe ceiling (decode)",
                  "decode step ms", "peak / budget", "status"], rows)


def pipeline_forms(files: dict, name: str) -> str:
    """bench_pipeline --forms-only: each compressed form's end-to-end tok/s next to the HRM's
    prediction, both ceilings, its ratio to the bf16 rows of the run it names (--bf16-from) and
    where its decode step went (the CPU attention worker's ms against the step's)."""
    res = files[name]
    rows = []
    for r in res["rows"]:
        ok = r.get("status") == "ok"
        b = r.get("step_breakdown") or {}

        def num(x, fmt=",.0f"):
            return format(x, fmt) if ok and x else "-"

        vs = " / ".join(f"{v:.2f}x ({k})" for k, v in (r.get("vs_bf16") or {}).items()) or "-"
        peak = f"{r['peak_bytes'] / 2**30:.2f} / {res['budget_bytes'] / 2**30:.2f} GiB" if ok and "peak_bytes" in r else "-"
        rows.append([r["row"], str(r.get("gen_len") or ""), num(r.get("bits_per_weight"), ".2f"), policy_label(r),
                     num(r.get("tok_s"), ",.1f"), num(r.get("predicted_tok_s")),
                     num(r.get("pcie_ceiling_decode_tok_s")), num(r.get("cpu_attention_ceiling_tok_s")), vs,
                     num(b.get("step_ms")), num(b.get("hrm_step_ms")), num(b.get("worker_attention_ms")),
                     num(b.get("experts_gpu_ms")), peak, r["status"] + (f": {r['reason']}" if r.get("reason") else "")])
    source = (res.get("bf16_from") or {}).get("file", "-")
    return (f"bf16 rows from {source}\n\n" + table(
        ["row", "gen", "bits/weight", "policy", "tok/s end to end", "HRM tok/s", "PCIe ceiling (decode)",
         "CPU-attn ceiling", "vs bf16", "decode step ms", "HRM step ms", "CPU attention ms", "experts on GPU ms",
         "peak / budget", "status"], rows))


def pipeline_32l_all(files: dict, names: tuple[str, ...] = PIPELINE_32L_ALL) -> str:
    """Issue 14's table: every pipeline row of the named runs (bf16 and the stored forms, each
    generation length) with the HRM's prediction and its error, both ceilings and the share of the
    lower one reached, the ratio to the bf16 row of the same length (the first run that has one),
    the allocator peak; then the baselines (moekit's offload engine, transformers + accelerate)."""
    runs = [(n, files[n]) for n in names]
    bf16 = {}
    for _, res in runs:
        for r in res["rows"]:
            if r["row"] == "pipeline (CGOPipe, HRM policy)" and r.get("status") == "ok":
                bf16.setdefault(r["gen_len"], (r["tok_s"], res["meta"].get("commit") or "-"))
    rows, baselines = [], []
    for name, res in runs:
        commit = res["meta"].get("commit") or "-"
        budget = res["budget_bytes"]
        for r in res["rows"]:
            ok = r.get("status") == "ok"
            peak = f"{r['peak_bytes'] / 2**30:.2f} / {budget / 2**30:.2f} GiB" if ok and r.get("peak_bytes") else "-"
            if not r["row"].startswith("pipeline"):
                over = " (over)" if ok and r.get("peak_bytes", 0) > budget else ""
                baselines.append([r["row"], str(r.get("new_tokens") or ""), policy_label(r),
                                  f"{r['tok_s']:,.1f}" if ok else "-", peak + over,
                                  r["status"] + (f": {(r.get('reason') or r.get('error') or '')[:110]}" if not ok else ""),
                                  commit])
                continue
            if not ok:
                continue
            form = r.get("form") or "bf16"
            bits = r.get("bits_per_weight") or 16.0
            pred, tok = r.get("predicted_tok_s"), r["tok_s"]
            pcie, attn = r.get("pcie_ceiling_decode_tok_s"), r.get("cpu_attention_ceiling_tok_s")
            lower = min(x for x in (pcie, attn) if x) if (pcie or attn) else None
            same = bf16.get(r["gen_len"])
            vs = "-" if form == "bf16" else (f"{tok / same[0]:.2f}x ({same[1]})" if same else "no bf16 row")
            rows.append([form, f"{bits:.2f}", str(r["gen_len"]), policy_label(r), f"{tok:,.1f}",
                         f"{pred:,.0f} ({pred / tok - 1:+.0%})" if pred else "-",
                         f"{pcie:,.0f}" if pcie else "-", f"{attn:,.0f}" if attn else "-",
                         f"{tok / lower:.0%}" if lower else "-", vs, peak, commit])
    return (table(["experts", "bits/weight", "gen", "policy", "tok/s end to end", "HRM tok/s (error)",
                   "PCIe ceiling (decode)", "CPU-attn ceiling (probe)", "of the lower ceiling", "vs bf16, same gen",
                   "peak / budget", "commit"], rows)
            + "\n\nBaselines at the same shape and budget:\n\n"
            + table(["engine", "gen", "batch", "tok/s end to end", "peak / budget", "status", "commit"], baselines))


def attention_families(files: dict, name: str) -> str:
    """probes/cpu_attention_families.py: the CPU attention kernel's KV read rate for each family's
    shape, by page size and work item, against the host read rate measured in the same run."""
    res = files[name]
    rows = [[r["shape"], r["pages"], r["items"], f"{r['heads']}/{r['kv_heads']} x {r['width']}",
             str(r["window"] or "-"), "yes" if r["sinks"] else "no", f"{r['kv_bytes'] / 2**20:,.0f}",
             f"{r['ms']:.2f}", f"{r['kv_gb_s']:.1f}", f"{r['share_of_ceiling']:.0%}",
             "yes" if r["same_bits"] else "NO"] for r in res["rows"]]
    return (f"{res['seqs']} sequences x {res['context']} positions, {res['threads']} threads; host read "
            f"{res['host_read_gb_s']:.1f} GB/s (the ceiling)\n\n" + table(
                ["shape", "pages", "items", "heads / kv heads x width", "window", "sinks", "KV MiB", "ms",
                 "GB/s", "of host read", "same bits as by head"], rows))


# ---- the registry ---------------------------------------------------------------------------------------

LLAMA_MIXTRAL = "bench_llamacpp_mixtral_26a3a85.json"  # 2026-12-01 (session 14): both engines, one run
LLAMA_QWEN3 = "bench_llamacpp_qwen3_677d4b7.json"  # 2026-12-02 (session 15): both engines, one run, before the partner
LLAMA_QWEN3_PARTNER = "bench_llamacpp_qwen3_host_f65a734.json"  # the host row with the CPU partner (default) and without
LLAMA_OLMOE_PARTNER = "bench_llamacpp_olmoe_partner_418157d.json"  # 2026-12-02 (session 16): host / half rows, partner on / off
LLAMA_OLMOE_COMPRESSED_BEFORE = "bench_llamacpp_olmoe_compressed_c92d900.json"  # before the native loop and the blank slot
LLAMA_OLMOE_COMPRESSED = "bench_llamacpp_olmoe_compressed_2ef1e0c.json"  # 2026-12-02 (session 17): int4 / int2 / ternary
LLAMA_MIXTRAL_ROWS = "bench_llamacpp_mixtral_rows_2ef1e0c.json"  # Mixtral's host row, the row split on / off
LLAMA_OLMOE_CPU16 = "bench_llamacpp_olmoe_cpu16_4310d1d.json"  # 2026-12-02: no GPU on the H200 host's 16 cores, the rates
LLAMA_OLMOE_BUDGETS = "bench_llamacpp_olmoe_budgets_4310d1d.json"  # misses auto at 25% / 10% of the model's bytes
LLAMA_QWEN3_COMPRESSED = "bench_llamacpp_qwen3_compressed_4310d1d.json"  # int4 at Q4_K_M's footprint: refused
LLAMA_QWEN3_COMPRESSED_INT8 = "bench_llamacpp_qwen3_compressed_int8_e49b5db.json"  # the same with --dense int8
LLAMA_QWEN3_COMPRESSED_TEAM = "bench_llamacpp_qwen3_compressed_int8_team_c0a2f4c.json"  # the runner's own team
LLAMA_MIXTRAL_HALF = "bench_llamacpp_mixtral_half_45c1115.json"  # 2026-12-02 (session 20): host + half rows, the split on
LLAMA_MIXTRAL_COMPRESSED = "bench_llamacpp_mixtral_compressed_10956a6.json"  # 2026-12-03 (session 21): int4, ternary
LLAMA_QWEN3_BUDGETS = "bench_llamacpp_qwen3_budgets_10956a6.json"  # 2026-12-03 (session 21): auto at 25% / 10%, kernel rates
LLAMA_MIXTRAL_INT2 = "bench_llamacpp_mixtral_int2_3fa9407.json"  # 2026-12-04 (session 23): int2 vs Q2_K, partner on / off
LLAMA_MIXTRAL_INT4_GATHER = "bench_llamacpp_mixtral_int4_gather_d3aa10f.json"  # int4 vs Q4_K_M, the partner's gather on / off
LLAMA_QWEN3_INT2 = "bench_llamacpp_qwen3_int2_d3aa10f.json"  # int2 + int8 dense vs Q2_K
LLAMA_QWEN3_TERNARY = "bench_llamacpp_qwen3_ternary_13a0b14.json"  # 2026-12-04 (session 24): ternary vs bf16
LLAMA_MIXTRAL_INT2_GATHER = "bench_llamacpp_mixtral_int2_gather_03e26a0.json"  # 2026-12-04 (session 25): int2, gather on / off
IN_PLACE_RUNS = ("bench_llamacpp_mixtral_inplace_f51a719.json", "bench_llamacpp_olmoe_inplace_f51a719.json")
IN_PLACE_LLAMA = {"mixtral-8x7b-8l": LLAMA_MIXTRAL, "olmoe-1b-7b": LLAMA_LATEST}  # llama.cpp's figures: earlier calls


def in_place_share(files: dict) -> str:
    """misses auto with its in-place share beside misses cpu, one call per shape (moekit only), next to
    llama.cpp's figure at that footprint from an earlier call (not the same run): where each token's
    missed bytes went (CPU-read, read in place over PCIe) and tok/s."""
    rows = []
    for name in IN_PLACE_RUNS:
        res = files[name]
        lc = files[IN_PLACE_LLAMA[res["shape"]]]["llamacpp"]["rows"]
        for r in res["moekit"]:
            rep = r.get("report") or {}
            theirs = (lc.get(r["setting"]) or {}).get("tok_s")
            used = rep.get("misses_used", r["misses"])
            rows.append([res["shape"], r["setting"].removeprefix("decode_"), f"{r['misses']} (runs {used})",
                         f"{r['budget_bytes'] / 1e9:.2f}", f"{rep.get('hit_rate', 0):.2f}",
                         f"{rep.get('cpu_bytes_per_token', 0) / 1e9:.2f}",
                         f"{rep.get('mapped_bytes_per_token', 0) / 1e9:.2f}",
                         f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else r["status"],
                         f"{theirs:.1f}" if theirs else "-",
                         f"{r['decode_tok_s'] / theirs:.2f}x" if theirs and r.get("decode_tok_s") else "-"])
    return table(["shape", "footprint", "misses", "budget GB", "hit rate", "CPU-read GB / token",
                  "read in place GB / token", "tok/s", "llama.cpp (earlier call)", "ratio"], rows)


AUTO_BUDGET_SHARE = 0.80  # issue 12: misses auto at 25% and 10% budgets, of its combined ceiling
AUTO_BUDGET_RUNS = (LLAMA_OLMOE_BUDGETS, LLAMA_QWEN3_BUDGETS)  # bench_llamacpp --footprints (moekit only), one per shape


def auto_budgets(files: dict) -> str:
    """misses auto at budgets set as shares of the model's bytes (bench_llamacpp --skip-llamacpp
    --footprints A,B --rows host,half: the two footprints take the host and half row slots, so a row
    is named here by its budget's share of the checkpoint's bytes, not by its slot): tok/s against
    the uniform combined ceiling of the same run (issue 12's bar, AUTO_BUDGET_SHARE) and against the
    bound at the bytes the row moved (lcpp_bars.traffic_ceiling), with the hit rate, the bytes a
    decode token read by the CPU and copied over PCIe, and the allocator peak against the budget."""
    from lcpp_bars import traffic_ceiling

    rows = []
    for name in AUTO_BUDGET_RUNS:
        res = files[name]
        model_bytes = res["checkpoint"]["tensor_bytes"]
        for r in sorted(res["moekit"], key=lambda r: -r["budget_bytes"]):
            rep = r.get("report") or {}
            ours, ceiling = r.get("decode_tok_s"), r.get("ceiling_tok_s")
            share = ours / ceiling if ours and ceiling else None
            traffic = traffic_ceiling(r, res) if ours else None
            used = rep.get("misses_used", r.get("misses"))
            rows.append([res["shape"], f"{r['budget_bytes'] / model_bytes:.0%} of {model_bytes / 1e9:.2f} GB",
                         f"{r['budget_bytes'] / 1e9:.2f}", f"{r.get('misses')} (runs {used})",
                         f"{r['peak_bytes'] / 1e9:.2f}" if r.get("peak_bytes") else "-",
                         f"{ours:.1f}" if ours else r["status"],
                         f"{rep['hit_rate']:.2f}" if "hit_rate" in rep else "-",
                         f"{rep.get('cpu_bytes_per_token', 0) / 1e9:.3f}", f"{rep.get('bytes_per_token', 0) / 1e9:.3f}",
                         f"{ceiling:.1f}" if ceiling else "-", f"{share:.0%}" if share else "-",
                         f">= {AUTO_BUDGET_SHARE:.0%} of ceiling",
                         f"{traffic:.1f} ({ours / traffic:.0%})" if traffic else "-",
                         {True: "yes", False: "no", None: "-"}[share >= AUTO_BUDGET_SHARE if share else None],
                         res["meta"]["commit"]])
    return table(["shape", "budget (of the model's bytes)", "budget GB", "misses", "peak GB", "moekit tok/s", "hit rate",
                  "CPU-read GB / token", "PCIe GB / token", "uniform combined ceiling", "of ceiling", "bar",
                  "ceiling at its traffic (share)", "met", "commit"], rows)


TABLES: dict[str, tuple[tuple[str, ...], Callable[[dict], str]]] = {
    "headline": (("bench_resident.json",), headline),
    "resident": (("bench_resident.json",), resident),
    "slot_tiles": (("tune_slot_kernels.json",), slot_tiles),
    "budget": (("bench_budget.json",), budget),
    "budget_headline": (("bench_budget.json",), budget_headline),
    "budget_shapes": (tuple(n for names in BUDGET_SHAPES.values() for n in names), budget_shapes),
    "offload_rerun": (OFFLOAD_FILES, offload_rerun),
    "vs_llamacpp": (LLAMA_FILES, vs_llamacpp),
    "cpu_kernel": (LLAMA_FILES, cpu_kernel),
    "vs_llamacpp_latest": ((LLAMA_LATEST,), vs_llamacpp_latest),
    "vs_llamacpp_before": ((LLAMA_BEFORE,), partial(vs_llamacpp_latest, name=LLAMA_BEFORE)),
    "vs_llamacpp_mixtral": ((LLAMA_MIXTRAL,), partial(vs_llamacpp_latest, name=LLAMA_MIXTRAL)),
    "vs_llamacpp_qwen3": ((LLAMA_QWEN3,), partial(vs_llamacpp_latest, name=LLAMA_QWEN3)),
    "vs_llamacpp_qwen3_partner": ((LLAMA_QWEN3_PARTNER,), partial(vs_llamacpp_latest, name=LLAMA_QWEN3_PARTNER)),
    "vs_llamacpp_olmoe_partner": ((LLAMA_OLMOE_PARTNER,), partial(vs_llamacpp_latest, name=LLAMA_OLMOE_PARTNER)),
    "vs_llamacpp_olmoe_compressed": ((LLAMA_OLMOE_COMPRESSED,),
                                     partial(vs_llamacpp_latest, name=LLAMA_OLMOE_COMPRESSED)),
    "vs_llamacpp_olmoe_compressed_before": ((LLAMA_OLMOE_COMPRESSED_BEFORE,),
                                            partial(vs_llamacpp_latest, name=LLAMA_OLMOE_COMPRESSED_BEFORE)),
    "vs_llamacpp_mixtral_rows": ((LLAMA_MIXTRAL_ROWS,), partial(vs_llamacpp_latest, name=LLAMA_MIXTRAL_ROWS)),
    "vs_llamacpp_mixtral_half": ((LLAMA_MIXTRAL_HALF,), partial(vs_llamacpp_latest, name=LLAMA_MIXTRAL_HALF)),
    "vs_llamacpp_mixtral_compressed": ((LLAMA_MIXTRAL_COMPRESSED,),
                                       partial(vs_llamacpp_latest, name=LLAMA_MIXTRAL_COMPRESSED)),
    "vs_llamacpp_olmoe_cpu16": ((LLAMA_OLMOE_CPU16,), partial(vs_llamacpp_latest, name=LLAMA_OLMOE_CPU16)),
    "vs_llamacpp_mixtral_int2": ((LLAMA_MIXTRAL_INT2,), partial(vs_llamacpp_latest, name=LLAMA_MIXTRAL_INT2)),
    "vs_llamacpp_mixtral_int4_gather": ((LLAMA_MIXTRAL_INT4_GATHER,),
                                        partial(vs_llamacpp_latest, name=LLAMA_MIXTRAL_INT4_GATHER)),
    "vs_llamacpp_qwen3_int2": ((LLAMA_QWEN3_INT2,), partial(vs_llamacpp_latest, name=LLAMA_QWEN3_INT2)),
    "vs_llamacpp_qwen3_ternary": ((LLAMA_QWEN3_TERNARY,), partial(vs_llamacpp_latest, name=LLAMA_QWEN3_TERNARY)),
    "vs_llamacpp_mixtral_int2_gather": ((LLAMA_MIXTRAL_INT2_GATHER,),
                                        partial(vs_llamacpp_latest, name=LLAMA_MIXTRAL_INT2_GATHER)),
    "cpu_kernel_cpu16": ((LLAMA_OLMOE_CPU16,), partial(cpu_kernel, name=LLAMA_OLMOE_CPU16)),
    "auto_budgets": (AUTO_BUDGET_RUNS, auto_budgets),
    "vs_llamacpp_qwen3_compressed": ((LLAMA_QWEN3_COMPRESSED,),
                                     partial(vs_llamacpp_latest, name=LLAMA_QWEN3_COMPRESSED)),
    "vs_llamacpp_qwen3_compressed_int8": ((LLAMA_QWEN3_COMPRESSED_INT8,),
                                          partial(vs_llamacpp_latest, name=LLAMA_QWEN3_COMPRESSED_INT8)),
    "vs_llamacpp_qwen3_compressed_team": ((LLAMA_QWEN3_COMPRESSED_TEAM,),
                                          partial(vs_llamacpp_latest, name=LLAMA_QWEN3_COMPRESSED_TEAM)),
    "cpu_2core": (CPU_2CORE_RUNS, cpu_2core),
    "cpu_one_thread": (CPU_ONE_THREAD_RUNS, cpu_one_thread),
    "cpu_compressed_2core": ((CPU_COMPRESSED_2CORE,), cpu_compressed_2core),
    "cpu_prefill": ((CPU_PREFILL,), cpu_prefill),
    "in_place_share": (IN_PLACE_RUNS + (LLAMA_MIXTRAL, LLAMA_LATEST), in_place_share),
    "cpu_threads": ((CPU_THREADS,), cpu_threads),
    "misses_modes": ((MISSES_RUN,), misses_modes),
    "offload_headline": (OFFLOAD_FILES, offload_headline),
    "serve": (("bench_serve.json",), serve),
    "serve_latest": (SERVE_FILES, partial(serve, names=SERVE_FILES)),
    "serve_qwen3_rerun": ((SERVE_QWEN3_RERUN,), partial(serve, name=SERVE_QWEN3_RERUN)),
    "families": (("bench_families.json",), families),
    "families_rerun": ((FAMILIES_RERUN,), partial(families, name=FAMILIES_RERUN)),
    "families_latest": ((FAMILIES_LATEST,), partial(families, name=FAMILIES_LATEST)),
    "serve_rerun": ((SERVE_RERUN,), partial(serve, name=SERVE_RERUN)),
    "pipeline_rerun": ((PIPELINE_RERUN,), partial(pipeline, name=PIPELINE_RERUN)),
    "pipeline_prefill": ((PIPELINE_PREFILL,), partial(pipeline, name=PIPELINE_PREFILL)),
    "pipeline_32l": ((PIPELINE_32L,), partial(pipeline, name=PIPELINE_32L)),
    "pipeline_32l_forms": ((PIPELINE_32L_FORMS,), partial(pipeline_forms, name=PIPELINE_32L_FORMS)),
    "pipeline_32l_forms_2m": ((PIPELINE_32L_FORMS_2M,), partial(pipeline_forms, name=PIPELINE_32L_FORMS_2M)),
    "pipeline_32l_forms_latest": ((PIPELINE_32L_FORMS_CAL,), partial(pipeline_forms, name=PIPELINE_32L_FORMS_CAL)),
    "pipeline_8l_prefetch": ((PIPELINE_8L_PREFETCH,), partial(pipeline_forms, name=PIPELINE_8L_PREFETCH)),
    "pipeline_32l_all": (PIPELINE_32L_ALL, pipeline_32l_all),
    "attention_families_fma": ((ATTENTION_FAMILIES_FMA,), partial(attention_families, name=ATTENTION_FAMILIES_FMA)),
    "attention_families": ((ATTENTION_FAMILIES,), partial(attention_families, name=ATTENTION_FAMILIES)),
    "pipeline": (("bench_pipeline.json",), pipeline),
    "offload_latest": (("bench_offload_budget_mixtral.json", "bench_offload_budget_qwen3.json"), offload_latest),
}
MARKER = re.compile(r"^<!-- table:(?P<name>[\w-]+) -->\n(?P<body>.*?)^<!-- /table:(?P=name) -->$", re.S | re.M)


def rewrite(text: str, where: str) -> str:
    """Returns `text` with every marked table rendered from its JSON."""
    def render(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            print(f"{where}: no table named {name!r} (known: {', '.join(TABLES)}); left as it is", file=sys.stderr)
            return m.group(0)
        names, fn = TABLES[name]
        missing = [n for n in names if not (RESULTS_DIR / n).exists()]
        if missing:
            print(f"{where}: table {name}: {', '.join(missing)} not in {RESULTS_DIR}; left as it is", file=sys.stderr)
            return m.group(0)
        return f"<!-- table:{name} -->\n{fn({n: load(n) for n in names})}\n<!-- /table:{name} -->"

    return MARKER.sub(render, text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="print what would change; exit 1 if anything would")
    args = p.parse_args()
    stale = False
    for doc in DOCS:
        old = doc.read_text()
        new = rewrite(old, str(doc))
        if new == old:
            continue
        stale = True
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(doc), str(doc)))
        else:
            doc.write_text(new)
            print(f"rewrote the tables of {doc}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
