"""Offload budget acceptance test (issue 11): does an offloaded model keep to the device budget a
user gives it, use most of it, and run where its bytes say it should?

An OLMoE-1B-7B-shaped checkpoint (16 layers, hidden 2048, expert ffn 1024, 64 experts top-8,
16/16 heads, vocab 50304; random bf16 weights, 13.8 GB) and its ternary copy (RTN through
`moekit.quant.compress`, no calibration) are loaded the way a user would, with nothing but the
budget set:

    model = moekit.offload.load_offloaded(path, device="cuda", offload=OffloadConfig(device_memory=B))

at B = 25%, 10% and 8% of the bf16 checkpoint's tensor bytes; each generates 64 tokens after a
64-token prompt twice (the first as a user's first call, the second warm). Recorded per row: decode
tok/s of both calls, the allocator peak from before the load to the end (torch.cuda.max_memory_allocated
minus what was allocated before) against the budget, the runtime's plan and report
(`model.offload.report()`), and any refusal (a MoekitError is a result, not a crash). Next to them:
GPU-only (everything resident, `moekit.load_model`) for both forms, the upper bound; then the same
budgets through the command line as a subprocess:

    python -m moekit.cli generate PROMPT --model DIR --offload --device-memory B --max-new-tokens 64 --json --stats

(its JSON carries decode tok/s and the runtime's report, whose peak is the allocator's on CUDA).
The issue's bar: peak <= budget every time, >= 85% of the budget at 25%; the ternary copy runs
at 10% and 8%.

    PYTHONPATH=src python3 benchmarks/bench_budget.py --out $OUT                        # H200, ~5-7 min
    PYTHONPATH=src python3 benchmarks/bench_budget.py --shape mixtral-8x7b-8l --forms bf16 --out $OUT
                                    # BENCH.md's mixtral cut to 8 layers (23.7 GB written first; not yet run)
    PYTHONPATH=src python3 benchmarks/bench_budget.py --tiny --device cpu --out /tmp/b  # CPU, ~1 min

On the CPU there is no allocator peak: rows record the plan's bytes (the runtime reports its plan
there) and say so (`peak_source`). Rows past --time-budget-s are recorded as skipped; the JSON
(`bench_budget.json`) is rewritten after every row and the short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import common
import torch
from random_checkpoint import (
    mixtral_hf_config,
    olmoe_hf_config,
    qwen3_moe_hf_config,
    write_random_checkpoint,
)

import moekit
from moekit.errors import MoekitError

NAME = "bench_budget"
SHAPES = {  # BENCH.md's olmoe-1b-7b, and a toy of it for the CPU
    "olmoe-1b-7b": dict(layers=16, hidden=2048, expert_ffn=1024, experts=64, top_k=8, heads=16, kv_heads=16,
                        vocab=50304),
    "tiny": dict(layers=2, hidden=128, expert_ffn=256, experts=16, top_k=4, heads=4, kv_heads=4, vocab=4096),
    # BENCH.md's mixtral-8x7b cut to 8 layers (23.7 GB): the mixtral rows through the command line
    "mixtral-8x7b-8l": dict(layers=8, hidden=4096, expert_ffn=14336, experts=8, top_k=2, heads=32, kv_heads=8,
                            vocab=32000),
    # BENCH.md's qwen3-30b-a3b cut to 24 of its 48 layers (30.5 GB): the whole 61 GB checkpoint does
    # not fit the H200 machine's 64 GB disk beside anything else
    "qwen3-30b-a3b-24l": dict(layers=24, hidden=2048, expert_ffn=768, experts=128, top_k=8, heads=32, kv_heads=4,
                              vocab=151936),
}
HF_CONFIG = {"olmoe-1b-7b": olmoe_hf_config, "tiny": olmoe_hf_config, "mixtral-8x7b-8l": mixtral_hf_config,
             "qwen3-30b-a3b-24l": qwen3_moe_hf_config}
FORMS = ("bf16", "ternary")


# ---- the two checkpoints ---------------------------------------------------------------------------

def make_checkpoints(shape_name: str, device: torch.device, tmp: Path, results: dict,
                     ternary_copy: bool = True) -> dict[str, Path]:
    """Returns {form: folder}: the random bf16 checkpoint and (unless not asked for) its RTN-ternary
    copy, written to tmp."""
    from moekit.quant.compress import compress
    from moekit.quant.config import QuantConfig

    t0 = time.perf_counter()
    hf = HF_CONFIG[shape_name](**SHAPES[shape_name])
    bf16, cfg, tensor_bytes = write_random_checkpoint(tmp / "bf16", hf, device,
                                                      tokenizer_from=moekit.default_model_path())
    info = results["checkpoints"] = {"bf16": {"path": str(bf16), "tensor_bytes": tensor_bytes,
                                              "disk_bytes": disk_bytes(bf16), "write_s": time.perf_counter() - t0,
                                              "expert_params": cfg.expert_params}}
    common.log(f"bf16 checkpoint: {tensor_bytes / 1e9:.2f} GB of tensors in {info['bf16']['write_s']:.1f} s")
    if not ternary_copy:
        return {"bf16": bf16}
    t0 = time.perf_counter()
    ternary = tmp / "ternary"
    shutil.rmtree(ternary, ignore_errors=True)
    rep = compress(bf16, ternary, QuantConfig(bits="ternary", method="rtn"), None, device=device, progress=False)
    info["ternary"] = {"path": str(ternary), "disk_bytes": disk_bytes(ternary), "write_s": time.perf_counter() - t0,
                       "bits_per_expert_param": rep.bits_per_expert_param, "expert_bytes": rep.expert_bytes,
                       "other_bytes": rep.other_bytes, "method": "RTN ternary (moekit.quant.compress, no calibration)"}
    common.log(f"ternary copy: {info['ternary']['disk_bytes'] / 1e9:.2f} GB on disk, "
               f"{rep.bits_per_expert_param:.3f} bits/expert param, {info['ternary']['write_s']:.1f} s")
    return {"bf16": bf16, "ternary": ternary}


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def prompt_of(tokens: int, model_dir: Path) -> tuple[str, list[int]]:
    """Returns (text, ids) of a prompt of about `tokens` tokens in the checkpoint's tokenizer
    (stdlib source: text that round-trips through the tokenizer)."""
    import textwrap

    tok = moekit.load_tokenizer(model_dir)
    source = Path(textwrap.__file__).read_text()
    ids = tok.encode(source, add_special_tokens=False)[:tokens]
    text = tok.decode(ids)
    return text, tok.encode(text, add_special_tokens=False)


# ---- one row ---------------------------------------------------------------------------------------

def peak_since(base: int, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def generate_twice(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """Returns decode tok/s and time to first token of a first (cold) and a second (warm) call."""
    out = {}
    for call in ("first", "warm"):
        stats = moekit.GenerationStats()
        model.generate(ids, max_new_tokens=new_tokens, temperature=0, eos_token_ids=(), stats=stats)
        out[call] = {"decode_tok_s": stats.decode_tok_s, "ttft_s": stats.prefill_s, "new_tokens": stats.new_tokens,
                     "cuda_graph": stats.cuda_graph, "graph": stats.extra.get("graph")}
    return out


def plan_summary(plan: dict | None) -> dict | None:
    """Returns the plan's reservations (bytes) and cache size, whatever else the plan carries."""
    if not plan:
        return None
    keys = ("budget_bytes", "planned_bytes", "resident_bytes", "kv_cache_bytes", "activation_bytes",
            "reserve_bytes", "shared_bytes", "cache_bytes", "cache_slots", "total_experts", "expert_bytes",
            "measured_peak_bytes")
    return {k: plan[k] for k in keys if k in plan}


def finish_row(row: dict, budget: int | None) -> dict:
    """Adds the peak's share of the budget and whether it is within it."""
    peak = row.get("peak_bytes")
    if peak is not None and budget:
        row["peak_share_of_budget"] = peak / budget
        row["within_budget"] = peak <= budget
    return row


def api_row(path: Path, budget: int | None, device: torch.device, ids: torch.Tensor, new_tokens: int) -> dict:
    """Loads `path` offloaded with only device_memory=budget (None: GPU-only through load_model),
    generates twice, and returns the row: tok/s, peak vs budget, plan, report or refusal."""
    from moekit.offload import OffloadConfig, load_offloaded

    common.free_memory(device, reset_peak=True)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    row: dict = {"budget_bytes": budget, "status": "ok"}
    model = None
    t0 = time.perf_counter()
    try:
        if budget is None:
            model = moekit.load_model(path, device=device)
        else:
            model = load_offloaded(path, device=device, offload=OffloadConfig(device_memory=budget))
        row["load_s"] = time.perf_counter() - t0
        row["peak_after_load_bytes"] = peak_since(base, device)
        row["runs"] = generate_twice(model, ids, new_tokens)
        row["decode_tok_s"] = row["runs"]["warm"]["decode_tok_s"]
        row["peak_bytes"] = peak_since(base, device)
        row["peak_source"] = "allocator" if device.type == "cuda" else None
        runtime = getattr(model, "offload", None)
        if runtime is not None:
            report = runtime.report()
            row["report"] = report
            row["plan"] = plan_summary(report.get("plan"))
            if device.type != "cuda":  # no allocator: the runtime reports its plan as the peak
                row["peak_bytes"] = report.get("peak_device_bytes")
                row["peak_source"] = "plan (CPU: no allocator peak)"
        elif device.type != "cuda":
            row["peak_source"] = "none (CPU, all resident)"
    except MoekitError as e:  # a refusal is a result
        row.update(status="refused", refusal=str(e), at="load" if "load_s" not in row else "generate")
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="out of memory", error=str(e)[:2000], peak_bytes=peak_since(base, device))
    except Exception as e:  # noqa: BLE001 -- one row failing must not lose the others
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-3000:])
    row["seconds"] = time.perf_counter() - t0
    model = None
    common.free_memory(device)
    return finish_row(row, budget)


def cli_row(path: Path, budget: int | None, device: torch.device, prompt: str, new_tokens: int,
            timeout_s: float) -> dict:
    """Runs `python -m moekit.cli generate` on `path` (offloaded at `budget`, GPU-only when None) as a
    subprocess and returns its row: tok/s, the report's peak vs the budget, or the refusal."""
    cmd = [sys.executable, "-m", "moekit.cli", "generate", prompt, "--model", str(path)]
    if budget is not None:
        cmd += ["--offload", "--device-memory", str(budget)]
    cmd += ["--max-new-tokens", str(new_tokens), "--json"]
    if budget is not None:
        cmd += ["--stats"]
    if device.type != "cuda":  # the CLI's default device is cuda when there is one
        cmd += ["--device", str(device)]
    src = str(Path(moekit.__file__).resolve().parent.parent)  # the moekit this process runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    row: dict = {"budget_bytes": budget, "command": " ".join(cmd[1:3] + ["generate", "PROMPT"] + cmd[5:])}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        row.update(status="timeout", seconds=time.perf_counter() - t0)
        return row
    row.update(seconds=time.perf_counter() - t0, returncode=p.returncode, stderr_tail=p.stderr[-1500:])
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode != 0 or not lines:
        refused = "moekit: error:" in p.stderr
        row.update(status="refused" if refused else "error",
                   refusal=next((l.split("moekit: error:", 1)[1].strip() for l in p.stderr.splitlines()
                                 if "moekit: error:" in l), None))
        return row
    out = json.loads(lines[-1])
    report = out.get("offload")
    row.update(status="ok", decode_tok_s=out.get("decode_tok_s"), ttft_s=out.get("time_to_first_token_s"),
               new_tokens=out.get("new_tokens"), prompt_tokens=out.get("prompt_tokens"),
               cuda_graph=out.get("cuda_graph"), dtype=out.get("dtype"))
    if report:
        row.update(report=report, plan=plan_summary(report.get("plan")), peak_bytes=report.get("peak_device_bytes"),
                   peak_source="runtime report (allocator)" if device.type == "cuda" else "plan (CPU: no allocator peak)")
    return finish_row(row, budget)


# ---- the run ---------------------------------------------------------------------------------------

def table(results: dict) -> str:
    """Returns the short table: budget, form, path, tok/s, peak / budget, next to GPU-only tok/s."""
    gpu = {f: (results.get("gpu_only", {}).get(f) or {}).get("decode_tok_s") for f in FORMS}
    rows = []
    for r in results.get("rows", []):
        share = r.get("peak_share_of_budget")
        peak = f"{r['peak_bytes'] / 1e9:.2f} / {r['budget_bytes'] / 1e9:.2f} GB ({100 * share:.0f}%)" \
            if share is not None else "-"
        if r.get("peak_source", "").startswith("plan"):
            peak += " (plan)"
        status = r["status"] if r["status"] != "refused" else f"refused: {(r.get('refusal') or '')[:70]}"
        tok_s = f"{r['decode_tok_s']:.1f}" if r.get("decode_tok_s") else "-"
        g = gpu.get(r["form"])
        rows.append([f"{100 * r['share']:.0f}%", r["form"], r["path"], tok_s, f"{g:.1f}" if g else "-", peak, status])
    return common.markdown_table(["budget", "form", "via", "decode tok/s", "GPU-only tok/s", "peak / budget",
                                  "status"], rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_output_args(p, NAME)
    p.add_argument("--tiny", action="store_true", help="a toy shape (2 layers, hidden 128) for a CPU run")
    p.add_argument("--shape", default="olmoe-1b-7b", choices=[n for n in SHAPES if n != "tiny"],
                   help="the model shape (default olmoe-1b-7b; --tiny overrides it)")
    p.add_argument("--budgets", default="0.25,0.10,0.08", help="shares of the bf16 checkpoint's tensor bytes")
    p.add_argument("--forms", default="bf16,ternary")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--paths", default="api,cli", help="api (load_offloaded), cli (moekit generate) or both")
    p.add_argument("--rows", default="",
                   help="PATH:SHARE,... (e.g. api:0.08,cli:0.25): exactly these rows, each in every form, "
                        "instead of --paths x --budgets")
    p.add_argument("--skip-gpu-only", action="store_true", help="leave out the all-resident upper bounds")
    p.add_argument("--name", default=NAME, help=f"the JSON's name (default {NAME}; tables.py takes the rows of "
                                                f"{NAME}_rerun.json where {NAME}.json lacks or skipped them)")
    p.add_argument("--time-budget-s", type=float, default=450.0,
                   help="rows not started by then are recorded as skipped (the GPU call's limit is ~8 min)")
    p.add_argument("--tmp", default="/tmp/moekit_bench_budget", help="where the two checkpoints are written")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (default: removed at the end)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run with --device cpu --tiny")
    shares = [float(s) for s in args.budgets.split(",") if s]
    forms = [f for f in args.forms.split(",") if f]
    for f in forms:
        if f not in FORMS:
            p.error(f"--forms: {f!r} is not one of {', '.join(FORMS)}")
    paths_run = [v for v in args.paths.split(",") if v]
    for v in paths_run:
        if v not in ("api", "cli"):
            p.error(f"--paths: {v!r} is not api or cli")
    chosen = []  # (path, share) pairs of --rows
    for item in (r for r in args.rows.split(",") if r):
        via, _, share = item.partition(":")
        try:
            chosen.append((via, float(share)))
        except ValueError:
            p.error(f"--rows: {item!r} is not PATH:SHARE (e.g. cli:0.08)")
        if via not in ("api", "cli"):
            p.error(f"--rows: {via!r} is not api or cli")
    if chosen:
        shares = sorted({s for _, s in chosen}, reverse=True)
    shape_name = "tiny" if args.tiny else args.shape
    results: dict = {"meta": common.run_meta(args, device), "shape": {"name": shape_name, **SHAPES[shape_name]},
                     "rows": []}
    deadline = common.T_START + args.time_budget_s

    def save() -> None:
        common.write_json(results, args.out, args.name)

    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        paths = make_checkpoints(shape_name, device, tmp, results, ternary_copy="ternary" in forms)
        model_bytes = results["checkpoints"]["bf16"]["tensor_bytes"]
        prompt, prompt_ids = prompt_of(args.prompt_tokens, paths["bf16"])
        ids = torch.tensor([prompt_ids])
        results.update(model_bytes=model_bytes, prompt_tokens=len(prompt_ids), new_tokens=args.new_tokens,
                       budgets={f"{100 * s:.0f}%": int(s * model_bytes) for s in shares})
        save()

        results["gpu_only"] = {}
        for form in [] if args.skip_gpu_only else forms:  # everything resident: the upper bound of each form
            r = api_row(paths[form], None, device, ids, args.new_tokens)
            results["gpu_only"][form] = r
            common.log(f"GPU-only {form}: {r['status']}, {r.get('decode_tok_s') or 0:.1f} tok/s, "
                       f"peak {(r.get('peak_bytes') or 0) / 1e9:.2f} GB")
            save()

        pairs = chosen or [(via, s) for via in paths_run for s in shares]
        plan = [(via, s, f) for via, s in pairs for f in forms]
        for via, share, form in plan:
            budget = int(share * model_bytes)
            head = {"path": via, "form": form, "share": share}
            if time.perf_counter() > deadline:
                results["rows"].append({**head, "budget_bytes": budget, "status": "skipped (time budget)"})
                save()
                continue
            if via == "api":
                r = api_row(paths[form], budget, device, ids, args.new_tokens)
            else:
                r = cli_row(paths[form], budget, device, prompt, args.new_tokens,
                            timeout_s=max(30.0, deadline + 60 - time.perf_counter()))
            results["rows"].append({**head, **r})
            peak = f"{r['peak_bytes'] / 1e9:.3f}" if r.get("peak_bytes") is not None else "-"
            slots = f", {r['plan'].get('cache_slots')} of {r['plan'].get('total_experts')} experts cached" \
                if r.get("plan") else ""
            common.log(f"{via} {form} {100 * share:.0f}% ({budget / 1e9:.3f} GB): {r['status']}, "
                       f"{r.get('decode_tok_s') or 0:.1f} tok/s, peak {peak} GB{slots}"
                       + (f" -- {r['refusal']}" if r.get("refusal") else "")
                       + (f" -- {r['error'][:300]}" if r.get("error") else ""))
            save()
    finally:
        results["total_s"] = time.perf_counter() - common.T_START
        save()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\n" + table(results), flush=True)
    if device.type != "cuda":
        print("(CPU: no allocator peak; 'peak' is the runtime's plan)", flush=True)
    common.log(f"wrote {Path(args.out) / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
