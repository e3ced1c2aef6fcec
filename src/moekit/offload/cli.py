"""Command line of the offload pillar: `moekit pregate`, and the pieces of `moekit generate
--offload` (flags, loading, the stats table), which src/moekit/cli.py calls."""

from __future__ import annotations

import argparse
import json
import sys

from ..cli_common import add_model_args, add_overwrite_arg, add_threads_arg, table
from ..errors import MoekitError
from .config import MISSES, POLICIES, OffloadConfig, format_size, parse_size


# ---- moekit pregate --------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    """Adds `moekit pregate` to the command line."""
    p = sub.add_parser("pregate", help="train pre-gates that predict the next layer's experts (for --predictor pregate)")
    add_model_args(p)
    p.add_argument("--data", required=True, help="calibration text: a .txt/.jsonl file or a folder of them")
    p.add_argument("--out", required=True, help="folder for pregate.safetensors, pregate.json, expert_counts.json "
                                                "(written atomically; must not exist, or be empty)")
    p.add_argument("--max-tokens", type=int, default=65536, help="calibration tokens to read (default 65536)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per layer")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None)
    add_overwrite_arg(p)
    add_threads_arg(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_pregate)


def check_pregate(args: argparse.Namespace):
    """Returns (model folder, device) after checking every flag and path, before any loading."""
    from ..checkpoint import parse_device, parse_dtype
    from ..cli_common import data_path, model_context, model_dir
    from ..outputs import check_output

    if args.max_tokens < 2 or args.seqlen < 2 or args.steps <= 0:
        raise MoekitError("--max-tokens and --seqlen must be >= 2, --steps > 0")
    if args.lr <= 0:
        raise MoekitError(f"--lr must be > 0, got {args.lr}")
    device = args.device or ("cuda" if _cuda() else "cpu")
    parse_device(device)
    parse_dtype(args.dtype)
    path = model_dir(args.model)
    context = model_context(path)
    if args.seqlen > context:
        raise MoekitError(f"--seqlen {args.seqlen} exceeds the model's context ({context} positions)")
    data = data_path(args.data, "--data")
    check_output(args.out, [path, data], args.overwrite)
    return path, device


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_pregate(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_text
    from ..load import load_model
    from ..progress import heartbeat
    from ..tokenizer import load_tokenizer
    from .pregate import save_pregates, train_pregates

    path, device = check_pregate(args)
    tokenizer = load_tokenizer(path)
    with heartbeat("loading the model"):
        model = load_model(path, device=device, dtype=args.dtype)
    stream: list[int] = []
    eos = model.generation_defaults.get("eos_token_ids", ())
    for doc in load_text(args.data):
        stream += tokenizer.encode(doc, add_special_tokens=False) + list(eos[:1])
        if len(stream) >= args.max_tokens:
            break
    moe_layers = sum(model.config.moe_layers)
    with heartbeat(f"training pre-gates: {moe_layers - 1} layers x {args.steps} steps on "
                   f"{min(len(stream), args.max_tokens):,} tokens", on_tty=True):
        weights, report = train_pregates(model, torch.tensor(stream[: args.max_tokens]), steps=args.steps,
                                         lr=args.lr, seqlen=args.seqlen, max_tokens=args.max_tokens)
    out = save_pregates(weights, model.config, args.out, report, overwrite=args.overwrite)
    summary = {"out": str(out), "tokens": report.tokens, "seconds": round(report.seconds, 2),
               "loss_start": report.mean("loss_start"), "loss_end": report.mean("loss_end"),
               "recall_pregate": report.mean("recall_pregate"),
               "recall_speculative": report.mean("recall_speculative"), "layers": report.layers}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"pre-gates for {len(weights)} layers from {report.tokens} tokens in {report.seconds:.1f} s -> {out}")
    print("layer -> next   KL start   KL end   top-k recall: pregate  speculative")
    for i, r in report.layers.items():
        print(f"{i:5d} -> {r['next']:<4d} {r['loss_start']:9.4f} {r['loss_end']:8.4f}   "
              f"{r['recall_pregate']:21.3f}  {r['recall_speculative']:11.3f}")
    print(f"use: moekit generate ... --offload --predictor pregate --pregate {out}")
    return 0


# ---- moekit generate --offload -----------------------------------------------------------------

def add_generate_flags(gen: argparse.ArgumentParser) -> None:
    """Adds the offload flags to `moekit generate`."""
    g = gen.add_argument_group("offload (run a model larger than the device)")
    g.add_argument("--offload", action="store_true",
                   help="keep experts in host memory (GPU) or on disk (CPU) and cache them on the device")
    g.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="everything moekit may hold on the device, e.g. 8GB or 10MB (default: free memory)")
    g.add_argument("--predictor", default="auto", choices=("auto", "none", "speculative", "pregate"),
                   help="how the next layer's experts are prefetched (default: auto, speculative except in "
                        "decode-sized calls whose misses run on the CPU)")
    g.add_argument("--pregate", default=None, metavar="DIR", help="folder written by `moekit pregate`")
    g.add_argument("--cache-policy", default="lfu", choices=POLICIES,
                   help="which cached expert a fetch evicts (default: lfu, use counts kept across evictions)")
    g.add_argument("--pin-counts", default=None, metavar="FILE",
                   help="expert_counts.json: pin the most used experts in a quarter of the cache")
    g.add_argument("--misses", default=None, choices=MISSES,
                   help="where an expert absent from the device cache runs, in calls of up to 8 tokens (decode): "
                        "fetch (copy it in; the default with --strict-pregate), cpu (compute it on the CPU from host "
                        "memory, overlapped with the device; on a GPU with experts under 64 MiB, or compressed ones of any "
                        "size, each decode step is one CUDA graph that the CPU serves as a partner, MOEKIT_CPU_GRAPH=0 to turn that off), auto (default: the CPU computes the misses the cache "
                        "would not keep, the link fetches the others as a cost model says; fetch where misses cannot "
                        "run on the CPU), mapped (GPU: the kernel reads it in place from host memory, so each decode "
                        "step is one CUDA graph; popular experts are copied in between steps; fastest where the cache "
                        "holds most of the experts)")
    g.add_argument("--strict-pregate", action="store_true",
                   help="run only the predicted experts (changes outputs; needs a model tuned for it)")


def check_flags(args: argparse.Namespace) -> None:
    """Raises MoekitError for offload flags given without --offload, or unusable together."""
    used = [f for f, v in (("--device-memory", args.device_memory), ("--pregate", args.pregate),
                           ("--pin-counts", args.pin_counts), ("--strict-pregate", args.strict_pregate),
                           ("--misses", args.misses))
            if v]
    if not args.offload and (used or args.predictor != "auto" or args.cache_policy != "lfu"):
        raise MoekitError(f"{', '.join(used) or '--predictor/--cache-policy'} needs --offload")
    if args.offload and args.compile:
        raise MoekitError("--compile is not available with --offload (offloaded steps are captured as CUDA graphs "
                          "in pieces between the expert calls, uncompiled); drop --compile")


def load_for_generate(args: argparse.Namespace, device: str, context_tokens: int):
    """Returns the offloaded model for `moekit generate --offload`, its budget planned for the
    prompt plus --max-new-tokens."""
    from ..checkpoint import DTYPES
    from ..load import default_model_path, read_config
    from .loader import load_offloaded, read_counts

    dtype = args.dtype
    if dtype is None and not device.startswith("cuda"):
        # offload moves the stored form as it is: on the CPU, compute in the checkpoint's dtype (a
        # compressed checkpoint's: that of its dense weights). Eager bf16, so greedy tokens may part
        # from a resident run's native step (bf16 sums in another order) after a few tokens
        _, _, cfg = read_config(args.model or default_model_path())
        dtype = cfg.dtype if cfg.dtype.replace("torch.", "") in DTYPES else None
    config = OffloadConfig(
        device_memory=parse_size(args.device_memory) if args.device_memory else None,
        predictor=args.predictor, cache_policy=args.cache_policy, context_tokens=context_tokens,
        strict=args.strict_pregate, pregate_path=args.pregate, misses=args.misses or "auto",
        pin_experts=0.25 if args.pin_counts else 0.0, dense=getattr(args, "quantize_dense", None) or "bf16")
    counts = read_counts(args.pin_counts) if args.pin_counts else None
    return load_offloaded(args.model, device=device, dtype=dtype, offload=config, pin_counts=counts)


def stats_rows(report: dict, new_tokens: int) -> list[tuple[str, str]]:
    """Returns the (name, value) rows of the --stats table."""
    plan = report["plan"] or {}
    return [
        ("predictor / policy", f"{report['predictor']} / {report['cache_policy']}  (store: {report['store']})"),
        ("device budget", f"{format_size(plan.get('budget_bytes', 0))}: {report['cache_slots']} of "
                          f"{plan.get('total_experts', 0)} experts cached ({format_size(plan.get('expert_bytes', 0))} each)"),
        ("budget plan", plan_line(plan)),
        ("cache hit rate", f"{report['hit_rate']:.1%}  ({report['hits']} of {report['lookups']})"),
        ("prefetch precision", f"{report['prefetch_precision']:.1%}"),
        ("prefetch recall", f"{report['prefetch_recall']:.1%}"),
        ("bytes moved / token", format_size(report["bytes_per_token"])),
        ("bytes moved", f"{format_size(report['bytes_moved'])} ({report['demand_fetches']} on demand, "
                        f"{report['prefetches']} prefetched)"),
        ("stall time", f"{report['stall_s'] * 1e3:.1f} ms"),
        *_cpu_rows(report),
        ("peak device memory", f"{format_size(report['peak_device_bytes'])}"
                               + ("  (planned)" if report["device"] == "cpu" else "  (allocator peak)")),
    ]


def plan_line(plan: dict) -> str:
    """Returns each reservation of a budget plan on one line (what --stats prints)."""
    if not plan:
        return "-"
    parts = [f"{format_size(plan['resident_bytes'])} weights",
             f"{format_size(plan['kv_cache_bytes'])} KV cache ({plan.get('kv_positions', 0)} positions)",
             f"{format_size(plan['activation_bytes'])} activations (prefill chunk {plan.get('prefill_chunk', 0)})",
             f"{format_size(plan['reserve_bytes'])} workspace"]
    if plan.get("shared_bytes"):
        parts.append(f"{format_size(plan['shared_bytes'])} code tables")
    parts.append(f"{format_size(plan['cache_bytes'])} expert cache")
    line = " + ".join(parts) + f" = {format_size(plan['planned_bytes'])}"
    if plan.get("host_embedding_bytes"):
        line += f"; input embeddings in host memory ({format_size(plan['host_embedding_bytes'])})"
    if plan.get("measured_peak_bytes"):
        line += f"; warm-up peak {format_size(plan['measured_peak_bytes'])}"
    return line


def _cpu_rows(report: dict) -> list[tuple[str, str]]:
    """Returns the --stats rows of experts computed on the CPU (none when misses are fetched)."""
    if report["misses"] == "fetch":
        return []
    rows = [("misses", report["misses"] + (f" (runs {report['misses_used']}: {report['misses_note']})"
                                           if report["misses_note"] else ""))]
    if report["misses_used"] == "mapped":
        rows += [("read in place", f"{report['mapped_reads']} expert reads, {format_size(report['mapped_bytes_per_token'])}"
                                   f" / token; {report['admissions']} copied in between steps")]
    elif report["misses_used"] != "fetch":
        rows += [("experts on the CPU", f"{report['cpu_experts']} ({format_size(report['cpu_bytes_per_token'])} "
                                        f"read / token, {report['cpu_threads']} threads)"),
                 ("CPU time", f"{report['cpu_s'] * 1e3:.1f} ms" + (
                     " (the CPU as partner: each decode step one CUDA graph)" if report.get("cpu_partner")
                     else f" ({report['cpu_wait_s'] * 1e3:.1f} ms waited for)"))]
        if report.get("gathered_experts"):
            rows += [("copied in by the device", f"{report['gathered_experts']} experts beside the CPU's inside the step "
                                                 f"({report['gather_slots']} scratch slot(s)), "
                                                 f"{format_size(report['mapped_bytes_per_token'])} / token")]
        if report.get("in_place_share"):
            split = f", {report['row_split_experts']} split by rows with it" if report.get("row_split") else ""
            rows += [("read in place", f"{report['in_place_experts']} experts beside the CPU's{split}, "
                                       f"{format_size(report['mapped_bytes_per_token'])} / token")]
    return rows


def print_stats(report: dict, new_tokens: int) -> None:
    """Prints the offload --stats table on stderr."""
    print(table(stats_rows(report, new_tokens)), file=sys.stderr)
