"""No-GPU batch-1 decode of compressed models (issue 12): moekit bf16 / int4 / ternary, each compressed form
through the native one-call step (moekit.native.decode with compressed.cpp) and through the eager path
(MOEKIT_CPU_DECODE=0: model.forward with one native compressed-expert call per layer), next to llama.cpp's
CPU decode of the same checkpoint's bf16 GGUF and its llama-quantize types; interleaved rounds, medians.

The int-N rows run once per --int-dots choice (int8: integer dot products on int8 activations,
float: the decoded-weight path; MOEKIT_CPU_INT_DOT) and every native row once per --dense form (int8:
the attention projections and LM head in int8 per row; int4: the attention projections in int4 groups
of 128, the LM head int8; MOEKIT_CPU_DENSE).

Each round runs every engine once in the same order (moekit: one warm generate of --new tokens after a
64-token prompt; llama.cpp: llama-bench -p 0 -n NEW -r 1), so both sample the same drifting host. Then a
profile of one compressed model's eager step: the step's time, the time inside the experts' Python path
(CompressedForm.cpu_ffn: routes, jobs, ctypes) and inside the native kernel alone -- where the glue goes.
The greedy tokens of the native step against the eager path are compared too (bf16 rounding order may
flip a near-tie; the count of equal leading tokens is reported).

    # this VM (2 cores), the olmoe-4-layers checkpoint and GGUFs made beforehand:
    PYTHONPATH=src .venv/bin/python benchmarks/probes/bench_cpu_compressed.py --bf16 /tmp/mk4/bf16 \
        --compressed int4=/tmp/mk4/int4,ternary=/tmp/mk4/ternary \
        --llama-bench /tmp/lcpp/llama.cpp/build-cpu/bin/llama-bench --gguf bf16=/dev/shm/model4.gguf,Q4_K_M=/tmp/mk4/q4km.gguf
    # smoke (seconds): a tiny random checkpoint written and compressed here, moekit only
    PYTHONPATH=src .venv/bin/python benchmarks/probes/bench_cpu_compressed.py --tiny --rounds 2 --out /tmp/bcc
Forms missing from --compressed are compressed (RTN) into --work first (olmoe-4-layers: int4 ~100 s here;
the ternary code over 10 min on these 2 cores, unfinished: --compress-device cuda where there is a GPU).
The H200 host (16 cores; its GPU only compresses), moekit alone, ~5 min (a guess: not run there):
    PYTHONPATH=src python3 benchmarks/probes/bench_cpu_compressed.py --shape olmoe-4-layers --forms int4,ternary \
        --work /dev/shm/bcc --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

import moekit

FORMS = {"int4": {"bits": "4", "group_size": 128}, "int2": {"bits": "2", "group_size": 128}, "ternary": {"bits": "ternary"}}


def pairs(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if item)


def moekit_tok_s(model, prompt: torch.Tensor, new: int, native: bool, dot: str = "",
                 dense: str = "") -> tuple[float, torch.Tensor, bool]:
    """Returns (decode tok/s, the greedy tokens, whether the native step ran) of one warm generate;
    dot: the int-N experts' activations ($MOEKIT_CPU_INT_DOT: int8 or float), dense: the native step's
    attention and LM head weights ($MOEKIT_CPU_DENSE: bf16, int8 or int4); '' the defaults."""
    os.environ["MOEKIT_CPU_DECODE"] = "1" if native else "0"
    for var, value in (("MOEKIT_CPU_INT_DOT", dot), ("MOEKIT_CPU_DENSE", dense)):
        if value:
            os.environ[var] = value
        else:
            os.environ.pop(var, None)
    stats = moekit.GenerationStats()
    tokens = model.generate(prompt, max_new_tokens=new, temperature=0, eos_token_ids=(), stats=stats)
    return stats.decode_tok_s, tokens, bool(stats.extra.get("native_cpu_step"))


def llama_tok_s(binary: str, gguf: str, new: int, threads: int) -> float | None:
    cmd = [binary, "-m", gguf, "-p", "0", "-n", str(new), "-r", "1", "-t", str(threads), "-o", "json"]
    q = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if q.returncode != 0:
        common.log(f"llama-bench {gguf} failed: {q.stderr[-500:]}")
        return None
    return json.loads(q.stdout)[0]["avg_ts"]


def profile_eager(model, prompt: torch.Tensor, new: int) -> dict:
    """Returns the eager step's split (ms per token): all, the experts' Python path, the native kernel."""
    from moekit.native import library
    from moekit.quant.formats import CompressedForm

    lib = library()
    spent = {"cpu_ffn": 0.0, "kernel": 0.0, "calls": 0}
    real_cpu_ffn = CompressedForm.cpu_ffn
    names = ("moekit_int_ffn", "moekit_code_ffn")
    real = {n: getattr(lib, n) for n in names}

    def timed_cpu_ffn(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real_cpu_ffn(self, *args, **kwargs)
        finally:
            spent["cpu_ffn"] += time.perf_counter() - t0

    def timed(fn):
        def call(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent["kernel"] += time.perf_counter() - t0
                spent["calls"] += 1
        return call

    CompressedForm.cpu_ffn = timed_cpu_ffn
    for n in names:
        setattr(lib, n, timed(real[n]))
    try:
        os.environ["MOEKIT_CPU_DECODE"] = "0"
        stats = moekit.GenerationStats()
        model.generate(prompt, max_new_tokens=1, temperature=0, eos_token_ids=(), stats=stats)  # prefill only
        spent.update(cpu_ffn=0.0, kernel=0.0, calls=0)
        stats = moekit.GenerationStats()
        model.generate(prompt, max_new_tokens=new, temperature=0, eos_token_ids=(), stats=stats)
    finally:
        CompressedForm.cpu_ffn = real_cpu_ffn
        for n in names:
            setattr(lib, n, real[n])
    # the prefill's calls are in spent too: count them out by the prefill's share of the calls
    layers = sum(model.config.moe_layers)
    steps = new - 1
    per_call = spent["kernel"] / max(spent["calls"], 1)
    decode_calls = steps * layers
    ffn_share = decode_calls / max(spent["calls"], 1)
    step_ms = 1e3 * stats.decode_s / steps
    experts_ms = 1e3 * spent["cpu_ffn"] * ffn_share / steps
    kernel_ms = 1e3 * per_call * layers
    return {"step_ms": step_ms, "experts_python_path_ms": experts_ms, "kernel_ms": kernel_ms,
            "glue_outside_experts_ms": step_ms - experts_ms, "glue_in_experts_ms": experts_ms - kernel_ms,
            "kernel_calls": spent["calls"], "note": "prefill's one call per layer counted out by call share"}


def tiny_checkpoint(work: Path) -> Path:
    from random_checkpoint import olmoe_hf_config, write_random_checkpoint

    hf = olmoe_hf_config(layers=2, hidden=128, expert_ffn=128, experts=8, top_k=2, heads=4, kv_heads=4, vocab=4096)
    folder, _, _ = write_random_checkpoint(work / "tiny_bf16", hf, torch.device("cpu"),
                                           tokenizer_from=moekit.default_model_path())
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bf16", default="", help="the bf16 checkpoint folder")
    parser.add_argument("--shape", default="", help="instead of --bf16: write bench_llamacpp's random checkpoint of "
                        "this shape (e.g. olmoe-4-layers) into --work")
    parser.add_argument("--compressed", default="", help="form=folder,... of moekit compressed copies of --bf16")
    parser.add_argument("--forms", default="int4,ternary", help="the compressed forms to run (missing ones are made)")
    parser.add_argument("--work", default="/tmp/bench_cpu_compressed")
    parser.add_argument("--compress-device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where missing forms are compressed (the ternary code's RTN on 2 CPU cores: over 10 min "
                             "for olmoe-4-layers, not finished here)")
    parser.add_argument("--llama-bench", default="", help="llama.cpp's llama-bench (CPU build); '' skips llama.cpp")
    parser.add_argument("--gguf", default="", help="name=file,... GGUFs of the same checkpoint")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--int-dots", default="int8,float", help="the int-N forms' native rows once per activation "
                        "type (MOEKIT_CPU_INT_DOT: int8 integer dot products, float the decoded-weight path)")
    parser.add_argument("--dense", default="bf16", help="the native rows once per dense-weight form (MOEKIT_CPU_DENSE: "
                        "bf16, int8 the int8 attention projections and LM head, int4 int4 attention and an int8 LM head); e.g. bf16,int8")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager (MOEKIT_CPU_DECODE=0) compressed rows")
    parser.add_argument("--tiny", action="store_true", help="smoke test: a tiny random checkpoint, moekit only")
    parser.add_argument("--out", default=str(common.REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        bf16 = tiny_checkpoint(work)
    elif args.shape:
        from bench_llamacpp import SHAPES
        from random_checkpoint import write_random_checkpoint

        make, kwargs = SHAPES[args.shape]
        bf16 = work / args.shape
        if not (bf16 / "config.json").exists():
            write_random_checkpoint(bf16, make(**kwargs), torch.device(args.compress_device),
                                    tokenizer_from=moekit.default_model_path())
    else:
        bf16 = Path(args.bf16)
    paths = {k: Path(v) for k, v in pairs(args.compressed).items()}
    results: dict = {"meta": common.run_meta(args, "cpu"), "threads": threads, "made": {}}
    for form in [f for f in args.forms.split(",") if f]:
        if form not in paths or not (paths[form] / "config.json").exists():
            from moekit.quant.compress import compress
            from moekit.quant.config import QuantConfig

            paths[form] = work / f"{bf16.name}_{form}"
            t0 = time.perf_counter()
            compress(bf16, paths[form], QuantConfig(method="rtn", **FORMS[form]), None, device=args.compress_device,
                     progress=False,
                     overwrite=True)
            results["made"][form] = time.perf_counter() - t0
            common.log(f"compressed {form} in {results['made'][form]:.0f} s")
    models = {"bf16": moekit.load_model(bf16, dtype=torch.bfloat16)}
    for form in [f for f in args.forms.split(",") if f]:
        models[form] = moekit.load_model(paths[form], dtype=torch.bfloat16)
    vocab = models["bf16"].config.vocab_size
    prompt = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0))
    dots = [d for d in args.int_dots.split(",") if d]
    engines = []  # (label, model name, native step or None for llama.cpp, int dot, dense form)
    for dense in [d for d in args.dense.split(",") if d]:
        tail = "" if dense == "bf16" else f" {dense}-dense"
        for name in models:
            if name.startswith("int") and dots:
                engines += [(f"moekit {name} native {d}-dot{tail}", name, True, d, dense) for d in dots]
            else:
                engines.append((f"moekit {name} native{tail}", name, True, "", dense))
    if not args.no_eager:
        engines += [(f"moekit {name} eager", name, False, "", "") for name in models if name != "bf16"]
    ggufs = pairs(args.gguf) if args.llama_bench and not args.tiny else {}
    engines += [(f"llama.cpp {name}", name, None, "", "") for name in ggufs]
    tok_s: dict[str, list[float]] = {e[0]: [] for e in engines}
    tokens: dict[str, torch.Tensor] = {}
    for name, model in models.items():  # warm: pages touched, the native library built, int8 copies made
        for dense in [d for d in args.dense.split(",") if d]:
            moekit_tok_s(model, prompt, 4, True, "", dense)
    results["loadavg_before"] = os.getloadavg()
    for r in range(args.rounds):
        for label, name, native, dot, dense in engines:
            if native is None:
                v = llama_tok_s(args.llama_bench, ggufs[name], args.new, threads)
            else:
                v, toks, ran = moekit_tok_s(models[name], prompt, args.new, native, dot, dense)
                if ran != native:
                    raise SystemExit(f"{label}: the native step {'did not run' if native else 'ran'}")
                tokens[label] = toks
            if v is not None:
                tok_s[label].append(v)
        common.log(f"round {r}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in tok_s.items() if v))
    results["loadavg_after"] = os.getloadavg()
    rows = {k: {"tok_s": v, "median": statistics.median(v) if v else None} for k, v in tok_s.items()}
    results["rows"] = rows
    agree = {}
    for name in models:
        a = tokens.get(f"moekit {name} native", tokens.get(f"moekit {name} native {dots[0] if dots else ''}-dot"))
        b = tokens.get(f"moekit {name} eager")
        if a is not None and b is not None:
            same = (a == b)[0].tolist()
            agree[name] = {"equal": bool(all(same)), "leading_equal": same.index(False) if False in same else len(same)}
    results["native_vs_eager_tokens"] = agree
    dot_agree = {}  # int8 against float activations: the greedy tokens of the same prompt
    for name in models:
        a, b = tokens.get(f"moekit {name} native int8-dot"), tokens.get(f"moekit {name} native float-dot")
        if a is not None and b is not None:
            same = (a == b)[0].tolist()
            dot_agree[name] = {"equal": bool(all(same)), "leading_equal": same.index(False) if False in same else len(same),
                               "agreement": sum(same) / len(same)}
    results["int8_vs_float_dot_tokens"] = dot_agree
    compressed_forms = [n for n in models if n != "bf16"]
    if compressed_forms:
        results["profile_eager"] = {n: profile_eager(models[n], prompt, min(args.new, 32)) for n in compressed_forms}
    out = common.write_json(results, args.out, "bench_cpu_compressed")
    lines = [f"{'engine':<44} {'median tok/s':>12}  rounds"]
    for k, v in rows.items():
        med = f"{v['median']:.1f}" if v["median"] else "-"
        lines.append(f"{k:<44} {med:>12}  {', '.join(f'{x:.1f}' for x in v['tok_s'])}")
    for n, p in results.get("profile_eager", {}).items():
        lines.append(f"eager {n} step {p['step_ms']:.2f} ms: experts path {p['experts_python_path_ms']:.2f} ms "
                     f"(kernel {p['kernel_ms']:.2f}), outside experts {p['glue_outside_experts_ms']:.2f} ms")
    for n, a in agree.items():
        lines.append(f"{n}: native vs eager greedy tokens equal {a['equal']} (leading {a['leading_equal']})")
    for n, a in dot_agree.items():
        lines.append(f"{n}: int8 vs float dot greedy tokens equal {a['equal']} (leading {a['leading_equal']}, "
                     f"agreement {a['agreement']:.2f})")
    print("\n".join(lines))
    print(f"({out}; {threads} threads, load {results['loadavg_before']} -> {results['loadavg_after']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
